"""The executor interface: plain step data in, logits and timings out."""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch

from fastgen.config import EngineSettings, ExecutorConfig
from fastgen.model_spec import ModelSpec
from fastgen.ragged import BlockCopy, BlockSwap, SeqChunk
from fastgen.registry import Registry


@dataclass
class StepResult:
    # float32 [sum of chunks' num_logits, vocab]: each chunk's last token, or all its tokens if chunk.all_logits, in
    # chunk order ([rows, 1] placeholders if simulated)
    logits: torch.Tensor
    prepare_s: float         # building the step's tensors and the kernel backend's per-step state
    forward_s: float         # the model's forward pass


class Executor(ABC):
    """Owns (or stands in for) the model and its KV pool. What the engine needs to know of it: the model's facts
    (`spec`), its tokenizer (None for a simulated model without one), how many KV blocks of `block_size` it holds,
    and the clock steps are timed on."""

    name: ClassVar[str]
    Config: ClassVar[type[ExecutorConfig]] = ExecutorConfig
    loads_weights: ClassVar[bool] = False    # True: takes a loaded model, which a benchmark may share between runs
    real_logits: ClassVar[bool] = True       # False: placeholder logits (simulated): no grammar masks to apply
    spec: ModelSpec
    tokenizer: Any
    num_kv_blocks: int
    num_host_kv_blocks: int = 0          # its host pool for swapped-out KV (kv.swap_space_gb); 0: it cannot swap
    block_size: int
    clock: Callable[[], float] = time.perf_counter

    @abstractmethod
    def execute(self, chunks: Sequence[SeqChunk], copies: Sequence[BlockCopy] = (),
                swap_out: Sequence[BlockSwap] = (), swap_in: Sequence[BlockSwap] = ()) -> StepResult:
        """Runs one ragged step: first the swap-outs (device blocks' KV into host blocks), the block copies (each
        block's KV in every layer into another block) and the swap-ins (host blocks back into device blocks), then
        each chunk's tokens, their KV written into its blocks. Only an executor with num_host_kv_blocks > 0 is
        given swaps."""

    def kv_block_bytes(self) -> int:
        """The bytes of one KV block's contents over every device of this executor (what moving it costs)."""
        raise self._cannot_move()

    def read_kv(self, blocks: Sequence[int]) -> torch.Tensor | None:
        """A copy of these blocks' keys and values in every layer, to move to another engine (None: a simulated
        executor, which holds no contents)."""
        raise self._cannot_move()

    def write_kv(self, blocks: Sequence[int], contents: torch.Tensor | None) -> None:
        """Writes contents read from another engine's blocks (read_kv) into these blocks, in order."""
        raise self._cannot_move()

    def _cannot_move(self) -> NotImplementedError:
        return NotImplementedError(f"executor {self.name!r} cannot move KV between engines (disaggregated "
                                   "prefill/decode runs on executor=real or executor=simulated)")

    def close(self) -> None:
        """Releases what the executor holds beyond memory (worker processes, devices)."""


EXECUTORS: Registry[Executor] = Registry("executor", "fastgen.executors", ExecutorConfig)
register_executor = EXECUTORS.register


def make_executor(cfg: EngineSettings, model=None, tokenizer=None) -> Executor:
    """The executor cfg.executor names, for cfg's model (or `model`, anything load_model accepts)."""
    return EXECUTORS.resolve(cfg.executor)(cfg, model, tokenizer)
