"""The cost model: how long one ragged step takes on a device, from the work it does (fastgen.sim.work). Time is a roofline per operation, max(flops / (peak x efficiency), bytes / (bandwidth x
efficiency)), where the matmul efficiency grows with the token count (small GEMMs cannot fill the device), plus
fixed costs per layer, per step and per sequence (kernel launches, host-side batch building and sampling). The
efficiencies and overheads are a `Profile`, fitted to measured step times by `fastgen.calibration.calibrate`, or to
published per-operator GPU times by `fastgen.calibration.measured`. A measured profile also carries per-GEMM-shape time
curves over the token count (`Profile.gemm_times`), which replace the roofline for the GEMMs they cover: cuBLAS
picks tiles per shape, so a GEMM's time is a staircase in the token count that no smooth efficiency follows.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np

from fastgen.config import DeviceSheet  # noqa: F401  (the datasheet lives with the hardware config)
from fastgen.model_spec import ModelSpec
from fastgen.sim.work import BatchShape, StepWork, WorkModel
from fastgen.models.loader import DTYPES

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
# Explicit dtype names only: "auto" would ask this machine about a device the simulator only pretends to be.
DTYPE_BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}


def read_named_json(name_or_path: str, folder: Path, what: str, make: str) -> dict:
    """A shipped file by its name (folder/<name>.json) or any path; missing: the error lists the shipped names."""
    path = Path(name_or_path)
    if not path.suffix:
        path = folder / f"{name_or_path}.json"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.json")))
        raise FileNotFoundError(f"{what} {name_or_path!r} not found (looked for {path}); shipped: {known or 'none'}; "
                                f"make one with {make}")
    return json.loads(path.read_text())


@dataclass
class Profile:
    """How far below the datasheet ceilings a device runs fastgen's step, and its fixed costs. The defaults are
    typical GPU values (uncalibrated); calibrated profiles live in fastgen/sim/profiles/<name>.json."""

    matmul_efficiency: float = 0.7       # fraction of peak flops that large GEMMs reach
    matmul_half_tokens: float = 64.0     # tokens at which a GEMM reaches half of that
    bandwidth_efficiency: float = 0.8    # fraction of memory bandwidth that weight and KV streaming reach
    prefill_attention_efficiency: float = 0.4   # fraction of its roofline that prompt-chunk attention reaches
    decode_attention_efficiency: float = 0.6    # ... and that decode attention (reading the KV history) reaches
    layer_overhead_s: float = 30e-6      # per layer and step: kernel launches, norms, rotary
    chunk_overhead_s: float = 2e-6       # per layer and prefill chunk (attention runs chunk by chunk)
    step_overhead_s: float = 2e-3        # per step: host-side scheduling, batch building, sampling
    seq_overhead_s: float = 10e-6        # per sequence and step on the host
    # Host time to launch one layer's kernels in eager mode (Python and CUDA launch calls). Launches run ahead of the
    # device, so they cost only where they outlast its work: a step's layers take max(their device time, layers x
    # this). A step replayed from a CUDA graph launches once (BatchShape.cuda_graph). 0: always hidden.
    launch_s_per_layer: float = 0.0
    # Measured / modelled step time at a step's token count ({"tokens": factor}, interpolated in log tokens):
    # BLAS libraries switch kernels at small sizes (a CPU's 4-token GEMM can cost as much as its 16-token one),
    # steps no smooth efficiency curve follows. Filled in by calibration from the fit's residuals.
    token_correction: dict = field(default_factory=dict)
    # Measured profiles (fastgen.calibration.measured) only; None / empty: the roofline and link model above.
    elementwise_efficiency: Optional[float] = None  # norms, rotary, activation, residual adds stream their tensors
    #                                                 at this fraction of memory bandwidth, on top of
    #                                                 layer_overhead_s (their launches); None: inside layer_overhead_s
    allreduce_latency_s: Optional[float] = None     # measured all-reduce: fixed cost and bus bandwidth, replacing
    allreduce_bandwidth_gbs: Optional[float] = None  # hardware.sim.link_latency_us / link_bandwidth_gbs
    kv_link_latency_s: Optional[float] = None       # measured send/recv between two devices of a node (moving
    kv_link_bandwidth_gbs: Optional[float] = None   # KV between engines): latency + bytes / bandwidth
    # {"<outputs>x<inputs>": {"tokens": [...], "seconds": [...]}}: one device's GEMM of that shape (see Gemm),
    # interpolated log-log between token counts and linear in tokens past the last one (compute-bound there).
    gemm_times: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)   # how it was made: device, model, measurements, fit error

    @classmethod
    def fitted_names(cls) -> list[str]:
        """The scalar efficiencies and overheads a step-time calibration fits."""
        return [f.name for f in fields(cls) if f.name not in NOT_FITTED_FROM_STEPS]

    def gemm_seconds(self, key: str, tokens: float) -> float:
        """Measured time of the GEMM `key` (in gemm_times) at `tokens` rows."""
        curve = self.gemm_times[key]
        ts, ss = curve["tokens"], curve["seconds"]
        if tokens >= ts[-1]:
            return ss[-1] * tokens / ts[-1]
        return float(np.exp(np.interp(np.log(tokens), np.log(ts), np.log(ss))))

    def correction(self, tokens: float) -> float:
        if not self.token_correction:
            return 1.0
        points = sorted((float(t), f) for t, f in self.token_correction.items())
        return float(np.interp(np.log(tokens), [np.log(t) for t, _ in points], [f for _, f in points]))

    @classmethod
    def load(cls, name_or_path: str) -> "Profile":
        return cls(**read_named_json(name_or_path, PROFILES_DIR, "simulator profile",
                                     "python -m fastgen.calibration.calibrate"))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(asdict(self), indent=1)
        # one line per list of numbers: a measured profile holds thousands of them
        text = re.sub(r"\[\s*([-+0-9.eE,\s]*?)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
        path.write_text(text + "\n")
        return path


NOT_FITTED_FROM_STEPS = ("meta", "token_correction", "elementwise_efficiency", "allreduce_latency_s",
                         "allreduce_bandwidth_gbs", "gemm_times", "launch_s_per_layer", "kv_link_latency_s",
                         "kv_link_bandwidth_gbs")


class CostModel(WorkModel):
    """Each step's time on a device: its work (WorkModel) through the datasheet's ceilings and the profile's
    efficiencies and overheads."""

    def __init__(self, spec: ModelSpec, device: DeviceSheet, dtype: str, tensor_parallel: int = 1,
                 profile: Profile | None = None):
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
        super().__init__(spec, DTYPE_BYTES[dtype], tensor_parallel)
        self.dtype, self.device, self.profile = dtype, device, profile or Profile()
        self._linear_cache: dict[float, tuple[float, float, float]] = {}

    def of_model(self, spec: ModelSpec) -> "CostModel":
        """Another model on the same devices (datasheet, dtype, tensor parallelism, profile): a draft model's."""
        return CostModel(spec, self.device, self.dtype, self.tp, self.profile)

    # -- time ------------------------------------------------------------------------------------------------
    def allreduce_seconds(self, nbytes: float, profile: Profile | None = None) -> float:
        """One ring all-reduce over the tensor-parallel devices: latency + 2 (n-1)/n x bytes / bus bandwidth."""
        p, dev = profile or self.profile, self.device
        latency = p.allreduce_latency_s if p.allreduce_latency_s is not None else dev.link_latency_us * 1e-6
        bandwidth = p.allreduce_bandwidth_gbs if p.allreduce_bandwidth_gbs is not None else dev.link_bandwidth_gbs
        return latency + 2 * (self.tp - 1) / self.tp * nbytes / (bandwidth * 1e9)

    def elementwise_seconds(self, tokens: float, profile: Profile | None = None) -> float:
        """All layers' norms, rotary, activation and residual adds beyond their launches (layer_overhead_s)."""
        p = profile or self.profile
        if p.elementwise_efficiency is None:
            return 0.0
        bandwidth = self.device.memory_bandwidth_gbs * 1e9 * p.elementwise_efficiency
        return self.spec.num_layers * tokens * self.elementwise_bytes_per_token / bandwidth

    def gemm_roofline(self, flops: float, nbytes: float, tokens: float,
                      profile: Profile | None = None) -> tuple[float, float]:
        """(compute, memory) seconds of GEMM work at `tokens` rows: its time is the larger of the two."""
        p = profile or self.profile
        efficiency = p.matmul_efficiency * tokens / (tokens + p.matmul_half_tokens)
        return (flops / (self.device.peak_tflops * 1e12 * efficiency),
                nbytes / (self.device.memory_bandwidth_gbs * 1e9 * p.bandwidth_efficiency))

    def linear_parts(self, work: StepWork, p: Profile) -> tuple[float, float, float]:
        """(roofline compute s, roofline memory s, measured-curve s) of the decoder layers' GEMMs; a function of the
        token count alone, so kept per token count for the model's own profile (a simulated run asks for the same
        few hundred counts thousands of times)."""
        tokens = work.linear[2]
        cached = self._linear_cache.get(tokens) if p is self.profile else None
        if cached is not None:
            return cached
        measured = [g for g in self.gemms if g.key in p.gemm_times]
        if measured:    # measured curves for some GEMMs, the roofline for the rest
            rest = [g for g in self.gemms if g.key not in p.gemm_times]
            compute, memory = self.gemm_roofline(*self.gemm_work(rest, tokens), p) if rest else (0.0, 0.0)
            parts = (compute, memory, sum(self.layers_of(g) * p.gemm_seconds(g.key, tokens) for g in measured))
        else:
            parts = (*self.gemm_roofline(*work.linear, p), 0.0)
        if p is self.profile:
            self._linear_cache[tokens] = parts
        return parts

    def breakdown(self, work: StepWork | BatchShape, profile: Profile | None = None) -> dict[str, float]:
        """Seconds per part of the step; `total` is what the simulator's clock advances by."""
        if isinstance(work, BatchShape):
            work = self.work(work)
        p = profile or self.profile
        peak, bw = self.device.peak_tflops * 1e12, self.device.memory_bandwidth_gbs * 1e9

        def gemm(flops: float, nbytes: float, tokens: float) -> tuple[float, float]:
            return self.gemm_roofline(flops, nbytes, tokens, p)

        def roofline(flops: float, nbytes: float) -> float:
            return max(flops / peak, nbytes / bw)

        tokens = work.linear[2]
        linear_compute, linear_memory, linear_measured = self.linear_parts(work, p)
        layers = self.spec.num_layers * (p.layer_overhead_s + p.chunk_overhead_s * work.prefill_chunks)
        out = {"linear_compute_s": linear_compute, "linear_memory_s": linear_memory,
               "linear_s": linear_measured + max(linear_compute, linear_memory), "head_s": max(gemm(*work.head)),
               "experts_s": max(gemm(*work.experts)) if work.experts[0] else 0.0,
               "attention_s": roofline(*work.attn_prefill) / p.prefill_attention_efficiency
               + roofline(*work.attn_decode) / p.decode_attention_efficiency,
               "allreduce_s": work.allreduces * self.allreduce_seconds(work.allreduce_bytes, p)
               if work.allreduces else 0.0,
               "elementwise_s": self.elementwise_seconds(tokens, p),
               "overhead_s": p.step_overhead_s + p.seq_overhead_s * work.num_seqs + layers}
        device = layers + sum(out[k] for k in ("linear_s", "experts_s", "attention_s", "allreduce_s", "elementwise_s"))
        launches = 0.0 if work.cuda_graph else self.spec.num_layers * p.launch_s_per_layer
        out["launch_wait_s"] = max(0.0, launches - device)     # the device waiting for the host's launches
        out["total"] = sum(v for k, v in out.items() if k not in ("linear_compute_s", "linear_memory_s")) \
            * p.correction(work.linear[2])
        return out

    def step_time(self, batch: BatchShape) -> float:
        return self.breakdown(batch)["total"]

    def block_bytes(self, block_size: int) -> int:
        """One KV block's keys and values in every layer, on one device."""
        return block_size * self.spec.kv_bytes_per_token(self.dtype_bytes, self.tp)

    def swap_seconds(self, num_blocks: int, block_size: int) -> float:
        """KV blocks moved between device and host memory over the host link (PCIe), one direction at a time."""
        return num_blocks * self.block_bytes(block_size) / (self.device.host_link_bandwidth_gbs * 1e9) if num_blocks \
            else 0.0

    def block_copy_seconds(self, num_copies: int, block_size: int) -> float:
        """Copy-on-write of KV blocks: each block's keys and values in every layer read once and written once."""
        if not num_copies:
            return 0.0
        nbytes = 2 * num_copies * self.block_bytes(block_size)
        return nbytes / (self.device.memory_bandwidth_gbs * 1e9 * self.profile.bandwidth_efficiency)
