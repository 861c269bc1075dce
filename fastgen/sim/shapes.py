"""Models the simulator knows by name, and the ModelSpec of any model source without loading weights.

The paper's models are described by transformers' own config classes, built here in code (no weights, no
download); any other name is a fastgen model source (an embedded model or a local directory) read with
`fastgen.models.load_config`. The spec comes from the model family's own `describe`, as for a loaded model.
"""
from __future__ import annotations

import functools

from transformers import LlamaConfig, MistralConfig

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


def model_spec(source) -> ModelSpec:
    """The spec of a paper model name, a fastgen model source, or an in-memory model / config."""
    from fastgen.models import CausalLM, model_class
    if isinstance(source, CausalLM):
        return source.spec
    if isinstance(source, str):
        return _named_spec(source)
    config = source if hasattr(source, "model_type") else source.config
    return model_class(config).describe(config)


@functools.lru_cache(maxsize=64)
def _named_spec(source: str) -> ModelSpec:
    """Specs of named sources, read once per process (an embedded GGUF's config takes seconds to parse; a
    simulated benchmark sweep asks for it every run)."""
    from fastgen.models import load_config, model_class
    config = PAPER_MODELS[source]() if source in PAPER_MODELS else load_config(source, load_tokenizer=False)[0]
    return model_class(config).describe(config)
