"""The CPU backend (hardware.kernels=cpu): its C++ ops (decode and prompt-chunk attention reading the KV blocks in
place, one-pass norm, rotary, KV write, gated activation) against the PyTorch backend and against transformers'
greedy tokens; and how auto falls back to the PyTorch backend where they cannot be built."""
from __future__ import annotations

import pytest
import torch

import fastgen.kernels as kernels
from fastgen.kernels import cpu, cpu_ops, reference
from fastgen.kv.cache import KVCache
from fastgen.models.layers import KernelUser
from fastgen.ragged import RaggedBatch, SeqChunk
from fastgen.sampling import SamplingParams
from tiny import compose_engine, drain, fastgen_from_hf, reference_greedy, tiny_hf_model

needs_kernel = pytest.mark.skipif(not cpu_ops.available(), reason="the C++ kernel could not be built here")
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
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (24, 4, 4), (128, 8, 1), (32, 6, 2)])
@pytest.mark.parametrize("window,softcap", [(None, None), (37, None), (None, 3.0)])
def test_in_place_prompt_chunks_equal_the_gathering_path(head_dim, heads, kv_heads, window, softcap):
    """Float32 prompt chunks read in place, flash-style: a first chunk (no prefix) longer than a query tile, chunks
    over cached prefixes that start and end mid-block, blocks scattered at random, beside a decode. The outputs of
    the PyTorch backend's gather + SDPA to float rounding, whatever the grouping (GQA, MQA, none), head size (24: not
    a multiple of a vector register), window or soft cap."""
    bs = 16
    k, v = pools(64, bs, kv_heads, head_dim, torch.float32, True)
    g = torch.Generator().manual_seed(4)
    perm = torch.randperm(64, generator=g).tolist()
    chunks = [SeqChunk(list(range(70)), 0, perm[0:5]), SeqChunk(list(range(45)), 83, perm[5:13]),
              SeqChunk([1], 30, perm[13:15]), SeqChunk([1, 2, 3], 160, perm[15:26])]
    q = torch.randn(sum(len(c.token_ids) for c in chunks), heads, head_dim, generator=g)
    got = cpu.attention(q, k, v, RaggedBatch.build(chunks, bs).attn, head_dim ** -0.5, window, softcap)
    want = reference.attention(q, k, v, RaggedBatch.build(chunks, bs).attn, head_dim ** -0.5, window, softcap)
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert err <= TOL[torch.float32], err


@needs_kernel
def test_pointwise_ops_equal_the_pytorch_backend():
    """The one-pass ops on the layouts the model hands them: a norm with and without a residual; rotary on q and k
    that are strided views of a fused QKV output, partly rotated (Phi-3's partial rotary); the KV write into
    head-major pools at scattered slots; the SiLU-gated activation. bfloat16 goes to the PyTorch backend."""
    g = torch.Generator().manual_seed(3)
    x, res, w = torch.randn(7, 96, generator=g), torch.randn(7, 96, generator=g), torch.randn(96, generator=g)
    for residual in (None, res):
        got, want = cpu.rms_norm(x, w, 1e-6, residual), reference.rms_norm(x, w, 1e-6, residual)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for dtype in (torch.float32, torch.bfloat16):
        qkv = torch.randn(5, 4 * 16 + 2 * 2 * 16, generator=g).to(dtype)
        q, k = qkv[:, :64].view(5, 4, 16)[..., :8], qkv[:, 64:96].view(5, 2, 16)[..., :8]
        def untouched():    # v, and the dims of q and k past the rotary's 8
            return qkv[:, 96:], qkv[:, :64].view(5, 4, 16)[..., 8:], qkv[:, 64:96].view(5, 2, 16)[..., 8:]
        q2, k2, before = q.clone(), k.clone(), [t.clone() for t in untouched()]
        positions, table = torch.tensor([0, 3, 9, 1, 2]), torch.randn(12, 8, generator=g).to(dtype)
        cpu.rotary(q, k, positions, table), reference.rotary(q2, k2, positions, table)
        torch.testing.assert_close((q, k), (q2, k2), rtol=1e-5, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(untouched(), before))
    cache = KVCache(fastgen_from_hf(tiny_hf_model("llama")).spec, num_blocks=6, block_size=4, dtype=torch.float32)
    kc, vc = cache.layer(1)
    k, v = torch.randn(3, *kc.shape[2:], generator=g), torch.randn(3, *kc.shape[2:], generator=g)
    slots = torch.tensor([22, 1, 9])
    cpu.kv_write(k, v, kc, vc, slots)
    flat_k, flat_v = kc.reshape(-1, *kc.shape[2:]), vc.reshape(-1, *vc.shape[2:])
    assert torch.equal(flat_k[slots], k) and torch.equal(flat_v[slots], v)
    assert int((cache.k != 0).sum()) == k.numel()
    with pytest.raises(RuntimeError, match="outside the pool"):
        cpu.kv_write(k, v, kc, vc, torch.tensor([22, 1, 24]))
    gate_up = torch.randn(6, 2 * 40, generator=g) * 8
    torch.testing.assert_close(cpu.silu_and_mul(gate_up), reference.silu_and_mul(gate_up), rtol=1e-6, atol=1e-6)


@needs_kernel
def test_kernel_rejects_bad_input_with_a_clear_error():
    k, v = pools(4, 4, 2, 64, torch.float32, True)
    blocks, start, end = torch.tensor([[0, 1]]), torch.tensor([0]), torch.tensor([5])
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpu_ops.paged_decode_attention(torch.randn(1, 4, 64).double(), k, v, blocks, start, end, 0.1)
    with pytest.raises(RuntimeError, match="at least one key"):
        cpu_ops.paged_decode_attention(torch.randn(1, 4, 64), k, v, blocks, start, start, 0.1)
    with pytest.raises(RuntimeError, match="heads must match"):
        cpu_ops.paged_decode_attention(torch.randn(1, 3, 64), k, v, blocks, start, end, 0.1)
    with pytest.raises(RuntimeError, match="own keys"):
        cpu_ops.paged_chunk_attention(torch.randn(3, 4, 64), k, v, blocks[0], 0, 2, 0.1)
    with pytest.raises(RuntimeError, match="lie in its blocks"):
        cpu_ops.paged_chunk_attention(torch.randn(3, 4, 64), k, v, blocks[0], 0, 9, 0.1)


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
    assert kernels.resolve_backend("auto", "cpu") == ("cpu" if cpu_ops.available() else "torch")
    monkeypatch.setattr(cpu_ops, "available", lambda: False)
    assert kernels.resolve_backend("auto", "cpu") == "torch"
    assert kernels.load_backend("auto", "cpu") is reference
    with pytest.raises(RuntimeError, match="hardware.kernels=torch"):
        kernels.load_backend("cpu", "cpu")
    with pytest.raises(ValueError, match="CPU tensors only"):
        kernels.resolve_backend("cpu", "cuda")
