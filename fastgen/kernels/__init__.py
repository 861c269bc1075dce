"""The kernel seam: every model layer calls its kernels through a backend, never an implementation directly.

A backend is a module with the same functions (rms_norm, layer_norm, rotary, silu_and_mul, gelu_tanh_and_mul,
kv_write, attention, grouped_gemm) and a `prepare(metadata, block_size, windows)` hook that derives whatever
per-step state it needs from the backend-neutral `AttentionMetadata` once, before the layers run. Three backends
exist: `torch` (PyTorch: the reference, and the fallback on any device), `cpu` (the PyTorch backend with C++ ops
built on first use: decode attention that reads the KV blocks in place, and one-pass norm, rotary, KV write and
gated activation: fastgen.kernels.cpu_ops) and `triton` (the GPU path; under TRITON_INTERPRET=1 it runs on CPU
tensors, which is how CI tests it). The executor chooses one when the engine is built (`hardware.kernels`: auto
picks triton on CUDA, and on a CPU picks cpu where its C++ ops build, else torch) and hands it to the model
(`CausalLM.use_kernels`). How the linear layers' GEMMs run on a CPU (MKL, or oneDNN on weights reordered once) is
chosen beside it: fastgen.kernels.linear (`hardware.linear`, `CausalLM.use_linear`).
"""
from __future__ import annotations

from types import ModuleType

import torch

from fastgen.kernels import reference
from fastgen.kernels.metadata import AttentionMetadata

BACKENDS = ("auto", "torch", "cpu", "triton")


def resolve_backend(name: str, device: str | torch.device) -> str:
    """The backend `hardware.kernels=name` means on `device` (auto on a CPU builds the cpu kernel to find out)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose hardware.kernels from {', '.join(BACKENDS)}")
    on_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        if on_cuda:
            return "triton"
        from fastgen.kernels import cpu_ops
        return "cpu" if cpu_ops.available() else "torch"
    if name == "cpu" and on_cuda:
        raise ValueError("hardware.kernels=cpu runs on CPU tensors only; use triton, torch or auto on CUDA")
    return name


def load_backend(name: str, device: str | torch.device = "cpu") -> ModuleType:
    """The backend module for `hardware.kernels=name` on `device` (cpu and triton are imported only when chosen)."""
    backend = resolve_backend(name, device)
    if backend == "torch":
        return reference
    if backend == "cpu":
        from fastgen.kernels import cpu, cpu_ops
        if not cpu_ops.available():
            raise RuntimeError("hardware.kernels=cpu: the C++ kernels could not be built (see the warning "
                               "above); install a C++ compiler, or use hardware.kernels=torch or auto")
        return cpu
    from fastgen.kernels import triton_ops
    return triton_ops


__all__ = ["BACKENDS", "AttentionMetadata", "load_backend", "reference", "resolve_backend"]
