"""Mixtral: Mistral with a sparse mixture of experts (top-k of the router's softmax, renormalised) in every layer."""
from __future__ import annotations

import dataclasses

from fastgen.model_spec import ModelSpec
from fastgen.models.llama import MistralForCausalLM
from fastgen.models.moe import SparseMoE


class MixtralForCausalLM(MistralForCausalLM):
    model_types = ("mixtral",)
    renames = ((".block_sparse_moe.", ".mlp."),)
    # Hub checkpoints store each expert's w1 (gate), w3 (up) and w2 (down); transformers' state dict stacks them.
    stacked = ((r"\.experts\.(\d+)\.w1\.weight$", ".experts.gate_up_proj", 0, 2),
               (r"\.experts\.(\d+)\.w3\.weight$", ".experts.gate_up_proj", 1, 2),
               (r"\.experts\.(\d+)\.w2\.weight$", ".experts.down_proj", 0, 1))

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = SparseMoE(config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                                  config.intermediate_size, renormalize=True, activation=config.hidden_act)

    @classmethod
    def describe(cls, config) -> ModelSpec:
        return dataclasses.replace(
            super().describe(config), num_experts=config.num_local_experts,
            experts_per_token=config.num_experts_per_tok, expert_intermediate=config.intermediate_size,
            num_moe_layers=config.num_hidden_layers)
