"""The C++ ops of the CPU backend (fastgen/kernels/csrc), built on first use.

Why: the PyTorch path copies every decode sequence's KV blocks into a gathered tensor in every layer before SDPA
reads it (the decode profile of issue 20 measured those gathers and SDPA's padded math at 59% of a 32-sequence
step), and spends several PyTorch ops per norm, rotary, KV write and gated activation, whose fixed costs exceed
their arithmetic at a decode step's few rows. `paged_decode_attention` reads the blocks where they lie, and
`paged_chunk_attention` a prompt chunk's cached prefix and own keys too (flash-style, float32); the per-token
ops (`add_rms_norm`, `rotary`, `kv_write`, `silu_and_mul`) are one pass each.

They are compiled with torch.utils.cpp_extension for the instruction set torch found on this CPU
(`torch.backends.cpu.get_cpu_capability()`, never a hard-coded feature); the build's name carries the capability
and a hash of the sources, so a cached build made on another kind of machine, or from other sources, is not reused.
The first build takes tens of seconds and is logged. Where it cannot be built (no C++ compiler), `available()` says
so once and the CPU backend falls back to the PyTorch path.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("paged_decode_attention.cpp", "paged_chunk_attention.cpp", "pointwise.cpp")

# Instruction-set flags for each capability torch reports (the same levels its own CPU kernels are built for).
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


@functools.cache
def available() -> bool:
    """Whether the ops are built and loaded: builds them, or loads the cached build, on the first call."""
    from torch.utils import cpp_extension
    capability = torch.backends.cpu.get_cpu_capability()
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(CSRC.iterdir()))).hexdigest()[:10]
    start = time.perf_counter()
    try:
        cpp_extension.load(f"fastgen_cpu_{capability.lower()}_{digest}", [str(CSRC / s) for s in SOURCES],
                           extra_cflags=["-O3", "-fopenmp", *ISA_FLAGS.get(capability, [])],
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as e:      # no compiler, headers or OpenMP: the PyTorch path still works
        log.warning("CPU kernels unavailable (%s: %s); using the PyTorch path", type(e).__name__, e)
        return False
    log.info("CPU kernels (%s) ready in %.1f s", capability, time.perf_counter() - start)
    return True


def _ops():
    if not available():
        raise RuntimeError("the CPU kernels could not be built; see the warning logged above "
                           "(install a C++ compiler, or set hardware.kernels=torch)")
    return torch.ops.fastgen_cpu


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                           start: torch.Tensor, end: torch.Tensor, scale: float,
                           softcap: float | None = None) -> torch.Tensor:
    """Single-query attention over paged KV: q [B, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D];
    blocks [B, nb] int64, the blocks each sequence reads in order; it reads keys [start[b], end[b]) counted from
    the first slot of blocks[b, 0]. Returns [B, H, D]."""
    return _ops().paged_decode_attention(q.contiguous(), k_cache, v_cache, blocks, start, end, scale, softcap or 0.0)


def paged_chunk_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                          start: int, end: int, scale: float, window: int | None = None,
                          softcap: float | None = None) -> torch.Tensor:
    """One prompt chunk's causal attention over its cached prefix and itself, float32, flash-style: q [n, H, D];
    blocks [nb] int64, the chunk's blocks in order; it reads keys [start, end) counted from the first slot of
    blocks[0], query j sitting at key end - n + j. Returns [n, H, D]."""
    return _ops().paged_chunk_attention(q.contiguous(), k_cache, v_cache, blocks, start, end, scale, window or 0,
                                        softcap or 0.0)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual), float32 rows."""
    return _ops().add_rms_norm(x, residual, weight, eps)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotates float32 q and k in place (rotate-half layout)."""
    _ops().rotary(q, k, positions, cos_sin)


def kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    _ops().kv_write(k, v, k_cache, v_cache, slot_mapping)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] float32 holding gate then up: silu(gate) * up."""
    return _ops().silu_and_mul(x)
