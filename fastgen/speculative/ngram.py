"""Prompt lookup (n-gram) proposals (Saxena 2023; vLLM's `ngram`): find the sequence's last n tokens earlier in its
prompt and output, and propose the tokens that followed them there. The longest n in [min_n, max_n] that matches
wins, and of its matches the latest. Costs no model: it pays where outputs copy their prompts (summaries, code
edits, quotes) and proposes nothing where they do not."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fastgen.request import Request
from fastgen.speculative.base import Proposer, SpeculativeConfig, register_proposer


@dataclass
class NgramConfig(SpeculativeConfig):
    name: str = "ngram"
    min_n: int = 2                       # shortest suffix matched (vLLM's prompt_lookup_min)
    max_n: int = 4                       # longest suffix matched (vLLM's prompt_lookup_max)

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"speculative needs 1 <= min_n <= max_n, got min_n={self.min_n}, max_n={self.max_n}")


def lookup(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """At most k tokens that followed the latest earlier occurrence of the longest suffix of `tokens` of
    min_n..max_n tokens; [] when none occurs."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        windows = sliding_window_view(tokens[:-1], n)           # every n-gram that ends before the last token
        hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []


@register_proposer("ngram", config=NgramConfig)
class NgramProposer(Proposer):
    def propose(self, requests: Sequence[Request], ks: Sequence[int]) -> list[list[int]]:
        return [lookup(np.asarray(r.prompt_token_ids + r.output_token_ids), k, self.config.min_n, self.config.max_n)
                for r, k in zip(requests, ks)]
