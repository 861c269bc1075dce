"""What the experiments that measure fastgen beside its peers share (bench_vs_hf.py, bench_peers.py,
ray_replica_scaling.py, serve_neighbour_gap.py) beyond fastgen.peers: quick sizes, validation, the rows of
transformers `generate`, run.py target=http, and the results files. A script imports it by name (its own directory
is on sys.path).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # run from a checkout without installing fastgen
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# fastgen before torch: importing fastgen sets its OpenMP spin count (fastgen.openmp), read when torch loads
from fastgen.machine import load_average  # noqa: E402
from fastgen.peers import servers  # noqa: E402
from fastgen.peers.hf import hf_generate  # noqa: E402
from fastgen.peers.offline import Req  # noqa: E402

import torch  # noqa: E402,I001


# ---------------------------------------------------------------------------------------------------------------
# config entry: conf/<name>.yaml, whose first default is `<name>_schema`, the script's config dataclass
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class HFGenerateConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    bs1_max_requests: int = 6            # bs=1 runs on the first N requests of the workload


@dataclass
class FastgenConfig:
    schedulers: list[str] = field(default_factory=lambda: ["splitfuse", "continuous", "orca", "static"])
    overrides: list[str] = field(default_factory=list)


def shrink(cfg) -> None:
    """quick=true's common part: 4 short requests per workload, a small token budget (still above the longest
    quick prompt, which continuous/orca need) and KV pool for fastgen."""
    from fastgen.workloads import LengthSpec
    for name, w in cfg.workloads.items():
        w.num_requests = 4
        w.prompt = LengthSpec(dist="normal", mean=96 if name == "long-prompt" else 48, std_frac=0.3, min=8, max=160)
        w.output = LengthSpec(dist="normal", mean=8, std_frac=0.3, min=2, max=16)
    cfg.fastgen.overrides = ["scheduler.token_budget=192", "kv.memory_gb=0.25", *cfg.fastgen.overrides]


def check(cfg, systems: tuple[str, ...], workloads: list[str], what: str = "run") -> None:
    """The systems are known, the workloads named are defined, and each workload is valid."""
    unknown = [s for s in cfg.systems if s not in systems]
    if unknown:
        raise ValueError(f"unknown systems {unknown}; choose from {systems}")
    missing = [w for w in workloads if w not in cfg.workloads]
    if missing:
        raise ValueError(f"{what} name workloads {missing} that are not in `workloads` ({sorted(cfg.workloads)})")
    for w in cfg.workloads.values():
        w.validate()


def log(msg: str) -> None:
    print(f"[{Path(sys.argv[0]).stem} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# a run's files: partial.jsonl as rows finish, results.json and results.md at the end
# ---------------------------------------------------------------------------------------------------------------
PARTIAL: Optional[Path] = None


def start_run(cfg, out_dir: str | os.PathLike, apply_quick: Callable, validate: Callable) -> Path:
    """quick sizes, validation, the output directory with its partial.jsonl, torch's threads."""
    global PARTIAL
    if cfg.quick:
        apply_quick(cfg)
    validate(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    PARTIAL = out / "partial.jsonl"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return out


def write_results(out: Path, results: dict, md: str | None = None) -> dict:
    """results.json (and results.md, printed too) into `out`."""
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if md is not None:
        (out / "results.md").write_text(md)
        print(md)
        print(f"wrote {out / 'results.json'} and {out / 'results.md'}", flush=True)
    return results


def checkpoint(kind: str, item: dict) -> None:
    if PARTIAL is not None:
        with open(PARTIAL, "a") as f:
            f.write(json.dumps({"kind": kind, **item}) + "\n")
    if kind == "row":
        log(f"  {item['system']} {item['setting']} {item['dtype']}: {item['wall_s']:.1f} s, "
            f"{item['total_tok_s']:.1f} total tok/s, {item['output_tok_s']:.1f} output tok/s")


# A busy loop that ends when its parent does (also when the parent is killed before it can stop it).
NEIGHBOUR = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(10**6): pass"


@contextlib.contextmanager
def busy_neighbour(processes: int):
    """`processes` other processes, each keeping a core busy with a pure-Python loop while the block runs: the CPU
    contention a benchmark puts every system under alike (issue 33: another process keeping both cores busy)."""
    procs = [subprocess.Popen([sys.executable, "-c", NEIGHBOUR]) for _ in range(processes)]
    if procs:
        log(f"neighbour: {processes} busy process(es) {[p.pid for p in procs]}")
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def fmt(x, spec=".2f") -> str:
    return "" if x is None else format(x, spec)


# ---------------------------------------------------------------------------------------------------------------
# requests, rows and agreement
# ---------------------------------------------------------------------------------------------------------------


def row(system: str, setting: str, dtype: str, reqs: list[Req], wall: float, outputs: list[list[int]],
        **extra) -> dict:
    prompt_tokens = sum(len(r.prompt) for r in reqs)
    output_tokens = sum(r.max_new_tokens for r in reqs)
    bad = [i for i, (r, o) in enumerate(zip(reqs, outputs)) if len(o) != r.max_new_tokens]
    r = {"system": system, "setting": setting, "dtype": dtype, "num_requests": len(reqs),
         "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "wall_s": wall,
         "total_tok_s": (prompt_tokens + output_tokens) / wall, "output_tok_s": output_tokens / wall,
         "wrong_output_lengths": len(bad), **extra}
    checkpoint("row", r)
    return r


# ---------------------------------------------------------------------------------------------------------------
# transformers generate
# ---------------------------------------------------------------------------------------------------------------


def hf_generate_rows(name: str, cfg, hf, tok, reqs: list[Req], warm: list[Req], outputs: dict) -> list[dict]:
    """A row per `cfg.hf_generate.batch_sizes`; bs=1 on the first `bs1_max_requests` requests only (said so)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    hf_generate(hf, warm, 1, pad)
    rows = []
    for bs in cfg.hf_generate.batch_sizes:
        subset = reqs[:min(cfg.hf_generate.bs1_max_requests, len(reqs))] if bs == 1 else reqs
        log(f"{name}: hf-generate bs={bs} on {len(subset)} requests (load {load_average()})")
        wall, outs = hf_generate(hf, subset, bs, pad)
        note = f"subset: first {len(subset)} of {len(reqs)} requests" if len(subset) < len(reqs) else ""
        rows.append(row("hf-generate", f"bs={bs}", cfg.dtype, subset, wall, outs, note=note))
        outputs[f"hf-generate bs={bs}"] = outs
    return rows


# ---------------------------------------------------------------------------------------------------------------
# fastgen: the library's offline pipeline over an engine whose step stats are kept
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# servers over HTTP, driven by run.py
# ---------------------------------------------------------------------------------------------------------------


def run_py(overrides: list[str], out: Path) -> dict:
    """`python run.py progress=false <overrides>` into `out` (its console in out.client.log); its metrics.json."""
    cmd = [sys.executable, str(ROOT / "run.py"), "progress=false", f"hydra.run.dir={out}", *overrides]
    log_path = out.parent / f"{out.name}.client.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as logf:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=logf,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log_path}")
    return json.loads((out / "metrics.json").read_text()) | {"command": " ".join(cmd[1:])}


def start_server(cmd: list[str], url: str, log_path: Path | None, timeout_s: float = 600, env: dict | None = None):
    """fastgen.peers.servers.start_server from the checkout, which the server imports (PYTHONPATH)."""
    return servers.start_server(cmd, url, log_path, timeout_s, env or {**os.environ, "PYTHONPATH": str(ROOT)}, ROOT)
