"""No speculation (the default): every decode computes one token per step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from fastgen.request import Request
from fastgen.speculative.base import Proposer, SpeculativeConfig, register_proposer


@dataclass
class NoSpeculationConfig(SpeculativeConfig):
    name: str = "none"
    num_speculative_tokens: int = 0

    def validate(self) -> None:
        if self.num_speculative_tokens:
            raise ValueError("speculative=none proposes nothing: choose a proposer (speculative=ngram) to set "
                             "speculative.num_speculative_tokens")


@register_proposer("none", config=NoSpeculationConfig)
class NoProposer(Proposer):
    def propose(self, requests: Sequence[Request], ks: Sequence[int]) -> list[list[int]]:
        return [[] for _ in requests]
