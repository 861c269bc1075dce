"""KVManager: which KV blocks each sequence owns. Schedulers ask it whether a request can grow and how much of a
waiting request's prompt is already cached; the engine asks it for block tables, tells it what each step computed
and which sequences fork, and passes its block copies on to the executor. It never touches tensors (the executor
holds those).

A new manager is one file (here, or anywhere named by `kv.module`) with a `@register_kv_manager("name",
config=MyConfig)` subclass of KVManager, plus conf/kv/name.yaml whose defaults list names `name_schema`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import ClassVar

from fastgen.config import KVConfig
from fastgen.ragged import BlockCopy, BlockSwap
from fastgen.registry import Registry
from fastgen.request import Request

KV_MANAGERS: Registry["KVManager"] = Registry("kv", "fastgen.kv", KVConfig)
register_kv_manager = KV_MANAGERS.register


def make_kv_manager(config: KVConfig, num_blocks: int, num_host_blocks: int = 0) -> "KVManager":
    """The manager `config` names, over a pool of `num_blocks` blocks (the executor's) and a host pool of
    `num_host_blocks` that preempted requests' blocks can be swapped to (the executor's; 0: no swapping)."""
    manager = KV_MANAGERS.resolve(config)(config, num_blocks)
    manager.use_host_pool(num_host_blocks)
    return manager


@dataclass
class PrefixCacheCounters:
    """What prefix caching saved, counted when requests are admitted (a preempted request counts again when it
    comes back) and reset by each step's report. Hit rates: hit / query."""

    prefix_query_tokens: int = 0     # tokens of admitted requests (prompt, plus generated ones when recomputing)
    prefix_hit_tokens: int = 0       # ... of which were found cached and not computed again
    prefix_query_blocks: int = 0     # full blocks of admitted requests
    prefix_hit_blocks: int = 0       # ... of which were found cached
    kv_evictions: int = 0            # cached blocks given out again


class KVManager(ABC):
    name: ClassVar[str]
    Config: ClassVar[type[KVConfig]] = KVConfig

    def __init__(self, config: KVConfig, num_blocks: int):
        if num_blocks < 1 or config.block_size < 1:
            raise ValueError(f"KV pool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, "
                             f"{config.block_size}")
        self.config = config
        self.num_blocks, self.block_size = num_blocks, config.block_size
        self.num_host_blocks = 0
        self.tables: dict[int, list[int]] = {}     # by Request.seq_id
        self.tokens: dict[int, int] = {}           # KV slots in use (computed + scheduled) per sequence
        self.counters = PrefixCacheCounters()

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
        return self.tables[req.seq_id]

    # -- prefix caching and forks: a manager without them keeps these defaults --------------------------------
    @property
    def caches_prefixes(self) -> bool:
        """Does cached_prefix() ever find anything? (Schedulers skip asking when not.)"""
        return False

    def cached_prefix(self, req: Request) -> int:
        """How many of a waiting request's leading tokens are cached, so that it need not compute them (at most
        all but its last token: the last one must run to give a logit). The scheduler sets the request's
        num_computed_tokens to this before planning; allocate() then takes the cached blocks."""
        return 0

    def computed(self, req: Request) -> None:
        """The engine's note that a step computed req's tokens up to req.num_computed_tokens."""

    def truncate(self, req: Request) -> None:
        """Speculative decoding's rollback: req keeps only the KV of its first num_computed_tokens tokens (the
        slots of rejected proposals are free again)."""
        if req.seq_id in self.tokens:
            self.tokens[req.seq_id] = req.num_computed_tokens

    def fork(self, parent: Request, child: Request) -> bool:
        """Gives `child` (a copy of `parent` at the same length) the parent's KV; False if this manager cannot
        share it, and the child recomputes its tokens instead."""
        return False

    def take_copies(self) -> list[BlockCopy]:
        """Block copies the next step must make before its forward (copy-on-write), once."""
        return []

    # -- swapping to host memory: a manager without it keeps these defaults (preemption then recomputes) ----------
    def use_host_pool(self, num_blocks: int) -> None:
        """A host pool of num_blocks blocks (the executor's) to swap preempted requests' blocks to."""
        self.num_host_blocks = num_blocks

    def can_swap_out(self, req: Request) -> bool:
        """Can the request's blocks move to the host pool (room there, and blocks it alone holds)?"""
        return False

    def swap_out(self, req: Request) -> None:
        """Moves the request's blocks to the host pool and frees them on the device; it keeps its computed tokens
        and its next allocation swaps them back in first."""
        raise NotImplementedError(f"kv={self.name} cannot swap")

    def is_swapped(self, req: Request) -> bool:
        return False

    @property
    def num_free_host_blocks(self) -> int:
        return self.num_host_blocks

    def take_swaps(self) -> tuple[list[BlockSwap], list[BlockSwap]]:
        """The block moves the next step must make, once: (swap-outs, made first; swap-ins, made after the
        block copies)."""
        return [], []

    def take_counters(self) -> dict[str, int]:
        """The prefix-cache counters since the last call (a step's), reset."""
        counters, self.counters = self.counters, PrefixCacheCounters()
        return asdict(counters)

    def usage(self) -> dict[str, int]:
        """Used vs reserved slots: their gap is the memory a policy wastes (fragmentation, over-reservation);
        blocks kept only as a prefix cache are counted apart."""
        reserved = sum(len(t) for t in self.tables.values()) * self.block_size
        return {"kv_used_tokens": sum(self.tokens.values()), "kv_reserved_tokens": reserved,
                "kv_capacity_tokens": self.capacity_tokens, "kv_cached_blocks": 0}
