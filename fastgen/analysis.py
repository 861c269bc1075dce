"""Gather a Hydra multirun directory into one table and draw the two figures of the paper's method:
throughput vs latency (one point per client count) and effective throughput vs clients, one line per configuration.

    python -m fastgen.analysis multirun/2026-11-24/21-00-00 [--latency e2e_s_p50] [--g 4]

`python run.py -m ...` does this itself when the sweep ends (SweepSummary, a Hydra callback in conf/config.yaml).
Figures are titled with what the runs share (model, workload, hardware, executor); lines are labelled with what
differs between them. Runs of one configuration at one client count (`repeats=N` in a job, or jobs that differ
only in their seeds) are one point: the mean, with error bars of +-1 standard deviation.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from hydra.experimental.callback import Callback

from fastgen.metrics import SLAConfig, g_suffix

COLUMNS = ["scheduler", "kv", "workload", "prompt_mean", "output_mean", "clients", "repeats", "num_completed",
           "request_throughput", "total_token_throughput", "e2e_s_mean", "e2e_s_p50", "ttft_s_p50", "itl_s_p95",
           "token_latency_s_p95"]
# Config keys that do not make a run a different configuration: the x axis, and what repeats vary.
NOT_A_SERIES = {"workload.clients", "seed", "workload.seed", "repeats", "progress", "workload.name"}
PARTS = ("scheduler", "kv", "executor")
METRIC_NAMES = {"ttft": "time to first token", "tpot": "time per output token", "itl": "inter-token latency",
                "e2e": "end-to-end latency", "queue": "queueing delay", "token_latency": "token latency",
                "step_time": "step time"}
AXES = {"request_throughput": "throughput (requests/s)", "output_token_throughput": "output throughput (tokens/s)",
        "total_token_throughput": "throughput, prompt + output (tokens/s)", "clients": "concurrent clients"}


# ---------------------------------------------------------------------------- describing runs

def describe(config: Mapping[str, Any], clients: bool = True) -> dict[str, str]:
    """Human labels of a run's config (metrics.json's `config`): model, workload, hardware, executor, scheduler,
    kv and SLA; `clients=False` leaves the client count out of the workload (figures plot it)."""
    w, hw, ex = config["workload"], config["hardware"], config["executor"]
    source = str(config["model"]["source"])
    arrival = {"closed_loop": "closed loop" + (f", {w['clients']} client{'s' * (w['clients'] != 1)}" if clients else ""),
               "poisson": f"Poisson arrivals at {w['rate']:g} req/s",
               "gamma": f"gamma arrivals at {w['rate']:g} req/s (burstiness {w['burstiness']:g})",
               "trace": "trace arrival times" + (f" x{w['time_scale']:g}" if w["time_scale"] != 1 else "")
               }[w["arrival"]]
    lengths = (f"lengths from {Path(w['trace_path']).name}" if w.get("trace_path") else
               f"prompt ~{w['prompt']['mean']:g} / output ~{w['output']['mean']:g} tokens")
    tp = hw.get("tensor_parallel", 1)
    timer = config.get("timer", "wall")
    return {
        "model": Path(source).name if "/" in source else source,
        "workload": f"{w.get('name') or 'custom'} ({arrival}, {lengths})",
        "hardware": f"{hw.get('name') or hw['device']}{f' x{tp}' if tp > 1 else ''} {hw['dtype']}",
        "executor": f"{ex['name']} executor" + (", CPU-time clock" if timer == "cpu" else ""),
        "scheduler": _part(config["scheduler"]),
        "kv": _part(config["kv"]),
        "sla": SLAConfig(**config["sla"]).describe() if "sla" in config else "",
    }


def _part(part: Mapping[str, Any]) -> str:
    knobs = ", ".join(f"{k}={v}" for k, v in part.items() if k not in ("name", "module") and not isinstance(v, dict))
    return f"{part['name']} ({knobs})" if knobs else part["name"]


def axis_label(key: str) -> str:
    """A metric key as an axis label with its unit: e2e_s_mean -> 'mean end-to-end latency (s)'."""
    if key in AXES:
        return AXES[key]
    if m := re.fullmatch(r"(.+)_s_(mean|max|p(\d+))", key):
        stat = {"mean": "mean", "max": "max", "p50": "median"}.get(m[2], f"P{m[3]}")
        return f"{stat} {METRIC_NAMES.get(m[1], m[1].replace('_', ' '))} (s)"
    if m := re.fullmatch(r"effective_(cumulative_)?throughput_g(.+)", key):
        return (f"effective throughput at g = {m[2].replace('p', '.')} tok/s{' (cumulative)' if m[1] else ''}\n"
                "(SLA-meeting requests/s)")
    return key


# ---------------------------------------------------------------------------- gathering a sweep

def gather(sweep_dir: str | Path) -> list[dict]:
    """Every run's metrics.json under `sweep_dir` (with its `run_dir`), by scheduler, kv and clients."""
    runs = []
    for path in sorted(Path(sweep_dir).glob("**/metrics.json")):
        runs.append({**json.loads(path.read_text()), "run_dir": str(path.parent)})
    if not runs:
        raise FileNotFoundError(f"no metrics.json under {sweep_dir}; is it a run.py multirun directory?")
    return sorted(runs, key=lambda m: (m["config"]["scheduler"]["name"], m["config"]["kv"]["name"], _clients(m)))


def _clients(metrics: Mapping) -> int:
    return metrics["config"]["workload"]["clients"]


def table_row(metrics: Mapping) -> dict:
    cfg = metrics["config"]
    return {"scheduler": cfg["scheduler"]["name"], "kv": cfg["kv"]["name"], "workload": cfg["workload"].get("name"),
            "prompt_mean": cfg["workload"]["prompt"]["mean"], "output_mean": cfg["workload"]["output"]["mean"],
            "clients": _clients(metrics), "repeats": cfg.get("repeats", 1), "run_dir": metrics.get("run_dir"),
            **{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}}


def columns(runs: Sequence[Mapping]) -> list[str]:
    """The table's columns: COLUMNS, then the effective throughputs of the runs' SLAs (units in the header)."""
    effective = sorted({k for m in runs for k in m if re.fullmatch(r"effective_throughput_g[\dp]+", k)},
                       key=lambda k: float(k.rsplit("_g", 1)[1].replace("p", ".")))
    return COLUMNS + effective


def write_table(runs: Sequence[Mapping], out: Path) -> Path:
    """table.csv and table.md in `out` (throughputs in requests/s or tokens/s, latencies in seconds)."""
    cols = columns(runs)
    rows = [table_row(m) for m in runs]
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols + ["run_dir"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    (out / "table.md").write_text(markdown_table(cols, [[fmt(r.get(c)) for c in cols] for r in rows]))
    return out / "table.md"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]) + "\n"


# ---------------------------------------------------------------------------- series and points

def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def series(runs: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    """Runs grouped into lines: one per configuration (everything but clients and seeds), labelled with the
    settings that tell the lines apart (the scheduler's name first)."""
    groups: dict[tuple, list[Mapping]] = defaultdict(list)
    for m in runs:
        key = tuple(sorted((k, v) for k, v in flatten(m["config"]).items() if k not in NOT_A_SERIES))
        groups[key].append(m)
    flats = [dict(k) for k in groups]
    varying = sorted({k for f in flats for k in f if len({g.get(k) for g in flats}) > 1})
    labels = []
    for f in flats:
        parts = [str(f.get("scheduler.name"))]
        parts += [str(f[f"{p}.name"]) for p in PARTS[1:] if f"{p}.name" in varying]
        for k in varying:
            group = k.split(".")[0]
            if group in PARTS and (k == f"{group}.name" or len({g.get(k) for g in flats if
                                                                g.get(f"{group}.name") == f.get(f"{group}.name")}) < 2):
                continue            # a part's knob: only when it differs between lines of the same part
            parts.append(f"{k.split('.', 1)[1] if group in PARTS else k}={f.get(k)}")
        labels.append(", ".join(parts))
    return dict(zip(labels, groups.values()))


def samples(metrics: Mapping) -> list[Mapping]:
    """The individual runs behind one metrics.json: its `runs` (repeats=N) or itself."""
    return metrics.get("runs") or [metrics]


def points(runs: Sequence[Mapping], x: str, y: str) -> list[dict]:
    """One point per client count: mean and standard deviation of x and y over every run at that count."""
    by_clients: dict[int, list[Mapping]] = defaultdict(list)
    for m in runs:
        by_clients[_clients(m)] += samples(m)
    out = []
    for clients, ms in sorted(by_clients.items()):
        values = [(m.get(x, clients) if x == "clients" else m.get(x), m.get(y)) for m in ms]
        values = np.array([v for v in values if v[0] is not None and v[1] is not None], dtype=float)
        if len(values):
            out.append({"clients": clients, "n": len(values), "x": values[:, 0].mean(), "y": values[:, 1].mean(),
                        "x_std": values[:, 0].std(ddof=1) if len(values) > 1 else 0.0,
                        "y_std": values[:, 1].std(ddof=1) if len(values) > 1 else 0.0})
    return out


def draw_curve(ax, runs: Sequence[Mapping], x: str, y: str, label: str, annotate: bool = True) -> list[dict]:
    """One line of `runs` on `ax`: points ordered by x, +-1 std error bars where a point has several runs, and
    each point labelled with its client count."""
    pts = sorted(points(runs, x, y), key=lambda p: p["x"])
    if not pts:
        return pts
    xs, ys = [p["x"] for p in pts], [p["y"] for p in pts]
    repeated = any(p["n"] > 1 for p in pts)
    line = ax.errorbar(xs, ys, xerr=[p["x_std"] for p in pts] if repeated and x != "clients" else None,
                       yerr=[p["y_std"] for p in pts] if repeated else None, marker="o", markersize=4, capsize=3,
                       label=label)
    if annotate:
        for p in pts:
            ax.annotate(str(p["clients"]), (p["x"], p["y"]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=line[0].get_color())
    return pts


def shared_title(runs: Sequence[Mapping], *extra: str) -> str:
    """What every run shares (model, workload, hardware, executor), on two lines, then `extra` lines."""
    described = [describe(m["config"], clients=False) for m in runs]
    first = described[0]
    s = {k: first[k] if all(d[k] == first[k] for d in described) else "(varies: see legend)"
         for k in ("model", "workload", "hardware", "executor")}
    return "\n".join([f"{s['model']} on {s['hardware']}, {s['executor']}", f"workload {s['workload']}", *extra])


def error_bar_note(runs: Sequence[Mapping]) -> str:
    counts = sorted({len(samples(m)) for m in runs})
    return "" if counts == [1] else f"error bars: +-1 std over {'/'.join(map(str, counts))} runs per point"


def interpolate(xs, ys, at: float) -> float | None:
    """y at x = `at` along the curve (x sorted ascending), None outside the measured range."""
    order = np.argsort(xs)
    xs, ys = np.asarray(xs, dtype=float)[order], np.asarray(ys, dtype=float)[order]
    if not len(xs) or at < xs[0] or at > xs[-1]:
        return None
    return float(np.interp(at, xs, ys))


def spread(runs: list[dict], key: str) -> list[float]:
    """The standard deviation of `key` over each point's repeats (0 for a single run): bar charts' error bars."""
    return [float(np.std([r[key] for r in samples(m)], ddof=1)) if len(samples(m)) > 1 else 0.0 for m in runs]


def subplots(n: int, **kw):
    """A row of n axes of the figures' size, drawn off-screen (Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False, **kw)


def plot(runs: Sequence[Mapping], out: Path, latency: str = "e2e_s_mean", g: Optional[float] = None) -> list[Path]:
    """throughput_latency.png and effective_throughput.png in `out`; `g`: the SLA generation rate of the second
    (default: the middle one of the first run's SLA)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sla = SLAConfig(**runs[0]["config"]["sla"])
    rates = sla.gen_tokens_per_s
    g = rates[len(rates) // 2] if g is None else g
    effective = f"effective_throughput_{g_suffix(g)}"
    slas = {SLAConfig(**m["config"]["sla"]).describe() for m in runs}
    note = error_bar_note(runs)
    figures = []
    for name, x, y, extra in [
            ("throughput_latency.png", "request_throughput", latency, ["point labels: clients"]),
            ("effective_throughput.png", "clients", effective,
             [s.replace("; EMA", ";\nEMA") for s in sorted(slas)] if len(slas) == 1 else ["SLA: see legend"])]:
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        for label, line in sorted(series(runs).items()):
            draw_curve(ax, line, x, y, label, annotate=x != "clients")
        ax.set_title(shared_title(runs, *extra, *([note] if note else [])), fontsize=8)
        ax.set_xlabel(axis_label(x))
        ax.set_ylabel(axis_label(y))
        if x == "clients":
            ax.set_xticks(sorted({_clients(m) for m in runs}))
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        figures.append(out / name)
    return figures


def summarize_sweep(sweep_dir: str | Path, latency: str = "e2e_s_mean", g: Optional[float] = None) -> list[Path]:
    """The table and both figures of a sweep, written into it; prints the table and where it all went."""
    out = Path(sweep_dir)
    runs = gather(out)
    table = write_table(runs, out)
    figures = plot(runs, out, latency, g)
    print(table.read_text())
    print(f"sweep of {len(runs)} runs: {out.resolve()}\n  wrote {table.name}, table.csv, "
          f"{', '.join(f.name for f in figures)}")
    return [table, *figures]


class SweepSummary(Callback):
    """Hydra callback (conf/config.yaml): when `run.py -m` ends, the sweep's table and figures."""

    def on_multirun_end(self, config, **kwargs) -> None:
        try:
            summarize_sweep(config.hydra.sweep.dir)
        except FileNotFoundError as e:      # every job failed: Hydra has reported why
            print(f"no sweep table: {e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--latency", default="e2e_s_mean", help="latency metric on the y axis")
    parser.add_argument("--g", type=float, help="SLA generation rate (tok/s) of the effective-throughput figure; "
                                                "default: the middle one of the runs' SLA")
    args = parser.parse_args(argv)
    summarize_sweep(args.sweep_dir, args.latency, args.g)


if __name__ == "__main__":
    main()
