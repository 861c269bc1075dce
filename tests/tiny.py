"""Tiny random-weight transformers models of every supported family, and a minimal driver of the ragged
forward pass, shared by the tests."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from transformers import (AutoModelForCausalLM, FalconConfig, Gemma2Config, LlamaConfig, MistralConfig, MixtralConfig,
                          OPTConfig, Phi3Config, Qwen2Config, Qwen2MoeConfig)

from fastgen.compose import EngineConfig
from fastgen.engine import LLMEngine
from fastgen.executors import make_executor
from fastgen.kv import KV_MANAGERS, KVManager, make_kv_manager
from fastgen.kv.allocator import BlockAllocator
from fastgen.kv.cache import KVCache
from fastgen.models import EMBEDDED, build_model
from fastgen.ragged import RaggedBatch, SeqChunk
from fastgen.schedulers import SCHEDULERS, Scheduler, make_scheduler
from fastgen.speculative import SpeculativeConfig, make_proposer


def tiny_config(family: str, seed: int = 0, **overrides):
    common = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    if family == "llama":
        cfg = LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False)
    elif family == "llama-gqa-tied":
        cfg = LlamaConfig(**{**common, "num_attention_heads": 6, "hidden_size": 48}, num_key_value_heads=2,
                          tie_word_embeddings=True, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                          "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64})
    elif family == "mistral":
        cfg = MistralConfig(**common, num_key_value_heads=1, sliding_window=7, tie_word_embeddings=False)
    elif family == "qwen2":
        cfg = Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True)
    elif family == "opt":
        cfg = OPTConfig(vocab_size=211, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=256, word_embed_proj_dim=64)
    elif family == "opt-postln":
        cfg = OPTConfig(vocab_size=211, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=256, word_embed_proj_dim=32, do_layer_norm_before=False)
    elif family == "mixtral":                      # top-2 of 4 experts
        cfg = MixtralConfig(**common, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                            tie_word_embeddings=False)
    elif family == "mixtral-top1":                 # top-1 of 8: a decode step leaves most experts without tokens
        cfg = MixtralConfig(**common, num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=1,
                            tie_word_embeddings=True)
    elif family == "qwen2_moe":                    # top-2 of 4 fine-grained experts, weights not renormalised
        cfg = Qwen2MoeConfig(**common, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=False,
                             tie_word_embeddings=False)
    elif family == "qwen2_moe-mixed":              # top-3 renormalised, a dense layer, a sliding-window layer
        cfg = Qwen2MoeConfig(**common, num_key_value_heads=4, num_experts=6, num_experts_per_tok=3,
                             moe_intermediate_size=24, shared_expert_intermediate_size=40, norm_topk_prob=True,
                             mlp_only_layers=[1], use_sliding_window=True, sliding_window=7, max_window_layers=2,
                             tie_word_embeddings=True)
    elif family == "phi3":                         # a window on every layer, rotary on half of each head
        cfg = Phi3Config(**common, num_key_value_heads=2, sliding_window=9, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    elif family == "falcon":                       # new decoder architecture: grouped KV, two LayerNorms
        cfg = FalconConfig(vocab_size=211, hidden_size=64, ffn_hidden_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True, bias=False,
                           max_position_embeddings=256, tie_word_embeddings=True)
    elif family == "falcon-mq":                    # old architecture as in Falcon-7B: multi-query, parallel block
        cfg = FalconConfig(vocab_size=211, hidden_size=64, ffn_hidden_size=96, num_hidden_layers=2,
                           num_attention_heads=4, new_decoder_architecture=False, multi_query=True,
                           parallel_attn=True, bias=False, max_position_embeddings=256, tie_word_embeddings=True)
    elif family == "falcon-seq":                   # old architecture, multi-head, sequential block, biases
        cfg = FalconConfig(vocab_size=211, hidden_size=64, ffn_hidden_size=96, num_hidden_layers=2,
                           num_attention_heads=4, new_decoder_architecture=False, multi_query=False,
                           parallel_attn=False, bias=True, max_position_embeddings=256, tie_word_embeddings=False)
    elif family == "gemma2":                       # sliding / full layers, soft-capping that bites at this scale
        cfg = Gemma2Config(**common, num_key_value_heads=2, head_dim=16,
                           query_pre_attn_scalar=24, sliding_window=7, attn_logit_softcapping=1.0,
                           final_logit_softcapping=2.0, initializer_range=0.1, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2)
    else:
        raise KeyError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


FAMILIES = ["llama", "llama-gqa-tied", "mistral", "qwen2", "opt", "opt-postln", "mixtral", "mixtral-top1", "qwen2_moe",
            "qwen2_moe-mixed", "phi3", "falcon", "falcon-mq", "falcon-seq", "gemma2"]
MOE_FAMILIES = ["mixtral", "mixtral-top1", "qwen2_moe", "qwen2_moe-mixed"]


def tiny_hf_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():   # random biases and norm weights so that every weight matters
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
            elif "norm" in name:
                p.normal_(1.0, 0.2)
    return model


class ChunkRunner:
    """Feeds sequences through a fastgen model in chosen chunks, owning a KV cache and block tables."""

    def __init__(self, model, num_blocks: int = 64, block_size: int = 16):
        self.model, self.block_size = model, block_size
        self.cache = KVCache(model.spec, num_blocks, block_size, next(model.parameters()).dtype)
        self.alloc = BlockAllocator(num_blocks)
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, work: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        chunks = []
        for sid, toks in work.items():
            start = self.lens.get(sid, 0)
            table = self.tables.setdefault(sid, [])
            need = -(-(start + len(toks)) // self.block_size) - len(table)
            table.extend(self.alloc.allocate(max(need, 0)))
            chunks.append(SeqChunk(toks, start, list(table)))
            self.lens[sid] = start + len(toks)
        logits = self.model(RaggedBatch.build(chunks, self.block_size), self.cache)
        return dict(zip(work, logits))


def fastgen_from_hf(hf_model, dtype=torch.float32):
    return build_model(hf_model.config, hf_model.state_dict(), dtype, "cpu", "test")


def reference_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy tokens. For sliding-window models, transformers' generate() (its sliding-window KV
    cache) disagrees with transformers' own cache-free forward on long prompts; there the reference is greedy
    decoding with the cache-free forward, which is the model's definition."""
    if getattr(hf_model.config, "sliding_window", None) is None:
        ids = torch.tensor([prompt])   # an explicit mask: else generate() masks every prompt token equal to pad
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt):].tolist()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf_model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


def smollm2_files() -> tuple[str, str]:
    """Directory and GGUF file name of the embedded SmolLM2 (installed with the package, never downloaded)."""
    emb = EMBEDDED["smollm2-135m"]
    return str(emb.directory()), emb.gguf_file


def scheduler_config(name: str, **knobs):
    """`name`'s typed config with those of `knobs` it has (tests pass one set of knobs to every policy)."""
    valid = {f.name for f in dataclasses.fields(SCHEDULERS.get(name).Config)}
    return SCHEDULERS.config(name, **{k: v for k, v in knobs.items() if k in valid})


class Built(NamedTuple):
    """An engine composed in the test, with the parts it was given, so a test can look at them."""

    engine: LLMEngine
    scheduler: Scheduler
    kv: KVManager


def compose_engine(model, scheduler: str = "splitfuse", kv: str = "blocked", num_blocks: int = 64,
                   block_size: int = 16, kernels: str = "auto", linear: str = "auto",
                   speculative: SpeculativeConfig | None = None, prefix_caching: bool = False, **knobs) -> Built:
    kv_knobs = {k: knobs.pop(k) for k in ("swap_blocks",) if k in knobs}
    if prefix_caching:
        kv_knobs["prefix_caching"] = True
    cfg = EngineConfig(scheduler=scheduler_config(scheduler, **knobs),
                       kv=KV_MANAGERS.config(kv, block_size=block_size, num_blocks=num_blocks, **kv_knobs))
    cfg.hardware.kernels, cfg.hardware.linear = kernels, linear
    cfg.validate()
    executor = make_executor(cfg, model)
    manager = make_kv_manager(cfg.kv, executor.num_kv_blocks, executor.num_host_kv_blocks)
    policy = make_scheduler(cfg.scheduler, manager)
    proposer = make_proposer(speculative) if speculative is not None else None
    return Built(LLMEngine(executor, policy, proposer=proposer), policy, manager)


def drain(eng: LLMEngine) -> dict:
    """Steps until the engine is idle; the finished requests by id."""
    finished = {}
    while eng.has_unfinished():
        finished.update((o.request_id, o.request) for o in eng.step() if o.finished)
    return finished


def drive_with_aborts(eng, manager, lens, data, request_kwargs=dict, after_step=lambda: None):
    """The property tests' run: requests of (prompt, output) lengths `lens` arrive at steps hypothesis (`data`)
    picks, with `request_kwargs()` (their class), and some are aborted; after every step no KV block is held by
    two live sequences. Checks that every request finishes exactly once; returns (ids, aborted ids, finished
    requests by id)."""
    from hypothesis import strategies as st

    from fastgen.sampling import SamplingParams
    pending = list(enumerate(lens))
    ids, aborted, events, finished = {}, set(), [], {}
    while pending or eng.has_unfinished():
        if pending and data.draw(st.booleans()):
            i, (p, n) = pending.pop(0)
            ids[i] = eng.add_request([(i * 7 + j) % 200 for j in range(p)],
                                     SamplingParams(max_new_tokens=n, ignore_eos=True), **request_kwargs())
        if ids and data.draw(st.integers(0, 9)) == 0:
            victim = data.draw(st.sampled_from(sorted(ids.values())))
            if eng.abort(victim) is not None:
                aborted.add(victim)
                events.append(victim)
        if not eng.has_unfinished():
            continue
        outs = eng.step()
        after_step()
        owners = {}
        for rid, blocks in manager.tables.items():
            for b in blocks:
                assert owners.setdefault(b, rid) == rid, "a KV block is shared by two live sequences"
        events += [o.request_id for o in outs if o.finished]
        finished.update((o.request_id, o.request) for o in outs if o.finished)
    assert sorted(events) == sorted(ids.values()), "every request finishes exactly once"
    return ids, aborted, finished
