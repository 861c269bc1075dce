"""Proposals of a drawn quality, for the simulator (executor=simulated), whose model has no distribution: its
logits are one column, so the target's token is always 0. Each request draws its acceptance rate a from
Beta(alpha, beta), or from the rates measured on the real engine (`acceptance=measured:<name or path>`, see
fastgen.sim.acceptance), seeded by the request, and each of its proposals is 0 (accepted) with probability a, the
first that is not ending the run with token 1 (rejected). Verify chunks are then charged like any ragged chunk, and
the accepted runs follow the configured distribution. With `draft_model` (a model fastgen.sim.shapes knows, or a
model source), proposing costs what a draft model would on the target's device: k sequential decode steps over the
granted sequences (batch: those still proposing at that step; context: each one's tokens so far), predicted by the
simulator's cost model and slept on its clock, so they count in the step's time and its draft_s. Greedy requests
only (the simulator's workloads are)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from fastgen.request import Request
from fastgen.sim.acceptance import MeasuredAcceptance
from fastgen.sim.cost_model import CostModel
from fastgen.sim.shapes import model_spec
from fastgen.sim.work import BatchShape
from fastgen.speculative.base import Proposer, SpeculativeConfig, register_proposer


@dataclass
class SyntheticConfig(SpeculativeConfig):
    name: str = "synthetic"
    alpha: float = 3.0                   # per-request acceptance rate ~ Beta(alpha, beta): mean alpha/(alpha+beta)
    beta: float = 2.0
    seed: int = 0
    acceptance: str = "beta"             # "beta" (alpha, beta above) or "measured:<name or path>" (measured rates)
    draft_model: Optional[str] = None    # charge proposals by this model's decode steps (None: they cost nothing)

    def validate(self) -> None:
        super().validate()
        if not (self.alpha > 0 and self.beta > 0):
            raise ValueError(f"speculative.alpha and speculative.beta must be > 0, got {self.alpha}, {self.beta}")
        if self.acceptance != "beta" and not self.acceptance.startswith(MEASURED):
            raise ValueError(f"speculative.acceptance must be 'beta' or '{MEASURED}<name or path>', "
                             f"got {self.acceptance!r}")


MEASURED = "measured:"


@register_proposer("synthetic", config=SyntheticConfig)
class SyntheticProposer(Proposer):
    def __init__(self, config: SyntheticConfig):
        super().__init__(config)
        self._rngs: dict[int, tuple[float, np.random.Generator]] = {}     # by seq_id: (its rate, its draws)
        measured = config.acceptance.startswith(MEASURED)
        self.measured = MeasuredAcceptance.load(config.acceptance[len(MEASURED):]) if measured else None
        self.draft_cost: CostModel | None = None
        self._clock = None

    def attach(self, executor) -> None:
        if self.config.draft_model is None:
            return
        if not isinstance(getattr(executor, "cost", None), CostModel):
            raise ValueError(f"speculative.draft_model charges a simulated draft model's time: it needs "
                             f"executor=simulated, not {type(executor).__name__}; use speculative=draft to run one")
        self.draft_cost, self._clock = executor.cost.of_model(model_spec(self.config.draft_model)), executor.clock

    def draft_seconds(self, context_lens: Sequence[int], ks: Sequence[int]) -> float:
        """The draft model's k sequential decode steps: step j runs the sequences proposing more than j tokens, each
        reading its context so far plus the j tokens it has proposed."""
        ctx, ks = np.asarray(context_lens, dtype=np.float64), np.asarray(ks)
        seconds = 0.0
        for j in range(int(ks.max(initial=0))):
            active = ctx[ks > j] + j
            seconds += self.draft_cost.step_time(BatchShape.of(np.ones(active.size), active))
        return seconds

    def _rng(self, req: Request) -> tuple[float, np.random.Generator]:
        if req.seq_id not in self._rngs:
            key = zlib.crc32(f"{self.config.seed}/{req.request_id}/{req.index}".encode())
            rng = np.random.default_rng(key)
            rate = rng.choice(self.measured.rates) if self.measured else rng.beta(self.config.alpha, self.config.beta)
            self._rngs[req.seq_id] = (float(rate), rng)
        return self._rngs[req.seq_id]

    def propose(self, requests: Sequence[Request], ks: Sequence[int]) -> list[list[int]]:
        if self.draft_cost is not None:
            self._clock.sleep(self.draft_seconds([r.num_tokens for r in requests], ks))
        out = []
        for req, k in zip(requests, ks):
            if not req.sampling.greedy:
                out.append([])
                continue
            rate, rng = self._rng(req)
            kept = rng.random(k) < rate
            accepted = int(k if kept.all() else np.argmin(kept))
            out.append([0] * accepted + [1] * (k > accepted))
        return out

    def release(self, request: Request) -> None:
        self._rngs.pop(request.seq_id, None)
