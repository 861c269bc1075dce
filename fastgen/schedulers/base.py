"""Scheduler: the policy that decides, each step, which requests run and how many of their tokens.

Schedulers are pure policy. They own the waiting queue, the running list and the KV manager: they read request
state and ask the KV manager for room, and never touch tensors. The engine sees only two calls a step, as in vLLM
v1: `plan_step()`, whose SchedulerOutput carries everything the executor needs (each chunk's plain step data with
its block table, and the block copies to make first), and `update_from_output()`, which commits what the step did
(computed tokens, forked sequences, finished requests and their freed blocks). A policy writes only `schedule()`,
over the shared bookkeeping below.

Budget vocabulary (as in vLLM's v1 scheduler): a step carries at most `token_budget` tokens from at most
`max_seqs` sequences. A decode costs one token; a prompt costs as many tokens as the policy gives it. Tokens the
KV manager has cached cost nothing: before each step (plan_step) a waiting request's num_computed_tokens is set
to its cached prefix, so `num_pending_tokens`, which every policy budgets with, counts only what is left to compute.

Speculative decoding (once the engine calls `enable_speculation(k)`): a decode may also get up to k proposal slots
(`ScheduledChunk.num_speculative`), tokens of the budget like any other, which the engine fills with a proposer's
guesses and verifies in the same pass. `schedule_speculation` grants them (any policy; `speculation_k` says how many
a request may take); the commit keeps the KV of the proposals the target accepted and gives back the rest.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

from fastgen.config import SchedulerConfig, check_positive
from fastgen.kv.manager import KVManager
from fastgen.ragged import BlockCopy, BlockSwap, SeqChunk
from fastgen.registry import Registry
from fastgen.request import Request, RequestStatus

SCHEDULERS: Registry["Scheduler"] = Registry("scheduler", "fastgen.schedulers", SchedulerConfig)
register_scheduler = SCHEDULERS.register     # @register_scheduler("name", config=MyConfig) on a Scheduler subclass


@dataclass
class TokenBudgetConfig(SchedulerConfig):
    """Policies that cap each forward pass at a number of tokens."""

    token_budget: int = 768              # tokens per forward pass (DeepSpeed-FastGen's max_ragged_batch_size)

    def step_tokens(self, max_model_len: int) -> int:
        return self.token_budget

    def validate(self) -> None:
        super().validate()
        check_positive("scheduler", token_budget=self.token_budget)


@dataclass
class BatchSizeConfig(SchedulerConfig):
    """Policies that admit at most `batch_size` requests at a time."""

    batch_size: int = 32

    def validate(self) -> None:
        super().validate()
        check_positive("scheduler", batch_size=self.batch_size)


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int
    num_pad: int = 0             # pad tokens computed after this chunk's tokens (vLLM 0.2's padded prefill): the
    #                              executors charge them; their outputs and KV are thrown away
    num_speculative: int = 0     # proposal slots granted after its decode token (speculative decoding)
    num_proposed: int = 0        # of which the engine's proposer filled (computed in the step)
    num_accepted: int = 0        # of which the target accepted (the engine's verify): their KV is kept


@dataclass
class SchedulerOutput:
    """A step's plan: what the policy chose (`chunks`, `preempted`), and, once plan_step() has finished it, what
    the executor gets (`step_chunks`, one SeqChunk per chunk in order, and `copies`)."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    dropped: list[tuple[Request, str]] = field(default_factory=list)   # (request, finish reason) the policy ended
    step_chunks: list[SeqChunk] = field(default_factory=list)
    copies: list[BlockCopy] = field(default_factory=list)
    swap_out: list[BlockSwap] = field(default_factory=list)    # device -> host, before the copies
    swap_in: list[BlockSwap] = field(default_factory=list)     # host -> device, after the copies

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens + c.num_proposed for c in self.chunks)

    @property
    def num_pad_tokens(self) -> int:
        return sum(c.num_pad for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)


class Scheduler:
    name: ClassVar[str] = "base"
    Config: ClassVar[type[SchedulerConfig]] = SchedulerConfig

    def __init__(self, config: SchedulerConfig, kv: KVManager):
        self.config, self.kv = config, kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.max_model_len: int | None = None
        self.clock: Callable[[], float] = time.perf_counter
        self.max_speculative = 0     # k of the engine's proposer (0: no speculative decoding)

    def attach(self, max_model_len: int, clock: Callable[[], float]) -> None:
        """The engine's context limit (prompt + output tokens), for policies whose defaults follow from it (vLLM's
        max_num_batched_tokens), and the clock its requests' times are on (for policies that read deadlines);
        told once when the engine is built."""
        self.max_model_len, self.clock = max_model_len, clock

    def enable_speculation(self, k: int) -> None:
        """The engine has a proposer of up to k tokens per sequence: decodes may get proposal slots."""
        self.max_speculative = k

    # -- the policy ---------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        raise NotImplementedError

    # -- the engine's calls --------------------------------------------------------------------------------------
    def check_fits(self, req: Request) -> None:
        """Refuses (ValueError naming the fix) a request that could not finish even with the whole KV pool."""
        kv = self.kv
        if not kv.fits_ever(req):
            raise ValueError(f"request needs {req.max_kv_tokens} KV slots but the whole KV pool holds "
                             f"{kv.capacity_tokens} (kv.num_blocks={kv.num_blocks} x kv.block_size={kv.block_size}); "
                             "raise kv.num_blocks or kv.memory_gb")

    def plan_step(self) -> SchedulerOutput:
        """The next step's plan: every waiting request starts past its cached prefix, the policy chooses, and the
        plan gets each chunk's plain step data (its tokens, where they start, its blocks) and the block copies the
        executor must make first."""
        if self.kv.caches_prefixes:
            for req in self.waiting:
                if not self.kv.is_swapped(req):
                    req.num_computed_tokens = self.kv.cached_prefix(req)
        out = self.schedule()
        step_chunks, block_table = out.step_chunks, self.kv.block_table     # (a step can have thousands of chunks)
        for c in out.chunks:
            req, n = c.request, c.num_tokens
            start = req.num_computed_tokens
            step_chunks.append(SeqChunk(
                req.token_slice(start, n), start, block_table(req),
                start < len(req.prompt_token_ids) - 1 and req.needs_prompt_logits, c.num_pad,
                req.sampling.structured is not None and n == req.num_pending_tokens))
        out.copies = self.kv.take_copies()
        out.swap_out, out.swap_in = self.kv.take_swaps()
        return out

    def update_from_output(self, out: SchedulerOutput, forks: Sequence[tuple[Request, Request]] = (),
                           finished: Sequence[Request] = ()) -> None:
        """Commits a step: every chunk's tokens are computed; each (parent, child) of `forks` is a sequence forked
        from its parent at this step's end, sharing the parent's KV where the manager can (else it waits to
        compute its tokens again); `finished` requests leave and free their blocks."""
        for c in out.chunks:
            c.request.num_computed_tokens += c.num_tokens + c.num_accepted
            if c.num_speculative:
                self.kv.truncate(c.request)         # the slots of rejected (or never proposed) tokens go back
            self.kv.computed(c.request)
        for parent, child in forks:
            child.num_computed_tokens = parent.num_computed_tokens
            shared = self.kv.fork(parent, child)
            if not shared:
                child.num_computed_tokens = 0
            self.add_fork(child, shared)
        for req in finished:
            self.finish(req)

    def step_counts(self) -> dict[str, int]:
        """For the step's stats: running and waiting requests, KV use and the prefix-cache counters since the last
        call."""
        return {"num_running": len(self.running), "num_waiting": len(self.waiting), **self.kv.usage(),
                **self.kv.take_counters()}

    def kv_blocks(self) -> tuple[int, int]:
        """(blocks in the pool, free blocks)."""
        return self.kv.num_blocks, self.kv.num_free_blocks

    # -- bookkeeping shared by every policy ----------------------------------------------------------------------

    def add_request(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def add_fork(self, child: Request, shares_kv: bool) -> None:
        """A sequence forked from a running request: it runs beside its parent when it shares the parent's KV,
        else it waits to compute its tokens again."""
        if shares_kv:
            child.status = RequestStatus.RUNNING
            self.running.append(child)
        else:
            self.add_request(child)

    def finish(self, req: Request) -> None:
        """A request that finished (update_from_output) or was aborted or failed (the engine, at once): drop it
        and free its KV."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED

    # -- disaggregated prefill and decode: a request leaves one engine with its KV and resumes on another ----------
    def detach(self, req: Request) -> list[int]:
        """The request leaves this scheduler (it is no longer scheduled) but keeps its KV blocks, which are returned,
        until release(): the blocks whose contents move to another engine."""
        self.running.remove(req)
        req.status = RequestStatus.FINISHED
        return list(self.kv.block_table(req))

    def release(self, req: Request) -> None:
        """Frees the KV a detached request kept (once its contents have moved, or it was aborted)."""
        self.kv.free(req)

    def attach_computed(self, req: Request) -> list[int] | None:
        """Takes in a request whose first req.num_computed_tokens tokens were computed elsewhere: blocks for them
        (their contents are written by the executor), and the request runs, decoding, from the next step; None
        (nothing taken) while the pool has no room for them and one more token."""
        computed, req.num_computed_tokens = req.num_computed_tokens, 0
        if not (self.kv.can_allocate(req, computed + 1) and self.kv.try_allocate(req, computed)):
            req.num_computed_tokens = computed
            return None
        req.num_computed_tokens = computed
        self.kv.computed(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return list(self.kv.block_table(req))

    def drop(self, req: Request, reason: str, out: SchedulerOutput) -> None:
        """The policy ends a request itself (e.g. one that can no longer meet its deadline): it leaves and frees its
        KV now, and the engine ends it with finish_reason `reason` when it reads the plan."""
        self.finish(req)
        out.dropped.append((req, reason))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_requests(self) -> tuple[int, int]:
        return len(self.running), len(self.waiting)

    def admit(self, req: Request) -> None:
        """Moves a waiting request to the running list (reserve() does this when it first gets KV)."""
        self.waiting.remove(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def preempt(self, req: Request, out: SchedulerOutput) -> None:
        """Puts the victim back at the front of the queue. Recompute preemption frees its KV: its generated
        tokens become part of what it must recompute, so nothing it produced is lost (and what stays cached of its
        blocks is not computed again). Swap preemption (preemption_mode=swap, when the KV manager has room in its
        host pool) moves its blocks to host memory instead: it keeps its computed tokens and its next allocation
        brings them back."""
        self.running.remove(req)
        if self.config.preemption_mode == "swap" and self.kv.can_swap_out(req):
            self.kv.swap_out(req)
        else:
            self.kv.free(req)
            req.num_computed_tokens = self.kv.cached_prefix(req)
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def victim(self, out: SchedulerOutput) -> Request | None:
        """The request to preempt: the newest running one not already scheduled in this step."""
        scheduled = {id(c.request) for c in out.chunks}
        candidates = [r for r in self.running if id(r) not in scheduled]
        if not candidates:
            return None
        key = (lambda r: r.arrival_time) if self.config.preemption == "newest" else (lambda r: -r.arrival_time)
        return max(candidates, key=key)

    def reserve(self, req: Request, n: int, out: SchedulerOutput, preempt: bool = True) -> bool:
        """Finds KV for n more tokens of req, preempting victims if allowed; on success adds the chunk."""
        while not self.kv.try_allocate(req, n):
            victim = self.victim(out) if preempt else None
            if victim is None:
                return False
            self.preempt(victim, out)
            if victim is req:
                return False
        out.chunks.append(ScheduledChunk(req, n))
        if req.status is RequestStatus.WAITING:
            self.admit(req)
        return True

    def schedule_decodes(self, out: SchedulerOutput, budget: int, preempt: bool = True,
                         speculate: bool = True) -> int:
        """One token for every running request that is decoding, oldest first, then (`speculate`) proposal slots
        for them from what is left of the budget; returns the budget left."""
        chunks, max_seqs, running = out.chunks, self.config.max_seqs, RequestStatus.RUNNING
        for req in list(self.running):
            if budget < 1 or len(chunks) >= max_seqs:
                break
            if req.status is running and req.is_decode and self.reserve(req, 1, out, preempt):
                budget -= 1
        return budget - self.schedule_speculation(out, budget) if speculate else budget

    # -- speculative decoding ----------------------------------------------------------------------------------------
    def speculation_k(self, req: Request) -> int:
        """Proposal slots a decode of `req` may take this step: the proposer's k, fewer near its max_new_tokens (its
        KV stays within max_kv_tokens), none for a request of several sequences or under a grammar (its matcher
        advances one accepted token at a time). A policy may size it by the request's acceptance so far
        (req.speculation)."""
        if not self.max_speculative or req.sampling.num_sequences > 1 or req.sampling.structured is not None:
            return 0
        return max(0, min(self.max_speculative, req.sampling.max_new_tokens - len(req.output_token_ids) - 1))

    def schedule_speculation(self, out: SchedulerOutput, budget: int | None = None) -> int:
        """Proposal slots for the decodes already in `out`, in order, from `budget` (None: the policy has no token
        budget for decodes) and only where free KV blocks are (never preempting); returns the slots granted."""
        granted = 0
        if not self.max_speculative:
            return granted
        for c in out.chunks:
            if budget is not None and budget - granted < 1:
                break
            req = c.request
            if c.num_speculative or c.num_pad or c.num_tokens != 1 or not req.is_decode:
                continue
            n = self.speculation_k(req) if budget is None else min(self.speculation_k(req), budget - granted)
            if n > 0 and self.kv.try_allocate(req, 1 + n):
                c.num_speculative = n
                granted += n
        return granted

    def until_progress(self, plan: Callable[[SchedulerOutput], object]) -> SchedulerOutput:
        """Runs `plan`; while it schedules nothing, preempts the victim and runs it again. Requests that each hold
        part of the pool and each wait for more would otherwise deadlock (DeepSpeed-MII flushes likewise)."""
        out = SchedulerOutput()
        while True:
            plan(out)
            victim = None if out else self.victim(out)
            if victim is None:
                return out
            self.preempt(victim, out)

    # -- class-aware ordering, shared by priority, edf and vtc ----------------------------------------------------
    def worst_running(self, out: SchedulerOutput, key: Callable[[Request], tuple],
                      worse_than: tuple | None = None) -> Request | None:
        """The running request with the largest `key` (the least urgent) not already scheduled in this step, and
        only one whose key is larger than `worse_than` when that is given."""
        scheduled = {id(c.request) for c in out.chunks}
        candidates = [r for r in self.running if id(r) not in scheduled and (worse_than is None or key(r) > worse_than)]
        return max(candidates, key=key, default=None)

    def reserve_before(self, req: Request, n: int, out: SchedulerOutput, key: Callable[[Request], tuple]) -> bool:
        """KV for n more tokens of req (a waiting request: room for all its pending tokens, as SplitFuse starts a
        prompt), preempting, while the pool is short, the least urgent running request that is less urgent than
        req (by `key`); on success adds the chunk."""
        rank, kv = key(req), self.kv
        need = req.num_pending_tokens if req.status is RequestStatus.WAITING else None   # None: try_allocate checks
        while not ((need is None or kv.can_allocate(req, need)) and kv.try_allocate(req, n)):
            victim = self.worst_running(out, key, rank)
            if victim is None:
                return False
            self.preempt(victim, out)
        out.chunks.append(ScheduledChunk(req, n))
        if req.status is RequestStatus.WAITING:
            self.admit(req)
        return True

    def schedule_by_key(self, out: SchedulerOutput, budget: int, key: Callable[[Request], tuple],
                        head_of_line: bool = True) -> int:
        """Running and waiting requests in order of `key` (smallest, the most urgent, first), each a decode token
        or as many prompt tokens as the budget leaves (SplitFuse's budget); a more urgent request takes budget
        first and, when the pool is short, the KV of the least urgent running ones (preempted: recomputed or swapped). A
        waiting request that cannot start even so stops the queue (head-of-line, as vLLM's priority policy does;
        head_of_line=False: it is skipped and the next one tried); a decode that cannot get a block waits a step.
        Returns the budget left."""
        scheduled = {id(c.request) for c in out.chunks}
        for req in sorted(self.running + list(self.waiting), key=key):
            if budget < 1 or len(out.chunks) >= self.config.max_seqs:
                break
            if id(req) in scheduled or req.status is RequestStatus.FINISHED:
                continue
            decode = req.status is RequestStatus.RUNNING and req.is_decode
            n = 1 if decode else min(req.num_pending_tokens, budget)
            if self.reserve_before(req, n, out, key):
                budget -= n
            elif req.status is RequestStatus.WAITING and head_of_line:
                break
        return budget - self.schedule_speculation(out, budget)

    def prefill_candidates(self) -> list[Request]:
        """Running requests part-way through their prompt, then the waiting queue in order."""
        return [r for r in self.running if not r.is_decode] + list(self.waiting)
