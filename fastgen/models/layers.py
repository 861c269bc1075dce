"""Layers shared by every model family. All tensor math beyond matmuls goes through a kernel backend (`ops`, a
fastgen.kernels backend: the PyTorch one until the executor hands the model the one it chose)."""
from __future__ import annotations

import torch
from torch import nn

from fastgen.kernels import reference
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


class RotaryEmbedding(KernelUser):
    """cos/sin table for every position, built from the frequencies transformers computes for this config, so
    every rope-scaling variant transformers applies statically (linear, llama3, yarn, ...) is matched exactly."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, max_positions: int):
        super().__init__()
        self.inv_freq = inv_freq.detach().to("cpu", torch.float32)   # plain attribute: survives to_empty()
        self.attention_scaling, self.max_positions = attention_scaling, max_positions
        self.build_table()

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
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.qkv_proj.shard_sizes = [self.q_size, self.kv_size, self.kv_size]   # read by the weight loader
        self.o_proj = nn.Linear(self.q_size, hidden, bias=out_bias)
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
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.gate_up_proj.shard_sizes = [intermediate, intermediate]
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
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
        self.fc1 = nn.Linear(hidden, intermediate, bias=bias)
        self.fc2 = nn.Linear(intermediate, hidden, bias=bias)
        self.act = acts[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LMHead(nn.Module):
    """Projects only the rows that need logits; shares the embedding matrix when the model ties them."""

    def __init__(self, hidden: int, vocab: int, tied_to: nn.Embedding | None = None):
        super().__init__()
        # Tying by module, not by parameter: the tie then survives to_empty() and dtype/device moves.
        self.tied_to = tied_to
        self.weight = None if tied_to is not None else nn.Parameter(torch.empty(vocab, hidden))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.tied_to.weight if self.tied_to is not None else self.weight
        return nn.functional.linear(h, weight).float()
