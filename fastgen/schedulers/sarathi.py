"""Sarathi-Serve stall-free batching: decodes first, then the ongoing partial prefills, then new prefills, each
in chunks of at most `chunk_size` tokens, until the step's `token_budget` is spent. KV is allocated per chunk;
a decode that finds no free block preempts the newest request, and so does a step in which partial
prefills hold the whole pool and nothing can run."""
from __future__ import annotations

from dataclasses import dataclass

from fastgen.config import check_positive
from fastgen.schedulers.base import Scheduler, SchedulerOutput, TokenBudgetConfig, register_scheduler


@dataclass
class SarathiConfig(TokenBudgetConfig):
    name: str = "sarathi"
    chunk_size: int = 512                # largest prefill chunk of one request

    def validate(self) -> None:
        super().validate()
        check_positive("scheduler", chunk_size=self.chunk_size)


@register_scheduler("sarathi", config=SarathiConfig)
class SarathiScheduler(Scheduler):
    def schedule(self) -> SchedulerOutput:
        return self.until_progress(self.plan)

    def plan(self, out: SchedulerOutput) -> None:
        budget = self.schedule_decodes(out, self.config.token_budget, preempt=True)
        for req in self.prefill_candidates():
            if budget < 1 or len(out.chunks) >= self.config.max_seqs:
                break
            n = min(req.num_pending_tokens, self.config.chunk_size, budget)
            if not self.reserve(req, n, out, preempt=False):
                break
            budget -= n
