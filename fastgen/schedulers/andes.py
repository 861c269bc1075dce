"""Andes (Liu et al., arXiv 2404.16283): QoE-aware scheduling at token granularity, with SplitFuse's token budget.

Each request's user expects a timeline (fastgen.qoe: first token after ttft_s, then tds tokens/s; the request's
SLO, else this policy's `expected_ttft_s` / `expected_tds`). Every step Andes asks, for each request, how much
QoE it would lose if it were not served over the next `horizon_s`, per unit of the resource it holds (KV), and
serves requests greedily in that order, a knapsack solved greedily by value density, as the paper does (a request
that does not fit is skipped, not waited for): a request
whose delivered tokens are ahead of its timeline (its client's buffer holds what the reader needs for the horizon)
loses nothing by pausing and yields its budget; one that lags, or whose first token is due, takes budget first
and, when the pool is short, the KV of running requests of lower density (preempted; by recompute, or swapped to
host memory with preemption_mode=swap, as Andes does). Such preemptions are capped, as the paper caps preemption
frequency against thrashing: on average at most `preemption_cap` per request received so far (its P), and at most
`max_preemptions` in one step; the preemption that breaks a deadlock (nothing can run) is not counted.

A request's value: tokens it lags its expected timeline by at now + horizon_s (expected - delivered, >= 0), times
the horizon, over its expected area (fastgen.qoe.Expectation.expected_area): the QoE its area would lose by
waiting the horizon. Its weight: its context (prompt + generated tokens), the KV it holds or needs. Requests of
equal density (e.g. all ahead of schedule, density 0) run in arrival order, so the policy is work-conserving.

Simplifications, against the paper: (1) the output length is taken to be max_new_tokens (the paper predicts it);
(2) the step's token budget is SplitFuse's fixed `token_budget` (the paper chooses the batch size from a latency
model each step); (3) the QoE gain is the linear lag-times-horizon estimate above, not the difference of two
evaluated QoE curves; (4) the knapsack weight is the context length alone, and the greedy order is by value over
weight without the paper's per-step solver choice (its greedy variant).
"""
from __future__ import annotations

from dataclasses import dataclass

from fastgen.kv.manager import KVManager
from fastgen.qoe import EXPECTED_TDS, EXPECTED_TTFT_S, Expectation
from fastgen.request import Request
from fastgen.schedulers.base import Scheduler, SchedulerOutput, TokenBudgetConfig, register_scheduler
from fastgen.schedulers.preemption_cap import PreemptionCap


@dataclass
class AndesConfig(TokenBudgetConfig):
    name: str = "andes"
    expected_ttft_s: float = EXPECTED_TTFT_S  # a request's expected TTFT when its SLO has none
    expected_tds: float = EXPECTED_TDS        # its expected token delivery speed (tokens/s) when its SLO has no TPOT
    horizon_s: float = 1.0                    # how far ahead a request's QoE loss from waiting is judged
    max_preemptions: int = 4                  # requests preempted a step in favour of denser ones
    preemption_cap: float = 1.0               # ... and on average per request received, over the run (P)

    def validate(self) -> None:
        super().validate()
        for key in ("expected_ttft_s", "expected_tds", "horizon_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"scheduler.{key} must be > 0, got {getattr(self, key)}")
        if self.max_preemptions < 0 or self.preemption_cap < 0:
            raise ValueError(f"scheduler.max_preemptions and preemption_cap must be >= 0, got "
                             f"{self.max_preemptions}, {self.preemption_cap}")


@register_scheduler("andes", config=AndesConfig)
class AndesScheduler(Scheduler):
    def __init__(self, config: AndesConfig, kv: KVManager):
        super().__init__(config, kv)
        self.default = Expectation(config.expected_ttft_s, config.expected_tds)
        self._keys: dict[int, tuple] = {}        # this step's key of each request
        self.cap = PreemptionCap(config.preemption_cap)      # preemptions for denser requests

    def add_request(self, req: Request) -> None:
        self.cap.receive(req)
        super().add_request(req)

    def density(self, req: Request) -> float:
        """QoE the request loses by waiting horizon_s, per token of context."""
        expect, n = Expectation.of(req.slo, self.default), req.sampling.max_new_tokens
        due = expect.expected_tokens(req.arrival_time, self.now + self.config.horizon_s, n)
        lag = max(0, due - len(req.output_token_ids))
        return lag * self.config.horizon_s / expect.expected_area(n) / max(1, req.num_tokens)

    def key(self, req: Request) -> tuple:
        key = self._keys.get(req.seq_id)
        if key is None:
            key = self._keys[req.seq_id] = (-self.density(req), req.arrival_time, req.seq_id)
        return key

    def schedule(self) -> SchedulerOutput:
        self.now, self._keys = self.clock(), {}
        return self.until_progress(lambda out: self.schedule_by_key(out, self.config.token_budget, self.key,
                                                                    head_of_line=False))

    def worst_running(self, out: SchedulerOutput, key, worse_than: tuple | None = None) -> Request | None:
        """A victim for a denser request: only one of strictly lower density (never for a request that loses
        nothing by waiting), and at most max_preemptions a step."""
        if worse_than is None:
            return super().worst_running(out, key)
        cfg = self.config
        if worse_than[0] >= 0 or len(out.preempted) >= cfg.max_preemptions or not self.cap.allows():
            return None
        return self.cap.count(super().worst_running(out, key, (worse_than[0], float("inf"))))

    def victim(self, out: SchedulerOutput) -> Request | None:
        return super().worst_running(out, self.key)
