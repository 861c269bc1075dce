"""SamplingParams (per request) and the Sampler, which turns a step's logits into tokens in one batched pass."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 0.0          # 0 means greedy
    top_k: int = 0                    # 0 means no top-k filter
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)   # in addition to EOS unless ignore_eos
    stop: list[str] = field(default_factory=list)             # stop strings (need a tokenizer)
    ignore_eos: bool = False
    detokenize: bool = True           # produce text (and match stop strings); False: token ids only
    n: int = 1                        # sequences to return; they share the prompt's KV and fork at the first token
    best_of: int | None = None        # sequences to generate (>= n; None: n); the n of highest cumulative logprob

    def __post_init__(self):
        checks = [(self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
                  (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be in [0, max_new_tokens]"),
                  (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
                  (self.top_k >= 0, "top_k must be >= 0 (0 = disabled)"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.n >= 1, "n must be >= 1"),
                  (self.best_of is None or self.best_of >= self.n, "best_of must be >= n (or None, meaning n)")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid sampling parameters: {message}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def num_sequences(self) -> int:
        """How many sequences the request generates."""
        return self.best_of or self.n


class Sampler:
    """Greedy rows take the argmax; the others are filtered (temperature, top-k, top-p) together and drawn with
    the exponential-race trick, so a seeded request only needs its own noise, not its own pass."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                 banned: list[list[int]]) -> torch.Tensor:
        logits = logits.float()
        for row, ids in enumerate(banned):
            if ids:
                logits[row, ids] = float("-inf")
        tokens = logits.argmax(-1)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            tokens[rows] = self._sample(logits[rows], [params[i] for i in rows], [generators[i] for i in rows])
        return tokens

    def _sample(self, logits, params, generators) -> torch.Tensor:
        temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)[:, None]
        logits = logits / temps
        top_k = torch.tensor([p.top_k or logits.shape[-1] for p in params])
        top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[-1])[None, :]
        drop = ranks >= top_k[:, None]
        probs = sorted_logits.softmax(-1)
        drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]      # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = torch.empty_like(logits).scatter_(-1, order, sorted_logits.softmax(-1))
        noise = torch.empty_like(probs)
        for i, g in enumerate(generators):
            noise[i].exponential_(generator=g or self.generator)
        return (probs / noise).argmax(-1)
