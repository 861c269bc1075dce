"""KV connectors: how a request's KV contents move from the engine that ran its prompt to the engine that decodes
it (disaggregated prefill and decode; vLLM's name for the seam). The engines export and import plain data
(fastgen.handoff.Handoff); the executors read and write the contents; a connector carries them between the two.

- `copy`: both engines in one process: the contents read from one cache (a copy) are written into the other.
- `process`: the engines in two processes: the handoff and its contents go through a torch.multiprocessing queue,
  whose tensors travel in shared memory (no serialisation of the contents).
- `simulated`: no contents (simulated executors hold none); the transfer takes `Link.seconds(nbytes)` on the
  virtual clock: latency + bytes / bandwidth, per device pair (tensor-parallel shards move in parallel), fitted
  to Vidur's measured send/recv times within a node (NVLink; fastgen.calibration.measured) or the machine's
  datasheet link between nodes (hardware.sim.internode_*).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Link:
    """A point-to-point link: a message of n bytes takes latency_s + n / (bandwidth_gbs x 1e9) seconds."""

    latency_s: float
    bandwidth_gbs: float

    def __post_init__(self):
        if not (self.latency_s >= 0 and self.bandwidth_gbs > 0):
            raise ValueError(f"a link needs latency >= 0 and bandwidth > 0, got {self.latency_s} s and "
                             f"{self.bandwidth_gbs} GB/s")

    def seconds(self, nbytes: float, parallel: int = 1) -> float:
        """Moving nbytes split evenly over `parallel` such links at once (one per tensor-parallel shard)."""
        return self.latency_s + nbytes / parallel / (self.bandwidth_gbs * 1e9)


class CopyConnector:
    """Engines in one process: the contents read out of one cache are already a copy; they go as they are."""

    name = "copy"

    def move(self, contents: torch.Tensor | None) -> torch.Tensor | None:
        return contents

    def seconds(self, nbytes: int) -> float | None:
        """None: the move is timed on the clock it runs on."""
        return None


class SimulatedConnector:
    """Simulated engines: nothing moves; the transfer costs the link's time on the virtual clock."""

    name = "simulated"

    def __init__(self, link: Link, parallel: int = 1):
        self.link, self.parallel = link, parallel

    def move(self, contents: torch.Tensor | None) -> None:
        return None

    def seconds(self, nbytes: int) -> float:
        return self.link.seconds(nbytes, self.parallel)


class ProcessConnector:
    """One direction between two processes: send() in one, recv() in the other. Made before the processes start
    (it holds a torch.multiprocessing queue); a tensor put on it moves to shared memory once and is read there."""

    name = "process"

    def __init__(self, context: Any = None):
        import torch.multiprocessing as tmp
        self._queue = (context or tmp.get_context("spawn")).Queue()

    def send(self, message: Any, contents: torch.Tensor | None = None) -> None:
        if contents is not None:
            contents.share_memory_()
        self._queue.put((message, contents))

    def recv(self, timeout: float | None = None) -> tuple[Any, torch.Tensor | None]:
        """The next (message, contents); queue.Empty after `timeout` seconds without one."""
        return self._queue.get(timeout=timeout)

    def close(self) -> None:
        self._queue.close()

