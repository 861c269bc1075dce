"""DisaggregatedEngine: prefill and decode pools behind one engine's interface (DistServe, Splitwise; vLLM's
disaggregated prefill). A request runs its prompt on a prefill engine, which samples its first token; its KV
moves (a KV connector, fastgen.kv.connector) to a decode engine, which takes it in when it has room and decodes it
to its end. The first token is delivered when the KV has landed, so TTFT counts the transfer and any wait for
room on the decode side. Prefill and decode engines are picked by routers (fastgen.routers), each over its pool's
outstanding requests; any scheduler runs either pool (the prefill pool's requests leave it at their first token,
the decode pool's arrive decoding).

Engines are on one shared clock (real engines: the wall clock; in this process, a step of one engine runs at a
time, in turn; in processes of their own (fastgen.engine_process), every engine with work steps at once, and
transfers land on their decode engines between these steps), or each on its own virtual clock (simulated
engines): then this is a discrete-event simulation, each step being the earliest event of all engines (an idle
engine's clock catches up with the deployment's when work reaches it), and a transfer of n bytes lands
connector.seconds(n) after the step that exported it. Transfers do not queue on a link (each pair of engines
moves its requests' KV independently).

Faults: `fail_decode(i)` marks a decode engine dead; the transfers bound to it go to another live one, the
requests it was decoding fail alone (their KV is lost) with an error naming it; with no live decode engine left, a
request fails alone with an error saying so. Nothing is lost or finished twice. A decode engine in a process of its
own that exits is failed so when a call to it finds its process gone (its failed requests come out of the next
step).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from fastgen.engine import LLMEngine, RequestOutput, StepObserver
from fastgen.engine_process import EngineDied, EngineProcess
from fastgen.handoff import Handoff
from fastgen.request import Request
from fastgen.routers import Router
from fastgen.sampling import ParameterError, SamplingParams
from fastgen.sim.clocks import VirtualClock
from fastgen.step_stats import EngineSnapshot

log = logging.getLogger(__name__)


@dataclass
class Transfer:
    """A request between pools: exported by prefill engine `source`, bound for decode engine `target`, its KV
    at the target from `ready` on (the deployment's clock)."""

    handoff: Handoff
    source: int
    target: int
    ready: float
    contents: torch.Tensor | None
    output: RequestOutput          # its first token, delivered when it lands


class DisaggregatedEngine:
    def __init__(self, prefill: Sequence[LLMEngine], decode: Sequence[LLMEngine], connector,
                 prefill_router: Router, decode_router: Router):
        if not prefill or not decode:
            raise ValueError("a disaggregated deployment needs at least one prefill and one decode engine")
        self.prefill, self.decode = list(prefill), list(decode)
        engines = self.prefill + self.decode
        clocks = {id(e.clock) for e in engines}
        self.virtual = len(clocks) == len(engines) and all(isinstance(e.clock, VirtualClock) for e in engines)
        self.concurrent = all(isinstance(e, EngineProcess) for e in engines)
        if not self.virtual and len(clocks) > 1:
            raise ValueError("a disaggregated deployment's engines share one clock (in-process real engines) or "
                             "each has its own virtual clock (executor=simulated)")
        self.clock: Callable[[], float] = VirtualClock(max(e.clock() for e in engines)) if self.virtual \
            else engines[0].clock
        first = self.prefill[0]
        self.tokenizer, self.spec, self.vocab_size = first.tokenizer, first.spec, first.vocab_size
        self.max_model_len = min(e.max_model_len for e in engines)
        self.connector = connector
        self.routers = prefill_router, decode_router
        self.outstanding = [0] * len(self.prefill), [0] * len(self.decode)
        self.alive = [True] * len(self.decode)
        self.transfers: list[Transfer] = []
        self.blocked: set[int] = set()    # prefill engines whose pool is full of KV waiting to move
        self.step_end = self.clock()              # when the last step's outputs were out
        self._where: dict[str, tuple[int, int]] = {}   # request id -> (0 prefill / 1 decode, engine index)
        self._turn = itertools.count()
        self._last_run = [0] * len(engines)
        self._ids = itertools.count()
        self._pending: list[RequestOutput] = []   # outputs made between steps (a decode engine found dead)

    # -- the engine's interface -----------------------------------------------------------------------------------
    def add_request(self, prompt, sampling: SamplingParams | None = None, request_id: str | None = None,
                    arrival_time: float | None = None, **request_class) -> str:
        sampling = sampling or SamplingParams()
        if sampling.num_sequences > 1:
            raise ParameterError("n", "a disaggregated deployment runs one sequence per request (n = best_of = 1)")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._where:
            raise ValueError(f"request id {request_id!r} is already in use")
        p = self.routers[0].choose(self.outstanding[0])
        engine = self.prefill[p]
        self._catch_up(engine, self.clock())
        engine.add_request(prompt, sampling, request_id, self.clock() if arrival_time is None else arrival_time,
                           **request_class)
        self._where[request_id] = (0, p)
        self.outstanding[0][p] += 1
        return request_id

    def has_unfinished(self) -> bool:
        return bool(self.transfers or self._pending) or any(e.has_unfinished() for e in self.prefill + self.decode)

    def add_step_observer(self, observer: StepObserver) -> None:
        """Every engine's steps, each labelled with its pool (`StepStats.pool`)."""
        for pool, engines in (("prefill", self.prefill), ("decode", self.decode)):
            for e in engines:
                e.add_step_observer(lambda stats, pool=pool: observer(replace(stats, pool=pool)))

    def abort(self, request_id: str) -> Request | None:
        where = self._where.pop(request_id, None)
        if where is None:
            return None
        transfer = next((t for t in self.transfers if t.handoff.request_id == request_id), None)
        if transfer is not None:
            self.transfers.remove(transfer)
            self.outstanding[1][transfer.target] -= 1
            self.blocked.discard(transfer.source)
            return self.prefill[transfer.source].abort(request_id)
        pool, i = where
        self.outstanding[pool][i] -= 1
        try:
            return (self.prefill, self.decode)[pool][i].abort(request_id)
        except EngineDied as e:
            if pool == 0:
                raise
            self._pending += self.fail_decode(i, str(e))
            return None

    def snapshot(self) -> EngineSnapshot:
        """Both pools together (decode engines that failed left out): requests whose KV is moving count as
        waiting; their blocks are held (on the prefill side) until they land."""
        shots = [e.snapshot() for e in self.prefill + self._live_decode()]
        running, waiting, total, free, steps = (sum(col) for col in zip(*(dataclasses.astuple(s) for s in shots)))
        return EngineSnapshot(running, waiting + len(self.transfers), total, free, steps)

    def close(self) -> None:
        if self.concurrent:                    # every worker process asked to stop before any is waited for
            for e in self.prefill + self.decode:
                e.stop()
        for e in self.prefill + self.decode:
            e.close()

    # -- the loop -------------------------------------------------------------------------------------------------
    def next_event_time(self) -> float:
        """When the next step of any engine starts (inf: none has work)."""
        return min((t for t, _ in self._events()), default=math.inf)

    def step(self) -> list[RequestOutput]:
        """Runs the earliest event: a prefill engine's step (its requests that got their first token leave it with
        their KV), or a decode engine's (first taking in the transfers that have landed there)."""
        if self.concurrent:
            return self._step_all()
        events = self._events()
        if not events:
            return self._take_pending()
        _, k = min(events, key=lambda e: (e[0], self._last_run[e[1]]))
        self._last_run[k] = next(self._turn) + 1
        if k < len(self.prefill):
            engine = self.prefill[k]
            self._set_now(engine.clock())
            steps = engine.snapshot().num_steps
            outputs = self._prefill_outputs(k, engine.step())
            if engine.snapshot().num_steps == steps:      # nothing fits beside the KV it keeps for the decode side
                self.blocked.add(k)
        else:
            d = k - len(self.prefill)
            engine = self.decode[d]
            start = engine.clock() if engine.has_unfinished() else \
                max(engine.clock(), min(t.ready for t in self.transfers if t.target == d))
            self._catch_up(engine, start)
            self._set_now(start)
            outputs = self._land(d)
            if engine.has_unfinished():
                outputs += self._decoded(engine.step())
        self.step_end = engine.clock()
        return self._take_pending() + outputs

    def _step_all(self) -> list[RequestOutput]:
        """Engines in processes of their own: the transfers that have landed go in, then every engine with work
        steps at once; a decode engine found dead on the way is failed (fail_decode)."""
        for d in range(len(self.decode)):
            if self.alive[d] and any(t.target == d for t in self.transfers):
                self._pending += self._on_decode(d, lambda: self._land(d))
        started, num_prefill = [], len(self.prefill)
        # decode engines start first: one found dead is failed before any prefill engine is busy with a step
        for k in sorted((k for _, k in self._events()), key=lambda k: k < num_prefill):
            try:
                (self.prefill + self.decode)[k].start_step()
                started.append(k)
            except EngineDied as e:
                self._pending += self.fail_decode(k - num_prefill, str(e))
        outputs = self._take_pending()
        for k in sorted(started):
            if k < num_prefill:
                engine, steps = self.prefill[k], self.prefill[k].snapshot().num_steps
                outputs += self._prefill_outputs(k, engine.finish_step())
                if engine.snapshot().num_steps == steps:
                    self.blocked.add(k)
            else:
                d = k - num_prefill
                outputs += self._on_decode(d, lambda: self._decoded(self.decode[d].finish_step()))
        self.step_end = self.clock()
        return outputs + self._take_pending()

    def _on_decode(self, d: int, call: Callable):
        """call()'s result, or, if decode engine d's process is found gone, the outputs of failing it."""
        try:
            return call()
        except EngineDied as e:
            log.warning("decode engine %d is gone: %s", d, e)
            return self.fail_decode(d, str(e))

    def _decoded(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        for out in outputs:
            if out.finished:
                self._done(out.request_id)
        return outputs

    def _live_decode(self) -> list:
        return [e for e, alive in zip(self.decode, self.alive) if alive]

    def _take_pending(self) -> list[RequestOutput]:
        pending, self._pending = self._pending, []
        return pending

    def fail_decode(self, index: int, reason: str = "it stopped") -> list[RequestOutput]:
        """Decode engine `index` is gone: what it was decoding fails (its KV was there); what was bound for it goes
        to another live decode engine, or fails if none is left. Returns the failed requests' outputs."""
        self.alive[index] = False
        engine, outputs = self.decode[index], []
        moving = {t.handoff.request_id for t in self.transfers}
        for request_id in [r for r, w in self._where.items() if w == (1, index) and r not in moving]:
            req = engine.abort(request_id)
            del self._where[request_id]
            self.outstanding[1][index] -= 1
            error = f"decode instance {index} failed ({reason}) while decoding it"
            req.finish_reason, req.trace.finish_time = "error", None
            req.trace.finish_reason = f"error: {error}"
            outputs.append(RequestOutput(request_id, [], req.trace, True, "error", request=req, error=error))
        for t in [t for t in self.transfers if t.target == index]:
            if any(self.alive):
                self.outstanding[1][index] -= 1
                t.target = self._choose_decode()
                self.outstanding[1][t.target] += 1
                self._where[t.handoff.request_id] = (1, t.target)
            else:
                outputs.append(self._fail_transfer(t, f"no decode instance is alive (instance {index} failed: "
                                                      f"{reason}); add decode replicas"))
        return outputs

    # -- internals ------------------------------------------------------------------------------------------------
    def _events(self) -> list[tuple[float, int]]:
        """(start time, engine index: prefill engines, then decode engines) of every engine that has work."""
        out = [(e.clock(), k) for k, e in enumerate(self.prefill) if e.has_unfinished() and k not in self.blocked]
        for d, e in enumerate(self.decode):
            landing = [t.ready for t in self.transfers if t.target == d]
            if e.has_unfinished():
                out.append((e.clock(), len(self.prefill) + d))
            elif landing:
                out.append((max(e.clock(), min(landing)), len(self.prefill) + d))
        return out if self.virtual else [(0.0, k) for _, k in out]

    def _prefill_outputs(self, p: int, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Finished requests (a first token that ends them) pass; one with its first token leaves for a decode
        engine with its KV; its output waits for the landing."""
        passed, engine = [], self.prefill[p]
        for out in outputs:
            if out.finished:
                passed.append(out)
                self._done(out.request_id)
                continue
            start = time.perf_counter()
            handoff = engine.export_request(out.request_id)
            contents = self.connector.move(engine.read_kv(out.request_id))
            seconds = self.connector.seconds(handoff.nbytes)
            handoff.trace.kv_transfer_bytes = handoff.nbytes
            handoff.trace.kv_transfer_s = time.perf_counter() - start if seconds is None else seconds
            self.outstanding[0][p] -= 1
            if not any(self.alive):
                passed.append(self._fail_transfer(Transfer(handoff, p, -1, 0.0, contents, out),
                                                  "no decode instance is alive; add decode replicas"))
                continue
            d = self._choose_decode()
            self.outstanding[1][d] += 1
            self._where[out.request_id] = (1, d)
            self.transfers.append(Transfer(handoff, p, d, engine.clock() + (seconds or 0.0), contents, out))
        return passed

    def _land(self, d: int) -> list[RequestOutput]:
        """Decode engine d takes in the transfers that have landed there, in order, while it has room; each one's
        first token is delivered now. One that could never fit fails alone."""
        engine, outputs = self.decode[d], []
        for t in [t for t in self.transfers if t.target == d and t.ready <= engine.clock()]:
            start = time.perf_counter()
            try:
                taken = engine.import_request(t.handoff, t.contents)
            except ValueError as e:
                outputs.append(self._fail_transfer(t, f"decode instance {d} cannot take it: {e}"))
                continue
            if not taken:
                if engine.has_unfinished():
                    break               # its pool is full: wait for room (the prefill engine keeps the KV)
                outputs.append(self._fail_transfer(t, f"it does not fit decode instance {d}'s whole KV pool"))
                continue
            self.transfers.remove(t)
            self._release(t.source, t.handoff.request_id, engine.clock())
            trace = t.handoff.trace
            if self.connector.seconds(0) is None:        # a real move: reading out, and now writing in
                trace.kv_transfer_s += time.perf_counter() - start
            trace.decode_wait_s = engine.clock() - t.ready
            trace.token_times[0] = engine.clock()
            outputs.append(t.output)
        return outputs

    def _release(self, p: int, request_id: str, now: float) -> None:
        """Prefill engine p frees a moved request's KV; if that engine was blocked for room, it goes on from now."""
        self.prefill[p].release(request_id)
        if p in self.blocked:
            self.blocked.discard(p)
            if self.virtual and self.prefill[p].clock() < now:
                self.prefill[p].clock.sleep(now - self.prefill[p].clock())

    def _fail_transfer(self, t: Transfer, error: str) -> RequestOutput:
        if t in self.transfers:
            self.transfers.remove(t)
        if t.target >= 0:
            self.outstanding[1][t.target] -= 1
        rid = t.handoff.request_id
        self._where.pop(rid, None)
        self.blocked.discard(t.source)
        req = self.prefill[t.source].abort(rid)
        log.warning("request %s failed: %s", rid, error)
        req.finish_reason, req.trace.finish_time = "error", None
        req.trace.finish_reason = f"error: {error}"
        return RequestOutput(rid, [], req.trace, True, "error", request=req, error=error)

    def _choose_decode(self) -> int:
        d = self.routers[1].choose(self.outstanding[1])
        if self.alive[d]:
            return d
        return min((i for i in range(len(self.decode)) if self.alive[i]), key=self.outstanding[1].__getitem__)

    def _done(self, request_id: str) -> None:
        pool, i = self._where.pop(request_id)
        self.outstanding[pool][i] -= 1

    def _catch_up(self, engine: LLMEngine, now: float) -> None:
        """An idle engine on a virtual clock starts its next work no earlier than `now`."""
        if self.virtual and not engine.has_unfinished() and engine.clock() < now:
            engine.clock.sleep(now - engine.clock())

    def _set_now(self, t: float) -> None:
        if self.virtual and t > self.clock():
            self.clock.sleep(t - self.clock())
