"""vLLM 0.2.2-0.2.7's scheduler, the baseline DeepSpeed-FastGen measured against (late 2023).

A step is either all prefill or all decode. Waiting prompts go first, in arrival order (preempted requests at the
front): a prefill step takes whole prompts while (number of prompts x longest prompt) <= `token_budget` (vLLM's
max_num_batched_tokens), the padding that costs stays <= `max_paddings`, the running requests stay <=
`max_seqs` (max_num_seqs) and the KV pool holds each whole prompt with `watermark` of the pool to spare. Every
prompt of the batch is padded to the longest one and the pad tokens are computed (ScheduledChunk.num_pad; both
executors charge them). When no prompt can start, every running request decodes, oldest first; one that finds no
free block preempts the newest running request by recompute (its KV is dropped and it goes back to the front of
the queue), or itself when it is the newest.

`pad_prompts=false` is vLLM 0.2.0-0.2.1: prompts flattened without padding, the budget the sum of their lengths.
A prompt longer than the budget runs alone in its step (vLLM 0.2 refuses a budget below the model's context at
start-up; fastgen allows it so that the budget can be ablated). vLLM's KV block is 16 tokens: run it with
`kv.block_size=16`. Its CUDA graphs (0.2.7) are an executor matter: `executor.cuda_graphs=true` (simulated).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fastgen.schedulers.base import Scheduler, SchedulerOutput, TokenBudgetConfig, register_scheduler

# vLLM's default max_num_batched_tokens is max(max_model_len, this)
MIN_DEFAULT_BUDGET = 2048


@dataclass
class Vllm02Config(TokenBudgetConfig):
    name: str = "vllm-0.2"
    token_budget: Optional[int] = None   # max_num_batched_tokens (padded prompt tokens of a prefill step); None:
    #                                      vLLM's default max(max_model_len, 2048), 4096 for Llama-2
    max_seqs: int = 256                  # max_num_seqs: running requests at most
    max_paddings: int = 256              # pad tokens of a prefill step at most
    pad_prompts: bool = True             # False: vLLM 0.2.0-0.2.1 (no padding; budget = sum of prompt lengths)
    watermark: float = 0.01              # share of the KV pool a new prompt must leave free

    def step_tokens(self, max_model_len: int) -> int:
        return self.token_budget or max(max_model_len, MIN_DEFAULT_BUDGET)

    def validate(self) -> None:
        super().validate()
        if self.max_paddings < 0:
            raise ValueError(f"scheduler.max_paddings must be >= 0, got {self.max_paddings}")
        if not 0 <= self.watermark < 1:
            raise ValueError(f"scheduler.watermark must be in [0, 1), got {self.watermark}")


@register_scheduler("vllm-0.2", config=Vllm02Config)
class Vllm02Scheduler(Scheduler):
    @property
    def budget(self) -> int:
        return self.config.step_tokens(self.max_model_len or 0)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.schedule_prompts(out)
        if not out:
            self.running.sort(key=lambda r: r.arrival_time)
            self.schedule_decodes(out, budget=len(self.running), preempt=True)
            self.schedule_speculation(out)
            if not out:         # every running request was preempted: their recompute starts at once
                self.schedule_prompts(out)
        return out

    def schedule_prompts(self, out: SchedulerOutput) -> None:
        lens: list[int] = []
        for req in list(self.waiting):
            n = req.num_pending_tokens
            if len(self.running) >= self.config.max_seqs:
                break
            if lens:
                longest = max(lens[0], n)       # lens[0] is the batch's longest so far (kept first below)
                tokens = (len(lens) + 1) * longest if self.config.pad_prompts else sum(lens) + n
                if tokens > self.budget:
                    break
                if self.config.pad_prompts and tokens - sum(lens) - n > self.config.max_paddings:
                    break
            if not self.admissible(req, n) or not self.reserve(req, n, out, preempt=False):
                break
            lens.append(n)
            lens.sort(reverse=True)
        if self.config.pad_prompts and out:
            for chunk in out.chunks:
                chunk.num_pad = lens[0] - chunk.num_tokens

    def admissible(self, req, n: int) -> bool:
        """Can the pool hold the whole prompt and still keep `watermark` of its blocks free? (With nothing running
        the pool is all free and the watermark protects nothing.)"""
        spare = int(self.config.watermark * self.kv.num_blocks) if self.running else 0
        return self.kv.can_allocate(req, n + spare * self.kv.block_size)
