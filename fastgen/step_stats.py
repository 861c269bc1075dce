"""What the engine reports: a typed record per step (for benchmarks, metrics, loggers and the server's gauges)
and a small read-only snapshot of its state."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepStats:
    index: int                   # steps the engine ran before this one
    start: float                 # engine clock when the step began (scheduling included)
    duration_s: float            # start to sampled tokens: schedule + prepare + forward + sample + bookkeeping
    schedule_s: float            # the scheduler's decision and the step's plain data
    prepare_s: float             # the executor building tensors and the kernels' per-step state
    forward_s: float             # the model's forward pass
    sample_s: float              # sampling, detokenization, stop checks and request bookkeeping
    num_tokens: int
    num_seqs: int
    num_prefill_tokens: int      # tokens of chunks with more than one token
    num_preempted: int
    num_running: int             # after the step
    num_waiting: int
    kv_used_tokens: int          # KV slots holding computed or scheduled tokens
    kv_reserved_tokens: int      # slots in blocks that requests own
    kv_capacity_tokens: int
    kv_cached_blocks: int = 0    # blocks nobody references, kept as a prefix cache until evicted (after the step)
    num_block_copies: int = 0    # copy-on-write block copies made before the forward
    num_swapped_blocks: int = 0  # KV blocks moved to or from the host pool (swap preemption) before the forward
    # prefix caching, over the requests admitted in this step (fastgen.kv.manager.PrefixCacheCounters)
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    prefix_query_blocks: int = 0
    prefix_hit_blocks: int = 0
    kv_evictions: int = 0
    num_pad_tokens: int = 0      # pad tokens computed beside num_tokens (vLLM 0.2's padded prefill)
    grammar_mask_s: float = 0.0  # of sample_s: filling and applying structured outputs' token masks
    num_constrained_seqs: int = 0   # sequences sampled under a grammar this step
    # speculative decoding: sequences whose proposals this step verified, their proposals (part of num_tokens), the
    # proposals the target accepted, and the proposer's time (part of schedule_s)
    num_verifies: int = 0
    num_proposed_tokens: int = 0
    num_accepted_tokens: int = 0
    draft_s: float = 0.0
    pool: str | None = None      # the engine's pool in a disaggregated deployment: prefill | decode


@dataclass(frozen=True)
class EngineSnapshot:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    num_steps: int
