"""The benchmark harness's config (run.py): an engine config plus the workload to drive it with, the SLA to judge
it by, where metrics go and what is measured (the in-process engine or a server over HTTP)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from fastgen.config import EngineConfig, hydra_schema
from fastgen.metrics import SLAConfig
from fastgen.routers import ROUTERS, RouterConfig
from fastgen.workloads import WorkloadConfig


TIMERS = ("wall", "cpu")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class LoggerConfig:
    name: str = "none"                   # none | wandb
    project: str = "fastgen"
    entity: Optional[str] = None
    mode: str = "offline"                # wandb mode: offline unless the user asks for online
    tags: list[str] = field(default_factory=list)


@dataclass
class TargetConfig:
    name: str = "engine"                 # engine (in-process) | http (any OpenAI-compatible server)
    url: Optional[str] = None            # http: the server, e.g. http://127.0.0.1:8000
    api_key: Optional[str] = None
    served_model: Optional[str] = None   # http: the `model` to send; None: the first the server lists


@dataclass
class RunConfig(EngineConfig):
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    sla: SLAConfig = field(default_factory=SLAConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    replicas: int = 1                    # engine replicas behind `router` (executor=simulated; fastgen.sim.cluster)
    router: RouterConfig = field(default_factory=lambda: ROUTERS.config("round_robin"))
    progress: bool = True
    repeats: int = 1                     # runs per job, workload seeds seed..seed+repeats-1; metrics are their means
    timer: str = "wall"                  # wall | cpu: this process's CPU seconds (single-threaded runs, see README)

    def validate(self) -> None:
        """Cheap checks of values Hydra's types cannot express, before any model is loaded."""
        super().validate()
        self.workload.validate()
        self.sla.validate()
        if self.logger.name not in ("none", "wandb"):
            raise ValueError(f"logger.name must be 'none' or 'wandb', got {self.logger.name!r}")
        if self.target.name not in ("engine", "http"):
            raise ValueError(f"target.name must be 'engine' or 'http', got {self.target.name!r}")
        if self.target.name == "http" and self.executor.name != "real":
            raise ValueError("target=http measures a server; executor=simulated runs only the in-process engine")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.replicas > 1 and (self.executor.name != "simulated" or self.target.name != "engine"):
            raise ValueError(f"replicas={self.replicas} runs simulated replicas on virtual clocks: it needs "
                             "executor=simulated and target=engine")
        self.router.validate()
        if self.target.name == "http" and not self.target.url:
            raise ValueError("target=http needs target.url, e.g. target.url=http://127.0.0.1:8000")
        if self.target.url and not self.target.url.startswith(("http://", "https://")):
            raise ValueError(f"target.url must start with http:// or https://, got {self.target.url!r}")
        if self.logger.name == "wandb" and self.logger.mode not in WANDB_MODES:
            raise ValueError(f"logger.mode must be one of {', '.join(WANDB_MODES)}, got {self.logger.mode!r}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1 (runs per job), got {self.repeats}")
        if self.timer not in TIMERS:
            raise ValueError(f"timer must be one of {', '.join(TIMERS)}, got {self.timer!r}")
        if self.timer == "cpu":
            if self.executor.name == "simulated" or self.target.name == "http":
                raise ValueError("timer=cpu times the in-process real executor; executor=simulated runs on a "
                                 "virtual clock and target=http is timed at the client (wall clock)")
            if self.hardware.device != "cpu" or self.hardware.threads != 1:
                raise ValueError("timer=cpu counts this process's CPU seconds, which add up over threads: run "
                                 "single-threaded on the CPU with hardware.threads=1")


def register_configs() -> None:
    """Registers the schema with Hydra, so conf/config.yaml is validated against RunConfig (a `schema` choice, so
    a config extending conf/config.yaml can swap in a subclass: conf/capacity.yaml's `override schema: capacity`)."""
    from hydra.core.config_store import ConfigStore
    schema = hydra_schema(RunConfig)
    schema.router = RouterConfig()       # typed by the base, so any router's own config merges in
    store = ConfigStore.instance()
    store.store(group="schema", name="run", node=schema, package="_global_")   # conf/config.yaml's `schema: run`
    register_sla_options(store)


def register_sla_options(store) -> None:
    """The `sla` choices (no files): `hardware`, the SLA that fits the machine (hardware.sla, stated in its
    conf/hardware/<name>.yaml), and `paper`, the paper's chat SLA on any machine (SLAConfig's defaults)."""
    from omegaconf import DictConfig, OmegaConf
    machine = OmegaConf.create()
    machine["sla"] = DictConfig("${hardware.sla}", ref_type=SLAConfig)   # typed, so it merges into RunConfig.sla
    store.store(group="sla", name="hardware", node=machine, package="_global_")
    store.store(group="sla", name="paper", node=SLAConfig(), package="sla")
