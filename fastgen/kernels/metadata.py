"""What attention needs to know about a ragged batch, whatever the backend.

Sequence s owns query rows query_start[s]:query_start[s+1] of the flattened batch (its prompt chunk or its one
decode token). After this step's KV write it has context_lens[s] tokens of KV, the last of which are this step's
tokens, so query j of a sequence with n queries sits at position context_lens[s] - n + j. Its KV lives in the
blocks block_tables[s, :] (padded with 0 beyond the blocks it owns).

A backend may derive per-step state from it once, before the layers run (its `prepare` hook); that state lives in
`prepared`, keyed by what the backend needs (the PyTorch backend keys its attention plans by window and by whether
decodes are read in place).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    query_start: torch.Tensor                 # [S+1] int32, cumulative query counts
    context_lens: torch.Tensor                # [S] int32, KV length of each sequence including this step
    block_tables: torch.Tensor                # [S, max_blocks] int32
    max_query_len: int
    max_context_len: int
    prepared: dict = field(default_factory=dict, repr=False)   # a backend's per-step state (see its prepare)

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]
