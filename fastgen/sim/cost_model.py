"""The cost model: how long one ragged step takes on a device, from the work it does.

A step's work (`StepWork`) follows from its shape alone: the linear layers (`layer_gemms`) stream every weight once
and do 2 flops per weight per token; a mixture of experts' routed experts (`expert_gemms`) do the flops of the
top-k experts per token and stream the weights of min(experts, tokens x k) experts; attention reads each sequence's
KV history, and a prefill chunk also does quadratic work; tensor parallelism adds two all-reduces of the hidden
state per layer. Time is a roofline per operation, max(flops / (peak x efficiency), bytes / (bandwidth x
efficiency)), where the matmul efficiency grows with the token count (small GEMMs cannot fill the device), plus
fixed costs per layer, per step and per sequence (kernel launches, host-side batch building and sampling). The
efficiencies and overheads are a `Profile`, fitted to measured step times by `fastgen.sim.calibrate`, or to
published per-operator GPU times by `fastgen.sim.measured`. A measured profile also carries per-GEMM-shape time
curves over the token count (`Profile.gemm_times`), which replace the roofline for the GEMMs they cover: cuBLAS
picks tiles per shape, so a GEMM's time is a staircase in the token count that no smooth efficiency follows.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from fastgen.config import DeviceSheet  # noqa: F401  (the datasheet lives with the hardware config)
from fastgen.model_spec import ModelSpec
from fastgen.models.loader import DTYPES

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
# Explicit dtype names only: "auto" would ask this machine about a device the simulator only pretends to be.
DTYPE_BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}


@dataclass
class BatchShape:
    """One ragged step as the cost model sees it: each sequence's new tokens and its KV length after them, and the
    rows that go through the LM head (None: one per sequence; more when some chunks ask for all their logits)."""

    query_lens: np.ndarray
    context_lens: np.ndarray
    num_logits: int | None = None
    cuda_graph: bool = False     # replayed from a captured CUDA graph: no per-layer host launches (launch_s_per_layer)

    @classmethod
    def of(cls, query_lens: Sequence[int], context_lens: Sequence[int], cuda_graph: bool = False) -> "BatchShape":
        q, c = np.asarray(query_lens, dtype=np.float64), np.asarray(context_lens, dtype=np.float64)
        if q.shape != c.shape or q.size == 0 or (q < 1).any() or (c < q).any():
            raise ValueError("a batch needs >= 1 sequence, each with >= 1 new token and context >= its new tokens")
        return cls(q, c, cuda_graph=cuda_graph)

    @property
    def num_tokens(self) -> int:
        return int(self.query_lens.sum())

    @property
    def num_seqs(self) -> int:
        return self.query_lens.size


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
    # Measured profiles (fastgen.sim.measured) only; None / empty: the roofline and link model above.
    elementwise_efficiency: Optional[float] = None  # norms, rotary, activation, residual adds stream their tensors
    #                                                 at this fraction of memory bandwidth, on top of
    #                                                 layer_overhead_s (their launches); None: inside layer_overhead_s
    allreduce_latency_s: Optional[float] = None     # measured all-reduce: fixed cost and bus bandwidth, replacing
    allreduce_bandwidth_gbs: Optional[float] = None  # hardware.sim.link_latency_us / link_bandwidth_gbs
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
        path = Path(name_or_path)
        if not path.suffix:
            path = PROFILES_DIR / f"{name_or_path}.json"
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.json")))
            raise FileNotFoundError(f"simulator profile {name_or_path!r} not found (looked for {path}); shipped "
                                    f"profiles: {known or 'none'}; make one with python -m fastgen.sim.calibrate")
        return cls(**json.loads(path.read_text()))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(asdict(self), indent=1)
        # one line per list of numbers: a measured profile holds thousands of them
        text = re.sub(r"\[\s*([-+0-9.eE,\s]*?)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
        path.write_text(text + "\n")
        return path


NOT_FITTED_FROM_STEPS = ("meta", "token_correction", "elementwise_efficiency", "allreduce_latency_s",
                         "allreduce_bandwidth_gbs", "gemm_times", "launch_s_per_layer")


@dataclass(frozen=True)
class Gemm:
    """One linear layer of a decoder layer on one device: [tokens x inputs] @ [inputs x outputs], in `layers` of
    the model's layers (0: all). Routed experts are one Gemm of `experts` stacked matrices, `top_k` of which each
    token runs."""

    name: str
    outputs: int
    inputs: int
    layers: int = 0
    experts: int = 1
    top_k: int = 1

    @property
    def key(self) -> str:
        return f"{self.outputs}x{self.inputs}"

    @property
    def weights(self) -> int:
        return self.outputs * self.inputs


def layer_gemms(spec: ModelSpec, tensor_parallel: int) -> list[Gemm]:
    """The GEMMs every token runs through once, as one of `tensor_parallel` devices runs them (heads and MLP
    features split over devices; each device keeps at least one KV head): QKV and output projections in every
    layer; gate+up (up alone for a plain MLP) and down in the dense layers; the router and the shared expert
    (its gate+up, down and sigmoid gate) in a mixture's MoE layers."""
    tp, d, h = tensor_parallel, spec.head_dim, spec.hidden
    heads, kv_heads = -(-spec.num_heads // tp), spec.kv_heads_per_device(tp)
    gemms = [Gemm("qkv", (heads + 2 * kv_heads) * d, h, spec.num_layers), Gemm("o", h, heads * d, spec.num_layers)]
    dense_layers, moe_layers = spec.num_layers - spec.num_moe_layers, spec.num_moe_layers
    if dense_layers:
        inter = -(-spec.intermediate // tp)
        up = Gemm("gate_up", 2 * inter, h, dense_layers) if spec.gated_mlp else Gemm("up", inter, h, dense_layers)
        gemms += [up, Gemm("down", h, inter, dense_layers)]
    if moe_layers:
        gemms.append(Gemm("router", spec.num_experts, h, moe_layers))
        if spec.shared_expert_intermediate:
            shared = -(-spec.shared_expert_intermediate // tp)
            gemms += [Gemm("shared_gate_up", 2 * shared, h, moe_layers), Gemm("shared_down", h, shared, moe_layers),
                      Gemm("shared_gate", 1, h, moe_layers)]
    return gemms


def expert_gemms(spec: ModelSpec, tensor_parallel: int) -> list[Gemm]:
    """A mixture's routed experts (gate+up and down), each expert's intermediate features split over devices."""
    if not spec.num_moe_layers:
        return []
    inter, h = -(-spec.expert_intermediate // tensor_parallel), spec.hidden
    moe = dict(layers=spec.num_moe_layers, experts=spec.num_experts, top_k=spec.experts_per_token)
    return [Gemm("expert_gate_up", 2 * inter, h, **moe), Gemm("expert_down", h, inter, **moe)]


@dataclass
class StepWork:
    """What a step must do, independent of how fast the device does it (all layers, one device's share)."""

    num_seqs: int
    prefill_chunks: int
    linear: tuple[float, float, float]   # (flops, bytes, tokens) of the decoder layers' linear layers
    head: tuple[float, float, float]     # the same for the LM head (one row per sequence)
    attn_prefill: tuple[float, float]    # (flops, bytes)
    attn_decode: tuple[float, float]
    allreduces: int                      # tensor-parallel all-reduces of the hidden state (0 without TP)
    allreduce_bytes: float               # ... each of this many bytes
    experts: tuple[float, float, float] = (0.0, 0.0, 0.0)   # routed experts: (flops, bytes, rows per expert GEMM)
    cuda_graph: bool = False             # launched as one captured graph (BatchShape.cuda_graph)


class CostModel:
    def __init__(self, spec: ModelSpec, device: DeviceSheet, dtype: str, tensor_parallel: int = 1,
                 profile: Profile | None = None):
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
        if tensor_parallel < 1:
            raise ValueError(f"hardware.tensor_parallel must be >= 1, got {tensor_parallel}")
        self.spec, self.device, self.profile = spec, device, profile or Profile()
        self.dtype_bytes = DTYPE_BYTES[dtype]
        self.tp = tensor_parallel
        # Attention work depends on each layer's window: layers are grouped by window, each group costed once.
        self.window_layers = {w: spec.windows.count(w) for w in set(spec.windows)}
        self.gemms = layer_gemms(spec, self.tp)
        self.expert_gemms = expert_gemms(spec, self.tp)
        # what one layer's elementwise kernels read and write per token: 2 norms (h in, h out), rotary (q and k
        # in and out), the activation (gate and up in, one out; a token's k experts and the shared expert in an
        # MoE layer, averaged over layers), 2 residual adds (2 h in, h out)
        self._linear_cache: dict[float, tuple[float, float, float]] = {}
        self._gemm_weights = sum(g.weights * self.layers_of(g) for g in self.gemms)
        self._gemm_io = sum((g.inputs + g.outputs) * self.layers_of(g) for g in self.gemms)
        qkv, o = self.gemms[:2]           # rotary's q and k in and out: 2 (q + k) = qkv outputs + o inputs
        activation = sum(3 * g.inputs * g.layers * g.top_k for g in self.gemms + self.expert_gemms
                         if g.name.endswith("down")) / spec.num_layers
        self.elementwise_bytes_per_token = self.dtype_bytes * (10 * spec.hidden + qkv.outputs + o.inputs
                                                               + activation)

    # -- work ------------------------------------------------------------------------------------------------
    def gemm_work(self, gemms: Sequence[Gemm], tokens: float) -> tuple[float, float, float]:
        """(flops, bytes, tokens) of these GEMMs in every layer that holds them: weights read once, activations in
        and out."""
        weights, io = (self._gemm_weights, self._gemm_io) if gemms is self.gemms else \
            (sum(g.weights * self.layers_of(g) for g in gemms), sum((g.inputs + g.outputs) * self.layers_of(g)
                                                                   for g in gemms))
        return 2 * tokens * weights, (weights + tokens * io) * self.dtype_bytes, tokens

    def layers_of(self, gemm: Gemm) -> int:
        return gemm.layers or self.spec.num_layers

    def expert_work(self, tokens: float) -> tuple[float, float, float]:
        """(flops, bytes, rows per expert) of the routed experts: tokens x k rows of expert work, over the weights
        of min(experts, tokens x k) experts, each expert's GEMM getting that share of the rows."""
        if not self.expert_gemms:
            return 0.0, 0.0, 0.0
        rows = tokens * self.spec.experts_per_token
        streamed = min(self.spec.num_experts, rows)
        flops = sum(2 * rows * g.weights * g.layers for g in self.expert_gemms)
        nbytes = sum((streamed * g.weights + rows * (g.inputs + g.outputs)) * g.layers for g in self.expert_gemms) \
            * self.dtype_bytes
        return flops, nbytes, rows / streamed

    def work(self, batch: BatchShape) -> StepWork:
        s, b, tp, layers = self.spec, self.dtype_bytes, self.tp, self.spec.num_layers
        tokens, seqs = batch.num_tokens, batch.num_seqs
        linear = self.gemm_work(self.gemms, tokens)
        head_weights = s.vocab_size * s.hidden / tp
        rows = seqs if batch.num_logits is None else batch.num_logits
        head = (2 * rows * head_weights, head_weights * b, rows)

        q, ctx = batch.query_lens, batch.context_lens
        prefill = q > 1
        per_token = s.kv_bytes_per_token(b, tp) / layers
        keys = ctx - (q - 1) / 2                         # keys a query sees on average (causal within the chunk)
        flops = kv_bytes = 0.0
        for window, count in self.window_layers.items():
            if window is None:
                flops, kv_bytes = flops + keys * count, kv_bytes + ctx * count
            else:
                flops, kv_bytes = flops + np.minimum(keys, window) * count, kv_bytes + np.minimum(ctx, window) * count
        flops, kv_bytes = flops * q * (4 * s.q_size / tp), kv_bytes * per_token
        num_prefill = int(np.count_nonzero(prefill))
        if num_prefill == 0:                             # the common decode-only step: no masks
            attn_prefill, attn_decode = (0.0, 0.0), (float(flops.sum()), float(kv_bytes.sum()))
        else:
            attn_prefill = (float(flops[prefill].sum()), float(kv_bytes[prefill].sum()))
            attn_decode = (float(flops[~prefill].sum()), float(kv_bytes[~prefill].sum()))

        allreduces = 2 * layers if tp > 1 else 0
        return StepWork(seqs, num_prefill, linear, head, attn_prefill, attn_decode, allreduces,
                        tokens * s.hidden * b, self.expert_work(tokens), batch.cuda_graph)

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

    def block_copy_seconds(self, num_copies: int, block_size: int) -> float:
        """Copy-on-write of KV blocks: each block's keys and values in every layer read once and written once."""
        if not num_copies:
            return 0.0
        nbytes = 2 * num_copies * block_size * self.spec.kv_bytes_per_token(self.dtype_bytes, self.tp)
        return nbytes / (self.device.memory_bandwidth_gbs * 1e9 * self.profile.bandwidth_efficiency)
