"""Model shapes for the simulator: the sizes a step's cost depends on, read from a transformers config.

The paper's models are described by transformers' own config classes, built here in code (no weights, no
download); any other name is a fastgen model source (an embedded model or a local directory) read with
`fastgen.models.load_config`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import LlamaConfig, MistralConfig

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


@dataclass(frozen=True)
class ModelShape:
    """A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2). It also stands in for the model when the engine
    runs simulated: the engine reads only `config` (vocabulary, EOS ids) and `max_positions` from a model."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    window: int | None                   # sliding-window attention: a query sees at most this many keys
    tied_embeddings: bool
    config: Any = field(repr=False, compare=False)

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        if getattr(config, "model_type", None) not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"the simulator models Llama-family decoders (llama, mistral, qwen2), not "
                             f"{getattr(config, 'model_type', None)!r}")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                   config.num_attention_heads, config.num_key_value_heads, head_dim, config.vocab_size,
                   config.max_position_embeddings, window, bool(config.tie_word_embeddings), config)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer's linear layers (QKV, output, gate+up, down)."""
        return self.hidden * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden \
            + 3 * self.hidden * self.intermediate

    def kv_bytes_per_token(self, dtype_bytes: int, tensor_parallel: int = 1) -> int:
        """K and V of one token in every layer, on one device (KV heads split over devices, at least one each)."""
        return 2 * self.num_layers * -(-self.num_kv_heads // tensor_parallel) * self.head_dim * dtype_bytes

    @property
    def num_params(self) -> int:
        embeddings = self.vocab_size * self.hidden * (1 if self.tied_embeddings else 2)
        return self.num_layers * self.layer_params + embeddings


def model_shape(source) -> ModelShape:
    """The shape of a paper model name, a fastgen model source, or an in-memory model / config."""
    if isinstance(source, str) and source in PAPER_MODELS:
        return ModelShape.from_config(PAPER_MODELS[source]())
    if hasattr(source, "model_type"):
        return ModelShape.from_config(source)
    if hasattr(source, "config"):
        return ModelShape.from_config(source.config)
    from fastgen.models import load_config
    return ModelShape.from_config(load_config(source, load_tokenizer=False)[0])
