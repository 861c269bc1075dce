"""Layers shared by every model family. All tensor math beyond matmuls goes through a kernel backend (`ops`, a
fastgen.kernels backend: the PyTorch one until the executor hands the model the one it chose).

The linear layers and the embedding are tensor-parallel (Megatron-LM's split, as in vLLM): built inside
`fastgen.distributed.building(rank, size)` each keeps one rank's shard and says which slice of a checkpoint's
full tensor that is (`shard`, read by the weight loader, which then never holds more than one tensor). A column-
parallel layer splits its output features (QKV by heads, gate/up by features) and needs no communication; the
row-parallel layer after it splits its input features and all-reduces its output: one all-reduce after attention
and one after the MLP per layer. The embedding and the LM head split the vocabulary. Built outside that context
(size 1) they are plain layers. A model family that uses only these layers (and replicated norms) can declare
`tensor_parallel = True` (fastgen.models.base.CausalLM).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fastgen.distributed import Slice, Split, all_reduce, current, gather_to_first
from fastgen.kernels import reference
from fastgen.kernels.linear import ReorderedWeight, linear
from fastgen.ragged import RaggedBatch


class KernelUser(nn.Module):
    """A layer whose math runs on a kernel backend; `CausalLM.use_kernels` sets `ops` on every one."""

    ops = reference


class RMSNorm(KernelUser):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class LayerNorm(KernelUser):
    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)


class Sharded(nn.Module):
    """A layer whose parameters are split over tensor-parallel ranks; it remembers the rank it was built for."""

    def __init__(self):
        super().__init__()
        self.tp = current()

    def shard(self, param: str, part: int | None, rank: int) -> list[Slice] | None:
        """The slices of a checkpoint's full tensor for `param` that `rank` keeps (`part`: which block of a packed
        parameter the tensor is, None for the whole parameter); None: the whole tensor (replicated)."""
        return None


class Reorderable(nn.Module):
    """A layer whose GEMM can run on a copy of its weight reordered for oneDNN (fastgen.kernels.linear);
    `CausalLM.use_linear` sets `reordered` on every one (None: F.linear on the plain weight)."""

    reordered: ReorderedWeight | None = None

    def matrix(self) -> torch.Tensor:
        return self.weight

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear(x, self.matrix(), bias, self.reordered)


class ColumnParallelLinear(Sharded, Reorderable):
    """y = x W^T + b with W's output rows split over the ranks: each rank computes its share of y, with no
    communication. `parts` are the blocks packed into W (Q, K and V; gate and up), each split on its own, so
    that each rank holds matching heads of Q, K and V."""

    def __init__(self, in_features: int, parts: Sequence[Split], bias: bool):
        super().__init__()
        self.parts = tuple(parts)
        self.local_sizes = [p.local(self.tp.size) for p in self.parts]
        self.weight = nn.Parameter(torch.empty(sum(self.local_sizes), in_features))
        self.bias = nn.Parameter(torch.empty(sum(self.local_sizes))) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def shard(self, param: str, part: int | None, rank: int) -> list[Slice]:
        size = self.tp.size
        offsets = [sum(self.local_sizes[:i]) for i in range(len(self.parts))]
        if part is not None:       # the checkpoint stores this block on its own (q_proj of a fused qkv_proj)
            return [Slice(0, self.parts[part].start(rank, size), self.local_sizes[part], offsets[part])]
        full = [sum(p.total for p in self.parts[:i]) for i in range(len(self.parts))]   # the blocks, fused
        return [Slice(0, full[i] + p.start(rank, size), self.local_sizes[i], offsets[i])
                for i, p in enumerate(self.parts)]


class RowParallelLinear(Sharded, Reorderable):
    """y = x W^T + b with W's input columns split over the ranks (x arrives split the same way, from a column-
    parallel layer): each rank's partial product is summed by one all-reduce, then the bias is added once."""

    def __init__(self, split: Split, out_features: int, bias: bool):
        super().__init__()
        self.split = split
        self.weight = nn.Parameter(torch.empty(out_features, split.local(self.tp.size)))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.matmul(x, self.bias)
        y = all_reduce(self.matmul(x))
        return y if self.bias is None else y + self.bias

    def shard(self, param: str, part: int | None, rank: int) -> list[Slice] | None:
        if param != "weight":
            return None
        return [Slice(1, self.split.start(rank, self.tp.size), self.split.local(self.tp.size))]


def vocab_rows(vocab: int, size: int) -> int:
    """Rows of the vocabulary each rank holds (the last rank's share is padded with zero rows)."""
    return -(-vocab // size)


class VocabParallelEmbedding(Sharded):
    """The token embedding with the vocabulary split over the ranks: each rank looks up the ids it holds (zeros
    for the others) and an all-reduce sums the rows."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.vocab, self.rows = vocab, vocab_rows(vocab, self.tp.size)
        self.first = self.tp.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return nn.functional.embedding(ids, self.weight)
        local = ids - self.first
        outside = (local < 0) | (local >= self.rows)
        h = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(h.masked_fill_(outside[:, None], 0))

    def shard(self, param: str, part: int | None, rank: int) -> list[Slice]:
        first = rank * self.rows
        return [Slice(0, first, max(0, min(self.rows, self.vocab - first)))]


class RotaryEmbedding(KernelUser):
    """cos/sin table for every position, built from the frequencies transformers computes for this config, so
    every rope-scaling variant transformers applies statically (linear, llama3, yarn, ...) is matched exactly."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, max_positions: int):
        super().__init__()
        self.inv_freq = inv_freq.detach().to("cpu", torch.float32)   # plain attribute: survives to_empty()
        self.attention_scaling, self.max_positions = attention_scaling, max_positions
        self.build_table()

    @classmethod
    def from_config(cls, config, hf_rotary_class) -> "RotaryEmbedding":
        """Asks transformers' own rotary module (`hf_rotary_class`) of `config` for inv_freq and the attention
        scaling, so scaling variants match."""
        with torch.device("cpu"):
            hf_rotary = hf_rotary_class(config=config)
        if getattr(hf_rotary, "rope_type", "default") in ("dynamic", "longrope"):
            raise ValueError(f"rope type {hf_rotary.rope_type!r} depends on the sequence length and is not "
                             "supported; supported: default, linear, llama3, yarn")
        return cls(hf_rotary.inv_freq, float(hf_rotary.attention_scaling), config.max_position_embeddings)

    def build_table(self) -> None:
        """(Re)computes the table; the loader calls it after materialising a model built on the meta device."""
        t = torch.arange(self.max_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, self.inv_freq)
        table = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scaling
        self.register_buffer("cos_sin", table, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> None:
        rotary_dim = self.cos_sin.shape[-1]
        if rotary_dim < q.shape[-1]:      # partial rotary (Phi-3's partial_rotary_factor < 1): the first dims turn
            q, k = q[..., :rotary_dim], k[..., :rotary_dim]
        self.ops.rotary(q, k, positions, self.cos_sin)


class Attention(KernelUser):
    """Self-attention over the blocked KV cache: fused QKV projection, optional rotary, optional sliding window,
    optional soft-capping of the scores (Gemma-2); the scale is head_dim ** -0.5 unless the family sets its own."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *, qkv_bias: bool,
                 out_bias: bool, rotary: RotaryEmbedding | None, window: int | None = None,
                 softcap: float | None = None, scale: float | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
        heads = Split(num_heads, head_dim, "num_attention_heads")
        kv_heads = Split(num_kv_heads, head_dim, "num_key_value_heads", replicate=True)
        tp = current().size          # this rank's heads: its share of the query heads and of their KV heads
        self.num_heads, self.num_kv_heads = heads.local_units(tp), kv_heads.local_units(tp)
        self.head_dim = head_dim
        self.q_size, self.kv_size = heads.local(tp), kv_heads.local(tp)
        self.qkv_proj = ColumnParallelLinear(hidden, [heads, kv_heads, kv_heads], bias=qkv_bias)
        self.o_proj = RowParallelLinear(heads, hidden, bias=out_bias)
        self.rotary = rotary
        self.window = window
        self.softcap = softcap
        self.scale = head_dim ** -0.5 if scale is None else scale

    def forward(self, x: torch.Tensor, batch: RaggedBatch, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.rotary is not None:
            self.rotary(q, k, batch.positions)
        k_cache, v_cache = kv
        self.ops.kv_write(k, v, k_cache, v_cache, batch.slot_mapping)
        out = self.ops.attention(q, k_cache, v_cache, batch.attn, self.scale, self.window, softcap=self.softcap)
        return self.o_proj(out.reshape(-1, self.q_size))


# The gated MLPs' activations (transformers' hidden_act names) and the kernel that applies each and multiplies.
GATED_ACTIVATIONS = {"silu": "silu_and_mul", "gelu_pytorch_tanh": "gelu_tanh_and_mul"}


def act_and_mul_kernel(activation: str) -> str:
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"unsupported gated-MLP activation {activation!r}; supported: {', '.join(GATED_ACTIVATIONS)}")
    return GATED_ACTIVATIONS[activation]


class GatedMLP(KernelUser):
    """Gated MLP (SwiGLU, or GeGLU for Gemma-2) with the gate and up projections fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False, activation: str = "silu"):
        super().__init__()
        features = Split(intermediate, what="intermediate_size")
        self.gate_up_proj = ColumnParallelLinear(hidden, [features, features], bias=bias)
        self.down_proj = RowParallelLinear(features, hidden, bias=bias)
        self.act_and_mul = act_and_mul_kernel(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(getattr(self.ops, self.act_and_mul)(self.gate_up_proj(x)))


class MLP(nn.Module):
    """Plain two-layer MLP (OPT)."""

    def __init__(self, hidden: int, intermediate: int, activation: str, bias: bool = True):
        super().__init__()
        acts = {"relu": nn.functional.relu, "gelu": nn.functional.gelu}
        if activation not in acts:
            raise ValueError(f"unsupported MLP activation {activation!r}; supported: {', '.join(acts)}")
        features = Split(intermediate, what="ffn_dim")
        self.fc1 = ColumnParallelLinear(hidden, [features], bias=bias)
        self.fc2 = RowParallelLinear(features, hidden, bias=bias)
        self.act = acts[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LMHead(VocabParallelEmbedding, Reorderable):
    """Projects only the rows that need logits; shares the embedding matrix when the model ties them. Split over
    ranks like the embedding (each rank scores its share of the vocabulary); rank 0 gathers the full logits."""

    def __init__(self, hidden: int, vocab: int, tied_to: VocabParallelEmbedding | None = None):
        super().__init__(vocab, hidden)
        # Tying by module, not by parameter: the tie then survives to_empty() and dtype/device moves.
        self.tied_to = tied_to
        if tied_to is not None:
            del self.weight
            self.weight = None

    def matrix(self) -> torch.Tensor:
        return self.tied_to.weight if self.tied_to is not None else self.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.matmul(h).float()
        if self.tp.size == 1:
            return logits
        return gather_to_first(logits, dim=1)[:, :self.vocab]
