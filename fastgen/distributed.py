"""Tensor parallelism as one rank sees it: which shard of a model it builds, and the collectives its layers call.

A model is built for a rank inside `building(TensorParallel(rank, size))`: its parallel layers
(fastgen.models.layers) read the rank and the world size at construction, keep only that rank's share of each
weight (`Split`), and call `all_reduce` / `gather_to_first` over the process group torch.distributed was initialised
with (fastgen.executors.workers starts it). A model built outside the context has size 1: its layers are plain
ones, no collective runs, and the single-device path is unchanged.

Every collective a layer calls is timed here (`COMM`), so a step's share of time in all-reduce can be reported
and the simulator's all-reduce term fitted from a real run (fastgen.calibration.calibrate).
"""
from __future__ import annotations

import contextvars
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    """This process's rank among `size` tensor-parallel ranks."""

    rank: int = 0
    size: int = 1


_CURRENT: contextvars.ContextVar[TensorParallel] = contextvars.ContextVar("tensor_parallel", default=TensorParallel())


def current() -> TensorParallel:
    """The rank a layer being constructed now belongs to (size 1 outside `building`)."""
    return _CURRENT.get()


@contextmanager
def building(tp: TensorParallel) -> Iterator[TensorParallel]:
    """Layers constructed inside keep `tp.rank`'s shard of a model split over `tp.size` ranks."""
    if not 0 <= tp.rank < tp.size:
        raise ValueError(f"rank {tp.rank} is outside a tensor-parallel group of {tp.size}")
    token = _CURRENT.set(tp)
    try:
        yield tp
    finally:
        _CURRENT.reset(token)


@dataclass(frozen=True)
class Split:
    """How one block of a weight's rows (or columns) is divided over the ranks: `units` units of `unit` rows each
    (attention heads of head_dim rows, or single features), each rank keeping units / size consecutive ones. With
    `replicate` and fewer units than ranks, each unit is kept whole by size / units ranks instead (KV heads, as
    vLLM replicates them). `what` names the quantity in errors."""

    units: int
    unit: int = 1
    what: str = "features"
    replicate: bool = False

    def check(self, size: int) -> None:
        if self.units % size == 0 or (self.replicate and self.units < size and size % self.units == 0):
            return
        hint = (f"; with fewer {self.what} than ranks, the ranks must be a multiple of them" if self.replicate
                else "")
        raise ValueError(f"{self.what}={self.units} cannot be split over hardware.tensor_parallel={size} ranks: "
                         f"choose a tensor_parallel that divides it{hint}")

    def local_units(self, size: int) -> int:
        self.check(size)
        return max(1, self.units // size)

    def local(self, size: int) -> int:
        """Rows one rank keeps."""
        return self.local_units(size) * self.unit

    def start(self, rank: int, size: int) -> int:
        """First row of `rank`'s share within the block."""
        units = self.local_units(size)
        first = rank // (size // self.units) if self.units < size else rank * units
        return first * self.unit

    @property
    def total(self) -> int:
        return self.units * self.unit


@dataclass(frozen=True)
class Slice:
    """Rows `start:start + size` of a full (unsharded) tensor along `dim`, stored at `dest_offset` of the same
    dimension of a rank's parameter: what the weight loader copies for one rank."""

    dim: int
    start: int
    size: int
    dest_offset: int = 0


@dataclass
class CommStats:
    """Time rank 0's layers spent in collectives (waiting for the slowest rank included). With `record`, each
    all-reduce's (bytes, seconds) too, for fitting the simulator's all-reduce term."""

    seconds: float = 0.0
    calls: int = 0
    record: bool = False
    samples: list[tuple[int, float]] = field(default_factory=list)

    def reset(self, record: bool | None = None) -> None:
        self.seconds, self.calls = 0.0, 0
        self.samples.clear()
        if record is not None:
            self.record = record


COMM = CommStats()


def _timed(op, x: torch.Tensor, record: bool) -> None:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    op()
    sync()
    seconds = time.perf_counter() - start
    COMM.seconds += seconds
    COMM.calls += 1
    if record and COMM.record:
        COMM.samples.append((x.numel() * x.element_size(), seconds))


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums `x` over the tensor-parallel ranks, in place."""
    _timed(lambda: dist.all_reduce(x), x, record=True)
    return x


def gather_to_first(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Rank 0 gets every rank's `x` concatenated along `dim`; the other ranks get their own `x` back (only rank 0
    samples)."""
    if dist.get_rank() != 0:
        _timed(lambda: dist.gather(x, None, dst=0), x, record=False)
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    _timed(lambda: dist.gather(x, parts, dst=0), x, record=False)
    return torch.cat(parts, dim=dim)
