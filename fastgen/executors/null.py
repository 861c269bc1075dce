"""The null executor: no model, no KV tensors. Each step returns fixed logits of the right shape at no cost, so a
benchmark times the engine's own CPU work per step (schedule, plan, commit, sample, detokenize, stop strings,
stats): the host time that separates a fast serving engine from a slow one on a GPU
(experiments/host_time.py).

The model's facts (its vocabulary, context, EOS ids) come from its config, without weights; its tokenizer is loaded,
so requests detokenize and match stop strings as they would on the real executor. The KV pool is as large as the
real executor's would be (kv.num_blocks, or what kv.memory_gb holds at hardware.dtype), but nothing is allocated.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fastgen.config import EngineSettings, ExecutorConfig
from fastgen.executors.base import Executor, StepResult, register_executor
from fastgen.models import load_config, resolve_dtype
from fastgen.ragged import BlockCopy, BlockSwap, SeqChunk
from fastgen.sim.shapes import model_spec


@dataclass
class NullExecutorConfig(ExecutorConfig):
    name: str = "null"
    vocab_size: Optional[int] = None     # width of the logits; None: the model's vocabulary (the real shape)

    def validate(self) -> None:
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"executor.vocab_size must be >= 1 or null (the model's), got {self.vocab_size}")


@register_executor("null", config=NullExecutorConfig)
class NullExecutor(Executor):
    def __init__(self, cfg: EngineSettings, model=None, tokenizer=None):
        """`model` (optional) only gives the shape: a fastgen or transformers model, or a transformers config."""
        source = cfg.model.source if model is None else model
        if isinstance(source, (str, os.PathLike)):       # a name or a directory: its config and tokenizer
            source, tokenizer = load_config(source, tokenizer)
        self.spec, self.tokenizer = model_spec(source), tokenizer
        vocab = cfg.executor.vocab_size or self.spec.vocab_size
        if vocab > self.spec.vocab_size:
            raise ValueError(f"executor.vocab_size={vocab} exceeds the model's vocabulary ({self.spec.vocab_size})")
        self.block_size = cfg.kv.block_size
        itemsize = resolve_dtype(cfg.hardware.dtype).itemsize
        self.num_kv_blocks = cfg.kv.num_blocks or max(1, self.spec.kv_blocks_in(
            cfg.kv.memory_gb * 2**30, self.block_size, itemsize))
        self.vocab = vocab
        self._logits = torch.zeros(0, vocab)

    def _fixed_logits(self, rows: int) -> torch.Tensor:
        """[rows, vocab], made once per size: row r peaks at an ordinary token (not the first ids, where tokenizers
        keep their special tokens), varying with r so that detokenized text is not one repeated piece."""
        if self._logits.shape[0] < rows:
            n = max(rows, 2 * self._logits.shape[0])
            logits = torch.zeros(n, self.vocab)
            logits[torch.arange(n), self.vocab // 2 + torch.arange(n) % (self.vocab // 4)] = 1.0
            self._logits = logits
        return self._logits[:rows]

    def execute(self, chunks: Sequence[SeqChunk], copies: Sequence[BlockCopy] = (),
                swap_out: Sequence[BlockSwap] = (), swap_in: Sequence[BlockSwap] = ()) -> StepResult:
        return StepResult(self._fixed_logits(sum(c.num_logits for c in chunks)), 0.0, 0.0)
