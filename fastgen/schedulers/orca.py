"""Orca: iteration-level scheduling with selective batching.

Every step runs one decode token for each running request plus whole prompts of newly admitted ones, mixed in
one pass; prompts are never split. Admission is limited by `batch_size` running requests and by the KV manager
(Orca reserves each request's full length up front: pair it with kv=contiguous for the original behaviour).
"""
from __future__ import annotations

from dataclasses import dataclass

from fastgen.schedulers.base import BatchSizeConfig, Scheduler, SchedulerOutput, register_scheduler


@dataclass
class OrcaConfig(BatchSizeConfig):
    name: str = "orca"


@register_scheduler("orca", config=OrcaConfig)
class OrcaScheduler(Scheduler):
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.schedule_decodes(out, budget=len(self.running), preempt=True)
        self.schedule_speculation(out)
        for req in list(self.waiting):
            if len(self.running) >= self.config.batch_size or len(out.chunks) >= self.config.max_seqs:
                break
            if not self.reserve(req, req.num_pending_tokens, out, preempt=False):
                break
        return out
