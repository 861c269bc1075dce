"""What attention needs to know about a ragged batch.

Sequence s owns query rows query_start[s]:query_start[s+1] of the flattened batch (its prompt chunk or its one
decode token). After this step's KV write it has context_lens[s] tokens of KV, the last of which are this step's
tokens, so query j of a sequence with n queries sits at position context_lens[s] - n + j. Its KV lives in the
blocks block_tables[s, :] (padded with 0 beyond the blocks it owns).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TorchAttentionPlan:
    """Gather indices and masks for the PyTorch attention path, shared by every layer of one step."""

    decode_rows: torch.Tensor | None          # [B] query rows of single-query sequences
    decode_slots: torch.Tensor | None         # [B, C] KV slots to gather for them
    decode_mask: torch.Tensor | None          # [B, 1, 1, C] bool, True = attend
    chunks: list[tuple[int, int, torch.Tensor, torch.Tensor | None]]  # (row start, row end, slots [C], mask [n, C])


@dataclass
class AttentionMetadata:
    query_start: torch.Tensor                 # [S+1] int32, cumulative query counts
    context_lens: torch.Tensor                # [S] int32, KV length of each sequence including this step
    block_tables: torch.Tensor                # [S, max_blocks] int32
    max_query_len: int
    max_context_len: int
    _plans: dict = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    def torch_plan(self, block_size: int, window: int | None) -> TorchAttentionPlan:
        key = (block_size, window)
        if key not in self._plans:
            self._plans[key] = _build_torch_plan(self, block_size, window)
        return self._plans[key]


def _slots(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat KV slot of each position; rows of block_tables broadcast against rows of positions."""
    blocks = torch.gather(block_tables.long(), 1, positions // block_size)
    return blocks * block_size + positions % block_size


def _build_torch_plan(meta: AttentionMetadata, block_size: int, window: int | None) -> TorchAttentionPlan:
    qs = meta.query_start.cpu()
    ctx = meta.context_lens.cpu().long()
    tables = meta.block_tables.cpu()
    device = meta.block_tables.device
    q_lens = qs[1:] - qs[:-1]
    decode_idx = torch.nonzero(q_lens == 1).flatten()

    decode_rows = decode_slots = decode_mask = None
    if decode_idx.numel():
        d_ctx = ctx[decode_idx]
        lo = (d_ctx - window).clamp(min=0) if window else torch.zeros_like(d_ctx)
        span = int((d_ctx - lo).max())
        pos = lo[:, None] + torch.arange(span)[None, :]                    # [B, span]
        valid = pos < d_ctx[:, None]
        pos = torch.where(valid, pos, torch.zeros_like(pos))
        decode_rows = qs[decode_idx].long().to(device)
        decode_slots = _slots(tables[decode_idx], pos, block_size).to(device)
        decode_mask = valid[:, None, None, :].to(device)

    chunks = []
    for s in torch.nonzero(q_lens > 1).flatten().tolist():
        n, c = int(q_lens[s]), int(ctx[s])
        first_q = c - n
        lo = max(0, first_q - window + 1) if window else 0
        kpos = torch.arange(lo, c)
        qpos = torch.arange(first_q, c)
        allowed = kpos[None, :] <= qpos[:, None]
        if window:
            allowed &= kpos[None, :] > qpos[:, None] - window
        slots = _slots(tables[s:s + 1], kpos[None, :], block_size)[0]
        chunks.append((int(qs[s]), int(qs[s + 1]), slots.to(device), allowed.to(device)))
    return TorchAttentionPlan(decode_rows, decode_slots, decode_mask, chunks)
