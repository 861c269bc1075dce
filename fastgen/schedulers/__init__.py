"""Scheduling policies behind one interface and a registry. A new policy is one file here (or anywhere, named
by `scheduler.module`) with a `@register_scheduler("name")` subclass of Scheduler, plus conf/scheduler/name.yaml."""
from __future__ import annotations

import importlib
import pkgutil

from fastgen.config import SchedulerConfig
from fastgen.kv.manager import KVManager
from fastgen.schedulers.base import SCHEDULERS, ScheduledChunk, Scheduler, SchedulerOutput, register_scheduler

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")


def make_scheduler(config: SchedulerConfig, kv: KVManager) -> Scheduler:
    if config.module:
        importlib.import_module(config.module)
    if config.name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {config.name!r}; available: {', '.join(sorted(SCHEDULERS))}")
    for key in ("token_budget", "max_seqs", "chunk_size", "batch_size"):
        if getattr(config, key) < 1:
            raise ValueError(f"scheduler.{key} must be >= 1, got {getattr(config, key)}")
    if config.preemption not in ("newest", "oldest"):
        raise ValueError(f"scheduler.preemption must be 'newest' or 'oldest', got {config.preemption!r}")
    return SCHEDULERS[config.name](config, kv)


__all__ = ["SCHEDULERS", "ScheduledChunk", "Scheduler", "SchedulerOutput", "make_scheduler", "register_scheduler"]
