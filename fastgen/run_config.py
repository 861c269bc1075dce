"""The benchmark harness's config (run.py): an engine config plus the workload to drive it with, the SLA to judge
it by, where metrics go and what is measured (the in-process engine or a server over HTTP)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from fastgen.compose import EngineConfig
from fastgen.deployment import DeploymentConfig
from fastgen.metrics import SLAConfig, g_suffix
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
    group: Optional[str] = None          # wandb group; default: a sweep's directory (fastgen.tracking.sweep_group)
    job_type: Optional[str] = None       # default: the scheduler (a sweep: or the first swept key)
    run_name: Optional[str] = None       # default: the swept keys' values (splitfuse-clients8)


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
    replicas: int = 1                    # engine replicas behind `router` (executor=simulated; fastgen.driver.cluster)
    router: RouterConfig = field(default_factory=lambda: ROUTERS.config("round_robin"))
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)   # colocated | disaggregated pools
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
        self.deployment.validate()
        if self.deployment.disaggregated and (self.replicas > 1 or self.target.name != "engine"):
            raise ValueError("deployment=disaggregated sizes its pools with deployment.prefill_replicas and "
                             "deployment.decode_replicas (leave replicas=1) and runs its engines from this process "
                             "(target=engine)")
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


# -- capacity search (python -m fastgen.capacity, conf/capacity.yaml) -----------------------------------------
OPEN_LOOP = ("poisson", "gamma", "trace", "classes")


@dataclass
class SLOConfig:
    """Limits a run must meet; None leaves a limit out (at least one is needed)."""

    ttft_p99_s: Optional[float] = None   # P99 time to first token
    tbt_p99_s: Optional[float] = None    # P99 time between tokens
    sla_frac: Optional[float] = None     # the fraction of requests meeting the paper's chat SLA, at least
    sla_g: float = 4.0                   # ... at this generation rate (tokens/s; one of sla.gen_tokens_per_s)
    attainment: Optional[float] = None   # the fraction of requests meeting their own (class's) SLO, at least

    def validate(self) -> None:
        if all(v is None for v in (self.ttft_p99_s, self.tbt_p99_s, self.sla_frac, self.attainment)):
            raise ValueError("capacity search needs an SLO: set capacity.slo.ttft_p99_s, capacity.slo.tbt_p99_s, "
                             "capacity.slo.sla_frac and/or capacity.slo.attainment")
        for key in ("sla_frac", "attainment"):
            value = getattr(self, key)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"capacity.slo.{key} must be in (0, 1], got {value}")

    def checks(self) -> dict[str, tuple[str, float, bool]]:
        """{metric key: (what, limit, whether the value must stay at most (True) or at least (False) the limit)}"""
        out = {}
        if self.ttft_p99_s is not None:
            out["ttft_s_p99"] = ("P99 TTFT (s)", self.ttft_p99_s, True)
        if self.tbt_p99_s is not None:
            out["itl_s_p99"] = ("P99 TBT (s)", self.tbt_p99_s, True)
        if self.sla_frac is not None:
            out[f"sla_frac_{g_suffix(self.sla_g)}"] = (f"SLA met at {self.sla_g:g} tok/s", self.sla_frac, False)
        if self.attainment is not None:
            out["slo_attainment"] = ("own SLO met", self.attainment, False)
        return out

    def met(self, metrics: dict) -> bool:
        for key, (_, limit, at_most) in self.checks().items():
            value = metrics.get(key)
            if value is None or (value > limit if at_most else value < limit):
                return False
        return True


@dataclass
class CapacityConfig:
    slo: SLOConfig = field(default_factory=SLOConfig)
    rate: float = 1.0                    # first probe (requests/s)
    tolerance: float = 0.05              # stop when (failing rate - meeting rate) / meeting rate <= this
    max_probes: int = 24

    def validate(self) -> None:
        self.slo.validate()
        if not self.rate > 0 or not self.tolerance > 0 or self.max_probes < 2:
            raise ValueError("capacity.rate and capacity.tolerance must be > 0 and capacity.max_probes >= 2")


@dataclass
class CapacityRunConfig(RunConfig):
    capacity: CapacityConfig = field(default_factory=CapacityConfig)

    def validate(self) -> None:
        super().validate()
        self.capacity.validate()
        if self.workload.arrival not in OPEN_LOOP:
            raise ValueError(f"capacity search varies the arrival rate: workload.arrival must be one of {OPEN_LOOP}, "
                             f"got {self.workload.arrival!r} (e.g. workload.arrival=poisson)")
        if self.sla_key_missing():
            raise ValueError(f"capacity.slo.sla_g={self.capacity.slo.sla_g} is not one of sla.gen_tokens_per_s "
                             f"{list(self.sla.gen_tokens_per_s)}")

    def sla_key_missing(self) -> bool:
        return self.capacity.slo.sla_frac is not None and self.capacity.slo.sla_g not in self.sla.gen_tokens_per_s
