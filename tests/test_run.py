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


SCHEDULER_PLUGIN = '''
from dataclasses import dataclass

from fastgen.schedulers import register_scheduler
from fastgen.schedulers.splitfuse import SplitFuseConfig, SplitFuseScheduler


@dataclass
class PromptOrderConfig(SplitFuseConfig):
    name: str = "prompt-order"
    longest_first: bool = False          # the knob of its own


@register_scheduler("prompt-order", config=PromptOrderConfig)
class PromptOrderScheduler(SplitFuseScheduler):
    def prompt_order(self):
        return sorted(self.prefill_candidates(), key=lambda r: r.num_pending_tokens,
                      reverse=self.config.longest_first)
'''

KV_PLUGIN = '''
from dataclasses import dataclass

from fastgen.kv.blocked import BlockedKVConfig, BlockedKVManager
from fastgen.kv.manager import register_kv_manager
from fastgen.request import RequestStatus


@dataclass
class WatermarkKVConfig(BlockedKVConfig):
    name: str = "watermark"
    watermark_blocks: int = 2            # the knob of its own: blocks a new request may not take


@register_kv_manager("watermark", config=WatermarkKVConfig)
class WatermarkKVManager(BlockedKVManager):
    def can_allocate(self, req, num_new_tokens):
        reserve = self.config.watermark_blocks if req.status is RequestStatus.WAITING else 0
        return self._new_blocks(req, num_new_tokens) + reserve <= self.allocator.num_free
'''


def test_plugins_from_outside_the_package_with_knobs_of_their_own(tiny_dir, tmp_path):
    """A scheduler and a KV manager, each one Python file plus one YAML file in the user's own folder (not in
    fastgen), run by run.py from that folder; a typo in a new knob is refused by Hydra listing the valid keys."""
    (tmp_path / "my_policies").mkdir()
    (tmp_path / "my_policies" / "prompt_order.py").write_text(SCHEDULER_PLUGIN)
    (tmp_path / "my_kv.py").write_text(KV_PLUGIN)
    for group, name, body in (("scheduler", "prompt-order", "module: my_policies.prompt_order\ntoken_budget: 32\n"
                                                            "longest_first: true\n"),
                              ("kv", "watermark", "module: my_kv.py\nblock_size: 16\nwatermark_blocks: 3\n")):
        (tmp_path / "conf" / group).mkdir(parents=True, exist_ok=True)
        (tmp_path / "conf" / group / f"{name}.yaml").write_text(f"defaults: [{name}_schema, _self_]\n{body}")
    args = small(tiny_dir, "scheduler=prompt-order", "kv=watermark", "hydra.run.dir=out")
    proc = run_py(*args, "kv.watermark_blocks=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "out" / "metrics.json").read_text())["config"]
    assert config["scheduler"] == {"name": "prompt-order", "max_seqs": 512, "preemption": "newest",
                                   "module": "my_policies.prompt_order", "token_budget": 32, "longest_first": True}
    assert config["kv"]["watermark_blocks"] == 4 and config["kv"]["name"] == "watermark"
    typo = run_py(*args, "scheduler.longest_frist=false", cwd=tmp_path)
    assert typo.returncode != 0 and "Traceback" not in typo.stderr
    assert "longest_frist" in typo.stderr and "valid keys of PromptOrderConfig" in typo.stderr
    assert "longest_first" in typo.stderr.split("valid keys")[1]
    bad = run_py(*small(tiny_dir, "scheduler=prompt-order", "scheduler.module=no_such_module"), cwd=tmp_path)
    assert bad.returncode != 0 and "cannot import plugin module 'no_such_module'" in bad.stderr
    assert "Traceback" not in bad.stderr and "Loading" not in bad.stderr     # refused before any model loads
