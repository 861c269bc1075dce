"""EngineLoop: the one thread that touches the engine, beside the asyncio event loop that serves HTTP.

The engine is not thread-safe, and a step blocks for the whole forward pass, so it cannot run on the event loop
either. Handlers post commands (add, abort) to a thread-safe queue; the thread applies them between steps, runs
steps while there is work and sleeps on the queue when there is none. Each step's results go back in one
`call_soon_threadsafe` to the event loop, which fans them out to per-request asyncio queues. Whatever one request
does wrong (add_request refusing it, or a step failing) is reported to the requests concerned; the thread lives on.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fastgen.engine import LLMEngine
from fastgen.sampling import SamplingParams
from fastgen.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Update:
    """What the engine thread reports about one request. The first update of an accepted request is empty."""

    token_ids: tuple[int, ...] = ()
    text: str = ""                         # the engine's text delta (held back before a possible stop string)
    finish_reason: str | None = None       # set on the last update
    error: Exception | None = None         # add_request refused the request, or a step failed

    @property
    def last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class RequestStream:
    """One request as a handler sees it: the engine thread's updates, read against the request's deadline."""

    def __init__(self, request_id: str, prompt_tokens: int, deadline: float):
        self.request_id, self.prompt_tokens, self.deadline = request_id, prompt_tokens, deadline
        self.finished = False
        self._updates: asyncio.Queue[Update] = asyncio.Queue()

    def deliver(self, update: Update) -> None:
        self._updates.put_nowait(update)

    async def accepted(self) -> None:
        """Returns once the engine holds the request; raises its refusal (ValueError) or asyncio.TimeoutError."""
        await self._next()

    async def updates(self) -> AsyncIterator[Update]:
        """The token updates up to and including the last one; raises a step failure or asyncio.TimeoutError."""
        while not self.finished:
            yield await self._next()

    async def _next(self) -> Update:
        timeout = self.deadline - asyncio.get_running_loop().time()
        update = await asyncio.wait_for(self._updates.get(), max(timeout, 0.0))
        self.finished = update.last
        if update.error is not None:
            raise update.error
        return update


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float


@dataclass(frozen=True)
class _Abort:
    request_id: str


_STOP = object()


class EngineLoop:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics):
        self.engine, self.metrics = engine, metrics
        engine.add_step_observer(metrics.observe_step)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}     # unfinished requests; event-loop thread only
        self._in_engine: set[str] = set()                # requests the engine holds; engine thread only
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="fastgen-engine", daemon=True)

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
    def num_active(self) -> int:
        """Requests submitted and not yet finished: what max_concurrent_requests bounds."""
        return len(self._streams)

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
               timeout_s: float) -> RequestStream:
        if not self.alive:
            raise RuntimeError("the engine thread is not running; see the server log")
        stream = RequestStream(request_id, len(prompt_token_ids), self._event_loop.time() + timeout_s)
        self._streams[request_id] = stream
        self._commands.put(_Add(request_id, prompt_token_ids, sampling, self.engine.clock()))
        return stream

    def release(self, stream: RequestStream) -> None:
        """The handler is done with the stream (finished, client gone, timed out): an unfinished request is
        aborted, which frees its KV blocks at the engine's next look at the queue."""
        if self._streams.pop(stream.request_id, None) is not None:
            self._commands.put(_Abort(stream.request_id))

    def _dispatch(self, updates: list[tuple[str, Update]]) -> None:
        for request_id, update in updates:
            stream = self._streams.get(request_id)
            if stream is None:          # released: nobody is listening any more
                continue
            if update.last:
                del self._streams[request_id]
            stream.deliver(update)

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
            self._in_engine.discard(command.request_id)
            return []
        try:
            self.engine.add_request(command.prompt_token_ids, command.sampling, command.request_id,
                                    command.arrival_time)
        except Exception as e:      # any refusal belongs to that request alone
            return [(command.request_id, Update(error=e))]
        self._in_engine.add(command.request_id)
        self.metrics.prompt_tokens.inc(len(command.prompt_token_ids))
        return [(command.request_id, Update())]

    def _step(self) -> list[tuple[str, Update]]:
        try:
            outputs = self.engine.step()
        except Exception as e:      # fail the requests in flight, keep serving new ones
            log.exception("engine step failed; aborting the %d requests in flight", len(self._in_engine))
            return [(rid, Update(error=RuntimeError(f"the engine step failed: {e}"))) for rid in self._abort_all()]
        self.metrics.observe_outputs(outputs)
        for out in outputs:
            if out.finished:
                self._in_engine.discard(out.request_id)
        return [(out.request_id, Update(tuple(out.new_token_ids), out.new_text, out.finish_reason))
                for out in outputs]

    def _abort_all(self) -> Sequence[str]:
        ids = list(self._in_engine)
        for rid in ids:
            self.engine.abort(rid)
        self._in_engine.clear()
        return ids
