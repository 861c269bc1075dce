"""A ragged step's work, independent of how fast a device does it: what the cost model times (fastgen.sim.cost_model)
and what the roofline holds measured steps to (fastgen.roofline), one description for both.

The linear layers (`layer_gemms`) stream every weight once and do 2 flops per weight per token; a mixture of
experts' routed experts (`expert_gemms`) do the flops of the top-k experts per token and stream the weights of
min(experts, tokens x k) experts; attention reads each sequence's KV history, and a prefill chunk also does
quadratic work; tensor parallelism adds two all-reduces of the hidden state per layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fastgen.model_spec import ModelSpec

PREFILL, DECODE, MIXED = "prefill", "decode", "mixed"


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
    prefill_tokens: int = 0              # tokens of the chunks with more than one
    weight_bytes: float = 0.0            # every weight the step streams once (layers, experts, LM head)

    # -- the same work split by step kind, as a roofline reads it (fastgen.roofline) ---------------------------
    @property
    def decode_seqs(self) -> int:
        return self.num_seqs - self.prefill_chunks

    @property
    def kind(self) -> str:
        return MIXED if self.prefill_tokens and self.decode_seqs else PREFILL if self.prefill_tokens else DECODE

    def _flops_per(self) -> tuple[float, float]:
        """(layer and expert flops per token, LM-head flops per row)."""
        return (self.linear[0] + self.experts[0]) / self.linear[2], self.head[0] / self.head[2]

    @property
    def prefill_flops(self) -> float:
        """Prompt chunks: their tokens' layer flops, their LM-head rows and their attention."""
        per_token, per_row = self._flops_per()
        return self.prefill_tokens * per_token + self.prefill_chunks * per_row + self.attn_prefill[0]

    @property
    def decode_linear_flops(self) -> float:
        """Decodes: their tokens' layer and LM-head flops."""
        return self.decode_seqs * sum(self._flops_per())

    @property
    def kv_bytes(self) -> float:
        """The KV history the decodes read."""
        return self.attn_decode[1]


class WorkModel:
    """The work of each step of one model on one of `tensor_parallel` devices, at `dtype_bytes` per value."""

    def __init__(self, spec: ModelSpec, dtype_bytes: int, tensor_parallel: int = 1):
        if tensor_parallel < 1:
            raise ValueError(f"hardware.tensor_parallel must be >= 1, got {tensor_parallel}")
        self.spec, self.dtype_bytes = spec, dtype_bytes
        self.tp = tensor_parallel
        # Attention work depends on each layer's window: layers are grouped by window, each group costed once.
        self.window_layers = {w: spec.windows.count(w) for w in set(spec.windows)}
        self.gemms = layer_gemms(spec, self.tp)
        self.expert_gemms = expert_gemms(spec, self.tp)
        # what one layer's elementwise kernels read and write per token: 2 norms (h in, h out), rotary (q and k
        # in and out), the activation (gate and up in, one out; a token's k experts and the shared expert in an
        # MoE layer, averaged over layers), 2 residual adds (2 h in, h out)
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
        experts = self.expert_work(tokens)
        experts_streamed = min(s.num_experts, tokens * s.experts_per_token) if self.expert_gemms else 0
        streamed = (self._gemm_weights + head_weights
                    + experts_streamed * sum(g.weights * g.layers for g in self.expert_gemms)) * b
        return StepWork(seqs, num_prefill, linear, head, attn_prefill, attn_decode, allreduces,
                        tokens * s.hidden * b, experts, batch.cuda_graph, int(q[prefill].sum()) if num_prefill else 0, streamed)
