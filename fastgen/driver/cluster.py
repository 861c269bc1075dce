"""ReplicaCluster: N simulated replicas behind a router, as one target of the load driver (fastgen.driver).

Each replica is an engine on its own virtual clock. The cluster advances them in lock-step, as a discrete-event
simulation: the next event is the earliest of a replica starting its next step (at its clock, when it has work),
finished requests being delivered (at the end of the step that finished them) and the driver's next arrival. A
step runs whole, so a request that arrives while its replica is busy waits for the step in progress, as on a real
server. The router sees each replica's outstanding requests (routed, not yet finished) when a request arrives.
With one replica this is exactly EngineTarget: the same steps at the same times.

The steps the cluster reports are every replica's, in order of start; their summed duration over the run's
duration (the metrics' busy_frac) is therefore up to the number of replicas.
"""
from __future__ import annotations

import math
from typing import Sequence

from fastgen.driver.engine_target import EngineTarget
from fastgen.engine import LLMEngine
from fastgen.routers import Router
from fastgen.step_stats import StepStats
from fastgen.request_trace import RequestTrace
from fastgen.workloads import WorkloadRequest


class ReplicaCluster:
    def __init__(self, engines: Sequence[LLMEngine], router: Router):
        if len(engines) != router.num_replicas:
            raise ValueError(f"{len(engines)} engines but the router spreads over {router.num_replicas} replicas")
        if not all(hasattr(e.clock, "sleep") for e in engines) or len({id(e.clock) for e in engines}) < len(engines):
            raise ValueError("replicas run in lock-step on virtual clocks: each engine needs its own (executor="
                             "simulated)")
        self.replicas = [EngineTarget(e) for e in engines]
        self.router = router
        self.now = max(e.clock() for e in engines)
        self.outstanding = [0] * len(engines)      # routed to each replica and not finished
        self.routed = [0] * len(engines)           # routed to each replica over the run
        self._done: list[list[tuple[int, RequestTrace]]] = [[] for _ in engines]   # finished, not yet delivered
        self._replica_of: dict[int, int] = {}

    def clock(self) -> float:
        return self.now

    def send(self, index: int, request_id: str, request: WorkloadRequest, send_time: float) -> None:
        r = self.router.choose(self.outstanding)
        replica = self.replicas[r]
        if not replica.busy():               # an idle replica's clock catches up with the cluster's
            replica.engine.clock.sleep(self.now - replica.clock())
        replica.send(index, request_id, request, send_time)
        self.outstanding[r] += 1
        self.routed[r] += 1
        self._replica_of[index] = r

    def wait(self, until: float | None) -> list[tuple[int, RequestTrace]]:
        """Processes the next event: delivers a replica's finished requests, or runs one replica's step, or, when
        the driver's next arrival comes first, moves the cluster's clock to it."""
        deliveries = [(rep.clock(), r) for r, rep in enumerate(self.replicas) if self._done[r]]
        starts = [(rep.clock(), r) for r, rep in enumerate(self.replicas) if not self._done[r] and rep.busy()]
        arrival = math.inf if until is None else until
        deliver_at, d = min(deliveries, default=(math.inf, -1))
        start_at, s = min(starts, default=(math.inf, -1))
        if deliver_at <= arrival and deliver_at <= start_at and d >= 0:
            self.now = deliver_at
            done, self._done[d] = self._done[d], []
            for index, _ in done:
                self.outstanding[self._replica_of.pop(index)] -= 1
            return done
        if arrival <= start_at:
            if until is not None:
                self.now = max(self.now, until)
            return []
        self.now = start_at
        self._done[s] = self.replicas[s].wait(None)
        return []

    def busy(self) -> bool:
        return any(self._done) or any(rep.busy() for rep in self.replicas)

    def steps(self) -> list[StepStats]:
        return sorted((s for rep in self.replicas for s in rep.steps()), key=lambda s: s.start)
