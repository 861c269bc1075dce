"""KV connectors: how a request's KV contents move from the engine that ran its prompt to the engine that decodes
it (disaggregated prefill and decode; vLLM's name for the seam). The engines export and import plain data
(fastgen.handoff.Handoff); the executors read and write the contents; a connector carries them between the two.

- `copy`: both engines in one process: the contents read from one cache (a copy) are written into the other.
- `process`: the engines in two processes: the handoff and its contents go through a pipe, the contents in shared
  memory (torch.multiprocessing: no serialisation of the contents); fastgen.engine_process carries every call to an
  engine in another process this way.
- `simulated`: no contents (simulated executors hold none); the transfer takes `Link.seconds(nbytes)` on the
  virtual clock: latency + bytes / bandwidth, per device pair (tensor-parallel shards move in parallel), fitted
  to Vidur's measured send/recv times within a node (NVLink; fastgen.calibration.measured) or the machine's
  datasheet link between nodes (hardware.sim.internode_*).
"""
from __future__ import annotations

from dataclasses import dataclass
import queue
from typing import Any

import torch
import torch.multiprocessing as tmp      # registers the reductions that send tensors through shared memory


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
    """One direction between two processes: send() in one, recv() in the other, over a pipe made before the
    processes start. A tensor sent moves to shared memory once and only its handle crosses (torch.multiprocessing);
    a message is pickled by its sender, so one that cannot be fails there, not silently on the way."""

    name = "process"

    def __init__(self, context: Any = None):
        self.reader, self._writer = (context or tmp.get_context("spawn")).Pipe(duplex=False)

    def send(self, message: Any, contents: torch.Tensor | None = None) -> None:
        if contents is not None:
            contents.share_memory_()
        self._writer.send((message, contents))

    def poll(self, timeout: float = 0.0) -> bool:
        """Whether a message is waiting (after up to `timeout` seconds)."""
        return self.reader.poll(timeout)

    def recv(self, timeout: float | None = None) -> tuple[Any, torch.Tensor | None]:
        """The next (message, contents); queue.Empty after `timeout` seconds without one."""
        if timeout is not None and not self.reader.poll(timeout):
            raise queue.Empty
        return self.reader.recv()

    def close(self) -> None:
        self.reader.close()
        self._writer.close()
