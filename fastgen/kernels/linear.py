"""How a linear layer's GEMM runs on a CPU: F.linear on the weight as loaded (MKL sgemm), or oneDNN on a copy of
the weight reordered once into oneDNN's blocked layout (`torch.ops.mkldnn`, what inductor's weight prepacking and
vLLM's CPU backend use).

Why: a decode step multiplies a few token rows by every weight matrix. At a few rows MKL's sgemm on the plain
weight reaches neither the CPU's GEMM rate nor its memory bandwidth; oneDNN on the reordered weight measured up to
2.1x faster per projection at 2-32 rows and 1.1-2.1x for the LM head at 2-512 rows on an AVX2 EPYC, and no faster
at one row or at a prompt's hundreds of rows, where MKL stays (experiments/results/bench_vs_vllm/decode_phase2.md). The reordered copy costs as much memory as the linear weights (the
plain weights stay: the loader, tensor-parallel slicing and the embedding use them).

`hardware.linear`: plain (F.linear always), onednn (the reordered weight always), auto (the reordered weight for
the row counts where it measured faster, on a float32 CPU model; F.linear otherwise).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

LINEARS = ("auto", "plain", "onednn")

# The row counts for which `auto` uses oneDNN's reordered weight: where it measured faster than MKL on the plain
# weight (one thread, SmolLM2-135M's shapes; decode_phase2.md): 2-32 rows for the layers' projections (at 1 row and
# at 64+ rows MKL is as fast or faster), and 2 rows up for the LM head's 49152-wide vocabulary projection (1.1-2.1x
# at 2-512 rows). A layer names its range (`Reorderable.auto_rows`).
PROJECTION_ROWS: tuple[int, int | None] = (2, 32)
VOCABULARY_ROWS: tuple[int, int | None] = (2, None)


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


@dataclass
class ReorderedWeight:
    """A linear layer's weight in oneDNN's layout, and the row counts it is used for."""

    packed: torch.Tensor
    min_rows: int
    max_rows: int | None                 # None: any number of rows

    @classmethod
    def of(cls, weight: torch.Tensor, mode: str, auto_rows: tuple[int, int | None]) -> "ReorderedWeight | None":
        """The reordered weight for `mode` (a resolved `hardware.linear`), None for plain; under auto it is used
        only for `auto_rows` (min, max or None) rows, where it measured faster."""
        if mode == "plain":
            return None
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        return cls(packed, 1, None) if mode == "onednn" else cls(packed, *auto_rows)

    def applies(self, rows: int) -> bool:
        return self.min_rows <= rows and (self.max_rows is None or rows <= self.max_rows)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           reordered: ReorderedWeight | None) -> torch.Tensor:
    """x @ weight.T + bias, through the reordered weight when there is one for this many rows."""
    if reordered is not None and reordered.applies(x.shape[0]):
        return torch.ops.mkldnn._linear_pointwise(x, reordered.packed, bias, "none", [], "")
    return F.linear(x, weight, bias)
