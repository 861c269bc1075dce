"""The kernel seam: every model calls these functions, never an implementation directly.

CUDA tensors go to the Triton kernels, CPU tensors to the PyTorch references. The backend can be forced with
the environment variable FASTGEN_KERNELS=torch|triton (or `set_backend`); with TRITON_INTERPRET=1 the Triton
kernels run on CPU tensors, which is how CI tests them.
"""
from __future__ import annotations

import os
from types import ModuleType

import torch

from fastgen.kernels import reference
from fastgen.kernels.metadata import AttentionMetadata

BACKENDS = ("auto", "torch", "triton")
_forced: str | None = None


def set_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    global _forced
    _forced = None if name == "auto" else name


def backend_for(x: torch.Tensor) -> str:
    name = _forced or os.environ.get("FASTGEN_KERNELS", "auto")
    if name not in BACKENDS:
        raise ValueError(f"FASTGEN_KERNELS={name!r} is not a kernel backend; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "triton" if x.is_cuda else "torch"
    return name


def _impl(x: torch.Tensor) -> ModuleType:
    if backend_for(x) == "torch":
        return reference
    from fastgen.kernels import triton_ops  # imported lazily: triton is only needed on this path
    return triton_ops


def rms_norm(x, weight, eps, residual=None):
    return _impl(x).rms_norm(x, weight, eps, residual)


def layer_norm(x, weight, bias, eps):
    return _impl(x).layer_norm(x, weight, bias, eps)


def rotary(q, k, positions, cos_sin):
    return _impl(q).rotary(q, k, positions, cos_sin)


def silu_and_mul(x):
    return _impl(x).silu_and_mul(x)


def kv_write(k, v, k_cache, v_cache, slot_mapping):
    return _impl(k).kv_write(k, v, k_cache, v_cache, slot_mapping)


def attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None = None):
    return _impl(q).attention(q, k_cache, v_cache, meta, scale, window)


__all__ = ["AttentionMetadata", "attention", "kv_write", "layer_norm", "rms_norm", "rotary", "set_backend",
           "silu_and_mul", "backend_for"]
