"""Decode attention over the blocked KV cache, one layer of SmolLM2-135M's shape (9 q heads, 3 KV heads, D=64):
the current path (block gather + SDPA) vs candidates, b sequences at context ctx, 1 thread, CPU time.

    python experiments/scratch/mb_attention.py [threads]
"""
import os, sys, time, statistics
sys.path.insert(0, os.getcwd())
import torch, torch.nn.functional as F
from fastgen.kernels import reference
from fastgen.ragged import RaggedBatch, SeqChunk

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.set_num_threads(threads)
timer = time.thread_time if threads == 1 else time.perf_counter
H, HKV, D, BS = 9, 3, 64, 64
LAYERS = 30            # distinct per-layer pools so KV comes from memory as in a real step


def bench(fn, n=5, clock=None):
    clock = clock or timer
    fn(); ts = []
    for _ in range(n):
        s = clock(); fn(); ts.append(clock() - s)
    return statistics.median(ts)


def decode_case(b, ctx=340):
    """b decoding sequences at context ctx over per-layer pools (random blocks): (pools, tables [b, nb], batch,
    q, context lengths after the step)."""
    per = -(-(ctx + 1) // BS)
    nblocks = b * per + 4
    pools = [(torch.randn(nblocks, BS, HKV, D), torch.randn(nblocks, BS, HKV, D)) for _ in range(LAYERS)]
    tables = torch.randperm(nblocks)[: b * per].view(b, per)
    batch = RaggedBatch.build([SeqChunk([1], ctx, tables[i].tolist()) for i in range(b)], BS)
    return pools, tables, batch, torch.randn(b, H, D), torch.full((b,), ctx + 1)


def attn_bmm(q, k_cache, v_cache, plan, scale):
    """Gather + per-KV-head bmm with an explicit masked softmax (no SDPA)."""
    out = torch.empty_like(q)
    for d in plan.decodes:
        qd = q[d.rows]; b = qd.shape[0]
        kd = plan.gather(k_cache, d.blocks, "k").view(b, -1, HKV, D)
        vd = plan.gather(v_cache, d.blocks, "v").view(b, -1, HKV, D)
        qg = qd.view(b, HKV, H // HKV, D)
        bias = torch.zeros(d.mask.shape, dtype=q.dtype).masked_fill_(~d.mask, float("-inf")).view(b, 1, -1)
        od = out[d.rows].view(b, HKV, H // HKV, D)
        for h in range(HKV):
            s = torch.baddbmm(bias, qg[:, h], kd[:, :, h].transpose(1, 2), alpha=scale)   # [b, g, C]
            p = torch.softmax(s, -1)
            od[:, h] = torch.bmm(p, vd[:, :, h])
    return out


def main():
    torch.manual_seed(0)
    for b in (8, 32, 64):
        ctx = 340
        pools, _, batch, q, _ = decode_case(b, ctx)
        scale = D ** -0.5
        plan = reference._plan(batch.attn, BS, None)
        ref = reference.attention(q, *pools[0], batch.attn, scale)
        got = attn_bmm(q, *pools[0], plan, scale)
        err = (ref - got).abs().max().item()
        t_ref = bench(lambda: [reference.attention(q, k, v, batch.attn, scale) for k, v in pools])
        t_bmm = bench(lambda: [attn_bmm(q, k, v, plan, scale) for k, v in pools])
        # gather alone (what the copy costs)
        def gather_only():
            for k, v in pools:
                for d in plan.decodes:
                    plan.gather(k, d.blocks, "k"); plan.gather(v, d.blocks, "v")
        t_g = bench(gather_only)
        kv_bytes = 2 * b * ctx * HKV * D * 4 * LAYERS
        print(f"b={b:3d} ctx={ctx}: 30 layers: current {t_ref*1e3:7.1f} ms | gather alone {t_g*1e3:6.1f} | gather+bmm {t_bmm*1e3:7.1f} (max err {err:.1e}) | KV {kv_bytes/1e6:.0f} MB -> floor at 14 GB/s {kv_bytes/14e9*1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    print(open('/proc/loadavg').read().strip(), "threads", threads)
    main()
