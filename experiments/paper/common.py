"""What the paper-figure scripts share: the paper's deployments, workloads and reported numbers, one benchmark
point through run.py's own config and benchmark, curve interpolation, and the output files.

Every script runs in simulation (executor=simulated) unless `--executor real` or, with `auto` (the default),
a CUDA device is present and `--model-dir` names a local checkpoint of the deployment's model; fastgen has no
tensor parallelism, so real runs cover the single-GPU deployments only. Simulated points run in parallel over
`--jobs` processes (default: one per CPU).

The schedulers compared: FastGen's Dynamic SplitFuse (`splitfuse`, token budget 768, KV block 64, as the paper ran
it), the paper's baseline vLLM 0.2 (`vllm-0.2` with vLLM's defaults and its 16-token KV block), and fastgen's own
prefill-first `continuous`, which asks what splitting and fusing gain on the same engine.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import functools
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))          # run from a checkout without installing fastgen

from fastgen.analysis import (axis_label, describe, draw_curve, error_bar_note, interpolate,  # noqa: E402,F401
                              markdown_table, spread, subplots)
from fastgen.conf import compose_config  # noqa: E402
from fastgen.result_cache import run_cached  # noqa: E402
from fastgen.sim.shapes import model_spec  # noqa: E402
from fastgen.workloads import LengthSpec  # noqa: E402

SCHEDULERS = ("splitfuse", "vllm-0.2", "continuous")
LABELS = {"splitfuse": "splitfuse (FastGen)", "vllm-0.2": "vllm-0.2 (the paper's baseline)",
          "continuous": "continuous (prefill-first, same engine)"}
# Each scheduler as its system ran it: vLLM's KV block is 16 tokens (fastgen's default is FastGen's 64).
SCHEDULER_OVERRIDES = {"vllm-0.2": ("kv.block_size=16",)}
CLIENTS = (1, 2, 4, 6, 8, 12, 16, 20, 24, 28, 32)
WORKLOADS = {"1200/128": (1200, 128), "1200/60": (1200, 60), "2600/128": (2600, 128), "2600/60": (2600, 60)}
QUICK_CLIENTS, QUICK_REQUESTS = (2, 8), 12


@dataclass(frozen=True)
class Deployment:
    name: str
    model: str
    hardware: str
    tensor_parallel: int = 1

    @property
    def overrides(self) -> list[str]:
        return [f"model.source={self.model}", f"hardware={self.hardware}",
                f"hardware.tensor_parallel={self.tensor_parallel}"]


LLAMA_70B_4XA100 = Deployment("Llama-2 70B, 4xA100-80GB", "llama-2-70b", "a100-80gb", 4)
LLAMA_13B_A100 = Deployment("Llama-2 13B, A100-80GB", "llama-2-13b", "a100-80gb", 1)


RESULTS = ROOT / "experiments" / "paper" / "results"      # the committed full-size results
SCRATCH = ROOT / "outputs" / "paper-quick"                 # --quick's (git-ignored): never over RESULTS
CACHE = ROOT / "outputs" / "paper-cache"                   # simulated points' metrics, shared by the scripts


class Parser(argparse.ArgumentParser):
    """The scripts' arguments; --out defaults to RESULTS/<name>, or SCRATCH/<name> with --quick."""

    def __init__(self, doc: str, default_out: str):
        super().__init__(description=doc.splitlines()[0])
        self.default_out = default_out

    def parse_args(self, *args, **kwargs):
        parsed = super().parse_args(*args, **kwargs)
        if parsed.out is None:
            parsed.out = (SCRATCH if parsed.quick else RESULTS) / self.default_out
        if parsed.cache is None:
            parsed.cache = False if parsed.quick else CACHE
        return parsed


def parser(doc: str, default_out: str) -> argparse.ArgumentParser:
    p = Parser(doc, default_out)
    p.add_argument("--quick", action="store_true", help=f"reduced size (CI): few clients, few requests; writes to "
                                                        f"{SCRATCH.relative_to(ROOT)}/ unless --out")
    p.add_argument("--out", type=Path, help=f"default {RESULTS.relative_to(ROOT)}/{default_out}")
    p.add_argument("--executor", choices=("auto", "simulated", "real"), default="auto")
    p.add_argument("--model-dir", help="real runs: a local checkpoint of the deployment's model")
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--requests-per-client", type=int, default=64,
                   help="closed loop: at most this many requests per client (0: no cap); a single client's 512 "
                        "sequential requests cost 8x the steps of 64 and tell no more about its mean")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                   help="simulated points run in this many processes at once")
    p.add_argument("--repeats", type=int, default=1, help="runs per point (workload seeds +0..N-1): error bars")
    p.add_argument("--cache", type=Path, default=None,
                   help=f"reuse a simulated point's metrics when its whole config and fastgen's source are unchanged "
                        f"(the scripts share many points); default {CACHE.relative_to(ROOT)} at full size, none with "
                        f"--quick; --no-cache: none")
    p.add_argument("--no-cache", dest="cache", action="store_const", const=False)
    return p


def executor(args, deployment: Deployment) -> list[str]:
    """Overrides that pick the executor: simulated, or the real model on this machine's GPU."""
    real = args.executor == "real"
    if args.executor == "auto":
        import torch
        real = torch.cuda.is_available() and args.model_dir is not None and deployment.tensor_parallel == 1
    if not real:
        return ["executor=simulated"]
    if args.model_dir is None or deployment.tensor_parallel > 1:
        raise SystemExit("--executor real needs --model-dir and a single-GPU deployment (fastgen has no TP)")
    return ["executor=real", "model=local", f"model.source={args.model_dir}"]


def set_workload(cfg, prompt: int, gen: int, clients: int, num_requests: int, max_positions: int) -> None:
    """The paper's closed-loop workload: lengths ~ Normal(mean, 30%), clipped so prompt + output fit the model."""
    w = cfg.workload
    w.num_requests, w.clients, w.arrival = num_requests, clients, "closed_loop"
    w.prompt = LengthSpec(mean=prompt, std_frac=0.3, max=max_positions - 2 * gen)
    w.output = LengthSpec(mean=gen, std_frac=0.3, max=2 * gen)


@functools.lru_cache(maxsize=None)
def base_config(overrides: tuple[str, ...]):
    return compose_config(overrides)     # Hydra composition is the slow part of a simulated point: once per line


@dataclass(frozen=True)
class Point:
    """One benchmark run: a deployment, a scheduler as its system ran it, the workload's lengths and clients, and
    any further overrides (an ablation's knob, replicas and a router)."""

    deployment: Deployment
    scheduler: str
    prompt: int
    gen: int
    clients: int
    extra: tuple[str, ...] = ()
    num_requests: int | None = None      # None: --num-requests (or the quick size)

    @property
    def name(self) -> str:
        def short(override: str) -> str:      # a path value (a profile file) by its stem
            key, _, value = override.partition("=")
            return key + (Path(value).stem if "/" in value else value)
        tail = "".join(f"-{short(o)}" for o in self.extra)
        return (f"{self.deployment.model}-tp{self.deployment.tensor_parallel}-{self.scheduler}-p{self.prompt}"
                f"-g{self.gen}-c{self.clients}{tail}")


def run_point(args, point: Point) -> dict:
    """One benchmark run (run.py's run_benchmark, its files under --out/runs/, its metrics kept in --cache)."""
    return run_cached(point_config(args, point), args.out / "runs" / point.name, args.cache)


def point_config(args, point: Point):
    """The point's run config: run.py's composition with the point's overrides and the paper's workload."""
    dep = point.deployment
    keys = {o.split("=")[0] for o in point.extra}       # an extra override replaces the scheduler's own
    own = [o for o in SCHEDULER_OVERRIDES.get(point.scheduler, ()) if o.split("=")[0] not in keys]
    cfg = copy.deepcopy(base_config((*dep.overrides, f"scheduler={point.scheduler}", "progress=false", *own,
                                     *point.extra, *executor(args, dep))))
    requests = point.num_requests or (QUICK_REQUESTS if args.quick else args.num_requests)
    if args.requests_per_client:
        requests = min(requests, args.requests_per_client * point.clients)
    set_workload(cfg, point.prompt, point.gen, point.clients, requests, model_spec(dep.model).max_positions)
    cfg.repeats = args.repeats
    return cfg


def _init_worker() -> None:
    import torch
    torch.set_num_threads(1)             # one core per worker: the simulator's few tensors need no more


def run_points(args, points: list[Point]) -> list[dict]:
    """Every point's metrics, in order; simulated points run in --jobs processes at once."""
    def report(point: Point, metrics: dict) -> dict:
        print(f"  {point.name}: {metrics['request_throughput']:.3f} req/s, e2e mean {metrics['e2e_s_mean']:.2f} s",
              flush=True)
        return metrics

    if args.jobs <= 1 or args.executor == "real" or len(points) == 1:
        return [report(p, run_point(args, p)) for p in points]
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker) as pool:
        futures = {pool.submit(run_point, args, p): i for i, p in enumerate(points)}
        results: list[dict | None] = [None] * len(points)
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            results[i] = report(points[i], future.result())
    return results


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def ratio(a, b, spec: str = ".2f") -> str:
    """a / b as "1.23x", "-" when either is missing."""
    return "-" if a is None or not b else format(a / b, spec) + "x"


def markdown(header: list[str], rows: list[list], notes: list[str] = ()) -> str:
    return markdown_table(header, rows) + "\n".join([""] + [f"{n}  " for n in notes]) + "\n"


def save(args, stem: str, table: str, figures: dict) -> None:
    """--out/<stem>.md (also printed) and one PNG per figure, --out/<name>.png."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(table)
    for name, figure in figures.items():
        figure.tight_layout()
        figure.savefig(args.out / f"{name}.png", dpi=120)
    print(table)
    print("wrote", args.out / f"{stem}.md", *(args.out / f"{name}.png" for name in figures))


def title(deployment: Deployment, runs: list[dict], *lines: str) -> str:
    """A figure's title: the deployment and the executor that produced its numbers, then `lines` (the workload,
    the SLA, ...), and the error bars' meaning where points were repeated."""
    executors = sorted({describe(m["config"])["executor"] for m in runs})
    note = error_bar_note(runs)
    return "\n".join([deployment.name, " / ".join(executors), *lines, *([note] if note else [])])


def curve(ax, runs: list[dict], x: str, y: str, label: str) -> None:
    """One scheduler's curve (fastgen.analysis.draw_curve): points ordered by x, labelled with their client count
    unless x is the client count, error bars where repeated; axes with names and units."""
    draw_curve(ax, runs, x, y, label, annotate=x != "clients")
    ax.set(xlabel=axis_label(x), ylabel=axis_label(y))


def mode_note(args, runs: list[dict]) -> str:
    """Which executor produced the numbers and at what size, for the table's footnote."""
    executors = sorted({m["config"]["executor"]["name"] for m in runs})
    size = f"reduced size (--quick, {QUICK_REQUESTS} requests)" if args.quick else f"{args.num_requests} requests"
    if args.requests_per_client:
        size += f" (at most {args.requests_per_client} per client)"
    return (f"fastgen: {'/'.join(executors)} executor, {size}; lengths ~ Normal(mean, 30%), prompts clipped so "
            "prompt + output fit the model's positions. Paper: DeepSpeed-FastGen vs vLLM as reported.")
