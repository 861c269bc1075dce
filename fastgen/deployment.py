"""The deployment (conf/deployment/): one engine doing prefill and decode (`colocated`, the default), or prefill
and decode pools joined by a KV connector (`disaggregated`, fastgen.disaggregated.DisaggregatedEngine).

    python run.py deployment=disaggregated deployment.prefill_replicas=2 deployment.decode_replicas=1
    fastgen.pipeline("smollm2-135m", overrides=["deployment=disaggregated"])

Each pool runs the run's `scheduler` with its own knobs over it (`prefill_scheduler`, e.g. the prompt budget
token_budget; `decode_scheduler`, e.g. the batch limit max_seqs); both pools are picked by routers of the run's
`router` kind. Real engines (executor=real) run, with `placement=process` (the default), each in an OS process of
its own (fastgen.engine_process), all stepping at once, each with hardware.threads torch threads if set, else its
share of this machine's cores (cores // engines, at least 1); the model is loaded once here and its weights shared
with them through shared memory, and a request's KV moves from process to process in shared memory. With
`placement=inline` they run in this process, sharing the model's weights, one step at a time. Simulated ones
(always inline) (executor=simulated) each on its own virtual clock, the transfer charged
by the link: `nvlink` (within a node: the send/recv fit of the hardware's measured profile, else its datasheet
link_*) or `internode` (hardware.sim.internode_bandwidth_gbs and internode_latency_us).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from fastgen.compose import EngineConfig, build_engine
from fastgen.disaggregated import DisaggregatedEngine
from fastgen.engine import LLMEngine
from fastgen.kv.connector import CopyConnector, Link, SimulatedConnector
from fastgen.routers import ROUTERS, RouterConfig, make_router

DEPLOYMENTS = ("colocated", "disaggregated")
LINKS = ("nvlink", "internode")
PLACEMENTS = ("process", "inline")


@dataclass
class DeploymentConfig:
    name: str = "colocated"                  # colocated | disaggregated
    prefill_replicas: int = 1                # disaggregated: engines running prompts ...
    decode_replicas: int = 1                 # ... and engines decoding
    prefill_scheduler: dict[str, Any] = field(default_factory=dict)   # knobs of `scheduler` in the prefill pool
    decode_scheduler: dict[str, Any] = field(default_factory=dict)    # ... and in the decode pool
    link: str = "nvlink"                     # simulated: nvlink (within a node) | internode
    placement: str = "process"               # real engines: process (one OS process each) | inline (this one)

    def validate(self) -> None:
        if self.name not in DEPLOYMENTS:
            raise ValueError(f"deployment.name must be one of {', '.join(DEPLOYMENTS)}, got {self.name!r}")
        if self.prefill_replicas < 1 or self.decode_replicas < 1:
            raise ValueError(f"deployment.prefill_replicas and decode_replicas must be >= 1, got "
                             f"{self.prefill_replicas} and {self.decode_replicas}")
        if self.link not in LINKS:
            raise ValueError(f"deployment.link must be one of {', '.join(LINKS)}, got {self.link!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"deployment.placement must be process (each engine in an OS process of its own) or "
                             f"inline (all in this process), got {self.placement!r}")

    @property
    def disaggregated(self) -> bool:
        return self.name == "disaggregated"

    @property
    def num_engines(self) -> int:
        return self.prefill_replicas + self.decode_replicas if self.disaggregated else 1


def pool_config(cfg: EngineConfig, knobs: dict[str, Any], pool: str) -> EngineConfig:
    """cfg with `knobs` over its scheduler's (a pool's own)."""
    valid = {f.name for f in dataclasses.fields(cfg.scheduler)}
    unknown = sorted(set(knobs) - valid)
    if unknown:
        raise ValueError(f"deployment.{pool}_scheduler sets {unknown}, which scheduler={cfg.scheduler.name} does "
                         f"not have (its knobs: {', '.join(sorted(valid - {'name', 'module'}))})")
    return dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, **knobs))


def simulated_link(cfg: EngineConfig, link: str) -> Link:
    """The link a simulated transfer crosses: within a node, the hardware profile's fit to measured send/recv
    times (else the datasheet's device link); between nodes, the datasheet's inter-node link."""
    from fastgen.sim.cost_model import Profile
    sheet, where = cfg.hardware.sim, f"conf/hardware/{cfg.hardware.name or '<name>'}.yaml"
    if link == "internode":
        if not sheet.internode_bandwidth_gbs > 0:
            raise ValueError(f"deployment.link=internode needs hardware.sim.internode_bandwidth_gbs > 0 (set it in "
                             f"{where}, e.g. 25 for 200 Gb/s InfiniBand)")
        return Link(sheet.internode_latency_us * 1e-6, sheet.internode_bandwidth_gbs)
    profile = Profile.load(sheet.profile) if sheet.profile else Profile()
    if profile.kv_link_bandwidth_gbs is not None:
        return Link(profile.kv_link_latency_s, profile.kv_link_bandwidth_gbs)
    if not sheet.link_bandwidth_gbs > 0:
        raise ValueError(f"deployment.link=nvlink needs a profile with a measured send/recv link or "
                         f"hardware.sim.link_bandwidth_gbs > 0 ({where})")
    return Link(sheet.link_latency_us * 1e-6, sheet.link_bandwidth_gbs)


def build_deployment(cfg: EngineConfig, deployment: DeploymentConfig, router: RouterConfig | None = None,
                     model=None, tokenizer=None, clock: Callable[[], float] | None = None
                     ) -> LLMEngine | DisaggregatedEngine:
    """The engine (colocated) or the pools behind one engine's interface (disaggregated)."""
    deployment.validate()
    if not deployment.disaggregated:
        return build_engine(cfg, model, tokenizer, clock)
    simulated = cfg.executor.name == "simulated"
    if cfg.executor.name not in ("real", "simulated"):
        raise ValueError(f"deployment=disaggregated runs on executor=real or executor=simulated, not "
                         f"executor={cfg.executor.name}")
    from fastgen.models import CausalLM, load_model
    if not simulated and not isinstance(model, CausalLM):    # loaded once: the in-process engines share its weights
        model, tokenizer = load_model(cfg.model.source if model is None else model, dtype=cfg.hardware.dtype,
                                      device=cfg.hardware.device, tokenizer=tokenizer)
    prefill_cfg = pool_config(cfg, deployment.prefill_scheduler, "prefill")
    decode_cfg = pool_config(cfg, deployment.decode_scheduler, "decode")
    if deployment.placement == "process" and not simulated:
        if clock is not None:
            raise ValueError("deployment.placement=process times its engines' steps on the wall clock, which every "
                             "process shares; for another clock (timer=cpu) use deployment.placement=inline")
        from fastgen.engine_process import start_engines
        engines = start_engines([(f"prefill{i}", prefill_cfg) for i in range(deployment.prefill_replicas)] +
                                [(f"decode{i}", decode_cfg) for i in range(deployment.decode_replicas)],
                                model, tokenizer)
        prefill, decode = engines[:deployment.prefill_replicas], engines[deployment.prefill_replicas:]
    else:
        prefill = [build_engine(prefill_cfg, model, tokenizer, clock) for _ in range(deployment.prefill_replicas)]
        decode = [build_engine(decode_cfg, model, tokenizer, clock) for _ in range(deployment.decode_replicas)]
    connector = SimulatedConnector(simulated_link(cfg, deployment.link), cfg.hardware.tensor_parallel) \
        if simulated else CopyConnector()
    router = router or ROUTERS.config("round_robin")
    return DisaggregatedEngine(prefill, decode, connector, make_router(router, deployment.prefill_replicas),
                               make_router(router, deployment.decode_replicas))
