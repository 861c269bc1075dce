"""The composition root: the engine's config with its default parts, and `build_engine`, which puts an engine
together from it.

    engine = build_engine(EngineConfig(scheduler=SCHEDULERS.config("sarathi", chunk_size=256)))
    engine = build_engine(compose_config(["scheduler=sarathi"]))     # from conf/ through Hydra (fastgen.conf)

`build_engine` makes the executor (which loads the model, or simulates it), sizes the KV manager to the executor's
pool, gives the scheduler that manager, and hands the scheduler and the executor to the engine; nothing else builds
engines.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from fastgen.config import ExecutorConfig, HardwareConfig, KVConfig, ModelConfig, SchedulerConfig
from fastgen.engine import LLMEngine
from fastgen.executors import EXECUTORS, Executor, make_executor
from fastgen.kv import KV_MANAGERS, make_kv_manager
from fastgen.schedulers import SCHEDULERS, make_scheduler
from fastgen.speculative import PROPOSERS, SpeculativeConfig, make_proposer


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    scheduler: SchedulerConfig = field(default_factory=lambda: SCHEDULERS.config("splitfuse"))
    kv: KVConfig = field(default_factory=lambda: KV_MANAGERS.config("blocked"))
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    executor: ExecutorConfig = field(default_factory=lambda: EXECUTORS.config("real"))
    speculative: SpeculativeConfig = field(default_factory=lambda: PROPOSERS.config("none"))
    seed: int = 0

    def validate(self) -> None:
        """Cheap checks Hydra's types cannot express, before anything is loaded."""
        self.model.validate()
        self.hardware.validate()
        for part in (self.scheduler, self.kv, self.executor, self.speculative):
            part.validate()


def build_engine(cfg: EngineConfig, model=None, tokenizer=None, clock: Callable[[], float] | None = None,
                 instrument: Callable[[Executor], Executor] | None = None) -> LLMEngine:
    """The engine cfg describes. `model` (optional) is a fastgen model, or anything load_model accepts (the simulated
    executor only reads its shape); `clock` replaces the executor's clock (e.g. fastgen.sim.CPUClock for CPU-time
    measurements of the real executor); `instrument` wraps the executor the engine gets (a benchmark's probe that
    sees each step's plain data, e.g. the roofline of experiments/bench_peers.py)."""
    cfg.validate()
    executor = make_executor(cfg, model, tokenizer)
    if clock is not None and executor.loads_weights:
        executor.clock = clock               # the step's prepare / forward split on the engine's clock
    proposer = make_proposer(cfg.speculative, executor)
    if instrument is not None:
        executor = instrument(executor)
    kv = make_kv_manager(cfg.kv, executor.num_kv_blocks, executor.num_host_kv_blocks)
    return LLMEngine(executor, make_scheduler(cfg.scheduler, kv), seed=cfg.seed,
                     max_model_len=cfg.model.max_model_len, clock=clock, proposer=proposer)
