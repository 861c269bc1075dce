"""OPT: learned positions (offset 2), pre- or post-LayerNorm blocks, ReLU MLP, biases everywhere."""
from __future__ import annotations

import torch
from torch import nn

from fastgen.kv.cache import KVCache
from fastgen.models.base import CausalLM
from fastgen.model_spec import ModelSpec, eos_ids
from fastgen.models.layers import MLP, Attention, LayerNorm, LMHead, VocabParallelEmbedding
from fastgen.ragged import RaggedBatch

POSITION_OFFSET = 2   # OPT's learned position table starts two rows in


class OPTDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        heads = config.num_attention_heads
        self.pre_norm = config.do_layer_norm_before
        affine = getattr(config, "layer_norm_elementwise_affine", True)
        self.self_attn = Attention(config.hidden_size, heads, heads, config.hidden_size // heads,
                                   qkv_bias=config.enable_bias, out_bias=config.enable_bias, rotary=None)
        self.self_attn_layer_norm = LayerNorm(config.hidden_size, affine=affine)
        self.mlp = MLP(config.hidden_size, config.ffn_dim, config.activation_function, bias=config.enable_bias)
        self.final_layer_norm = LayerNorm(config.hidden_size, affine=affine)

    def forward(self, h: torch.Tensor, batch: RaggedBatch, kv) -> torch.Tensor:
        for norm, block in ((self.self_attn_layer_norm, lambda x: self.self_attn(x, batch, kv)),
                            (self.final_layer_norm, self.mlp)):
            out = h + block(norm(h) if self.pre_norm else h)
            h = out if self.pre_norm else norm(out)
        return h


class OPTDecoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        proj = config.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, proj)
        # replicated on every tensor-parallel rank, like the small project_in / project_out
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, config.hidden_size)
        self.project_in = nn.Linear(proj, config.hidden_size, bias=False) if proj != config.hidden_size else None
        self.project_out = nn.Linear(config.hidden_size, proj, bias=False) if proj != config.hidden_size else None
        keep_final = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        affine = getattr(config, "layer_norm_elementwise_affine", True)
        self.final_layer_norm = LayerNorm(config.hidden_size, affine=affine) if keep_final else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config) for _ in range(config.num_hidden_layers))


class OPTForCausalLM(CausalLM):
    model_types = ("opt",)
    tensor_parallel = True
    packed = (("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2))
    renames = ((".self_attn.out_proj.", ".self_attn.o_proj."), (".fc1.", ".mlp.fc1."), (".fc2.", ".mlp.fc2."))

    def __init__(self, config):
        super().__init__(config)
        self.model = nn.Module()
        self.model.decoder = OPTDecoder(config)
        tied = self.model.decoder.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.word_embed_proj_dim, config.vocab_size, tied_to=tied)

    @classmethod
    def describe(cls, config) -> ModelSpec:
        heads = config.num_attention_heads
        return ModelSpec(model_type=config.model_type, num_layers=config.num_hidden_layers, hidden=config.hidden_size,
                         intermediate=config.ffn_dim, num_heads=heads, num_kv_heads=heads,
                         head_dim=config.hidden_size // heads, vocab_size=config.vocab_size,
                         max_positions=config.max_position_embeddings, windows=(None,) * config.num_hidden_layers,
                         tied_embeddings=bool(config.tie_word_embeddings), gated_mlp=False,
                         eos_token_ids=eos_ids(getattr(config, "eos_token_id", None)))

    def forward(self, batch: RaggedBatch, kv: KVCache) -> torch.Tensor:
        dec = self.model.decoder
        h = dec.embed_tokens(batch.input_ids)
        if dec.project_in is not None:
            h = dec.project_in(h)
        h = h + dec.embed_positions(batch.positions + POSITION_OFFSET)
        for i, layer in enumerate(dec.layers):
            h = layer(h, batch, kv.layer(i))
        h = h.index_select(0, batch.logits_indices)
        if dec.final_layer_norm is not None:
            h = dec.final_layer_norm(h)
        if dec.project_out is not None:
            h = dec.project_out(h)
        return self.lm_head(h)
