"""Naive continuous batching, as vLLM did before chunked prefill: prefill-first.

When waiting prompts fit, a step runs only whole prompts (as many as fit the token budget; a prompt longer than
the budget runs alone); otherwise it runs only decodes. New prompts therefore pause ongoing generation, which
is the stall Dynamic SplitFuse removes. A decode that finds no free block preempts the newest request.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastgen.schedulers.base import Scheduler, SchedulerOutput, TokenBudgetConfig, register_scheduler


@dataclass
class ContinuousConfig(TokenBudgetConfig):
    name: str = "continuous"
    token_budget: int = 8192             # prompt tokens per prefill step
    max_seqs: int = 256


@register_scheduler("continuous", config=ContinuousConfig)
class ContinuousBatchingScheduler(Scheduler):
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.token_budget
        for req in list(self.waiting):
            n = req.num_pending_tokens
            if len(out.chunks) >= self.config.max_seqs or (out.chunks and n > budget):
                break
            if not self.reserve(req, n, out, preempt=False):
                break
            budget -= n
        if not out:
            self.schedule_decodes(out, budget=len(self.running), preempt=True)
            self.schedule_speculation(out)
        return out
