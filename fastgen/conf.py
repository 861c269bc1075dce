"""The app shell's config: fastgen's conf/ tree, the typed schemas Hydra checks it against, and composing a config
from it in code (what run.py, the server and capacity get from @hydra.main).

    cfg = compose_config(["scheduler=sarathi", "scheduler.chunk_size=256"])      # a RunConfig
    engine = build_engine(cfg)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from fastgen.config import ExecutorConfig, KVConfig, SchedulerConfig
from fastgen.plugins import REGISTRIES
from fastgen.routers import RouterConfig
from fastgen.run_config import CapacityRunConfig, RunConfig
from fastgen.serve.config import ServeConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
SCHEMAS = {"run_schema": RunConfig, "serve_schema": ServeConfig, "capacity_schema": CapacityRunConfig}


def hydra_schema(config_class: type):
    """The node to store in Hydra's ConfigStore for a top-level config: its parts typed by their bases, so that
    whichever scheduler, KV manager, executor or router a config group picks can merge in with its own knobs."""
    schema = config_class(scheduler=SchedulerConfig(), kv=KVConfig(), executor=ExecutorConfig())
    schema.router = RouterConfig()
    return schema


def register_all() -> None:
    """Registers every built-in part's typed config and the top-level schemas (conf/config.yaml, serve.yaml and
    capacity.yaml name them) with Hydra's ConfigStore."""
    for registry in REGISTRIES.values():
        registry().discover()
    for name, config_class in SCHEMAS.items():
        ConfigStore.instance().store(name=name, node=hydra_schema(config_class))


def compose_config(overrides: Sequence[str] = (), config_name: str = "config"):
    """The run.py config (or another top-level config of conf/) with Hydra overrides applied, as a typed object:
    a RunConfig for run.py's."""
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


def compose_schema(config_name: str, schema: type, overrides: Sequence[str] = ()):
    """conf/<config_name>.yaml, whose first default is `<config_name>_schema`, as a typed `schema` object (a
    script's own config: experiments/bench_vs_hf.py's, in its tests and notebooks too)."""
    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)
    return compose_config(overrides, config_name=config_name)
