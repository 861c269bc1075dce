"""ModelSpec: the one description of a model that the engine, the KV pool, the real executor and the simulator share.

Every model family reads it from a transformers config (`CausalLM.describe`), so each fact about a model (its KV
bytes per token, which layers attend through a sliding window, how many weights a layer streams) is stated once,
here, whether the model is built with weights or only simulated.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    windows: tuple[int | None, ...]      # per layer: a sliding window (a query sees at most this many keys) or None
    tied_embeddings: bool
    gated_mlp: bool = True               # gate + up + down projections (SwiGLU); False: two matrices (OPT)
    eos_token_ids: frozenset[int] = frozenset()
    # Mixture of experts (num_experts = 0: a dense model). In `num_moe_layers` layers the MLP is a router over
    # `num_experts` gated experts of width `expert_intermediate`, `experts_per_token` of which each token runs,
    # plus an always-on shared expert of width `shared_expert_intermediate` behind a sigmoid gate (Qwen2-MoE;
    # 0: none). The other layers keep the dense MLP of width `intermediate`.
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_expert_intermediate: int = 0
    num_moe_layers: int = 0

    def __post_init__(self):
        if len(self.windows) != self.num_layers:
            raise ValueError(f"{self.model_type}: {len(self.windows)} layer windows for {self.num_layers} layers")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        if self.num_experts and not (1 <= self.experts_per_token <= self.num_experts
                                     and self.expert_intermediate > 0 and 1 <= self.num_moe_layers <= self.num_layers):
            raise ValueError(f"{self.model_type}: inconsistent mixture of experts: {self.experts_per_token} of "
                             f"{self.num_experts} experts of width {self.expert_intermediate} in "
                             f"{self.num_moe_layers} of {self.num_layers} layers")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_params(self) -> int:
        """Weights of one layer's attention projections (QKV and output)."""
        return self.hidden * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden

    @property
    def layer_params(self) -> int:
        """Weights of one dense decoder layer's linear layers (QKV, output, the MLP's two or three matrices)."""
        return self.attention_params + (3 if self.gated_mlp else 2) * self.hidden * self.intermediate

    @property
    def expert_params(self) -> int:
        """Weights of one routed expert (gate, up and down)."""
        return 3 * self.hidden * self.expert_intermediate

    def moe_mlp_params(self, experts: int) -> int:
        """Weights of one MoE layer's MLP with `experts` routed experts: those, the router, the shared expert."""
        routed = experts * self.expert_params + self.num_experts * self.hidden
        if not self.shared_expert_intermediate:
            return routed
        return routed + 3 * self.hidden * self.shared_expert_intermediate + self.hidden   # + the shared one's gate

    def _params(self, routed_experts: int) -> int:
        dense_layers = self.num_layers - self.num_moe_layers
        embeddings = self.vocab_size * self.hidden * (1 if self.tied_embeddings else 2)
        return (self.num_layers * self.attention_params + dense_layers * (self.layer_params - self.attention_params)
                + self.num_moe_layers * self.moe_mlp_params(routed_experts) + embeddings)

    @property
    def num_params(self) -> int:
        """Every weight (all experts of a mixture)."""
        return self._params(self.num_experts)

    @property
    def active_params(self) -> int:
        """The weights one token runs through: a mixture's top-k experts only (all weights for a dense model)."""
        return self._params(self.experts_per_token)

    def kv_heads_per_device(self, tensor_parallel: int = 1) -> int:
        """KV heads one device holds: split over devices, at least one each (replicated when fewer than devices)."""
        return -(-self.num_kv_heads // tensor_parallel)

    def kv_bytes_per_token(self, dtype_bytes: int, tensor_parallel: int = 1) -> int:
        """K and V of one token in every layer, on one device."""
        return 2 * self.num_layers * self.kv_heads_per_device(tensor_parallel) * self.head_dim * dtype_bytes

    def kv_blocks_in(self, free_bytes: float, block_size: int, dtype_bytes: int, tensor_parallel: int = 1) -> int:
        """How many KV blocks of `block_size` tokens fit in `free_bytes` of one device's memory."""
        return int(free_bytes // (block_size * self.kv_bytes_per_token(dtype_bytes, tensor_parallel)))


def eos_ids(*sources) -> frozenset[int]:
    """EOS ids named by configs or tokenizers (an int, a list of ints, or None each)."""
    ids: set[int] = set()
    for source in sources:
        if source is not None:
            ids.update(source if isinstance(source, (list, tuple, set, frozenset)) else [source])
    return frozenset(int(i) for i in ids)
