"""The kernel seam: every model layer calls its kernels through a backend, never an implementation directly.

A backend is a module with the same functions (rms_norm, layer_norm, rotary, silu_and_mul, gelu_tanh_and_mul,
kv_write, attention, grouped_gemm) and a `prepare(metadata, block_size, windows)` hook that derives whatever
per-step state it needs from the backend-neutral `AttentionMetadata` once, before the layers run. Two backends
exist: `torch` (PyTorch, the CPU path and the reference) and `triton` (the GPU path; under TRITON_INTERPRET=1 it
runs on CPU tensors, which is how CI tests it). The executor chooses one when the engine is built
(`hardware.kernels`: auto picks triton on CUDA, torch elsewhere) and hands it to the model
(`CausalLM.use_kernels`). How the linear layers' GEMMs run on a CPU (MKL, or oneDNN on weights reordered once) is
chosen beside it: fastgen.kernels.linear (`hardware.linear`, `CausalLM.use_linear`).
"""
from __future__ import annotations

from types import ModuleType

import torch

from fastgen.kernels import reference
from fastgen.kernels.metadata import AttentionMetadata

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(name: str, device: str | torch.device) -> str:
    """The backend `hardware.kernels=name` means on `device`."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose hardware.kernels from {', '.join(BACKENDS)}")
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    return name


def load_backend(name: str, device: str | torch.device = "cpu") -> ModuleType:
    """The backend module for `hardware.kernels=name` on `device` (triton is imported only when chosen)."""
    if resolve_backend(name, device) == "torch":
        return reference
    from fastgen.kernels import triton_ops
    return triton_ops


__all__ = ["BACKENDS", "AttentionMetadata", "load_backend", "reference", "resolve_backend"]
