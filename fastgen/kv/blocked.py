"""Paged KV: blocks from a shared pool, allocated on demand as tokens arrive (vLLM / DeepSpeed-FastGen)."""
from __future__ import annotations

from dataclasses import dataclass

from fastgen.config import KVConfig
from fastgen.kv.allocator import BlockAllocator
from fastgen.kv.manager import KVManager, register_kv_manager
from fastgen.request import Request


@dataclass
class BlockedKVConfig(KVConfig):
    name: str = "blocked"


@register_kv_manager("blocked", config=BlockedKVConfig)
class BlockedKVManager(KVManager):
    def __init__(self, config: BlockedKVConfig, num_blocks: int):
        super().__init__(config, num_blocks)
        self.allocator = BlockAllocator(num_blocks)

    def _new_blocks(self, req: Request, num_new_tokens: int) -> int:
        held = len(self.tables.get(req.request_id, ()))
        return max(0, self.blocks_for(req.num_computed_tokens + num_new_tokens) - held)

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self._new_blocks(req, num_new_tokens) <= self.allocator.num_free

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        if not self.try_allocate(req, num_new_tokens):
            raise MemoryError(f"request {req.request_id} needs {self._new_blocks(req, num_new_tokens)} more KV "
                              f"blocks but only {self.allocator.num_free} are free")

    def try_allocate(self, req: Request, num_new_tokens: int) -> bool:
        need = self._new_blocks(req, num_new_tokens)
        if need > self.allocator.num_free:
            return False
        self.tables.setdefault(req.request_id, []).extend(self.allocator.allocate(need))
        self.tokens[req.request_id] = req.num_computed_tokens + num_new_tokens
        return True

    def free(self, req: Request) -> None:
        self.allocator.free(self.tables.pop(req.request_id, []))
        self.tokens.pop(req.request_id, None)

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free
