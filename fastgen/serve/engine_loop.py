"""EngineLoop: the one thread that touches the engine, beside the asyncio event loop that serves HTTP.

The engine is not thread-safe, and a step blocks for the whole forward pass, so it cannot run on the event loop
either. Handlers post commands (add, abort) to a thread-safe queue; the thread applies them between steps, runs
steps while there is work and sleeps on the queue when there is none. Each step's results go back in one
`call_soon_threadsafe` to the event loop, which fans them out to the handlers' groups. One HTTP request is one
`RequestGroup`: its engine requests (one per prompt; a request with n > 1 or best_of has its choices forked by
the engine, sharing the prompt's KV) read together against one deadline. Whatever goes
wrong with one request (add_request refusing it, its own failure in a step) is reported to that request alone; a
step that raises (the engine's own fault) fails the requests in flight, and the thread lives on.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fastgen.disaggregated import DisaggregatedEngine
from fastgen.engine import LLMEngine, RequestOutput
from fastgen.request_trace import DEFAULT_TENANT, SLO
from fastgen.sampling import SamplingParams, TokenLogprob
from fastgen.serve.prometheus import ServerMetrics

log = logging.getLogger(__name__)


class RequestFailed(RuntimeError):
    """The engine ended a request with an error after accepting it (its own failure, or a failed step)."""


class ReplicaUnavailable(RuntimeError):
    """The engine replica serving the request died (fastgen.serve.replicas): a 503 naming the cause."""


class ServerShuttingDown(asyncio.TimeoutError):
    """The request was still running when the server's shutdown grace period ended."""


@dataclass(frozen=True)
class Update:
    """What the engine thread reports about one engine request. The first update of an accepted request is
    empty."""

    token_ids: tuple[int, ...] = ()
    text: str = ""                         # the engine's text delta (held back before a possible stop string)
    finish_reason: str | None = None       # set on the last update
    error: Exception | None = None         # add_request refused the request, or it failed
    logprobs: Sequence[TokenLogprob] | None = None          # per new token, if asked for
    prompt_logprobs: Sequence[TokenLogprob] | None = None   # with the first token, if asked for
    index: int = 0                         # which of the request's n choices

    @property
    def last(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    @classmethod
    def of(cls, out: RequestOutput) -> "Update":
        if out.error is not None:
            return cls(error=RequestFailed(out.error))
        return cls(tuple(out.new_token_ids), out.new_text, out.finish_reason, None, out.logprobs,
                   out.prompt_logprobs, out.index)


@dataclass(frozen=True)
class SequenceRequest:
    """One engine request of a group."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: int = 0                      # lower is more urgent
    tenant: str = DEFAULT_TENANT
    slo: SLO | None = None                 # the server's (ServeConfig.slo)


_WAKE = object()      # put in a group's queue when its deadline moves


class RequestGroup:
    """One HTTP request as its handler sees it: the updates of its engine requests' choices, tagged with the
    choice's slot (request k's choice j is slot sum of the n of requests before k, + j), read against the request's
    deadline."""

    def __init__(self, requests: Sequence[SequenceRequest], deadline: float):
        self.requests = list(requests)
        first = [0]
        for r in self.requests:
            first.append(first[-1] + r.sampling.n)
        self.first_slot = {r.request_id: first[k] for k, r in enumerate(self.requests)}
        self.slot_request = [r for r in self.requests for _ in range(r.sampling.n)]
        self._open = {r.request_id: set(range(r.sampling.n)) for r in self.requests}    # choices not yet ended
        self.deadline = deadline
        self.unfinished = set(range(first[-1]))
        self.shutdown_grace_s: float | None = None    # set when a shutdown cut the deadline
        self._early: list[tuple[int, Update]] = []    # updates that came while `accepted` waited for the others
        self._updates: asyncio.Queue = asyncio.Queue()

    def active_sequences(self, live) -> int:
        """Sequences (choices, or best_of) of this group's requests still in `live` (ids of unfinished requests)."""
        return sum(r.sampling.num_sequences for r in self.requests if r.request_id in live)

    @property
    def prompt_tokens(self) -> list[int]:
        return [len(r.prompt_token_ids) for r in self.requests]

    def deliver(self, request_id: str, update: Update) -> None:
        self._updates.put_nowait((self.first_slot[request_id] + update.index, update))

    def closes(self, request_id: str, update: Update) -> bool:
        """Whether this update ends the engine request (its last open choice's end, or its failure); called by the
        dispatcher, once per update, before it is delivered."""
        open_choices = self._open[request_id]
        if update.error is not None:
            open_choices.clear()
        elif update.last:
            open_choices.discard(update.index)
        return not open_choices

    def cut(self, deadline: float, grace_s: float) -> None:
        if deadline < self.deadline:
            self.deadline, self.shutdown_grace_s = deadline, grace_s
            self._updates.put_nowait(_WAKE)

    async def accepted(self) -> None:
        """Returns once the engine holds every request of the group; raises the first refusal (a ValueError,
        mostly fastgen.sampling.ParameterError) or a timeout. Each request's first update is its acceptance; a
        request's later updates may come before another's acceptance (replicas stream independently): they are
        kept for `updates`."""
        accepted: set[str] = set()
        while len(accepted) < len(self.requests):
            slot, update = await self._next()
            request_id = self.slot_request[slot].request_id
            if request_id in accepted:
                self._early.append((slot, update))
            accepted.add(request_id)

    async def updates(self) -> AsyncIterator[tuple[int, Update]]:
        """(index, update) up to each request's last update; raises a failure or a timeout."""
        while self._early:
            yield self._early.pop(0)
        while self.unfinished:
            yield await self._next()

    async def _next(self) -> tuple[int, Update]:
        while True:
            timeout = self.deadline - asyncio.get_running_loop().time()
            try:
                item = await asyncio.wait_for(self._updates.get(), max(timeout, 0.0))
            except asyncio.TimeoutError:
                if self.shutdown_grace_s is not None:
                    raise ServerShuttingDown() from None
                raise
            if item is _WAKE:
                continue
            index, update = item
            if update.last:
                self.unfinished.discard(index)
            if update.error is not None:
                raise update.error
            return index, update


@dataclass(frozen=True)
class _Add:
    request: SequenceRequest
    arrival_time: float


@dataclass(frozen=True)
class _Abort:
    request_id: str


_STOP = object()


class EngineLoop:
    def __init__(self, engine: LLMEngine | DisaggregatedEngine, metrics: ServerMetrics):
        self.engine, self.metrics = engine, metrics
        engine.add_step_observer(metrics.observe_step)
        metrics.observe_engine(engine.snapshot())          # the gauges are right before the first request
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._groups: dict[str, RequestGroup] = {}       # unfinished engine requests; event-loop thread only
        self._in_engine: dict[str, int] = {}             # requests the engine holds: choices yet to finish;
        #                                                  engine thread only
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="fastgen-engine", daemon=True)
        self.shutting_down = False

    # -- the event-loop side -------------------------------------------------------------------------------------
    def start(self, event_loop: asyncio.AbstractEventLoop) -> None:
        self._event_loop = event_loop
        self._thread.start()

    def stop(self) -> None:
        self._commands.put(_STOP)
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    async def render_metrics(self) -> bytes:
        return self.metrics.render()

    async def health(self) -> tuple[int, dict]:
        if self.alive:
            return 200, {"status": "ok"}
        return 503, {"status": "the engine thread has stopped"}

    @property
    def num_active(self) -> int:
        """Sequences of the engine requests submitted and not yet finished: what max_concurrent_requests bounds."""
        return sum(group.active_sequences(self._groups) for group in set(self._groups.values()))

    def submit(self, requests: Sequence[SequenceRequest], timeout_s: float) -> RequestGroup:
        if not self.alive:
            raise RuntimeError("the engine thread is not running; see the server log")
        group = RequestGroup(requests, self._event_loop.time() + timeout_s)
        now = self.engine.clock()
        for r in requests:
            self._groups[r.request_id] = group
            self._commands.put(_Add(r, now))
        return group

    def release(self, group: RequestGroup) -> None:
        """The handler is done with the group (finished, client gone, timed out): its unfinished requests are
        aborted, which frees their KV blocks at the engine's next look at the queue."""
        for r in group.requests:
            if self._groups.pop(r.request_id, None) is not None:
                self._commands.put(_Abort(r.request_id))

    def begin_shutdown(self, grace_s: float) -> None:
        """Refuse new requests; the ones in flight get `grace_s` more seconds, then end with a clear error."""
        self.shutting_down = True
        deadline = self._event_loop.time() + grace_s
        for group in set(self._groups.values()):
            group.cut(deadline, grace_s)

    def _dispatch(self, updates: list[tuple[str, Update]]) -> None:
        for request_id, update in updates:
            group = self._groups.get(request_id)
            if group is None:          # released: nobody is listening any more
                continue
            if group.closes(request_id, update):
                del self._groups[request_id]
            group.deliver(request_id, update)

    # -- the engine thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            commands = self._take_commands(block=not self.engine.has_unfinished())
            if _STOP in commands:
                return
            updates = [u for command in commands for u in self._apply(command)]
            if self.engine.has_unfinished():
                updates += self._step()
            self.metrics.observe_engine(self.engine.snapshot())
            if updates:
                self._event_loop.call_soon_threadsafe(self._dispatch, updates)

    def _take_commands(self, block: bool) -> list:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: _Add | _Abort) -> list[tuple[str, Update]]:
        if isinstance(command, _Abort):
            self.engine.abort(command.request_id)
            self._in_engine.pop(command.request_id, None)
            return []
        r = command.request
        try:
            self.engine.add_request(r.prompt_token_ids, r.sampling, r.request_id, command.arrival_time,
                                    priority=r.priority, tenant=r.tenant, slo=r.slo)
        except Exception as e:      # any refusal belongs to that request alone
            return [(r.request_id, Update(error=e))]
        self._in_engine[r.request_id] = r.sampling.n
        self.metrics.requests.inc()
        self.metrics.prompt_tokens.inc(len(r.prompt_token_ids))
        return [(r.request_id, Update())]

    def _step(self) -> list[tuple[str, Update]]:
        try:
            outputs = self.engine.step()
        except Exception as e:      # the engine's own fault: fail the requests in flight, keep serving new ones
            log.exception("engine step failed; aborting the %d requests in flight", len(self._in_engine))
            return [(rid, Update(error=RequestFailed(f"the engine step failed: {e}"))) for rid in self._abort_all()]
        self.metrics.observe_outputs(outputs)
        for out in outputs:
            if out.finished and out.request_id in self._in_engine:
                self._in_engine[out.request_id] -= 1
                if not self._in_engine[out.request_id] or out.error is not None:
                    del self._in_engine[out.request_id]
        return [(out.request_id, Update.of(out)) for out in outputs]

    def _abort_all(self) -> Sequence[str]:
        ids = list(self._in_engine)
        for rid in ids:
            self.engine.abort(rid)
        self._in_engine.clear()
        return ids
