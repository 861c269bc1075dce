"""Models the simulator knows by name, and the ModelSpec of any model source without loading weights.

The paper's models, and one published size of each other supported family, are described by transformers' own
config classes, built here in code (no weights, no download); any other name is a fastgen model source (an
embedded model or a local directory) read with `fastgen.models.load_config`. The spec comes from the model family's
own `describe`, as for a loaded model.
"""
from __future__ import annotations

import functools
from pathlib import Path

from transformers import (FalconConfig, Gemma2Config, LlamaConfig, MistralConfig, MixtralConfig, Phi3Config,
                          Qwen2MoeConfig)

from fastgen.model_spec import ModelSpec

_LLAMA_2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)

PAPER_MODELS = {
    "llama-2-7b": lambda: LlamaConfig(**_LLAMA_2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32),
    "llama-2-13b": lambda: LlamaConfig(**_LLAMA_2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                       num_attention_heads=40, num_key_value_heads=40),
    "llama-2-70b": lambda: LlamaConfig(**_LLAMA_2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                       num_attention_heads=64, num_key_value_heads=8),
    "mistral-7b": lambda: MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                        max_position_embeddings=32768, sliding_window=4096,
                                        tie_word_embeddings=False),
}

# The other supported families at a published size each (the hub configs' shape fields).
FAMILY_MODELS = {
    "mixtral-8x7b": lambda: MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                          num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
                                          tie_word_embeddings=False),
    "qwen1.5-moe-a2.7b": lambda: Qwen2MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                                                num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                                                num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                                                shared_expert_intermediate_size=5632, max_position_embeddings=8192,
                                                tie_word_embeddings=False),
    "phi-3-mini-4k": lambda: Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                        max_position_embeddings=4096, sliding_window=2047, tie_word_embeddings=False),
    "falcon-7b": lambda: FalconConfig(vocab_size=65024, hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
                                      multi_query=True, new_decoder_architecture=False, parallel_attn=True,
                                      bias=False, max_position_embeddings=2048),
    "gemma-2-9b": lambda: Gemma2Config(vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                                       num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                                       head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                                       max_position_embeddings=8192),
}
NAMED_MODELS = {**PAPER_MODELS, **FAMILY_MODELS}


def model_spec(source) -> ModelSpec:
    """The spec of a paper model name, a fastgen model source, or an in-memory model / config."""
    from fastgen.models import CausalLM, model_class
    if isinstance(source, CausalLM):
        return source.spec
    if isinstance(source, (str, Path)):
        return _named_spec(str(source))
    config = source if hasattr(source, "model_type") else source.config
    return model_class(config).describe(config)


@functools.lru_cache(maxsize=64)
def _named_spec(source: str) -> ModelSpec:
    """Specs of named sources, read once per process (an embedded GGUF's config takes seconds to parse; a
    simulated benchmark sweep asks for it every run)."""
    from fastgen.models import load_config, model_class
    config = NAMED_MODELS[source]() if source in NAMED_MODELS else load_config(source, load_tokenizer=False)[0]
    return model_class(config).describe(config)
