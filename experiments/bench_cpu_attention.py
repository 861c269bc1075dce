"""The CPU backend's attention against the machine (issue 33): decode attention's KV bytes/s against the streaming
bandwidth, and prompt-chunk attention's GFLOP/s against the square-GEMM rate, both ceilings measured in the same run
on the same threads (fastgen.roofline). SmolLM2-135M's shapes (9 query / 3 KV heads of 64), conf/kv's block size,
every sequence's blocks placed at random in a pool far larger than the caches (each timed call reads its own
layer's blocks, as a model's layers do).

    chrt -i 0 python experiments/bench_cpu_attention.py --threads 1 --timer cpu --baseline 343cf86   # loaded machine
    python experiments/bench_cpu_attention.py --threads 2 --timer wall --baseline 343cf86            # idle machine

Decode rows compare the cpu backend's in-place kernel with `--baseline`'s (the same kernel built from that git
revision, side by side in the same run); prompt-chunk rows compare the cpu backend with the PyTorch backend (block
gathers + SDPA's flash-attention CPU kernel). Times are the best of `--repeats` (the least disturbed run on a
shared machine, as for the ceilings). `--timer cpu` is the calling thread's CPU time: use it with `--threads 1` on a
loaded machine. Writes Markdown to stdout and, with `--out`, to that file.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from fastgen.hugepages import huge_zeros  # noqa: E402
from fastgen.kernels import cpu, cpu_ops, reference  # noqa: E402
from fastgen.ragged import RaggedBatch, SeqChunk  # noqa: E402
from fastgen.roofline import measure_bandwidth, measure_gemm_flops  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64          # SmolLM2-135M
FOOTPRINT = 256 * 2**20                       # bytes of KV the timed layers read in all: far beyond the caches


def build_variant(name: str, rev: str | None = None, flags: tuple[str, ...] = ()):
    """The decode kernel as it was at git revision `rev` (None: as it is in this tree), compiled with extra `flags`
    (e.g. -DPREFETCH_BLOCKS=2), built under its own op namespace beside the cpu backend's."""
    tmp = Path(tempfile.mkdtemp(prefix=f"fastgen_{name}_"))
    names = ("paged_decode_attention.cpp", "vec_math.h")
    for file in names:
        src = (cpu_ops.CSRC / file).read_text() if rev is None else subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:fastgen/kernels/csrc/{file}"], check=True, capture_output=True,
            text=True).stdout
        (tmp / file).write_text(src.replace("fastgen_cpu", f"fastgen_cpu_{name}"))
    from torch.utils import cpp_extension
    capability = torch.backends.cpu.get_cpu_capability()
    cpp_extension.load(f"fastgen_cpu_{name}_{capability.lower()}", [str(tmp / names[0])],
                       extra_cflags=["-O3", "-fopenmp", *cpu_ops.ISA_FLAGS.get(capability, []), *flags],
                       extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    return getattr(torch.ops, f"fastgen_cpu_{name}").paged_decode_attention


class Layers:
    """`n` layers' worth of attention inputs over one head-major pool: each layer's sequences own their own blocks,
    placed at random, and its metadata is prepared once (the per-step plan, before the layers run)."""

    def __init__(self, q_lens: list[int], ctx_lens: list[int], block_size: int, seed: int = 0,
                 small_pages: bool = False):
        per_seq = [-(-c // block_size) for c in ctx_lens]
        kv_bytes = 2 * sum(ctx_lens) * KV_HEADS * HEAD_DIM * 4
        self.n = max(1, math.ceil(FOOTPRINT / kv_bytes))
        g = torch.Generator().manual_seed(seed)
        num_blocks = self.n * sum(per_seq)
        shape = (KV_HEADS, num_blocks, block_size, HEAD_DIM)
        # On huge pages, as the engine's pools (fastgen.kv.cache); --small-pages: torch's own memory.
        pool = torch.randn if small_pages else lambda s, generator: huge_zeros(s, torch.float32).normal_(
            generator=generator)
        self.k, self.v = (pool(shape, generator=g).permute(1, 2, 0, 3) for _ in range(2))
        ids = torch.randperm(num_blocks, generator=g).split(per_seq * self.n)
        self.metas = []
        for layer in range(self.n):
            tables = ids[layer * len(per_seq):(layer + 1) * len(per_seq)]
            chunks = [SeqChunk([1] * n, c - n, t.tolist()) for n, c, t in zip(q_lens, ctx_lens, tables)]
            self.metas.append(RaggedBatch.build(chunks, block_size).attn)
        self.q = torch.randn(sum(q_lens), HEADS, HEAD_DIM, generator=g)
        self.kv_bytes = kv_bytes
        self.flops = 4 * HEAD_DIM * HEADS * sum(n * c - n * (n - 1) // 2 for n, c in zip(q_lens, ctx_lens))


def best_per_layer(fn, layers: Layers, repeats: int, clock) -> float:
    """Seconds per layer of the best of `repeats` passes over every layer (after one warm-up pass)."""
    best = math.inf
    for r in range(repeats + 1):
        start = clock()
        for meta in layers.metas:
            fn(meta)
        if r:
            best = min(best, (clock() - start) / layers.n)
    return best


def decode_rows(args, clock, bandwidth: float, kernels: dict) -> list[str]:
    """`kernels`: name -> a decode op built beside the cpu backend's (the first one is the baseline)."""
    rows = []
    scale = HEAD_DIM ** -0.5
    for ctx in args.contexts:
        for b in args.batches:
            layers = Layers([1] * b, [ctx] * b, args.block_size, seed=ctx * 1000 + b, small_pages=args.small_pages)
            for meta in layers.metas:
                cpu.prepare(meta, args.block_size, [None])

            def run(op):
                def call(meta):
                    p = reference._plan(meta, args.block_size, None, paged=True).paged
                    return op(layers.q, layers.k, layers.v, p.blocks, p.start, p.end, scale, 0.0)
                return call
            variants = {name: run(op) for name, op in kernels.items()}
            variants["cpu"] = lambda meta: cpu.attention(layers.q, layers.k, layers.v, meta, scale)
            times = {name: best_per_layer(fn, layers, args.repeats, clock) for name, fn in variants.items()}
            cells = [f"{t * 1e6:.1f} us, {layers.kv_bytes / t / 1e9:.1f} GB/s ({layers.kv_bytes / t / bandwidth:.0%})"
                     for t in times.values()]
            ratio = f" | {next(iter(times.values())) / times['cpu']:.2f}x" if kernels else ""
            rows.append(f"| {ctx} | {b} | {layers.kv_bytes / 2**20:.1f} | " + " | ".join(cells) + ratio + " |")
            print(rows[-1], flush=True)
    return rows


def chunk_rows(args, clock, gemm: float) -> list[str]:
    rows = []
    scale = HEAD_DIM ** -0.5
    for prefix in args.prefixes:
        for n in args.chunks:
            layers = Layers([n], [prefix + n], args.block_size, seed=prefix * 1000 + n, small_pages=args.small_pages)
            for meta in layers.metas:
                cpu.prepare(meta, args.block_size, [None])
                reference.prepare(meta, args.block_size, [None])
            variants = {"torch (gather + SDPA)": lambda meta: reference.attention(layers.q, layers.k, layers.v,
                                                                                   meta, scale),
                        "cpu": lambda meta: cpu.attention(layers.q, layers.k, layers.v, meta, scale)}
            times = {name: best_per_layer(fn, layers, args.repeats, clock) for name, fn in variants.items()}
            cells = [f"{t * 1e3:.2f} ms, {layers.flops / t / 1e9:.1f} GFLOP/s ({layers.flops / t / gemm:.0%})"
                     for t in times.values()]
            t = list(times.values())
            rows.append(f"| {prefix} | {n} | " + " | ".join(cells) + f" | {t[0] / t[1]:.2f}x |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timer", choices=["wall", "cpu"], default="cpu")
    ap.add_argument("--baseline", help="a git revision whose decode kernel runs beside today's")
    ap.add_argument("--variants", nargs="*", default=[], metavar="NAME=FLAGS",
                    help="this tree's decode kernel built with extra compiler flags, e.g. pf2=-DPREFETCH_BLOCKS=2")
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--prefixes", type=int, nargs="+", default=[0, 512, 1536])
    ap.add_argument("--chunks", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip", choices=["decode", "chunks"], nargs="*", default=[])
    ap.add_argument("--small-pages", action="store_true", help="the KV pool on torch's memory (4 KiB pages), not on "
                    "huge pages as the engine's")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.timer == "cpu" and args.threads != 1:
        sys.exit("--timer cpu times the calling thread only: use it with --threads 1")
    clock = time.thread_time if args.timer == "cpu" else time.perf_counter
    args.block_size = yaml.safe_load((ROOT / "conf/kv/blocked.yaml").read_text())["block_size"]
    if not cpu_ops.available():
        sys.exit("the C++ kernels could not be built here (see the warning above)")
    kernels = {"baseline": build_variant("baseline", args.baseline)} if args.baseline else {}
    for v in args.variants:
        name, _, flags = v.partition("=")
        kernels[name] = build_variant(name, flags=tuple(flags.split()))
    torch.manual_seed(0)
    with torch.inference_mode():
        bandwidth = measure_bandwidth(clock=clock)
        gemm = measure_gemm_flops(clock=clock)
        out = [f"{torch.backends.cpu.get_cpu_capability()} build, torch {torch.__version__}, {args.threads} thread(s), "
               f"timer {args.timer}, block size {args.block_size}, KV pool on "
               f"{'torch memory (4 KiB pages)' if args.small_pages else 'huge pages'}, load average before "
               f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; ceilings on the same threads: streaming read "
               f"{bandwidth / 1e9:.1f} GB/s, square GEMM {gemm / 1e9:.1f} GFLOP/s", ""]
        print("\n".join(out), flush=True)
        if "decode" not in args.skip:
            names = [f"baseline {args.baseline}" if n == "baseline" else n for n in kernels] + ["cpu"]
            out += ["Decode attention per layer (one query per sequence): time, KV bytes/s (% of the streaming read)"
                    + ("; speed-up: the first column's time / cpu's" if kernels else ""), "",
                    "| context | batch | KV MiB | " + " | ".join(names) + (" | speed-up |" if kernels else ""),
                    "|" + "---:|" * (3 + len(names) + bool(kernels))]
            print("\n".join(out[-4:]), flush=True)
            out += decode_rows(args, clock, bandwidth, kernels)
        if "chunks" not in args.skip:
            out += ["", "Prompt-chunk attention per layer (causal within the chunk, over the cached prefix): time, "
                    "GFLOP/s (% of the square-GEMM rate)", "",
                    "| prefix | chunk | torch (gather + SDPA) | cpu | speed-up |", "|---:|---:|---:|---:|---:|"]
            print("\n".join(out[-4:]), flush=True)
            out += chunk_rows(args, clock, gemm)
        out += ["", f"load average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}"]
        print(out[-1])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
