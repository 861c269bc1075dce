"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 whose MLPs are a mixture of fine-grained experts plus a shared
expert behind a sigmoid gate; the router's top-k weights are renormalised only when `norm_topk_prob` says so, and
layers listed in `mlp_only_layers` (or off the `decoder_sparse_step`) keep a dense MLP."""
from __future__ import annotations

import dataclasses

from fastgen.model_spec import ModelSpec
from fastgen.models.llama import Qwen2ForCausalLM
from fastgen.models.moe import SparseMoE


def moe_layer_indices(config) -> list[int]:
    """The layers whose MLP is the mixture of experts (transformers' Qwen2MoeDecoderLayer rule)."""
    if config.num_experts <= 0:
        return []
    return [i for i in range(config.num_hidden_layers)
            if i not in (config.mlp_only_layers or []) and (i + 1) % config.decoder_sparse_step == 0]


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    model_types = ("qwen2_moe",)
    # Hub checkpoints store each expert's gate_proj, up_proj and down_proj; transformers' state dict stacks them.
    stacked = ((r"\.experts\.(\d+)\.gate_proj\.weight$", ".experts.gate_up_proj", 0, 2),
               (r"\.experts\.(\d+)\.up_proj\.weight$", ".experts.gate_up_proj", 1, 2),
               (r"\.experts\.(\d+)\.down_proj\.weight$", ".experts.down_proj", 0, 1))

    def __init__(self, config):
        super().__init__(config)
        for i in moe_layer_indices(config):
            self.model.layers[i].mlp = SparseMoE(
                config.hidden_size, config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                renormalize=bool(config.norm_topk_prob), round_weights=True,
                shared_intermediate=config.shared_expert_intermediate_size, activation=config.hidden_act)

    def qkv_bias(self, config) -> bool:
        return bool(getattr(config, "qkv_bias", True))

    @classmethod
    def describe(cls, config) -> ModelSpec:
        moe_layers = len(moe_layer_indices(config))
        if not moe_layers:
            return super().describe(config)
        return dataclasses.replace(
            super().describe(config), num_experts=config.num_experts, experts_per_token=config.num_experts_per_tok,
            expert_intermediate=config.moe_intermediate_size,
            shared_expert_intermediate=config.shared_expert_intermediate_size, num_moe_layers=moe_layers)
