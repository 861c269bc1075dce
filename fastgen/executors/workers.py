"""The worker processes of a tensor-parallel group, and how rank 0 drives them.

Rank 0 is the engine's own process; ranks 1..N-1 are processes started with torch.multiprocessing (forkserver by
default: the server process imports torch and fastgen once, so starting a rank costs a fork; or spawn). They meet
over a TCPStore that rank 0 opens on a free port and join one torch.distributed process group: gloo on CPU; on
CUDA, NCCL for the layers' collectives plus a gloo group for the step data. Every rank holds a `RankState` (its
shard of the model and KV pool, a RealExecutor) and waits for rank 0's messages: a function and its arguments,
pickled and broadcast, which every rank (rank 0 too) then calls on its own state, in the same order, so that the
collectives inside (the layers' all-reduces) match up. A step is `run(run_step, chunks)`: the plain step data
goes to every rank, never a scheduler.

Failure is loud, not a hang: a worker that raises writes its traceback to the store and exits; one that dies or
stalls makes rank 0's next collective fail (gloo sees the closed connection at once; a stall hits the collective
timeout), and rank 0 then tears the group down and raises `WorkerError` naming each rank's fate. Workers exit on
their own when rank 0's process goes away, and `close()` (or garbage collection, or interpreter exit) joins or
kills them, so no process outlives the engine.
"""
from __future__ import annotations

import datetime
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

# What the forkserver imports once, so that forking a rank skips it (model code imports transformers lazily).
PRELOAD = ["fastgen.executors.workers", "fastgen.executors.real", "transformers.models.llama.modeling_llama"]
START_METHODS = ("forkserver", "spawn")
BACKENDS = {"gloo": "gloo", "nccl": "nccl"}
IDLE_WAIT = datetime.timedelta(days=365)     # a worker waits for the next step as long as the engine idles
START_TIMEOUT_S = 180.0      # at least this long for the ranks to start (the first forkserver imports torch)


class WorkerError(RuntimeError):
    """A tensor-parallel rank failed; the group has been torn down."""


@dataclass(frozen=True)
class GroupOptions:
    size: int                  # ranks, rank 0 included
    device: str                # cpu | cuda: rank r runs on cuda:r
    backend: str               # gloo | nccl
    threads: int | None        # torch threads per rank (CPU)
    timeout_s: float           # a collective waiting this long for a rank fails the group
    start_method: str = "forkserver"

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)

    @property
    def start_timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=max(self.timeout_s, START_TIMEOUT_S))

    def rank_device(self, rank: int) -> str:
        return f"cuda:{rank}" if self.device == "cuda" else "cpu"


@dataclass
class RankState:
    """What one rank holds between messages; the functions rank 0 sends act on it."""

    rank: int
    options: GroupOptions
    group: Any = None           # the process group carrying messages and weights (CPU tensors)
    runner: Any = None          # this rank's RealExecutor over its shards, once a model is loaded
    weights: Any = None         # rank 0 only, while loading: where the full tensors come from


def _send(obj: Any, group) -> None:
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    dist.broadcast(torch.tensor([payload.numel()], dtype=torch.int64), src=0, group=group)
    dist.broadcast(payload, src=0, group=group)


def _receive(group) -> Any:
    size = torch.zeros(1, dtype=torch.int64)
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor, opts.timeout = 0, 0, IDLE_WAIT     # idle between steps: no timeout
    (group or dist.group.WORLD).broadcast([size], opts).wait()
    payload = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(payload, src=0, group=group)
    return pickle.loads(payload.numpy().tobytes())


def _join(options: GroupOptions, rank: int, store) -> Any:
    """Joins the process group (after the store rendezvous); returns the group for messages."""
    if options.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(options.backend, store=dist.PrefixStore("pg", store), rank=rank,
                            world_size=options.size, timeout=options.timeout)
    return dist.new_group(backend="gloo", timeout=options.timeout) if options.backend == "nccl" else None


def _exit_with_parent(parent: int) -> None:
    """Ends this worker when rank 0's process is gone, whatever it was doing."""
    def watch():
        while True:
            time.sleep(0.5)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(1)
    threading.Thread(target=watch, daemon=True, name="fastgen-tp-parent-watch").start()


def worker_main(rank: int, options: GroupOptions, port: int, parent: int) -> None:
    """A worker's life: rendezvous, then call whatever rank 0 sends until it sends None."""
    _exit_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C is rank 0's to handle: it stops the workers
    store = dist.TCPStore("127.0.0.1", port, options.size, is_master=False, timeout=options.start_timeout)
    try:
        if options.device == "cpu" and options.threads:
            torch.set_num_threads(options.threads)
        store.set(f"ready/{rank}", "1")
        state = RankState(rank, options, _join(options, rank, store))
        while (message := _receive(state.group)) is not None:
            fn, args, gather = message
            result = fn(state, *args)
            if gather:
                dist.gather_object(result, None, dst=0, group=state.group)
        dist.destroy_process_group()
    except BaseException:
        try:
            store.set(f"error/{rank}", traceback.format_exc())
        finally:
            os._exit(1)


@contextmanager
def _main_script_hidden():
    """Workers run fastgen's code only: they need not re-run the caller's script, which spawn and forkserver do
    (as __mp_main__) unless __main__ hides where it came from; a script without an `if __name__ == "__main__"`
    guard would otherwise build its engine again in every worker."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__.pop(k) for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    if main is not None:
        main.__spec__ = None
    try:
        yield
    finally:
        if main is not None:
            del main.__spec__
            main.__dict__.update(saved)


def _kill(processes) -> None:
    for p in processes:
        if p.is_alive():
            p.kill()
    for p in processes:
        p.join(5)


class WorkerGroup:
    """Rank 0's handle on a tensor-parallel group: starts ranks 1..N-1, runs functions on every rank, closes."""

    def __init__(self, options: GroupOptions):
        if options.start_method not in START_METHODS:
            raise ValueError(f"executor.start_method must be one of {', '.join(START_METHODS)}, "
                             f"got {options.start_method!r}")
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed process group (another engine "
                               "with executor=tp?); close that engine first: one tensor-parallel group per process")
        if options.device == "cuda" and torch.cuda.device_count() < options.size:
            raise ValueError(f"hardware.tensor_parallel={options.size} needs {options.size} GPUs, this machine has "
                             f"{torch.cuda.device_count()}")
        self.options, self.failure = options, None
        self.store = dist.TCPStore("127.0.0.1", 0, options.size, is_master=True, wait_for_workers=False,
                                   timeout=options.start_timeout)
        ctx = torch.multiprocessing.get_context(options.start_method)
        if options.start_method == "forkserver":
            ctx.set_forkserver_preload(PRELOAD)
        self.processes = [ctx.Process(target=worker_main, args=(rank, options, self.store.port, os.getpid()),
                                      daemon=True, name=f"fastgen-tp-rank{rank}") for rank in range(1, options.size)]
        with _main_script_hidden():
            for p in self.processes:
                p.start()
        self._finalizer = weakref.finalize(self, _kill, self.processes)
        self.state = RankState(0, options)
        try:
            self._await_workers()
            self.state.group = _join(options, 0, self.store)
        except BaseException as e:
            self._fail(e)

    @property
    def size(self) -> int:
        return self.options.size

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def _await_workers(self) -> None:
        limit = self.options.start_timeout.total_seconds()
        deadline = time.monotonic() + limit
        waiting = set(range(1, self.size))
        while waiting:
            waiting = {r for r in waiting if not self.store.check([f"ready/{r}"])}
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel ranks {sorted(waiting)} did not start within {limit:.0f} s")
            time.sleep(0.02)

    def _check_alive(self) -> None:
        dead = [rank for rank, p in enumerate(self.processes, 1) if p.exitcode is not None]
        if dead:
            raise WorkerError(f"tensor-parallel rank(s) {dead} exited")

    def run(self, fn: Callable, *args, gather: bool = False):
        """Calls fn(state, *args) on every rank, rank 0's call last-sent; returns rank 0's result, or with
        `gather` every rank's (fn must be a module-level function: it is pickled). Any failure on any rank tears
        the group down and raises WorkerError."""
        if self.failure is not None:
            raise WorkerError(f"the tensor-parallel group failed earlier and is closed; build a new engine. "
                              f"It failed with: {self.failure}")
        try:
            self._check_alive()
            _send((fn, args, gather), self.state.group)
            result = fn(self.state, *args)
            if not gather:
                return result
            results = [None] * self.size
            dist.gather_object(result, results, dst=0, group=self.state.group)
            return results
        except BaseException as e:
            self._fail(e)

    def _fail(self, cause: BaseException) -> None:
        """Collects what each worker left (traceback or exit code), kills the rest, raises WorkerError."""
        deadline = time.monotonic() + 2.0       # a failing worker may still be writing its traceback
        while time.monotonic() < deadline and not all(self._reported(r) for r in range(1, self.size)):
            time.sleep(0.05)
        fates = []
        for rank, p in enumerate(self.processes, 1):
            if self.store.check([f"error/{rank}"]):
                fates.append(f"rank {rank} raised:\n{self.store.get(f'error/{rank}').decode()}")
            elif p.exitcode is not None:
                fates.append(f"rank {rank} died with exit code {p.exitcode}")
            else:
                fates.append(f"rank {rank} was alive but did not answer (stalled? collectives wait "
                             f"executor.timeout_s={self.options.timeout_s:g} s)")
        self.failure = f"rank 0: {type(cause).__name__}: {cause}" + "".join(f"\n{f}" for f in fates)
        self._teardown()
        raise WorkerError(f"tensor-parallel group failed; all ranks stopped.\n{self.failure}") from cause

    def _reported(self, rank: int) -> bool:
        return self.store.check([f"error/{rank}"]) or self.processes[rank - 1].exitcode is not None

    def _teardown(self) -> None:
        _kill(self.processes)
        self._finalizer.detach()
        if dist.is_initialized():
            dist.destroy_process_group()

    def close(self) -> None:
        """Stops every worker (asks first, then kills what is left); idempotent."""
        if not self._finalizer.alive:
            return
        if self.failure is None and dist.is_initialized():
            try:
                self._check_alive()
                _send(None, self.state.group)
            except Exception:  # noqa: BLE001 - closing anyway; whatever failed is killed below
                pass
        for p in self.processes:
            p.join(10)
        self._teardown()
