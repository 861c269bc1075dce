"""The CPU backend: the PyTorch backend, except that decode attention runs in a C++ kernel that reads each
sequence's KV blocks where they lie instead of gathering copies of them in every layer
(fastgen.kernels.cpu_attention). Prompt chunks, norms, rotary and the rest are the PyTorch backend's.
"""
from __future__ import annotations

import torch

from fastgen.kernels import reference
from fastgen.kernels.metadata import AttentionMetadata
from fastgen.kernels.reference import (gelu_tanh_and_mul, grouped_gemm, kv_write, layer_norm, rms_norm,  # noqa: F401
                                       rotary, silu_and_mul)


def prepare(meta: AttentionMetadata, block_size: int, windows) -> None:
    """Builds the step's plans (decodes read in place) for each attention window, before the layers run."""
    for window in windows:
        reference._plan(meta, block_size, window, paged=True)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
              scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    return reference.attention(q, k_cache, v_cache, meta, scale, window, softcap, paged=True)
