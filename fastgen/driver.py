"""Driver: plays a workload against the engine in real time.

Requests enter the engine at their scheduled send times (open loop) or when a client's previous request has
finished (closed loop); the engine steps whenever it has work and the driver sleeps until the next send
otherwise. Time comes from the engine's clock, so an engine on a virtual clock is driven the same way.
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass

from tqdm import tqdm

from fastgen.engine import LLMEngine
from fastgen.sampling import SamplingParams
from fastgen.trace import RequestTrace
from fastgen.workloads import Workload


@dataclass
class RunResult:
    traces: list[RequestTrace]          # measured requests only (closed-loop warm-ups left out)
    steps: list[dict]
    start_time: float
    end_time: float


def run_workload(engine: LLMEngine, workload: Workload, progress: bool = True, sleep=None) -> RunResult:
    """`sleep` defaults to the engine clock's own (a virtual clock advances itself) or else time.sleep."""
    sleep = sleep or getattr(engine.clock, "sleep", time.sleep)
    arrivals = workload.arrivals
    start = engine.clock()
    pending: list[tuple[float, int]] = [(t, i) for i, t in arrivals.initial_requests()]
    heapq.heapify(pending)
    index_of: dict[str, int] = {}
    first_step = len(engine.steps)
    bar = tqdm(total=arrivals.total, desc="requests", unit="req", disable=not progress, smoothing=0)
    done = 0
    while pending or engine.has_unfinished():
        now = engine.clock() - start
        while pending and pending[0][0] <= now:
            send, i = heapq.heappop(pending)
            req = workload.requests[i]
            rid = engine.add_request(req.prompt_token_ids, SamplingParams(max_new_tokens=req.max_new_tokens,
                                                                          ignore_eos=True),
                                     request_id=f"w{i}", arrival_time=start + send)
            index_of[rid] = i
        if not engine.has_unfinished():
            sleep(max(0.0, pending[0][0] - (engine.clock() - start)))
            continue
        for out in engine.step():
            if out.finished:
                done += 1
                bar.update(1)
                bar.set_postfix(req_per_s=f"{done / max(engine.clock() - start, 1e-9):.2f}")
                for item in arrivals.on_finish(index_of[out.request_id], engine.clock() - start):
                    heapq.heappush(pending, (item[1], item[0]))
    bar.close()
    warmups = set(arrivals.warmup_indices)
    traces = {index_of[rid]: engine.requests[rid].trace for rid in index_of}
    return RunResult([t for i, t in sorted(traces.items()) if i not in warmups], engine.steps[first_step:], start,
                     engine.clock())
