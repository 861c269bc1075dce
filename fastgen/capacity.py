"""Capacity search: the largest request rate at which a configuration still meets an SLO, by bisection over
benchmark runs (simulated, or real where the model is small enough), as Sarathi-Serve's capacity search does.

    python -m fastgen.capacity executor=simulated hardware=a100-80gb hardware.tensor_parallel=4 \\
        model.source=llama-2-70b workload=paper workload.arrival=poisson capacity.slo.ttft_p99_s=10 \\
        capacity.slo.tbt_p99_s=0.5
    python -m fastgen.capacity -m scheduler=splitfuse,vllm-0.2,continuous ...   # + capacity.md: one row each
    python -m fastgen.capacity workload=azure-conv capacity.slo.sla_frac=0.99  # trace replay, rate-scaled

The arrivals must be open loop: a Poisson or Gamma process at `workload.rate`, or a trace replayed at
`workload.time_scale` (the search sets the time scale that gives each probed rate). Every probe sends the same
requests (the same seed), only faster or slower. The SLO is any of: P99 time to first token, P99 time between
tokens (inter-token latency), and the fraction of requests meeting the paper's chat SLA (`sla`, at `slo.sla_g`
tokens/s). The search doubles (or halves) the rate from `rate` until it has one rate that meets the SLO and one
that does not, then bisects until they are within `tolerance` of each other. Each probe is a run directory under
probes/; capacity.json holds the bracket and every probe's figures.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from fastgen.analysis import markdown_table
from fastgen.compose import CONF_DIR
from fastgen.config import hydra_schema
from fastgen.metrics import g_suffix
from fastgen.routers import RouterConfig
from fastgen.run_config import RunConfig

OPEN_LOOP = ("poisson", "gamma", "trace")


@dataclass
class SLOConfig:
    """Limits a run must meet; None leaves a limit out (at least one is needed)."""

    ttft_p99_s: Optional[float] = None   # P99 time to first token
    tbt_p99_s: Optional[float] = None    # P99 time between tokens
    sla_frac: Optional[float] = None     # the fraction of requests meeting the paper's chat SLA, at least
    sla_g: float = 4.0                   # ... at this generation rate (tokens/s; one of sla.gen_tokens_per_s)

    def validate(self) -> None:
        if self.ttft_p99_s is None and self.tbt_p99_s is None and self.sla_frac is None:
            raise ValueError("capacity search needs an SLO: set capacity.slo.ttft_p99_s, capacity.slo.tbt_p99_s "
                             "and/or capacity.slo.sla_frac")
        if self.sla_frac is not None and not 0 < self.sla_frac <= 1:
            raise ValueError(f"capacity.slo.sla_frac must be in (0, 1], got {self.sla_frac}")

    def checks(self) -> dict[str, tuple[str, float, bool]]:
        """{metric key: (what, limit, whether the value must stay at most (True) or at least (False) the limit)}"""
        out = {}
        if self.ttft_p99_s is not None:
            out["ttft_s_p99"] = ("P99 TTFT (s)", self.ttft_p99_s, True)
        if self.tbt_p99_s is not None:
            out["itl_s_p99"] = ("P99 TBT (s)", self.tbt_p99_s, True)
        if self.sla_frac is not None:
            out[f"sla_frac_{g_suffix(self.sla_g)}"] = (f"SLA met at {self.sla_g:g} tok/s", self.sla_frac, False)
        return out

    def met(self, metrics: dict) -> bool:
        for key, (_, limit, at_most) in self.checks().items():
            value = metrics.get(key)
            if value is None or (value > limit if at_most else value < limit):
                return False
        return True


@dataclass
class CapacityConfig:
    slo: SLOConfig = field(default_factory=SLOConfig)
    rate: float = 1.0                    # first probe (requests/s)
    tolerance: float = 0.05              # stop when (failing rate - meeting rate) / meeting rate <= this
    max_probes: int = 24

    def validate(self) -> None:
        self.slo.validate()
        if not self.rate > 0 or not self.tolerance > 0 or self.max_probes < 2:
            raise ValueError("capacity.rate and capacity.tolerance must be > 0 and capacity.max_probes >= 2")


@dataclass
class CapacityRunConfig(RunConfig):
    capacity: CapacityConfig = field(default_factory=CapacityConfig)

    def validate(self) -> None:
        super().validate()
        self.capacity.validate()
        if self.workload.arrival not in OPEN_LOOP:
            raise ValueError(f"capacity search varies the arrival rate: workload.arrival must be one of {OPEN_LOOP}, "
                             f"got {self.workload.arrival!r} (e.g. workload.arrival=poisson)")
        if self.sla_key_missing():
            raise ValueError(f"capacity.slo.sla_g={self.capacity.slo.sla_g} is not one of sla.gen_tokens_per_s "
                             f"{list(self.sla.gen_tokens_per_s)}")

    def sla_key_missing(self) -> bool:
        return self.capacity.slo.sla_frac is not None and self.capacity.slo.sla_g not in self.sla.gen_tokens_per_s


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


def trace_rate(cfg: RunConfig) -> float:
    """Requests per second of the trace's rows the workload replays, at time_scale 1."""
    from fastgen.workloads.trace import load_trace, resolve_trace_path
    times = sorted(r.arrival_time for r in load_trace(str(resolve_trace_path(cfg.workload.trace_path)),
                                                     require_arrival_time=True)[:cfg.workload.num_requests])
    if len(times) < 2 or times[-1] <= times[0]:
        raise ValueError(f"{cfg.workload.trace_path}: need at least two distinct arrival times to scale its rate")
    return (len(times) - 1) / (times[-1] - times[0])


def at_rate(cfg: RunConfig, rate: float, base_rate: float | None) -> RunConfig:
    """cfg with its arrivals at `rate` requests/s."""
    cfg = copy.deepcopy(cfg)
    if cfg.workload.arrival == "trace":
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
    base = trace_rate(cfg) if cfg.workload.arrival == "trace" else None
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


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore
    schema = hydra_schema(CapacityRunConfig)
    schema.router = RouterConfig()
    ConfigStore.instance().store(group="schema", name="capacity", node=schema, package="_global_")


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
