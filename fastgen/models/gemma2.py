"""Gemma-2: scaled embeddings, RMSNorms that scale by (1 + weight), a norm after attention and after the MLP as well
as before them, a GeGLU MLP, alternating sliding-window and full-attention layers, attention scaled by
query_pre_attn_scalar, and tanh soft-capping of the attention scores (in the kernels) and of the final logits."""
from __future__ import annotations

import torch
from torch import nn

from fastgen.kv.cache import KVCache
from fastgen.models.base import CausalLM
from fastgen.models.layers import Attention, GatedMLP, LMHead, RMSNorm, RotaryEmbedding, VocabParallelEmbedding
from fastgen.ragged import RaggedBatch


class GemmaRMSNorm(RMSNorm):
    """RMSNorm scaling by (1 + weight), the sum taken in fp32 as transformers does. In bf16 the sum is rounded before
    it scales the (rounded) normalised input, where transformers rounds once after: a last-bit difference."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.rms_norm(x, (1.0 + self.weight.float()).to(self.weight.dtype), self.eps, residual)


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, config, rotary, window: int | None):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(hidden, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                   qkv_bias=config.attention_bias, out_bias=config.attention_bias, rotary=rotary,
                                   window=window, softcap=config.attn_logit_softcapping,
                                   scale=config.query_pre_attn_scalar ** -0.5)
        self.mlp = GatedMLP(hidden, config.intermediate_size, activation=config.hidden_activation)
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, h, residual, batch, kv):
        h, residual = self.input_layernorm(h, residual)
        h, _ = self.post_attention_layernorm(self.self_attn(h, batch, kv))
        h, residual = self.pre_feedforward_layernorm(h, residual)       # residual += normed attention output
        h, _ = self.post_feedforward_layernorm(self.mlp(h))
        return h, residual


class Gemma2ForCausalLM(CausalLM):
    model_types = ("gemma2",)
    tensor_parallel = True
    packed = (("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
              ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))

    def __init__(self, config):
        super().__init__(config)
        from transformers.models.gemma2.modeling_gemma2 import Gemma2RotaryEmbedding
        rotary = RotaryEmbedding.from_config(config, Gemma2RotaryEmbedding)
        self.model = nn.Module()
        self.model.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(Gemma2DecoderLayer(config, rotary, w) for w in self.spec.windows)
        self.model.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, tied_to=tied)
        self.final_logit_softcapping = config.final_logit_softcapping

    @classmethod
    def layer_windows(cls, config) -> list[int | None]:
        return [config.sliding_window if t == "sliding_attention" else None for t in config.layer_types]

    def forward(self, batch: RaggedBatch, kv: KVCache) -> torch.Tensor:
        h = self.model.embed_tokens(batch.input_ids)
        h = h * torch.tensor(self.config.hidden_size ** 0.5, dtype=h.dtype)      # the normalizer, in h's dtype
        residual = None
        for i, layer in enumerate(self.model.layers):
            h, residual = layer(h, residual, batch, kv.layer(i))
        idx = batch.logits_indices
        h, _ = self.model.norm(h.index_select(0, idx), residual.index_select(0, idx))
        logits = self.lm_head(h)
        if self.final_logit_softcapping is not None:      # a [sequences, vocab] tensor once a step: plain PyTorch
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits
