"""The non-persistent deployment, like DeepSpeed-MII's `pipeline`: load once, then call with a list of prompts.

    pipe = fastgen.pipeline("smollm2-135m", scheduler="splitfuse")
    outputs = pipe(["Hello, my name is", "DeepSpeed is"], max_new_tokens=64)

It is built from the same Hydra config tree as run.py (conf/), so `overrides` are Hydra override strings.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

from fastgen.conf import compose_config
from fastgen.deployment import build_deployment
from fastgen.disaggregated import DisaggregatedEngine
from fastgen.engine import LLMEngine
from fastgen.request_trace import DEFAULT_TENANT, SLO
from fastgen.sampling import SamplingParams, TokenLogprob


@dataclass
class Output:
    text: str | None
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None          # with logprobs=k: per output token
    prompt_logprobs: list[TokenLogprob] | None = None   # with prompt_logprobs=k: per prompt token after the first
    error: str | None = None                            # finish_reason "error": why


class Pipeline:
    def __init__(self, engine: LLMEngine | DisaggregatedEngine):
        self.engine = engine

    def __call__(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 64,
                 *, priority: int | Sequence[int] = 0, tenant: str | Sequence[str] = DEFAULT_TENANT,
                 slo: SLO | None | Sequence[SLO | None] = None, **sampling) -> list[Output]:
        """`priority` (lower is more urgent), `tenant` and `slo`: one for all prompts or one per prompt (the
        request classes that class-aware schedulers act on)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        news = _per_prompt("max_new_tokens", max_new_tokens, len(prompts))
        classes = list(zip(_per_prompt("priority", priority, len(prompts)),
                           _per_prompt("tenant", tenant, len(prompts)), _per_prompt("slo", slo, len(prompts))))
        known = {f.name for f in fields(SamplingParams)}
        unknown = set(sampling) - known
        if unknown:
            raise TypeError(f"unknown sampling parameter(s) {sorted(unknown)}; known: {sorted(known)}")
        if sampling.get("n", 1) != 1 or sampling.get("best_of") not in (None, 1):
            raise ValueError("the pipeline returns one output per prompt: for n > 1 or best_of use the engine "
                             "(LLMEngine.add_request; each output carries its choice index)")
        ids = [self.engine.add_request(p, SamplingParams(max_new_tokens=n, **sampling), priority=pr, tenant=t, slo=o)
               for p, n, (pr, t, o) in zip(prompts, news, classes)]
        finished = {}
        while self.engine.has_unfinished():
            finished.update((out.request_id, out) for out in self.engine.step() if out.finished)
        return [self._output(finished[i]) for i in ids]

    def close(self) -> None:
        """Releases what the engine holds beyond memory (a tensor-parallel executor's worker processes)."""
        self.engine.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _output(self, out) -> Output:
        req = out.request
        text = req.output_text if req.detokenizer is not None else None
        return Output(text, list(req.output_token_ids), req.finish_reason, len(req.prompt_token_ids),
                      req.logprobs if req.sampling.logprobs is not None else None,
                      req.prompt_logprobs if req.sampling.prompt_logprobs is not None else None, out.error)


def _per_prompt(name: str, value, n: int) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} prompts")
    return values


def pipeline(model="smollm2-135m", scheduler: str = "splitfuse", kv: str = "blocked", hardware: str = "cpu",
             overrides: Sequence[str] = (), tokenizer=None) -> Pipeline:
    """`model` is a short name, a local directory or an in-memory transformers (or fastgen) model;
    `overrides=["deployment=disaggregated"]` runs prompts and decodes on separate engines (fastgen.deployment)."""
    groups = [f"scheduler={scheduler}", f"kv={kv}", f"hardware={hardware}"]
    if isinstance(model, (str, Path)):
        groups.append(f"model.source={model}")
        model = None
    cfg = compose_config(groups + list(overrides))
    return Pipeline(build_deployment(cfg, cfg.deployment, cfg.router, model, tokenizer))
