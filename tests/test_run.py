"""run.py end to end (subprocess, as a user runs it), sweeps, the gather step, and bad overrides."""
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastgen.analysis import gather, series, table_row
from fastgen.metrics import g_suffix
from fastgen.schedulers.splitfuse import SplitFuseConfig
from tiny import tiny_hf_model

ROOT = Path(__file__).resolve().parent.parent
KEYS = ["request_throughput", "output_token_throughput", "total_token_throughput", "ttft_s_p50", "ttft_s_p95",
        "ttft_s_p99", "tpot_s_p50", "tpot_s_p95", "itl_s_p50", "itl_s_p95", "itl_s_p99", "e2e_s_p50", "e2e_s_p95",
        "num_requests", "num_completed", "duration_s", "config", "time_origin", "machine", "model_load",
        "qoe_mean", "fairness_jain"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama").save_pretrained(path)
    return path


def run_py(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def small(tiny_dir, *extra):
    return ["model=local", f"model.source={tiny_dir}", "workload.num_requests=6", "workload.clients=2",
            "workload.prompt.mean=40", "workload.prompt.max=100", "workload.output.mean=8", "kv.memory_gb=0.05",
            "progress=false", *extra]


def test_run_writes_metrics_with_every_key(tiny_dir, tmp_path):
    """One run: the metrics, files that join on one time origin, run.log = the console, and a summary that says
    what ran and where it went."""
    proc = run_py(*small(tiny_dir, f"hydra.run.dir={tmp_path}", "scheduler.token_budget=32"))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(KEYS) <= set(metrics)
    assert [f"effective_throughput_{g_suffix(g)}" for g in metrics["config"]["sla"]["gen_tokens_per_s"]] == [
        "effective_throughput_g1p8", "effective_throughput_g3p6", "effective_throughput_g5p5"]   # the CPU's SLA
    assert all(k in metrics for k in ("effective_throughput_g1p8", "effective_throughput_g3p6"))
    assert metrics["num_completed"] == metrics["num_requests"] == 6 and metrics["num_warmups"] == 2
    assert metrics["config"]["scheduler"]["token_budget"] == 32
    requests = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    steps = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [r["request_id"] for r in requests] == [str(i) for i in range(6)]     # measured ids from 0
    # one time origin: the run's start (metrics.json); every token was produced during one of the steps
    assert metrics["time_origin"]["clock"] == "wall" and metrics["time_origin"]["unix_time"] > 1.6e9
    assert steps[0]["start"] >= 0 and min(r["arrival_time"] for r in requests) >= 0
    assert max(r["finish_time"] for r in requests) <= metrics["duration_s"] + 1e-9
    for r in requests:
        assert r["arrival_time"] <= r["first_scheduled_time"] <= r["token_times"][0] <= r["finish_time"]
        for t in r["token_times"]:
            assert any(s["start"] <= t <= s["start"] + s["duration_s"] + 1e-9 for s in steps), t
    machine = metrics["machine"]
    assert machine["cpu_model"] and machine["cpus"] >= 1 and machine["threads"] >= 1
    assert len(machine["load_average_start"]) == len(machine["load_average_end"]) == 3
    assert 0 <= machine["cpu_wait_frac"] <= 1
    assert metrics["model_load"]["reused"] is False and metrics["model_load"]["load_s"] > 0
    summary = proc.stdout[proc.stdout.index("scheduler    "):]
    for words in ("scheduler    splitfuse", "token_budget=32", "workload     default (closed loop, 2 clients",
                  "6 measured requests (ids 0..5) + 2 warm-ups", "executor     real executor: ", "SLA          cpu:",
                  f"output       {tmp_path.resolve()}", "effective"):
        assert words in proc.stdout, words
    log = (tmp_path / "run.log").read_text()
    assert summary.strip() in log and "req/s" in log                # run.log holds what the console showed


def test_multirun_2x2_loads_the_model_once_and_ends_with_the_table(tiny_dir, tmp_path):
    proc = run_py("-m", *small(tiny_dir, f"hydra.sweep.dir={tmp_path}", "scheduler=splitfuse,continuous",
                               "workload.clients=1,2"))
    assert proc.returncode == 0, proc.stderr
    runs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/metrics.json"))]
    assert len(runs) == 4
    assert [m["model_load"]["reused"] for m in runs] == [False, True, True, True]   # loaded by the first job only
    assert proc.stdout.count(": loaded in") == 1 and proc.stdout.count("reusing the copy") == 3
    # the sweep's end (the SweepSummary callback): the table and figures in the sweep directory, and where
    assert f"sweep of 4 runs: {tmp_path.resolve()}" in proc.stdout
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == 6 and table in proc.stdout and "effective_throughput_g" in table
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("throughput_latency.png", "effective_throughput.png"))
    rows = gather(tmp_path)
    assert {(table_row(r)["scheduler"], table_row(r)["clients"]) for r in rows} == {
        (s, c) for s in ("splitfuse", "continuous") for c in (1, 2)}
    assert sorted(series(rows)) == ["continuous", "splitfuse"]   # token_budget / max_seqs differ by policy only


@pytest.mark.parametrize("override,message", [
    ("scheduler=nope", "Could not find 'scheduler/nope'"),
    ("workload.rate=-1", "rate"),
    ("kv.no_such_key=1", "no_such_key"),
    ("workload.clients=abc", "clients"),
])
def test_bad_override_exits_nonzero_naming_the_problem(override, message, tiny_dir, tmp_path):
    extra = ["workload.arrival=poisson"] if "rate" in override else []
    proc = run_py(*small(tiny_dir, f"hydra.run.dir={tmp_path}", override, *extra))
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wandb_logger_offline_writes_a_run(tiny_dir, tmp_path):
    proc = run_py(*small(tiny_dir, f"hydra.run.dir={tmp_path}", "logger=wandb"), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), "wandb wrote no offline run"


README_EXAMPLES = ("## Writing a scheduler", "## Writing a KV manager", "## Writing an executor")


def readme_examples() -> tuple[dict[str, str], list[str]]:
    """The README's plugin examples, verbatim: each code block's file (named by its first line, a comment) and
    the overrides of each section's `python run.py ...` command."""
    text = (ROOT / "README.md").read_text()
    files, overrides = {}, []
    for heading in README_EXAMPLES:
        section = text.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
        for block in re.findall(r"```(?:python|yaml)\n(.*?)```", section, re.S):
            files[block.split("\n", 1)[0].removeprefix("# ").strip()] = block
        command = re.search(r"`python run\.py ([^`]+)`", section)[1]
        overrides += command.split()
    return files, overrides


def test_readme_plugin_examples_run_verbatim_from_a_folder_of_ones_own(tiny_dir, tmp_path):
    """The README's scheduler, KV manager and executor, copied out of the README into a fresh folder (not fastgen)
    and run by run.py from there with the README's commands; a typo in a new knob is refused listing the valid
    keys, and a module that does not import is one error line before any model loads."""
    files, overrides = readme_examples()
    assert {"my_policies/prompt_order.py", "conf/scheduler/prompt-order.yaml", "my_kv.py", "conf/kv/watermark.yaml",
            "my_executors/recording.py", "conf/executor/recording.yaml"} <= set(files)
    for path, body in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(body)
    assert "scheduler=prompt-order" in overrides and "kv=watermark" in overrides and "executor=recording" in overrides
    args = small(tiny_dir, "hydra.run.dir=out", "scheduler.token_budget=32")
    proc = run_py(*args, *overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    config = metrics["config"]
    assert config["scheduler"] == {**dataclasses.asdict(SplitFuseConfig()), "name": "prompt-order",
                                   "module": "my_policies.prompt_order", "token_budget": 32, "longest_first": True}
    assert config["kv"]["name"] == "watermark" and config["kv"]["watermark_blocks"] == 4
    assert config["executor"]["name"] == "recording"
    shapes = (tmp_path / config["executor"]["path"]).read_text().splitlines()      # the executor's own file
    assert len(shapes) == metrics["num_steps"] and re.fullmatch(r"0\+\d+( 0\+\d+)*", shapes[0])
    typo = run_py(*args, "scheduler=prompt-order", "scheduler.longest_frist=false", cwd=tmp_path)
    assert typo.returncode != 0 and "Traceback" not in typo.stderr
    assert "longest_frist" in typo.stderr and "valid keys of PromptOrderConfig" in typo.stderr
    assert "longest_first" in typo.stderr.split("valid keys")[1]
    bad = run_py(*small(tiny_dir, "scheduler=prompt-order", "scheduler.module=no_such_module"), cwd=tmp_path)
    assert bad.returncode != 0 and "loaded in" not in bad.stdout + bad.stderr      # refused before any model loads
    assert bad.stderr.strip().count("\n") == 0, bad.stderr                         # in one line
    assert bad.stderr.startswith("error: cannot import plugin module 'no_such_module'") and "sys.path" in bad.stderr


def test_plugin_modules_of_any_config_group_are_imported_before_composition(tmp_path, monkeypatch):
    """The mechanism is not specific to schedulers, KV managers and executors: a config group fastgen does not
    have yet (routers) gets its `module:` imported, from ./conf or hydra.searchpath, and `<group>.module=` too."""
    from fastgen.plugins import PluginError, import_plugins
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "conf" / "router").mkdir(parents=True)
    (tmp_path / "conf" / "router" / "rr.yaml").write_text("module: my_router.py\n")
    (tmp_path / "my_router.py").write_text("ROUTES = 'round-robin'\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "extra_router.py").write_text("ROUTES = 'least-loaded'\n")
    try:
        import_plugins(["router=rr", "seed=3", "hydra.run.dir=x"], [], {"scheduler": "splitfuse"})
        assert sys.modules["my_router"].ROUTES == "round-robin"
        import_plugins(["router.module=other/extra_router.py"], [], {})
        assert sys.modules["extra_router"].ROUTES == "least-loaded"
    finally:
        sys.modules.pop("my_router", None)
        sys.modules.pop("extra_router", None)
    with pytest.raises(PluginError, match="cannot import plugin module 'nope_router'.*sys.path"):
        import_plugins(["router.module=nope_router"], [], {})


BAD_VALUES = [   # (overrides, what the message names): every part's knobs and the harness's
    (["scheduler.token_budget=0"], "scheduler.token_budget"), (["scheduler.max_seqs=0"], "scheduler.max_seqs"),
    (["scheduler.preemption=random"], "scheduler.preemption"),
    (["scheduler=sarathi", "scheduler.chunk_size=0"], "scheduler.chunk_size"),
    (["scheduler=orca", "scheduler.batch_size=0"], "scheduler.batch_size"),
    (["kv.block_size=0"], "kv.block_size"), (["kv.num_blocks=0"], "kv.num_blocks"), (["kv.memory_gb=0"], "memory_gb"),
    (["kv=contiguous", "kv.block_size=-1"], "kv.block_size"),
    (["executor=simulated", "executor.memory_utilization=1.5"], "memory_utilization"),
    (["hardware.device=tpu"], "hardware.device"), (["hardware.dtype=int8"], "hardware.dtype"),
    (["hardware.kernels=cutlass"], "hardware.kernels"), (["hardware.threads=0"], "hardware.threads"),
    (["hardware.tensor_parallel=0"], "tensor_parallel"), (["model.max_model_len=0"], "model.max_model_len"),
    (["model.source="], "model.source"),
    (["workload.num_requests=0"], "num_requests"), (["workload.clients=0"], "clients"),
    (["workload.arrival=poisson", "workload.rate=0"], "rate"),
    (["workload.arrival=gamma", "workload.burstiness=0"], "burstiness"),
    (["workload.arrival=uniform"], "arrival"), (["workload.jitter_s_per_client=-1"], "jitter_s_per_client"),
    (["workload.prompt.min=0"], "prompt.min"), (["workload.output.mean=0"], "output.mean"),
    (["workload.prompt.dist=lognormal"], "prompt.dist"), (["workload.time_scale=0"], "time_scale"),
    (["workload.too_long=truncate"], "too_long"), (["workload.random_token_low=-1"], "random_token_low"),
    (["workload.corpus_path=/no/such/corpus.txt"], "corpus_path"), (["workload.prompt_source=web"], "prompt_source"),
    (["workload.max_prompt_len=0"], "max_prompt_len"), (["workload.arrival=trace"], "trace_path"),
    (["sla.prompt_tokens_per_s=0"], "prompt_tokens_per_s"), (["sla.gen_tokens_per_s=[]"], "gen_tokens_per_s"),
    (["sla.ema_span=0"], "ema_span"), (["logger=wandb", "logger.mode=sometimes"], "logger.mode"),
    (["target=http"], "target.url"), (["target.url=ftp://host"], "target.url"),
    (["repeats=0"], "repeats"), (["timer=gpu"], "timer"), (["timer=cpu"], "hardware.threads=1"),
    (["timer=cpu", "hardware.threads=1", "executor=simulated"], "virtual clock"),
]


@pytest.mark.parametrize("overrides,names", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_every_bad_value_is_refused_before_the_model_loads(overrides, names, tmp_path, monkeypatch):
    from fastgen import bench
    from fastgen.conf import compose_config
    from fastgen.executors import real

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")
    monkeypatch.setattr(bench, "load_model", no_loading)
    monkeypatch.setattr(real, "load_model", no_loading)
    cfg = compose_config(["progress=false", *overrides])
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(names)):
        bench.run_benchmark(cfg, tmp_path)


def test_repeats_on_the_cpu_clock_give_means_and_error_bars(tiny_dir, tmp_path):
    """repeats=2 timer=cpu: two runs (workload seeds 0 and 1) timed in this process's CPU seconds; metrics are
    their means, each run's are kept, the files tell the runs apart, and the figures draw error bars."""
    import time

    import torch

    from fastgen.analysis import error_bar_note, plot, points
    from fastgen.bench import run_benchmark
    from fastgen.conf import compose_config
    threads = torch.get_num_threads()
    cfg = compose_config(small(tiny_dir, "repeats=2", "timer=cpu", "hardware.threads=1"))
    try:
        before = time.process_time()
        metrics = run_benchmark(cfg, tmp_path)
    finally:
        torch.set_num_threads(threads)
    runs = metrics["runs"]
    assert len(runs) == 2 and metrics["time_origin"]["clock"] == "cpu" and metrics["machine"]["threads"] == 1
    assert 0 <= runs[0]["time_origin"]["clock_start"] - before < 10      # CPU seconds, not the wall clock's
    assert metrics["request_throughput"] == pytest.approx(sum(r["request_throughput"] for r in runs) / 2)
    requests = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    prompts = [[r["prompt_tokens"] for r in requests if r["repeat"] == k] for k in (0, 1)]
    assert len(prompts[0]) == len(prompts[1]) == 6 and prompts[0] != prompts[1]     # different workload seeds
    assert {json.loads(x)["repeat"] for x in (tmp_path / "steps.jsonl").read_text().splitlines()} == {0, 1}
    [point] = points([metrics], "request_throughput", "e2e_s_mean")
    assert point["n"] == 2 and point["y_std"] > 0
    assert error_bar_note([metrics]) == "error bars: +-1 std over 2 runs per point"
    assert all(f.stat().st_size > 1000 for f in plot([metrics], tmp_path))
