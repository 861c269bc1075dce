"""The non-persistent deployment, like DeepSpeed-MII's `pipeline`: load once, then call with a list of prompts.

    pipe = fastgen.pipeline("smollm2-135m", scheduler="splitfuse")
    outputs = pipe(["Hello, my name is", "DeepSpeed is"], max_new_tokens=64)

It is built from the same Hydra config tree as run.py (conf/), so `overrides` are Hydra override strings.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import OmegaConf

from fastgen import kernels
from fastgen.config import EngineConfig, RunConfig, register_configs
from fastgen.engine import LLMEngine
from fastgen.models import load_model
from fastgen.sampling import SamplingParams

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose_config(overrides: Sequence[str] = (), config_name: str = "config") -> RunConfig:
    """The run.py config (or another top-level config of conf/, whose schema is registered) with Hydra overrides
    applied, as a typed object: a RunConfig for run.py's."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not CONF_DIR.is_dir():
        raise FileNotFoundError(f"fastgen's config tree {CONF_DIR} is missing; install fastgen from a checkout "
                                "with `pip install -e .`")
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name, overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def build_engine(cfg: EngineConfig, model=None, tokenizer=None, clock=None) -> LLMEngine:
    """Loads the model named by cfg (unless one is given: a fastgen model, or anything load_model accepts); with
    executor=simulated nothing is loaded, the model (if given) only lends its shape, and the clock is virtual."""
    cfg.executor.validate()
    if cfg.executor.name == "simulated":
        from fastgen.sim.executor import build_simulated_engine
        return build_simulated_engine(cfg, model, tokenizer)
    hw = cfg.hardware
    if hw.threads:
        torch.set_num_threads(hw.threads)
    kernels.set_backend(hw.kernels)
    if model is None or not hasattr(model, "kv_spec"):
        model, tokenizer = load_model(model if model is not None else cfg.model.source, dtype=hw.dtype,
                                      device=hw.device, tokenizer=tokenizer)
    return LLMEngine(model, tokenizer, cfg, **({"clock": clock} if clock else {}))


@dataclass
class Output:
    text: str | None
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


class Pipeline:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer

    def __call__(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 64,
                 **sampling) -> list[Output]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        news = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
        if len(news) != len(prompts):
            raise ValueError(f"max_new_tokens has {len(news)} entries for {len(prompts)} prompts")
        known = {f.name for f in fields(SamplingParams)}
        unknown = set(sampling) - known
        if unknown:
            raise TypeError(f"unknown sampling parameter(s) {sorted(unknown)}; known: {sorted(known)}")
        ids = [self.engine.add_request(p, SamplingParams(max_new_tokens=n, **sampling)) for p, n in zip(prompts, news)]
        while self.engine.has_unfinished():
            self.engine.step()
        return [self._output(self.engine.pop_finished(i)) for i in ids]

    def _output(self, req) -> Output:
        text = None
        if self.tokenizer is not None:
            text = req.output_text if req.sampling.stop else self.tokenizer.decode(req.output_token_ids,
                                                                                   skip_special_tokens=True)
        return Output(text, list(req.output_token_ids), req.finish_reason, len(req.prompt_token_ids))


def pipeline(model="smollm2-135m", scheduler: str = "splitfuse", kv: str = "blocked", hardware: str = "cpu",
             overrides: Sequence[str] = (), tokenizer=None) -> Pipeline:
    """`model` is a short name, a local directory or an in-memory transformers (or fastgen) model."""
    groups = [f"scheduler={scheduler}", f"kv={kv}", f"hardware={hardware}"]
    if isinstance(model, (str, Path)):
        groups.append(f"model.source={model}")
        model = None
    cfg = compose_config(groups + list(overrides))
    return Pipeline(build_engine(cfg, model, tokenizer))
