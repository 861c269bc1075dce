"""Where a decode step's time goes: b sequences at context ctx, the embedded SmolLM2-135M in float32 (issue 20's
profile).

    python experiments/profile_decode.py --batches 1 8 32 64 --context 340                  # wall time, all threads
    python experiments/profile_decode.py --threads 1 --timer cpu                            # a loaded machine
    python experiments/profile_decode.py --linear plain                                     # MKL on plain weights
    python experiments/profile_decode.py --kernels torch                                    # gather + SDPA attention

The step is run twice per repeat: once as the model's own forward (timed whole: "model forward"), and once
re-traced piece by piece through the same modules and kernels with a clock around each part (linear layers by
name, attention split into the block gathers and the math on the torch backend or one in-place kernel call on the
cpu backend, norms, rotary, KV write, LM head), plus the sampler.
The KV pool holds random values and each sequence owns randomly placed blocks, as in a running engine.
Each model-forward time is also given as a share of its hardware roofline (fastgen.roofline: weight and KV bytes
over the measured bandwidth, linear flops over the measured GEMM rate, on this process's threads), measured in
the same run. `--linear` picks the linear layers' GEMM as `hardware.linear` does, `--kernels` the kernel backend as
`hardware.kernels` does. `--torch-profile` adds
torch.profiler's operator table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastgen.kernels import load_backend, reference  # noqa: E402
from fastgen.kernels.cpu_ops import paged_decode_attention  # noqa: E402
from fastgen.kernels.linear import LINEARS, resolve_linear  # noqa: E402
from fastgen.kv.cache import KVCache  # noqa: E402
from fastgen.models import load_model  # noqa: E402
from fastgen.ragged import RaggedBatch, SeqChunk  # noqa: E402
from fastgen.roofline import Ceilings, measure_bandwidth, measure_gemm_flops, roofline_s, step_work  # noqa: E402
from fastgen.sampling import Sampler, SamplingParams, SamplingRow  # noqa: E402


def make_batch(b: int, ctx: int, block_size: int, num_blocks: int, seed: int = 0) -> RaggedBatch:
    g = torch.Generator().manual_seed(seed)
    per = -(-(ctx + 1) // block_size)
    perm = torch.randperm(num_blocks, generator=g)[: b * per].view(b, per).tolist()
    chunks = [SeqChunk([int(torch.randint(100, 40000, (1,), generator=g))], ctx, perm[i]) for i in range(b)]
    return RaggedBatch.build(chunks, block_size)


class Timer:
    def __init__(self):
        self.t: dict[str, float] = {}

    def add(self, name, dt):
        self.t[name] = self.t.get(name, 0.0) + dt


CLOCK = time.perf_counter


def timed_forward(model, batch, cache, T: Timer, paged: bool):
    pc = CLOCK
    plan_t = pc()
    reference._plan(batch.attn, cache.block_size, None, paged)
    T.add("attn plan (per step)", pc() - plan_t)
    s = pc(); h, residual = model.model.embed_tokens(batch.input_ids), None; T.add("embed", pc() - s)
    for i, layer in enumerate(model.model.layers):
        k_cache, v_cache = cache.layer(i)
        a = layer.self_attn
        s = pc(); h, residual = layer.input_layernorm(h, residual); T.add("norms", pc() - s)
        s = pc(); qkv = a.qkv_proj(h); T.add("linear qkv", pc() - s)
        q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        q = q.view(-1, a.num_heads, a.head_dim); k = k.view(-1, a.num_kv_heads, a.head_dim)
        v = v.view(-1, a.num_kv_heads, a.head_dim)
        s = pc(); a.rotary(q, k, batch.positions); T.add("rotary", pc() - s)
        s = pc(); layer.self_attn.ops.kv_write(k, v, k_cache, v_cache, batch.slot_mapping); T.add("kv write", pc() - s)
        # attention: the in-place kernel (cpu backend), or split into gather and math (torch backend)
        plan = reference._plan(batch.attn, k_cache.shape[1], None, paged)
        out = torch.empty_like(q)
        if plan.paged is not None:
            p = plan.paged
            s = pc()
            out[p.rows] = paged_decode_attention(q[p.rows], k_cache, v_cache, p.blocks, p.start, p.end, a.scale)
            T.add("attn in place (C++)", pc() - s)
        for d in plan.decodes:
            s = pc()
            qd = q[d.rows]; bb = qd.shape[0]
            kd = plan.gather(k_cache, d.blocks, "k").view(a.num_kv_heads, bb, -1, a.head_dim).transpose(0, 1)
            vd = plan.gather(v_cache, d.blocks, "v").view(a.num_kv_heads, bb, -1, a.head_dim).transpose(0, 1)
            T.add("attn gather", pc() - s)
            s = pc()
            od = F.scaled_dot_product_attention(qd.view(bb, a.num_kv_heads, -1, a.head_dim), kd, vd,
                                                attn_mask=d.mask, scale=a.scale)
            out[d.rows] = od.reshape(bb, a.num_heads, a.head_dim)
            T.add("attn math", pc() - s)
        s = pc(); h = a.o_proj(out.reshape(-1, a.q_size)); T.add("linear o", pc() - s)
        s = pc(); h, residual = layer.post_attention_layernorm(h, residual); T.add("norms", pc() - s)
        s = pc(); gu = layer.mlp.gate_up_proj(h); T.add("linear gate_up", pc() - s)
        s = pc(); act = layer.mlp.ops.silu_and_mul(gu); T.add("silu*mul", pc() - s)
        s = pc(); h = layer.mlp.down_proj(act); T.add("linear down", pc() - s)
    idx = batch.logits_indices
    s = pc(); h, _ = model.model.norm(h.index_select(0, idx), residual.index_select(0, idx)); T.add("norms", pc() - s)
    s = pc(); logits = model.lm_head(h); T.add("lm head", pc() - s)
    return logits


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--context", type=int, default=340)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                    help="cpu: the thread's CPU time (use with --threads 1 on a loaded machine)")
    ap.add_argument("--torch-profile", action="store_true")
    ap.add_argument("--linear", choices=LINEARS, default="auto", help="the linear layers' GEMM (hardware.linear)")
    ap.add_argument("--kernels", choices=("auto", "torch", "cpu"), default="auto",
                    help="the kernel backend (hardware.kernels)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    if args.timer == 'cpu':
        CLOCK = time.thread_time
    model, tok = load_model("smollm2-135m", dtype="float32")
    model.use_linear(resolve_linear(args.linear, "cpu", torch.float32))
    backend = load_backend(args.kernels, "cpu")
    model.use_kernels(backend)
    paged = backend is not reference
    block_size = 64
    spec = model.spec
    num_blocks = max(args.batches) * (-(-(args.context + 1) // block_size)) + 8
    cache = KVCache(spec, num_blocks, block_size, torch.float32)
    cache.k.normal_(); cache.v.normal_()
    sampler = Sampler(0)
    ceilings = Ceilings(measure_gemm_flops(clock=CLOCK), measure_bandwidth(clock=CLOCK))   # on the steps' timer
    print(f"load average {os.getloadavg()}, threads {torch.get_num_threads()}, timer {args.timer}, linear "
          f"{args.linear}, kernels {backend.__name__.rsplit('.', 1)[-1]}; ceilings: GEMM "
          f"{ceilings.gemm_flops / 1e9:.1f} GFLOP/s, bandwidth "
          f"{ceilings.bandwidth / 1e9:.1f} GB/s")
    for b in args.batches:
        whole, parts = [], []
        samp = []
        with torch.inference_mode():
            for r in range(args.repeats + 1):
                batch = make_batch(b, args.context, block_size, num_blocks, seed=r)
                s = CLOCK(); logits = model(batch, cache); dt = CLOCK() - s
                s = CLOCK(); sampler(logits, [SamplingRow(SamplingParams(ignore_eos=True), None, [], [])] * b)
                ds = CLOCK() - s
                batch = make_batch(b, args.context, block_size, num_blocks, seed=r)
                T = Timer(); s = CLOCK(); timed_forward(model, batch, cache, T, paged)
                T.add("TOTAL (timed)", CLOCK() - s)
                if r:
                    whole.append(dt); parts.append(T.t); samp.append(ds)
        med = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
        w = statistics.median(whole)
        roof = roofline_s(step_work(spec, [1] * b, [args.context + 1] * b), ceilings)
        print(f"\n== b={b} ctx={args.context}: model forward {w*1e3:.1f} ms (roofline {roof*1e3:.1f} ms: "
              f"{roof / w:.0%}), sampler {statistics.median(samp)*1e3:.2f} ms")
        acc = sum(v for k, v in med.items() if k != "TOTAL (timed)")
        for k, v in sorted(med.items(), key=lambda kv: -kv[1]):
            print(f"  {k:24s} {v*1e3:8.2f} ms  {v/med['TOTAL (timed)']:6.1%}")
        print(f"  {'python/other (timed)':24s} {(med['TOTAL (timed)']-acc)*1e3:8.2f} ms")
        if args.torch_profile:
            from torch.profiler import profile, ProfilerActivity
            batch = make_batch(b, args.context, block_size, num_blocks, seed=99)
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
                model(batch, cache)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
