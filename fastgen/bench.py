"""The benchmark behind run.py: build the workload from a RunConfig, drive the in-process engine with it (or,
with target=http, any OpenAI-compatible server, timing tokens at the client as the paper does), and write the
paper's metrics to files (metrics.json, requests.jsonl, steps.jsonl) and, optionally, to wandb."""
from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf

from fastgen.compose import build_engine
from fastgen.driver import EngineTarget, RunResult, run_workload
from fastgen.metrics import format_table, summarize
from fastgen.models import load_config
from fastgen.routers import make_router
from fastgen.run_config import RunConfig
from fastgen.serve.client import HttpTarget
from fastgen.sim.cluster import ReplicaCluster
from fastgen.workloads import Workload, build_workload
from fastgen.workloads.trace import resolve_trace_path


def run_benchmark(cfg: RunConfig, out_dir: str | os.PathLike, model=None, tokenizer=None, clock=None) -> dict:
    """`clock`: the real engine's clock (default the wall clock; fastgen.sim.CPUClock for steady CPU timings)."""
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.workload.trace_path:
        cfg.workload.trace_path = str(resolve_trace_path(cfg.workload.trace_path))
    if cfg.target.name == "http":
        config = model.config if model is not None else None
        if config is None:
            config, tokenizer = load_config(cfg.model.source, tokenizer)
        context = min(filter(None, (cfg.model.max_model_len, getattr(config, "max_position_embeddings", None))),
                      default=None)
        workload = build_workload(cfg.workload, config.vocab_size, tokenizer, max_model_len=context)
        result = run_over_http(cfg, workload)
    else:
        engines = [build_engine(cfg, model, tokenizer, clock) for _ in range(cfg.replicas)]
        engine = engines[0]
        try:
            workload = build_workload(cfg.workload, engine.vocab_size, engine.tokenizer,
                                      max_model_len=engine.max_model_len)
            target = EngineTarget(engine) if cfg.replicas == 1 else \
                ReplicaCluster(engines, make_router(cfg.router, cfg.replicas))
            result = run_workload(target, workload, progress=cfg.progress)
        finally:
            for e in engines:
                e.close()
    if workload.clipped or workload.skipped:
        print(f"workload: {workload.clipped} requests clipped, {workload.skipped} trace rows skipped to fit the "
              f"model's context (workload.too_long={cfg.workload.too_long})")
    metrics = summarize(result.traces, result.steps, cfg.sla, start_time=result.start_time,
                        end_time=result.end_time)
    metrics["workload_clipped"], metrics["workload_skipped"] = workload.clipped, workload.skipped
    metrics["config"] = OmegaConf.to_container(OmegaConf.structured(cfg))
    write_results(out, metrics, result)
    if cfg.logger.name == "wandb":
        log_wandb(cfg, metrics, result, out)
    print(format_table(metrics))
    return metrics


def run_over_http(cfg: RunConfig, workload: Workload) -> RunResult:
    """The workload sent to a server (its prompts shaped by the model's config and tokenizer, no weights)."""
    with HttpTarget(cfg.target.url, api_key=cfg.target.api_key, model=cfg.target.served_model) as target:
        return run_workload(target, workload, progress=cfg.progress)


def write_results(out: Path, metrics: dict, result: RunResult) -> None:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with open(out / "requests.jsonl", "w") as f:
        for t in result.traces:
            f.write(json.dumps(vars(t)) + "\n")        # flat records: vars() spares asdict's deep copies
    with open(out / "steps.jsonl", "w") as f:
        for s in result.steps:
            f.write(json.dumps({**vars(s), "start": s.start - result.start_time}) + "\n")


def log_wandb(cfg: RunConfig, metrics: dict, result: RunResult, out: Path) -> None:
    import wandb

    run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, mode=cfg.logger.mode,
                     tags=list(cfg.logger.tags), dir=str(out), config=metrics["config"],
                     name=f"{cfg.scheduler.name}-{cfg.workload.arrival}-c{cfg.workload.clients}")
    for s in result.steps:
        wandb.log({"step/time_s": s.start - result.start_time, "step/duration_s": s.duration_s,
                   "step/forward_s": s.forward_s, "step/num_tokens": s.num_tokens, "step/num_seqs": s.num_seqs,
                   "step/kv_used_tokens": s.kv_used_tokens}, step=s.index)
    run.summary.update({k: v for k, v in metrics.items() if k != "config" and v is not None})
    run.finish()
