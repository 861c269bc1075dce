"""The PyTorch backend: every kernel in plain PyTorch. The CPU path, and the reference the Triton kernels are
tested against.

Layouts (shared with the Triton kernels):
  q:        [T, Hq, D]   the step's queries, all sequences flattened (ragged)
  k, v:     [T, Hkv, D]  the step's new keys/values
  k_cache:  [num_blocks, block_size, Hkv, D]  one layer's key pool (v_cache likewise)
  slot_mapping: [T] int64, flat slot (block * block_size + offset) of each new token
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import fastgen.kernels.cpu_ops as cpu_ops
from fastgen.kernels.metadata import AttentionMetadata
from fastgen.kernels.torch_plan import TorchAttentionPlan, build_plan


def prepare(meta: AttentionMetadata, block_size: int, windows) -> None:
    """Builds the step's attention plan for each attention window the model uses, before the layers run."""
    for window in windows:
        _plan(meta, block_size, window)


def _plan(meta: AttentionMetadata, block_size: int, window: int | None, paged: bool = False) -> TorchAttentionPlan:
    plan = meta.prepared.get((window, paged))
    if plan is None:
        plan = meta.prepared[(window, paged)] = build_plan(meta, block_size, window, paged)
    return plan


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (norm(x + residual), x + residual); the sum is the next residual, as in a pre-norm block."""
    if residual is not None:
        x = x + residual
    residual = x
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps), residual    # the same math, one fused kernel
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * out.to(x.dtype), residual


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotates q and k in place (rotate-half / NeoX layout). cos_sin: [max_pos, D], cos in the first half."""
    half = cos_sin.shape[-1] // 2
    cs = cos_sin.index_select(0, positions)
    cos = cs[:, None, :half]
    sin = cs[:, None, half:]
    for x in (q, k):
        x1, x2 = x[..., :half], x[..., half:]
        x1f, x2f = x1.float(), x2.float()
        o1 = x1f * cos - x2f * sin
        o2 = x2f * cos + x1f * sin
        x1.copy_(o1)
        x2.copy_(o2)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] holding gate then up; returns silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] holding gate then up; returns gelu_tanh(gate) * up (Gemma-2's gated MLP)."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def grouped_gemm(x: torch.Tensor, weight: torch.Tensor, expert_offsets: torch.Tensor,
                 rows: torch.Tensor | None = None, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The experts' GEMMs of a mixture-of-experts layer over rows grouped by expert.

    weight: [E, N, K] stacked expert matrices; expert_offsets: [E+1] cumulative row counts, so output rows
    expert_offsets[e]:expert_offsets[e+1] are A[those rows] @ weight[e].T, where A is x, or x[rows] when `rows`
    gives each output row's input row (the dispatch gather). `row_scale` multiplies each output row (the routing
    weights, applied to the rounded product as transformers does). Experts with no rows cost nothing.
    """
    a = x if rows is None else x.index_select(0, rows)
    out = torch.empty(a.shape[0], weight.shape[1], dtype=x.dtype, device=x.device)
    bounds = expert_offsets.tolist()
    for e in range(weight.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = F.linear(a[lo:hi], weight[e])
    if row_scale is not None:
        out = (out * row_scale[:, None]).to(out.dtype)
    return out


def kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
              scale: float, window: int | None = None, softcap: float | None = None,
              paged: bool = False) -> torch.Tensor:
    """Causal attention of each sequence's queries over its whole KV history, read through its block table.

    Decode rows (one query each) run as padded batches, in groups small enough that the gathered K/V stays in
    cache, with the query heads of a KV group folded into the query dimension, so grouped-query attention needs
    no repeated K/V. Each prompt chunk runs on its own, as plain causal attention when it has no cached prefix.
    KV is gathered by whole blocks into head-major copies (each KV head's keys one contiguous matrix; a view when
    the blocks are consecutive), and the plan behind the gathers is built once per step and reused by every layer.
    Slots past a context are read and masked, so they must hold finite values (KVCache zero-fills its pools).
    `softcap` (Gemma-2) squashes each score s to softcap * tanh(s / softcap) before the softmax. `paged` runs
    the decodes instead through the C++ kernel that reads the blocks in place (fastgen.kernels.cpu_ops), and
    float32 prompt chunks through its flash-style chunk kernel.
    """
    sdpa = F.scaled_dot_product_attention if softcap is None else functools.partial(softcapped_sdpa, softcap=softcap)
    plan = _plan(meta, k_cache.shape[1], window, paged)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    out = torch.empty_like(q)
    if plan.paged is not None:
        p = plan.paged
        out[p.rows] = cpu_ops.paged_decode_attention(q[p.rows], k_cache, v_cache, p.blocks, p.start, p.end, scale,
                                                     softcap)
    for d in plan.decodes:
        qd = q[d.rows]
        b = qd.shape[0]
        kd = plan.gather(k_cache, d.blocks, "k").view(num_kv_heads, b, -1, head_dim).transpose(0, 1)  # [B,Hkv,C,D]
        vd = plan.gather(v_cache, d.blocks, "v").view(num_kv_heads, b, -1, head_dim).transpose(0, 1)
        od = sdpa(qd.view(b, num_kv_heads, -1, head_dim), kd, vd, attn_mask=d.mask, scale=scale)
        out[d.rows] = od.reshape(b, num_heads, head_dim)
    in_place = paged and q.dtype == k_cache.dtype == v_cache.dtype == torch.float32
    for c in plan.chunks:
        if in_place:
            out[c.rows] = cpu_ops.paged_chunk_attention(q[c.rows], k_cache, v_cache, c.block_ids, c.first,
                                                        c.first + c.length, scale, window, softcap)
            continue
        kc = plan.gather(k_cache, c.blocks, "k").flatten(1, 2).narrow(1, c.first, c.length)  # [Hkv, C, D]
        vc = plan.gather(v_cache, c.blocks, "v").flatten(1, 2).narrow(1, c.first, c.length)
        # 4-D inputs: SDPA's fused CPU kernel; 3-D ones fall back to the much slower math path.
        oc = sdpa(q[c.rows].transpose(0, 1)[None], kc[None], vc[None], attn_mask=c.mask, is_causal=c.mask is None,
                  scale=scale, enable_gqa=num_kv_heads != num_heads)
        out[c.rows] = oc[0].transpose(0, 1)
    return out


def softcapped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
                    softcap: float) -> torch.Tensor:
    """F.scaled_dot_product_attention (same arguments, bool mask: True = attend) with the scores soft-capped,
    which SDPA cannot do: the math of transformers' eager Gemma-2 attention, step for step."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
