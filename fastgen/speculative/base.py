"""The proposer interface: a decoding sequence's tokens in, up to k guessed next tokens out.

A proposer sits beside the executor, below the engine: the scheduler grants a decode some proposal slots (tokens of
the step's budget), the engine asks the proposer to fill them for those sequences only, and the executor runs each
such sequence as one chunk of its last token and its proposals, whose logits verify them (fastgen.sampling's
Sampler.verify). A proposer reads plain token ids and never sees the target model's tensors.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Sequence

from fastgen.config import PartConfig
from fastgen.registry import Registry
from fastgen.request import Request


@dataclass
class SpeculativeConfig(PartConfig):
    """Knobs every proposer has; a proposer's own config subclasses this beside it."""

    num_speculative_tokens: int = 4      # k: the most tokens proposed for one sequence in one step

    def validate(self) -> None:
        if self.num_speculative_tokens < 0:
            raise ValueError(f"speculative.num_speculative_tokens must be >= 0, got {self.num_speculative_tokens}")


class Proposer(ABC):
    name: ClassVar[str]
    Config: ClassVar[type[SpeculativeConfig]] = SpeculativeConfig

    def __init__(self, config: SpeculativeConfig):
        self.config = config

    @property
    def k(self) -> int:
        """The most tokens this proposer proposes per sequence and step (0: it never speculates)."""
        return self.config.num_speculative_tokens

    @abstractmethod
    def propose(self, requests: Sequence[Request], ks: Sequence[int]) -> list[list[int]]:
        """For each request, at most `ks[i]` guessed tokens to follow its tokens so far (fewer, or none, when it has
        no good guess)."""

    def release(self, request: Request) -> None:
        """The request has left the engine (a proposer with per-sequence state frees it)."""

    def attach(self, executor) -> None:
        """The executor the target model runs on (a proposer that charges its own time on the simulator's clock
        reads its device and clock there)."""


PROPOSERS: Registry[Proposer] = Registry("speculative", "fastgen.speculative", SpeculativeConfig)
register_proposer = PROPOSERS.register


def make_proposer(config: SpeculativeConfig, executor=None) -> Proposer | None:
    """The proposer `config` names, beside `executor`, or None when it never proposes (speculative=none, or k = 0)."""
    proposer = PROPOSERS.resolve(config)(config)
    if not proposer.k:
        return None
    if executor is not None:
        proposer.attach(executor)
    return proposer
