"""The PyTorch backend's attention plan: block gathers and masks for one step, built once (in `prepare`, before the
layers run) and shared by every layer.

Decode rows (one query each) run as padded batches that each read the same number of whole KV blocks, in groups
small enough that the gathered K/V stays in the CPU's cache, or, for the CPU backend's kernel that reads the blocks
in place, as one `PagedDecodes` (and then each chunk also carries its block ids); each prompt chunk runs on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastgen.kernels.metadata import AttentionMetadata

# Decodes are gathered and attended in groups of at most this many KV slots: a group's gathered K/V then stays
# in the CPU's cache between the copy and the attention that reads it (1.4-1.6x faster at 64-128 decodes).
DECODE_GROUP_SLOTS = 4096


@dataclass
class DecodePlan:
    """A group of single-query sequences run as one padded batch: each reads the same number of whole KV blocks."""

    rows: torch.Tensor | slice                # query rows (a slice when they are consecutive)
    blocks: torch.Tensor                      # [B * nb] block ids, nb per sequence
    mask: torch.Tensor                        # [B, 1, 1, nb * block_size] bool, True = attend


@dataclass
class PagedDecodes:
    """All single-query sequences of a step, for a kernel that reads their KV blocks in place (no gather)."""

    rows: torch.Tensor | slice                # query rows (a slice when they are consecutive)
    blocks: torch.Tensor                      # [B, nb] int64, the blocks each sequence reads, in order
    start: torch.Tensor                       # [B] int64: keys [start, end) are read, counted from the first
    end: torch.Tensor                         #   slot of blocks[b, 0]


@dataclass
class ChunkPlan:
    """One prompt chunk: its query rows and the KV it reads, [first, first + length) of its gathered blocks."""

    rows: slice
    blocks: torch.Tensor | slice              # block ids, or a slice of the pool when they are consecutive
    first: int
    length: int
    mask: torch.Tensor | None                 # [n, length] bool; None = plain causal (queries == keys)
    block_ids: torch.Tensor | None = None     # [nb] int64 block ids, for a kernel that reads them in place


@dataclass
class TorchAttentionPlan:
    """Block gathers and masks for the PyTorch attention path, built once per step and shared by every layer."""

    decodes: list[DecodePlan]
    chunks: list[ChunkPlan]
    paged: PagedDecodes | None = None         # the decodes instead, when planned for in-place reads
    _buffers: dict = field(default_factory=dict, repr=False)

    def gather(self, cache: torch.Tensor, blocks: torch.Tensor | slice, name: str) -> torch.Tensor:
        """cache[blocks] head-major: [Hkv, n, block_size, D] for n blocks, so that each KV head's gathered keys
        are one contiguous matrix. A view for a slice, else a copy into a buffer kept for the step: reusing it in
        every layer spares the page faults a fresh multi-megabyte tensor costs each time on a CPU. Fast when the
        pool's memory is head-major (KVCache's layout); any layout gives the same values."""
        heads = cache.permute(2, 0, 1, 3)                                   # [Hkv, num_blocks, block_size, D]
        if isinstance(blocks, slice):
            return heads[:, blocks]
        n = heads.shape[0] * blocks.numel() * heads.shape[2] * heads.shape[3]
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != cache.dtype:
            buf = self._buffers[name] = torch.empty(n, dtype=cache.dtype, device=cache.device)
        out = buf[:n].view(heads.shape[0], blocks.numel(), *heads.shape[2:])
        if heads.is_contiguous():
            torch.index_select(heads.view(*heads.shape[:2], -1), 1, blocks, out=out.view(*out.shape[:2], -1))
        else:
            torch.index_select(heads, 1, blocks, out=out)
        return out


def _rows(rows: torch.Tensor, device: torch.device) -> torch.Tensor | slice:
    """Query row indices, as a slice when they are consecutive (a view, no copy)."""
    if int(rows[-1]) - int(rows[0]) == len(rows) - 1:
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows.to(device)


def build_plan(meta: AttentionMetadata, block_size: int, window: int | None,
               paged: bool = False) -> TorchAttentionPlan:
    """The step's plan; `paged` plans the decodes as one PagedDecodes instead of gathered groups."""
    qs = meta.query_start.cpu().long()
    ctx = meta.context_lens.cpu().long()
    tables = meta.block_tables.cpu().long()
    device = meta.block_tables.device
    q_lens = qs[1:] - qs[:-1]
    first_q = ctx - q_lens
    # Keys a sequence reads: [lo, ctx); lo > 0 only under a sliding window. Whole blocks are gathered.
    lo = (first_q - window + 1).clamp(min=0) if window else torch.zeros_like(ctx)
    first_block = lo // block_size
    num_blocks = (ctx - 1) // block_size - first_block + 1

    decodes, paged_decodes = [], None
    decode_idx = torch.nonzero(q_lens == 1).flatten()
    if decode_idx.numel():
        nb = int(num_blocks[decode_idx].max())
        cols = (first_block[decode_idx, None] + torch.arange(nb)).clamp(max=tables.shape[1] - 1)
        blocks = torch.gather(tables[decode_idx], 1, cols)
        rows, offset = qs[decode_idx], first_block[decode_idx] * block_size
        if paged:
            paged_decodes = PagedDecodes(_rows(rows, device), blocks.to(device), (lo[decode_idx] - offset).to(device),
                                         (ctx[decode_idx] - offset).to(device))
        else:
            pos = offset[:, None] + torch.arange(nb * block_size)
            mask = ((pos >= lo[decode_idx, None]) & (pos < ctx[decode_idx, None]))[:, None, None, :]
            group = max(1, DECODE_GROUP_SLOTS // (nb * block_size))
            for g in range(0, len(rows), group):
                decodes.append(DecodePlan(_rows(rows[g:g + group], device), blocks[g:g + group].flatten().to(device),
                                          mask[g:g + group].to(device)))

    chunks = []
    for s in torch.nonzero(q_lens > 1).flatten().tolist():
        n, c, low, fb, nb = (int(x[s]) for x in (q_lens, ctx, lo, first_block, num_blocks))
        blocks = tables[s, fb:fb + nb]
        if bool((blocks == blocks[0] + torch.arange(nb)).all()):
            blocks = slice(int(blocks[0]), int(blocks[0]) + nb)     # consecutive blocks: a view, no copy
        else:
            blocks = blocks.to(device)
        mask = None
        if low != c - n or (window and window < n):
            kpos = torch.arange(low, c)
            qpos = torch.arange(c - n, c)
            mask = kpos[None, :] <= qpos[:, None]
            if window:
                mask &= kpos[None, :] > qpos[:, None] - window
            mask = mask.to(device)
        ids = tables[s, fb:fb + nb].to(device) if paged else None
        chunks.append(ChunkPlan(slice(int(qs[s]), int(qs[s + 1])), blocks, low - fb * block_size, c - low, mask, ids))
    return TorchAttentionPlan(decodes, chunks, paged_decodes)
