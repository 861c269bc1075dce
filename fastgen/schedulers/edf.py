"""Earliest deadline first over each request's SLO, with SplitFuse's token budget.

A request's deadline is that of its next token: arrival + slo.ttft_s for its first token, then first token's time
+ k x slo.tpot_s for token k (a request without a target has none, and runs after those that have, by arrival).
Each step serves running and waiting requests in deadline order (the shared `schedule_by_key`): a more urgent one
takes budget first and, when the pool is short, the KV of the least urgent running ones. Deadlines are read on
the engine's clock (`self.clock()`), so the policy runs unchanged on real and simulated time.

A request is late when it can no longer meet its SLO whatever happens next: its first token is past
arrival + ttft_s, or even its last token (max_new_tokens) would be past first + (max_new_tokens - 1) x tpot_s.
`late` says what becomes of it: `serve_last` (it runs after every request still on time) or `drop` (it ends at
once with finish_reason "deadline": the scheduler lets it go and frees its KV, and the engine ends it when it
reads the plan's `dropped` list).

In a tight pool, as for andes: a waiting request that cannot get KV is skipped, not left to stop the queue
(`schedule_by_key(..., head_of_line=False)`), and preemptions for a more urgent request are capped at
`preemption_cap` per request received (Andes' P). A running request's deadline moves closer as it waits, so without
both EDF preempts back and forth (priority-mix at 40 req/s, 120 KV blocks, simulated: 3,324 preemptions and 1.6
req/s with the cap alone, 3,765 and 2.0 req/s with the skip alone, 300 and 8.5 req/s with both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from fastgen.kv.manager import KVManager
from fastgen.request import Request
from fastgen.schedulers.base import Scheduler, SchedulerOutput, TokenBudgetConfig, register_scheduler
from fastgen.schedulers.preemption_cap import PreemptionCap

LATE = ("serve_last", "drop")


@dataclass
class EDFConfig(TokenBudgetConfig):
    name: str = "edf"
    late: str = "serve_last"             # what becomes of a request that can no longer meet its SLO: LATE
    preemption_cap: float = 1.0          # preemptions for a more urgent request, on average per request received

    def validate(self) -> None:
        super().validate()
        if self.late not in LATE:
            raise ValueError(f"scheduler.late must be one of {LATE}, got {self.late!r}")
        if self.preemption_cap < 0:
            raise ValueError(f"scheduler.preemption_cap must be >= 0, got {self.preemption_cap}")


@register_scheduler("edf", config=EDFConfig)
class EDFScheduler(Scheduler):
    now: float = 0.0

    def __init__(self, config: EDFConfig, kv: KVManager):
        super().__init__(config, kv)
        self.cap = PreemptionCap(config.preemption_cap)

    def add_request(self, req: Request) -> None:
        self.cap.receive(req)
        super().add_request(req)

    def deadline(self, req: Request) -> float:
        slo = req.slo
        if not req.trace.token_times:
            return req.arrival_time + slo.ttft_s if slo and slo.ttft_s is not None else math.inf
        if not slo or slo.tpot_s is None:
            return math.inf
        return req.trace.token_times[0] + len(req.output_token_ids) * slo.tpot_s

    def is_late(self, req: Request) -> bool:
        slo, times = req.slo, req.trace.token_times
        if slo is None:
            return False
        if not times:
            return slo.ttft_s is not None and self.now > req.arrival_time + slo.ttft_s
        return slo.tpot_s is not None and self.now > times[0] + (req.sampling.max_new_tokens - 1) * slo.tpot_s

    def key(self, req: Request) -> tuple:
        return self.is_late(req), self.deadline(req), req.arrival_time, req.seq_id

    def schedule(self) -> SchedulerOutput:
        self.now = self.clock()

        def plan(out: SchedulerOutput) -> None:
            if self.config.late == "drop":
                for req in [r for r in self.running + list(self.waiting) if self.is_late(r)]:
                    self.drop(req, "deadline", out)
            self.schedule_by_key(out, self.config.token_budget, self.key, head_of_line=False)
        return self.until_progress(plan)

    def worst_running(self, out: SchedulerOutput, key, worse_than: tuple | None = None) -> Request | None:
        """A victim for a more urgent request, while preemptions stay within preemption_cap per request received."""
        if worse_than is None:
            return super().worst_running(out, key)
        return self.cap.count(super().worst_running(out, key, worse_than)) if self.cap.allows() else None

    def victim(self, out: SchedulerOutput) -> Request | None:
        return super().worst_running(out, self.key)
