"""PyTorch implementations of every kernel: the CPU path and the reference the Triton kernels are tested against.

Layouts (shared with the Triton kernels):
  q:        [T, Hq, D]   the step's queries, all sequences flattened (ragged)
  k, v:     [T, Hkv, D]  the step's new keys/values
  k_cache:  [num_blocks, block_size, Hkv, D]  one layer's key pool (v_cache likewise)
  slot_mapping: [T] int64, flat slot (block * block_size + offset) of each new token
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgen.kernels.metadata import AttentionMetadata


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (norm(x + residual), x + residual); the sum is the next residual, as in a pre-norm block."""
    if residual is not None:
        x = x + residual
    residual = x
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


def kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
              scale: float, window: int | None = None) -> torch.Tensor:
    """Causal attention of each sequence's queries over its whole KV history, read through its block table.

    Decode rows (one query each) run as one padded batch; each prompt chunk runs on its own. The gather
    indices and masks depend only on the batch, so they are built once per step and reused by every layer.
    """
    plan = meta.torch_plan(k_cache.shape[1], window)
    out = torch.empty_like(q)
    k_flat = k_cache.view(-1, *k_cache.shape[2:])
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    if plan.decode_rows is not None:
        qd = q.index_select(0, plan.decode_rows)[:, :, None, :]            # [B, Hq, 1, D]
        kd = k_flat[plan.decode_slots].transpose(1, 2)                     # [B, Hkv, C, D]
        vd = v_flat[plan.decode_slots].transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=plan.decode_mask, scale=scale,
                                            enable_gqa=kd.shape[1] != qd.shape[1])
        out.index_copy_(0, plan.decode_rows, od[:, :, 0, :])
    for start, end, slots, mask in plan.chunks:
        qc = q[start:end].transpose(0, 1)                                  # [Hq, n, D]
        kc = k_flat[slots].transpose(0, 1)                                 # [Hkv, C, D]
        vc = v_flat[slots].transpose(0, 1)
        oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale,
                                            enable_gqa=kc.shape[0] != qc.shape[0])
        out[start:end] = oc.transpose(0, 1)
    return out
