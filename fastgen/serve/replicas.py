"""N engine replicas behind one HTTP front, on Ray Serve (`python -m fastgen.serve replicas=N router=NAME`).

The HTTP front is the single-process server's own app (fastgen.serve.app: the same routes, streaming, auth, limits
and error bodies); only its backend differs. Instead of an EngineLoop around an engine in this process, the app gets
a `ReplicaSet`: a Ray Serve deployment of `EngineReplica`s, each holding one engine built by
`fastgen.compose.build_engine(cfg)` (one call, so a tensor-parallel engine drops in) behind its own EngineLoop.
Every engine request (one per prompt, its n choices forked in the replica's engine) is one streaming call on the
deployment's handle (`handle.options(stream=True)`): its updates come back as they are sampled.

Routing: Ray Serve's request-router hook (`RequestRouterConfig(request_router_class=...)`, whose
`choose_replicas` the handle calls in this process for each request) is adapted to a fastgen router
(fastgen.routers: round_robin, least_outstanding, power_of_two, random). `FastgenRequestRouter` orders the running
replicas by id, asks the fastgen router for one given each replica's outstanding requests (Ray's own count: sent
and not finished, from the handle), and ranks that replica first and the others after it. What Ray does by itself:
it tracks and probes replicas' queue lengths, skips a replica at `max_ongoing_requests` (back-pressure: the next
rank gets the request, or it waits with backoff), drops dead replicas from the candidates and restarts them.

Faults: a request whose replica dies before its first token is sent again (up to `replica.retries`) and lands on a
live replica; one that was already streaming ends with a 503 naming the cause (ReplicaUnavailable). Metrics: each
replica reports its own Prometheus registry and engine snapshot to a `ReplicaBoard` actor every
`REPORT_PERIOD_S`; /metrics relabels every replica's series with `replica="<id>"`, /health lists each replica.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any, List, Optional, TypeVar

import ray
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from fastgen.compose import build_engine
from fastgen.config import KVConfig
from fastgen.routers import ROUTERS, Router, RouterConfig, make_router
from fastgen.serve.config import ServeConfig
from fastgen.serve.engine_loop import EngineLoop, ReplicaUnavailable, RequestGroup, SequenceRequest, Update
from fastgen.serve.prometheus import ServerMetrics

log = logging.getLogger(__name__)

NAMESPACE = "fastgen"
REPORT_PERIOD_S = 0.25        # how often a replica reports its metrics to the board
STALE_AFTER_S = 3.0           # a replica silent this long is reported unreachable by /health
SHUTDOWN_TIMEOUT_S = 20.0     # how long stop() waits for Ray Serve to delete the replicas
FORGET_AFTER_S = 60.0         # ... and this long, forgotten (/metrics and /health drop it)


# -- routing: a fastgen router as Ray Serve's request router --------------------------------------------------------
def rank_replicas(router: Router, replica_ids: Sequence[str], outstanding: Sequence[int]) -> List[int]:
    """Indices of `replica_ids`, the router's choice first, the others in order (Ray falls back to them when the
    first is at max_ongoing_requests)."""
    chosen = router.choose(outstanding)
    return [chosen, *(i for i in range(len(replica_ids)) if i != chosen)]


class FastgenRequestRouter(RequestRouter):
    """Ray Serve's request-router hook, deciding with a fastgen router (request_router_kwargs: its config)."""

    def initialize_state(self, router: dict | None = None, **kwargs) -> None:
        self._router_config: RouterConfig = ROUTERS.config(**(router or {"name": "round_robin"}))
        self._router: Router | None = None

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        replicas, outstanding = self.ordered(candidate_replicas)
        if self._router is None or self._router.num_replicas != len(replicas):    # started, or a replica died
            self._router = make_router(self._router_config, len(replicas))
        order = rank_replicas(self._router, [r.replica_id.unique_id for r in replicas], outstanding)
        return [[replicas[i]] for i in order]

    def ordered(self, replicas: Sequence[RunningReplica]) -> tuple[List[RunningReplica], List[int]]:
        """The replicas as the fastgen router indexes them (by id) and each one's outstanding requests."""
        replicas = sorted(replicas, key=lambda r: r.replica_id.unique_id)
        queue_lens = self.replica_queue_len_cache
        return replicas, [queue_lens.get(r.replica_id) or 0 for r in replicas]


# -- the replicas ----------------------------------------------------------------------------------------------------
@ray.remote(num_cpus=0)
class ReplicaBoard:
    """What each replica last reported: its pid, engine snapshot and Prometheus text, and when."""

    def __init__(self):
        self.reports: dict[str, dict] = {}

    def report(self, replica_id: str, report: dict) -> None:
        self.reports[replica_id] = report | {"time": time.time()}

    def read(self) -> dict[str, dict]:
        """The reports, less those of replicas silent for FORGET_AFTER_S (dead, and replaced by Ray)."""
        now = time.time()
        self.reports = {rid: r for rid, r in self.reports.items() if now - r["time"] < FORGET_AFTER_S}
        return self.reports


class EngineReplica:
    """One Ray Serve replica: one engine behind its EngineLoop, streaming each request's updates."""

    async def __init__(self, cfg: ServeConfig):     # async: the engine thread reports to this replica's event loop
        self.engine = build_engine(cfg)
        self.metrics = ServerMetrics()
        self.loop = EngineLoop(self.engine, self.metrics)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.board = ray.get_actor(board_name(cfg), namespace=NAMESPACE)
        self.loop.start(asyncio.get_running_loop())
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())

    async def _report_forever(self) -> None:
        while True:
            s = self.engine.snapshot()
            self.board.report.remote(self.replica_id, {
                "pid": os.getpid(), "alive": self.loop.alive, "running": s.num_running, "waiting": s.num_waiting,
                "kv_blocks_total": s.kv_blocks_total, "kv_blocks_free": s.kv_blocks_free,
                "metrics": self.metrics.render()})
            await asyncio.sleep(REPORT_PERIOD_S)

    async def describe(self) -> dict:
        """What the HTTP front needs to check and tokenize requests itself."""
        e = self.engine
        return {"tokenizer": e.tokenizer, "max_model_len": e.max_model_len, "vocab_size": e.vocab_size}

    async def generate(self, request: SequenceRequest, timeout_s: float) -> AsyncIterator[Update]:
        """The request's updates: an empty one when the engine accepts it, then its tokens, up to the last. A
        cancelled call (the client went away) aborts the request."""
        group = self.loop.submit([request], timeout_s)
        try:
            await group.accepted()
            yield Update()
            async for _, update in group.updates():
                yield update
        except Exception as e:      # refused, failed, timed out: the front raises it in the handler
            yield Update(error=e)
        finally:
            self.loop.release(group)

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine thread stopped is restarted."""
        if not self.loop.alive:
            raise RuntimeError("the engine thread has stopped")


# -- start-up --------------------------------------------------------------------------------------------------------
class ReplicaStartError(RuntimeError):
    """The replicas did not start: the message names the cause (Ray's OOM kills, resources no node has, ...)."""


T = TypeVar("T")


def start_within(start: Callable[[], T], timeout_s: float, diagnose: Callable[[], str]) -> T:
    """start()'s result, or ReplicaStartError (naming diagnose()'s cause) if it fails or is not done within
    timeout_s (Ray Serve keeps re-creating replicas that Ray's OOM killer ends: serve.run never returns)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = start()
        except BaseException as e:       # handed to the caller
            box["error"] = e
    thread = threading.Thread(target=run, name="fastgen-replica-start", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "result" in box:
        return box["result"]
    what = f"failed: {box['error']}" if "error" in box else f"did not start within replica.start_timeout_s=" \
                                                                 f"{timeout_s:g}"
    raise ReplicaStartError(f"the engine replicas {what}; {diagnose()}") from box.get("error")


def explain(status_message: str, need: dict[str, float], cluster: dict[str, float]) -> str:
    """The likely cause, from Ray Serve's deployment status message and the resources the replicas need (all of
    them together) against what the Ray cluster has."""
    causes = []
    text = status_message.lower()
    if "out of memory" in text or "oom" in text or "low on memory" in text or "memory" in text and "kill" in text:
        causes.append("Ray's out-of-memory killer ended replicas (each builds an engine with its KV pool): lower "
                      "kv.memory_gb or replicas, or set replica.memory_gb")
    short = [f"{k} {need[k]:g} needed, the cluster has {cluster.get(k, 0):g}" for k in sorted(need)
             if need[k] > cluster.get(k, 0)]
    if short:
        causes.append("not enough Ray resources: " + "; ".join(short))
    if status_message:
        causes.append(f"Ray Serve says: {status_message.strip()[:2000]}")
    return "; ".join(causes) if causes else "Ray Serve reported no cause (see the Ray logs, /tmp/ray/session_latest)"


def replica_kv_memory_gb(kv: KVConfig, replica_memory_bytes: float | None, fraction: float) -> float:
    """The KV pool of each replica: kv.memory_gb as set; left at its default, at most `fraction` of the memory Ray
    gives each replica (the default pool of every replica together once filled more than a small machine has)."""
    if kv.num_blocks is not None or kv.memory_gb != KVConfig.memory_gb or not replica_memory_bytes:
        return kv.memory_gb
    return max(1 / 64, min(kv.memory_gb, fraction * replica_memory_bytes / 2**30))


# -- the front's backend ---------------------------------------------------------------------------------------------
class ReplicaMetrics:
    """/metrics of a replicated deployment: every replica's series, labelled replica="<id>"."""

    content_type = CONTENT_TYPE_LATEST

    @staticmethod
    def merge(reports: dict[str, dict]) -> bytes:
        families: dict[str, Any] = {}
        for replica_id, report in sorted(reports.items()):
            for family in text_string_to_metric_families(report["metrics"].decode()):
                merged = families.setdefault(family.name, family)
                samples = [Sample(s.name, {**s.labels, "replica": replica_id}, s.value, s.timestamp, s.exemplar)
                           for s in family.samples if not s.name.endswith("_created")]
                if merged is family:
                    family.samples = samples
                else:
                    merged.samples += samples
        registry = CollectorRegistry()
        registry.register(_Families(list(families.values())))
        return generate_latest(registry)


class _Families:
    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


class ReplicaSet:
    """The app's backend for replicas > 1: the EngineLoop interface (submit, release, begin_shutdown, stop, ...)
    over a Ray Serve deployment of EngineReplicas."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        rep = cfg.replica
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            num_cpus = rep.ray_num_cpus or max(1, int(round(cfg.replicas * rep.num_cpus)))
            local = rep.ray_address is None and not os.environ.get("RAY_ADDRESS")
            ray.init(address=rep.ray_address, namespace=NAMESPACE, include_dashboard=False,
                     log_to_driver=False, **({"num_cpus": num_cpus} if local else {}))
        # The memory each replica gets: what it reserves, else an even split of Ray's memory resource; the default
        # KV pool is sized to it (two default 2 GB pools on a 4 GB machine were OOM-killed over and over).
        actor_options = {"num_cpus": rep.num_cpus, "num_gpus": rep.num_gpus}
        if rep.memory_gb is not None:
            actor_options["memory"] = replica_memory = rep.memory_gb * 2**30
        else:
            replica_memory = ray.available_resources().get("memory", 0) / cfg.replicas
        kv_gb = replica_kv_memory_gb(cfg.kv, replica_memory, rep.kv_memory_fraction)
        if kv_gb != cfg.kv.memory_gb:
            log.info("each replica's KV pool: kv.memory_gb=%.2f (of %.2f GiB Ray gives each replica)", kv_gb,
                     replica_memory / 2**30)
            cfg = replace(cfg, kv=replace(cfg.kv, memory_gb=kv_gb))
            self.cfg = cfg
        need = {"CPU": cfg.replicas * rep.num_cpus, "GPU": cfg.replicas * rep.num_gpus,
                "memory": cfg.replicas * actor_options.get("memory", 0)}
        need = {k: v for k, v in need.items() if v}

        def diagnose() -> str:
            try:
                app = serve.status().applications.get(rep.name)
                messages = [app.message] if app and app.message else []
                for d in (app.deployments.values() if app else ()):
                    messages += [d.message] if d.message else []
                cluster = ray.cluster_resources()
            except Exception as e:       # Ray itself is in trouble: say so
                return f"Ray Serve's status could not be read ({type(e).__name__}: {e})"
            return explain(" | ".join(messages), need, cluster)

        try:
            serve.start(proxy_location="Disabled")      # the HTTP front is fastgen's own app
            self.board = ReplicaBoard.options(name=board_name(cfg), namespace=NAMESPACE,
                                              get_if_exists=True).remote()
            deployment = serve.deployment(EngineReplica, name="engine").options(
                num_replicas=cfg.replicas, max_ongoing_requests=rep.max_ongoing_requests,
                ray_actor_options=actor_options,
                request_router_config=RequestRouterConfig(request_router_class=FastgenRequestRouter,
                                                          request_router_kwargs={"router": _plain(cfg.router)}),
                health_check_period_s=2.0, health_check_timeout_s=30.0)
            self.handle = start_within(lambda: serve.run(deployment.bind(cfg), name=rep.name, route_prefix=None),
                                       rep.start_timeout_s, diagnose)
        except BaseException:
            self._stopped = False
            self._tasks = {}
            self.stop()
            raise
        info = self.handle.describe.remote().result()
        self.tokenizer, self.max_model_len, self.vocab_size = info["tokenizer"], info["max_model_len"], \
            info["vocab_size"]
        self.metrics = ReplicaMetrics()
        self.shutting_down = False
        self._tasks: dict[str, asyncio.Task] = {}
        self._groups: set[RequestGroup] = set()
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False

    # -- the EngineLoop interface ------------------------------------------------------------------------------------
    def start(self, event_loop: asyncio.AbstractEventLoop) -> None:
        self._event_loop = event_loop

    def stop(self) -> None:
        """Ends every request and deletes the deployment: all of Ray Serve and Ray itself if Ray was started here,
        only this application and its board on a cluster joined (other applications there keep serving)."""
        if self._stopped:
            return
        self._stopped = True
        for task in self._tasks.values():
            task.cancel()
        # Ray Serve's calls wait on its controller, which never answers if Ray's own processes are gone (a signal
        # sent to the whole process group): bounded, then Ray itself is shut down, which ends what is left.
        stopper = threading.Thread(target=self._delete, name="fastgen-serve-shutdown", daemon=True)
        stopper.start()
        stopper.join(SHUTDOWN_TIMEOUT_S)
        if stopper.is_alive():
            log.warning("Ray Serve did not delete the replicas within %ss", SHUTDOWN_TIMEOUT_S)
        if self.started_ray:
            ray.shutdown()

    def _delete(self) -> None:
        if self.started_ray:
            serve.shutdown()
        else:
            serve.delete(self.cfg.replica.name)
            if getattr(self, "board", None) is not None:
                ray.kill(self.board)

    @property
    def alive(self) -> bool:
        return not self._stopped

    @property
    def num_active(self) -> int:
        """Sequences of the requests in flight, as the single-process EngineLoop counts them."""
        return sum(group.active_sequences(self._tasks) for group in self._groups)

    def submit(self, requests: Sequence[SequenceRequest], timeout_s: float) -> RequestGroup:
        if self._stopped:
            raise RuntimeError("the replicas have been shut down")
        group = RequestGroup(requests, self._event_loop.time() + timeout_s)
        self._groups.add(group)
        for r in requests:
            self._tasks[r.request_id] = self._event_loop.create_task(self._stream(group, r, timeout_s))
        return group

    def release(self, group: RequestGroup) -> None:
        self._groups.discard(group)
        for r in group.requests:
            task = self._tasks.pop(r.request_id, None)
            if task is not None:
                task.cancel()       # cancels the Ray call: the replica aborts the request

    def begin_shutdown(self, grace_s: float) -> None:
        self.shutting_down = True
        deadline = self._event_loop.time() + grace_s
        for group in self._groups:
            group.cut(deadline, grace_s)

    async def render_metrics(self) -> bytes:
        return ReplicaMetrics.merge(await self.board.read.remote())

    async def health(self) -> tuple[int, dict]:
        now = time.time()
        replicas = {rid: {"status": "ok" if r["alive"] and now - r["time"] < STALE_AFTER_S else "unreachable",
                          "pid": r["pid"], "running": r["running"], "waiting": r["waiting"],
                          "kv_blocks_free": r["kv_blocks_free"], "kv_blocks_total": r["kv_blocks_total"],
                          "last_report_s": round(now - r["time"], 3)}
                    for rid, r in sorted((await self.board.read.remote()).items())}
        healthy = sum(r["status"] == "ok" for r in replicas.values())
        status = "ok" if healthy >= self.cfg.replicas else "degraded" if healthy else "no replica is serving"
        return (200 if healthy else 503), {"status": status, "replicas": replicas}

    # -- one engine request --------------------------------------------------------------------------------------
    async def _stream(self, group: RequestGroup, request: SequenceRequest, timeout_s: float) -> None:
        """Forwards one request's updates from its replica to the group. A replica dying before the first token
        sends the request again; after it, the request ends with ReplicaUnavailable."""
        accepted = streaming = False
        try:
            for attempt in range(self.cfg.replica.retries + 1):
                stream = self.handle.options(stream=True).generate.remote(request, timeout_s)
                try:
                    first = True
                    async for update in stream:
                        if first:       # the acceptance (or refusal); sent again by a retry's replica
                            first = False
                            if accepted and not update.last:
                                continue
                            accepted = True
                        else:
                            streaming = True
                        done = group.closes(request.request_id, update)    # its last choice ended, or it failed
                        group.deliver(request.request_id, update)
                        if done:
                            return
                    raise ReplicaUnavailable("the replica ended the stream before the request finished")
                except asyncio.CancelledError:
                    stream.cancel()
                    raise
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                        ReplicaUnavailable) as e:
                    cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    if streaming or attempt == self.cfg.replica.retries:
                        log.warning("request %s lost its replica (%s)", request.request_id, cause)
                        group.deliver(request.request_id, Update(error=ReplicaUnavailable(     # the cause: logged
                            "the engine replica serving it died"
                            + (" after its first token" if streaming else f"; tried {attempt + 1} replicas"))))
                        return
                    log.warning("request %s: its replica died before its first token (%s); sending it again",
                                request.request_id, cause)
        except asyncio.CancelledError:
            raise
        except Exception as e:      # anything else from Ray: this request's failure alone (the text: logged)
            log.warning("request %s failed in Ray", request.request_id, exc_info=e)
            group.deliver(request.request_id, Update(error=ReplicaUnavailable("the request failed in Ray Serve")))
        finally:
            if self._tasks.get(request.request_id) is asyncio.current_task():
                del self._tasks[request.request_id]


def board_name(cfg: ServeConfig) -> str:
    """The named actor a deployment's replicas report to (one per application)."""
    return f"{cfg.replica.name}-replica-board"


def _plain(router: RouterConfig) -> dict:
    """The router's config as plain data for request_router_kwargs."""
    from dataclasses import asdict
    return {k: v for k, v in asdict(router).items() if v is not None}
