"""Request: one generation request and its progress, as the scheduler and the engine see it.

A request has `num_tokens` tokens (prompt + generated so far) of which `num_computed_tokens` have their KV in
the cache. Each step the scheduler gives it some of the rest; the step that computes its last token yields a new
token. A preempted request drops its KV (num_computed_tokens = 0) and recomputes prompt + generated tokens, less
what the prefix cache still holds. A request with n > 1 (or best_of) forks at its first token into sequences of
the same request_id, one Request each (`index`: its choice), sharing the prompt's KV.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import itertools
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fastgen.detokenizer import IncrementalDetokenizer
from fastgen.sampling import SamplingParams, TokenLogprob
from fastgen.request_trace import DEFAULT_TENANT, SLO, RequestTrace


_SEQ_IDS = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SpeculationStats:
    """A sequence's record of speculative decoding: its verifies, the proposals they checked and accepted, and the
    running acceptance rate (an exponential moving average of accepted / proposed per verify, starting hopeful)
    that a policy sizes its proposals by (fastgen.schedulers.splitfuse)."""

    WEIGHT: ClassVar[float] = 0.5     # of the newest verify in the running rate
    verifies: int = 0
    proposed: int = 0
    accepted: int = 0
    rejected: int = 0                 # verifies that ended at a rejected proposal (the others accepted them all)
    acceptance: float = 1.0
    skipped: int = 0                  # decode steps a policy has not granted it speculation since its last verify

    def record(self, proposed: int, accepted: int) -> None:
        self.verifies, self.proposed, self.accepted = self.verifies + 1, self.proposed + proposed, \
            self.accepted + accepted
        self.rejected += accepted < proposed
        self.acceptance += self.WEIGHT * (accepted / proposed - self.acceptance)
        self.skipped = 0


@dataclass(eq=False)      # a sequence is itself (its seq_id is unique): `in` / remove() on the scheduler's lists
class Request:            # compare identities, not every field of every request ahead of it
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    eos_token_ids: frozenset[int] = frozenset()
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    output_text: str = ""                       # the final text (detokenized requests), set when it finishes
    detokenizer: IncrementalDetokenizer | None = None   # detokenized requests: text and stop strings as it grows
    generator: torch.Generator | None = None
    trace: RequestTrace = None
    logprobs: list[TokenLogprob] = field(default_factory=list)          # per output token, if sampling.logprobs
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)   # per prompt token after the first
    index: int = 0                              # which of the request's n (best_of) sequences this is
    cumulative_logprob: float = 0.0             # sum of its tokens' log-probabilities (kept when best_of > n)
    seq_id: int = field(default_factory=lambda: next(_SEQ_IDS))   # unique per sequence: the KV manager's key
    block_hashes: list = field(default_factory=list, repr=False)  # the KV manager's keys of its full blocks
    priority: int = 0                           # lower is more urgent (vLLM's convention)
    tenant: str = DEFAULT_TENANT                # who sent it (fairness policies share service between tenants)
    slo: SLO | None = None                      # its TTFT / TPOT targets (deadline-aware policies, metrics)
    request_class: str | None = None            # the workload class it belongs to (metrics per class)
    grammar: object = None                      # a structured output's matcher (xgrammar), once compiled
    speculation: SpeculationStats = field(default_factory=SpeculationStats)   # speculative decoding's record

    def __post_init__(self):
        if self.trace is None:
            self.trace = RequestTrace(self.request_id, len(self.prompt_token_ids), self.arrival_time,
                                      request_class=self.request_class, tenant=self.tenant, priority=self.priority,
                                      slo=self.slo)
        if self.sampling.seed is not None:
            self.generator = torch.Generator().manual_seed(self.sampling.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) - self.num_computed_tokens

    @property
    def is_decode(self) -> bool:       # (spelled out: schedulers ask it of every running request every step)
        output = self.output_token_ids
        return bool(output) and len(self.prompt_token_ids) + len(output) - self.num_computed_tokens == 1

    @property
    def max_kv_tokens(self) -> int:
        """KV slots the request needs at its longest: the last generated token is never fed back."""
        return len(self.prompt_token_ids) + self.sampling.max_new_tokens - 1

    def token_slice(self, start: int, n: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:start - p + n]
        if start + n <= p:
            return self.prompt_token_ids[start:start + n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:start + n - p]

    @property
    def needs_prompt_logits(self) -> bool:
        """Its prompt logprobs are not all computed yet (they survive preemption, so they are computed once)."""
        return self.sampling.prompt_logprobs is not None and \
            len(self.prompt_logprobs) < len(self.prompt_token_ids) - 1

    @property
    def stop_ids(self) -> frozenset[int]:
        ids = frozenset(self.sampling.stop_token_ids)
        return ids if self.sampling.ignore_eos else ids | self.eos_token_ids

    def is_stop_token(self, token: int) -> bool:
        """token in stop_ids, without making the set (asked for every token)."""
        return token in self.sampling.stop_token_ids or not self.sampling.ignore_eos and token in self.eos_token_ids

    def fork(self, index: int) -> "Request":
        """Sequence `index` of this request: a copy of it as it stands, with its own trace and, for a seeded
        request, its own noise (sequence 0 keeps the request's seed, so n=1 and choice 0 of n>1 agree)."""
        child = dataclasses.replace(self, output_token_ids=list(self.output_token_ids), index=index,
                                    trace=dataclasses.replace(self.trace, token_times=list(self.trace.token_times)),
                                    detokenizer=None, seq_id=next(_SEQ_IDS), block_hashes=list(self.block_hashes),
                                    logprobs=list(self.logprobs), prompt_logprobs=list(self.prompt_logprobs),
                                    grammar=self.grammar.fork() if self.grammar is not None else None,
                                    speculation=SpeculationStats())
        if self.sampling.seed is not None:
            child.generator = torch.Generator().manual_seed(fork_seed(self.sampling.seed, index))
        return child


def fork_seed(seed: int, index: int) -> int:
    """The seed of sequence `index` of a request seeded with `seed` (index 0: `seed` itself)."""
    if index == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest(), "little") >> 1
