"""Llama family: Llama-2/3, SmolLM2 (GQA, rope scaling), and the near-identical Mistral and Qwen2."""
from __future__ import annotations

import torch
from torch import nn

from fastgen.kv.cache import KVCache
from fastgen.models.base import CausalLM
from fastgen.models.layers import Attention, GatedMLP, LMHead, RMSNorm, RotaryEmbedding, VocabParallelEmbedding
from fastgen.ragged import RaggedBatch


class DecoderLayer(nn.Module):
    def __init__(self, config, rotary: RotaryEmbedding, window: int | None, qkv_bias: bool):
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.self_attn = Attention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                                   head_dim, qkv_bias=qkv_bias, out_bias=getattr(config, "attention_bias", False),
                                   rotary=rotary, window=window)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, bias=getattr(config, "mlp_bias", False))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, residual, batch, kv):
        h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, batch, kv)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config, rotary: RotaryEmbedding, windows: list[int | None], qkv_bias: bool):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, rotary, w, qkv_bias) for w in windows)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    model_types = ("llama",)
    tensor_parallel = True
    packed = (("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
              ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))

    def __init__(self, config):
        super().__init__(config)
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act={config.hidden_act!r} is not supported for {type(self).__name__}; "
                             "supported: silu")
        rotary = RotaryEmbedding.from_config(config, self.hf_rotary_embedding())
        self.model = LlamaModel(config, rotary, self.spec.windows, self.qkv_bias(config))
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, tied_to=tied)

    @classmethod
    def hf_rotary_embedding(cls) -> type:
        """transformers' rotary module of this family, whose frequencies and scaling the model copies."""
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        return LlamaRotaryEmbedding

    def qkv_bias(self, config) -> bool:
        return getattr(config, "attention_bias", False)

    def forward(self, batch: RaggedBatch, kv: KVCache) -> torch.Tensor:
        h, residual = self.model.embed_tokens(batch.input_ids), None
        for i, layer in enumerate(self.model.layers):
            h, residual = layer(h, residual, batch, kv.layer(i))
        idx = batch.logits_indices
        h, _ = self.model.norm(h.index_select(0, idx), residual.index_select(0, idx))
        return self.lm_head(h)


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with sliding-window attention on every layer."""

    model_types = ("mistral",)
    tensor_parallel = True

    @classmethod
    def layer_windows(cls, config) -> list[int | None]:
        return [config.sliding_window] * config.num_hidden_layers


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with biases on the QKV projection (not on o_proj), and optional per-layer sliding windows."""

    model_types = ("qwen2",)
    tensor_parallel = True

    def qkv_bias(self, config) -> bool:
        return True

    @classmethod
    def layer_windows(cls, config) -> list[int | None]:
        types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        window = config.sliding_window if getattr(config, "use_sliding_window", False) else None
        return [window if t == "sliding_attention" else None for t in types]
