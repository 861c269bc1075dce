"""Draft-model proposals (Leviathan et al. 2023; vLLM's and SGLang's `draft`): a smaller model of any family fastgen
loads proposes k tokens greedily, one ragged pass per token over every sequence granted speculation, in its own KV
pool. Its KV is kept in step with the target's tokens: each call first finds how much of what it computed is still
the sequence's (the longest common prefix of the tokens it fed and the sequence's tokens now), gives back the
blocks past it (rejected proposals), and feeds the rest (the target's accepted and corrected tokens) as one chunk,
whose last logits give the first proposal. Greedy proposals are a one-hot draft distribution, which the engine's
verify assumes. Draft and target must share a tokenizer (the same vocabulary ids)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fastgen.kernels import load_backend
from fastgen.kernels.linear import resolve_linear
from fastgen.kv.allocator import BlockAllocator
from fastgen.kv.cache import KVCache
from fastgen.models import CausalLM, load_model
from fastgen.ragged import RaggedBatch, SeqChunk
from fastgen.request import Request
from fastgen.speculative.base import Proposer, SpeculativeConfig, register_proposer


@dataclass
class DraftConfig(SpeculativeConfig):
    name: str = "draft"
    model: Optional[str] = None          # the draft model: a short name or a local Hugging Face directory
    dtype: str = "float32"
    device: str = "cpu"
    kernels: str = "auto"
    num_blocks: int = 512                # the draft's own KV pool
    block_size: int = 16

    def validate(self) -> None:
        super().validate()
        if not self.model:
            raise ValueError("speculative=draft needs speculative.model: a short name or a local Hugging Face "
                             "directory of a smaller model with the target's tokenizer")
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError(f"speculative.num_blocks and block_size must be >= 1, got {self.num_blocks}, "
                             f"{self.block_size}")


@register_proposer("draft", config=DraftConfig)
class DraftProposer(Proposer):
    def __init__(self, config: DraftConfig, model: CausalLM | None = None):
        """`model`: a fastgen model already loaded (tests), instead of loading config.model."""
        super().__init__(config)
        if model is None:
            model, _ = load_model(config.model, dtype=config.dtype, device=config.device)
        param = next(model.parameters())
        self.device, self.block_size = param.device, config.block_size
        self.backend = load_backend(config.kernels, self.device)
        self.model = model.use_kernels(self.backend).use_linear(resolve_linear("auto", self.device, param.dtype))
        self.cache = KVCache(model.spec, config.num_blocks, config.block_size, param.dtype, self.device)
        self.allocator = BlockAllocator(config.num_blocks)
        self.windows = set(model.spec.windows)
        self.fed: dict[int, list[int]] = {}       # by seq_id: the tokens whose KV the draft holds
        self.tables: dict[int, list[int]] = {}

    def propose(self, requests: Sequence[Request], ks: Sequence[int]) -> list[list[int]]:
        seqs = [r.seq_id for r in requests]
        pending = [self._catch_up(r) for r in requests]
        if not self._room(seqs, pending, ks):
            return [[] for _ in requests]
        drafts: list[list[int]] = [[] for _ in requests]
        for step in range(max(ks)):
            live = [i for i, k in enumerate(ks) if step < k]
            tokens = self._forward([seqs[i] for i in live], [pending[i] for i in live])
            for i, t in zip(live, tokens):
                drafts[i].append(t)
                pending[i] = [t]          # fed next step (the last proposal never is)
        return drafts

    def _catch_up(self, req: Request) -> list[int]:
        """Rolls the draft's KV of `req` back to what is still its tokens; the tokens it must feed now."""
        tokens = req.prompt_token_ids + req.output_token_ids
        fed = self.fed.setdefault(req.seq_id, [])
        same = 0
        for a, b in zip(fed, tokens[:-1]):
            if a != b:
                break
            same += 1
        del fed[same:]
        table = self.tables.setdefault(req.seq_id, [])
        keep = -(-same // self.block_size)
        self.allocator.free(reversed(table[keep:]))
        del table[keep:]
        return tokens[same:]

    def _room(self, seqs: list[int], pending: list[list[int]], ks: Sequence[int]) -> bool:
        """Allocates the blocks this call writes; False (nothing allocated) when the pool is short."""
        need = [max(0, -(-(len(self.fed[s]) + len(p) + k - 1) // self.block_size) - len(self.tables[s]))
                for s, p, k in zip(seqs, pending, ks)]
        if sum(need) > self.allocator.num_free:
            return False
        for s, n in zip(seqs, need):
            self.tables[s].extend(self.allocator.allocate(n))
        return True

    @torch.inference_mode()
    def _forward(self, seqs: list[int], feeds: list[list[int]]) -> list[int]:
        """One ragged pass of the draft: each sequence's feed after what it holds; its greedy next token."""
        chunks = [SeqChunk(feed, len(self.fed[s]), self.tables[s]) for s, feed in zip(seqs, feeds)]
        batch = RaggedBatch.build(chunks, self.block_size, self.device)
        self.backend.prepare(batch.attn, self.block_size, self.windows)
        logits = self.model(batch, self.cache)
        for s, feed in zip(seqs, feeds):
            self.fed[s].extend(feed)
        return logits.argmax(-1).tolist()

    def release(self, request: Request) -> None:
        self.allocator.free(reversed(self.tables.pop(request.seq_id, [])))
        self.fed.pop(request.seq_id, None)
