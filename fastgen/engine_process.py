"""EngineProcess: an engine in an OS process of its own, driven from this one through the engine's interface
(disaggregated prefill and decode with deployment.placement=process, fastgen.deployment).

The worker is spawned, not forked (a forked child running torch ops after the parent used oneDNN deadlocks); it
gets the model already loaded (its weights move to shared memory once and every worker maps the same pages) and
builds its engine with `torch threads` threads. Calls and replies go through a pair of ProcessConnectors
(fastgen.kv.connector): a request's KV contents cross in shared memory, not serialised. `start_step` /
`finish_step` let the caller step several engines at once. Every reply carries the engine's state (has work,
snapshot), so reading it costs no round trip.

Time: the engine's clock is time.perf_counter, CLOCK_MONOTONIC on Linux, one clock for every process of the
machine, so the timestamps a worker puts in a request's trace are on the parent's clock.

Faults: a worker that exits (killed, crashed) is seen by the next call waiting on it (its process sentinel), which
raises EngineDied; the proxy then answers `abort` with the request as it last knew it, so the caller can fail it
alone. Workers ignore Ctrl-C (the parent closes them), exit when the parent is gone, and are daemonic: the parent's
exit terminates any that are left; `close` asks them to stop and reaps them.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import queue
import signal
import time
from contextlib import contextmanager
from multiprocessing.connection import wait
from typing import Any, Callable

import torch

from fastgen.compose import EngineConfig, build_engine
from fastgen.engine import RequestOutput, StepObserver
from fastgen.handoff import Handoff
from fastgen.kv.connector import ProcessConnector
from fastgen.request import Request
from fastgen.step_stats import EngineSnapshot, StepStats

CLOSE_TIMEOUT_S = 30.0     # a worker's interpreter exit (torch's teardown) on a busy machine


class EngineDied(RuntimeError):
    """The engine's process is gone; what it held (its requests' KV) went with it."""


def _slim(req: Request | None) -> Request | None:
    """The request as data: without its detokenizer (which holds the tokenizer), generator and grammar matcher."""
    if req is None:
        return None
    req = copy.copy(req)
    req.detokenizer = req.generator = req.grammar = None
    return req


def _picklable(error: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def serve_engine(cfg: EngineConfig, model, tokenizer, inbox: ProcessConnector, outbox: ProcessConnector) -> None:
    """The worker's loop: builds the engine, then answers calls until told to close or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    try:
        engine = build_engine(cfg, model, tokenizer)
    except Exception as e:
        outbox.send(("error", _picklable(e)))
        return
    stats: list[StepStats] = []
    engine.add_step_observer(stats.append)
    staged: dict[str, torch.Tensor | None] = {}

    def step():
        outputs = [dataclasses.replace(o, request=_slim(o.request)) for o in engine.step()]
        taken = list(stats)
        stats.clear()
        return outputs, taken

    def export(request_id):
        handoff = engine.export_request(request_id)
        staged[request_id] = engine.read_kv(request_id)
        return handoff

    calls: dict[str, Callable] = {       # (args, the KV contents that came with them) -> the result
        "add_request": lambda args, _: engine.add_request(*args[:4], **args[4]),
        "step": lambda args, _: step(),
        "export_request": lambda args, _: export(*args),
        "release": lambda args, _: engine.release(*args),
        "import_request": lambda args, contents: engine.import_request(*args, contents),
        "abort": lambda args, _: _slim(engine.abort(*args)),
    }
    outbox.send(("ready", (engine.spec, engine.vocab_size, engine.max_model_len, engine.snapshot())))
    while True:
        try:
            (method, args), contents = inbox.recv(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                break
            continue
        if method == "close":
            break
        out = None
        try:
            reply = ("ok", (calls[method](args, contents), engine.has_unfinished(), engine.snapshot()))
            out = staged.pop(args[0]) if method == "export_request" else None
        except Exception as e:
            reply = ("error", _picklable(e))
        try:
            outbox.send(reply, out)
        except OSError:                      # the parent is gone
            break
        except Exception as e:               # a result that cannot be pickled: the caller gets why
            outbox.send(("error", RuntimeError(f"{method}'s result cannot be sent to the parent: {e}")))
    engine.close()


class EngineProcess:
    """The parent's handle on an engine in a worker process: the methods a DisaggregatedEngine calls."""

    clock: Callable[[], float] = staticmethod(time.perf_counter)

    def __init__(self, cfg: EngineConfig, model, tokenizer, context, name: str):
        self.cfg, self.name, self.tokenizer = cfg, name, tokenizer
        self._calls, self._replies = ProcessConnector(context), ProcessConnector(context)
        self.process = context.Process(target=serve_engine, args=(cfg, model, tokenizer, self._calls, self._replies),
                                       name=f"fastgen-{name}", daemon=True)
        self.process.start()
        self._observers: list[StepObserver] = []
        self._known: dict[str, Request] = {}        # what the parent last saw of each request: to fail it if we die
        self._staged: dict[str, torch.Tensor | None] = {}
        self._has_work, self._snapshot, self._last_contents = False, EngineSnapshot(0, 0, 0, 0, 0), None
        self._stepping = self._stopping = self.dead = False

    def ready(self) -> "EngineProcess":
        """Waits for the worker to have built its engine, and takes its model's description and first state."""
        self.spec, self.vocab_size, self.max_model_len, self._snapshot = self._reply()
        return self

    # -- the engine's interface -----------------------------------------------------------------------------------
    def add_request(self, prompt, sampling=None, request_id=None, arrival_time=None, **request_class) -> str:
        return self._call("add_request", (prompt, sampling, request_id, arrival_time, request_class))

    def step(self) -> list[RequestOutput]:
        self.start_step()
        return self.finish_step()

    def start_step(self) -> None:
        self._send("step", ())
        self._stepping = True

    def finish_step(self) -> list[RequestOutput]:
        self._stepping = False
        outputs, stats = self._reply()
        for out in outputs:
            known = self._known.get(out.request_id)
            if out.finished:
                self._known.pop(out.request_id, None)
            elif known is not None:
                known.output_token_ids += out.new_token_ids
                known.trace = out.trace
        for s in stats:
            for observer in self._observers:
                observer(s)
        return outputs

    def export_request(self, request_id: str) -> Handoff:
        self._send("export_request", (request_id,))
        handoff = self._reply()
        self._staged[request_id] = self._last_contents
        return handoff

    def read_kv(self, request_id: str) -> torch.Tensor | None:
        return self._staged.pop(request_id)

    def release(self, request_id: str) -> None:
        self._call("release", (request_id,))

    def import_request(self, handoff: Handoff, contents: torch.Tensor | None) -> bool:
        taken = self._call("import_request", (handoff,), contents)
        if taken:
            self._known[handoff.request_id] = handoff.request(frozenset())
        return taken

    def abort(self, request_id: str) -> Request | None:
        """The request stopped (None if unknown); on a dead engine, the request as last seen here."""
        if self.dead:
            return self._known.pop(request_id, None)
        self._known.pop(request_id, None)
        return self._call("abort", (request_id,))

    def has_unfinished(self) -> bool:
        return self._has_work and not self.dead

    def snapshot(self) -> EngineSnapshot:
        return self._snapshot

    def add_step_observer(self, observer: StepObserver) -> None:
        self._observers.append(observer)

    def stop(self) -> None:
        """Asks the worker to stop (close() reaps it): stopping several at once, then closing each, saves time."""
        if self.process.is_alive() and not self._stepping and not self._stopping:
            try:
                self._calls.send(("close", ()))
            except OSError:
                pass
        self._stopping = True

    def close(self) -> None:
        """Stops the worker and reaps it (terminated, then killed, if it does not stop in time)."""
        self.stop()
        self.process.join(CLOSE_TIMEOUT_S)
        for stop in (self.process.terminate, self.process.kill):
            if self.process.is_alive():
                stop()
                self.process.join(CLOSE_TIMEOUT_S)
        self.dead = True
        self._calls.close()
        self._replies.close()

    # -- the channel ----------------------------------------------------------------------------------------------
    def _call(self, method: str, args: tuple, contents: torch.Tensor | None = None) -> Any:
        self._send(method, args, contents)
        return self._reply()

    def _send(self, method: str, args: tuple, contents: torch.Tensor | None = None) -> None:
        if self.dead:
            raise self._died()
        try:
            self._calls.send((method, args), contents)
        except OSError:
            raise self._died() from None

    def _reply(self) -> Any:
        """The worker's answer (its exception re-raised here); EngineDied if its process ends first."""
        if self._replies.reader not in wait([self._replies.reader, self.process.sentinel]) \
                and not self._replies.poll():
            raise self._died()
        try:
            (status, payload), self._last_contents = self._replies.recv()
        except (EOFError, OSError):
            raise self._died() from None
        if status == "error":
            raise payload
        if status == "ready":
            return payload
        result, self._has_work, self._snapshot = payload
        return result

    def _died(self) -> EngineDied:
        self.dead = True
        self.process.join(1.0)
        return EngineDied(f"engine {self.name}'s process (pid {self.process.pid}) exited with code "
                          f"{self.process.exitcode}")


@contextmanager
def shippable(model):
    """The model as a worker gets it: without this process's choices of kernel backend (`ops`) and oneDNN-reordered
    weight copies (`reordered`, opaque tensors with no storage to share); the worker's executor makes its own."""
    saved = [(m, k, m.__dict__.pop(k)) for m in model.modules() for k in ("ops", "reordered") if k in m.__dict__]
    try:
        yield model
    finally:
        for m, k, v in saved:
            m.__dict__[k] = v


def start_engines(cfgs: list[tuple[str, EngineConfig]], model, tokenizer) -> list[EngineProcess]:
    """One worker per (name, config), all started before any is waited for (they build their engines at once).
    Each gets cfg.hardware.threads torch threads if set, else its share of this machine's cores (at least 1)."""
    import torch.multiprocessing as tmp
    context = tmp.get_context("spawn")
    share = max(1, len(os.sched_getaffinity(0)) // len(cfgs))
    procs = []
    try:
        for name, cfg in cfgs:
            if not cfg.hardware.threads:
                cfg = dataclasses.replace(cfg, hardware=dataclasses.replace(cfg.hardware, threads=share))
            with shippable(model):           # pickled (its weights moved to shared memory) as the process starts
                procs.append(EngineProcess(cfg, model, tokenizer, context, name))
        return [p.ready() for p in procs]
    except BaseException:
        for p in procs:
            p.close()
        raise

