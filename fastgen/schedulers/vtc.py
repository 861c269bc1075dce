"""The Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language Models", arXiv 2401.00588), with
SplitFuse's token budget.

Each tenant has a counter of the weighted tokens it was served: `w_input` per prompt token, charged when its
request is admitted (once: recomputing after a preemption is not charged again), and `w_output` per output token,
charged in the step that produces it. Running decodes go first (one token each, as SplitFuse); prompts already
started continue; then, while budget and KV remain, the next request admitted is the earliest waiting one of the
backlogged tenant (one with a waiting request) whose counter is the smallest. A tenant that becomes backlogged
again has its counter lifted to the smallest counter of the backlogged tenants, or, when none is, to the counter
of the tenant that last left the queue (the paper's Algorithm 2), so a tenant cannot bank service while idle. It
is work-conserving: whenever there is budget and room, some backlogged tenant is served. The paper's bound: two
continuously backlogged tenants' services differ by at most 2 x max(w_input x L_input, w_output x M), L_input the
longest prompt and M the most tokens the batch holds (tests/test_class_policies.py measures it).

Simplifications: prompts are charged whole at admission while SplitFuse may compute them over several steps (as
the paper charges them), and a request that does not fit the pool stops admission for the step (as the paper's
can_add_new_request does).
"""
from __future__ import annotations

from dataclasses import dataclass

from fastgen.kv.manager import KVManager
from fastgen.request import Request
from fastgen.schedulers.base import SchedulerOutput, register_scheduler
from fastgen.schedulers.splitfuse import SplitFuseConfig, SplitFuseScheduler


@dataclass
class VTCConfig(SplitFuseConfig):
    name: str = "vtc"
    w_input: float = 1.0                 # counter cost of a prompt token
    w_output: float = 2.0                # counter cost of an output token

    def validate(self) -> None:
        super().validate()
        if not (self.w_input >= 0 and self.w_output >= 0 and self.w_input + self.w_output > 0):
            raise ValueError(f"scheduler.w_input and w_output must be >= 0 and not both 0, got {self.w_input}, "
                             f"{self.w_output}")


@register_scheduler("vtc", config=VTCConfig)
class VTCScheduler(SplitFuseScheduler):
    def __init__(self, config: VTCConfig, kv: KVManager):
        super().__init__(config, kv)
        self.counters: dict[str, float] = {}
        self._charged: set[int] = set()          # sequences whose prompt is charged
        self._last_left: str | None = None       # the tenant that last left the queue

    def backlogged(self) -> dict[str, Request]:
        """Each backlogged tenant's earliest waiting request (the queue's order: preempted requests first)."""
        heads: dict[str, Request] = {}
        for req in self.waiting:
            heads.setdefault(req.tenant, req)
        return heads

    def add_request(self, req: Request) -> None:
        queued = self.backlogged()
        if req.tenant not in queued:
            floor = (min(self.counters.get(t, 0.0) for t in queued) if queued
                     else self.counters.get(self._last_left, 0.0))
            self.counters[req.tenant] = max(self.counters.get(req.tenant, 0.0), floor)
        super().add_request(req)

    def schedule(self) -> SchedulerOutput:
        out = super().schedule()
        for c in out.chunks:
            if c.num_tokens == c.request.num_pending_tokens:         # this step samples its next token
                self.charge(c.request, self.config.w_output)
        return out

    def update_from_output(self, out: SchedulerOutput, *args, **kwargs) -> None:
        """Speculative decoding: a verify's accepted proposals are output tokens too (schedule() charged its one)."""
        for c in out.chunks:
            if c.num_accepted:
                self.charge(c.request, self.config.w_output * c.num_accepted)
        super().update_from_output(out, *args, **kwargs)

    def charge(self, req: Request, cost: float) -> None:
        self.counters[req.tenant] = self.counters.get(req.tenant, 0.0) + cost

    def schedule_prompts(self, out: SchedulerOutput, budget: int) -> int:
        for req in [r for r in self.running if not r.is_decode]:
            if budget < 1 or len(out.chunks) >= self.config.max_seqs:
                return budget
            n = min(req.num_pending_tokens, budget)
            if not self.reserve(req, n, out, preempt=False):
                return budget
            budget -= n
        while budget >= 1 and len(out.chunks) < self.config.max_seqs:
            heads = self.backlogged()
            if not heads:
                break
            tenant = min(heads, key=lambda t: (self.counters.get(t, 0.0), t))
            req = heads[tenant]
            n = min(req.num_pending_tokens, budget)
            if not self.kv.can_allocate(req, req.num_pending_tokens) or not self.reserve(req, n, out, preempt=False):
                break
            budget -= n
            if req.seq_id not in self._charged:
                self._charged.add(req.seq_id)
                self.charge(req, self.config.w_input * len(req.prompt_token_ids))
            if not any(r.tenant == tenant for r in self.waiting):
                self._last_left = tenant
        return budget

    def finish(self, req: Request) -> None:
        super().finish(req)
        self._charged.discard(req.seq_id)
