"""run.py end to end (subprocess, as a user runs it), sweeps, the gather step, and bad overrides."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastgen.analysis import gather, plot, write_table
from tiny import tiny_hf_model

ROOT = Path(__file__).resolve().parent.parent
KEYS = ["request_throughput", "output_token_throughput", "total_token_throughput", "effective_throughput_g2",
        "effective_throughput_g4", "effective_throughput_g6", "ttft_s_p50", "ttft_s_p95", "ttft_s_p99",
        "tpot_s_p50", "tpot_s_p95", "itl_s_p50", "itl_s_p95", "itl_s_p99", "e2e_s_p50", "e2e_s_p95",
        "num_requests", "num_completed", "duration_s", "config"]


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
    proc = run_py(*small(tiny_dir, f"hydra.run.dir={tmp_path}", "scheduler.token_budget=32"))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(KEYS) <= set(metrics)
    assert metrics["num_completed"] == metrics["num_requests"] == 6
    assert metrics["config"]["scheduler"]["token_budget"] == 32
    lines = (tmp_path / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(len(json.loads(x)["token_times"]) >= 1 for x in lines)
    assert "effective" in proc.stdout


def test_multirun_2x2_and_gather(tiny_dir, tmp_path):
    proc = run_py("-m", *small(tiny_dir, f"hydra.sweep.dir={tmp_path}", "scheduler=splitfuse,continuous",
                               "workload.clients=1,2"))
    assert proc.returncode == 0, proc.stderr
    assert len(list(tmp_path.glob("*/metrics.json"))) == 4
    rows = gather(tmp_path)
    assert {(r["scheduler"], r["clients"]) for r in rows} == {(s, c) for s in ("splitfuse", "continuous")
                                                              for c in (1, 2)}
    write_table(rows, tmp_path)
    figures = plot(rows, tmp_path)
    assert (tmp_path / "table.md").read_text().count("\n") == 6
    assert all(f.stat().st_size > 1000 for f in figures)


@pytest.mark.parametrize("override,message", [
    ("scheduler=nope", "Could not find 'scheduler/nope'"),
    ("workload.rate=-1", "rate"),
    ("kv.no_such_key=1", "no_such_key"),
    ("workload.clients=abc", "clients"),
    ("target=http", "target=http needs target.url"),
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
