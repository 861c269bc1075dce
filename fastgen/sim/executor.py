"""executor=simulated: the real engine, schedulers and KV managers on a virtual clock.

`SimulatedRunner` has the ModelRunner's surface (`cache.num_blocks`, `run(plan, kv)`), but instead of computing
tensors it advances a `VirtualClock` by the cost model's prediction for the step's ragged batch and returns
placeholder logits (every sampled token is id 0; the benchmark's requests ignore EOS and stop at their
max_new_tokens, so output lengths come from the workload). The driver's sleeps advance the same clock, so a
run takes as much CPU time as the scheduling itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastgen.config import EngineConfig
from fastgen.engine import LLMEngine
from fastgen.kv.manager import KVManager
from fastgen.schedulers.base import SchedulerOutput
from fastgen.sim.clocks import VirtualClock
from fastgen.sim.cost_model import DTYPE_BYTES, BatchShape, CostModel, Profile
from fastgen.sim.shapes import ModelShape, model_shape


@dataclass
class KVPool:
    """The KV cache as the engine sees it under simulation: its size, no tensors."""

    num_blocks: int
    block_size: int


def kv_pool_blocks(shape: ModelShape, cfg: EngineConfig) -> int:
    """kv.num_blocks if set; else what a deployment gets: device memory x utilization - its share of the weights -
    the activations of a full step, in blocks of this model's KV (per device, KV heads split by tensor parallel)."""
    if cfg.kv.num_blocks is not None:
        return cfg.kv.num_blocks
    hw, b = cfg.hardware, DTYPE_BYTES[cfg.hardware.dtype]
    tp = hw.tensor_parallel
    weights = shape.num_params * b / tp
    tokens = cfg.scheduler.token_budget
    activations = tokens * (2 * shape.hidden + (shape.q_size + 2 * shape.kv_size + 3 * shape.intermediate) / tp) * b \
        + cfg.scheduler.max_seqs * shape.vocab_size * 4
    free = hw.memory_gb * 2**30 * cfg.executor.memory_utilization - weights - activations
    per_block = cfg.kv.block_size * shape.kv_bytes_per_token(b, tp)
    if free < per_block:
        raise ValueError(f"no room for KV: {cfg.model.source} needs {weights / 2**30:.1f} GiB of weights per device "
                         f"and {activations / 2**30:.1f} GiB of activations, of {hw.memory_gb} GiB x "
                         f"{cfg.executor.memory_utilization}; raise hardware.tensor_parallel or hardware.memory_gb")
    return int(free // per_block)


class SimulatedRunner:
    def __init__(self, cost: CostModel, clock: VirtualClock, pool: KVPool):
        self.cost, self.clock, self.cache = cost, clock, pool
        self._logits = torch.zeros(0, 1)

    def run(self, plan: SchedulerOutput, kv: KVManager) -> torch.Tensor:
        """Advances the clock by the step's predicted time; placeholder logits [len(plan.chunks), 1]."""
        n = len(plan.chunks)
        q = np.fromiter((c.num_tokens for c in plan.chunks), dtype=np.float64, count=n)
        ctx = np.fromiter((c.request.num_computed_tokens for c in plan.chunks), dtype=np.float64, count=n) + q
        self.clock.sleep(self.cost.step_time(BatchShape(q, ctx)))
        if self._logits.shape[0] < n:
            self._logits = torch.zeros(n, 1)
        return self._logits[:n]


def build_simulated_engine(cfg: EngineConfig, model=None, tokenizer=None) -> LLMEngine:
    """`model` (optional) only gives the shape: a fastgen or transformers model, or a transformers config."""
    shape = model_shape(model if model is not None else cfg.model.source)
    profile = Profile.load(cfg.hardware.profile) if cfg.hardware.profile else Profile()
    clock = VirtualClock()
    runner = SimulatedRunner(CostModel(shape, cfg.hardware, profile), clock,
                             KVPool(kv_pool_blocks(shape, cfg), cfg.kv.block_size))
    return LLMEngine(shape, tokenizer, cfg, clock=clock, runner=runner)
