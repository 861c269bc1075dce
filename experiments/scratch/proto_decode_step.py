"""Whole decode step with candidate speed-ups applied in this process only (fastgen's code is untouched):

- onednn: every linear layer and the LM head through oneDNN with weights reordered once (torch.ops.mkldnn,
  what inductor's weight prepacking and vLLM's CPU backend use) instead of MKL sgemm on the plain weight;
- rmsnorm: F.rms_norm (bit-identical here) for the norm after the residual add;

Prints, per batch size at context 340, the model forward time of the current code and of each variant, and the
largest logit difference / whether argmax tokens agree.

    python experiments/scratch/proto_decode_step.py [--threads 1 --timer cpu]
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())
import torch
import torch.nn.functional as F

from fastgen.kernels import reference
from fastgen.kv.cache import KVCache
from fastgen.models import load_model
from fastgen.models.layers import LMHead

sys.path.insert(0, os.path.join(os.getcwd(), "experiments"))
from profile_decode import decode_arguments, make_batch  # noqa: E402


class OneDNNLinear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = linear.bias

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class OneDNNHead(torch.nn.Module):
    def __init__(self, head: LMHead):
        super().__init__()
        w = head.tied_to.weight if head.tied_to is not None else head.weight
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)

    def forward(self, h):
        return torch.ops.mkldnn._linear_pointwise(h, self.packed, None, "none", [], "").float()


def use_onednn(model):
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, child_name, OneDNNLinear(child))
    model.lm_head = OneDNNHead(model.lm_head)


def fused_rms_norm(x, weight, eps, residual=None):
    if residual is not None:
        x = x + residual
    return F.rms_norm(x, (x.shape[-1],), weight, eps), x


def main():
    args = decode_arguments(__doc__.splitlines()[0]).parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.timer == "cpu" else time.perf_counter
    base, _ = load_model("smollm2-135m", dtype="float32")
    fast, _ = load_model("smollm2-135m", dtype="float32")
    use_onednn(fast)
    block_size = 64
    num_blocks = max(args.batches) * (-(-(args.context + 1) // block_size)) + 8
    cache = KVCache(base.spec, num_blocks, block_size, torch.float32)
    cache.k.normal_(); cache.v.normal_()
    plain_norm = reference.rms_norm
    variants = {"current": (base, plain_norm), "rmsnorm": (base, fused_rms_norm), "onednn": (fast, plain_norm),
                "onednn+rmsnorm": (fast, fused_rms_norm)}
    print(f"load {open('/proc/loadavg').read().strip()}, threads {torch.get_num_threads()}, timer {args.timer}")
    for b in args.batches:
        times = {k: [] for k in variants}
        logits = {}
        with torch.inference_mode():
            for r in range(args.repeats + 1):
                for name, (model, norm) in variants.items():
                    reference.rms_norm = norm
                    batch = make_batch(b, args.context, block_size, num_blocks, seed=r)
                    s = clock(); out = model(batch, cache); dt = clock() - s
                    if r:
                        times[name].append(dt)
                    logits[name] = out
        reference.rms_norm = plain_norm
        cur = statistics.median(times["current"])
        line = f"b={b:3d}: " + " | ".join(
            f"{k} {statistics.median(v) * 1e3:6.1f} ms ({cur / statistics.median(v):.2f}x, "
            f"max|dlogit| {(logits[k] - logits['current']).abs().max().item():.1e}, argmax "
            f"{'same' if torch.equal(logits[k].argmax(-1), logits['current'].argmax(-1)) else 'DIFF'})"
            for k, v in times.items())
        print(line, flush=True)
    print(f"load {open('/proc/loadavg').read().strip()}")


if __name__ == "__main__":
    main()
