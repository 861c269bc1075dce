"""Scheduling policies behind one interface and a registry. A new policy is one file here (or anywhere, named
by `scheduler.module`) with a `@register_scheduler("name", config=MyConfig)` subclass of Scheduler, plus
conf/scheduler/name.yaml whose defaults list names `name_schema` (its typed config)."""
from __future__ import annotations

from fastgen.config import SchedulerConfig
from fastgen.kv.manager import KVManager
from fastgen.schedulers.base import (SCHEDULERS, BatchSizeConfig, ScheduledChunk, Scheduler, SchedulerOutput,
                                     TokenBudgetConfig, register_scheduler)


def make_scheduler(config: SchedulerConfig, kv: KVManager) -> Scheduler:
    return SCHEDULERS.resolve(config)(config, kv)


__all__ = ["SCHEDULERS", "BatchSizeConfig", "ScheduledChunk", "Scheduler", "SchedulerOutput", "TokenBudgetConfig",
           "make_scheduler", "register_scheduler"]
