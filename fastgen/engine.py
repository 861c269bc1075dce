"""LLMEngine: owns the loop. Each step asks the scheduler for a plan, turns it into plain per-sequence data for
the executor, samples from the logits it returns and commits the results to the requests; finished requests free
their blocks at once.

The engine never decides what runs (the scheduler does) and never builds tensors (the executor does). It is put
together from its parts by `fastgen.compose.build_engine(config)`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

from fastgen.detokenizer import IncrementalDetokenizer
from fastgen.executors.base import Executor
from fastgen.kv.manager import KVManager
from fastgen.model_spec import eos_ids
from fastgen.ragged import SeqChunk
from fastgen.request import Request
from fastgen.sampling import Sampler, SamplingParams
from fastgen.schedulers.base import Scheduler, SchedulerOutput
from fastgen.stats import EngineSnapshot, StepStats
from fastgen.trace import RequestTrace


@dataclass
class RequestOutput:
    """One request's news from one step: its new tokens (and their text, when the request is detokenized) and its
    timing record so far. The last output of a request carries the finished request itself (`request`), which the
    engine then forgets."""

    request_id: str
    new_token_ids: list[int]
    trace: RequestTrace
    finished: bool
    finish_reason: str | None = None
    new_text: str = ""
    request: Request | None = None


StepObserver = Callable[[StepStats], None]


class LLMEngine:
    def __init__(self, executor: Executor, scheduler: Scheduler, kv: KVManager, *, seed: int = 0,
                 max_model_len: int | None = None, clock: Callable[[], float] | None = None):
        self._executor, self._scheduler, self._kv = executor, scheduler, kv
        self.tokenizer = executor.tokenizer
        self.clock = clock or executor.clock
        self.spec = executor.spec
        self.max_model_len = min(self.spec.max_positions, max_model_len or self.spec.max_positions)
        self.vocab_size = self.spec.vocab_size
        self.eos_token_ids = eos_ids(getattr(self.tokenizer, "eos_token_id", None)) | self.spec.eos_token_ids
        self._sampler = Sampler(seed)
        self._requests: dict[str, Request] = {}
        self._observers: list[StepObserver] = []
        self._ids = itertools.count()
        self._num_steps = 0
        scheduler.set_context_limit(self.max_model_len)

    # -- requests ------------------------------------------------------------------------------------------------
    def add_request(self, prompt: str | Sequence[int], sampling: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        sampling = sampling or SamplingParams()
        token_ids = self._tokenize(prompt)
        if sampling.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; pass stop_token_ids instead")
        if sampling.stop and not sampling.detokenize:
            raise ValueError("stop strings are matched on the text: they need detokenize=True")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        total = len(token_ids) + sampling.max_new_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(token_ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) = "
                             f"{total} exceeds the model's context limit max_model_len={self.max_model_len}")
        req = Request(request_id, token_ids, sampling, self.clock() if arrival_time is None else arrival_time,
                      eos_token_ids=self.eos_token_ids)
        if not self._kv.fits_ever(req):
            raise ValueError(f"request needs {req.max_kv_tokens} KV slots but the whole KV pool holds "
                             f"{self._kv.capacity_tokens} (kv.num_blocks={self._kv.num_blocks} x "
                             f"kv.block_size={self._kv.block_size}); raise kv.num_blocks or kv.memory_gb")
        if sampling.detokenize and self.tokenizer is not None:
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, sampling.stop)
        self._requests[request_id] = req
        self._scheduler.add_request(req)
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

    def abort(self, request_id: str) -> Request | None:
        """Stops a request and frees its KV blocks at once; returns it (finish_reason "abort"), or None if it is
        unknown or already finished."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        self._finish(req, "abort", self.clock())
        return req

    def has_unfinished(self) -> bool:
        return self._scheduler.has_unfinished()

    def add_step_observer(self, observer: StepObserver) -> None:
        """`observer(stats)` is called after every step, on the engine's thread."""
        self._observers.append(observer)

    def snapshot(self) -> EngineSnapshot:
        running, waiting = self._scheduler.num_requests()
        return EngineSnapshot(running, waiting, self._kv.num_blocks, self._kv.num_free_blocks, self._num_steps)

    def close(self) -> None:
        self._executor.close()

    def _finish(self, req: Request, reason: str, now: float) -> None:
        req.finish_reason = reason
        req.trace.finish_time, req.trace.finish_reason = now, reason
        if req.detokenizer is not None:
            req.output_text = req.detokenizer.final_text
        self._scheduler.finish(req)
        del self._requests[req.request_id]

    # -- the loop ------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        start = self.clock()
        plan = self._scheduler.schedule()
        if not plan:
            if self.has_unfinished():
                raise RuntimeError(f"scheduler {self._scheduler.name!r} scheduled nothing while "
                                   f"{self._scheduler.num_requests()} (running, waiting) requests are unfinished")
            return []
        chunks = [SeqChunk(c.request.token_slice(c.request.num_computed_tokens, c.num_tokens),
                           c.request.num_computed_tokens, self._kv.block_table(c.request), c.num_pad)
                  for c in plan.chunks]
        for c in plan.chunks:
            if c.request.trace.first_scheduled_time is None:
                c.request.trace.first_scheduled_time = start
        scheduled = self.clock()
        result = self._executor.execute(chunks)
        executed = self.clock()
        outputs = self._commit(plan, result.logits)
        now = self.clock()
        self._report(StepStats(
            index=self._num_steps, start=start, duration_s=now - start, schedule_s=scheduled - start,
            prepare_s=result.prepare_s, forward_s=result.forward_s, sample_s=now - executed,
            num_tokens=plan.num_tokens, num_seqs=len(plan.chunks),
            num_prefill_tokens=sum(c.num_tokens for c in plan.chunks if c.num_tokens > 1),
            num_preempted=len(plan.preempted), **self._scheduler_counts(), **self._kv.usage(),
            num_pad_tokens=plan.num_pad_tokens))
        return outputs

    def _commit(self, plan: SchedulerOutput, logits) -> list[RequestOutput]:
        """Applies a step's results: every chunk's tokens are computed; the chunks that reached the end of their
        request's pending tokens sample one token each, which may finish the request."""
        sampled = [i for i, c in enumerate(plan.chunks) if c.num_tokens == c.request.num_pending_tokens]
        for c in plan.chunks:
            c.request.num_computed_tokens += c.num_tokens
        reqs = [plan.chunks[i].request for i in sampled]
        if not reqs:
            return []
        rows = logits if len(sampled) == len(plan.chunks) else logits[sampled]
        tokens = self._sampler(rows, [r.sampling for r in reqs], [r.generator for r in reqs],
                               [list(r.stop_ids) if len(r.output_token_ids) < r.sampling.min_new_tokens else []
                                for r in reqs]).tolist()
        now = self.clock()
        outputs = []
        for req, token in zip(reqs, tokens):
            req.output_token_ids.append(token)
            req.trace.token_times.append(now)
            reason = self._stop_reason(req, token)
            text = ""
            if req.detokenizer is not None:
                text = req.detokenizer.delta(finished=reason is not None)
            if reason:
                self._finish(req, reason, now)
            outputs.append(RequestOutput(req.request_id, [token], req.trace, reason is not None, reason, text,
                                         req if reason else None))
        return outputs

    def _stop_reason(self, req: Request, token: int) -> str | None:
        n = len(req.output_token_ids)
        past_min = n >= req.sampling.min_new_tokens
        stop_string = False
        if req.detokenizer is not None:
            req.detokenizer.push([token], match_stop=past_min)
            stop_string = req.detokenizer.stop_at is not None
        if past_min and (token in req.stop_ids or stop_string):
            return "stop"
        if n >= req.sampling.max_new_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _scheduler_counts(self) -> dict[str, int]:
        running, waiting = self._scheduler.num_requests()
        return {"num_running": running, "num_waiting": waiting}

    def _report(self, stats: StepStats) -> None:
        self._num_steps += 1
        for observer in self._observers:
            observer(stats)
