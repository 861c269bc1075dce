"""Choosing and loading a kernel backend (`hardware.kernels`); what a backend is: fastgen.kernels."""
from __future__ import annotations

from types import ModuleType

import torch

import fastgen.kernels.reference as reference

BACKENDS = ("auto", "torch", "cpu", "triton")


def resolve_backend(name: str, device: str | torch.device) -> str:
    """The backend `hardware.kernels=name` means on `device` (auto on a CPU builds the cpu kernel to find out)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose hardware.kernels from {', '.join(BACKENDS)}")
    on_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        if on_cuda:
            return "triton"
        import fastgen.kernels.cpu_ops as cpu_ops
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
        import fastgen.kernels.cpu as cpu
        import fastgen.kernels.cpu_ops as cpu_ops
        if not cpu_ops.available():
            raise RuntimeError("hardware.kernels=cpu: the C++ kernels could not be built (see the warning "
                               "above); install a C++ compiler, or use hardware.kernels=torch or auto")
        return cpu
    import fastgen.kernels.triton_ops as triton_ops
    return triton_ops

