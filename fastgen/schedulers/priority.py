"""vLLM v1's priority policy with SplitFuse's token budget: requests run in order of (priority, arrival) — lower
priority values first, as vLLM's — and a more urgent request that cannot get KV preempts the least urgent running
ones (by recompute; they go back to the queue and keep every token they produced).

Every step walks the running and waiting requests together in that order: each takes one decode token or as many
prompt tokens as the budget leaves, so a more urgent prompt is served before less urgent decodes, which then wait
with their KV kept (they lose the budget, not their KV). A waiting request that cannot start even after preempting
every less urgent running request stops the queue, as in vLLM. Differences from vLLM v1: vLLM walks its running
requests first and preempts only when one of them cannot get a block; here a waiting request more urgent than a
running one preempts it too (the arrival of an urgent request into a full engine is served at once), and the
budget is SplitFuse's (decodes and prompt chunks fused into `token_budget` tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

from fastgen.request import Request
from fastgen.schedulers.base import Scheduler, SchedulerOutput, TokenBudgetConfig, register_scheduler


@dataclass
class PriorityConfig(TokenBudgetConfig):
    name: str = "priority"


@register_scheduler("priority", config=PriorityConfig)
class PriorityScheduler(Scheduler):
    @staticmethod
    def key(req: Request) -> tuple:
        return req.priority, req.arrival_time, req.seq_id

    def schedule(self) -> SchedulerOutput:
        return self.until_progress(lambda out: self.schedule_by_key(out, self.config.token_budget, self.key))

    def victim(self, out: SchedulerOutput) -> Request | None:
        return self.worst_running(out, self.key)
