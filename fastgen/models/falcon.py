"""Falcon (rotary variants): attention and MLP in parallel off the same residual, LayerNorms, a GeLU MLP, and one
fused QKV projection whose rows are interleaved per KV group.

Supported: the new decoder architecture (Falcon-40B/180B: grouped KV heads, one LayerNorm for attention and one for
the MLP, or a shared one), and the old one (Falcon-7B: multi-query attention and a shared LayerNorm; or plain
multi-head attention, parallel or sequential blocks). Refused: ALiBi positions (`alibi: true`, Falcon-RW), which
fastgen's attention kernels do not add.
"""
from __future__ import annotations

import torch
from torch import nn

from fastgen.kv.cache import KVCache
from fastgen.model_spec import ModelSpec, eos_ids
from fastgen.models.base import CausalLM
from fastgen.models.layers import MLP, Attention, LayerNorm, LMHead, RotaryEmbedding, VocabParallelEmbedding
from fastgen.models.weights import MappedWeights, WeightSource
from fastgen.ragged import RaggedBatch


def falcon_kv_heads(config) -> int:
    """KV heads of each Falcon variant: grouped (new architecture), one (multi-query), or one per query head."""
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


def two_layer_norms(config) -> bool:
    """New-architecture blocks norm attention and MLP inputs separately unless num_ln_in_parallel_attn is 1."""
    return config.new_decoder_architecture and config.num_ln_in_parallel_attn in (None, 2)


class FalconDecoderLayer(nn.Module):
    def __init__(self, config, rotary):
        super().__init__()
        hidden, heads, eps = config.hidden_size, config.num_attention_heads, config.layer_norm_epsilon
        self.self_attention = Attention(hidden, heads, falcon_kv_heads(config), hidden // heads, qkv_bias=config.bias,
                                        out_bias=config.bias, rotary=rotary)
        self.mlp = MLP(hidden, config.ffn_hidden_size, config.activation, bias=config.bias)
        self.parallel = config.new_decoder_architecture or config.parallel_attn
        if two_layer_norms(config):
            self.ln_attn, self.ln_mlp = LayerNorm(hidden, eps), LayerNorm(hidden, eps)
        else:
            self.input_layernorm = LayerNorm(hidden, eps)
            if not self.parallel:
                self.post_attention_layernorm = LayerNorm(hidden, eps)

    def forward(self, h: torch.Tensor, batch: RaggedBatch, kv) -> torch.Tensor:
        if hasattr(self, "ln_attn"):
            attn_in, mlp_in = self.ln_attn(h), self.ln_mlp(h)
        else:
            attn_in = mlp_in = self.input_layernorm(h)
        attn = self.self_attention(attn_in, batch, kv)
        if self.parallel:
            return h + (self.mlp(mlp_in) + attn)
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h))


class FalconForCausalLM(CausalLM):
    model_types = ("falcon",)
    tensor_parallel = True
    renames = ((".self_attention.query_key_value.", ".self_attention.qkv_proj."),
               (".self_attention.dense.", ".self_attention.o_proj."),
               (".mlp.dense_h_to_4h.", ".mlp.fc1."), (".mlp.dense_4h_to_h.", ".mlp.fc2."))

    def __init__(self, config):
        super().__init__(config)
        from transformers.models.falcon.modeling_falcon import FalconRotaryEmbedding
        rotary = RotaryEmbedding.from_config(config, FalconRotaryEmbedding)
        self.transformer = nn.Module()
        self.transformer.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.transformer.h = nn.ModuleList(FalconDecoderLayer(config, rotary) for _ in range(config.num_hidden_layers))
        self.transformer.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon)
        tied = self.transformer.word_embeddings if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, tied_to=tied)

    @classmethod
    def describe(cls, config) -> ModelSpec:
        if config.alibi:
            raise ValueError("Falcon with ALiBi positions (alibi=true, e.g. Falcon-RW-1B/7B) is not supported: "
                             "fastgen's attention kernels add no ALiBi bias; supported: the rotary Falcons "
                             "(Falcon-7B/40B/180B, old and new decoder architectures)")
        heads = config.num_attention_heads
        return ModelSpec(model_type=config.model_type, num_layers=config.num_hidden_layers, hidden=config.hidden_size,
                         intermediate=config.ffn_hidden_size, num_heads=heads, num_kv_heads=falcon_kv_heads(config),
                         head_dim=config.hidden_size // heads, vocab_size=config.vocab_size,
                         max_positions=config.max_position_embeddings, windows=(None,) * config.num_hidden_layers,
                         tied_embeddings=bool(config.tie_word_embeddings), gated_mlp=False,
                         eos_token_ids=eos_ids(getattr(config, "eos_token_id", None)))

    def load_weights(self, weights: WeightSource, source: str = "checkpoint") -> None:
        """Falcon's fused QKV rows come per KV group (its query heads, then its key, then its value); fastgen's
        come as all queries, all keys, all values. One permutation covers every variant: multi-query is one group
        of all heads, plain multi-head is one group per head."""
        spec = self.spec
        groups, per_group = spec.num_kv_heads, spec.num_heads // spec.num_kv_heads + 2
        rows = groups * per_group * spec.head_dim

        def to_fastgen(name: str, t: torch.Tensor) -> torch.Tensor:
            if ".query_key_value." not in name or t.shape[0] != rows:
                return t        # not QKV, or a shape the loader will name as a mismatch
            t = t.reshape(groups, per_group, spec.head_dim, *t.shape[1:])
            q, k, v = t[:, :-2], t[:, -2], t[:, -1]
            return torch.cat([x.reshape(-1, *t.shape[3:]) for x in (q, k, v)])

        super().load_weights(MappedWeights(weights, to_fastgen), source)

    def forward(self, batch: RaggedBatch, kv: KVCache) -> torch.Tensor:
        h = self.transformer.word_embeddings(batch.input_ids)
        for i, layer in enumerate(self.transformer.h):
            h = layer(h, batch, kv.layer(i))
        return self.lm_head(self.transformer.ln_f(h.index_select(0, batch.logits_indices)))
