"""transformers as a peer: `generate` with static batches (left padded, each batch run to its longest output) and
its continuous batching (the manager behind `generate_batch`, driven so each request keeps its own length)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from fastgen.models import EMBEDDED, resolve_dtype
from fastgen.peers.offline import Req


def load_hf(model: str, dtype: str, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kw, directory = ({"gguf_file": EMBEDDED[model].gguf_file}, EMBEDDED[model].directory()) if model in EMBEDDED \
        else ({}, model)
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation=attn, **kw).eval()
    return hf.to(resolve_dtype(dtype)), AutoTokenizer.from_pretrained(directory, **kw)


@torch.inference_mode()
def hf_generate(hf, reqs: list[Req], batch_size: int, pad_id: int) -> tuple[float, list[list[int]]]:
    """Static batching: batches of `batch_size` in order, left padded, each run to its longest output."""
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(reqs), batch_size):
        batch = reqs[i:i + batch_size]
        width = max(len(r.prompt) for r in batch)
        n = max(r.max_new_tokens for r in batch)
        ids = torch.tensor([[pad_id] * (width - len(r.prompt)) + r.prompt for r in batch])
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch])
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=pad_id, use_cache=True)
        for r, o in zip(batch, out[:, width:].tolist()):
            outputs.append(o[:r.max_new_tokens])
    return time.perf_counter() - start, outputs


@dataclass
class GenerateBatchSetting:
    name: str = "default"
    page_size: int = 64
    num_blocks: Optional[int] = None     # None: enough pages for every request of the workload at once
    max_batch_tokens: int = 512
    scheduler: str = "fifo"              # fifo | prefill_first
    attn_implementation: str = "sdpa"    # sdpa | paged|eager (the CPU-capable continuous-batching attentions)


def cb_num_blocks(reqs: list[Req], page_size: int) -> int:
    """Pages for every request at once, plus headroom: the fifo scheduler stops admitting prompts when fewer than
    its safety margin (15%) of the pages are free, so a cache sized exactly to the workload would serialize it."""
    need = sum(math.ceil((len(r.prompt) + r.max_new_tokens) / page_size) for r in reqs)
    return math.ceil(need / 0.8) + 4


def hf_generate_batch(hf, reqs: list[Req], setting: GenerateBatchSetting, warm: list[Req]) \
        -> tuple[float, list[list[int]], dict]:
    """transformers continuous batching, the manager generate_batch uses, with per-request output lengths."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    num_blocks = setting.num_blocks or cb_num_blocks(reqs, setting.page_size)
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(r.max_new_tokens for r in reqs), eos_token_id=-1,
                           pad_token_id=0)
    cb = ContinuousBatchingConfig(page_size=setting.page_size, num_blocks=num_blocks,
                                  max_batch_tokens=setting.max_batch_tokens, scheduler_type=setting.scheduler,
                                  allow_block_sharing=False, auto_switch_to_flash=False,
                                  max_requests_per_batch=max(len(reqs), 1))
    if hf.config._attn_implementation != setting.attn_implementation:   # the manager validates it
        hf.set_attn_implementation(setting.attn_implementation)

    def drain(manager, ids: list[str]) -> dict[str, Any]:
        results: dict[str, Any] = {}
        while len(results) < len(ids):
            r = manager.get_result(timeout=1)
            if r is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped before finishing")
                continue
            if r.is_finished():
                if r.error is not None:
                    raise RuntimeError(f"generate_batch request {r.request_id} failed: {r.error}")
                results[r.request_id] = r
        return results

    with hf.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb, block=True,
                                                timeout=10, warmup=False) as manager:
        drain(manager, [manager.add_request(r.prompt, request_id=f"warm{i}", max_new_tokens=r.max_new_tokens,
                                            eos_token_id=-1) for i, r in enumerate(warm)])
        start = time.perf_counter()
        ids = [manager.add_request(r.prompt, request_id=f"r{i}", max_new_tokens=r.max_new_tokens, eos_token_id=-1)
               for i, r in enumerate(reqs)]
        results = drain(manager, ids)
        wall = time.perf_counter() - start
        resolved = getattr(manager, "continuous_batching_config", None)
    info = {"page_size": setting.page_size, "num_blocks": num_blocks, "max_batch_tokens": setting.max_batch_tokens,
            "scheduler": setting.scheduler, "attn_implementation": setting.attn_implementation}
    if resolved is not None:
        info["resolved"] = {k: getattr(resolved, k, None) for k in
                            ("num_blocks", "max_batch_tokens", "max_requests_per_batch", "use_cuda_graph")}
    return wall, [list(results[i].generated_tokens) for i in ids], info
