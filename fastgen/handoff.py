"""Handoff: what one engine gives another so that a request whose prompt ran on the first resumes on the second
(disaggregated prefill and decode): its tokens, how many have their KV computed, its sampling state (the seeded
generator's state included, so a seeded request draws the same tokens as on one engine), its logprobs so far and
its timing record. Plain, picklable data: the KV contents travel beside it, through a KV connector
(fastgen.kv.connector), between the executors that own them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

from fastgen.request import Request
from fastgen.request_trace import SLO, RequestTrace
from fastgen.sampling import SamplingParams, TokenLogprob


@dataclass
class Handoff:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_computed_tokens: int             # tokens whose KV the blocks hold (the prompt: the first token's is not)
    sampling: SamplingParams
    arrival_time: float
    trace: RequestTrace
    num_blocks: int                      # KV blocks the request held on the engine it left
    nbytes: int                          # their contents, over every device of that engine
    generator_state: Optional[torch.Tensor] = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    priority: int = 0
    tenant: str = "default"
    slo: Optional[SLO] = None
    request_class: Optional[str] = None

    @classmethod
    def of(cls, req: Request, num_blocks: int, nbytes: int) -> "Handoff":
        return cls(req.request_id, list(req.prompt_token_ids), list(req.output_token_ids), req.num_computed_tokens,
                   req.sampling, req.arrival_time, req.trace, num_blocks, nbytes,
                   None if req.generator is None else req.generator.get_state(), list(req.logprobs),
                   list(req.prompt_logprobs), req.cumulative_logprob, req.priority, req.tenant, req.slo,
                   req.request_class)

    def request(self, eos_token_ids: frozenset[int]) -> Request:
        """The request as it stood when it left, to resume on this engine (its KV not yet attached)."""
        req = Request(self.request_id, list(self.prompt_token_ids), self.sampling, self.arrival_time,
                      eos_token_ids=eos_token_ids, output_token_ids=list(self.output_token_ids),
                      num_computed_tokens=self.num_computed_tokens,
                      trace=self.trace, logprobs=list(self.logprobs), prompt_logprobs=list(self.prompt_logprobs),
                      cumulative_logprob=self.cumulative_logprob, priority=self.priority, tenant=self.tenant,
                      slo=self.slo, request_class=self.request_class)
        if self.generator_state is not None:
            req.generator.set_state(self.generator_state)
        return req

    def replace(self, **changes) -> "Handoff":
        return dataclasses.replace(self, **changes)
