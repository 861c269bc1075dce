"""Gather a Hydra multirun directory into one table and draw the two figures of the paper's method:
throughput vs latency and effective throughput vs the load, one line per configuration. The load is the client
count for closed-loop workloads, and the offered load (requests/s, measured from the arrival times) for open-loop
and trace workloads, whose points are the swept rates and time scales.

    python -m fastgen.analysis multirun/2026-11-24/21-00-00 [--latency e2e_s_p50] [--g 4]
    python -m fastgen.analysis multirun/2026-11-24/21-00-00 --wandb [--group G]  # the table from wandb's runs

`python run.py -m ...` does this itself when the sweep ends (SweepSummary, a Hydra callback in conf/config.yaml).
Figures are titled with what the runs share (model, workload, hardware, executor); lines are labelled with what
differs between them. Runs of one configuration at one client count (`repeats=N` in a job, or jobs that differ
only in their seeds) are one point: the mean, with error bars of +-1 standard deviation. Points timed on a wall
clock while other processes competed for the CPUs (fastgen.machine's noise warning) are drawn hollow.

The table has a column per swept key (each override that differs between the jobs), the workload as sent
(measured mean prompt and output lengths, arrival process, offered rate), the noise each run saw (share of its
time waiting for a CPU, 1-minute load average at its end) and, for repeats, mean +- std and n.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import textwrap
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from hydra.experimental.callback import Callback

from fastgen.metrics import SLAConfig, g_suffix
from fastgen.redact import REDACTED, is_secret, redact_files
from fastgen.tracking import log_summary, sweep_group

WORKLOAD_COLUMNS = ["workload", "arrival", "prompt_mean", "output_mean", "clients", "offered_rate"]
METRIC_COLUMNS = ["num_completed", "request_throughput", "total_token_throughput", "e2e_s_mean", "e2e_s_p50",
                  "ttft_s_p50", "itl_s_p95", "token_latency_s_p95"]
NOISE_COLUMNS = ["cpu_wait_frac", "load_avg_1m", "noisy"]
COLUMNS = ["scheduler", "kv", *WORKLOAD_COLUMNS, "repeats", "n", *METRIC_COLUMNS]
# Config keys that do not make a run a different configuration: the x axis, and what repeats vary.
NOT_A_SERIES = {"workload.clients", "seed", "workload.seed", "repeats", "progress", "workload.name"}
# ... and, for open-loop and trace workloads, what sets the offered load (the x axis there)
LOAD_KEYS = {"workload.rate", "workload.time_scale"}
PARTS = ("scheduler", "kv", "executor")
METRIC_NAMES = {"ttft": "time to first token", "tpot": "time per output token", "itl": "inter-token latency",
                "e2e": "end-to-end latency", "queue": "queueing delay", "token_latency": "token latency",
                "step_time": "step time"}
AXES = {"request_throughput": "throughput (requests/s)", "output_token_throughput": "output throughput (tokens/s)",
        "total_token_throughput": "throughput, prompt + output (tokens/s)", "clients": "concurrent clients",
        "offered_rate": "offered load (requests/s)"}


# ---------------------------------------------------------------------------- describing runs

def describe(config: Mapping[str, Any], clients: bool = True) -> dict[str, str]:
    """Human labels of a run's config (metrics.json's `config`): model, workload, hardware, executor, scheduler,
    kv and SLA; `clients=False` leaves the load (client count, arrival rate, time scale) out of the workload
    (figures plot it)."""
    w, hw, ex = config["workload"], config["hardware"], config["executor"]
    source = str(config["model"]["source"])
    rate = f" at {w['rate']:g} req/s" if clients else ""
    arrival = {"closed_loop": "closed loop" + (f", {w['clients']} client{'s' * (w['clients'] != 1)}" if clients else ""),
               "poisson": f"Poisson arrivals{rate}",
               "gamma": f"gamma arrivals{rate} (burstiness {w['burstiness']:g})",
               "trace": "trace arrival times" + (f" x{w['time_scale']:g}" if w["time_scale"] != 1 and clients else ""),
               "classes": "each class's own arrivals"}[w["arrival"]]
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
        "kv": _part(config["kv"], sized_by_device=ex["name"] == "simulated"),
        "sla": SLAConfig(**config["sla"]).describe() if "sla" in config else "",
    }


def _part(part: Mapping[str, Any], sized_by_device: bool = False) -> str:
    """`name (knob=value, ...)`; `sized_by_device`: the simulated executor sizes the KV pool from the device's
    memory (kv.memory_gb is the real executor's), so memory_gb is not shown, and without num_blocks it says so."""
    skip = {"name", "module"} | ({"memory_gb"} if sized_by_device else set())
    knobs = [f"{k}={v}" for k, v in part.items() if k not in skip and not isinstance(v, dict)]
    if sized_by_device and part.get("num_blocks") is None:
        knobs = [k for k in knobs if not k.startswith("num_blocks=")] + ["pool sized from device memory"]
    return f"{part['name']} ({', '.join(knobs)})" if knobs else part["name"]


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


def gather_wandb(root: str | Path, group: Optional[str] = None) -> list[dict]:
    """The runs logged to wandb under `root` (offline run directories, read without an account or the network;
    `group`: only that group's), as gather's metrics: each run's summary and its config (the summary runs left
    out). Repeats come back as runs of their own, told apart by their seed."""
    from fastgen.wandb_offline import find_runs

    runs = []
    for r in find_runs(root):
        if r.job_type == "summary" or (group and r.group != group):
            continue
        metrics = {k: v for k, v in r.summary.items() if not k.startswith("_") and not isinstance(v, dict)}
        runs.append({**metrics, "config": {k: v for k, v in r.config.items() if k != "diff"},
                     "overrides": r.config.get("diff"), "machine": r.summary.get("machine"),
                     "wandb_group": r.group, "wandb_name": r.name})
    if not runs:
        raise FileNotFoundError(f"no wandb run{f' of group {group}' if group else ''} under {root}")
    return sorted(runs, key=lambda m: (m["config"]["scheduler"]["name"], m["config"]["kv"]["name"], _clients(m)))


def _clients(metrics: Mapping) -> int:
    return metrics["config"]["workload"]["clients"]


def is_open_loop(metrics: Mapping) -> bool:
    return metrics["config"]["workload"]["arrival"] != "closed_loop"


def overrides(metrics: Mapping) -> Optional[dict[str, str]]:
    """The job's command-line overrides (Hydra's .hydra/overrides.yaml beside its metrics.json), key -> value
    (`scheduler=splitfuse` -> {"scheduler": "splitfuse"}), or for a run read back from wandb the `diff` it logged;
    None where the run has none (not run by run.py)."""
    if metrics.get("overrides") is not None:
        return metrics["overrides"]
    path = Path(metrics.get("run_dir") or "") / ".hydra" / "overrides.yaml"
    if not metrics.get("run_dir") or not path.is_file():
        return None
    from omegaconf import OmegaConf
    return override_dict(OmegaConf.to_container(OmegaConf.load(path)) or [])


def override_dict(items: Sequence[str]) -> dict[str, str]:
    """Overrides as key -> value: `+`/`~` dropped, Hydra's own left out, secrets REDACTED."""
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if not key.startswith("hydra"):
            out[key] = REDACTED if is_secret(key) else value
    return out


def differing(jobs: Sequence[Mapping[str, str]]) -> list[str]:
    """The keys whose value differs between the jobs' overrides (or is missing from some), in command-line order."""
    keys = list(dict.fromkeys(k for o in jobs for k in o))
    return [k for k in keys if len({o.get(k) for o in jobs}) > 1]


def sweep_jobs(sweep_dir: str | Path) -> Optional[list[dict[str, str]]]:
    """Every job's overrides of a `run.py -m` sweep, expanded from the sweep's overrides in its multirun.yaml (which
    Hydra writes before the first job, so a job knows what its sweep varies before the later jobs have run); None
    outside a sweep."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return None
    task = OmegaConf.to_container(OmegaConf.load(path).hydra.overrides.task) or []
    choices = [[f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in OverridesParser.create().parse_overrides(task)]
    return [override_dict(job) for job in itertools.product(*choices)]


def swept_keys(runs: Sequence[Mapping]) -> list[str]:
    """The keys that differ between the runs, in command-line order: each override whose value differs between
    the jobs (or is missing from some); without Hydra's overrides, each config value that differs."""
    found = [overrides(m) for m in runs]
    if all(o is not None for o in found):
        return differing(found)
    flats = [flatten(m["config"]) for m in runs]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    return [k for k in keys if len({str(f.get(k)) for f in flats}) > 1 and not k.endswith(".seed")]


def swept_value(metrics: Mapping, key: str) -> Any:
    o = overrides(metrics)
    if o is not None and key in o:
        return o[key]
    value = flatten(metrics["config"]).get(key)
    if value is None and key in metrics["config"] and isinstance(metrics["config"][key], Mapping):
        value = metrics["config"][key].get("name")          # a config group: its option's name
    return REDACTED if is_secret(key) and value is not None else value


def sent(metrics: Mapping) -> dict[str, Any]:
    """The workload as sent: measured mean prompt and output lengths and offered rate (metrics.json's
    workload_* and offered_rate; for older runs, from requests.jsonl; else the config's means)."""
    out = {"prompt_mean": metrics.get("workload_prompt_mean"), "output_mean": metrics.get("workload_output_mean"),
           "offered_rate": metrics.get("offered_rate")}
    path = Path(metrics.get("run_dir") or "") / "requests.jsonl"
    if None in out.values() and metrics.get("run_dir") and path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        by_repeat = defaultdict(list)
        for r in rows:
            by_repeat[r.get("repeat", 0)].append(r)
        rates = []
        for rs in by_repeat.values():
            arrivals = sorted(r["arrival_time"] for r in rs)
            if len(arrivals) > 1 and arrivals[-1] > arrivals[0]:
                rates.append((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]))
        if rows:
            out["prompt_mean"] = out["prompt_mean"] or float(np.mean([r["prompt_tokens"] for r in rows]))
            out["output_mean"] = out["output_mean"] or float(np.mean([len(r["token_times"]) for r in rows]))
            out["offered_rate"] = out["offered_rate"] or (float(np.mean(rates)) if rates else None)
    w = metrics["config"]["workload"]
    out["prompt_mean"] = out["prompt_mean"] if out["prompt_mean"] is not None else w["prompt"]["mean"]
    out["output_mean"] = out["output_mean"] if out["output_mean"] is not None else w["output"]["mean"]
    return out


def noise(metrics: Mapping) -> dict[str, Any]:
    """What competed with the run: the share of its runnable time it waited for a CPU, the 1-minute load average
    at its end, and whether that made its (wall-clock) timings noise. Runs on a virtual clock are never noisy."""
    machine = metrics.get("machine") or {}
    load = machine.get("load_average_end") or [None]
    return {"cpu_wait_frac": machine.get("cpu_wait_frac"), "load_avg_1m": load[0],
            "noisy": bool(machine.get("noise_warning"))}


def is_noisy(metrics: Mapping) -> bool:
    return noise(metrics)["noisy"]


def table_row(metrics: Mapping, swept: Sequence[str] = ()) -> dict:
    cfg = metrics["config"]
    open_loop = is_open_loop(metrics)
    return {"scheduler": cfg["scheduler"]["name"], "kv": cfg["kv"]["name"], "workload": cfg["workload"].get("name"),
            "arrival": cfg["workload"]["arrival"], **sent(metrics),
            "clients": None if open_loop else _clients(metrics), "repeats": cfg.get("repeats", 1),
            "n": len(samples(metrics)), "run_dir": metrics.get("run_dir"),
            **{k: v for k, v in metrics.items() if not isinstance(v, (dict, list)) and k not in ("offered_rate",)},
            **noise(metrics), **{k: swept_value(metrics, k) for k in swept}}


def std_row(metrics: Mapping, cols: Sequence[str]) -> dict[str, Optional[float]]:
    """Each column's standard deviation over a job's repeats (None: a single run or not a number)."""
    runs = samples(metrics)
    out = {}
    for c in cols:
        values = [r.get(c) for r in runs]
        if len(runs) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[c] = float(np.std(values, ddof=1))
    return out


def columns(runs: Sequence[Mapping]) -> list[str]:
    """The table's columns: the swept keys, COLUMNS, the effective throughputs of the runs' SLAs (units in the
    header), then the noise."""
    effective = sorted({k for m in runs for k in m if re.fullmatch(r"effective_throughput_g[\dp]+", k)},
                       key=lambda k: float(k.rsplit("_g", 1)[1].replace("p", ".")))
    swept = [k for k in swept_keys(runs) if k not in COLUMNS]
    return swept + COLUMNS + effective + NOISE_COLUMNS


def write_table(runs: Sequence[Mapping], out: Path) -> Path:
    """table.csv and table.md in `out` (throughputs in requests/s or tokens/s, latencies in seconds). Jobs with
    repeats: mean +- std in table.md, `<column>_std` columns in table.csv."""
    cols = columns(runs)
    swept = [k for k in swept_keys(runs) if k not in COLUMNS]
    rows = [table_row(m, swept) for m in runs]
    stds = [std_row(m, cols) for m in runs]
    std_cols = [f"{c}_std" for c in cols if any(c in s for s in stds)]
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols + std_cols + ["run_dir"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, **{f"{c}_std": v for c, v in s.items()}} for r, s in zip(rows, stds))
    fmt = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    cell = lambda r, s, c: fmt(r.get(c)) + (f" ± {s[c]:.2g}" if c in s else "")  # noqa: E731
    (out / "table.md").write_text(markdown_table(cols, [[cell(r, s, c) for c in cols] for r, s in zip(rows, stds)]))
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
        skip = NOT_A_SERIES | (LOAD_KEYS if is_open_loop(m) else set())
        key = tuple(sorted((k, v) for k, v in flatten(m["config"]).items()
                           if k not in skip and not k.startswith("hardware.sla.")))   # the run's SLA: `sla`
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
    return dict(sorted(zip(labels, groups.values()), key=lambda item: natural_key(item[0])))


def natural_key(label: str) -> list:
    """Sorts labels with their numbers as numbers: token_budget=256 before token_budget=1024."""
    return [(0, float(part), "") if re.fullmatch(r"\d+(\.\d+)?", part) else (1, 0.0, part)
            for part in re.split(r"(\d+(?:\.\d+)?)", label) if part]


def load_of(metrics: Mapping) -> tuple:
    """What sets a run's load, the key of its point: the client count (closed loop), else the offered rate's knobs
    (arrival rate and time scale)."""
    w = metrics["config"]["workload"]
    return (w["arrival"], w.get("rate"), w.get("time_scale")) if is_open_loop(metrics) else (_clients(metrics),)


def load_label(metrics: Mapping) -> str:
    """A point's label: its client count, or its offered rate (requests/s)."""
    if not is_open_loop(metrics):
        return str(_clients(metrics))
    rate = sent(metrics)["offered_rate"]
    return "-" if rate is None else f"{rate:.3g}"


def x_axis(runs: Sequence[Mapping]) -> str:
    """The load axis: clients when every run is closed loop, else the offered load (requests/s)."""
    return "offered_rate" if any(is_open_loop(m) for m in runs) else "clients"


def samples(metrics: Mapping) -> list[Mapping]:
    """The individual runs behind one metrics.json: its `runs` (repeats=N) or itself."""
    return metrics.get("runs") or [metrics]


def points(runs: Sequence[Mapping], x: str, y: str) -> list[dict]:
    """One point per load (client count, or arrival rate and time scale): mean and standard deviation of x and y
    over every run at that load; `noisy` if any of its jobs was; ordered by x."""
    by_load: dict[tuple, list[Mapping]] = defaultdict(list)
    for m in runs:
        by_load[load_of(m)].append(m)
    out = []
    for load, jobs in by_load.items():
        clients = _clients(jobs[0])
        ms = [s for m in jobs for s in samples(m)]
        values = [(clients if x == "clients" else
                   (m.get(x) if m.get(x) is not None else sent(jobs[0])[x]) if x == "offered_rate" else m.get(x),
                   m.get(y)) for m in ms]
        values = np.array([v for v in values if v[0] is not None and v[1] is not None], dtype=float)
        if len(values):
            out.append({"clients": clients, "load": load, "label": load_label(jobs[0]), "n": len(values),
                        "x": values[:, 0].mean(), "y": values[:, 1].mean(),
                        "x_std": values[:, 0].std(ddof=1) if len(values) > 1 else 0.0,
                        "y_std": values[:, 1].std(ddof=1) if len(values) > 1 else 0.0,
                        "noisy": any(is_noisy(m) for m in jobs)})
    return sorted(out, key=lambda p: (p["x"], p["y"]))


def draw_curve(ax, runs: Sequence[Mapping], x: str, y: str, label: str, annotate: bool = True,
               placed: Optional[list] = None) -> list[dict]:
    """One line of `runs` on `ax`: points ordered by x, +-1 std error bars where a point has several runs, noisy
    points hollow, and (`annotate`) each point labelled with its load (client count or offered rate), moved off
    the labels already `placed` (display coordinates, shared between the curves of one figure)."""
    pts = points(runs, x, y)
    if not pts:
        return pts
    xs, ys = [p["x"] for p in pts], [p["y"] for p in pts]
    repeated = any(p["n"] > 1 for p in pts)
    line = ax.errorbar(xs, ys, xerr=[p["x_std"] for p in pts] if repeated and x not in ("clients",) else None,
                       yerr=[p["y_std"] for p in pts] if repeated else None, marker="o", markersize=4, capsize=3,
                       label=label)
    color = line[0].get_color()
    for p in pts:
        p["color"] = color
    noisy = [p for p in pts if p["noisy"]]
    if noisy:       # hollow: drawn over the filled marker in the axes' background colour
        ax.plot([p["x"] for p in noisy], [p["y"] for p in noisy], linestyle="none", marker="o", markersize=6,
                markerfacecolor=ax.get_facecolor(), markeredgecolor=color, zorder=line[0].get_zorder() + 1)
    if annotate:
        placed = [] if placed is None else placed
        for p in pts:
            place_label(ax, p["label"], p["x"], p["y"], color, placed)
    return pts


def _marker_box(ax, x: float, y: float, r: float = 4.0) -> tuple:
    px, py = ax.transData.transform((x, y)) * 72.0 / ax.figure.dpi
    return (px - r, py - r, px + r, py + r)


def place_label(ax, text: str, x: float, y: float, color, placed: list, size: int = 7) -> None:
    """Annotates (x, y) with `text` at the first offset (up-right, then further up, down, left) whose box does not
    overlap a label already `placed` (boxes in points, approximated from the text's length)."""
    fig = ax.figure
    px, py = ax.transData.transform((x, y)) * 72.0 / fig.dpi
    w, h = 0.6 * size * len(text) + 2, size + 2
    for dx, dy in [(5, 5), (5, 5 + h), (5, -5 - h), (-5 - w, 5), (5, 5 + 2 * h), (-5 - w, -5 - h), (5, -5 - 2 * h),
                   (-5 - w, 5 + h)]:
        box = (px + dx, py + dy, px + dx + w, py + dy + h)
        if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
            break
    placed.append(box)
    ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=size, color=color)


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


def noise_note(runs: Sequence[Mapping]) -> str:
    """The figures' note on noisy runs (hollow markers), with the worst CPU wait."""
    noisy = [m for m in runs if is_noisy(m)]
    if not noisy:
        return ""
    waits = [w for m in noisy if (w := noise(m)["cpu_wait_frac"]) is not None]
    worst = f", waiting for a CPU up to {max(waits):.0%} of the time" if waits else ""
    return f"hollow: {len(noisy)} of {len(runs)} runs noisy (other processes competed for the CPUs{worst})"


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
    notes = [textwrap.fill(n, 100) for n in (error_bar_note(runs), noise_note(runs)) if n]   # within the width
    load = x_axis(runs)
    point_labels = "point labels: clients" if load == "clients" else "point labels: offered load (requests/s)"
    figures = []
    for name, x, y, extra in [
            ("throughput_latency.png", "request_throughput", latency, [point_labels]),
            ("effective_throughput.png", load, effective,
             [s.replace("; EMA", ";\nEMA") for s in sorted(slas)] if len(slas) == 1 else ["SLA: see legend"])]:
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        curves = [draw_curve(ax, line, x, y, label, annotate=False) for label, line in series(runs).items()]
        ax.set_title(shared_title(runs, *extra, *notes), fontsize=8)
        ax.set_xlabel(axis_label(x))
        ax.set_ylabel(axis_label(y))
        if x == "clients":
            ax.set_xticks(sorted({_clients(m) for m in runs}))
        if x == load:
            ax.set_ylim(bottom=0)
        else:                               # label the points with their load, once the axes' limits are final
            ax.autoscale_view()
            ax.set_xlim(ax.get_xlim())
            ax.set_ylim(ax.get_ylim())
            placed: list = []
            for p in (p for pts in curves for p in pts):
                placed.append(_marker_box(ax, p["x"], p["y"]))
            for p in (p for pts in curves for p in pts):
                place_label(ax, p["label"], p["x"], p["y"], p["color"], placed)
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
    """Hydra callback (conf/config.yaml): when `run.py -m` ends, the sweep's table and figures (and its
    multirun.yaml rewritten without secrets)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        redact_files(config.hydra.sweep.dir)
        try:
            written = summarize_sweep(config.hydra.sweep.dir)
        except FileNotFoundError as e:      # every job failed: Hydra has reported why
            print(f"no sweep table: {e}")
            return
        logger = config.get("logger")
        if logger is not None and logger.get("name") == "wandb":     # the sweep's summary run, in its group
            sweep_dir = Path(config.hydra.sweep.dir)
            log_summary(logger, logger.get("group") or sweep_group(sweep_dir), sweep_dir, sweep_dir / "table.csv",
                        [p for p in written if p.suffix == ".png"],
                        config={"sweep_dir": str(sweep_dir.resolve()), "diff": swept_keys(gather(sweep_dir))})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--latency", default="e2e_s_mean", help="latency metric on the y axis")
    parser.add_argument("--g", type=float, help="SLA generation rate (tok/s) of the effective-throughput figure; "
                                                "default: the middle one of the runs' SLA")
    parser.add_argument("--wandb", action="store_true",
                        help="rebuild the table from the wandb runs logged under SWEEP_DIR (offline run directories; "
                             "no account or network) into SWEEP_DIR/wandb_table/")
    parser.add_argument("--group", help="--wandb: only this group's runs")
    args = parser.parse_args(argv)
    if args.wandb:
        out = Path(args.sweep_dir) / "wandb_table"
        out.mkdir(exist_ok=True)
        table = write_table(gather_wandb(args.sweep_dir, args.group), out)
        print(table.read_text())
        print(f"wrote {table} and table.csv from the wandb runs under {Path(args.sweep_dir).resolve()}")
        return
    summarize_sweep(args.sweep_dir, args.latency, args.g)


if __name__ == "__main__":
    main()
