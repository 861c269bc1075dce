"""Dynamic SplitFuse (DeepSpeed-FastGen): every forward pass carries about `token_budget` tokens.

Running decodes go first, one token each; prompt tokens then fill the rest of the budget exactly. A long prompt
is split across passes, short prompts are fused into one pass, and a prompt may be cut just to fill the budget.
As in DeepSpeed-MII, a prompt only starts when the KV pool can hold all of its remaining tokens (head-of-line),
a decode that finds no free block waits a step, and only when nothing at all can run is the newest request
preempted.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastgen.request import RequestStatus
from fastgen.schedulers.base import Scheduler, SchedulerOutput, TokenBudgetConfig, register_scheduler


@dataclass
class SplitFuseConfig(TokenBudgetConfig):
    name: str = "splitfuse"


@register_scheduler("splitfuse", config=SplitFuseConfig)
class SplitFuseScheduler(Scheduler):
    def schedule(self) -> SchedulerOutput:
        return self.until_progress(lambda out: self.schedule_prompts(
            out, self.schedule_decodes(out, self.config.token_budget, preempt=False)))

    def prompt_order(self):
        return self.prefill_candidates()

    def schedule_prompts(self, out: SchedulerOutput, budget: int) -> int:
        for req in self.prompt_order():
            if budget < 1 or len(out.chunks) >= self.config.max_seqs:
                break
            if req.status is RequestStatus.WAITING and not self.kv.can_allocate(req, req.num_pending_tokens):
                break
            n = min(req.num_pending_tokens, budget)
            if not self.reserve(req, n, out, preempt=False):
                break
            budget -= n
        return budget
