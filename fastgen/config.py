"""Structured config schema: the dataclasses behind conf/. Hydra validates every override against them, so a
typo in a key fails with Hydra's own error naming it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from fastgen.metrics import SLAConfig
from fastgen.workloads import WorkloadConfig


@dataclass
class ModelConfig:
    source: str = "smollm2-135m"         # short name or local Hugging Face directory
    max_model_len: Optional[int] = None  # cap below the model's max_position_embeddings


@dataclass
class HardwareConfig:
    device: str = "cpu"
    dtype: str = "float32"               # float32 | bfloat16 | float16 | auto (bf16 on AMX CPUs / bf16 GPUs)
    threads: Optional[int] = None        # torch intra-op threads; None keeps torch's choice
    kernels: str = "auto"                # auto (CUDA -> triton, CPU -> torch) | torch | triton
    # What executor=simulated needs to know about the device (datasheet ceilings, per device):
    memory_gb: float = 24.0              # device memory; the simulated KV pool is what weights leave of it
    peak_tflops: float = 0.15            # dense matmul peak at `dtype`
    memory_bandwidth_gbs: float = 12.0   # memory bandwidth
    tensor_parallel: int = 1             # devices the model is split over (weights, KV heads, all-reduces)
    link_bandwidth_gbs: float = 0.0      # per-device all-reduce bus bandwidth between them (NVLink)
    link_latency_us: float = 0.0         # latency of one all-reduce step
    profile: Optional[str] = None        # the simulator's fitted efficiencies: a file in fastgen/sim/profiles/
                                         # (by name) or a path; None: typical GPU efficiencies, uncalibrated


@dataclass
class SchedulerConfig:
    name: str = "splitfuse"
    token_budget: int = 768              # tokens per forward pass (DeepSpeed-FastGen's max_ragged_batch_size)
    max_seqs: int = 512                  # sequences per forward pass (max_ragged_sequence_count)
    chunk_size: int = 512                # sarathi: largest prefill chunk of one request
    batch_size: int = 32                 # static / orca: requests in a batch
    preemption: str = "newest"           # victim order: newest | oldest
    module: Optional[str] = None         # import this module first (a policy defined outside fastgen)
    options: dict[str, Any] = field(default_factory=dict)   # free-form knobs for new policies


@dataclass
class KVConfig:
    name: str = "blocked"                # blocked | contiguous
    block_size: int = 64
    num_blocks: Optional[int] = None     # None: as many as memory_gb holds
    memory_gb: float = 2.0


@dataclass
class ExecutorConfig:
    """What runs a step: the real model, or the simulator's cost model on a virtual clock (fastgen/sim)."""

    name: str = "real"                   # real | simulated
    memory_utilization: float = 0.9      # simulated: the share of device memory the deployment may use

    def validate(self) -> None:
        if self.name not in ("real", "simulated"):
            raise ValueError(f"executor.name must be 'real' or 'simulated', got {self.name!r}")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"executor.memory_utilization must be in (0, 1], got {self.memory_utilization}")


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv: KVConfig = field(default_factory=KVConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    seed: int = 0


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
    """run.py: an engine (or a server), a workload to drive it with, the SLA to judge it by, where metrics go."""

    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    sla: SLAConfig = field(default_factory=SLAConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    progress: bool = True


def register_configs() -> None:
    """Registers the schema with Hydra, so conf/config.yaml is validated against RunConfig."""
    from hydra.core.config_store import ConfigStore
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
