"""How a linear layer's GEMM runs on a CPU: F.linear on the weight as loaded (MKL sgemm), or oneDNN on a copy of
the weight reordered once into oneDNN's blocked layout (`torch.ops.mkldnn`, what inductor's weight prepacking and
vLLM's CPU backend use).

Why: a decode step multiplies a few token rows by every weight matrix. At a few rows MKL's sgemm on the plain
weight reaches neither the CPU's GEMM rate nor its memory bandwidth; oneDNN on the reordered weight measured up to
2.1x faster per projection at 2-32 rows on an AVX2 EPYC and up to 2.6x at 2-768 rows on an AVX-512 EPYC, but
which of the two wins at one row, and up to which row count oneDNN does, differs between machines and shapes
(experiments/results/bench_vs_vllm/decode_phase2.md, experiments/results/cpu_linear/). So `auto` measures it on
the machine it runs on. The reordered copy costs as much memory as the linear weights (the plain weights stay: the
loader, tensor-parallel slicing and the embedding use them).

`hardware.linear`: plain (F.linear always), onednn (the reordered weight always), auto (on a float32 CPU model:
each weight shape's two GEMMs timed against each other when the model is set up, at CALIBRATION_ROWS row counts,
and the faster one used for each; a shape for which oneDNN wins at no row count keeps no reordered copy).
"""
from __future__ import annotations

import bisect
import logging
import os
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

LINEARS = ("auto", "plain", "onednn")

# The row counts at which `auto` times both GEMMs for each weight shape; a step of r rows follows the result at the
# largest of them <= r (64 decides for every count above it: a prompt chunk's GEMM is compute-bound, where the two
# measured within ~20% of each other on both machines of the measurements above).
CALIBRATION_ROWS = (1, 2, 4, 8, 16, 32, 64)


def resolve_linear(name: str, device: str | torch.device, dtype: torch.dtype) -> str:
    """What `hardware.linear=name` means for a model on `device` in `dtype`: plain, onednn, or auto where oneDNN
    can run (a float32 CPU model), else plain."""
    if name not in LINEARS:
        raise ValueError(f"unknown hardware.linear={name!r}; choose from {', '.join(LINEARS)}")
    cpu_fp32 = torch.device(device).type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
    if name == "onednn" and not cpu_fp32:
        raise ValueError(f"hardware.linear=onednn runs float32 models on a CPU with oneDNN (this model: {dtype} on "
                         f"{device}, oneDNN available: {torch.backends.mkldnn.is_available()}); use "
                         "hardware.linear=plain or auto")
    return "plain" if name == "auto" and not cpu_fp32 else name


def available_memory() -> int:
    """Bytes that can be allocated without swapping: /proc/meminfo's MemAvailable (free memory plus the page cache
    and reclaimable memory the kernel would give back), else free pages where there is no /proc/meminfo.
    (SC_AVPHYS_PAGES alone is MemFree: on a machine with a warm page cache it reads a fraction of what is there.)"""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def affordable(mode: str, nbytes: int) -> str:
    """`mode`, except that auto falls back to plain when the reordered copy (`nbytes`) would take more than half of
    the memory available now: the speed-up is not worth swapping or running out of memory for a large model."""
    if mode != "auto":
        return mode
    available = available_memory()
    if nbytes > available // 2:
        log.warning("hardware.linear=auto: the reordered weights (%.1f GB) would take over half of the %.1f GB "
                 "available; using F.linear on the plain weights", nbytes / 1e9, available / 1e9)
        return "plain"
    return mode


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def reorder(weight: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


@dataclass(frozen=True)
class Calibration:
    """For one weight shape: the best times of F.linear and of oneDNN on the reordered weight at each of `rows`
    row counts, measured on this machine, and so which of the two a step of r rows uses."""

    rows: tuple[int, ...]
    plain_s: tuple[float, ...]
    onednn_s: tuple[float, ...]

    @classmethod
    def measure(cls, weights: Sequence[torch.Tensor], packed: Sequence[torch.Tensor],
                rows: Sequence[int] = CALIBRATION_ROWS, samples: int = 3, budget_s: float = 0.005) -> "Calibration":
        """Times the two GEMMs in turn on the layers' own weights of one shape (`weights`, and their reordered
        copies `packed`), each call on another layer's weight, so that where a shape's layers exceed the caches
        the weights come from memory as in a step. Per row count: a warm-up pair, then the best of `samples` calls
        each, or of up to 4x as many while they take under `budget_s` (the least disturbed call on a shared
        machine). On one thread the calls are timed in the thread's CPU time, which other processes disturb far
        less than wall time; on several, in wall time (the other threads' work is not the caller's CPU time)."""
        clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
        plain_s, onednn_s = [], []
        layer = 0
        with torch.inference_mode():
            for m in rows:
                x = torch.randn(m, weights[0].shape[1], dtype=weights[0].dtype)
                best = [float("inf"), float("inf")]
                spent, n = 0.0, 0
                while n <= samples or (spent < budget_s and n <= 4 * samples):
                    w, p = weights[layer % len(weights)], packed[(layer + 1) % len(packed)]
                    layer += 1
                    times = [0.0, 0.0]
                    for i in (0, 1) if n % 2 else (1, 0):        # alternating which goes first
                        start = clock()
                        F.linear(x, w) if i == 0 else onednn_linear(x, p, None)
                        times[i] = clock() - start
                    if n:
                        best = [min(b, t) for b, t in zip(best, times)]
                        spent += sum(times)
                    n += 1
                plain_s.append(best[0])
                onednn_s.append(best[1])
        return cls(tuple(rows), tuple(plain_s), tuple(onednn_s))

    def onednn_rows(self) -> list[int]:
        return [m for m, p, o in zip(self.rows, self.plain_s, self.onednn_s) if o < p]

    def uses_onednn(self, rows: int) -> bool:
        i = max(bisect.bisect_right(self.rows, rows) - 1, 0)
        return self.onednn_s[i] < self.plain_s[i]

    def __str__(self) -> str:
        return ", ".join(f"{m}: {'oneDNN' if o < p else 'F.linear'} {p / o:.2f}x"
                         for m, p, o in zip(self.rows, self.plain_s, self.onednn_s))


@dataclass
class ReorderedWeight:
    """A linear layer's weight in oneDNN's layout, and under auto the calibration that says for which row counts it
    is used (None: for all)."""

    packed: torch.Tensor
    calibration: Calibration | None = None

    def applies(self, rows: int) -> bool:
        return self.calibration is None or self.calibration.uses_onednn(rows)


# Calibrations made in this process, by (weight shape, dtype, layers of that shape, threads): a model set up again
# (tests, a draft model beside its target) reuses them; the machine does not change under a process.
_CALIBRATED: dict[tuple, Calibration] = {}


def reorder_weights(weights: Sequence[torch.Tensor], mode: str) -> list[ReorderedWeight | None]:
    """Each weight's reordered copy for `mode` (a resolved `hardware.linear`): None under plain; under auto each
    weight shape is calibrated once per process, on its weights, and gets None where oneDNN was faster at no row
    count."""
    if mode == "plain":
        return [None] * len(weights)
    packed = [reorder(w) for w in weights]
    if mode == "onednn":
        return [ReorderedWeight(p) for p in packed]
    by_shape: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        by_shape.setdefault(tuple(w.shape), []).append(i)
    out: list[ReorderedWeight | None] = [None] * len(weights)
    start = time.perf_counter()
    for shape, idx in by_shape.items():
        key = (shape, weights[idx[0]].dtype, len(idx), torch.get_num_threads())
        if key not in _CALIBRATED:
            _CALIBRATED[key] = Calibration.measure([weights[i] for i in idx], [packed[i] for i in idx])
        calibration = _CALIBRATED[key]
        log.debug("hardware.linear=auto: %d->%d (%d layers), F.linear time / oneDNN time at each row count: %s",
                 shape[1], shape[0], len(idx), calibration)
        if calibration.onednn_rows():
            for i in idx:
                out[i] = ReorderedWeight(packed[i], calibration)
    log.info("hardware.linear=auto: %d weight shapes calibrated in %.2f s (the picks: log level DEBUG)", len(by_shape),
             time.perf_counter() - start)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           reordered: ReorderedWeight | None) -> torch.Tensor:
    """x @ weight.T + bias, through the reordered weight when there is one for this many rows."""
    if reordered is not None and reordered.applies(x.shape[0]):
        return onednn_linear(x, reordered.packed, bias)
    return F.linear(x, weight, bias)
