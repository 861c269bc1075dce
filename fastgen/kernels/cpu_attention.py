"""The C++ decode-attention kernel of the CPU backend (csrc/paged_decode_attention.cpp), built on first use.

Why a kernel: the PyTorch path copies every decode sequence's KV blocks into a gathered tensor in every layer
before SDPA reads it, and the decode profile of issue 20 measured those gathers and SDPA's padded math at 59% of a
32-sequence step. The kernel reads the blocks where they lie.

It is compiled with torch.utils.cpp_extension for the instruction set torch found on this CPU
(`torch.backends.cpu.get_cpu_capability()`, never a hard-coded feature), so a cached build made on another kind of
machine is not reused; the first build takes tens of seconds and is logged. Where it cannot be built (no C++
compiler), `available()` says so once and the CPU backend falls back to the PyTorch path.
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_decode_attention.cpp"

# Instruction-set flags for each capability torch reports (the same levels its own CPU kernels are built for).
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


@functools.cache
def _load() -> float | None:
    """Builds (or loads the cached build of) the kernel; returns the seconds it took, or None if it failed."""
    from torch.utils import cpp_extension
    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-fopenmp", *ISA_FLAGS.get(capability, [])]
    start = time.perf_counter()
    try:
        cpp_extension.load(f"fastgen_cpu_attention_{capability.lower()}", [str(SOURCE)], extra_cflags=flags,
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as e:      # no compiler, headers or OpenMP: the PyTorch path still works
        log.warning("CPU attention kernel unavailable (%s: %s); using the PyTorch path", type(e).__name__, e)
        return None
    seconds = time.perf_counter() - start
    log.info("CPU attention kernel (%s) ready in %.1f s", capability, seconds)
    return seconds


def available() -> bool:
    """Whether the kernel is built and loaded (building it on the first call)."""
    return _load() is not None


def build_seconds() -> float | None:
    """How long building or loading the kernel took in this process (None: unavailable)."""
    return _load()


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                           start: torch.Tensor, end: torch.Tensor, scale: float,
                           softcap: float | None = None) -> torch.Tensor:
    """Single-query attention over paged KV: q [B, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D];
    blocks [B, nb] int64, the blocks each sequence reads in order; it reads keys [start[b], end[b]) counted from
    the first slot of blocks[b, 0]. Returns [B, H, D]."""
    if not available():
        raise RuntimeError("the CPU attention kernel could not be built; see the warning logged above "
                           "(install a C++ compiler, or set hardware.kernels=torch)")
    return torch.ops.fastgen_cpu.paged_decode_attention(q.contiguous(), k_cache, v_cache, blocks, start, end,
                                                        scale, softcap or 0.0)
