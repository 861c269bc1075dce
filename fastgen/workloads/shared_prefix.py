"""Workloads whose prompts share prefixes, so that a prefix cache has something to find: a system prompt that
requests start with, and multi-turn conversations whose every turn resends the history.

`workload.prefix.share` of the mean prompt length is a system prompt (one of `num_prefixes`, drawn per
conversation); the rest of each first prompt is the user's message, so the prompt length distribution stays
`workload.prompt` and only how much of it is shared changes. A conversation has `turns` requests: turn k+1's
prompt is turn k's prompt, a stand-in for its reply (random or corpus tokens of turn k's output length: the real
reply is only known at run time, so the cache finds turn k's prompt but not the reply's tokens, as when a client
re-tokenizes the reply differently) and a new user message drawn like the first. Turn k+1 is sent `think_s` after
turn k finishes; conversations start as `workload.arrival` says (closed-loop clients run one conversation at a
time, an open-loop process gives their start times).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .arrivals import ArrivalProcess, Send
from .lengths import LengthSpec


@dataclass
class SharedPrefixSpec:
    """Shared prefixes of a synthetic workload; the defaults (share 0, one turn) leave every prompt unique."""

    share: float = 0.0          # fraction of the mean prompt length that is a system prompt requests share
    num_prefixes: int = 1       # distinct system prompts; each conversation draws one uniformly
    turns: int = 1              # requests per conversation; each turn resends the earlier turns and replies
    think_s: float = 0.0        # seconds between a turn's end and the conversation's next turn

    @property
    def active(self) -> bool:
        return self.share > 0 or self.turns > 1

    def validate(self, num_requests: int) -> None:
        if not 0 <= self.share < 1:
            raise ValueError(f"workload.prefix.share must be in [0, 1) (the shared part of the mean prompt), got "
                             f"{self.share}")
        if self.num_prefixes < 1 or self.turns < 1:
            raise ValueError(f"workload.prefix.num_prefixes and .turns must be >= 1, got {self.num_prefixes} and "
                             f"{self.turns}")
        if self.think_s < 0:
            raise ValueError(f"workload.prefix.think_s must be >= 0 seconds, got {self.think_s}")
        if num_requests % self.turns:
            raise ValueError(f"workload.num_requests ({num_requests}) must be a multiple of workload.prefix.turns "
                             f"({self.turns}): every conversation has that many turns")


def mean_length(spec: LengthSpec) -> float:
    return (spec.low + spec.high) / 2 if spec.dist == "uniform" else spec.mean


class ConversationArrivals:
    """Requests in conversations of `turns`: `conversations` (an arrival process over conversations) says when
    each starts; turn k+1 (request index conversation * turns + k) is sent `think_s` after turn k finishes."""

    def __init__(self, conversations: ArrivalProcess, turns: int, think_s: float = 0.0):
        self.conversations, self.turns, self.think_s = conversations, turns, think_s
        self.total = conversations.total * turns

    @property
    def warmup_indices(self) -> range:
        return range(len(self.conversations.warmup_indices) * self.turns)

    def _first_turns(self, sends: list[Send]) -> list[Send]:
        return [(c * self.turns, t) for c, t in sends]

    def initial_requests(self) -> list[Send]:
        return self._first_turns(self.conversations.initial_requests())

    def on_finish(self, request_index: int, now: float) -> list[Send]:
        conversation, turn = divmod(request_index, self.turns)
        if turn + 1 < self.turns:
            return [(request_index + 1, now + self.think_s)]
        return self._first_turns(self.conversations.on_finish(conversation, now))


def conversation_prompts(spec: SharedPrefixSpec, prompt: LengthSpec, lengths: Sequence[int],
                         outputs: Sequence[int], make_prompt: Callable[[int], list[int]],
                         rng: np.random.Generator) -> list[list[int]]:
    """The prompts of len(lengths) requests, conversation by conversation (`spec.turns` each): request i's new
    message brings its prompt to lengths[i] tokens on a first turn; outputs[i] is the length of its reply."""
    shared = round(spec.share * mean_length(prompt))
    systems = [make_prompt(shared) if shared else [] for _ in range(spec.num_prefixes)]
    which = rng.integers(spec.num_prefixes, size=len(lengths) // spec.turns)
    prompts = []
    for c, system in enumerate(which):
        history = list(systems[system])
        for i in range(c * spec.turns, (c + 1) * spec.turns):
            history += make_prompt(max(1, int(lengths[i]) - shared))
            prompts.append(list(history))
            history += make_prompt(int(outputs[i]))
    return prompts
