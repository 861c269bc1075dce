"""The app shell's config: fastgen's conf/ tree, the typed schemas Hydra checks it against, and composing a config
from it in code (what run.py, the server and capacity get from @hydra.main).

    cfg = compose_config(["scheduler=sarathi", "scheduler.chunk_size=256"])      # a RunConfig
    engine = build_engine(cfg)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fastgen.config import ExecutorConfig, KVConfig, SchedulerConfig
from fastgen.metrics import SLAConfig
from fastgen.plugins import REGISTRIES
from fastgen.routers import RouterConfig
from fastgen.run_config import CapacityRunConfig, RunConfig
from fastgen.serve.config import ServeConfig
from fastgen.speculative import SpeculativeConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# conf/config.yaml's `schema: run` (a choice, so conf/capacity.yaml, which extends it, can swap in its subclass with
# `override schema: capacity`), and conf/serve.yaml's serve_schema.
SCHEMAS = {("schema", "run"): RunConfig, ("schema", "capacity"): CapacityRunConfig, (None, "serve_schema"): ServeConfig}


def hydra_schema(config_class: type):
    """The node to store in Hydra's ConfigStore for a top-level config: its parts typed by their bases, so that
    whichever scheduler, KV manager, executor or router a config group picks can merge in with its own knobs."""
    schema = config_class(scheduler=SchedulerConfig(), kv=KVConfig(), executor=ExecutorConfig(),
                          speculative=SpeculativeConfig())
    schema.router = RouterConfig()
    return schema


def register_all() -> None:
    """Registers every built-in part's typed config, the top-level schemas and the `sla` choices with Hydra's
    ConfigStore."""
    store = ConfigStore.instance()
    for registry in REGISTRIES.values():
        registry().discover()
    for (group, name), config_class in SCHEMAS.items():
        store.store(group=group, name=name, node=hydra_schema(config_class), package="_global_" if group else None)
    # the `sla` choices (no files): `hardware`, the SLA that fits the machine (hardware.sla, stated in its
    # conf/hardware/<name>.yaml), and `paper`, the paper's chat SLA on any machine (SLAConfig's defaults)
    machine = OmegaConf.create()
    machine["sla"] = DictConfig("${hardware.sla}", ref_type=SLAConfig)   # typed, so it merges into RunConfig.sla
    store.store(group="sla", name="hardware", node=machine, package="_global_")
    store.store(group="sla", name="paper", node=SLAConfig(), package="sla")


def quote_null_choices(overrides: Sequence[str]) -> list[str]:
    """`group=null` picks conf/<group>/null.yaml where there is one (`executor=null`): Hydra reads a bare `null` as
    no value, which is an error for a config group, so the choice is quoted for it."""
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        out.append(f"{key}='null'" if value == "null" and (CONF_DIR / key.lstrip("+") / "null.yaml").is_file() else o)
    return out


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
        cfg = compose(config_name, overrides=quote_null_choices(overrides))
    return OmegaConf.to_object(cfg)


def compose_schema(config_name: str, schema: type, overrides: Sequence[str] = ()):
    """conf/<config_name>.yaml, whose first default is `<config_name>_schema`, as a typed `schema` object (a
    script's own config: experiments/bench_vs_hf.py's, in its tests and notebooks too)."""
    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)
    return compose_config(overrides, config_name=config_name)
