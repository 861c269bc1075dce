"""Proposals of a drawn quality, for the simulator (executor=simulated), whose model has no distribution: its
logits are one column, so the target's token is always 0. Each request draws its acceptance rate a from
Beta(alpha, beta) (seeded by the request), and each of its proposals is 0 (accepted) with probability a, the first
that is not ending the run with token 1 (rejected). Verify chunks are then charged like any ragged chunk, and the
accepted runs follow the configured distribution. Greedy requests only (the simulator's workloads are)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fastgen.request import Request
from fastgen.speculative.base import Proposer, SpeculativeConfig, register_proposer


@dataclass
class SyntheticConfig(SpeculativeConfig):
    name: str = "synthetic"
    alpha: float = 3.0                   # per-request acceptance rate ~ Beta(alpha, beta): mean alpha/(alpha+beta)
    beta: float = 2.0
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if not (self.alpha > 0 and self.beta > 0):
            raise ValueError(f"speculative.alpha and speculative.beta must be > 0, got {self.alpha}, {self.beta}")


@register_proposer("synthetic", config=SyntheticConfig)
class SyntheticProposer(Proposer):
    def __init__(self, config: SyntheticConfig):
        super().__init__(config)
        self._rngs: dict[int, tuple[float, np.random.Generator]] = {}     # by seq_id: (its rate, its draws)

    def _rng(self, req: Request) -> tuple[float, np.random.Generator]:
        if req.seq_id not in self._rngs:
            key = zlib.crc32(f"{self.config.seed}/{req.request_id}/{req.index}".encode())
            rng = np.random.default_rng(key)
            self._rngs[req.seq_id] = (float(rng.beta(self.config.alpha, self.config.beta)), rng)
        return self._rngs[req.seq_id]

    def propose(self, requests: Sequence[Request], ks: Sequence[int]) -> list[list[int]]:
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
