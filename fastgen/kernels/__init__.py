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
from fastgen.kernels import reference
from fastgen.kernels.backends import BACKENDS, load_backend, resolve_backend
from fastgen.kernels.metadata import AttentionMetadata

__all__ = ["BACKENDS", "AttentionMetadata", "load_backend", "reference", "resolve_backend"]
