"""Times every Triton kernel against its PyTorch reference and against the roofline, on a CUDA GPU.

    python experiments/bench_kernels.py [--check] [--dtypes fp16 bf16]

Times are medians of triton.testing.do_bench. The roofline of a kernel is max(bytes it must move / copy
bandwidth, flops / matmul rate), both ceilings measured here: a large device-to-device copy and a large bf16
matmul. Shapes are Llama-7B-like (32 query heads, head size 128, 8 or 32 KV heads, 64-token KV blocks). The
Markdown table is printed and, when the environment variable OUT is set, also written to $OUT/bench_kernels.md.
--check first compares every kernel with its reference on random CUDA shapes (the checks of
tests/test_kernels_triton.py, at larger sizes) and prints the largest relative errors.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # run from a checkout without installing fastgen

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
Q_HEADS, HEAD_DIM, BLOCK_SIZE, HIDDEN, INTERMEDIATE = 32, 128, 64, 4096, 11008


@dataclass
class Case:
    kernel: str
    shape: str
    bytes: float                       # the least a kernel must read and write
    flops: float
    triton_fn: Callable[[], object]
    torch_fn: Callable[[], object]


def measure_ceilings() -> tuple[float, float]:
    """(bytes/s of a 1 GiB device-to-device copy, counting read and write; flop/s of an 8192^3 bf16 matmul)."""
    from triton.testing import do_bench
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    flops = 2 * 8192**3 / (do_bench(lambda: a @ b, return_mode="median") * 1e-3)
    return bandwidth, flops


def elementwise_cases(dtype: torch.dtype) -> list[Case]:
    from fastgen.kernels import reference as ref, triton_ops as tri
    e = torch.tensor([], dtype=dtype).element_size()
    tokens = 4096
    x = torch.randn(tokens, HIDDEN, dtype=dtype, device="cuda")
    res = torch.randn_like(x)
    w = torch.randn(HIDDEN, dtype=dtype, device="cuda")
    gate_up = torch.randn(tokens, 2 * INTERMEDIATE, dtype=dtype, device="cuda")
    kv_heads = 8
    qkv = torch.randn(tokens, (Q_HEADS + 2 * kv_heads) * HEAD_DIM, dtype=dtype, device="cuda")
    q, k, v = (t.unflatten(-1, (-1, HEAD_DIM)) for t in
               qkv.split([Q_HEADS * HEAD_DIM, kv_heads * HEAD_DIM, kv_heads * HEAD_DIM], dim=-1))
    positions = torch.randint(0, 4096, (tokens,), device="cuda")
    cos_sin = torch.randn(4096, HEAD_DIM, device="cuda")
    k_cache = torch.empty(tokens // BLOCK_SIZE + 1, BLOCK_SIZE, kv_heads, HEAD_DIM, dtype=dtype, device="cuda")
    v_cache = torch.empty_like(k_cache)
    slots = torch.randperm(k_cache.shape[0] * BLOCK_SIZE, device="cuda")[:tokens]
    act = tokens * HIDDEN * e
    qk = tokens * (Q_HEADS + kv_heads) * HEAD_DIM * e
    kv = tokens * kv_heads * HEAD_DIM * e
    return [
        Case("rms_norm+residual", f"{tokens}x{HIDDEN}", 4 * act, 0,
             lambda: tri.rms_norm(x, w, 1e-6, res), lambda: ref.rms_norm(x, w, 1e-6, res)),
        Case("layer_norm", f"{tokens}x{HIDDEN}", 2 * act, 0,
             lambda: tri.layer_norm(x, w, w, 1e-5), lambda: ref.layer_norm(x, w, w, 1e-5)),
        Case("silu_and_mul", f"{tokens}x2x{INTERMEDIATE}", 3 * tokens * INTERMEDIATE * e, 0,
             lambda: tri.silu_and_mul(gate_up), lambda: ref.silu_and_mul(gate_up)),
        Case("rotary (QKV views)", f"{tokens} tok Hq={Q_HEADS} Hkv={kv_heads}", 2 * qk + tokens * HEAD_DIM * 4, 0,
             lambda: tri.rotary(q, k, positions, cos_sin), lambda: ref.rotary(q, k, positions, cos_sin)),
        Case("kv_write", f"{tokens} tok Hkv={kv_heads}", 4 * kv, 0,
             lambda: tri.kv_write(k, v, k_cache, v_cache, slots), lambda: ref.kv_write(k, v, k_cache, v_cache, slots)),
    ]


def attention_case(dtype: torch.dtype, label: str, kv_heads: int, q_lens: list[int], ctx_lens: list[int]) -> Case:
    """Paged causal attention over a batch whose sequences own contiguous runs of shuffled KV blocks."""
    from fastgen.kernels import reference as ref, triton_ops as tri
    from fastgen.kernels.metadata import AttentionMetadata
    e = torch.tensor([], dtype=dtype).element_size()
    blocks = [-(-c // BLOCK_SIZE) for c in ctx_lens]
    ids = torch.randperm(sum(blocks), dtype=torch.int32)
    tables = torch.zeros(len(blocks), max(blocks), dtype=torch.int32)
    for s, (start, n) in enumerate(zip([0, *torch.tensor(blocks).cumsum(0).tolist()], blocks)):
        tables[s, :n] = ids[start:start + n]
    k_cache = torch.randn(sum(blocks), BLOCK_SIZE, kv_heads, HEAD_DIM, dtype=dtype, device="cuda")
    v_cache = torch.randn_like(k_cache)
    query_start = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    meta = AttentionMetadata(query_start.cuda(), torch.tensor(ctx_lens, dtype=torch.int32, device="cuda"),
                             tables.cuda(), max(q_lens), max(ctx_lens))
    tokens = sum(q_lens)
    q = torch.randn(tokens, Q_HEADS, HEAD_DIM, dtype=dtype, device="cuda")
    keys_seen = sum(sum(range(c - n + 1, c + 1)) for n, c in zip(q_lens, ctx_lens))    # causal (query, key) pairs
    splits = tri._num_kv_splits(meta, kv_heads, q.device)
    scale = HEAD_DIM ** -0.5
    return Case("attention" + (f" (split-KV x{splits})" if splits > 1 else ""), f"{label}, Hkv={kv_heads}",
                2 * tokens * Q_HEADS * HEAD_DIM * e + 2 * sum(ctx_lens) * kv_heads * HEAD_DIM * e,
                4 * keys_seen * Q_HEADS * HEAD_DIM,
                lambda: tri.attention(q, k_cache, v_cache, meta, scale),
                lambda: ref.attention(q, k_cache, v_cache, meta, scale))


def attention_cases(dtype: torch.dtype) -> list[Case]:
    cases = []
    for kv_heads in (8, 32):
        cases.append(attention_case(dtype, "decode 64 seqs x 2k ctx", kv_heads, [1] * 64, [2048] * 64))
        cases.append(attention_case(dtype, "prefill 512-token chunk (ctx 2k) + 32 decodes x 2k", kv_heads,
                                    [512] + [1] * 32, [2048] * 33))
        cases.append(attention_case(dtype, "decode 4 seqs x 32k ctx", kv_heads, [1] * 4, [32768] * 4))
    return cases


def bench(cases: list[Case], dtype_name: str, bandwidth: float, flops: float) -> list[str]:
    from triton.testing import do_bench
    rows = []
    for c in cases:
        t_tri = do_bench(c.triton_fn, return_mode="median") * 1e3            # us
        t_ref = do_bench(c.torch_fn, return_mode="median") * 1e3
        t_roof = max(c.bytes / bandwidth, c.flops / flops) * 1e6
        rows.append(f"| {c.kernel} | {c.shape} | {dtype_name} | {t_tri:.1f} | {t_ref:.1f} | {t_ref / t_tri:.2f}x "
                    f"| {t_roof:.1f} | {100 * t_roof / t_tri:.0f}% |")
        torch.cuda.empty_cache()
    return rows


def check(seed: int) -> bool:
    """Runs the test module's checks on CUDA tensors; True if all are within tolerance."""
    spec = importlib.util.spec_from_file_location("test_kernels_triton", ROOT / "tests" / "test_kernels_triton.py")
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    print(f"correctness on CUDA (seed {seed}): max relative error vs reference")
    ok = True
    for name in tests.CHECKS:
        errs = {dtype: tests.run_check(name, "cuda", dtype, seed, size=8) for dtype in tests.DTYPES}
        bad = [dtype for dtype, err in errs.items() if not err <= tests.TOL[dtype]]
        ok &= not bad
        print(f"  {name:18s} " + "  ".join(f"{str(d).removeprefix('torch.')}={e:.2e}" for d, e in errs.items())
              + (f"  FAIL: {', '.join(map(str, bad))}" if bad else "  ok"))
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="first compare every kernel with its reference on CUDA")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--seed", type=int, default=random.randrange(2**32), help="seed of --check's random shapes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False).")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("TRITON_INTERPRET is set: the benchmark times compiled kernels; unset it (or set it to 0).")
    if args.check and not check(args.seed):
        sys.exit("correctness check failed")

    bandwidth, flops = measure_ceilings()
    header = (f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} "
              f"TFLOP/s; times in us (median of triton.testing.do_bench)\n\n"
              "| kernel | shape | dtype | triton | torch | speedup | roofline | % of roofline |\n"
              "|---|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for name in args.dtypes:
        torch.manual_seed(0)
        rows += bench(elementwise_cases(DTYPES[name]) + attention_cases(DTYPES[name]), name, bandwidth, flops)
    table = "\n".join([header, *rows])
    print(table)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_kernels.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
