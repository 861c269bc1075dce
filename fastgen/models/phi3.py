"""Phi-3 (mini / medium, and Phi-4-mini, which shares its model_type): Llama with the QKV and gate/up projections
already fused in its checkpoints (fastgen's own layout, so they load whole), an optional partial rotary
(`partial_rotary_factor`), and a sliding window on every layer when the config sets `sliding_window`.

Its rope scaling is static or refused: `longrope` (the 128k variants) switches frequencies with the sequence
length, which a KV cache filled at one length cannot follow, so it is refused like Llama's `dynamic`."""
from __future__ import annotations

from fastgen.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    model_types = ("phi3",)
    tensor_parallel = True

    @classmethod
    def hf_rotary_embedding(cls) -> type:
        from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
        return Phi3RotaryEmbedding

    @classmethod
    def layer_windows(cls, config) -> list[int | None]:
        return [getattr(config, "sliding_window", None)] * config.num_hidden_layers
