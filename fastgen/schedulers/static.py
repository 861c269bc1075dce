"""Static batching, the classic baseline: take up to `batch_size` requests, run them until every one has
finished, then take the next batch. A batch is admitted only if the KV pool holds all of it at full length."""
from __future__ import annotations

from dataclasses import dataclass

from fastgen.request import RequestStatus
from fastgen.schedulers.base import BatchSizeConfig, Scheduler, SchedulerOutput, register_scheduler


@dataclass
class StaticConfig(BatchSizeConfig):
    name: str = "static"


@register_scheduler("static", config=StaticConfig)
class StaticBatchingScheduler(Scheduler):
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if not self.running:
            free = self.kv.num_free_blocks
            for req in list(self.waiting)[:self.config.batch_size]:
                need = self.kv.blocks_for(req.max_kv_tokens)
                if need > free and out:
                    break
                free -= need
                self.reserve(req, req.num_pending_tokens, out, preempt=False)
            return out
        for req in list(self.running):
            if req.status is RequestStatus.RUNNING:     # not preempted for one before it (`in self.running`: O(n))
                self.reserve(req, req.num_pending_tokens, out, preempt=True)
        self.schedule_speculation(out)
        return out
