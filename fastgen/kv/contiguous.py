"""Contiguous KV: each request reserves prompt + max_new_tokens slots up front, in one run of blocks, as Orca and
FasterTransformer do. Kept for ablations: it wastes what a request reserves but never uses, and fragments."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastgen.config import KVConfig
from fastgen.kv.manager import KVManager, register_kv_manager
from fastgen.request import Request


@dataclass
class ContiguousKVConfig(KVConfig):
    name: str = "contiguous"


@register_kv_manager("contiguous", config=ContiguousKVConfig)
class ContiguousKVManager(KVManager):
    def __init__(self, config: ContiguousKVConfig, num_blocks: int):
        super().__init__(config, num_blocks)
        self.free_map = np.ones(num_blocks, dtype=bool)

    def _find_run(self, n: int) -> int | None:
        """First index of n consecutive free blocks (first fit), or None."""
        if n == 0:
            return 0
        free = np.concatenate(([0], self.free_map.view(np.int8), [0]))
        edges = np.flatnonzero(np.diff(free))
        starts, ends = edges[::2], edges[1::2]
        fit = np.flatnonzero(ends - starts >= n)
        return int(starts[fit[0]]) if fit.size else None

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        if req.seq_id in self.tables:
            return True
        return self._find_run(self.blocks_for(req.max_kv_tokens)) is not None

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        if req.seq_id not in self.tables:
            n = self.blocks_for(req.max_kv_tokens)
            start = self._find_run(n)
            if start is None:
                raise MemoryError(f"no run of {n} contiguous free KV blocks for request {req.request_id}")
            self.free_map[start:start + n] = False
            self.tables[req.seq_id] = list(range(start, start + n))
        self.tokens[req.seq_id] = req.num_computed_tokens + num_new_tokens

    def free(self, req: Request) -> None:
        self.free_map[self.tables.pop(req.seq_id, [])] = True
        self.tokens.pop(req.seq_id, None)

    @property
    def num_free_blocks(self) -> int:
        return int(self.free_map.sum())
