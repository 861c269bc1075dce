"""KVManager: which KV blocks each request owns. Schedulers ask it whether a request can grow; the engine asks it
for block tables. It never touches tensors (the executor holds those).

A new manager is one file (here, or anywhere named by `kv.module`) with a `@register_kv_manager("name",
config=MyConfig)` subclass of KVManager, plus conf/kv/name.yaml whose defaults list names `name_schema`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from fastgen.config import KVConfig
from fastgen.registry import Registry
from fastgen.request import Request

KV_MANAGERS: Registry["KVManager"] = Registry("kv", "fastgen.kv", KVConfig)
register_kv_manager = KV_MANAGERS.register


def make_kv_manager(config: KVConfig, num_blocks: int) -> "KVManager":
    """The manager `config` names, over a pool of `num_blocks` blocks (the executor's)."""
    return KV_MANAGERS.resolve(config)(config, num_blocks)


class KVManager(ABC):
    name: ClassVar[str]
    Config: ClassVar[type[KVConfig]] = KVConfig

    def __init__(self, config: KVConfig, num_blocks: int):
        if num_blocks < 1 or config.block_size < 1:
            raise ValueError(f"KV pool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, "
                             f"{config.block_size}")
        self.config = config
        self.num_blocks, self.block_size = num_blocks, config.block_size
        self.tables: dict[str, list[int]] = {}
        self.tokens: dict[str, int] = {}       # KV slots in use (computed + scheduled) per request

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def fits_ever(self, req: Request) -> bool:
        """Could the request finish if it had the whole pool to itself?"""
        return self.blocks_for(req.max_kv_tokens) <= self.num_blocks

    @abstractmethod
    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Can the request hold num_computed_tokens + num_new_tokens tokens of KV?"""

    @abstractmethod
    def allocate(self, req: Request, num_new_tokens: int) -> None: ...

    def try_allocate(self, req: Request, num_new_tokens: int) -> bool:
        """allocate() if can_allocate(); one call because schedulers ask this for every token of every step."""
        if not self.can_allocate(req, num_new_tokens):
            return False
        self.allocate(req, num_new_tokens)
        return True

    @abstractmethod
    def free(self, req: Request) -> None: ...

    @property
    @abstractmethod
    def num_free_blocks(self) -> int: ...

    def block_table(self, req: Request) -> list[int]:
        return self.tables[req.request_id]

    def usage(self) -> dict[str, int]:
        """Used vs reserved slots: their gap is the memory a policy wastes (fragmentation, over-reservation)."""
        reserved = sum(len(t) for t in self.tables.values()) * self.block_size
        return {"kv_used_tokens": sum(self.tokens.values()), "kv_reserved_tokens": reserved,
                "kv_capacity_tokens": self.capacity_tokens}
