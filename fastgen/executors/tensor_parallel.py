"""The tensor-parallel executor: one model split over `hardware.tensor_parallel` ranks with torch.distributed
(Megatron-LM's split, as in vLLM, DeepSpeed-FastGen and nano-vllm).

Rank 0 is this process, where the engine runs the scheduler, the loop and the sampler; ranks 1..N-1 are worker
processes (fastgen.executors.workers). Each rank holds only its shard of the weights (its attention heads and KV
heads, its share of the MLP features and of the vocabulary; norms replicated) and of the KV pool
(kv.num_blocks blocks of its KV heads, or as many as kv.memory_gb of its memory holds), and runs the same ragged
forward pass on it through a RealExecutor: column-parallel QKV and gate/up projections, row-parallel output and
down projections each followed by one all-reduce, a vocabulary-parallel embedding (one all-reduce) and LM head
(gathered on rank 0). Each step's plain step data is pickled and broadcast to every rank; rank 0 gets the logits.

Weights are sharded while loading: from a safetensors directory every rank reads only its slices; an in-memory
transformers model or the embedded GGUF model (which transformers de-quantises whole, in rank 0) is broadcast
one tensor at a time, each rank keeping its slice. Families that cannot be split refuse with the list of those
that can; head counts and MLP widths must divide by the ranks (KV heads fewer than the ranks are replicated).

On CPU each rank runs `executor.threads_per_rank` torch threads (default: hardware.threads, or the cores, divided
by the ranks), over gloo; on CUDA rank r runs on cuda:r over NCCL.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from fastgen.config import EngineSettings, ExecutorConfig
from fastgen.distributed import TensorParallel
from fastgen.executors.base import Executor, StepResult, register_executor
from fastgen.executors.real import RealExecutor
from fastgen.executors.workers import START_METHODS, GroupOptions, RankState, WorkerGroup
from fastgen.models import CausalLM, build_model, resolve_dtype
from fastgen.models.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from fastgen.models.loader import check_tensor_parallel, load_config, open_weights
from fastgen.models.weights import BroadcastWeights, SafetensorsWeights
from fastgen.ragged import BlockCopy, BlockSwap, SeqChunk

DIST_BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class TensorParallelConfig(ExecutorConfig):
    name: str = "tp"
    backend: str = "auto"                      # torch.distributed backend: auto (CPU: gloo, CUDA: nccl) | gloo | nccl
    threads_per_rank: Optional[int] = None     # CPU: torch threads of each rank; None: (hardware.threads or the
    #                                            cores) // ranks, at least 1
    timeout_s: float = 300.0                   # a collective waiting this long for a rank fails the engine
    start_method: str = "forkserver"           # forkserver (one import, then a fork per rank) | spawn

    def validate(self) -> None:
        if self.backend not in DIST_BACKENDS:
            raise ValueError(f"executor.backend must be one of {', '.join(DIST_BACKENDS)}, got {self.backend!r}")
        if self.start_method not in START_METHODS:
            raise ValueError(f"executor.start_method must be one of {', '.join(START_METHODS)}, "
                             f"got {self.start_method!r}")
        if self.threads_per_rank is not None and self.threads_per_rank < 1:
            raise ValueError(f"executor.threads_per_rank must be >= 1 or null, got {self.threads_per_rank}")
        if not self.timeout_s > 0:
            raise ValueError(f"executor.timeout_s must be > 0, got {self.timeout_s}")


def group_options(cfg: EngineSettings) -> GroupOptions:
    """The worker group cfg asks for: ranks, device kind, backend, threads per rank, timeouts."""
    hw, ex = cfg.hardware, cfg.executor
    size, device = hw.tensor_parallel, torch.device(hw.device).type
    if device not in ("cpu", "cuda"):
        raise ValueError(f"executor=tp runs on cpu or cuda, not hardware.device={hw.device!r}")
    backend = ex.backend if ex.backend != "auto" else "nccl" if device == "cuda" else "gloo"
    if backend == "nccl" and device != "cuda":
        raise ValueError("executor.backend=nccl needs hardware.device=cuda; on CPU use gloo (or auto)")
    threads = None
    if device == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = ex.threads_per_rank or max(1, (hw.threads or cores) // size)
        if threads * size > cores:
            warnings.warn(f"{size} ranks x {threads} threads exceed this machine's {cores} cores: the ranks will "
                          "wait for each other's time slices (set executor.threads_per_rank)", stacklevel=2)
    return GroupOptions(size, device, backend, threads, ex.timeout_s, ex.start_method)


@dataclass(frozen=True)
class ShardLoad:
    """What every rank needs to build its shard: the config (KV pool, dtype, kernels), the model's transformers
    config, and where the weights are (a safetensors directory each rank reads itself, or None: broadcast)."""

    cfg: EngineSettings
    hf_config: Any
    directory: Optional[str]
    name: str


def load_shard(state: RankState, load: ShardLoad) -> None:
    """On each rank: build this rank's shard of the model, reading only its slices, and its KV pool."""
    options = state.options
    weights = SafetensorsWeights(load.directory) if load.directory else BroadcastWeights(state.weights, state.group)
    state.weights = None
    device = options.rank_device(state.rank)
    model = build_model(load.hf_config, weights, resolve_dtype(load.cfg.hardware.dtype, device), device, load.name,
                        TensorParallel(state.rank, options.size))
    hardware = dataclasses.replace(load.cfg.hardware, device=device, threads=options.threads)
    state.runner = RealExecutor(dataclasses.replace(load.cfg, hardware=hardware), model)


def run_step(state: RankState, chunks: Sequence[SeqChunk], copies: Sequence[BlockCopy],
             swap_out: Sequence[BlockSwap] = (), swap_in: Sequence[BlockSwap] = ()) -> StepResult:
    return state.runner.execute(chunks, copies, swap_out, swap_in)


def rank_memory(state: RankState) -> dict[str, int]:
    """Elements this rank holds: the split linear layers' weights, its rows of the vocabulary (embedding and an
    untied LM head), what every rank holds whole (norms, biases after an all-reduce, small projections), and
    its KV pool."""
    counts = {"linear": 0, "vocab": 0, "replicated": 0}
    for module in state.runner.model.modules():
        for name, param in module.named_parameters(recurse=False):
            kind = ("linear" if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and name == "weight"
                    else "vocab" if isinstance(module, VocabParallelEmbedding) else "replicated")
            counts[kind] += param.numel()
    cache = state.runner.cache
    return {**counts, "kv": cache.k.numel() + cache.v.numel()}


@register_executor("tp", config=TensorParallelConfig)
class TensorParallelExecutor(Executor):
    def __init__(self, cfg: EngineSettings, model=None, tokenizer=None):
        """`model`: a short name, a directory or a transformers model (default cfg.model.source)."""
        source = cfg.model.source if model is None else model
        if isinstance(source, CausalLM):
            raise TypeError("executor=tp loads each rank's shard itself: pass a model name, a directory or a "
                            "transformers model, not a fastgen model")
        size = cfg.hardware.tensor_parallel
        hf_config = source.config if hasattr(source, "state_dict") else load_config(source, load_tokenizer=False)[0]
        check_tensor_parallel(hf_config, size)             # refuse before starting processes or reading weights
        options = group_options(cfg)
        hf_config, weights, tokenizer, name = open_weights(source, tokenizer)
        self._threads = torch.get_num_threads()     # rank 0 runs options.threads while the group lives
        self.workers = WorkerGroup(options)
        self.workers.state.weights = weights
        directory = str(weights.directory) if isinstance(weights, SafetensorsWeights) else None
        del weights
        try:
            self.workers.run(load_shard, ShardLoad(cfg, hf_config, directory, name))
        except BaseException:
            self.close()
            raise
        runner: RealExecutor = self.workers.state.runner
        self.spec, self.tokenizer = runner.spec, tokenizer
        self.block_size, self.num_kv_blocks = runner.block_size, runner.num_kv_blocks
        self.num_host_kv_blocks = runner.num_host_kv_blocks

    @property
    def size(self) -> int:
        return self.workers.size

    def execute(self, chunks: Sequence[SeqChunk], copies: Sequence[BlockCopy] = (),
                swap_out: Sequence[BlockSwap] = (), swap_in: Sequence[BlockSwap] = ()) -> StepResult:
        """Broadcasts the step data, runs rank 0's shard (its collectives pace the others; every rank copies the
        blocks of its own KV heads) and returns the logits rank 0 gathered; prepare_s includes the broadcast."""
        start = self.clock()
        result = self.workers.run(run_step, chunks, list(copies), list(swap_out), list(swap_in))
        return StepResult(result.logits, self.clock() - start - result.forward_s, result.forward_s)

    def run_on_ranks(self, fn, *args) -> list:
        """fn(state, *args) on every rank (a module-level function of a fastgen.executors.workers.RankState);
        every rank's result, in rank order."""
        return self.workers.run(fn, *args, gather=True)

    def close(self) -> None:
        workers, self.workers = getattr(self, "workers", None), None
        if workers is None:
            return
        workers.close()
        torch.set_num_threads(self._threads)
