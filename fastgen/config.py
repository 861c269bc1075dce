"""The base configs every part of an engine extends: model, hardware, and the knobs every scheduler, KV manager
and executor has.

Each scheduler, KV manager and executor has its own config dataclass, declared next to it and subclassing the base
here; Hydra validates every override against the chosen part's own knobs (fastgen.registry). The engine's whole
config, with its default parts, is fastgen.compose.EngineConfig. What only a benchmark
or a server needs (workload, logger, target, HTTP limits) lives in their own configs (fastgen.run_config,
fastgen.serve.config), so importing the engine never imports the workload generator. A machine (HardwareConfig,
one conf/hardware/<name>.yaml each) carries its real settings, the datasheet executor=simulated reads
(DeviceSheet) and the chat SLA that fits it (fastgen.metrics.SLAConfig; run.py judges by it unless sla=paper).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

from omegaconf import MISSING

from fastgen.metrics import SLAConfig


@dataclass
class ModelConfig:
    source: str = "smollm2-135m"         # short name or local Hugging Face directory
    max_model_len: Optional[int] = None  # cap below the model's max_position_embeddings

    def validate(self) -> None:
        if not self.source:
            raise ValueError("model.source is empty: name an embedded model (smollm2-135m) or a local directory")
        check_positive("model", max_model_len=self.max_model_len)


@dataclass
class DeviceSheet:
    """A device's datasheet, as far as the simulator's cost model needs it (per device; TP over N such devices), and
    the profile of efficiencies fitted on it (fastgen/sim/profiles/<profile>.json; None: typical GPU values)."""

    memory_gb: Optional[float] = None          # device memory; the simulated KV pool is what weights leave of it
    peak_tflops: Optional[float] = None        # dense matmul peak at hardware.dtype
    memory_bandwidth_gbs: Optional[float] = None
    link_bandwidth_gbs: float = 0.0            # per-device all-reduce bus bandwidth between devices (NVLink)
    link_latency_us: float = 0.0               # latency of one all-reduce step
    host_link_bandwidth_gbs: float = 0.0       # device <-> host memory bandwidth (PCIe): swapped KV blocks
    # the link between nodes (disaggregated prefill/decode with deployment.link=internode), e.g. InfiniBand
    internode_bandwidth_gbs: float = 0.0       # GB/s per device pair (200 Gb/s HDR: 25; 400 Gb/s NDR: 50)
    internode_latency_us: float = 0.0
    profile: Optional[str] = None

    def validate(self, hardware: HardwareConfig, profile=None) -> None:
        """`profile`: the loaded fastgen.sim.cost_model.Profile, if any."""
        missing = [k for k in ("memory_gb", "peak_tflops", "memory_bandwidth_gbs") if not (getattr(self, k) or 0) > 0]
        if missing:
            raise ValueError(f"executor=simulated needs the device's datasheet, but hardware.sim.{missing[0]} is "
                             f"not set: add a `sim:` datasheet to conf/hardware/{hardware.name or '<name>'}.yaml, "
                             f"or set hardware.sim.{{{','.join(missing)}}}")
        measured = profile is not None and profile.allreduce_bandwidth_gbs is not None
        if hardware.tensor_parallel > 1 and not (self.link_bandwidth_gbs > 0 or measured):
            raise ValueError("hardware.tensor_parallel > 1 needs hardware.sim.link_bandwidth_gbs > 0, or a profile "
                             "with a measured all-reduce (python -m fastgen.sim.calibrate executor=tp ...)")


@dataclass
class HardwareConfig:
    """One machine (conf/hardware/<name>.yaml): the device the real executor runs on; the datasheet the simulated
    executor pretends to be (`sim`; executor=simulated reads it, dtype and tensor_parallel); the chat SLA that fits
    this machine (`sla`; the paper's unless the file says otherwise), which run.py's `sla` defaults to."""

    name: Optional[str] = None           # the conf/hardware option it came from (summaries, figure titles)
    device: str = "cpu"
    dtype: str = "float32"               # float32 | bfloat16 | float16 | auto (bf16 on AMX CPUs / bf16 GPUs)
    threads: Optional[int] = None        # torch intra-op threads; None keeps torch's choice
    kernels: str = "auto"                # auto (CUDA -> triton, CPU -> cpu, or torch if its C++ kernel
                                         # cannot build) | torch | cpu | triton
    linear: str = "auto"                 # linear layers' GEMM: plain (F.linear) | onednn (weights reordered once,
                                         # float32 CPU) | auto (on a float32 CPU: per weight shape and row count
                                         # the faster of the two, timed at load; fastgen.kernels.linear)
    tensor_parallel: int = 1             # devices the model is split over
    sim: DeviceSheet = field(default_factory=DeviceSheet)   # executor=simulated: the device's datasheet
    sla: SLAConfig = field(default_factory=SLAConfig)       # the SLA that fits it; defaults: the paper's

    def validate(self) -> None:
        from fastgen.kernels import BACKENDS
        from fastgen.models.loader import DTYPES
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"hardware.device must be cpu, cuda or cuda:<index>, got {self.device!r}")
        if self.dtype not in (*DTYPES, "auto"):
            raise ValueError(f"hardware.dtype must be one of {', '.join(DTYPES)} or auto, got {self.dtype!r}")
        if self.kernels not in BACKENDS:
            raise ValueError(f"hardware.kernels must be one of {', '.join(BACKENDS)}, got {self.kernels!r}")
        if self.tensor_parallel < 1:
            raise ValueError(f"hardware.tensor_parallel must be >= 1, got {self.tensor_parallel}")
        from fastgen.kernels.linear import LINEARS
        if self.linear not in LINEARS:
            raise ValueError(f"unknown hardware.linear={self.linear!r}; choose from {', '.join(LINEARS)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"hardware.threads must be >= 1 or null, got {self.threads}")


def check_positive(section: str, **values) -> None:
    for key, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{section}.{key} must be >= 1, got {value}")


@dataclass
class SchedulerConfig:
    """Knobs every policy has. A policy's own config subclasses this beside the policy (fastgen/schedulers/)."""

    name: str = MISSING
    max_seqs: int = 512                  # sequences per forward pass (max_ragged_sequence_count)
    preemption: str = "newest"           # victim order: newest | oldest
    preemption_mode: str = "recompute"   # recompute (free the victim's KV) | swap (move it to the host pool,
    #                                      kv.swap_space_gb; recompute when the pool is full or the KV is shared)
    module: Optional[str] = None         # import this module or file first (a policy defined outside fastgen)

    def step_tokens(self, max_model_len: int) -> int:
        """The most tokens one step of this policy computes (the activations' memory is sized for it); without a
        token budget, one whole prompt."""
        return max_model_len

    def validate(self) -> None:
        check_positive("scheduler", max_seqs=self.max_seqs)
        if self.preemption not in ("newest", "oldest"):
            raise ValueError(f"scheduler.preemption must be 'newest' or 'oldest', got {self.preemption!r}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"scheduler.preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")


@dataclass
class KVConfig:
    """Knobs every KV manager has; a manager's own config subclasses this beside it (fastgen/kv/)."""

    name: str = MISSING
    block_size: int = 64
    num_blocks: Optional[int] = None     # None: as many as the executor's memory for KV holds
    memory_gb: float = 2.0               # real executor: memory for the KV pool (per device / rank with TP)
    swap_space_gb: float = 0.0           # host memory for swapped-out KV blocks (per device; vLLM's swap_space)
    swap_blocks: Optional[int] = None    # ... or that many blocks; None: as many as swap_space_gb holds
    module: Optional[str] = None         # import this module or file first (a manager defined outside fastgen)

    def host_blocks(self, bytes_per_block: int) -> int:
        """Blocks of the host pool swapped-out KV goes to: swap_blocks, else what swap_space_gb holds."""
        return self.swap_blocks if self.swap_blocks is not None else int(self.swap_space_gb * 2**30 // bytes_per_block)

    def validate(self) -> None:
        check_positive("kv", block_size=self.block_size, num_blocks=self.num_blocks)
        if self.swap_space_gb < 0 or (self.swap_blocks is not None and self.swap_blocks < 0):
            raise ValueError(f"kv.swap_space_gb and kv.swap_blocks must be >= 0, got {self.swap_space_gb}, "
                             f"{self.swap_blocks}")
        if self.num_blocks is None and not self.memory_gb > 0:
            raise ValueError(f"kv.memory_gb must be > 0, got {self.memory_gb}")


@dataclass
class PartConfig:
    """Knobs every part without further common ones has (executors, routers); a part's own config subclasses
    its kind's config beside it."""

    name: str = MISSING
    module: Optional[str] = None         # import this module or file first (a part defined outside fastgen)

    def validate(self) -> None:
        pass


@dataclass
class ExecutorConfig(PartConfig):
    """What runs a step; an executor's own config subclasses this beside it (fastgen/executors/)."""


class EngineSettings(Protocol):
    """What the parts read of the engine's config: fastgen.compose.EngineConfig, or an app's config extending it
    (its concrete defaults need the registries of parts, so it lives above them, in the composition root)."""

    model: ModelConfig
    hardware: HardwareConfig
    scheduler: SchedulerConfig
    kv: KVConfig
    executor: ExecutorConfig
    seed: int
