"""DisaggregatedTarget: a disaggregated deployment (fastgen.disaggregated) as a target of the load driver.

On a shared clock (real engines in this process) it is the engine target: each wait runs the next step. On
virtual clocks it is a discrete-event simulation, as ReplicaCluster's: the next event is the earliest of an
engine starting its next step, finished requests being delivered (at the end of the step that finished them) and
the driver's next arrival, so a request arriving while its prefill engine is busy waits for the step in progress.
"""
from __future__ import annotations

import math

from fastgen.disaggregated import DisaggregatedEngine
from fastgen.driver.engine_target import EngineTarget
from fastgen.request_trace import RequestTrace


class DisaggregatedTarget(EngineTarget):
    def __init__(self, deployment: DisaggregatedEngine):
        super().__init__(deployment)
        self._done: list[tuple[float, int, RequestTrace]] = []    # finished, delivered at their step's end

    def wait(self, until: float | None) -> list[tuple[int, RequestTrace]]:
        deployment = self.engine
        if not deployment.virtual:
            return super().wait(until)
        deliver_at = min((t for t, _, _ in self._done), default=math.inf)
        start_at, arrival = deployment.next_event_time(), math.inf if until is None else until
        if deliver_at <= arrival and deliver_at <= start_at and self._done:
            self._sleep(deliver_at - self.clock())
            done = [(i, trace) for t, i, trace in self._done if t <= deliver_at]
            self._done = [d for d in self._done if d[0] > deliver_at]
            return done
        if arrival <= start_at:
            if until is not None:
                self._sleep(until - self.clock())
            return []
        finished = [out for out in deployment.step() if out.finished]
        self._done += [(deployment.step_end, self._index.pop(out.request_id), out.request.trace) for out in finished]
        return []

    def busy(self) -> bool:
        return bool(self._done) or self.engine.has_unfinished()
