"""The CPU backend (hardware.kernels=cpu): decode attention in a C++ kernel that reads the KV blocks in place,
against the PyTorch backend's gather + SDPA path and against transformers' greedy tokens; and how auto falls back
to the PyTorch backend where the kernel cannot be built."""
from __future__ import annotations

import pytest
import torch

import fastgen.kernels as kernels
from fastgen.kernels import cpu, cpu_attention, reference
from fastgen.kv.cache import KVCache
from fastgen.models.layers import KernelUser
from fastgen.ragged import RaggedBatch, SeqChunk
from fastgen.sampling import SamplingParams
from tiny import compose_engine, drain, fastgen_from_hf, reference_greedy, tiny_hf_model

needs_kernel = pytest.mark.skipif(not cpu_attention.available(), reason="the C++ kernel could not be built here")
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def pools(num_blocks, block_size, kv_heads, head_dim, dtype, head_major):
    """One layer's K and V pools with random contents: KVCache's head-major memory, or plain token-major."""
    g = torch.Generator().manual_seed(0)
    shape = (kv_heads, num_blocks, block_size, head_dim) if head_major else (num_blocks, block_size, kv_heads, head_dim)
    k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    return (k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)) if head_major else (k, v)


@needs_kernel
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (24, 4, 4), (128, 8, 1)])
@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 3.0)])
@pytest.mark.parametrize("head_major", [True, False])
def test_in_place_decodes_equal_the_gathering_path(dtype, head_dim, heads, kv_heads, window, softcap, head_major):
    """Decodes over scattered blocks (one of them inside its first block, one ending on a block boundary, one
    longer than a window), beside prompt chunks that both paths run the same way: the outputs agree to float
    rounding, whatever the head size (24: not a multiple of a vector register), grouping (GQA, MQA), window,
    soft cap or pool layout."""
    bs = 4
    k, v = pools(32, bs, kv_heads, head_dim, dtype, head_major)
    chunks = [SeqChunk([1], 9, [5, 2, 17]), SeqChunk([1], 0, [8]), SeqChunk([1, 2, 3, 4, 5], 2, [10, 11]),
              SeqChunk([1], 7, [20, 3]), SeqChunk([1], 21, [30, 4, 6, 9, 12, 1])]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(sum(len(c.token_ids) for c in chunks), heads, head_dim, generator=g).to(dtype)
    got = cpu.attention(q, k, v, RaggedBatch.build(chunks, bs).attn, head_dim ** -0.5, window, softcap)
    want = reference.attention(q, k, v, RaggedBatch.build(chunks, bs).attn, head_dim ** -0.5, window, softcap)
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert err <= TOL[dtype], err


@needs_kernel
def test_kernel_rejects_bad_input_with_a_clear_error():
    k, v = pools(4, 4, 2, 64, torch.float32, True)
    blocks, start, end = torch.tensor([[0, 1]]), torch.tensor([0]), torch.tensor([5])
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpu_attention.paged_decode_attention(torch.randn(1, 4, 64).double(), k, v, blocks, start, end, 0.1)
    with pytest.raises(RuntimeError, match="at least one key"):
        cpu_attention.paged_decode_attention(torch.randn(1, 4, 64), k, v, blocks, start, start, 0.1)
    with pytest.raises(RuntimeError, match="heads must match"):
        cpu_attention.paged_decode_attention(torch.randn(1, 3, 64), k, v, blocks, start, end, 0.1)


@needs_kernel
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "qwen2_moe"])
def test_greedy_tokens_equal_transformers_through_the_cpu_backend(family):
    """Tiny models through the engine with hardware.kernels=cpu, prompt chunks and decodes mixed (splitfuse, a
    16-token budget), KV scattered over 4-slot blocks: Llama; Mistral (a window shorter than the sequences);
    Gemma-2 (soft-capped attention, alternating windows); Qwen2-MoE. The same greedy tokens as transformers."""
    hf = tiny_hf_model(family, seed=1)
    model = fastgen_from_hf(hf)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (5, 23, 2, 12)]
    eng = compose_engine(model, "splitfuse", num_blocks=64, block_size=4, kernels="cpu", token_budget=16).engine
    assert {m.ops for m in model.modules() if isinstance(m, KernelUser)} == {cpu}
    ids = [eng.add_request(p, SamplingParams(max_new_tokens=9, ignore_eos=True)) for p in prompts]
    finished = drain(eng)
    assert [finished[i].output_token_ids for i in ids] == [reference_greedy(hf, p, 9) for p in prompts]


def test_auto_falls_back_to_torch_where_the_kernel_cannot_be_built(monkeypatch):
    """auto means cpu on a CPU when the kernel builds, else torch; asking for cpu then is a clear error, and so is
    cpu on CUDA."""
    assert kernels.resolve_backend("auto", "cpu") == ("cpu" if cpu_attention.available() else "torch")
    monkeypatch.setattr(cpu_attention, "available", lambda: False)
    assert kernels.resolve_backend("auto", "cpu") == "torch"
    assert kernels.load_backend("auto", "cpu") is reference
    with pytest.raises(RuntimeError, match="hardware.kernels=torch"):
        kernels.load_backend("cpu", "cpu")
    with pytest.raises(ValueError, match="CPU tensors only"):
        kernels.resolve_backend("cpu", "cuda")
