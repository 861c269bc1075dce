"""RaggedBatch: the one input every model's forward pass takes.

All tokens scheduled in a step, from all sequences, are flattened into one batch. Each sequence contributes one
contiguous run: a prompt chunk of any length or a single decode token, starting at position `start` (the number
of its tokens whose KV is already cached). The batch carries where each new token's K/V goes (`slot_mapping`),
what attention needs to read each sequence's history (`attn`), and which rows get logits (`logits_indices`: the
last scheduled token of each sequence, or every token of a chunk that asks for them (`SeqChunk.all_logits`, for
prompt logprobs); nothing else goes through the LM head). A sequence may carry pad tokens after its own
(SeqChunk.num_pad): they run through the model like the others, and nothing of them is kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch

from fastgen.kernels.metadata import AttentionMetadata


@dataclass
class SeqChunk:
    """One sequence's share of a step: its new tokens, where they start, and the KV blocks it owns. `all_logits`
    asks for the logits of every token of the chunk (prompt logprobs), not only of its last one. `num_pad` pad
    tokens follow the tokens (a prompt padded to the longest of its batch, as vLLM 0.2 does): they are computed like
    the others, but their outputs are thrown away and their KV is not kept."""

    token_ids: Sequence[int]
    start: int
    block_table: Sequence[int]
    all_logits: bool = False
    num_pad: int = 0
    constrained: bool = False      # its token is sampled under a grammar (structured output) this step

    @property
    def num_logits(self) -> int:
        return len(self.token_ids) if self.all_logits else 1


class BlockCopy(NamedTuple):
    """Copy KV block `src` into block `dst` (every layer) before the step's forward: copy-on-write of a block
    that sequences share (a fork's partly filled last block, or a cached block about to be written)."""

    src: int
    dst: int


class BlockSwap(NamedTuple):
    """Move a KV block (every layer) between the device pool and the host pool: out of device block `device` into
    host block `host` (a preempted request's KV swapped out), or back (swapped in). A step makes its swap-outs
    first, then its block copies, then its swap-ins, then its forward."""

    device: int
    host: int


@dataclass
class RaggedBatch:
    input_ids: torch.Tensor        # [T] int64
    positions: torch.Tensor        # [T] int64
    slot_mapping: torch.Tensor     # [T] int64
    logits_indices: torch.Tensor   # [sum of chunks' num_logits] int64, in chunk order
    attn: AttentionMetadata

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def build(cls, chunks: Sequence[SeqChunk], block_size: int, device: torch.device | str = "cpu",
              pad_block: int | None = None) -> "RaggedBatch":
        """`pad_block`: a KV block no sequence owns, where pad tokens (SeqChunk.num_pad) write their KV and which
        stands in for the blocks their positions would need; needed only when some chunk has pad tokens."""
        if not chunks:
            raise ValueError("a ragged batch needs at least one sequence")
        real = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=len(chunks))
        if (real < 1).any():
            raise ValueError("every sequence in a ragged batch must contribute at least one token")
        pads = np.fromiter((c.num_pad for c in chunks), dtype=np.int64, count=len(chunks))
        if pads.any() and pad_block is None:
            raise ValueError("chunks with pad tokens need a scratch KV block for them (pad_block)")
        lens = real + pads
        starts = np.fromiter((c.start for c in chunks), dtype=np.int64, count=len(chunks))
        ctx = starts + lens
        blocks_needed = -(-ctx // block_size)
        tables = np.zeros((len(chunks), max(int(blocks_needed.max()), max(len(c.block_table) for c in chunks), 1)),
                          dtype=np.int64)
        for i, c in enumerate(chunks):
            if len(c.block_table) * block_size < starts[i] + real[i]:
                raise ValueError(f"sequence {i} needs {starts[i] + real[i]} KV slots but owns {len(c.block_table)} "
                                 f"blocks of {block_size}")
            tables[i, :len(c.block_table)] = c.block_table
            if pads[i]:      # positions of pad tokens past the owned blocks read the scratch block
                tables[i, len(c.block_table):blocks_needed[i]] = pad_block
        query_start = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum(lens, out=query_start[1:])
        seq_of_token = np.repeat(np.arange(len(chunks)), lens)
        positions = np.arange(int(query_start[-1])) - np.repeat(query_start[:-1] - starts, lens)
        slots = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
        if pads.any():
            # Pad tokens come after each sequence's real ones; causal attention keeps them out of the real tokens'
            # outputs, and their KV goes to the scratch block, never to a block a sequence owns.
            is_pad = positions >= (starts + real)[seq_of_token]
            slots[is_pad] = pad_block * block_size + positions[is_pad] % block_size
            input_ids = np.zeros(int(query_start[-1]), dtype=np.int64)
            input_ids[~is_pad] = np.fromiter((t for c in chunks for t in c.token_ids), dtype=np.int64,
                                             count=int(real.sum()))
        else:
            input_ids = np.fromiter((t for c in chunks for t in c.token_ids), dtype=np.int64,
                                    count=int(query_start[-1]))
        logits_indices = query_start[1:] - 1 - pads      # each sequence's last real token
        if any(c.all_logits for c in chunks):
            wanted = np.zeros(int(query_start[-1]), dtype=bool)
            for i in np.flatnonzero(np.fromiter((c.all_logits for c in chunks), dtype=bool, count=len(chunks))):
                wanted[query_start[i]:query_start[i] + real[i]] = True
            wanted[logits_indices] = True
            logits_indices = np.flatnonzero(wanted)

        def tensor(a: np.ndarray, dtype=torch.int64) -> torch.Tensor:
            return torch.from_numpy(a).to(device=device, dtype=dtype)

        attn = AttentionMetadata(query_start=tensor(query_start, torch.int32), context_lens=tensor(ctx, torch.int32),
                                 block_tables=tensor(tables, torch.int32), max_query_len=int(lens.max()),
                                 max_context_len=int(ctx.max()))
        return cls(input_ids=tensor(input_ids), positions=tensor(positions), slot_mapping=tensor(slots),
                   logits_indices=tensor(logits_indices), attn=attn)
