"""Triton kernels for the GPU path; each function mirrors its namesake in `reference.py` (the spec).

Everything computes in fp32 and rounds where the reference rounds, so results match it to float noise. Kernels
read their inputs through strides, so views (q, k, v split from a fused QKV projection) need no copies, and
`rotary` rotates the caller's tensors in place. With TRITON_INTERPRET=1 set before this module is imported, the
same kernels run on CPU tensors (that is how the tests check them against the references).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from fastgen.kernels.metadata import AttentionMetadata

_LOG2E = 1.4426950408889634
_NO_WINDOW = 1 << 30          # a "window" longer than any context: attention without a window needs no branch
_MIN_SPLIT_LEN = 512          # split-KV: fewest KV tokens worth giving a program of their own
_MAX_SPLITS = 16


# ---------------------------------------------------------------------------------------------------------------
# Row-wise kernels: one program per row of the flattened [rows, N] input.
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                     stride_x, stride_res, stride_out, stride_res_out,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(res_out_ptr.dtype.element_ty)            # the reference rounds the sum to its dtype
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
        x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    y = (x * rstd).to(res_out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, w * y, mask=mask)


@triton.jit
def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, n_cols, eps, stride_x, stride_out,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    xc = tl.where(mask, x - mean, 0.0)
    y = xc / tl.sqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    if HAS_WEIGHT:
        y *= tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y, mask=mask)


@triton.jit
def _tanh(x):
    """tanh in fp32 (tl has none, and libdevice's does not run under the interpreter): from exp, with the odd
    series near 0, where 1 - exp(-2|x|) would cancel."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    a2 = a * a
    series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, series, t)
    return tl.where(x < 0, -t, t)


_SILU, _GELU_TANH = 0, 1        # the gated MLP's activation (ACTIVATION of _act_and_mul_kernel)


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_out, BLOCK: tl.constexpr,
                        ACTIVATION: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == 0:
        act = gate / (1.0 + tl.exp(-gate))
    else:   # gelu, tanh approximation: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        act = 0.5 * gate * (1.0 + _tanh(0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)))
    act = act.to(out_ptr.dtype.element_ty).to(tl.float32)    # F.silu / F.gelu round here
    tl.store(out_ptr + row * stride_out + cols, act * up, mask=mask)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., N] -> a [rows, N] view with unit column stride (copying only if no such view exists)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _row_config(n: int) -> dict:
    """Block and warp count for a kernel that holds a whole row of n elements in one program."""
    block = triton.next_power_of_2(n)
    return dict(BLOCK=block, num_warps=min(max(block // 256, 1), 16))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = _as_rows(x)
    n = x2.shape[1]
    if residual is None:
        # Like the reference, hand back x itself. The kernel takes the rounding dtype from res_out's pointer.
        res_out, res2, res_out2 = x, x2, x2
    else:
        res_out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
        res2, res_out2 = _as_rows(residual), res_out.view(-1, n)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, res_out.dtype), device=x.device)
    out2 = out.view(-1, n)
    _rms_norm_kernel[(x2.shape[0],)](x2, res2, weight, out2, res_out2, n, eps, x2.stride(0), res2.stride(0),
                                     out2.stride(0), res_out2.stride(0), HAS_RESIDUAL=residual is not None,
                                     **_row_config(n))
    return out, res_out


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    x2 = _as_rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, x2.shape[1])
    _layer_norm_kernel[(x2.shape[0],)](x2, x2 if weight is None else weight, x2 if bias is None else bias, out2,
                                       x2.shape[1], eps, x2.stride(0), out2.stride(0), HAS_WEIGHT=weight is not None,
                                       HAS_BIAS=bias is not None, **_row_config(x2.shape[1]))
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _act_and_mul(x, _SILU)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _act_and_mul(x, _GELU_TANH)


def _act_and_mul(x: torch.Tensor, activation: int) -> torch.Tensor:
    x2 = _as_rows(x)
    n = x2.shape[1] // 2
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, n)
    block = min(triton.next_power_of_2(n), 1024)
    _act_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, out2, n, x2.stride(0), out2.stride(0),
                                                              BLOCK=block, ACTIVATION=activation, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Per-token kernels over [T, H, D] tensors: one program per token handles all of its heads.
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _rotate_heads(ptr, stride_t, stride_h, stride_d, t, cos, sin, num_heads,
                  HALF: tl.constexpr, H_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    heads = tl.arange(0, H_PAD)[:, None]
    cols = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < num_heads) & (cols < HALF)
    p1 = ptr + t * stride_t + heads * stride_h + cols * stride_d
    p2 = p1 + HALF * stride_d
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, x1 * cos - x2 * sin, mask=mask)
    tl.store(p2, x2 * cos + x1 * sin, mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cs_ptr, num_q_heads, num_k_heads,
                   stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_cs,
                   HALF: tl.constexpr, HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cols = tl.arange(0, HALF_PAD)[None, :]
    cs_mask = cols < HALF
    cos = tl.load(cs_ptr + pos * stride_cs + cols, mask=cs_mask, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + cols, mask=cs_mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, stride_qt, stride_qh, stride_qd, t, cos, sin, num_q_heads, HALF, HQ_PAD, HALF_PAD)
    _rotate_heads(k_ptr, stride_kt, stride_kh, stride_kd, t, cos, sin, num_k_heads, HALF, HK_PAD, HALF_PAD)


@triton.jit
def _kv_write_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, num_heads, block_size,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                     HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    block = slot // block_size
    offset = slot % block_size
    heads = tl.arange(0, H_PAD)[:, None]
    dims = tl.arange(0, D_PAD)[None, :]
    mask = (heads < num_heads) & (dims < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + heads * stride_vh + dims, mask=mask)
    tl.store(k_cache_ptr + block * stride_kcb + offset * stride_kcs + heads * stride_kch + dims, k, mask=mask)
    tl.store(v_cache_ptr + block * stride_vcb + offset * stride_vcs + heads * stride_vch + dims, v, mask=mask)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] in place, through their strides (they may be views of a QKV buffer)."""
    half = cos_sin.shape[-1] // 2
    cos_sin = _unit_last_stride(cos_sin)
    _rotary_kernel[(q.shape[0],)](q, k, positions, cos_sin, q.shape[1], k.shape[1], *q.stride(), *k.stride(),
                                  cos_sin.stride(0), HALF=half, HQ_PAD=triton.next_power_of_2(q.shape[1]),
                                  HK_PAD=triton.next_power_of_2(k.shape[1]),
                                  HALF_PAD=triton.next_power_of_2(half), num_warps=4)


def kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatters k, v [T, Hkv, D] into the pools [num_blocks, block_size, Hkv, D] at the flat slots given."""
    k, v = _unit_last_stride(k), _unit_last_stride(v)
    num_heads, head_dim = k.shape[1], k.shape[2]
    _kv_write_kernel[(k.shape[0],)](k, v, k_cache, v_cache, slot_mapping, num_heads, k_cache.shape[1],
                                    k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                    *k_cache.stride()[:3], *v_cache.stride()[:3], HEAD_DIM=head_dim,
                                    H_PAD=triton.next_power_of_2(num_heads),
                                    D_PAD=triton.next_power_of_2(head_dim), num_warps=4)


# ---------------------------------------------------------------------------------------------------------------
# Ragged paged attention.
#
# A program owns a tile of BLOCK_Q consecutive queries of one sequence times the GROUP query heads that share one
# KV head (BLOCK_M = BLOCK_Q * GROUP rows, padded), so every KV tile it loads serves the whole GQA group. It walks
# the tile's causal (and windowed) KV range in steps of BLOCK_N keys, looking up each key's physical slot in the
# block table, with an online softmax in fp32. Tiles of all sequences form grid axis 0: sequence s owns tiles
# query_start[s] // BLOCK_Q + s onwards (an upper bound on the tiles before it), so a program finds its sequence
# by binary search and the host never loops over sequences nor reads their lengths. When every sequence fits one
# tile (decode batches), tile index = sequence index. Split-KV (flash decoding) cuts each tile's KV range into
# NUM_SPLITS parts on grid axis 2; they write partial (max, sum, acc) rows that _split_reduce_kernel combines.
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _find_seq(query_start_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Last segment (a sequence's queries, an expert's rows) whose first tile index (query_start[s] // BLOCK_Q + s)
    is <= tile."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    """tl.dot with fp32 accumulation; FP32 multiplies in full fp32 (for fp32 inputs, and for bf16 ones under the
    interpreter, whose tl.dot would multiply the raw bf16 bit patterns)."""
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit(do_not_specialize=["num_seqs", "window"])
def _attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, m_ptr, l_ptr,
                      query_start_ptr, context_lens_ptr, block_tables_ptr,
                      num_seqs, num_q_heads, scale_log2, window, softcap_log2,
                      stride_qt, stride_qh, stride_ot, stride_oh,
                      stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                      KV_BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                      D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                      NUM_SPLITS: tl.constexpr, ONE_TILE_PER_SEQ: tl.constexpr, DOT_FP32: tl.constexpr,
                      SOFTCAP: tl.constexpr):
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if ONE_TILE_PER_SEQ:
        seq = tl.program_id(0)
        tile = 0
    else:
        seq = _find_seq(query_start_ptr, tl.program_id(0), num_seqs, BLOCK_Q)
        tile = tl.program_id(0) - (tl.load(query_start_ptr + seq) // BLOCK_Q + seq)
    q_start = tl.load(query_start_ptr + seq)
    num_queries = tl.load(query_start_ptr + seq + 1) - q_start
    if tile * BLOCK_Q >= num_queries:
        return
    ctx = tl.load(context_lens_ptr + seq)

    # Rows of this tile: query (tile * BLOCK_Q + row // GROUP) of the sequence, head kv_head * GROUP + row % GROUP.
    rows = tl.arange(0, BLOCK_M)
    q_idx = tile * BLOCK_Q + rows // GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_idx < num_queries)
    q_pos = ctx - num_queries + q_idx
    heads = kv_head * GROUP + rows % GROUP
    dims = tl.arange(0, D_PAD)
    d_ok = dims < HEAD_DIM
    q_rows = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # KV range [lo, hi) seen by any query of the tile, and this split's share of it.
    first_pos = ctx - num_queries + tile * BLOCK_Q
    hi = ctx - num_queries + tl.minimum(tile * BLOCK_Q + BLOCK_Q, num_queries)
    lo = tl.maximum(first_pos - window + 1, 0)
    split_len = tl.cdiv(tl.cdiv(hi - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    kv_lo = lo + split * split_len
    kv_hi = tl.minimum(kv_lo + split_len, hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(kv_lo, kv_hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < kv_hi
        block = tl.load(table + k_pos // KV_BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        offset = k_pos % KV_BLOCK_SIZE
        k_off = block * stride_kb + offset * stride_ks + kv_head * stride_kh
        v_off = block * stride_vb + offset * stride_vs + kv_head * stride_vh
        k = tl.load(k_ptr + k_off[None, :] + dims[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        s = _dot(q, k, DOT_FP32) * scale_log2
        if SOFTCAP:     # softcap * tanh(score / softcap), in log2 units: softcap_log2 = softcap * log2(e)
            s = softcap_log2 * _tanh(s / softcap_log2)
        allowed = (row_ok[:, None] & k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
                   & (k_pos[None, :] > q_pos[:, None] - window))
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)    # rows with nothing allowed yet stay at zero
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        v = tl.load(v_ptr + v_off[:, None] + dims[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :], out,
                 mask=row_ok[:, None] & d_ok[None, :])
    else:
        part = (q_rows * num_q_heads + heads) * NUM_SPLITS + split     # partials are [T, Hq, NUM_SPLITS(, D)]
        tl.store(m_ptr + part, m_i, mask=row_ok)
        tl.store(l_ptr + part, l_i, mask=row_ok)
        tl.store(out_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _split_reduce_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, num_q_heads, stride_ot, stride_oh,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    part = (t * num_q_heads + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, D_PAD)
    d_ok = dims < HEAD_DIM
    m = tl.load(m_ptr + part)
    m_max = tl.max(m, axis=0)                      # finite: some split holds the query's own key
    w = tl.exp2(m - m_max)
    l = tl.sum(tl.load(l_ptr + part) * w, axis=0)
    acc = tl.load(acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=d_ok[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / l
    tl.store(out_ptr + t * stride_ot + head * stride_oh + dims, out, mask=d_ok)


_INTERPRETED = isinstance(_attention_kernel, InterpretedFunction)     # TRITON_INTERPRET=1 at import


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _num_kv_splits(meta: AttentionMetadata, num_kv_heads: int, device: torch.device) -> int:
    """Split-KV for decode batches too small to fill the GPU: double the splits (a power of two) until there are
    about two programs per SM, each keeping at least _MIN_SPLIT_LEN keys."""
    if meta.max_query_len != 1:
        return 1
    programs = meta.num_seqs * num_kv_heads
    splits = 1
    while (splits < _MAX_SPLITS and programs * splits < 2 * _num_sms(device)
           and meta.max_context_len >= 2 * splits * _MIN_SPLIT_LEN):
        splits *= 2
    return splits


def prepare(meta: AttentionMetadata, block_size: int, windows) -> None:
    """Nothing to precompute: the kernel reads the block tables and context lengths directly."""


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
              scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Ragged paged attention of a whole step in one launch (two with split-KV, chosen by _num_kv_splits)."""
    return _attention(q, k_cache, v_cache, meta, scale, window,
                      _num_kv_splits(meta, k_cache.shape[2], q.device), softcap)


def _attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, window: int | None, num_splits: int, softcap: float | None = None) -> torch.Tensor:
    """`attention` with the number of KV splits given (a power of two; 1 = no split-KV)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    q = _unit_last_stride(q)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # Rows per tile: a decode tile holds one query's GROUP heads, padded to the 16 rows tl.dot needs at least.
    block_m = max(16 if meta.max_query_len <= 1 else 64, triton.next_power_of_2(group))
    block_q = block_m // group
    one_tile_per_seq = meta.max_query_len <= block_q
    num_tiles = meta.num_seqs if one_tile_per_seq else num_tokens // block_q + meta.num_seqs
    if num_splits == 1:
        dest, m_part, l_part = out, out, out
    else:
        dest = torch.empty((num_tokens, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        m_part = torch.empty((num_tokens, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
    _attention_kernel[(num_tiles, num_kv_heads, num_splits)](
        q, k_cache, v_cache, dest, m_part, l_part, meta.query_start, meta.context_lens, meta.block_tables,
        meta.num_seqs, num_q_heads, scale * _LOG2E, window or _NO_WINDOW, (softcap or 0.0) * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], meta.block_tables.stride(0),
        KV_BLOCK_SIZE=k_cache.shape[1], GROUP=group, HEAD_DIM=head_dim, D_PAD=max(triton.next_power_of_2(head_dim), 16),
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=64, NUM_SPLITS=num_splits, ONE_TILE_PER_SEQ=one_tile_per_seq,
        DOT_FP32=q.dtype == torch.float32 or (_INTERPRETED and q.dtype == torch.bfloat16),
        SOFTCAP=softcap is not None, num_warps=4)
    if num_splits > 1:
        _split_reduce_kernel[(num_tokens, num_q_heads)](
            dest, m_part, l_part, out, num_q_heads, out.stride(0), out.stride(1), HEAD_DIM=head_dim,
            D_PAD=triton.next_power_of_2(head_dim), NUM_SPLITS=num_splits, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Grouped GEMM for mixtures of experts.
#
# The rows of a step's expert work are sorted by expert (expert e owns rows expert_offsets[e]:expert_offsets[e+1]),
# and one launch runs every expert's GEMM: grid axis 0 holds BLOCK_M-row tiles of all experts, expert e owning
# tiles expert_offsets[e] // BLOCK_M + e onwards (an upper bound on the tiles before it, the scheme of the
# attention kernel's sequences), found by the same binary search; tiles past an expert's rows (and experts with
# no rows) exit at once, so the host never reads the routing. Grid axis 1 tiles the output columns. The dispatch
# gather (each row's input row, `rows`) and the routing weights (`row_scale`) are fused into the loads and the
# store; the result is the reference's: fp32 accumulation, rounded to the output dtype, then scaled.
# ---------------------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["num_experts"])
def _grouped_gemm_kernel(a_ptr, w_ptr, out_ptr, rows_ptr, scale_ptr, offsets_ptr, num_experts, n_cols, k_dim,
                         stride_am, stride_we, stride_wn, stride_om,
                         HAS_ROWS: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    tile = tl.program_id(0)
    expert = _find_seq(offsets_ptr, tile, num_experts, BLOCK_M)
    first = tl.load(offsets_ptr + expert)
    count = tl.load(offsets_ptr + expert + 1) - first
    m_tile = tile - (first // BLOCK_M + expert)
    if m_tile * BLOCK_M >= count:
        return
    local = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < count
    out_rows = (first + local).to(tl.int64)
    if HAS_ROWS:
        a_rows = tl.load(rows_ptr + out_rows, mask=row_ok, other=0).to(tl.int64)
    else:
        a_rows = out_rows
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_dim
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc += _dot(a, w, DOT_FP32)
    out = acc.to(out_ptr.dtype.element_ty)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + out_rows, mask=row_ok, other=0.0).to(tl.float32)
        out = (out.to(tl.float32) * scale[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_rows[:, None] * stride_om + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])


def grouped_gemm(x: torch.Tensor, weight: torch.Tensor, expert_offsets: torch.Tensor,
                 rows: torch.Tensor | None = None, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """All experts' GEMMs in one launch; see reference.grouped_gemm for the contract."""
    x = _unit_last_stride(x)
    weight = _unit_last_stride(weight)
    num_experts, n_cols, k_dim = weight.shape
    num_rows = x.shape[0] if rows is None else rows.shape[0]
    out = torch.empty((num_rows, n_cols), dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    # Rows per expert decide the tile height: decode-sized steps give each expert a few rows at most.
    block_m = 16 if num_rows <= 16 * num_experts else 64
    block_n = min(64, max(16, triton.next_power_of_2(n_cols)))
    grid = (triton.cdiv(num_rows, block_m) + num_experts, triton.cdiv(n_cols, block_n))
    _grouped_gemm_kernel[grid](
        x, weight, out, x if rows is None else rows, x if row_scale is None else row_scale, expert_offsets,
        num_experts, n_cols, k_dim, x.stride(0), weight.stride(0), weight.stride(1), out.stride(0),
        HAS_ROWS=rows is not None, HAS_SCALE=row_scale is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=32, DOT_FP32=x.dtype == torch.float32 or (_INTERPRETED and x.dtype == torch.bfloat16), num_warps=4)
    return out
