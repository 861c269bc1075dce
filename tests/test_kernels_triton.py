"""The Triton kernels against the PyTorch references, on random shapes drawn per run.

On CPU the kernels run under Triton's interpreter. Triton chooses interpreter or compiler when a function is
decorated with @triton.jit, its own library (tl.sum, tl.max, ...) included at `import triton`, so TRITON_INTERPRET
must be set before triton is first imported in the process. This module sets it when triton is not imported yet
and there is no GPU (on a CPU-only machine nothing could use compiled kernels anyway). When it comes too late
(another test module imported triton first) or a GPU is present (its compiled kernels must stay compiled),
test_interpreter_in_subprocess reruns these tests in a fresh interpreter-mode pytest process instead.

Reproduce a failure with the seed its message prints: FASTGEN_TEST_SEED=<seed> pytest tests/test_kernels_triton.py.
`experiments/bench_kernels.py --check` runs the same checks (CHECKS) on a GPU.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import fastgen.kernels as kernels  # noqa: E402
from fastgen.kernels import reference, triton_ops  # noqa: E402
from fastgen.kernels.metadata import AttentionMetadata  # noqa: E402

SEED = int(os.environ.get("FASTGEN_TEST_SEED") or random.randrange(2**32))
INTERPRETED = isinstance(tl.sum, InterpretedFunction) and triton_ops._INTERPRETED
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOL)
HEAD_DIMS = (64, 80, 96, 128)
BLOCK_SIZES = (16, 32, 64)

needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="triton was imported before TRITON_INTERPRET=1: test_interpreter_in_subprocess runs these")
needs_compiled_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                                         reason="needs a CUDA device and compiled (not interpreted) kernels")
DEVICES = [pytest.param("cpu", marks=needs_interpreter),
           pytest.param("cuda", marks=[pytest.mark.gpu, needs_compiled_cuda])]


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out - ref‖ / ‖ref‖ over the elements that are not NaN in ref; inf where the NaN patterns differ, so a
    kernel that leaves a NaN-poisoned element unwritten (or writes where it must not) fails."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape or not torch.equal(out.isnan(), ref.isnan()):
        return math.inf
    keep = ~ref.isnan()
    return ((out[keep] - ref[keep]).norm() / ref[keep].norm().clamp_min(1e-30)).item()


@contextlib.contextmanager
def nan_allocations():
    """Makes torch.empty/empty_like NaN-fill floating tensors, so output elements a kernel never writes show up."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    with mock.patch.object(torch, "empty", lambda *a, **k: poison(empty(*a, **k))), \
            mock.patch.object(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k))):
        yield


def randn(gen: torch.Generator, shape, dtype, device) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)


def torch_gen(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.getrandbits(63))


def strided_rows(gen, rows, cols, dtype, device):
    """A [rows, cols] view of a wider buffer: kernels must honour the row stride."""
    return randn(gen, (rows, cols + 8), dtype, device)[:, 3:cols + 3]


# ---------------------------------------------------------------------------------------------------------------
# Checks: each draws its shapes from rng, runs kernel and reference, and returns the relative error.
# ---------------------------------------------------------------------------------------------------------------

def check_rms_norm(device, dtype, rng, size=1):
    gen = torch_gen(rng)
    rows, hidden = rng.randint(1, 9 * size), rng.choice([64, 200, 1024 * size])
    x = strided_rows(gen, rows, hidden, dtype, device)
    weight = 1 + 0.1 * randn(gen, (hidden,), dtype, device)
    err = 0.0
    for residual in (None, strided_rows(gen, rows, hidden, dtype, device)):
        with nan_allocations():
            out, res = triton_ops.rms_norm(x, weight, 1e-6, residual)
        ref_out, ref_res = reference.rms_norm(x, weight, 1e-6, residual)
        err = max(err, rel_err(out, ref_out), rel_err(res, ref_res))
    return err


def check_layer_norm(device, dtype, rng, size=1):
    gen = torch_gen(rng)
    rows, hidden = rng.randint(1, 9 * size), rng.choice([64, 200, 1024 * size])
    x = 3 + strided_rows(gen, rows, hidden, dtype, device)
    weight, bias = randn(gen, (hidden,), dtype, device), randn(gen, (hidden,), dtype, device)
    err = 0.0
    for w, b in ((weight, bias), (weight, None), (None, None)):
        with nan_allocations():
            out = triton_ops.layer_norm(x, w, b, 1e-5)
        err = max(err, rel_err(out, reference.layer_norm(x, w, b, 1e-5)))
    return err


def check_silu_and_mul(device, dtype, rng, size=1):
    gen = torch_gen(rng)
    x = strided_rows(gen, rng.randint(1, 9 * size), 2 * rng.choice([40, 1100 * size]), dtype, device)
    with nan_allocations():
        out = triton_ops.silu_and_mul(x)
    return rel_err(out, reference.silu_and_mul(x))


def check_gelu_tanh_and_mul(device, dtype, rng, size=1):
    gen = torch_gen(rng)
    x = 2 * strided_rows(gen, rng.randint(1, 9 * size), 2 * rng.choice([40, 1100 * size]), dtype, device)
    with nan_allocations():
        out = triton_ops.gelu_tanh_and_mul(x)
    return rel_err(out, reference.gelu_tanh_and_mul(x))


def check_grouped_gemm(device, dtype, rng, size=1):
    """A step's expert work: tokens routed to top-k of E experts (some experts get none, or all of a step's rows),
    through both GEMMs of the MoE layer: the gathered one and the weighted one."""
    gen = torch_gen(rng)
    num_experts, top_k = rng.choice([(1, 1), (4, 2), (8, 1), (8, 2), (60, 4)])
    tokens, hidden, inter = rng.randint(1, 40 * size), rng.choice([64, 80, 200]), rng.choice([24, 96, 130])
    x = randn(gen, (tokens, hidden), dtype, device)
    gate_up = randn(gen, (num_experts, 2 * inter, hidden), dtype, device) / hidden ** 0.5
    down = randn(gen, (num_experts, hidden, inter), dtype, device) / inter ** 0.5
    hot = rng.sample(range(num_experts), max(top_k, rng.randint(1, num_experts)))   # experts that get tokens
    experts = torch.stack([torch.tensor(hot)[torch.randperm(len(hot), generator=gen)[:top_k]] for _ in range(tokens)])
    flat = experts.flatten()
    slots = flat.argsort(stable=True)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32)
    offsets[1:] = torch.bincount(flat, minlength=num_experts).cumsum(0)
    rows, offsets = (slots // top_k).to(device), offsets.to(device)
    weights = torch.rand(tokens * top_k, generator=gen).to(device)
    with nan_allocations():
        h = triton_ops.grouped_gemm(x, gate_up, offsets, rows=rows)
        act = reference.silu_and_mul(h)
        y = triton_ops.grouped_gemm(act, down, offsets, row_scale=weights)
    return max(rel_err(h, reference.grouped_gemm(x, gate_up, offsets, rows=rows)),
               rel_err(y, reference.grouped_gemm(act, down, offsets, row_scale=weights)))


def split_qkv(qkv, q_heads, kv_heads, head_dim):
    """q, k, v as the models make them: views into one fused QKV projection output [T, (Hq + 2 Hkv) D]."""
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return q.unflatten(-1, (q_heads, head_dim)), k.unflatten(-1, (kv_heads, head_dim)), \
        v.unflatten(-1, (kv_heads, head_dim))


def random_qkv(gen, tokens, q_heads, kv_heads, head_dim, dtype, device):
    return randn(gen, (tokens, (q_heads + 2 * kv_heads) * head_dim), dtype, device)


def check_rotary(device, dtype, rng, size=1):
    gen = torch_gen(rng)
    tokens, kv_heads, head_dim = rng.randint(1, 9 * size), rng.choice([1, 2]), rng.choice(HEAD_DIMS)
    q_heads = kv_heads * rng.choice([1, 3, 4])
    max_pos = 64 * size
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).to(device)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen).to(device)
    qkv = random_qkv(gen, tokens, q_heads, kv_heads, head_dim, dtype, device)
    qkv_ref = qkv.clone()
    q, k, _ = split_qkv(qkv, q_heads, kv_heads, head_dim)
    q_ref, k_ref, _ = split_qkv(qkv_ref, q_heads, kv_heads, head_dim)
    triton_ops.rotary(q, k, positions, cos_sin)
    reference.rotary(q_ref, k_ref, positions, cos_sin)
    return rel_err(qkv, qkv_ref)                      # in place, through the views; v left alone


def check_kv_write(device, dtype, rng, size=1):
    gen = torch_gen(rng)
    tokens, kv_heads, head_dim = rng.randint(1, 12 * size), rng.choice([1, 2, 8]), rng.choice(HEAD_DIMS)
    block_size = rng.choice(BLOCK_SIZES)
    num_blocks = tokens // block_size + rng.randint(1, 3)
    _, k, v = split_qkv(random_qkv(gen, tokens, kv_heads, kv_heads, head_dim, dtype, device), kv_heads, kv_heads,
                        head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(device)
    pools = [torch.full((num_blocks, block_size, kv_heads, head_dim), math.nan, dtype=dtype, device=device)
             for _ in range(4)]
    triton_ops.kv_write(k, v, pools[0], pools[1], slots)
    reference.kv_write(k, v, pools[2], pools[3], slots)
    return max(rel_err(pools[0], pools[2]), rel_err(pools[1], pools[3]))


def make_attention_batch(rng, device, dtype, head_dim, decode_only, size=1):
    """A ragged batch with its KV already written: empty sequences, decodes and (unless decode_only) prompt chunks
    with and without earlier context. Pool slots that hold no token are NaN, so reading one fails the check."""
    gen = torch_gen(rng)
    kinds = ["empty", "decode"] + ([] if decode_only else ["prompt", "chunk"])
    kinds += [rng.choice(kinds[1:]) for _ in range(rng.randint(1, 4))]
    rng.shuffle(kinds)
    q_lens, ctx_lens = [], []
    for kind in kinds:
        n = {"empty": 0, "decode": 1}.get(kind, rng.randint(2, 80 * size))
        q_lens.append(n)
        ctx_lens.append(n + (rng.randint(0, 200 * size) if kind != "prompt" else 0))
    kv_heads, block_size = rng.choice([1, 2]), rng.choice(BLOCK_SIZES)
    q_heads = kv_heads * rng.choice([1, 2, 3, 4, 8])
    blocks_per_seq = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(blocks_per_seq) + 2
    block_ids = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(kinds), max(blocks_per_seq), dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), math.nan, dtype=dtype)
    v_cache = k_cache.clone()
    for s, (ctx, nb) in enumerate(zip(ctx_lens, blocks_per_seq)):
        tables[s, :nb] = torch.tensor(block_ids[:nb], dtype=torch.int32)
        del block_ids[:nb]
        pos = torch.arange(ctx)
        blocks, offsets = tables[s, pos // block_size].long(), pos % block_size
        k_cache[blocks, offsets] = randn(gen, (ctx, kv_heads, head_dim), dtype, "cpu")
        v_cache[blocks, offsets] = randn(gen, (ctx, kv_heads, head_dim), dtype, "cpu")
    query_start = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    meta = AttentionMetadata(query_start.to(device), torch.tensor(ctx_lens, dtype=torch.int32, device=device),
                             tables.to(device), max(q_lens), max(ctx_lens))
    q, _, _ = split_qkv(random_qkv(gen, sum(q_lens), q_heads, kv_heads, head_dim, dtype, device), q_heads, kv_heads,
                        head_dim)
    return q, k_cache.to(device), v_cache.to(device), meta


def check_attention(device, dtype, rng, size=1, decode_only=False):
    """Every head size, each with a fresh batch, window and soft-cap (Gemma-2's tanh capping of the scores, at caps
    the scores reach). Decode batches also run with forced split-KV (the path the heuristic takes for them on a
    GPU); mixed batches run as the heuristic sends them, unsplit."""
    err = 0.0
    for head_dim in HEAD_DIMS:
        q, k_cache, v_cache, meta = make_attention_batch(rng, device, dtype, head_dim, decode_only, size)
        window = rng.choice([None, rng.randint(1, 64 * size)])
        softcap = rng.choice([None, rng.uniform(0.5, 5.0)])
        scale = head_dim ** -0.5
        # The reference reads whole blocks and masks the slots past each context, which needs them finite (a
        # real pool is zero-filled); a sentinel of 100 there would still wreck its output if it attended them.
        ref = reference.attention(q, k_cache.nan_to_num(100.0), v_cache.nan_to_num(100.0), meta, scale, window,
                                  softcap)
        with nan_allocations():
            outs = [triton_ops.attention(q, k_cache, v_cache, meta, scale, window, softcap)]
            outs += [triton_ops._attention(q, k_cache, v_cache, meta, scale, window, n, softcap)
                     for n in ((1, 2, 4) if decode_only else ())]
        err = max(err, *(rel_err(out, ref) for out in outs))
    return err


def check_attention_decode(device, dtype, rng, size=1):
    return check_attention(device, dtype, rng, size, decode_only=True)


CHECKS = {"rms_norm": check_rms_norm, "layer_norm": check_layer_norm, "silu_and_mul": check_silu_and_mul,
          "gelu_tanh_and_mul": check_gelu_tanh_and_mul, "rotary": check_rotary, "kv_write": check_kv_write,
          "attention": check_attention, "attention_decode": check_attention_decode,
          "grouped_gemm": check_grouped_gemm}


def run_check(name: str, device: str, dtype: torch.dtype, seed: int, size: int = 1) -> float:
    return CHECKS[name](device, dtype, random.Random(f"{seed}-{name}-{dtype}"), size)


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CHECKS)
def test_matches_reference(name, dtype, device):
    err = run_check(name, device, dtype, SEED, size=1 if device == "cpu" else 8)
    assert err <= TOL[dtype], (f"{name} {dtype} on {device}: relative error {err:.3g} > {TOL[dtype]:g} "
                               f"(reproduce with FASTGEN_TEST_SEED={SEED})")


@pytest.mark.skipif(INTERPRETED, reason="the interpreter tests ran in this process")
def test_interpreter_in_subprocess():
    """Runs this module's interpreter tests in a process where TRITON_INTERPRET=1 precedes triton's import."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "FASTGEN_TEST_SEED": str(SEED),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                           "-m", "not gpu and not slow"], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"interpreter tests failed (FASTGEN_TEST_SEED={SEED}):\n{proc.stdout[-20000:]}"


def test_split_heuristic(monkeypatch):
    """Split-KV only for decode batches too small to fill the GPU, in powers of two, never below 512 keys each."""
    monkeypatch.setattr(triton_ops, "_num_sms", lambda device: 132)

    def splits(num_seqs, max_query_len, max_context_len, kv_heads=8):
        meta = AttentionMetadata(torch.zeros(num_seqs + 1), torch.zeros(num_seqs), torch.zeros(num_seqs, 1),
                                 max_query_len, max_context_len)
        return triton_ops._num_kv_splits(meta, kv_heads, torch.device("cuda"))

    assert splits(4, 1, 32768) == 16
    assert splits(4, 1, 2048) == 4
    assert splits(64, 1, 2048) == 1
    assert splits(4, 512, 32768) == 1
    assert splits(1, 1, 600, kv_heads=1) == 1


@needs_interpreter
def test_hardware_kernels_chooses_the_backend_once_for_every_layer():
    """hardware.kernels picks the backend when the engine is built; every kernel-using layer of the model then
    runs on it (auto: triton on CUDA, and on a CPU the cpu backend where its C++ kernel builds, else torch)."""
    from fastgen.kernels import cpu, cpu_ops
    from fastgen.models.layers import KernelUser
    from tiny import compose_engine, fastgen_from_hf, tiny_hf_model

    model = fastgen_from_hf(tiny_hf_model("llama"))
    on_cpu = cpu if cpu_ops.available() else reference
    for name, backend in (("triton", triton_ops), ("torch", reference), ("auto", on_cpu)):
        compose_engine(model, kernels=name)
        assert {m.ops for m in model.modules() if isinstance(m, KernelUser)} == {backend}
    assert kernels.resolve_backend("auto", "cuda") == "triton"
    x = torch.randn(3, 64)
    assert rel_err(kernels.load_backend("triton").silu_and_mul(x), reference.silu_and_mul(x)) <= TOL[torch.float32]
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        kernels.load_backend("cuda")


@needs_interpreter
@pytest.mark.parametrize("family,scheduler", [("llama", "splitfuse"), ("mistral", "splitfuse"), ("gemma2", "splitfuse"),
                                              ("qwen2_moe", "splitfuse"), ("llama", "vllm-0.2")])
def test_full_model_greedy_tokens_same_through_triton_and_reference(family, scheduler):
    """Tiny models through the engine: every kernel on the Triton path gives the same greedy tokens as the PyTorch
    path, with prompt chunks and decodes mixed (splitfuse) or prompts padded to the longest of their batch (vllm-0.2:
    pad tokens in the scratch block): Llama; Mistral (window 7, shorter than the sequences); Gemma-2 (soft-capped
    attention, GeGLU, alternating windows); Qwen2-MoE (the grouped expert GEMMs, a shared expert)."""
    from fastgen.sampling import SamplingParams
    from tiny import compose_engine, drain, fastgen_from_hf, tiny_hf_model

    model = fastgen_from_hf(tiny_hf_model(family, seed=1))
    gen = torch.Generator().manual_seed(SEED)
    prompts = [torch.randint(0, 211, (n,), generator=gen).tolist() for n in (5, 23, 2, 12)]

    def greedy(backend):
        eng = compose_engine(model, scheduler, num_blocks=16, block_size=16, kernels=backend,
                             token_budget=16 if scheduler == "splitfuse" else 64).engine
        ids = [eng.add_request(p, SamplingParams(max_new_tokens=5, ignore_eos=True)) for p in prompts]
        finished = drain(eng)
        return [finished[i].output_token_ids for i in ids]

    assert greedy("triton") == greedy("torch")


@needs_interpreter
def test_real_executor_on_triton_kernels_gives_transformers_greedy_tokens():
    """The GPU path as far as a CPU can check it: the real executor with hardware.kernels=triton (every kernel
    interpreted), built the way run.py builds it, gives transformers' greedy tokens in float32."""
    from fastgen.compose import EngineConfig, build_engine
    from fastgen.executors.real import RealExecutor
    from fastgen.kv import KV_MANAGERS
    from fastgen.sampling import SamplingParams
    from fastgen.schedulers import SCHEDULERS
    from tiny import drain, reference_greedy, tiny_hf_model

    hf = tiny_hf_model("llama", seed=2)
    cfg = EngineConfig(scheduler=SCHEDULERS.config("splitfuse", token_budget=16),
                       kv=KV_MANAGERS.config("blocked", block_size=16, num_blocks=8))
    cfg.hardware.kernels = "triton"
    engine = build_engine(cfg, hf)
    assert isinstance(engine._executor, RealExecutor) and engine._executor.backend is triton_ops
    gen = torch.Generator().manual_seed(SEED)
    prompts = [torch.randint(0, 211, (n,), generator=gen).tolist() for n in (21, 3)]
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=4, ignore_eos=True)) for p in prompts]
    finished = drain(engine)
    assert [finished[i].output_token_ids for i in ids] == [reference_greedy(hf, p, 4) for p in prompts], \
        f"reproduce with FASTGEN_TEST_SEED={SEED}"
