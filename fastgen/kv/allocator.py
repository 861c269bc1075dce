"""BlockAllocator: hands out KV block ids from a fixed pool. It knows nothing about requests."""
from __future__ import annotations

from collections import deque


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n == 0:   # the common case: a decode token that lands in a block the sequence already has
            return []
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks but only {len(self._free)} of {self.num_blocks} are free")
        blocks = [self._free.popleft() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"KV block {b} is freed but was not allocated")
            self._used.remove(b)
            self._free.append(b)
