"""The benchmark behind run.py: build the workload from a RunConfig, drive the in-process engine with it (or,
with target=http, any OpenAI-compatible server, timing tokens at the client as the paper does), and write the
paper's metrics to files (metrics.json, requests.jsonl, steps.jsonl) and, optionally, to wandb.

Every time in requests.jsonl and steps.jsonl is seconds since the run began on the clock it was measured on
(metrics.json's `time_origin`), so requests and steps join. The model is loaded once per process and kept for
the next run with the same model, dtype and device (the jobs of a `run.py -m` sweep run in one process).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from fastgen.analysis import describe, overrides, sweep_jobs, differing
from fastgen.class_figures import class_figures, has_classes
from fastgen.compose import build_engine
from fastgen.deployment import build_deployment
from fastgen.driver import EngineTarget, HttpTarget, ReplicaCluster, RunResult, run_workload
from fastgen.driver.disaggregated import DisaggregatedTarget
from fastgen.executors import EXECUTORS
from fastgen.machine import Machine
from fastgen.metrics import (SLAConfig, format_table, g_suffix, is_completed, meets_ema_sla, meets_ttft_sla,
                             summarize)
from fastgen.models import load_config, load_model, resolve_dtype
from fastgen.routers import make_router
from fastgen.redact import redact, redact_files, secret_values
from fastgen.run_config import RunConfig
from fastgen.sim.clocks import CPUClock, VirtualClock
from fastgen.tracking import WandbRun, log_run, run_name, sweep_group
from fastgen.workloads import Workload, build_workload
from fastgen.workloads.replay import resolve_trace_path

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    key: tuple[str, str, str]            # (source, dtype, device)
    model: Any
    tokenizer: Any
    load_s: float


_loaded: Optional[LoadedModel] = None


def shared_model(cfg: RunConfig) -> tuple[Any, Any, dict]:
    """cfg's model and tokenizer, loaded once per process and reused while (source, dtype, device) stay the same
    (one model is kept: a sweep over models frees the previous one). Weights are read-only during inference and
    each engine owns its KV cache, so runs that share a model do not affect each other."""
    global _loaded
    hw = cfg.hardware
    key = (str(cfg.model.source), str(resolve_dtype(hw.dtype, hw.device)), hw.device)
    if _loaded is not None and _loaded.key == key:
        log.info(f"model {key[0]}: reusing the copy loaded by an earlier run in this process")
        return _loaded.model, _loaded.tokenizer, {"load_s": _loaded.load_s, "reused": True}
    _loaded = None
    start = time.perf_counter()
    model, tokenizer = load_model(cfg.model.source, dtype=hw.dtype, device=hw.device)
    _loaded = LoadedModel(key, model, tokenizer, time.perf_counter() - start)
    log.info(f"model {key[0]}: loaded in {_loaded.load_s:.1f} s")
    return model, tokenizer, {"load_s": _loaded.load_s, "reused": False}


def run_benchmark(cfg: RunConfig, out_dir: str | os.PathLike, model=None, tokenizer=None, clock=None,
                  wandb_run: Optional[WandbRun] = None) -> dict:
    """Runs cfg's workload `cfg.repeats` times (workload seeds seed, seed+1, ...) and writes the files; returns the
    metrics (means over the repeats, each repeat's under `runs`). `clock`: the real engine's clock (default: the
    wall clock, or process CPU time with timer=cpu). `wandb_run`: where logger=wandb puts it (default: a sweep's
    group when out_dir is a job of a `run.py -m` sweep, see wandb_identity)."""
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.workload.trace_path:
        cfg.workload.trace_path = str(resolve_trace_path(cfg.workload.trace_path))
    load = None
    if cfg.target.name == "engine" and model is None and EXECUTORS.get(cfg.executor.name).loads_weights:
        model, tokenizer, load = shared_model(cfg)
    machine = Machine.at_start()
    runs, results, threads = [], [], None
    for k in range(cfg.repeats):
        workload_cfg = dataclasses.replace(cfg.workload, seed=cfg.workload.seed + k)
        run_clock = clock or (CPUClock() if cfg.timer == "cpu" else None)
        result, workload, threads = run_once(cfg, workload_cfg, model, tokenizer, run_clock)
        metrics = summarize(result.traces, result.steps, cfg.sla, start_time=result.start_time,
                            end_time=result.end_time)
        metrics["workload_clipped"], metrics["workload_skipped"] = workload.clipped, workload.skipped
        metrics["num_warmups"] = len(workload.requests) - len(workload.measured)
        metrics |= workload_sent(workload, result)
        metrics["time_origin"] = {"clock": result.clock_name, "clock_start": result.start_time,
                                  "unix_time": result.start_unix_time}
        if workload.clipped or workload.skipped:
            log.info(f"workload: {workload.clipped} requests clipped, {workload.skipped} trace rows skipped to fit "
                     f"the model's context (workload.too_long={cfg.workload.too_long})")
        runs.append(metrics)
        results.append(result)
    metrics = mean_metrics(runs)
    if cfg.repeats > 1:
        metrics["runs"] = runs
    config = OmegaConf.to_container(OmegaConf.structured(cfg))
    metrics["config"] = redact(config)                 # no api_key or token in any written config
    ranks = cfg.hardware.tensor_parallel if cfg.executor.name == "tp" and threads is not None else None
    metrics["machine"] = machine.finish(threads, ranks).asdict()
    metrics["model_load"] = load
    write_results(out, metrics, results, cfg.sla)
    if has_classes(results[0].traces):
        described = describe(metrics["config"])
        class_figures(results[0].traces, out, f"{described['workload']}\n{described['scheduler']}")
    if cfg.logger.name == "wandb":
        log_run(cfg.logger, wandb_run or wandb_identity(cfg, out), out)
    log.info(format_table(metrics) + "\n\n" + run_summary(metrics, out))
    redact_run_dir(out, secret_values(config))
    if metrics["machine"]["noise_warning"]:
        log.warning("warning: " + metrics["machine"]["noise_warning"])
    return metrics


def run_or_reuse(overrides: list[str], out: Path, reuse: bool, model=None, tokenizer=None, clock=None) -> dict:
    """run.py's benchmark of `overrides` into `out`, or, with `reuse`, the metrics.json a run left there (slow real
    runs are kept between invocations of a sweep)."""
    if reuse and (Path(out) / "metrics.json").exists():
        return json.loads((Path(out) / "metrics.json").read_text())
    from fastgen.conf import compose_config
    return run_benchmark(compose_config(overrides), out, model=model, tokenizer=tokenizer, clock=clock)


def run_once(cfg: RunConfig, workload_cfg, model, tokenizer, clock) -> tuple[RunResult, Workload, Optional[int]]:
    """One pass of the workload; the threads it computed on (None: timed on a virtual clock)."""
    if cfg.target.name == "http":
        config = model.config if model is not None else None
        if config is None:
            config, tokenizer = load_config(cfg.model.source, tokenizer)
        context = min(filter(None, (cfg.model.max_model_len, getattr(config, "max_position_embeddings", None))),
                      default=None)
        workload = build_workload(workload_cfg, config.vocab_size, tokenizer, max_model_len=context)
        with HttpTarget(cfg.target.url, api_key=cfg.target.api_key, model=cfg.target.served_model) as target:
            return run_workload(target, workload, progress=cfg.progress), workload, 1
    engines = [build_engine(cfg, model, tokenizer, clock) for _ in range(cfg.replicas)] \
        if not cfg.deployment.disaggregated else [build_deployment(cfg, cfg.deployment, cfg.router, model, tokenizer,
                                                                   clock)]
    engine = engines[0]
    try:
        workload = build_workload(workload_cfg, engine.vocab_size, engine.tokenizer,
                                  max_model_len=engine.max_model_len)
        target = DisaggregatedTarget(engine) if cfg.deployment.disaggregated else EngineTarget(engine) \
            if cfg.replicas == 1 else ReplicaCluster(engines, make_router(cfg.router, cfg.replicas))
        result = run_workload(target, workload, progress=cfg.progress)
    finally:
        for e in engines:
            e.close()
    if isinstance(engine.clock, VirtualClock):
        result.clock_name = "virtual"
    elif isinstance(engine.clock, CPUClock):
        result.clock_name = "cpu"
    if result.clock_name == "virtual":
        return result, workload, None
    if cfg.executor.name == "tp":
        from fastgen.executors.tensor_parallel import group_options
        options = group_options(cfg)
        if options.threads is not None:             # CPU ranks: options.threads torch threads each
            return result, workload, options.threads * options.size
    return result, workload, torch.get_num_threads()


def workload_sent(workload: Workload, result: RunResult) -> dict:
    """The workload as sent (measured requests): mean prompt and output lengths asked for, and the offered rate,
    requests/s from their arrival times ((n - 1) / (last arrival - first), None for fewer than 2 requests)."""
    measured = workload.measured
    arrivals = sorted(t.arrival_time for t in result.traces)
    span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0
    return {"workload_prompt_mean": sum(len(r.prompt_token_ids) for r in measured) / len(measured) if measured
            else None,
            "workload_output_mean": sum(r.max_new_tokens for r in measured) / len(measured) if measured else None,
            "offered_rate": (len(arrivals) - 1) / span if span > 0 else None}


def redact_run_dir(out: Path, secrets: list[str]) -> None:
    """Hydra wrote the run's config and overrides (.hydra/, and a sweep's multirun.yaml one folder up) before the
    run began: rewritten without secrets, as is run.log."""
    redact_files(out, secrets)
    if (out.parent / "multirun.yaml").is_file():
        redact_files(out.parent, secrets)


def mean_metrics(runs: list[dict]) -> dict:
    """The repeats' metrics averaged key by key (None if any repeat has none); non-numbers from the first."""
    if len(runs) == 1:
        return dict(runs[0])
    out = {}
    for key, first in runs[0].items():
        values = [r.get(key) for r in runs]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        out[key] = sum(values) / len(values) if numeric else (None if first is None or None in values else first)
    return out


def run_summary(metrics: dict, out: Path) -> str:
    """The lines that say what ran: scheduler, workload, executor, SLA and where the files are."""
    cfg = metrics["config"]
    d = describe(cfg)
    measured, warmups = metrics["num_requests"], metrics["num_warmups"]
    repeats = cfg.get("repeats", 1)
    machine = metrics["machine"]
    threads = "" if not machine["threads"] else \
        f", {machine['ranks']} ranks x {machine['threads'] // machine['ranks']} thread" \
        f"{'s' * (machine['threads'] // machine['ranks'] != 1)} each" if machine.get("ranks") else \
        f", {machine['threads']} thread{'s' * (machine['threads'] != 1)}"
    return "\n".join([
        f"scheduler    {d['scheduler']}; kv {d['kv']}",
        f"workload     {d['workload']}; {measured:g} measured requests (ids 0..{int(measured) - 1})"
        + ("" if not warmups else " + 1 warm-up (id warmup-0, not measured)" if warmups == 1 else
           f" + {warmups:g} warm-ups (ids warmup-0..{int(warmups) - 1}, not measured)")
        + (f"; means over {repeats} repeats (seeds +0..{repeats - 1})" if repeats > 1 else ""),
        f"executor     {d['executor']}: {d['model']} on {d['hardware']}{threads}"
        + (" (a cost model on a virtual clock: times are predicted, no model runs)"
           if metrics["time_origin"]["clock"] == "virtual" else ""),
        f"SLA          {d['sla'].removeprefix('SLA ')}",
        *spread_lines(metrics),
        f"output       {out.resolve()}"])


SPREAD_KEYS = ("request_throughput", "total_token_throughput", "e2e_s_mean", "ttft_s_p50")


def spread_lines(metrics: dict) -> list[str]:
    """repeats=N: each headline metric's mean +- standard deviation and range over the runs."""
    runs = metrics.get("runs") or []
    if len(runs) < 2:
        return []
    import numpy as np
    lines = []
    for key in SPREAD_KEYS:
        values = np.array([r[key] for r in runs if r.get(key) is not None], dtype=float)
        if len(values) > 1:
            lines.append(f"  {key:<24} {values.mean():.4g} +- {values.std(ddof=1):.2g} (std; range "
                         f"{values.min():.4g}-{values.max():.4g}, n={len(values)})")
    return [f"repeats      spread over {len(runs)} runs:"] + lines if lines else []


def _relative(value, origin: float):
    if isinstance(value, list):
        return [v - origin for v in value]
    return None if value is None else value - origin


def sla_met(trace, sla: SLAConfig) -> dict[str, bool]:
    """Did this request meet the SLA (TTFT part and the EMA generation part) at each g? Keys g2, g4, ..."""
    done = is_completed(trace)
    ttft_ok = done and meets_ttft_sla(trace, sla.prompt_tokens_per_s)
    return {g_suffix(g): bool(ttft_ok and meets_ema_sla(trace, g, sla.ema_span)) for g in sla.gen_tokens_per_s}


def write_results(out: Path, metrics: dict, results: list[RunResult], sla: Optional[SLAConfig] = None) -> None:
    """metrics.json; requests.jsonl and steps.jsonl with times in seconds since each run's start (`repeat`: which
    run, when there are several; `sla_met`: per g, whether the request met the SLA)."""
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    several = len(results) > 1
    with open(out / "requests.jsonl", "w") as f:
        for k, result in enumerate(results):
            for t in result.traces:
                row = {key: _relative(v, result.start_time) if key in TRACE_TIMES else v
                       for key, v in vars(t).items() if key != "slo"}   # flat records: vars() spares asdict's copies
                row["slo_ttft_s"], row["slo_tpot_s"] = (t.slo.ttft_s, t.slo.tpot_s) if t.slo else (None, None)
                if sla is not None:
                    row["sla_met"] = sla_met(t, sla)
                f.write(json.dumps({**row, "repeat": k} if several else row) + "\n")
    with open(out / "steps.jsonl", "w") as f:
        for k, result in enumerate(results):
            for s in result.steps:
                row = {**vars(s), "start": s.start - result.start_time}
                f.write(json.dumps({**row, "repeat": k} if several else row) + "\n")


TRACE_TIMES = ("arrival_time", "token_times", "first_scheduled_time", "finish_time")


def wandb_identity(cfg: RunConfig, out: Path) -> WandbRun:
    """A run's place in wandb: a job of a `run.py -m` sweep goes to the sweep's group (logger.group, else named
    after the sweep directory), named by its values of the keys the sweep varies (its `diff`), job type its
    scheduler (or, when the scheduler is not swept, the first swept key); a single run to logger.group, if any,
    named <scheduler>-<arrival>-c<clients>."""
    log_cfg = cfg.logger
    jobs = sweep_jobs(out.parent)
    mine = overrides({"run_dir": str(out)}) if jobs else None
    if not jobs or mine is None:
        name = f"{cfg.scheduler.name}-{cfg.workload.arrival}-c{cfg.workload.clients}"
        return WandbRun(group=log_cfg.group, name=log_cfg.run_name or name, job_type=log_cfg.job_type or "run")
    diff = {k: mine.get(k) for k in differing(jobs)}
    job_type = cfg.scheduler.name if "scheduler" in diff or not diff else run_name(dict([next(iter(diff.items()))]))
    return WandbRun(group=log_cfg.group or sweep_group(out.parent), name=log_cfg.run_name or run_name(diff) or "job",
                    job_type=log_cfg.job_type or job_type, diff=diff, tags=["sweep"])
