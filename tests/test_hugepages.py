"""The KV pools on a CPU live on memory advised as transparent huge pages (fastgen.hugepages), and still behave as
torch.zeros: zero-filled, writable, each its own memory."""
from __future__ import annotations

import os

import pytest
import torch

from fastgen import hugepages
from fastgen.kv.cache import KVCache
from fastgen.model_spec import ModelSpec


def advised_huge(t: torch.Tensor) -> bool:
    """Whether the mapping holding t's memory was advised MADV_HUGEPAGE: "hg" among its VmFlags in /proc/self/smaps
    (whatever the machine's THP mode)."""
    address, inside = t.data_ptr(), False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return "hg" in line.split()[1:]
    return False


def test_zeros_are_zero_writable_and_separate():
    a = hugepages.huge_zeros((3, 5, 7), torch.float32)
    b = hugepages.huge_zeros((3, 5, 7), torch.float32)
    assert a.shape == (3, 5, 7) and a.dtype == torch.float32 and not a.any()
    a[1, 2] = 4.0
    assert a.sum() == 28.0 and not b.any()
    assert hugepages.huge_zeros((2, 3), torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages on this machine")
def test_cpu_kv_pools_are_advised_as_huge_pages():
    spec = ModelSpec(model_type="llama", num_layers=2, hidden=64, intermediate=96, num_heads=4, num_kv_heads=2,
                     head_dim=16, vocab_size=211, max_positions=256, windows=(None, None), tied_embeddings=False)
    cache = KVCache(spec, 2048, 16, torch.float32)   # 8 MiB per pool
    assert advised_huge(cache.k) and advised_huge(cache.v)
    if not os.environ.get("THP_MEM_ALLOC_ENABLE"):   # with it, torch advises its own large allocations too
        assert not advised_huge(torch.zeros(1 << 20))
    k, v = cache.layer(0)
    assert k.shape == (2048, 16, spec.kv_heads_per_device(1), spec.head_dim) and not k.any() and not v.any()
