"""Dynamic SplitFuse (DeepSpeed-FastGen): every forward pass carries about `token_budget` tokens.

Running decodes go first, one token each; prompt tokens then fill the rest of the budget exactly. A long prompt
is split across passes, short prompts are fused into one pass, and a prompt may be cut just to fill the budget.
As in DeepSpeed-MII, a prompt only starts when the KV pool can hold all of its remaining tokens (head-of-line),
a decode that finds no free block waits a step, and only when nothing at all can run is the newest request
preempted.

With speculative decoding, proposal slots share the budget with prompt chunks: by default they take what prompts
leave (speculation never delays a prompt), at most `max_speculative_tokens` a step; `speculate_first` grants them
before prompts instead. With `adaptive_speculation`, each request's k follows its running acceptance rate a (the
j-th proposal of a run is kept with probability about a^j): it proposes while a^j >= `min_acceptance`, and below
that speculation is off for it, except for one probe every `probe_every` decode steps, so a request whose output
starts to copy its prompt turns it back on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from fastgen.request import Request, RequestStatus
from fastgen.schedulers.base import Scheduler, SchedulerOutput, TokenBudgetConfig, register_scheduler


@dataclass
class SplitFuseConfig(TokenBudgetConfig):
    name: str = "splitfuse"
    max_speculative_tokens: int = 256    # proposal slots per step, at most (speculative decoding's share)
    speculate_first: bool = False        # proposal slots before prompt chunks (default: after, from what is left)
    adaptive_speculation: bool = True    # k per request from its acceptance rate; off when it does not pay
    min_acceptance: float = 0.3          # a proposal is worth its slot while it is kept with at least this chance
    probe_every: int = 16                # a request with speculation off still tries it once every so many decodes

    def validate(self) -> None:
        super().validate()
        if self.max_speculative_tokens < 0 or self.probe_every < 1 or not 0 < self.min_acceptance < 1:
            raise ValueError("scheduler needs max_speculative_tokens >= 0, probe_every >= 1 and min_acceptance in "
                             f"(0, 1), got {self.max_speculative_tokens}, {self.probe_every}, {self.min_acceptance}")


@register_scheduler("splitfuse", config=SplitFuseConfig)
class SplitFuseScheduler(Scheduler):
    def schedule(self) -> SchedulerOutput:
        return self.until_progress(self.plan)

    def plan(self, out: SchedulerOutput) -> None:
        budget = self.schedule_decodes(out, self.config.token_budget, preempt=False, speculate=False)
        speculative = min(budget, self.config.max_speculative_tokens)
        if self.config.speculate_first:
            budget -= self.schedule_speculation(out, speculative)
        budget = self.schedule_prompts(out, budget)
        if not self.config.speculate_first:
            self.schedule_speculation(out, min(budget, speculative))

    def speculation_k(self, req: Request) -> int:
        k = super().speculation_k(req)
        if not (k and self.config.adaptive_speculation):
            return k
        stats, floor = req.speculation, self.config.min_acceptance
        if stats.acceptance < floor:                     # off for this request, but for a probe now and then
            stats.skipped += 1
            return k if stats.skipped % self.config.probe_every == 0 else 0
        if stats.acceptance < 1:
            k = min(k, max(1, int(math.log(floor) / math.log(stats.acceptance))))
        return k

    def prompt_order(self):
        return self.prefill_candidates()

    def schedule_prompts(self, out: SchedulerOutput, budget: int) -> int:
        if budget < 1 or len(out.chunks) >= self.config.max_seqs:    # no room: the candidates need not be listed
            return budget
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
