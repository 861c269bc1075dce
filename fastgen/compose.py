"""The composition root: a config (from conf/ through Hydra, or built in code) in, an engine out.

    cfg = compose_config(["scheduler=sarathi", "scheduler.chunk_size=256"])
    engine = build_engine(cfg)

`build_engine` makes the executor (which loads the model, or simulates it), sizes the KV manager to the executor's
pool, gives the scheduler that manager, and hands all three to the engine; nothing else builds engines.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from omegaconf import OmegaConf

from fastgen.config import EngineConfig
from fastgen.engine import LLMEngine
from fastgen.executors import Executor, make_executor
from fastgen.kv import make_kv_manager
from fastgen.schedulers import make_scheduler

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def register_all() -> None:
    """Registers every built-in part's typed config (and the top-level schemas) with Hydra's ConfigStore."""
    from fastgen.capacity import register_configs as register_capacity
    from fastgen.plugins import REGISTRIES
    from fastgen.run_config import register_configs as register_run
    from fastgen.serve.config import register_configs as register_serve
    for registry in REGISTRIES.values():
        registry().discover()
    register_run()
    register_serve()
    register_capacity()


def compose_config(overrides: Sequence[str] = (), config_name: str = "config"):
    """The run.py config (or another top-level config of conf/, whose schema is registered) with Hydra overrides
    applied, as a typed object: a RunConfig for run.py's."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not CONF_DIR.is_dir():
        raise FileNotFoundError(f"fastgen's config tree {CONF_DIR} is missing; install fastgen from a checkout "
                                "with `pip install -e .`")
    register_all()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name, overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def build_engine(cfg: EngineConfig, model=None, tokenizer=None, clock: Callable[[], float] | None = None,
                 instrument: Callable[[Executor], Executor] | None = None) -> LLMEngine:
    """The engine cfg describes. `model` (optional) is a fastgen model, or anything load_model accepts (the simulated
    executor only reads its shape); `clock` replaces the executor's clock (e.g. fastgen.sim.CPUClock for CPU-time
    measurements of the real executor); `instrument` wraps the executor the engine gets (a benchmark's probe that
    sees each step's plain data, e.g. experiments/bench_vs_vllm.py's roofline)."""
    cfg.validate()
    executor = make_executor(cfg, model, tokenizer)
    if clock is not None and executor.loads_weights:
        executor.clock = clock               # the step's prepare / forward split on the engine's clock
    if instrument is not None:
        executor = instrument(executor)
    kv = make_kv_manager(cfg.kv, executor.num_kv_blocks)
    return LLMEngine(executor, make_scheduler(cfg.scheduler, kv), kv, seed=cfg.seed,
                     max_model_len=cfg.model.max_model_len, clock=clock)
