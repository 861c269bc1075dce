"""fastgen.result_cache: a simulated run's metrics are found again by its config; real runs are never kept. And
fastgen.bench.run_or_reuse: a run directory's metrics.json is reused when asked."""
import json

from fastgen.analysis import interpolate, spread
from fastgen.bench import run_or_reuse
from fastgen.result_cache import cache_path, run_cached


def test_simulated_runs_are_kept_by_config_and_real_ones_never(tmp_path):
    sim = {"executor": {"name": "simulated"}, "scheduler": {"name": "splitfuse"}}
    other = {"executor": {"name": "simulated"}, "scheduler": {"name": "continuous"}}
    assert cache_path(tmp_path, {"executor": {"name": "real"}}) is None and cache_path(None, sim) is None
    assert cache_path(tmp_path, sim).parent == tmp_path and cache_path(tmp_path, sim) != cache_path(tmp_path, other)
    cache_path(tmp_path, sim).write_text(json.dumps({"request_throughput": 1.5}))
    assert run_cached(sim, tmp_path / "never-run", tmp_path) == {"request_throughput": 1.5}
    assert not (tmp_path / "never-run").exists()


def test_interpolate_and_spread():
    assert interpolate([3, 1, 2], [30, 10, 20], 2.5) == 25.0 and interpolate([1, 2], [1, 2], 3) is None
    runs = [{"runs": [{"x": 1.0}, {"x": 3.0}]}, {"x": 5.0}]
    assert spread(runs, "x") == [2 ** 0.5, 0.0]


def test_run_or_reuse_reads_a_kept_run(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"request_throughput": 2.0}))
    assert run_or_reuse(["no-such-override=1"], tmp_path, reuse=True) == {"request_throughput": 2.0}
