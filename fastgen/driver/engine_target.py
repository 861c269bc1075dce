"""EngineTarget: the in-process engine as a target of the load driver (fastgen.driver.run)."""
from __future__ import annotations

import time

from fastgen.engine import LLMEngine
from fastgen.request_trace import RequestTrace
from fastgen.sampling import SamplingParams
from fastgen.step_stats import StepStats
from fastgen.workloads import WorkloadRequest


class EngineTarget:
    """The in-process engine: each wait runs one step, or sleeps on the engine's clock while it is idle."""

    def __init__(self, engine: LLMEngine):
        self.engine, self.clock = engine, engine.clock
        self._sleep = getattr(engine.clock, "sleep", time.sleep)
        self._steps: list[StepStats] = []
        engine.add_step_observer(self._steps.append)
        self._index: dict[str, int] = {}

    def send(self, index: int, request_id: str, request: WorkloadRequest, send_time: float) -> None:
        sampling = SamplingParams(max_new_tokens=request.max_new_tokens, ignore_eos=True, detokenize=False)
        self._index[self.engine.add_request(request.prompt_token_ids, sampling, request_id, send_time,
                                            priority=request.priority, tenant=request.tenant, slo=request.slo,
                                            request_class=request.request_class)] = index

    def wait(self, until: float | None) -> list[tuple[int, RequestTrace]]:
        if not self.engine.has_unfinished():
            if until is not None:
                self._sleep(max(0.0, until - self.clock()))
            return []
        return [(self._index.pop(out.request_id), out.request.trace) for out in self.engine.step() if out.finished]

    def busy(self) -> bool:
        return self.engine.has_unfinished()

    def steps(self) -> list[StepStats]:
        return self._steps
