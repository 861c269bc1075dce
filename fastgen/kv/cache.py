"""KVCache: the preallocated key/value block pools of every layer.

Layout: keys and values of layer l are `k[l]`, `v[l]` with shape [num_blocks, block_size, num_kv_heads, head_dim].
A sequence's token at position p lives in block `block_table[p // block_size]`, offset `p % block_size`. Which
blocks a sequence owns is decided by a KV manager (fastgen.kv); this class only holds the tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * dtype.itemsize


class KVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KV cache needs num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.spec, self.num_blocks, self.block_size = spec, num_blocks, block_size
        shape = (spec.num_layers, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]
