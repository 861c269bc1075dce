"""KVCache: the preallocated key/value block pools of every layer.

Layout: keys and values of layer l are `layer(l)`, each with shape [num_blocks, block_size, num_kv_heads, head_dim],
views whose memory is head-major: `k[l]` is [num_kv_heads, num_blocks, block_size, head_dim], so that one KV head's
keys of a block, and of a gathered run of blocks, are one contiguous [tokens, head_dim] matrix: the PyTorch
backend's attention then runs 1.06-1.16x faster on CPU (decode_phase2.md); kernels that read the pools through
their strides (Triton's) see no difference. On a CPU the pools live on transparent huge pages (fastgen.hugepages).
A sequence's token at position p lives in block `block_table[p // block_size]`, offset `p % block_size`. Which
blocks a sequence owns is decided by a KV manager (fastgen.kv); this class only holds the tensors.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fastgen.hugepages import huge_zeros
from fastgen.model_spec import ModelSpec


class KVCache:
    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", tensor_parallel: int = 1, host_blocks: int = 0):
        """`host_blocks`: the host pool preempted requests' blocks are swapped to (pinned when the device is a GPU,
        so that the copies can overlap)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KV cache needs num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (spec.num_layers, spec.kv_heads_per_device(tensor_parallel), num_blocks, block_size, spec.head_dim)
        # Zero-filled: attention reads whole blocks and masks the slots past a context, which must stay finite. On
        # a CPU, on huge pages (fastgen.hugepages says why).
        if torch.device(device).type == "cpu":
            self.k, self.v = huge_zeros(shape, dtype), huge_zeros(shape, dtype)
        else:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        host = (*shape[:2], host_blocks, *shape[3:])
        pin = self.k.device.type == "cuda"
        self.host_k = torch.zeros(host, dtype=dtype, device="cpu", pin_memory=pin)
        self.host_v = torch.zeros(host, dtype=dtype, device="cpu", pin_memory=pin)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i].permute(1, 2, 0, 3), self.v[i].permute(1, 2, 0, 3)

    @property
    def block_bytes(self) -> int:
        """Keys and values of one block in every layer."""
        return 2 * self.k[:, :, 0].numel() * self.k.element_size()

    def read_blocks(self, blocks: Sequence[int]) -> torch.Tensor:
        """A copy of these blocks' keys and values, [2, layers, kv heads, blocks, block_size, head_dim] (moving a
        request's KV to another engine's cache: write_blocks there)."""
        index = torch.tensor(list(blocks), dtype=torch.int64, device=self.k.device)
        return torch.stack([self.k[:, :, index], self.v[:, :, index]])

    def write_blocks(self, blocks: Sequence[int], contents: torch.Tensor) -> None:
        expected = (2, *self.k.shape[:2], len(blocks), *self.k.shape[3:])
        if tuple(contents.shape) != expected:
            raise ValueError(f"KV contents of shape {tuple(contents.shape)} do not fit {len(blocks)} blocks of this "
                             f"cache {expected}: the engines must run the same model with the same kv.block_size")
        index = torch.tensor(list(blocks), dtype=torch.int64, device=self.k.device)
        contents = contents.to(self.k.device, self.k.dtype)
        self.k[:, :, index] = contents[0]
        self.v[:, :, index] = contents[1]

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copies each (src, dst) block's keys and values in every layer (copy-on-write of a shared block)."""
        src, dst = (torch.tensor(ids, dtype=torch.int64, device=self.k.device) for ids in zip(*copies))
        self.k[:, :, dst] = self.k[:, :, src]
        self.v[:, :, dst] = self.v[:, :, src]

    def swap(self, moves: Sequence[tuple[int, int]], to_host: bool) -> None:
        """Moves each (device block, host block)'s keys and values in every layer to the host pool (to_host) or
        back to the device."""
        device, host = (torch.tensor(ids, dtype=torch.int64) for ids in zip(*moves))
        on_device = device.to(self.k.device)
        for pool, host_pool in ((self.k, self.host_k), (self.v, self.host_v)):
            if to_host:
                host_pool[:, :, host] = pool[:, :, on_device].cpu()
            else:
                pool[:, :, on_device] = host_pool[:, :, host].to(pool.device, non_blocking=True)
