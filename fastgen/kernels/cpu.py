"""The CPU backend: the PyTorch backend with C++ ops where its PyTorch formulation is slow on a CPU
(fastgen.kernels.cpu_ops): decode attention reads each sequence's KV blocks where they lie instead of gathering
copies of them in every layer; the KV write, and for float32 the norm, rotary and SiLU-gated activation, are one
pass each. Prompt chunks' attention, other dtypes and everything else are the PyTorch backend's.
"""
from __future__ import annotations

import torch

import fastgen.kernels.cpu_ops as cpu_ops
import fastgen.kernels.reference as reference
from fastgen.kernels.metadata import AttentionMetadata
from fastgen.kernels.reference import gelu_tanh_and_mul, grouped_gemm, layer_norm  # noqa: F401


def _float32(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 for t in tensors)


def prepare(meta: AttentionMetadata, block_size: int, windows) -> None:
    """Builds the step's plans (decodes read in place) for each attention window, before the layers run."""
    for window in windows:
        reference._plan(meta, block_size, window, paged=True)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
              scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    return reference.attention(q, k_cache, v_cache, meta, scale, window, softcap, paged=True)


def kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    cpu_ops.kv_write(k, v, k_cache, v_cache, slot_mapping)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() == 2 and _float32(x, weight) and (residual is None or residual.dtype == torch.float32):
        return cpu_ops.add_rms_norm(x, residual, weight, eps)
    return reference.rms_norm(x, weight, eps, residual)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    if _float32(q, k, cos_sin):
        cpu_ops.rotary(q, k, positions, cos_sin)
    else:
        reference.rotary(q, k, positions, cos_sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return cpu_ops.silu_and_mul(x) if x.dim() == 2 and _float32(x) else reference.silu_and_mul(x)
