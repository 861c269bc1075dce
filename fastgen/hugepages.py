"""Zero-filled CPU tensors on transparent huge pages (2 MiB), for the memory a decode step reads at random: the KV
block pools.

Why: a decode step reads each sequence's blocks wherever they lie in a pool of hundreds of MiB. On 4 KiB pages
every 16 KiB block of one KV head crosses four pages, each a TLB miss and a page walk before the first line
arrives. Measured side by side on a 2-core AVX-512 EPYC (experiments/results/cpu_attention), the same kernel read
blocks at random 1.19-1.26x faster from a pool on huge pages, and the model's weights (read front to back, where
the hardware prefetcher already runs ahead) within 5% either way, so only the pools take them.

Most Linux machines set transparent huge pages to `madvise` (a region gets them when asked for), which torch's
allocator does not do unless THP_MEM_ALLOC_ENABLE=1 is set before its first allocation (and then for every
allocation of 2 MiB or more, each step's temporaries included). Here the pool is its own private anonymous mapping
with MADV_HUGEPAGE; where that is unavailable (not Linux, THP `never`), it is plain torch.zeros.
"""
from __future__ import annotations

import math
import mmap
from pathlib import Path

import torch

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether a region advised MADV_HUGEPAGE can get huge pages here: Linux with THP `always` or `madvise`."""
    try:
        mode = THP_MODE.read_text()
    except OSError:
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and "[never]" not in mode


def huge_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled CPU tensor whose memory is advised to the kernel as huge pages (torch.zeros where they are not
    available). The mapping lives as long as the tensor (torch.frombuffer holds it)."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if not available() or nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # private: anonymous THP
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:         # a kernel or sandbox that refuses the advice: plain pages, still zeros
        pass
    return torch.frombuffer(region, dtype=dtype, count=numel).view(shape)   # anonymous memory reads as zeros
