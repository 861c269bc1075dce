"""Capacity search: the largest request rate at which a configuration still meets an SLO, by bisection over
benchmark runs (simulated, or real where the model is small enough), as Sarathi-Serve's capacity search does.

    python -m fastgen.capacity executor=simulated hardware=a100-80gb hardware.tensor_parallel=4 \\
        model.source=llama-2-70b workload=paper workload.arrival=poisson capacity.slo.ttft_p99_s=10 \\
        capacity.slo.tbt_p99_s=0.5
    python -m fastgen.capacity -m scheduler=splitfuse,vllm-0.2,continuous ...   # + capacity.md: one row each
    python -m fastgen.capacity workload=azure-conv capacity.slo.sla_frac=0.99  # trace replay, rate-scaled
    python -m fastgen.capacity workload=two-tenant capacity.slo.attainment=0.9  # per-class streams and SLOs

The arrivals must be open loop: a Poisson or Gamma process at `workload.rate`, or a trace or the request classes'
own streams (arrival=classes) replayed at `workload.time_scale`: the search sets the time scale that gives each
probed rate, the rate of the arrivals at time scale 1 (a trace's rows, or the classes' streams merged) divided by
the time scale, so every class's stream is compressed alike and the classes' mix stays. Every probe sends the same
requests (the same seed), only faster or slower. The SLO is any of: P99 time to first token, P99 time between
tokens (inter-token latency), the fraction of requests meeting the paper's chat SLA (`sla`, at `slo.sla_g`
tokens/s), and the fraction of requests meeting their own (their class's) SLO (`slo.attainment`, the run's
`slo_attainment`). The search doubles (or halves) the rate from `rate` until it has one rate that meets the SLO and one
that does not, then bisects until they are within `tolerance` of each other. Each probe is a run directory under
probes/; capacity.json holds the bracket and every probe's figures.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from fastgen.analysis import markdown_table
from fastgen.conf import CONF_DIR
from fastgen.run_config import CapacityRunConfig, RunConfig

@dataclass
class Probe:
    rate: float
    met: bool
    metrics: dict


@dataclass
class CapacityResult:
    capacity: Optional[float]            # the largest probed rate that met the SLO (None: even the lowest failed)
    failing: Optional[float]             # the smallest probed rate that did not (None: none failed)
    probes: list[Probe]

    @property
    def bracketed(self) -> bool:
        return self.capacity is not None and self.failing is not None


SCALED = ("trace", "classes")       # arrivals replayed at workload.time_scale (the others run at workload.rate)


def replay_rate(cfg: RunConfig) -> float:
    """Requests per second of the arrivals the workload replays at time_scale 1: the trace's rows, or the classes'
    streams merged (the workload built as the benchmark builds it, for the model's vocabulary and context)."""
    if cfg.workload.arrival == "classes":
        from fastgen.sim.shapes import model_spec
        from fastgen.workloads import build_workload
        spec = model_spec(cfg.model.source)
        context = min(filter(None, (cfg.model.max_model_len, spec.max_positions)))
        workload = build_workload(dataclasses.replace(cfg.workload, time_scale=1.0), spec.vocab_size,
                                  max_model_len=context)
        times, what = sorted(workload.arrivals.times), "the classes' streams"
    else:
        from fastgen.workloads.replay import load_trace, resolve_trace_path
        times = sorted(r.arrival_time for r in load_trace(str(resolve_trace_path(cfg.workload.trace_path)),
                                                         require_arrival_time=True)[:cfg.workload.num_requests])
        what = cfg.workload.trace_path
    if len(times) < 2 or times[-1] <= times[0]:
        raise ValueError(f"{what}: need at least two distinct arrival times to scale their rate")
    return (len(times) - 1) / (times[-1] - times[0])


def at_rate(cfg: RunConfig, rate: float, base_rate: float | None) -> RunConfig:
    """cfg with its arrivals at `rate` requests/s."""
    cfg = copy.deepcopy(cfg)
    if cfg.workload.arrival in SCALED:
        cfg.workload.time_scale = base_rate / rate
    else:
        cfg.workload.rate = rate
    return cfg


def search(cfg: CapacityRunConfig, out_dir: str | Path, run: Callable[[RunConfig, Path], dict] | None = None) \
        -> CapacityResult:
    """Brackets and bisects the rate; `run(cfg, out_dir) -> metrics` runs one probe (default: run_benchmark)."""
    if run is None:
        run = quiet_benchmark
    cfg.validate()
    c, out = cfg.capacity, Path(out_dir)
    base = replay_rate(cfg) if cfg.workload.arrival in SCALED else None
    probes: list[Probe] = []

    def probe(rate: float) -> bool:
        metrics = run(at_rate(cfg, rate, base), out / "probes" / f"rate-{rate:.6g}")
        probes.append(Probe(rate, c.slo.met(metrics), metrics))
        print(f"  rate {rate:.4g} req/s: {'meets' if probes[-1].met else 'misses'} the SLO ("
              + ", ".join(f"{what} {fmt(metrics.get(key))}" for key, (what, _, _) in c.slo.checks().items()) + ")",
              flush=True)
        return probes[-1].met

    ok, fail = (c.rate, None) if probe(c.rate) else (None, c.rate)
    while (ok is None or fail is None) and len(probes) < c.max_probes:
        rate = ok * 2 if fail is None else fail / 2
        ok, fail = (rate, fail) if probe(rate) else (ok, rate)
    while ok is not None and fail is not None and (fail - ok) / ok > c.tolerance and len(probes) < c.max_probes:
        rate = math.sqrt(ok * fail)
        ok, fail = (rate, fail) if probe(rate) else (ok, rate)
    return CapacityResult(ok, fail, probes)


def quiet_benchmark(cfg: RunConfig, out_dir: Path) -> dict:
    """run_benchmark without its per-run table (the search prints one line per probe)."""
    from fastgen.bench import run_benchmark
    with contextlib.redirect_stdout(io.StringIO()):
        return run_benchmark(cfg, out_dir)


def fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def write(result: CapacityResult, cfg: CapacityRunConfig, out_dir: str | Path) -> Path:
    path = Path(out_dir) / "capacity.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    probes = [{"rate": p.rate, "met": p.met, **{k: p.metrics.get(k) for k in summary_keys(cfg)}}
              for p in sorted(result.probes, key=lambda p: p.rate)]
    path.write_text(json.dumps({"capacity": result.capacity, "failing": result.failing,
                                "bracketed": result.bracketed, "slo": asdict(cfg.capacity.slo),
                                "tolerance": cfg.capacity.tolerance, "probes": probes,
                                "config": OmegaConf.to_container(OmegaConf.structured(cfg))}, indent=2))
    return path


def summary_keys(cfg: CapacityRunConfig) -> list[str]:
    return ["request_throughput", "ttft_s_p99", "itl_s_p99", *cfg.capacity.slo.checks()]


def capacity_table(paths: list[Path]) -> str:
    """A Markdown table of capacity.json files: one row per search (a multirun's jobs: one per scheduler, ...)."""
    rows = []
    for path in paths:
        r = json.loads(Path(path).read_text())
        cfg = r["config"]
        slo = ", ".join(f"{k} {v:g}" for k, v in r["slo"].items() if v is not None and k != "sla_g")
        rows.append([cfg["scheduler"]["name"], cfg["model"]["source"], cfg["workload"]["arrival"], slo,
                     fmt(r["capacity"]), fmt(r["failing"]), len(r["probes"]), Path(path).parent.name])
    return markdown_table(["scheduler", "model", "arrivals", "SLO", "capacity (req/s)", "fails at (req/s)",
                           "probes", "run"], rows)


class CapacityTable(Callback):
    """At the end of a multirun, gathers its jobs' capacity.json into capacity.md in the sweep directory."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        paths = sorted(sweep.glob("*/capacity.json"))
        if paths:
            (sweep / "capacity.md").write_text(capacity_table(paths))
            print(f"wrote {sweep / 'capacity.md'}\n{capacity_table(paths)}")


@hydra.main(config_path=str(CONF_DIR), config_name="capacity", version_base=None)
def main(cfg) -> None:
    cfg = OmegaConf.to_object(cfg)
    out = HydraConfig.get().runtime.output_dir
    result = search(cfg, out)
    path = write(result, cfg, out)
    verdict = (f"capacity {fmt(result.capacity)} req/s (fails at {fmt(result.failing)})" if result.bracketed else
               "the SLO fails even at the lowest probed rate" if result.capacity is None else
               f"the SLO holds at every probed rate, up to {fmt(result.capacity)} req/s")
    print(f"{cfg.scheduler.name}: {verdict}; wrote {path}")


if __name__ == "__main__":
    from fastgen.cli import run_hydra
    run_hydra(main, config_name="capacity")
