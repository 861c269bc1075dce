"""ModelRunner: owns the tensors. It sizes and holds the KV cache, turns a scheduler's plan into a RaggedBatch,
and runs the model. Nothing else in the engine touches a tensor except the sampler."""
from __future__ import annotations

import torch

from fastgen import kernels
from fastgen.config import KVConfig
from fastgen.kv.cache import KVCache
from fastgen.kv.manager import KVManager
from fastgen.models.base import CausalLM
from fastgen.models.layers import Attention
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
        self.windows = {m.window for m in model.modules() if isinstance(m, Attention)}
        self.cache = KVCache(model.kv_spec, num_kv_blocks(model, kv_config, self.dtype), self.block_size,
                             self.dtype, self.device)

    def run(self, plan: SchedulerOutput, kv: KVManager) -> torch.Tensor:
        """Logits [len(plan.chunks), vocab] for the last scheduled token of each chunk."""
        return self.forward(self.prepare(plan, kv))

    def prepare(self, plan: SchedulerOutput, kv: KVManager) -> RaggedBatch:
        """Everything a step needs before the model runs: the flattened batch and, on the PyTorch kernel path,
        the attention plans its layers share. Kept apart from forward() so the engine's bookkeeping can be
        measured apart from the model."""
        chunks = [SeqChunk(c.request.token_slice(c.request.num_computed_tokens, c.num_tokens),
                           c.request.num_computed_tokens, kv.block_table(c.request)) for c in plan.chunks]
        batch = RaggedBatch.build(chunks, self.block_size, self.device)
        if kernels.backend_for(batch.input_ids) == "torch":
            for window in self.windows:
                batch.attn.torch_plan(self.block_size, window)
        return batch

    @torch.inference_mode()
    def forward(self, batch: RaggedBatch) -> torch.Tensor:
        return self.model(batch, self.cache)
