"""What a sweep writes, on the simulated executor (seconds): a column per swept key, the workload as sent, the
offered-load axis for trace workloads, no secrets under the run directory; and the smaller fixes beside them
(workload names, the summary's KV pool, flag order with a folder's own conf/, a plugin YAML typo, the console
script)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastgen.analysis import (axis_label, columns, describe, gather, is_noisy, natural_key, noise_note, plot, points,
                              series, swept_keys, table_row, x_axis)
from fastgen.redact import REDACTED, is_secret, redact, redact_override

ROOT = Path(__file__).resolve().parent.parent
SECRET = "sk-test-0123456789abcdef"


def run_py(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def trace_sweep(tmp_path_factory):
    """2 time scales x 2 token budgets of azure-code, 12 requests each, simulated; an api_key on the command line."""
    out = tmp_path_factory.mktemp("sweep")
    proc = run_py("-m", "executor=simulated", "hardware=a100-80gb", "model.source=llama-2-7b", "workload=azure-code",
                  "workload.num_requests=12", "progress=false", "workload.time_scale=1,4",
                  "scheduler.token_budget=256,1024", f"target.api_key={SECRET}", f"hydra.sweep.dir={out}")
    assert proc.returncode == 0, proc.stderr
    return out


def test_trace_sweep_table_has_the_swept_keys_and_the_workload_as_sent(trace_sweep):
    runs = gather(trace_sweep)
    assert len(runs) == 4
    assert swept_keys(runs) == ["workload.time_scale", "scheduler.token_budget"]
    cols = columns(runs)
    assert cols[:2] == ["workload.time_scale", "scheduler.token_budget"]
    assert {"arrival", "offered_rate", "prompt_mean", "output_mean", "cpu_wait_frac", "load_avg_1m", "noisy"} <= set(
        cols)
    with open(trace_sweep / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["workload.time_scale"], r["scheduler.token_budget"]) for r in rows} == {
        (t, b) for t in ("1", "4") for b in ("256", "1024")}             # rows tell the jobs apart
    for r in rows:
        requests = [json.loads(x) for x in (Path(r["run_dir"]) / "requests.jsonl").read_text().splitlines()]
        assert r["arrival"] == "trace" and r["clients"] == ""            # no clients for a trace
        assert float(r["prompt_mean"]) == pytest.approx(np.mean([q["prompt_tokens"] for q in requests]))
        assert float(r["output_mean"]) == pytest.approx(np.mean([len(q["token_times"]) for q in requests]))
        arrivals = sorted(q["arrival_time"] for q in requests)
        assert float(r["offered_rate"]) == pytest.approx((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]))
        assert float(r["prompt_mean"]) != 1200          # not the config's default length
    rates = {r["workload.time_scale"]: float(r["offered_rate"]) for r in rows}
    assert rates["1"] == pytest.approx(4 * rates["4"])                   # x4 the time scale: a quarter of the rate
    table = (trace_sweep / "table.md").read_text()
    assert "| workload.time_scale | scheduler.token_budget |" in table
    # per-request SLA outcome, per g, agreeing with the run's SLA fraction
    metrics = runs[0]
    requests = [json.loads(x) for x in (Path(metrics["run_dir"]) / "requests.jsonl").read_text().splitlines()]
    for g in ("g2", "g4", "g6"):
        assert np.mean([q["sla_met"][g] for q in requests]) == pytest.approx(metrics[f"sla_frac_{g}"])


def test_trace_sweep_figures_plot_offered_load(trace_sweep, tmp_path, monkeypatch):
    """One curve per token budget over offered load (requests/s), points ordered, legend in numeric order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = gather(trace_sweep)
    assert x_axis(runs) == "offered_rate" and axis_label("offered_rate") == "offered load (requests/s)"
    lines = series(runs)
    assert list(lines) == ["splitfuse, token_budget=256", "splitfuse, token_budget=1024"]   # numeric order
    offered = sorted({round(table_row(m)["offered_rate"], 9) for m in runs})
    for line in lines.values():
        pts = points(line, "offered_rate", "effective_throughput_g4")
        assert [round(p["x"], 9) for p in pts] == offered                       # both time scales, ordered
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    plot(runs, tmp_path)
    by_name = {f.axes[0].get_xlabel(): f.axes[0] for f in figures}
    ax = by_name["offered load (requests/s)"]                                   # effective_throughput.png
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(lines)
    curves = [line for line in ax.get_lines() if len(line.get_xdata()) > 1]
    assert len(curves) == 2
    for line in curves:
        assert list(np.round(np.asarray(line.get_xdata(), dtype=float), 9)) == offered
    latency = by_name["throughput (requests/s)"]
    labels = [t for t in latency.texts]
    assert labels and all(float(t.get_text()) > 0 for t in labels)            # points labelled with offered load
    for f in figures:
        close(f)


def test_api_key_appears_nowhere_under_the_sweep(trace_sweep):
    hits = [p for p in trace_sweep.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert hits == []
    runs = gather(trace_sweep)
    assert all(m["config"]["target"]["api_key"] == REDACTED for m in runs)
    overrides = (Path(runs[0]["run_dir"]) / ".hydra" / "overrides.yaml").read_text()
    assert f"target.api_key={REDACTED}" in overrides


def test_redaction_names_secrets_not_token_knobs():
    assert all(is_secret(k) for k in ("api_key", "target.api_key", "hf_token", "token", "client_secret", "password",
                                      "key", "wandb_api-key"))
    assert not any(is_secret(k) for k in ("token_budget", "max_tokens", "gen_tokens_per_s", "kv", "prompt_tokens",
                                          "keys", "monkey_business"))
    config = {"target": {"api_key": "abc", "url": "http://x"}, "scheduler": {"token_budget": 512},
              "logger": {"tags": ["hf_token=xyz", "plain"]}, "hf_token": None}
    assert redact(config) == {"target": {"api_key": REDACTED, "url": "http://x"}, "scheduler": {"token_budget": 512},
                              "logger": {"tags": [f"hf_token={REDACTED}", "plain"]}, "hf_token": None}
    assert redact_override("scheduler.token_budget=3") == "scheduler.token_budget=3"


def test_noise_is_marked_in_the_figures_note():
    quiet = {"config": {}, "machine": {"cpu_wait_frac": 0.01, "load_average_end": [1.0], "noise_warning": None}}
    noisy = {"config": {}, "machine": {"cpu_wait_frac": 0.6, "load_average_end": [3.2], "noise_warning": "noisy"}}
    assert not is_noisy(quiet) and is_noisy(noisy)
    assert noise_note([quiet, noisy]) == "hollow: 1 of 2 runs noisy (other processes competed for the CPUs, " \
                                         "waiting for a CPU up to 60% of the time)"
    assert natural_key("a, token_budget=256") < natural_key("a, token_budget=1024")


@pytest.mark.parametrize("workload", ["shared-prefix", "multi-turn", "short"])
def test_every_workload_is_named(workload):
    from fastgen.conf import compose_config
    assert compose_config([f"workload={workload}"]).workload.name == workload
    names = {p.stem: p.read_text() for p in (ROOT / "conf" / "workload").glob("*.yaml")}
    assert all(f"\nname: {stem}\n" in "\n" + text for stem, text in names.items()), "a workload without its name"


def test_simulated_summary_does_not_claim_kv_memory_gb():
    from omegaconf import OmegaConf

    from fastgen.conf import compose_config
    cfg = OmegaConf.to_container(OmegaConf.structured(compose_config(["executor=simulated", "hardware=a100-80gb"])))
    kv = describe(cfg)["kv"]
    assert "memory_gb" not in kv and "pool sized from device memory" in kv
    assert "memory_gb=2.0" in describe(OmegaConf.to_container(OmegaConf.structured(compose_config([]))))["kv"]


def test_available_memory_is_mem_available():
    from fastgen.kernels.linear import available_memory
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        pytest.skip("no /proc/meminfo")
    line = next(x for x in meminfo.read_text().splitlines() if x.startswith("MemAvailable:"))
    assert abs(available_memory() - int(line.split()[1]) * 1024) < 2**28      # within 256 MiB of a fresh read


PLUGIN = '''from dataclasses import dataclass

from fastgen.schedulers import register_scheduler
from fastgen.schedulers.splitfuse import SplitFuseConfig, SplitFuseScheduler

@dataclass
class OrderConfig(SplitFuseConfig):
    name: str = "order-test"
    longest_first: bool = False

@register_scheduler("order-test", config=OrderConfig)
class OrderScheduler(SplitFuseScheduler):
    pass
'''


def test_own_conf_folder_any_flag_order_and_yaml_typos_list_the_keys(tmp_path):
    (tmp_path / "conf" / "scheduler").mkdir(parents=True)
    (tmp_path / "order_test.py").write_text(PLUGIN)
    (tmp_path / "conf" / "scheduler" / "order-test.yaml").write_text(
        "defaults: [order-test_schema, _self_]\nmodule: order_test\ntoken_budget: 640\n")
    (tmp_path / "conf" / "scheduler" / "typo-test.yaml").write_text(
        "defaults: [order-test_schema, _self_]\nmodule: order_test\ntoken_budgt: 640\n")
    for args in (["scheduler=order-test", "--cfg", "job", "workload=short"],
                 ["--cfg", "job", "scheduler=order-test", "workload=short"]):
        proc = run_py(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "name: order-test" in proc.stdout and "token_budget: 640" in proc.stdout and "name: short" in proc.stdout
    proc = run_py("scheduler=typo-test", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "token_budgt" in proc.stderr and "valid keys of OrderConfig: " in proc.stderr and "token_budget" in \
        proc.stderr


def test_console_script_runs_from_any_folder(tmp_path):
    import tomllib
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fastgen"] == "fastgen.__main__:main"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "fastgen", "run", "executor=simulated", "hardware=a100-80gb",
                           "model.source=llama-2-7b", "workload=short", "workload.num_requests=4",
                           "workload.clients=2", "progress=false", f"hydra.run.dir={tmp_path / 'out'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "metrics.json").is_file() and (tmp_path / "out" / "run.log").is_file()
    assert "workload     short (closed loop, 2 clients" in proc.stdout


def test_tp_summary_names_ranks_and_threads_per_rank(tmp_path):
    from omegaconf import OmegaConf

    from fastgen.bench import run_summary, spread_lines
    from fastgen.conf import compose_config
    cfg = OmegaConf.to_container(OmegaConf.structured(compose_config(["executor=tp", "hardware.tensor_parallel=2"])))
    metrics = {"config": cfg, "num_requests": 4, "num_warmups": 0, "time_origin": {"clock": "wall"},
               "machine": {"threads": 2, "ranks": 2}}
    assert ", 2 ranks x 1 thread each" in run_summary(metrics, tmp_path)
    runs = [{"request_throughput": v} for v in (0.076, 0.121, 0.1)]
    lines = spread_lines({"runs": runs})
    assert lines[0] == "repeats      spread over 3 runs:" and "range 0.076-0.121, n=3" in lines[1]
