"""The simulated executor: no weights, no tensors. Each step advances a virtual clock by the cost model's prediction
for its ragged batch (fastgen.sim), so the same engine, schedulers and KV managers run at paper scale on a CPU.

The device is described by a datasheet (peak flops, memory and its bandwidth, the link between tensor-parallel
devices) and a profile of fitted efficiencies: `hardware.sim`, which each machine's conf/hardware/<name>.yaml states
(`hardware=a100-80gb executor=simulated` simulates the datasheet in conf/hardware/a100-80gb.yaml).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fastgen.config import EngineSettings, ExecutorConfig
from fastgen.executors.base import Executor, StepResult, register_executor
from fastgen.model_spec import ModelSpec
from fastgen.ragged import BlockCopy, BlockSwap, SeqChunk
from fastgen.sim.clocks import VirtualClock
from fastgen.sim.cost_model import DTYPE_BYTES, CostModel, Profile
from fastgen.sim.shapes import model_spec
from fastgen.sim.work import BatchShape


# vLLM 0.2.7 captures CUDA graphs for decode steps of these batch sizes (its _BATCH_SIZES_TO_CAPTURE) and contexts
# up to 8192 tokens (max_context_len_to_capture); a smaller batch runs padded to the next size.
CUDA_GRAPH_BATCH_SIZES = np.array([1, 2, 4, *range(8, 257, 8)])
CUDA_GRAPH_MAX_CONTEXT = 8192
# Host seconds to fill and apply one sequence's grammar mask (xgrammar, SmolLM2's 49k vocabulary, one CPU core):
# 184-226 us per sequence of CPU time (xgrammar fill ~10, apply ~180-215), measured by
# `python experiments/structured_outputs.py --micro` (experiments/results/structured_outputs/micro.md)
GRAMMAR_MASK_S = 200e-6


@dataclass
class SimulatedExecutorConfig(ExecutorConfig):
    name: str = "simulated"
    memory_utilization: float = 0.9      # the share of device memory the deployment may use
    cuda_graphs: bool = False            # decode steps replayed from CUDA graphs, as vLLM 0.2.7 (see execute)
    grammar_mask_s: float = GRAMMAR_MASK_S   # host seconds per sequence sampled under a grammar (structured
                                             # outputs), added to the step: the mask is built before sampling
                                         # (the device's datasheet is the machine's: hardware.sim)

    def validate(self) -> None:
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"executor.memory_utilization must be in (0, 1], got {self.memory_utilization}")
        if not self.grammar_mask_s >= 0:
            raise ValueError(f"executor.grammar_mask_s must be >= 0, got {self.grammar_mask_s}")


def kv_pool_blocks(spec: ModelSpec, cfg: EngineSettings) -> int:
    """kv.num_blocks if set; else what a deployment gets: device memory x utilization - its share of the weights -
    the activations of a full step, in blocks of this model's KV (per device, KV heads split by tensor parallel)."""
    if cfg.kv.num_blocks is not None:
        return cfg.kv.num_blocks
    hw, sheet = cfg.hardware, cfg.hardware.sim
    b, tp = DTYPE_BYTES[hw.dtype], hw.tensor_parallel
    weights = spec.num_params * b / tp
    tokens = cfg.scheduler.step_tokens(min(filter(None, (spec.max_positions, cfg.model.max_model_len))))
    activations = tokens * (2 * spec.hidden + (spec.q_size + 2 * spec.kv_size + 3 * spec.intermediate) / tp) * b \
        + cfg.scheduler.max_seqs * spec.vocab_size * 4
    free = sheet.memory_gb * 2**30 * cfg.executor.memory_utilization - weights - activations
    blocks = spec.kv_blocks_in(free, cfg.kv.block_size, b, tp)
    if blocks < 1:
        raise ValueError(f"no room for KV: {cfg.model.source} needs {weights / 2**30:.1f} GiB of weights per device "
                         f"and {activations / 2**30:.1f} GiB of activations, of {sheet.memory_gb} GiB x "
                         f"{cfg.executor.memory_utilization}; raise hardware.tensor_parallel or "
                         "hardware.sim.memory_gb")
    return blocks


@register_executor("simulated", config=SimulatedExecutorConfig)
class SimulatedExecutor(Executor):
    real_logits = False
    def __init__(self, cfg: EngineSettings, model=None, tokenizer=None):
        """`model` (optional) only gives the shape: a fastgen or transformers model, or a transformers config."""
        sheet = cfg.hardware.sim
        profile = Profile.load(sheet.profile) if sheet.profile else Profile()
        sheet.validate(cfg.hardware, profile)
        self.spec = model_spec(model if model is not None else cfg.model.source)
        self.tokenizer = tokenizer
        self.cost = CostModel(self.spec, sheet, cfg.hardware.dtype, cfg.hardware.tensor_parallel, profile)
        self.clock = VirtualClock()
        self.block_size = cfg.kv.block_size
        self.num_kv_blocks = kv_pool_blocks(self.spec, cfg)
        self.num_host_kv_blocks = cfg.kv.host_blocks(self.cost.block_bytes(self.block_size))
        if self.num_host_kv_blocks and not sheet.host_link_bandwidth_gbs > 0:
            raise ValueError("kv.swap_space_gb / kv.swap_blocks with executor=simulated needs the device's host link "
                             f"bandwidth: set hardware.sim.host_link_bandwidth_gbs in conf/hardware/"
                             f"{cfg.hardware.name or '<name>'}.yaml")
        self.cuda_graphs = cfg.executor.cuda_graphs
        self.grammar_mask_s = cfg.executor.grammar_mask_s
        self._logits = torch.zeros(0, 1)

    def kv_block_bytes(self) -> int:
        tp = self.cost.tp
        return tp * self.block_size * self.spec.kv_bytes_per_token(self.cost.dtype_bytes, tp)

    def read_kv(self, blocks: Sequence[int]) -> None:
        return None

    def write_kv(self, blocks: Sequence[int], contents: torch.Tensor | None) -> None:
        """Nothing to write: the transfer's time is the connector's to charge."""

    def execute(self, chunks: Sequence[SeqChunk], copies: Sequence[BlockCopy] = (),
                swap_out: Sequence[BlockSwap] = (), swap_in: Sequence[BlockSwap] = ()) -> StepResult:
        """Advances the clock by the step's predicted time; placeholder logits [rows, 1] (no distribution: a
        request's logprobs and logit processors are meaningless here). A chunk costs its new tokens only: tokens
        before its `start` (computed earlier, or found in the prefix cache) are context. Pad tokens
        (SeqChunk.num_pad) are charged like the chunk's own tokens. With `cuda_graphs`, a decode-only step of at most
        256 sequences runs as vLLM 0.2.7 runs it: padded to the next captured batch size (the pad rows read a
        1-token context) and launched as one graph, so the host's per-layer launches are not charged. Each chunk
        sampled under a grammar adds `grammar_mask_s` of host time (its token mask, built on the host)."""
        n = len(chunks)
        q = np.fromiter((len(c.token_ids) + c.num_pad for c in chunks), dtype=np.float64, count=n)
        ctx = np.fromiter((c.start for c in chunks), dtype=np.float64, count=n) + q
        rows = sum(c.num_logits for c in chunks)
        graph = (self.cuda_graphs and n <= CUDA_GRAPH_BATCH_SIZES[-1] and (q == 1).all()
                 and ctx.max() <= CUDA_GRAPH_MAX_CONTEXT)
        if graph:
            size = int(CUDA_GRAPH_BATCH_SIZES[np.searchsorted(CUDA_GRAPH_BATCH_SIZES, n)])
            q, ctx = np.concatenate([q, np.ones(size - n)]), np.concatenate([ctx, np.ones(size - n)])
        seconds = self.cost.step_time(BatchShape(q, ctx, num_logits=rows, cuda_graph=graph)) + \
            self.cost.block_copy_seconds(len(copies), self.block_size) + \
            self.cost.swap_seconds(len(swap_out) + len(swap_in), self.block_size) + \
            self.grammar_mask_s * sum(c.constrained for c in chunks)
        self.clock.sleep(seconds)
        if self._logits.shape[0] < rows:
            self._logits = torch.zeros(rows, 1)
        return StepResult(self._logits[:rows], 0.0, seconds)
