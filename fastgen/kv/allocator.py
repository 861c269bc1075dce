"""BlockAllocator: the pool of KV block ids, with a reference count per block and, for prefix caching, a cache of
computed full blocks by content. It knows nothing about requests.

Every block is in exactly one of three states, so `num_empty + num_cached + num_used == num_blocks` always:
- empty: no references and no content anyone can find;
- cached: no references, but registered under a key (its tokens and its prefix's), so a later request with the
  same prefix can take it back (`acquire`); cached blocks are evicted least recently released first, and only
  when no empty block is left;
- used: referenced by one or more sequences (forks and shared prefixes reference a block several times).
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Hashable, Iterable


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self._empty: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()    # unreferenced registered blocks, LRU first
        self._key_of: dict[int, Hashable] = {}                  # registered block -> its key
        self._block_of: dict[Hashable, int] = {}                # key -> registered block
        self.num_shared_refs = 0        # references beyond each block's first: 0 means no block is shared
        self.num_evictions = 0          # cached blocks given out again (their content lost), since the start

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: empty ones and, by evicting them, cached ones."""
        return len(self._empty) + len(self._cached)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self, n: int) -> list[int]:
        """n blocks, each referenced once: empty ones first, then the least recently released cached ones."""
        if n == 0:   # the common case: a decode token that lands in a block the sequence already has
            return []
        if n > self.num_free:
            raise MemoryError(f"asked for {n} KV blocks but only {self.num_free} of {self.num_blocks} are free")
        blocks = []
        for _ in range(n):
            if self._empty:
                b = self._empty.popleft()
            else:
                b, _ = self._cached.popitem(last=False)
                del self._block_of[self._key_of.pop(b)]
                self.num_evictions += 1
            self.refs[b] = 1
            blocks.append(b)
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Drops one reference to each block; a block nobody references becomes cached if registered, else empty.
        Blocks are released in the order given: pass a sequence's table last block first, so that its tail (the
        part least likely shared) is evicted first."""
        for b in blocks:
            if self.refs[b] < 1:
                raise ValueError(f"KV block {b} is freed but nobody references it")
            self.refs[b] -= 1
            if self.refs[b]:
                self.num_shared_refs -= 1
            elif b in self._key_of:
                self._cached[b] = None
            else:
                self._empty.append(b)

    def share(self, b: int) -> None:
        """One more reference to a used block (a fork reads the same prefix)."""
        if self.refs[b] < 1:
            raise ValueError(f"KV block {b} is shared but nobody references it")
        self.refs[b] += 1
        self.num_shared_refs += 1

    # -- the prefix cache -------------------------------------------------------------------------------------
    def lookup(self, key: Hashable) -> int | None:
        """The registered block holding `key`'s content, used or cached, or None."""
        return self._block_of.get(key)

    def acquire(self, b: int) -> None:
        """References a registered block found by lookup(), taking it out of the cached set if nobody held it."""
        if self.refs[b]:
            self.share(b)
        else:
            del self._cached[b]
            self.refs[b] = 1

    def register(self, b: int, key: Hashable) -> bool:
        """Makes a used, fully computed block findable under `key`; False if another block already holds that
        content (the first one stays the cached copy)."""
        if self.refs[b] < 1:
            raise ValueError(f"KV block {b} is registered but nobody references it")
        if key in self._block_of or b in self._key_of:
            return False
        self._block_of[key], self._key_of[b] = b, key
        return True

    def is_registered(self, b: int) -> bool:
        return b in self._key_of
