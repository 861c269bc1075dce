"""LLMEngine: owns the loop. Each step asks the scheduler for a plan, has the model runner run it, samples, and
updates request state and KV; finished requests free their blocks at once.

The engine never decides what runs (the scheduler does) and never builds tensors (the model runner does).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from fastgen.config import EngineConfig
from fastgen.kv.manager import make_kv_manager
from fastgen.model_runner import ModelRunner
from fastgen.request import Request
from fastgen.sampling import Sampler, SamplingParams
from fastgen.schedulers import make_scheduler


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None


def eos_ids(model_config, tokenizer) -> frozenset[int]:
    ids = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(model_config, "eos_token_id", None)):
        if source is not None:
            ids.update(source if isinstance(source, (list, tuple)) else [source])
    return frozenset(ids)


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None,
                 clock: Callable[[], float] = time.perf_counter, runner: ModelRunner | None = None):
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.clock = clock
        self.runner = runner or ModelRunner(model, self.config.kv)
        self.kv = make_kv_manager(self.config.kv.name, self.runner.cache.num_blocks, self.config.kv.block_size)
        self.scheduler = make_scheduler(self.config.scheduler, self.kv)
        self.sampler = Sampler(self.config.seed)
        limit = self.config.model.max_model_len
        self.max_model_len = min(model.max_positions, limit) if limit else model.max_positions
        self.vocab_size = model.config.vocab_size
        self.eos_token_ids = eos_ids(model.config, tokenizer)
        self.requests: dict[str, Request] = {}
        self.steps: list[dict] = []         # one record per step: the benchmark's per-step series
        self._ids = itertools.count()

    # -- requests ------------------------------------------------------------------------------------------------
    def add_request(self, prompt: str | Sequence[int], sampling: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        sampling = sampling or SamplingParams()
        token_ids = self._tokenize(prompt)
        if sampling.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; pass stop_token_ids instead")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        total = len(token_ids) + sampling.max_new_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(token_ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) = "
                             f"{total} exceeds the model's context limit max_model_len={self.max_model_len}")
        req = Request(request_id, token_ids, sampling, self.clock() if arrival_time is None else arrival_time,
                      eos_token_ids=self.eos_token_ids)
        if not self.kv.fits_ever(req):
            raise ValueError(f"request needs {req.max_kv_tokens} KV slots but the whole KV pool holds "
                             f"{self.kv.capacity_tokens} (kv.num_blocks={self.kv.num_blocks} x "
                             f"kv.block_size={self.kv.block_size}); raise kv.num_blocks or kv.memory_gb")
        self.requests[request_id] = req
        self.scheduler.add_request(req)
        return request_id

    def _tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or load the model with one")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = [int(t) for t in prompt]
        if not token_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return token_ids

    def abort(self, request_id: str) -> bool:
        """Stops a request and frees its KV blocks at once; False if it is unknown or already finished."""
        req = self.requests.get(request_id)
        if req is None or req.finish_reason is not None:
            return False
        self._finish(req, "abort", self.clock())
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def _finish(self, req: Request, reason: str, now: float) -> None:
        req.finish_reason = reason
        req.trace.finish_time, req.trace.finish_reason = now, reason
        self.scheduler.finish(req)

    def pop_finished(self, request_id: str) -> Request:
        """Hands a finished request to the caller and forgets it."""
        return self.requests.pop(request_id)

    # -- the loop ------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan:
            if self.has_unfinished():
                raise RuntimeError(f"scheduler {self.scheduler.name!r} scheduled nothing while "
                                   f"{self.scheduler.num_requests()} (running, waiting) requests are unfinished")
            return []
        start = self.clock()
        for chunk in plan.chunks:
            if chunk.request.trace.first_scheduled_time is None:
                chunk.request.trace.first_scheduled_time = start
        logits = self.runner.run(plan, self.kv)
        sampled = [i for i, c in enumerate(plan.chunks) if c.num_tokens == c.request.num_pending_tokens]
        for c in plan.chunks:
            c.request.num_computed_tokens += c.num_tokens
        reqs = [plan.chunks[i].request for i in sampled]
        tokens = self.sampler(logits[sampled], [r.sampling for r in reqs], [r.generator for r in reqs],
                              [list(r.stop_ids) if len(r.output_token_ids) < r.sampling.min_new_tokens else []
                               for r in reqs]).tolist() if reqs else []
        now = self.clock()
        outputs = []
        for req, token in zip(reqs, tokens):
            req.output_token_ids.append(token)
            req.trace.token_times.append(now)
            reason = self._stop_reason(req, token)
            if reason:
                self._finish(req, reason, now)
            outputs.append(RequestOutput(req.request_id, [token], reason is not None, reason))
        self.steps.append({"time": start, "duration_s": now - start, "num_tokens": plan.num_tokens,
                           "num_seqs": len(plan.chunks),
                           "num_prefill_tokens": sum(c.num_tokens for c in plan.chunks if c.num_tokens > 1),
                           "num_preempted": len(plan.preempted), **self.kv.usage()})
        return outputs

    def _stop_reason(self, req: Request, token: int) -> str | None:
        n = len(req.output_token_ids)
        if n >= req.sampling.min_new_tokens and token in req.stop_ids:
            return "stop"
        if req.sampling.stop:
            req.output_text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
            for s in req.sampling.stop:
                cut = req.output_text.find(s)
                if cut >= 0 and n >= req.sampling.min_new_tokens:
                    req.output_text = req.output_text[:cut]
                    return "stop"
        if n >= req.sampling.max_new_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None
