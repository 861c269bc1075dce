"""The real executor: the model on one device (CPU or GPU), its KV pool, and the kernel backend chosen once.

It is also what each rank of the tensor-parallel executor (fastgen.executors.tensor_parallel) runs on its shard of
the model and of the KV pool."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fastgen.config import EngineSettings, ExecutorConfig
from fastgen.executors.base import Executor, StepResult, register_executor
from fastgen.kernels import load_backend
from fastgen.kernels.linear import resolve_linear
from fastgen.kv.cache import KVCache
from fastgen.models import CausalLM, load_model
from fastgen.ragged import BlockCopy, BlockSwap, RaggedBatch, SeqChunk


@dataclass
class RealExecutorConfig(ExecutorConfig):
    name: str = "real"


@register_executor("real", config=RealExecutorConfig)
class RealExecutor(Executor):
    loads_weights = True

    def __init__(self, cfg: EngineSettings, model=None, tokenizer=None):
        hw = cfg.hardware
        shards = model.parallel.size if isinstance(model, CausalLM) else 1
        if hw.tensor_parallel != shards:
            raise ValueError(f"executor=real runs the whole model in one process; hardware.tensor_parallel="
                             f"{hw.tensor_parallel} runs on executor=tp (worker processes over torch.distributed), "
                             "or is simulated with executor=simulated")
        if hw.threads:
            torch.set_num_threads(hw.threads)      # the device is this process's CPU: its thread pool is ours
        if not isinstance(model, CausalLM):
            model, tokenizer = load_model(cfg.model.source if model is None else model, dtype=hw.dtype,
                                          device=hw.device, tokenizer=tokenizer)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.backend = load_backend(hw.kernels, self.device)
        self.model = model.use_kernels(self.backend).use_linear(resolve_linear(hw.linear, self.device, self.dtype))
        self.spec, self.tokenizer = model.spec, tokenizer
        self.block_size = cfg.kv.block_size
        self.num_kv_blocks = cfg.kv.num_blocks or max(1, self.spec.kv_blocks_in(   # kv.memory_gb per device
            cfg.kv.memory_gb * 2**30, self.block_size, self.dtype.itemsize, shards))
        # one block more than the pool: the scratch block pad tokens write their KV to (SeqChunk.num_pad)
        self.pad_block = self.num_kv_blocks
        self.num_host_kv_blocks = cfg.kv.host_blocks(
            self.block_size * self.spec.kv_bytes_per_token(self.dtype.itemsize, shards))
        self.cache = KVCache(self.spec, self.num_kv_blocks + 1, self.block_size, self.dtype, self.device, shards,
                             host_blocks=self.num_host_kv_blocks)
        self.windows = set(self.spec.windows)
        self._sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

    def prepare(self, chunks: Sequence[SeqChunk]) -> RaggedBatch:
        """The flattened batch and the kernel backend's per-step state (shared by every layer)."""
        batch = RaggedBatch.build(chunks, self.block_size, self.device, self.pad_block)
        self.backend.prepare(batch.attn, self.block_size, self.windows)
        return batch

    @torch.inference_mode()
    def forward(self, batch: RaggedBatch) -> torch.Tensor:
        return self.model(batch, self.cache)

    def kv_block_bytes(self) -> int:
        return self.cache.block_bytes

    def read_kv(self, blocks: Sequence[int]) -> torch.Tensor:
        return self.cache.read_blocks(blocks)

    def write_kv(self, blocks: Sequence[int], contents: torch.Tensor | None) -> None:
        self.cache.write_blocks(blocks, contents)

    def execute(self, chunks: Sequence[SeqChunk], copies: Sequence[BlockCopy] = (),
                swap_out: Sequence[BlockSwap] = (), swap_in: Sequence[BlockSwap] = ()) -> StepResult:
        start = self.clock()
        if swap_out:
            self.cache.swap(swap_out, to_host=True)
        if copies:
            self.cache.copy_blocks(copies)
        if swap_in:
            self.cache.swap(swap_in, to_host=False)
        batch = self.prepare(chunks)
        prepared = self.clock()
        logits = self.forward(batch)
        self._sync()
        return StepResult(logits, prepared - start, self.clock() - prepared)
