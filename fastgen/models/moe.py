"""Mixture-of-experts MLP over the ragged token batch (Mixtral, Qwen2-MoE).

A router picks each token's top-k experts; the step's (token, expert) pairs are then sorted by expert, so every
expert runs one GEMM over all of its tokens of the step (prompt chunks and decodes alike) and experts that no token
chose cost nothing. Both GEMMs run through the kernel backend's `grouped_gemm` (a loop over experts in PyTorch,
one launch for all experts in Triton), which also fuses the dispatch gather and the routing weights; the results
are summed back per token in ascending expert order, the order transformers adds them in.

The expert weights are stacked tensors, `gate_up_proj` [experts, 2 x intermediate, hidden] and `down_proj`
[experts, hidden, intermediate] (transformers' own layout), so tensor parallelism can split every expert's
intermediate features (rows of gate_up, columns of down) and expert parallelism can split the expert dimension.
"""
from __future__ import annotations

import torch
from torch import nn

from fastgen.models.layers import GatedMLP, KernelUser, act_and_mul_kernel


class Experts(KernelUser):
    """`num_experts` gated MLPs as stacked weights, run over the tokens routed to each."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, activation: str = "silu"):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.act_and_mul = act_and_mul_kernel(activation)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [T, hidden]; weights, experts [T, k]: each token's routing weights and chosen experts."""
        num_tokens, top_k = experts.shape
        experts, order_in_token = experts.sort(dim=-1)       # a token's experts ascending: transformers' sum order
        weights = weights.gather(-1, order_in_token)
        # slot t * k + j is token t's j-th expert; sorted, the slots are grouped by expert, tokens ascending within
        by_expert, slots = experts.flatten().sort(stable=True)
        # where each expert's rows start (no host sync: the GPU path never reads the routing on the host)
        offsets = torch.searchsorted(by_expert, torch.arange(self.num_experts + 1, device=x.device), out_int32=True)
        h = self.ops.grouped_gemm(x, self.gate_up_proj, offsets, rows=slots // top_k)
        h = getattr(self.ops, self.act_and_mul)(h)
        y = self.ops.grouped_gemm(h, self.down_proj, offsets, row_scale=weights.flatten().index_select(0, slots))
        per_slot = torch.empty_like(y).index_copy_(0, slots, y).view(num_tokens, top_k, -1)
        out = per_slot[:, 0]
        for j in range(1, top_k):
            out = out + per_slot[:, j]
        return out


class SparseMoE(nn.Module):
    """Router + experts, and optionally an always-on shared expert scaled by a sigmoid gate (Qwen2-MoE).

    The router's softmax runs in fp32 over all experts; the top-k probabilities are renormalised to sum to one
    when `renormalize` (Mixtral always; Qwen2-MoE when its config's norm_topk_prob says so). `round_weights`
    rounds them to the model's dtype before use, as Qwen2-MoE does (Mixtral keeps them in fp32).
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int, *, renormalize: bool,
                 round_weights: bool = False, shared_intermediate: int = 0, activation: str = "silu"):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be between 1 and the number of experts "
                             f"({num_experts})")
        self.top_k, self.renormalize, self.round_weights = top_k, renormalize, round_weights
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = Experts(num_experts, hidden, intermediate, activation)
        self.shared_expert = GatedMLP(hidden, shared_intermediate, activation=activation) \
            if shared_intermediate else None
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if shared_intermediate else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's (weights, experts), both [T, top_k]."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights.to(x.dtype) if self.round_weights else weights), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, *self.route(x))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
