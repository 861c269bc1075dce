"""ModelRunner: owns the tensors. It sizes and holds the KV cache, turns a scheduler's plan into a RaggedBatch,
and runs the model. Nothing else in the engine touches a tensor except the sampler."""
from __future__ import annotations

import torch

from fastgen.config import KVConfig
from fastgen.kv.cache import KVCache
from fastgen.kv.manager import KVManager
from fastgen.models.base import CausalLM
from fastgen.ragged import RaggedBatch, SeqChunk
from fastgen.schedulers.base import SchedulerOutput


def num_kv_blocks(model: CausalLM, cfg: KVConfig, dtype: torch.dtype) -> int:
    if cfg.num_blocks is not None:
        return cfg.num_blocks
    if cfg.memory_gb <= 0:
        raise ValueError(f"kv.memory_gb must be > 0, got {cfg.memory_gb}")
    return max(1, int(cfg.memory_gb * 2**30) // model.kv_spec.bytes_per_block(cfg.block_size, dtype))


class ModelRunner:
    def __init__(self, model: CausalLM, kv_config: KVConfig):
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = kv_config.block_size
        self.cache = KVCache(model.kv_spec, num_kv_blocks(model, kv_config, self.dtype), self.block_size,
                             self.dtype, self.device)

    @torch.inference_mode()
    def run(self, plan: SchedulerOutput, kv: KVManager) -> torch.Tensor:
        """Logits [len(plan.chunks), vocab] for the last scheduled token of each chunk."""
        chunks = [SeqChunk(c.request.token_slice(c.request.num_computed_tokens, c.num_tokens),
                           c.request.num_computed_tokens, kv.block_table(c.request)) for c in plan.chunks]
        batch = RaggedBatch.build(chunks, self.block_size, self.device)
        return self.model(batch, self.cache)
