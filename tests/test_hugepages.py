"""The KV pools on a CPU live on memory advised as transparent huge pages (fastgen.hugepages), and still behave as
torch.zeros: zero-filled, writable, each its own memory."""
from __future__ import annotations

import pytest
import torch

from fastgen import hugepages
from fastgen.kv.cache import KVCache
from fastgen.model_spec import ModelSpec


def advised_huge(t: torch.Tensor) -> bool:
    """Whether the mapping holding t's memory is eligible for transparent huge pages (/proc/self/smaps)."""
    address, eligible, inside = t.data_ptr(), None, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "THPeligible:":
                eligible = line.split()[1] == "1"
    return bool(eligible)


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
    assert not advised_huge(torch.zeros(1 << 20))   # torch's own allocation is not, without THP_MEM_ALLOC_ENABLE
    k, v = cache.layer(0)
    assert k.shape == (2048, 16, spec.kv_heads_per_device(1), spec.head_dim) and not k.any() and not v.any()
