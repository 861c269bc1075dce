"""The load driver: plays a workload's arrival process against a target, the in-process engine or any
OpenAI-compatible server over HTTP (fastgen.driver.http.HttpTarget), with one protocol for both.

Requests are sent at their scheduled times (open loop) or when a client's previous request has finished (closed
loop); the driver waits on the target in between (the engine steps, or the client waits for streams to end).
Time comes from the target's clock, so an engine on a virtual clock is driven the same way. Closed-loop warm-ups
are sent like the others but labelled (request ids `warmup-<k>`, measured ones `0..N-1`) and left out of the
results and the progress bar.
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from tqdm import tqdm

from fastgen.step_stats import StepStats
from fastgen.request_trace import RequestTrace
from fastgen.workloads import Workload, WorkloadRequest


@dataclass
class RunResult:
    traces: list[RequestTrace]          # measured requests only, in workload order
    steps: list[StepStats]              # the engine's steps during the run (none over HTTP)
    start_time: float                   # the target's clock when the run began: the time origin of the files
    end_time: float
    start_unix_time: float = 0.0        # time.time() when it began (the origin as a date)
    clock_name: str = "wall"            # what the target's clock counts: wall, cpu (process CPU time) or virtual


class Target(Protocol):
    clock: Callable[[], float]

    def send(self, index: int, request_id: str, request: WorkloadRequest, send_time: float) -> None:
        """Sends workload request `index` (`send_time` on the target's clock: when it was due)."""

    def wait(self, until: float | None) -> list[tuple[int, RequestTrace]]:
        """Makes progress until some requests finish or the clock reaches `until` (None: until one finishes);
        returns the finished ones."""

    def busy(self) -> bool:
        """Are requests in flight?"""

    def steps(self) -> list[StepStats]: ...


def request_ids(workload: Workload) -> list[str]:
    """Measured requests are numbered from 0 in workload order; warm-ups are `warmup-<k>`."""
    warmups = set(workload.arrivals.warmup_indices)
    measured, warm, ids = 0, 0, []
    for i in range(len(workload.requests)):
        if i in warmups:
            ids.append(f"warmup-{warm}")
            warm += 1
        else:
            ids.append(str(measured))
            measured += 1
    return ids


def run_workload(target: Target, workload: Workload, progress: bool = True) -> RunResult:
    arrivals = workload.arrivals
    ids = request_ids(workload)
    warmups = set(arrivals.warmup_indices)
    start, start_unix = target.clock(), time.time()
    pending: list[tuple[float, int]] = [(t, i) for i, t in arrivals.initial_requests()]
    heapq.heapify(pending)
    first_step = len(target.steps())
    traces: dict[int, RequestTrace] = {}
    bar = tqdm(total=arrivals.total - len(warmups), desc="requests", unit="req", disable=not progress, smoothing=0)
    while pending or target.busy():
        while pending and pending[0][0] <= target.clock() - start:
            send, i = heapq.heappop(pending)
            target.send(i, ids[i], workload.requests[i], start + send)
        for i, trace in target.wait(start + pending[0][0] if pending else None):
            traces[i] = trace
            if i not in warmups:
                bar.update(1)
                bar.set_postfix(req_per_s=f"{bar.n / max(target.clock() - start, 1e-9):.2f}")
            for item in arrivals.on_finish(i, target.clock() - start):
                heapq.heappush(pending, (item[1], item[0]))
    bar.close()
    return RunResult([t for i, t in sorted(traces.items()) if i not in warmups], target.steps()[first_step:], start,
                     target.clock(), start_unix)
