"""logger=wandb, offline into temporary directories (no account, no network), read back from the offline run files
(fastgen.wandb_offline): a sweep is one group, each run carries its diff, summary, steps, requests table and files,
the sweep's summary run has the table and figures; an ablation is a group too; logger=none imports no wandb, and a
failing wandb never costs the run its files. Simulated executor, tiny workloads."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastgen.analysis import gather_wandb, swept_keys
from fastgen.wandb_offline import find_runs

ROOT = Path(__file__).resolve().parent.parent
SIM = ["executor=simulated", "hardware=a100-80gb", "model.source=llama-2-7b", "workload.num_requests=4",
       "workload.prompt.mean=64", "workload.output.mean=8", "progress=false"]
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def run(*args, module=None):
    cmd = [sys.executable, *(["-m", module] if module else [str(ROOT / "run.py")]), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """2 schedulers x 2 client counts, logger=wandb offline."""
    out = tmp_path_factory.mktemp("sweep")
    run("-m", *SIM, "scheduler=splitfuse,continuous", "workload.clients=1,2", "logger=wandb", "logger.tags=[t1]",
        f"hydra.sweep.dir={out}")
    return out


def test_a_sweep_is_one_group_with_a_diff_per_run(sweep):
    runs = find_runs(sweep)
    jobs = [r for r in runs if r.job_type != "summary"]
    assert len(jobs) == 4 and len(runs) == 5
    assert len({r.group for r in runs}) == 1 and runs[0].group == "_".join(sweep.parts[-2:])
    assert sorted(r.name for r in jobs) == ["continuous-clients1", "continuous-clients2", "splitfuse-clients1",
                                            "splitfuse-clients2"]
    for r in jobs:
        assert r.job_type == r.config["scheduler"]["name"] and {"t1", "sweep"} <= set(r.tags)
        assert r.config["diff"] == {"scheduler": r.config["scheduler"]["name"],
                                    "workload.clients": str(r.config["workload"]["clients"])}
        metrics = json.loads(next(Path(sweep).glob(f"*/wandb/{r.dir.name}")).parent.parent.joinpath(
            "metrics.json").read_text())
        flat = {k for k, v in metrics.items() if not isinstance(v, (dict, list)) and v is not None}
        assert flat <= set(r.summary) and r.summary["request_throughput"] == metrics["request_throughput"]
        steps = [h for h in r.history if "step/num_tokens" in h]
        assert steps and {"step/num_prefill_tokens", "step/kv_used_tokens", "step/forward_s", "step/schedule_s",
                          "step/num_seqs"} <= set(steps[0])
        rows = r.table("requests")
        assert len(rows) == 4 and {"arrival_s", "ttft_s", "tpot_s", "e2e_s", "output_tokens",
                                   "sla_met_g4"} <= set(rows[0])
        assert any(a.startswith("run-files-") for a in r.artifacts)


def test_the_sweep_summary_run_has_the_table_and_both_figures(sweep):
    summary = [r for r in find_runs(sweep) if r.job_type == "summary"]
    assert len(summary) == 1
    s = summary[0]
    assert len(s.table("table")) == 4 and {"workload.clients", "scheduler", "request_throughput"} <= set(
        s.table("table")[0])
    for image in ("throughput_latency", "effective_throughput"):
        assert s.summary[image]["_type"] == "image-file" and s.media(image).stat().st_size > 1000


def test_the_table_is_rebuilt_from_the_offline_runs(sweep):
    runs = gather_wandb(sweep)
    assert len(runs) == 4 and swept_keys(runs) == ["scheduler", "workload.clients"]
    run("--wandb", str(sweep), module="fastgen.analysis")
    assert (sweep / "wandb_table" / "table.md").read_text().count("\n") == 6      # header, rule, 4 rows


def test_repeats_are_runs_of_one_group_with_their_seed(tmp_path):
    run(*SIM, "repeats=2", "logger=wandb", "logger.group=reps", f"hydra.run.dir={tmp_path}")
    runs = find_runs(tmp_path)
    assert {r.group for r in runs} == {"reps"} and len(runs) == 2
    assert sorted(r.config["workload"]["seed"] for r in runs) == [0, 1]
    assert sorted(r.name for r in runs) == ["splitfuse-closed_loop-c4-seed0", "splitfuse-closed_loop-c4-seed1"]


def test_logger_none_imports_no_wandb(tmp_path):
    code = ("import sys; from fastgen.conf import compose_config; from fastgen.bench import run_benchmark; "
            f"run_benchmark(compose_config({SIM!r}), {str(tmp_path)!r}); "
            "assert 'wandb' not in sys.modules, 'wandb imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "metrics.json").is_file()


def test_a_failing_wandb_never_loses_the_run_files(tmp_path, monkeypatch, caplog):
    import wandb

    from fastgen.bench import run_benchmark
    from fastgen.conf import compose_config

    def broken(*args, **kwargs):
        raise wandb.errors.CommError("bad entity")

    monkeypatch.setattr(wandb, "init", broken)
    metrics = run_benchmark(compose_config([*SIM, "logger=wandb"]), tmp_path)
    assert metrics["num_completed"] == 4
    assert {"metrics.json", "requests.jsonl", "steps.jsonl"} <= {p.name for p in tmp_path.iterdir()}
    assert "wandb logging" in caplog.text and "files are complete" in caplog.text


def test_an_ablation_is_one_group_with_its_factor_table(tmp_path):
    out = tmp_path / "ablation"
    run(*SIM, "repeats=2", "logger=wandb", "factors=[scheduler=continuous,[kv.block_size=16,workload.clients=2]]",
        "ladder=true", "metrics=[request_throughput,e2e_s_mean]", f"out={out}", module="fastgen.ablate")
    table = (out / "ablation.md").read_text()
    assert "| base | base | 2 |" in table and "± " in table and "effect on e2e_s_mean" in table
    runs = find_runs(out)
    assert {r.group for r in runs} == {f"ablation_{out.name}"}
    jobs = [r for r in runs if r.job_type != "summary"]
    # base, 2 factors, the ladder's second step (its first is the first factor): 4 runs x 2 seeds
    assert len(jobs) == 8 and {r.job_type for r in jobs} == {"base", "factor", "ladder"}
    diffs = {r.name.rsplit("-seed", 1)[0]: r.config["diff"] for r in jobs}
    assert diffs["scheduler=continuous"] == {"scheduler": "continuous"} and diffs["base"] == {}
    assert diffs["+ kv.block_size=16 workload.clients=2"] == {"scheduler": "continuous", "kv.block_size": "16",
                                                              "workload.clients": "2"}
    summary = [r for r in runs if r.job_type == "summary"]
    assert len(summary) == 1 and len(summary[0].table("table")) == 5
    assert {"request_throughput_effect", "e2e_s_mean_std"} <= set(summary[0].table("table")[0])
