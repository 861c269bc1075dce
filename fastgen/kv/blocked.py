"""Paged KV: blocks from a shared pool, allocated on demand as tokens arrive (vLLM / DeepSpeed-FastGen), with
reference-counted blocks so that sequences can share them, and optional automatic prefix caching.

Sharing: a fork (n > 1, best_of) references its parent's blocks; a sequence about to write into a block it
shares (a partly filled last block), or into a cached block, first gets a copy of it (copy-on-write: a BlockCopy
the executor makes before the step's forward).

Prefix caching (`kv.prefix_caching=true`): every full block of computed KV is registered under a key of its token
ids and its prefix's key (a hash chain), so its content is findable; a waiting request takes the blocks of its
longest cached prefix instead of computing them, and its num_computed_tokens starts past them (at most all but
its last token, which must run to give a logit: when the whole request is cached, its last block is copied and
that one token recomputed). Blocks nobody references stay cached until an allocation finds no empty block and
evicts them, least recently released first. Partly filled blocks are never registered.

Swapping (a host pool of `num_host_blocks`, kv.swap_space_gb): a preempted request whose blocks it alone holds
can have them moved to host blocks (swap_out) and freed on the device; it keeps its computed tokens, and its next
allocation takes device blocks for them first and moves them back (swap-in). The moves are plain BlockSwap lists
for the executor (take_swaps); a host block a swap-in reads is free again only after that step's plan is taken,
so that a swap-out in the same step (made first) cannot overwrite it.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from fastgen.config import KVConfig
from fastgen.kv.allocator import BlockAllocator
from fastgen.kv.manager import KVManager, register_kv_manager
from fastgen.ragged import BlockCopy, BlockSwap
from fastgen.request import Request


@dataclass
class BlockedKVConfig(KVConfig):
    name: str = "blocked"
    prefix_caching: bool = False         # keep computed full blocks findable by content and reuse them


@dataclass
class _Plan:
    """What an allocation takes: the cached blocks a new sequence starts from, whether the block it first
    writes must be copied, how many blocks come out of the free pool in all."""

    hits: list[int]
    copy_on_write: bool
    new: int
    taken: int


@register_kv_manager("blocked", config=BlockedKVConfig)
class BlockedKVManager(KVManager):
    def __init__(self, config: BlockedKVConfig, num_blocks: int):
        super().__init__(config, num_blocks)
        self.allocator = BlockAllocator(num_blocks)
        self._registered: dict[int, int] = {}    # per sequence: leading blocks of its table already registered
        self._copies: list[BlockCopy] = []
        self._evictions_reported = 0
        self.swapped: dict[int, list[int]] = {}   # per swapped-out sequence: its host blocks, in table order
        self._free_host: deque[int] = deque()
        self._host_read: list[int] = []            # host blocks this step's swap-ins read: free after the step
        self._outs: list[BlockSwap] = []   # this step's swap-outs and swap-ins
        self._ins: list[BlockSwap] = []

    @property
    def caches_prefixes(self) -> bool:
        return self.config.prefix_caching

    # -- allocation ----------------------------------------------------------------------------------------------
    def _plan(self, req: Request, num_new_tokens: int) -> _Plan | None:
        """None when the cached prefix the request was planned from has been evicted since."""
        computed, table = req.num_computed_tokens, self.tables.get(req.seq_id)
        if req.seq_id in self.swapped:       # every block it had comes back from the host pool
            new = self.blocks_for(computed + num_new_tokens)
            return _Plan([], False, new, new)
        hits = []
        if table is None and computed:
            hits = self._match(req, self.blocks_for(computed))
            if len(hits) < self.blocks_for(computed):
                return None
        held = hits if table is None else table
        first = computed // self.block_size
        copy = computed % self.block_size != 0 and first < len(held) and not self._writable(held[first])
        new = max(0, self.blocks_for(computed + num_new_tokens) - len(held)) + copy
        return _Plan(hits, copy, new, new + sum(1 for b in hits if not self.allocator.refs[b]))

    def _writable(self, block: int) -> bool:
        """Only its one owner may write a block, and never one whose content others can find."""
        return self.allocator.refs[block] == 1 and not self.allocator.is_registered(block)

    def _new_blocks(self, req: Request, num_new_tokens: int) -> float:
        """Blocks the allocation would take from the free pool (inf: it cannot be made as planned)."""
        plan = self._plan(req, num_new_tokens)
        return math.inf if plan is None else plan.taken

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self._new_blocks(req, num_new_tokens) <= self.allocator.num_free

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        if not self.try_allocate(req, num_new_tokens):
            raise MemoryError(f"request {req.request_id} needs {self._new_blocks(req, num_new_tokens)} more KV "
                              f"blocks but only {self.allocator.num_free} are free")

    def try_allocate(self, req: Request, num_new_tokens: int) -> bool:
        seq, computed = req.seq_id, req.num_computed_tokens
        table, end = self.tables.get(seq), computed + num_new_tokens
        if table is not None and end <= len(table) * self.block_size and \
                (computed % self.block_size == 0 or self._writable(table[computed // self.block_size])):
            self.tokens[seq] = end      # the usual decode: its own blocks have room and it may write them (no plan)
            return True
        plan = self._plan(req, num_new_tokens)
        if plan is None:       # its cached prefix was evicted after it was planned: plan again from what is left
            req.num_computed_tokens = self.cached_prefix(req)
            return False
        if plan.taken > self.allocator.num_free:
            return False
        seq, computed = req.seq_id, req.num_computed_tokens
        if seq in self.swapped:
            self._swap_in(req)
        elif seq not in self.tables:
            self._admit(req, plan.hits)
        table = self.tables[seq]
        if plan.copy_on_write:
            i = computed // self.block_size
            (copy,) = self.allocator.allocate(1)
            self._copies.append(BlockCopy(table[i], copy))
            self.allocator.free([table[i]])
            table[i] = copy
            self._registered[seq] = min(self._registered[seq], i)
        table.extend(self.allocator.allocate(max(0, self.blocks_for(computed + num_new_tokens) - len(table))))
        self.tokens[seq] = computed + num_new_tokens
        return True

    def _admit(self, req: Request, hits: list[int]) -> None:
        for b in hits:
            self.allocator.acquire(b)
        self.tables[req.seq_id] = list(hits)
        self._registered[req.seq_id] = len(hits)
        c = self.counters
        c.prefix_query_tokens += req.num_tokens
        c.prefix_hit_tokens += req.num_computed_tokens
        c.prefix_query_blocks += req.num_tokens // self.block_size
        c.prefix_hit_blocks += len(hits)

    def free(self, req: Request) -> None:
        self.allocator.free(reversed(self.tables.pop(req.seq_id, [])))
        self.tokens.pop(req.seq_id, None)
        self._registered.pop(req.seq_id, None)
        self._free_host.extend(self.swapped.pop(req.seq_id, []))

    # -- swapping ------------------------------------------------------------------------------------------------
    def use_host_pool(self, num_blocks: int) -> None:
        super().use_host_pool(num_blocks)
        self._free_host = deque(range(num_blocks))

    def can_swap_out(self, req: Request) -> bool:
        table = self.tables.get(req.seq_id)
        return (table is not None and len(table) <= len(self._free_host)
                and all(self.allocator.refs[b] == 1 for b in table))

    def swap_out(self, req: Request) -> None:
        table = self.tables.pop(req.seq_id)
        host = [self._free_host.popleft() for _ in table]
        self._outs += map(BlockSwap, table, host)
        self.allocator.free(reversed(table))
        self.swapped[req.seq_id] = host
        self.tokens.pop(req.seq_id, None)
        self._registered.pop(req.seq_id, None)

    def _swap_in(self, req: Request) -> None:
        host = self.swapped.pop(req.seq_id)
        table = self.allocator.allocate(len(host))
        self._ins += map(BlockSwap, table, host)
        self._host_read += host
        self.tables[req.seq_id] = table
        self._registered[req.seq_id] = 0

    def is_swapped(self, req: Request) -> bool:
        return req.seq_id in self.swapped

    @property
    def num_free_host_blocks(self) -> int:
        return len(self._free_host) + len(self._host_read)

    def take_swaps(self) -> tuple[list[BlockSwap], list[BlockSwap]]:
        swaps = self._outs, self._ins
        self._outs, self._ins = [], []
        self._free_host.extend(self._host_read)
        self._host_read = []
        return swaps

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    # -- prefix caching ------------------------------------------------------------------------------------------
    def block_keys(self, req: Request, num_blocks: int) -> list[tuple]:
        """The keys of the request's first num_blocks full blocks: (hash of the previous block's key, the block's
        token ids). Kept on the request (they never change), so a preempted request reuses them."""
        keys, size = req.block_hashes, self.block_size
        while len(keys) < num_blocks:
            i = len(keys)
            keys.append((hash(keys[-1]) if keys else None, tuple(req.token_slice(i * size, size))))
        return keys

    def _match(self, req: Request, limit: int) -> list[int]:
        """The cached blocks of the request's longest cached prefix, at most `limit` of them."""
        hits = []
        for key in self.block_keys(req, min(limit, req.num_tokens // self.block_size)):
            block = self.allocator.lookup(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def cached_prefix(self, req: Request) -> int:
        if not self.config.prefix_caching:
            return 0
        hits = self._match(req, req.num_tokens // self.block_size)
        limit = req.num_tokens - 1       # its last token must run, to give a logit
        if req.needs_prompt_logits:      # cached positions give no logits: skip only those already scored
            limit = min(limit, len(req.prompt_logprobs))
        return min(len(hits) * self.block_size, limit)

    def computed(self, req: Request) -> None:
        """Registers the sequence's newly full blocks."""
        if not self.config.prefix_caching:
            return
        seq, table = req.seq_id, self.tables[req.seq_id]
        full, done = min(req.num_computed_tokens // self.block_size, len(table)), self._registered[seq]
        if full > done:
            keys = self.block_keys(req, full)
            for i in range(done, full):
                self.allocator.register(table[i], keys[i])
            self._registered[seq] = full

    def truncate(self, req: Request) -> None:
        """Blocks that hold only rejected tokens go back to the pool (last first). They were never registered in
        the prefix cache: only full blocks of computed tokens are."""
        super().truncate(req)
        table = self.tables.get(req.seq_id)
        keep = self.blocks_for(req.num_computed_tokens)
        if table is not None and len(table) > keep:
            self.allocator.free(reversed(table[keep:]))
            del table[keep:]
            self._registered[req.seq_id] = min(self._registered[req.seq_id], keep)

    # -- forks ---------------------------------------------------------------------------------------------------
    def fork(self, parent: Request, child: Request) -> bool:
        table = self.tables[parent.seq_id]
        for b in table:
            self.allocator.share(b)
        self.tables[child.seq_id] = list(table)
        self.tokens[child.seq_id] = self.tokens[parent.seq_id]
        self._registered[child.seq_id] = self._registered[parent.seq_id]
        return True

    def take_copies(self) -> list[BlockCopy]:
        copies, self._copies = self._copies, []
        return copies

    # -- reports -------------------------------------------------------------------------------------------------
    def take_counters(self) -> dict[str, int]:
        self.counters.kv_evictions = self.allocator.num_evictions - self._evictions_reported
        self._evictions_reported = self.allocator.num_evictions
        return super().take_counters()

    def usage(self) -> dict[str, int]:
        """Shared blocks count once: used slots are the distinct slots holding some sequence's tokens."""
        if self.allocator.num_shared_refs:
            filled: dict[int, int] = {}
            for seq, table in self.tables.items():
                n = self.tokens.get(seq, 0)
                for i, b in enumerate(table):
                    filled[b] = max(filled.get(b, 0), min(self.block_size, max(0, n - i * self.block_size)))
            used = sum(filled.values())
        else:
            used = sum(self.tokens.values())
        return {"kv_used_tokens": used, "kv_reserved_tokens": self.allocator.num_used * self.block_size,
                "kv_capacity_tokens": self.capacity_tokens, "kv_cached_blocks": self.allocator.num_cached}

