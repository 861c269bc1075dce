"""LLMEngine: owns the loop. Each step asks the scheduler for a plan (which carries the executor's plain step
data: each sequence's tokens and blocks, and the block copies to make first), hands it to the executor, samples
from the logits it returns, and commits the step to the scheduler in one call (computed tokens, forks, finished
requests, whose blocks are freed at once). The engine talks to the scheduler, the executor and the output path
(sampler, detokenizer) only; the KV manager is the scheduler's.

A request with n > 1 or best_of computes its prompt once and forks at its first token into best_of sequences,
which share the prompt's KV blocks where the KV manager can (it copies a shared block when one of them writes
into it). With
best_of == n each sequence streams its outputs tagged with its choice `index`; with best_of > n the sequences run
to their end and the n with the highest cumulative log-probability (under the model, before temperature) are
returned, each as one output with all its tokens.

Speculative decoding (a `proposer`): the scheduler grants some decodes proposal slots; the engine asks the proposer to
fill them, for those sequences only, and each such sequence runs as one chunk of its last token and its proposals,
whose logits verify them (Sampler.verify): it takes the accepted run and one token more, appended one by one (a
stop, EOS or max_tokens inside the run ends it there) and sent as one output; the commit keeps the KV of accepted
proposals only.

The engine never decides what runs (the scheduler does) and never builds tensors (the executor does). It is put
together from its parts by `fastgen.compose.build_engine(config)`.

One request's failure is its own: a step whose sampling or output processing fails for some requests ends just
those (finish_reason "error", the message in `RequestOutput.error`), and a failed forward pass ends the requests of
that step; either way their KV blocks are freed and the engine goes on serving the others and new ones.
"""
from __future__ import annotations

import gc
import itertools
import logging
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from fastgen.detokenizer import IncrementalDetokenizer
from fastgen.executors.base import Executor
from fastgen.handoff import Handoff
from fastgen.model_spec import eos_ids
from fastgen.ragged import SeqChunk
from fastgen.request import Request
from fastgen.request_trace import DEFAULT_TENANT, SLO, check_class
from fastgen.sampling import (ParameterError, Sampler, SamplingParams, SamplingRow, TokenLogprob, argmax,
                              token_logprobs)
from fastgen.schedulers.base import ScheduledChunk, Scheduler, SchedulerOutput
from fastgen.speculative.base import Proposer
from fastgen.step_stats import EngineSnapshot, StepStats
from fastgen.structured import GrammarCompiler
from fastgen.request_trace import RequestTrace

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """One request's news from one step: its new tokens (and their text, when the request is detokenized, and
    their logprobs, when it asked for them) and its timing record so far. Its first token's output also carries the
    prompt logprobs it asked for. The last output of a request carries the finished request itself (`request`),
    which the engine then forgets; a request that failed ends with finish_reason "error" and `error` saying why."""

    request_id: str
    new_token_ids: list[int]
    trace: RequestTrace
    finished: bool
    finish_reason: str | None = None
    new_text: str = ""
    request: Request | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    index: int = 0                    # the choice (sequence) of a request with n > 1 these tokens belong to


StepObserver = Callable[[StepStats], None]


def freeze_startup_heap() -> None:
    """Takes every object alive now (the libraries, the model, the engine) out of the garbage collector's full
    collections, as vLLM does once it has started (vllm.utils.gc_utils.freeze_gc_heap): those collections then scan
    only what serving creates. Without it, each one scans the whole start-up heap (hundreds of thousands of objects
    with torch and transformers loaded): at 1,024 running sequences a step that meets one takes 10-20x the median.
    Call once, when the engine is built and before traffic; garbage is collected first (frozen garbage would stay),
    and gc.unfreeze() undoes it."""
    gc.collect()
    gc.freeze()


class LLMEngine:
    def __init__(self, executor: Executor, scheduler: Scheduler, *, seed: int = 0,
                 max_model_len: int | None = None, clock: Callable[[], float] | None = None,
                 proposer: Proposer | None = None):
        self._executor, self._scheduler, self._proposer = executor, scheduler, proposer
        self.tokenizer = executor.tokenizer
        self.clock = clock or executor.clock
        self.spec = executor.spec
        self.max_model_len = min(self.spec.max_positions, max_model_len or self.spec.max_positions)
        self.vocab_size = self.spec.vocab_size
        self.eos_token_ids = eos_ids(getattr(self.tokenizer, "eos_token_id", None)) | self.spec.eos_token_ids
        self._sampler = Sampler(seed)
        self._requests: dict[str, list[Request]] = {}    # each request's live sequences
        self._best_of: dict[str, list[Request]] = {}     # best_of > n: finished sequences held back until all are
        self._observers: list[StepObserver] = []
        self._ids = itertools.count()
        self._num_steps = 0
        self._grammars: GrammarCompiler | None = None    # made at the first structured output
        self._compiling: list[tuple[Request, Future]] = []   # waiting for their grammar, in arrival order
        self._mask_s = 0.0                                 # this step's grammar-mask seconds
        self._detached: dict[str, tuple[Request, list[int]]] = {}   # exported requests and the KV blocks they hold
        self._gathered = torch.empty(0, 0)                # the sampled rows of a step's logits (see _gather)
        scheduler.attach(self.max_model_len, self.clock)
        if proposer is not None:
            scheduler.enable_speculation(proposer.k)

    # -- requests ------------------------------------------------------------------------------------------------
    def add_request(self, prompt: str | Sequence[int], sampling: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None, *, priority: int = 0,
                    tenant: str = DEFAULT_TENANT, slo: SLO | None = None, request_class: str | None = None) -> str:
        """Queues a request; `priority` (lower is more urgent), `tenant` and `slo` are its class, which
        class-aware schedulers (priority, edf, vtc) act on and the metrics group by."""
        sampling = sampling or SamplingParams()
        try:
            check_class(priority, tenant, slo)
        except ValueError as e:
            raise ParameterError(str(e).split(" ", 1)[0], str(e)) from None
        token_ids = self._tokenize(prompt)
        sampling.check_vocab(self.vocab_size)
        if sampling.stop and self.tokenizer is None:
            raise ParameterError("stop", "stop strings need a tokenizer; pass stop_token_ids instead")
        if sampling.stop and not sampling.detokenize:
            raise ParameterError("stop", "stop strings are matched on the text: they need detokenize=True")
        if sampling.structured is not None and self._executor.real_logits and self.tokenizer is None:
            raise ParameterError("structured", "a structured output needs the model's tokenizer")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        total = len(token_ids) + sampling.max_new_tokens
        if total > self.max_model_len:
            raise ParameterError("prompt", f"prompt ({len(token_ids)} tokens) + max_new_tokens "
                                           f"({sampling.max_new_tokens}) = {total} exceeds the model's context limit "
                                           f"max_model_len={self.max_model_len}")
        req = Request(request_id, token_ids, sampling, self.clock() if arrival_time is None else arrival_time,
                      eos_token_ids=self.eos_token_ids, priority=priority, tenant=tenant, slo=slo,
                      request_class=request_class)
        self._scheduler.check_fits(req)
        self._detokenize(req)
        self._requests[request_id] = [req]
        if sampling.num_sequences > sampling.n:
            self._best_of[request_id] = []
        if sampling.structured is not None and self._executor.real_logits:
            self._compiling.append((req, self._grammar_compiler().submit(sampling.structured)))
        else:
            self._scheduler.add_request(req)
        return request_id

    def _grammar_compiler(self) -> GrammarCompiler:
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        return self._grammars

    def _admit_compiled(self) -> list[RequestOutput]:
        """Requests whose grammar has compiled join the scheduler (in arrival order); one whose constraint failed
        to compile ends with the reason. Never waits."""
        outputs, still = [], []
        for req, future in self._compiling:
            if not future.done():
                still.append((req, future))
            elif future.exception() is not None:
                outputs.append(self._fail(req, f"its structured output does not compile: {future.exception()}"))
            else:
                req.grammar = future.result()
                self._scheduler.add_request(req)
        self._compiling = still
        return outputs

    def _detokenize(self, req: Request) -> None:
        sampling = req.sampling
        if sampling.detokenize and self.tokenizer is not None:
            req.detokenizer = IncrementalDetokenizer(
                self.tokenizer, sampling.stop, include_stop=sampling.include_stop_str_in_output,
                skip_special_tokens=sampling.skip_special_tokens,
                spaces_between_special_tokens=sampling.spaces_between_special_tokens)

    def _tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ParameterError("prompt", "a text prompt needs a tokenizer; pass token ids or load the model "
                                               "with one")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = [int(t) for t in prompt]
        if not token_ids:
            raise ParameterError("prompt", "the prompt is empty")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ParameterError("prompt", f"prompt token ids {bad[:5]} are outside the vocabulary "
                                           f"[0, {self.vocab_size})")
        return token_ids

    def abort(self, request_id: str) -> Request | None:
        """Stops a request (all its sequences) and frees its KV blocks at once; returns it (its first live
        sequence, finish_reason "abort"), or None if it is unknown or already finished."""
        if request_id in self._detached:
            req = self._detached[request_id][0]
            self.release(request_id)
            req.finish_reason = req.trace.finish_reason = "abort"
            req.trace.finish_time = self.clock()
            return req
        seqs = self._requests.get(request_id)
        if seqs is None:
            return None
        first, now = seqs[0], self.clock()
        self._compiling = [(r, f) for r, f in self._compiling if r is not first]
        for req in list(seqs):
            self._finish(req, "abort", now)
            self._scheduler.finish(req)
        self._best_of.pop(request_id, None)
        return first

    # -- disaggregated prefill and decode (fastgen.disaggregated): a request moves to another engine ------------
    def export_request(self, request_id: str) -> Handoff:
        """Takes a request that has its first token out of this engine (it is no longer scheduled) and returns what
        another engine needs to resume it; its KV blocks stay held for read_kv() until release()."""
        seqs = self._requests.get(request_id)
        if seqs is None or len(seqs) != 1 or not seqs[0].output_token_ids or seqs[0].finish_reason:
            raise ValueError(f"request {request_id!r} cannot move: only a running single-sequence request that has "
                             "its first token can")
        req = seqs[0]
        blocks = self._scheduler.detach(req)
        del self._requests[request_id]
        self._detached[request_id] = req, blocks
        return Handoff.of(req, len(blocks), len(blocks) * self._executor.kv_block_bytes())

    def read_kv(self, request_id: str) -> torch.Tensor | None:
        """A copy of an exported request's KV contents (None on a simulated executor)."""
        return self._executor.read_kv(self._detached[request_id][1])

    def release(self, request_id: str) -> None:
        """Frees the KV blocks an exported request held (its contents have moved, or it was aborted)."""
        self._scheduler.release(self._detached.pop(request_id)[0])

    def import_request(self, handoff: Handoff, contents: torch.Tensor | None) -> bool:
        """Resumes a request exported by another engine: its KV `contents` are written into blocks of this engine's
        pool and it decodes from the next step. False (nothing taken) while the pool has no room for it."""
        if handoff.request_id in self._requests:
            raise ValueError(f"request id {handoff.request_id!r} is already in use")
        req = handoff.request(self.eos_token_ids)
        if req.sampling.structured is not None and self._executor.real_logits:
            req.grammar = self._grammar_compiler().compile(req.sampling.structured)   # cached after the first
            for token in req.output_token_ids:      # the matcher resumes where the prefill engine's was
                req.grammar.accept_token(token)
        blocks = self._scheduler.attach_computed(req)
        if blocks is None:
            return False
        try:
            self._executor.write_kv(blocks[:handoff.num_blocks], contents)
        except Exception:
            self._scheduler.finish(req)
            raise
        self._detokenize(req)
        if req.detokenizer is not None:     # its text so far went out from the engine it left
            req.detokenizer.push(req.output_token_ids)
            req.detokenizer.delta()
        self._requests[req.request_id] = [req]
        return True

    def has_unfinished(self) -> bool:
        return self._scheduler.has_unfinished() or bool(self._compiling)

    def add_step_observer(self, observer: StepObserver) -> None:
        """`observer(stats)` is called after every step, on the engine's thread."""
        self._observers.append(observer)

    def snapshot(self) -> EngineSnapshot:
        running, waiting = self._scheduler.num_requests()
        return EngineSnapshot(running, waiting + len(self._compiling), *self._scheduler.kv_blocks(),
                              self._num_steps)

    def close(self) -> None:
        self._executor.close()
        if self._grammars is not None:
            self._grammars.close()

    def _finish(self, req: Request, reason: str, now: float) -> None:
        """Ends a sequence on the engine's side; the caller tells the scheduler (which frees its blocks)."""
        req.finish_reason = reason
        req.trace.finish_time, req.trace.finish_reason = now, reason
        if req.detokenizer is not None:
            req.output_text = req.detokenizer.final_text
        self._forget(req)

    def _forget(self, req: Request) -> None:
        if self._proposer is not None:
            self._proposer.release(req)
        seqs = self._requests[req.request_id]
        seqs.remove(req)
        if not seqs:
            del self._requests[req.request_id]

    def _fail(self, req: Request, error: str) -> RequestOutput:
        """Ends a request that failed: like a failed HTTP request, its trace keeps no finish_time (metrics do not
        count it as completed) and its finish_reason says why. The caller tells the scheduler."""
        log.warning("request %s failed: %s", req.request_id, error)
        req.finish_reason = "error"
        req.trace.finish_reason = f"error: {error}"
        self._forget(req)
        if req.request_id not in self._requests:     # best_of > n: what its other sequences held back goes too
            self._best_of.pop(req.request_id, None)
        return RequestOutput(req.request_id, [], req.trace, True, "error", "", req, error=error)

    # -- the loop ------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        start = self.clock()
        compiled = self._admit_compiled() if self._compiling else []
        plan = self._scheduler.plan_step()
        dropped = compiled + self._dropped(plan, start)
        if not plan:
            if self._compiling and not self._scheduler.has_unfinished():    # nothing to run until one compiles
                wait([f for _, f in self._compiling], timeout=0.05, return_when=FIRST_COMPLETED)
                return dropped
            if self.has_unfinished() and not dropped and not self._detached:   # exported KV will be freed
                raise RuntimeError(f"scheduler {self._scheduler.name!r} scheduled nothing while "
                                   f"{self._scheduler.num_requests()} (running, waiting) requests are unfinished")
            return dropped
        for c in plan.chunks:
            if c.request.trace.first_scheduled_time is None:
                c.request.trace.first_scheduled_time = start
        self._mask_s = 0.0
        draft_s = self._propose(plan)
        scheduled = self.clock()
        try:
            swaps = (plan.swap_out, plan.swap_in) if plan.swap_out or plan.swap_in else ()
            result = self._executor.execute(plan.step_chunks, plan.copies, *swaps)
        except Exception as e:      # noqa: BLE001  (the model failed: this step's requests end, the engine lives on)
            log.exception("the forward pass failed; ending its %d requests", len(plan.chunks))
            error = f"the model's forward pass failed: {type(e).__name__}: {e}"
            outputs = dropped + [self._fail(c.request, error) for c in plan.chunks]
            for c in plan.chunks:
                self._scheduler.finish(c.request)
            prepare_s = forward_s = 0.0
            executed = self.clock()
        else:
            executed = self.clock()
            prepare_s, forward_s = result.prepare_s, result.forward_s
            outputs = dropped + self._commit(plan, result.logits)
        now = self.clock()
        self._report(StepStats(
            index=self._num_steps, start=start, duration_s=now - start, schedule_s=scheduled - start,
            prepare_s=prepare_s, forward_s=forward_s, sample_s=now - executed,
            num_seqs=len(plan.chunks), num_preempted=len(plan.preempted), num_block_copies=len(plan.copies),
            num_swapped_blocks=len(plan.swap_out) + len(plan.swap_in), grammar_mask_s=self._mask_s,
            draft_s=draft_s, **self._chunk_counts(plan), **self._scheduler.step_counts()))
        return outputs

    @staticmethod
    def _chunk_counts(plan: SchedulerOutput) -> dict[str, int]:
        """The step's token counts for its stats, in one pass over its chunks (a step can have thousands)."""
        tokens = prefill = pad = verifies = proposed = accepted = 0
        for c in plan.chunks:
            n, k = c.num_tokens, c.num_proposed
            tokens += n + k
            if n > 1:
                prefill += n
            if c.num_pad:
                pad += c.num_pad
            if k:
                verifies, proposed = verifies + 1, proposed + k
            accepted += c.num_accepted
        return {"num_tokens": tokens, "num_prefill_tokens": prefill, "num_pad_tokens": pad, "num_verifies": verifies,
                "num_proposed_tokens": proposed, "num_accepted_tokens": accepted,
                "num_constrained_seqs": sum(c.constrained for c in plan.step_chunks)}

    def _propose(self, plan: SchedulerOutput) -> float:
        """Fills the proposal slots the scheduler granted (each chunk's tokens get its proposals, and logits for
        all of them); returns the seconds it took. A proposer that fails only costs this step its speculation."""
        granted = [(c, chunk) for c, chunk in zip(plan.chunks, plan.step_chunks) if c.num_speculative]
        if not granted:
            return 0.0
        start = self.clock()
        try:
            drafts = self._proposer.propose([c.request for c, _ in granted], [c.num_speculative for c, _ in granted])
        except Exception:      # noqa: BLE001  (speculation is an optimisation: the step runs without it)
            log.exception("the proposer failed; this step does not speculate")
            return self.clock() - start
        for (c, chunk), draft in zip(granted, drafts):
            draft = [int(t) for t in draft[:c.num_speculative]]
            if draft:
                c.num_proposed = len(draft)
                chunk.token_ids = list(chunk.token_ids) + draft
                chunk.all_logits = True
        return self.clock() - start

    def _dropped(self, plan: SchedulerOutput, now: float) -> list[RequestOutput]:
        """Sequences the policy ended itself (`SchedulerOutput.dropped`, e.g. edf's late requests with
        late=drop): the scheduler has already let them go and freed their KV; here they end on the engine's side
        with the policy's finish reason, as an abort would."""
        outputs = []
        for req, reason in plan.dropped:
            if req.request_id not in self._requests or req not in self._requests[req.request_id]:
                continue
            self._finish(req, reason, now)
            if req.request_id in self._best_of:
                outputs += self._best_of_outputs(req, reason)
            else:
                outputs.append(RequestOutput(req.request_id, [], req.trace, True, reason, "", req, index=req.index))
        return outputs

    def _commit(self, plan: SchedulerOutput, logits: torch.Tensor) -> list[RequestOutput]:
        """Applies a step's results: the prompt logprobs of chunks that asked for all their logits are recorded;
        the chunks that reached the end of their request's pending tokens sample one token each, which may finish
        the request. A request that needs more than one sequence forks here, at its first token: each sequence
        samples its own from the same logits. A failure that belongs to some requests ends only those. Then the
        scheduler commits the step (computed tokens, forks, finished requests) in one call."""
        chunks = plan.step_chunks
        first_rows = [0, *itertools.accumulate(c.num_logits for c in chunks)]
        outputs = self._record_prompt_logprobs(plan, chunks, logits, first_rows[:-1])
        failed = {out.request_id for out in outputs}
        reqs, rows, verified, firsts = [], [], [], []     # one pass over the chunks (a step can have thousands)
        for i, c in enumerate(plan.chunks):
            req = c.request
            if c.num_tokens != req.num_pending_tokens or failed and req.request_id in failed:
                continue
            if c.num_proposed:
                verified.append(i)
                continue
            if not req.output_token_ids:
                firsts.append(len(reqs))
            reqs.append(req)
            rows.append(first_rows[i + 1] - 1)
        if verified:
            outputs += self._verify([plan.chunks[i] for i in verified],
                                    [list(chunks[i].token_ids[1:]) for i in verified],
                                    [first_rows[i] for i in verified], logits)
        forks = []
        for k in firsts:
            req, row = reqs[k], rows[k]
            if req.index == 0 and req.sampling.num_sequences > 1:
                children = self._fork(req)
                forks += [(req, child) for child in children]
                reqs += children
                rows += [row] * len(children)
        if reqs:
            outputs += self._sample_and_append(reqs, rows, logits)
        ended = [c.request for c in plan.chunks if c.request.finish_reason] + \
            [child for _, child in forks if child.finish_reason]
        self._scheduler.update_from_output(plan, forks, ended)
        return outputs

    def _sample_and_append(self, reqs: list[Request], rows: list[int], logits: torch.Tensor) -> list[RequestOutput]:
        outputs = []
        if rows != list(range(logits.shape[0])):       # not every row in order (a decode step): a copy of those
            logits = self._gather(logits, rows)
        results = self._sample(logits, reqs)
        best_of = self._best_of
        if best_of:
            self._score_best_of(logits, reqs, results)
        now, append = self.clock(), self._append
        for req, result in zip(reqs, results):
            if isinstance(result, Exception):
                outputs.append(self._fail(req, f"sampling failed: {type(result).__name__}: {result}"))
                continue
            try:
                out = append(req, *result, now)
            except Exception as e:      # noqa: BLE001  (its detokenizer or stop check failed: only it ends)
                outputs.append(self._fail(req, f"processing its output failed: {type(e).__name__}: {e}"))
                continue
            if best_of and req.request_id in best_of:
                outputs += self._best_of_outputs(req, out.finish_reason)
            else:
                outputs.append(out)
        return outputs

    @staticmethod
    def _sampling_row(req: Request, ahead: Sequence[int] = ()) -> SamplingRow:
        """What the sampler reads of `req` for its next token, or for the one after `ahead` (proposals)."""
        output = req.output_token_ids + list(ahead) if ahead else req.output_token_ids
        return SamplingRow(req.sampling, req.generator, req.prompt_token_ids, output,
                           list(req.stop_ids) if len(output) < req.sampling.min_new_tokens and req.grammar is None
                           else (), req.grammar)      # a grammar says itself when the output may end

    def _verify(self, chunks: list[ScheduledChunk], drafts: list[list[int]], first_rows: list[int],
                logits: torch.Tensor) -> list[RequestOutput]:
        """The chunks that carried proposals: each keeps its accepted run and one token more (Sampler.verify), in
        one batched pass (see _each_alone_if_batch_fails); appended one by one, sent as one output. Each chunk notes
        how many proposals were kept (their KV stays)."""
        rows = [[self._sampling_row(c.request, d[:j]) for j in range(len(d) + 1)] for c, d in zip(chunks, drafts)]
        at = [list(range(first, first + len(d) + 1)) for first, d in zip(first_rows, drafts)]

        def verify(which: list[int]) -> list:
            return self._sampler.verify(logits[[i for k in which for i in at[k]]], [r for k in which for r in rows[k]],
                                        [drafts[k] for k in which])
        results = self._each_alone_if_batch_fails(verify, [c.request.generator for c in chunks], "verification")
        outputs, now = [], self.clock()
        for c, draft, result in zip(chunks, drafts, results):
            req = c.request
            if isinstance(result, Exception):
                outputs.append(self._fail(req, f"sampling failed: {type(result).__name__}: {result}"))
                continue
            tokens, logprobs = result
            c.num_accepted = len(tokens) - 1
            req.speculation.record(len(draft), c.num_accepted)
            run = []
            try:
                for token, logprob in zip(tokens, logprobs):
                    run.append(self._append(req, token, logprob, now))
                    if run[-1].finished:
                        break
            except Exception as e:      # noqa: BLE001  (its detokenizer or stop check failed: only it ends)
                outputs.append(self._fail(req, f"processing its output failed: {type(e).__name__}: {e}"))
                continue
            outputs.append(self._joined(run))
        return outputs

    @staticmethod
    def _joined(run: list[RequestOutput]) -> RequestOutput:
        """A run of one sequence's outputs of one step as one output (several tokens)."""
        last = run[-1]
        logprobs = [lp for out in run for lp in out.logprobs or ()]
        return RequestOutput(last.request_id, [t for out in run for t in out.new_token_ids], last.trace,
                             last.finished, last.finish_reason, "".join(out.new_text for out in run), last.request,
                             logprobs or None, run[0].prompt_logprobs, index=last.index)

    def _gather(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """logits[rows], copied into a buffer kept between steps: a new [rows, vocab] tensor each step faults its
        pages in (on the CPU, 100 ms for 1,024 rows of a 49k vocabulary)."""
        buf = self._gathered
        if buf.shape[0] < len(rows) or buf.shape[1:] != logits.shape[1:] or \
                (buf.dtype, buf.device) != (logits.dtype, logits.device):
            buf = self._gathered = logits.new_empty((len(rows), *logits.shape[1:]))
        index = torch.as_tensor(rows, dtype=torch.int64, device=logits.device)
        return torch.index_select(logits, 0, index, out=buf[:len(rows)])

    def _fork(self, parent: Request) -> list[Request]:
        """The parent's other sequences (the scheduler gives them its KV when the step is committed)."""
        forks = []
        for index in range(1, parent.sampling.num_sequences):
            child = parent.fork(index)
            self._detokenize(child)
            self._requests[parent.request_id].append(child)
            forks.append(child)
        return forks

    def _score_best_of(self, logits: torch.Tensor, reqs: list[Request], results: list) -> None:
        """best_of > n: each sequence's cumulative log-probability (under the model, before temperature)."""
        scored = [k for k, r in enumerate(reqs) if r.request_id in self._best_of and not isinstance(results[k],
                                                                                                    Exception)]
        if scored:
            logprobs = logits[scored].float().log_softmax(-1)
            for j, k in enumerate(scored):
                reqs[k].cumulative_logprob += float(logprobs[j, results[k][0]])

    def _best_of_outputs(self, req: Request, reason: str | None) -> list[RequestOutput]:
        """best_of > n: nothing until every sequence has finished, then the n best, each with all its tokens."""
        done = self._best_of[req.request_id]
        if reason:
            done.append(req)
        if not reason or req.request_id in self._requests:
            return []
        del self._best_of[req.request_id]
        best = sorted(done, key=lambda r: r.cumulative_logprob, reverse=True)[:req.sampling.n]
        outputs = []
        for index, seq in enumerate(best):
            seq.index = index
            outputs.append(RequestOutput(seq.request_id, list(seq.output_token_ids), seq.trace, True,
                                         seq.finish_reason, seq.output_text, seq, seq.logprobs or None,
                                         seq.prompt_logprobs if seq.sampling.prompt_logprobs is not None else None,
                                         index=index))
        return outputs

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[tuple[int, TokenLogprob | None]
                                                                         | Exception]:
        """Row i of the logits is reqs[i]'s. Plain greedy rows (SamplingParams.plain_greedy, past min_new_tokens:
        most greedy requests) take one argmax together, with no per-row objects; the others go through the sampler
        in one batched pass (see _each_alone_if_batch_fails)."""
        others = [i for i, r in enumerate(reqs)
                  if not (r.sampling.plain_greedy and len(r.output_token_ids) >= r.sampling.min_new_tokens)]
        if not others:
            return [(token, None) for token in argmax(logits).tolist()]
        rows = [self._sampling_row(reqs[i]) for i in others]
        chosen = logits if len(others) == len(reqs) else logits[others]

        def sample(which: list[int]) -> list:
            out = self._sampler(chosen if len(which) == len(rows) else chosen[which], [rows[i] for i in which])
            self._mask_s += out.mask_s
            return list(zip(out.token_ids, out.logprobs))
        sampled = self._each_alone_if_batch_fails(sample, [r.generator for r in rows], "sampling")
        if len(others) == len(reqs):
            return sampled
        results = [(token, None) for token in argmax(logits).tolist()]
        for i, result in zip(others, sampled):
            results[i] = result
        return results

    @staticmethod
    def _each_alone_if_batch_fails(run: Callable[[list[int]], list], generators: Sequence[torch.Generator | None],
                                   what: str) -> list:
        """run(every index) in one batched pass; if that fails, run([i]) for each alone (seeded generators rewound
        first), so one request's bad parameters fail only that request: its result is the exception."""
        seeded = [(g, g.get_state()) for g in generators if g is not None]
        try:
            return run(list(range(len(generators))))
        except Exception:      # noqa: BLE001
            log.exception("batched %s failed; each of its %d requests alone", what, len(generators))
        for generator, state in seeded:
            generator.set_state(state)
        results = []
        for i in range(len(generators)):
            try:
                results += run([i])
            except Exception as e:      # noqa: BLE001
                results.append(e)
        return results

    def _record_prompt_logprobs(self, plan: SchedulerOutput, chunks: list[SeqChunk], logits: torch.Tensor,
                                first_rows: Sequence[int]) -> list[RequestOutput]:
        """The prompt logprobs of this step's all-logits chunks, in one pass: the row at position p scores prompt
        token p + 1. Positions already scored (before a preemption) are skipped. If the pass fails, the requests
        that asked for it fail (outputs returned)."""
        spans = []      # (request, first row, first position, end position)
        for c, chunk, row in zip(plan.chunks, chunks, first_rows):
            if chunk.all_logits:
                req = c.request
                lo = max(chunk.start, len(req.prompt_logprobs))
                hi = min(chunk.start + len(chunk.token_ids), len(req.prompt_token_ids) - 1)
                if hi > lo:
                    spans.append((req, int(row) + lo - chunk.start, lo, hi))
        if not spans:
            return []
        try:
            rows = torch.cat([torch.arange(row, row + hi - lo) for _, row, lo, hi in spans])
            targets = [t for req, _, lo, hi in spans for t in req.prompt_token_ids[lo + 1:hi + 1]]
            ks = [k for req, _, lo, hi in spans for k in itertools.repeat(req.sampling.prompt_logprobs, hi - lo)]
            found = token_logprobs(logits[rows], targets, ks)
        except Exception as e:      # noqa: BLE001
            log.exception("prompt logprobs failed")
            error = f"computing prompt logprobs failed: {type(e).__name__}: {e}"
            return [self._fail(req, error) for req, *_ in spans]
        at = 0
        for req, _, lo, hi in spans:
            req.prompt_logprobs += found[at:at + hi - lo]
            at += hi - lo
        return []

    def _append(self, req: Request, token: int, logprob: TokenLogprob | None, now: float) -> RequestOutput:
        """Adds a sampled token to its sequence, ends the sequence if the token stops it, and returns its output.
        (Called for every token of every step: its request's attributes are read once each.)"""
        grammar, detokenizer, output = req.grammar, req.detokenizer, req.output_token_ids
        if grammar is not None and not grammar.accept_token(token):
            raise RuntimeError(f"token {token} is not allowed by its grammar")
        output.append(token)
        req.trace.token_times.append(now)
        if logprob is not None:
            req.logprobs.append(logprob)
        reason = self._stop_reason(req, token)
        text = "" if detokenizer is None else detokenizer.delta(finished=reason is not None)
        if reason:
            self._finish(req, reason, now)
        return RequestOutput(req.request_id, [token], req.trace, reason is not None, reason, text,
                             req if reason else None, None if logprob is None else [logprob],
                             req.prompt_logprobs if len(output) == 1 and req.sampling.prompt_logprobs is not None
                             else None, index=req.index)

    def _stop_reason(self, req: Request, token: int) -> str | None:
        sampling, detokenizer, n = req.sampling, req.detokenizer, len(req.output_token_ids)
        past_min = n >= sampling.min_new_tokens
        if detokenizer is not None:
            detokenizer.push((token,), match_stop=past_min)
            if past_min and detokenizer.stop_at is not None:
                return "stop"
        if past_min and req.is_stop_token(token) or req.grammar is not None and req.grammar.is_terminated():
            return "stop"
        if n >= sampling.max_new_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _report(self, stats: StepStats) -> None:
        self._num_steps += 1
        for observer in self._observers:
            observer(stats)
