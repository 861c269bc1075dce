"""A hardware roofline for one ragged step: what the machine allows, measured on it, against what the step does.

The ceilings are measured, not taken from a datasheet: the float32 GEMM rate of a large square matmul (and, for
reference, of the model's own linear shapes at a few token counts) and the bandwidth of a large streaming read.
A step's work follows from the model's spec (fastgen.model_spec) and each sequence's (new tokens, context after
the step):

- prefill work (prompt chunks): the linear layers' flops for their tokens, their attention flops and their LM-head
  rows, all at the GEMM rate;
- decode work (one new token each): max(every weight read once / bandwidth, their linear flops / GEMM rate) plus
  the KV history they read / bandwidth;
- a mixed step is held to the sum of the two (the weights are charged to the decode part only).

`efficiency = roofline time / measured time` is then how close a step came to the machine's limit. A run's steps
(recorded by `StepShapes`) are held to it per step kind by `roofline_summary`; the engine's limit probes by
`probe_rooflines`.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from fastgen.hugepages import huge_zeros
from fastgen.kernels.linear import onednn_linear, reorder
from fastgen.model_spec import ModelSpec
from fastgen.sim.work import DECODE, MIXED, PREFILL, BatchShape, StepWork, WorkModel  # noqa: F401 (kinds)

@dataclass(frozen=True)
class Ceilings:
    gemm_flops: float                     # flop/s: the best float32 GEMM rate seen (square or the model's shapes)
    bandwidth: float                      # bytes/s of a large streaming read
    linear_flops: dict = field(default_factory=dict)   # {tokens: flop/s} of the model's own linear layers
    meta: dict = field(default_factory=dict)            # how they were measured


def step_work(spec: ModelSpec, query_lens: Sequence[int], context_lens: Sequence[int],
              dtype_bytes: int = 4) -> StepWork:
    """The work of one step in which sequence i computes query_lens[i] new tokens and has context_lens[i] tokens
    of KV after it (its new ones included), as the simulator's cost model counts it (fastgen.sim.work). A layer with
    a sliding window reads and attends to at most that many keys."""
    if len(query_lens) != len(context_lens) or not len(query_lens):
        raise ValueError("a step needs one (new tokens, context) pair per sequence, and at least one sequence")
    return _work_model(spec, dtype_bytes).work(BatchShape.of(query_lens, context_lens))


@functools.lru_cache(maxsize=8)
def _work_model(spec: ModelSpec, dtype_bytes: int) -> WorkModel:
    return WorkModel(spec, dtype_bytes)


def roofline_s(work: StepWork, ceilings: Ceilings) -> float:
    """The least time the machine allows for the step (see the module docstring)."""
    t = work.prefill_flops / ceilings.gemm_flops
    if work.decode_seqs:
        t += max(work.weight_bytes / ceilings.bandwidth, work.decode_linear_flops / ceilings.gemm_flops) \
            + work.kv_bytes / ceilings.bandwidth
    return t


# -- measuring the ceilings ------------------------------------------------------------------------------------
def best_s(fn: Callable[[], object], repeats: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Fastest of `repeats` timed calls after one warm-up: a ceiling is what the machine can do, so on a shared
    machine the least disturbed run is the best estimate of it. `clock`: wall time, or time.thread_time for one
    thread's CPU time on a loaded machine (with torch.set_num_threads(1))."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def measure_gemm_flops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32,
                       clock: Callable[[], float] = time.perf_counter) -> float:
    """Flop/s of an n x n x n matmul: the better of torch's (MKL on a CPU) and, for float32 on a CPU, oneDNN's on
    a reordered matrix, which the linear layers may use (fastgen.kernels.linear) and which beat MKL's square rate
    on an AVX-512 EPYC (experiments/results/cpu_linear/)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = best_s(lambda: a @ b, repeats, clock)
    if dtype == torch.float32 and torch.backends.mkldnn.is_available():
        packed = reorder(b)
        best = min(best, best_s(lambda: onednn_linear(a, packed, None), repeats, clock))
    return 2 * n ** 3 / best


def measure_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5,
                      clock: Callable[[], float] = time.perf_counter) -> float:
    """Bytes/s of reading a buffer far larger than the caches: the best of a sum and a matrix-vector product (the
    way decode reads weights), on torch's memory and on huge pages (where the KV pools live: fastgen.hugepages)."""
    vector = torch.ones(4096, dtype=torch.float32)

    def rate(x: torch.Tensor) -> float:
        matrix = x.view(-1, 4096)
        return max(nbytes / best_s(x.sum, repeats, clock), nbytes / best_s(lambda: matrix @ vector, repeats, clock))
    return max(rate(torch.ones(nbytes // 4)), rate(huge_zeros((nbytes // 4,), torch.float32).fill_(1.0)))


def measure_linear_flops(spec: ModelSpec, tokens: Sequence[int], repeats: int = 3,
                         dtype: torch.dtype = torch.float32) -> dict[int, float]:
    """Flop/s of one decoder layer's linear layers (QKV, output, gate+up, down) at each token count, each weight a
    fresh tensor per layer as in the model (so weights come from memory, not cache, when they would in a step)."""
    mlp = [(2 * spec.intermediate, spec.hidden), (spec.hidden, spec.intermediate)] if spec.gated_mlp else \
        [(spec.intermediate, spec.hidden), (spec.hidden, spec.intermediate)]
    shapes = [(spec.q_size + 2 * spec.kv_size, spec.hidden), (spec.hidden, spec.q_size), *mlp]
    layers = [[torch.randn(o, i, dtype=dtype) * 0.02 for o, i in shapes] for _ in range(spec.num_layers)]
    out = {}
    for m in tokens:
        xs = {i: torch.randn(m, i, dtype=dtype) for _, i in shapes}

        def run():
            for weights in layers:
                for w in weights:
                    torch.nn.functional.linear(xs[w.shape[1]], w)
        out[int(m)] = 2 * m * spec.num_layers * spec.layer_params / best_s(run, repeats)
    return out


def measure_ceilings(spec: ModelSpec | None = None, tokens: Sequence[int] = (1, 8, 32, 64, 768),
                     gemm_n: int = 2048, bandwidth_bytes: int = 512 * 2**20, repeats: int = 5) -> Ceilings:
    square = measure_gemm_flops(gemm_n, repeats)
    bandwidth = measure_bandwidth(bandwidth_bytes, repeats)
    linear = measure_linear_flops(spec, tokens) if spec is not None else {}
    return Ceilings(max([square, *linear.values()]), bandwidth, linear,
                    {"square_gemm_flops": square, "gemm_n": gemm_n, "bandwidth_bytes": bandwidth_bytes,
                     "repeats": repeats, "threads": torch.get_num_threads()})


# -- holding a run's steps to the roofline --------------------------------------------------------------------
STEP_KINDS = (PREFILL, DECODE, MIXED, "decode >= 8 seqs")


class StepShapes:
    """An instrument around the engine's executor (fastgen.compose.build_engine's `instrument`): records each
    step's (new tokens, context after the step) per sequence from the plain step data, then runs the step."""

    def __init__(self):
        self.shapes: list[tuple[list[int], list[int]]] = []
        self.executor = None

    def __call__(self, executor):
        self.executor = executor
        return self

    def __getattr__(self, name):          # everything else is the executor's (spec, num_kv_blocks, clock, ...)
        if self.__dict__.get("executor") is None:
            raise AttributeError(name)
        return getattr(self.executor, name)

    def execute(self, chunks, copies=(), *swaps):
        q = [len(c.token_ids) for c in chunks]
        self.shapes.append((q, [c.start + n for c, n in zip(chunks, q)]))
        return self.executor.execute(chunks, copies, *swaps)


def kind_of(work: StepWork) -> list[str]:
    """The step's kind, and "decode >= 8 seqs" for a decode step that batches at least 8 sequences."""
    kinds = [work.kind]
    if work.kind == DECODE and work.decode_seqs >= 8:
        kinds.append("decode >= 8 seqs")
    return kinds


def roofline_summary(records: list[tuple[list[int], list[int], float]], step_s: list[float], spec: ModelSpec,
                     ceilings: Ceilings, dtype_bytes: int = 4) -> dict[str, dict]:
    """Per step kind: steps, roofline time, time in the forward and whole-step time, and their ratios."""
    out: dict[str, dict] = {}
    for (q, ctx, forward), wall in zip(records, step_s):
        work = step_work(spec, q, ctx, dtype_bytes)
        roof = roofline_s(work, ceilings)
        for kind in kind_of(work):
            s = out.setdefault(kind, {"steps": 0, "roofline_s": 0.0, "forward_s": 0.0, "step_s": 0.0, "seqs": 0})
            s["steps"] += 1
            s["roofline_s"] += roof
            s["forward_s"] += forward
            s["step_s"] += wall
            s["seqs"] += len(q)
    for s in out.values():
        s["efficiency_forward"] = s["roofline_s"] / s["forward_s"] if s["forward_s"] else None
        s["efficiency_step"] = s["roofline_s"] / s["step_s"] if s["step_s"] else None
        s["mean_seqs"] = s["seqs"] / s["steps"]
    return {k: out[k] for k in STEP_KINDS if k in out}


def probe_rooflines(limit: dict, spec: ModelSpec, ceilings: Ceilings) -> dict:
    """The engine's limit probes (fastgen.peers.offline.measure_limit) held to the roofline: the prompt pass at
    the GEMM rate, each decode step."""
    n = limit["token_budget"]
    prefill = step_work(spec, [n], [n])
    out = {"prefill": {"tokens": n, "measured_s": limit["prefill_pass_s"],
                       "roofline_s": roofline_s(prefill, ceilings),
                       "achieved_flops": prefill.prefill_flops / limit["prefill_pass_s"]}}
    out["prefill"]["efficiency"] = out["prefill"]["roofline_s"] / limit["prefill_pass_s"]
    out["loadavg"] = limit.get("loadavg")
    ctx = limit["decode_context"]
    out["decode"] = {}
    for b, t in limit["decode_step_s"].items():
        roof = roofline_s(step_work(spec, [1] * int(b), [ctx] * int(b)), ceilings)
        out["decode"][b] = {"measured_s": t, "roofline_s": roof, "efficiency": roof / t}
    return out


def best_ceilings(*measured: Ceilings) -> Ceilings:
    """The best of several measurements of the ceilings (at the start and the end of the run): on a shared
    machine a ceiling is what the machine was seen to do, never less."""
    linear = {t: max(c.linear_flops.get(t, 0.0) for c in measured) for t in measured[0].linear_flops}
    square = max(c.meta["square_gemm_flops"] for c in measured)
    return Ceilings(max(c.gemm_flops for c in measured), max(c.bandwidth for c in measured), linear,
                    {**measured[0].meta, "square_gemm_flops": square, "when": "best of start and end",
                     "measurements": [dict(c.meta, gemm_flops=c.gemm_flops, bandwidth=c.bandwidth) for c in measured]})


def _pct(x) -> str:
    return "" if x is None else f"{x:.1%}"


def summary_table(summary: dict[str, dict]) -> tuple[list[str], list[list]]:
    """roofline_summary as a table's header and rows (for fastgen.analysis.markdown_table)."""
    return (["step kind", "steps", "mean seqs", "roofline s", "forward s", "step s", "roofline / forward",
             "roofline / step"],
            [[k, v["steps"], f"{v['mean_seqs']:.1f}", f"{v['roofline_s']:.2f}", f"{v['forward_s']:.2f}",
              f"{v['step_s']:.2f}", _pct(v["efficiency_forward"]), _pct(v["efficiency_step"])]
             for k, v in summary.items()])


def probes_table(probes: dict) -> tuple[list[str], list[list]]:
    """probe_rooflines' decode steps as a table's header and rows, one row per batch size."""
    return (["decode batch", "measured ms", "roofline ms", "roofline / measured"],
            [[b, f"{d['measured_s'] * 1e3:.1f}", f"{d['roofline_s'] * 1e3:.1f}", _pct(d["efficiency"])]
             for b, d in probes["decode"].items()])
