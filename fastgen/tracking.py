"""What reaches wandb (`logger=wandb`, offline unless `logger.mode=online`): one run per benchmark run, read from
the files the run already wrote, and a summary run per sweep or ablation, all of one sweep in one wandb group.

wandb is a view of the run's files, never a condition for them: it is imported only here and only when logging
(`logger=none` imports nothing of it), after the files are written, and a wandb failure (an unwritable directory,
a bad entity online) is a warning that names where the files are.
"""
from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from fastgen.redact import redact, redact_override

log = logging.getLogger(__name__)

STEP_KEYS = ("num_tokens", "num_seqs", "num_prefill_tokens", "num_preempted", "num_running", "num_waiting",
             "kv_used_tokens", "kv_reserved_tokens", "duration_s", "schedule_s", "prepare_s", "forward_s", "sample_s")
REQUEST_COLUMNS = ["request_id", "arrival_s", "prompt_tokens", "output_tokens", "ttft_s", "tpot_s", "e2e_s",
                   "queue_s", "finish_reason"]
FILES = ("metrics.json", "requests.jsonl", "steps.jsonl")


@dataclass
class WandbRun:
    """Where a run goes in wandb: its group (a sweep or an ablation), name, job type, extra tags, and `diff`, the
    keys that tell it apart from the other runs of its group (config["diff"])."""
    group: Optional[str] = None
    name: Optional[str] = None
    job_type: Optional[str] = None
    diff: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)


def sweep_group(sweep_dir: str | Path) -> str:
    """A sweep's group name: its directory's last two parts (`multirun/2026-12-07/10-00-00` -> 2026-12-07_10-00-00)."""
    return "_".join(Path(sweep_dir).resolve().parts[-2:])


def run_name(diff: dict[str, Any]) -> str:
    """A name from the keys that differ: `scheduler=splitfuse workload.clients=8` -> splitfuse-clients8 (a config
    group's value alone, a knob's last name part and its value)."""
    return "-".join(str(v) if "." not in k else f"{k.rsplit('.', 1)[1]}{v}" for k, v in diff.items())


def _init(logger, run: WandbRun, config: dict, out: Path, name: Optional[str] = None, job_type: Optional[str] = None):
    import wandb

    argv = sys.argv
    sys.argv = [redact_override(a) for a in argv]       # wandb records the command line in its metadata
    try:
        return wandb.init(project=logger.project, entity=logger.entity, mode=logger.mode, dir=str(out),
                          group=run.group, job_type=job_type or run.job_type, name=name or run.name,
                          tags=list(dict.fromkeys([*logger.tags, *run.tags])), config=config)
    finally:
        sys.argv = argv


def _finish_failed(out: Path, what: str, e: Exception) -> None:
    log.warning(f"warning: wandb logging of {what} failed ({type(e).__name__}: {e}); the run's own files are "
                f"complete in {out.resolve()}")
    try:
        import wandb
        if wandb.run is not None:
            wandb.run.finish(exit_code=1)
    except Exception:          # noqa: BLE001  (wandb is already failing: nothing more to report)
        pass


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def request_row(r: dict) -> dict[str, Any]:
    """A requests.jsonl record as a table row: arrival, TTFT, TPOT, end-to-end and queueing (seconds), tokens, and
    whether it met the SLA at each g (`sla_met_g4`, ...)."""
    times, arrival, finish = r.get("token_times") or [], r["arrival_time"], r.get("finish_time")
    row = {"request_id": r["request_id"], "arrival_s": arrival, "prompt_tokens": r["prompt_tokens"],
           "output_tokens": len(times), "ttft_s": times[0] - arrival if times else None,
           "tpot_s": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None,
           "e2e_s": finish - arrival if finish is not None else None,
           "queue_s": r["first_scheduled_time"] - arrival if r.get("first_scheduled_time") is not None else None,
           "finish_reason": r.get("finish_reason")}
    row |= {f"sla_met_{g}": met for g, met in (r.get("sla_met") or {}).items()}
    return row


def log_run(logger, run: WandbRun, out: str | Path) -> None:
    """The run in `out` (metrics.json, requests.jsonl, steps.jsonl) as wandb runs in `run.group`: one per repeat
    (named `-seed<s>` when there are several), each with config = the resolved, redacted config (its workload's
    seed) plus `diff`, every flat metric of metrics.json as summary, the per-step series, the requests as a
    wandb.Table, and the three files as an artifact."""
    out = Path(out)
    try:
        _log_run(logger, run, out)
    except Exception as e:       # noqa: BLE001  (wandb must never cost the run its result)
        _finish_failed(out, f"run {out}", e)


def _log_run(logger, run: WandbRun, out: Path) -> None:
    import wandb

    metrics = json.loads((out / "metrics.json").read_text())
    requests, steps = _jsonl(out / "requests.jsonl"), _jsonl(out / "steps.jsonl")
    samples = metrics.get("runs") or [metrics]
    for k, sample in enumerate(samples):
        config = redact(json.loads(json.dumps(metrics["config"])))
        config["workload"]["seed"] = seed = config["workload"]["seed"] + k
        config["diff"] = dict(run.diff)
        name = run.name if len(samples) == 1 else f"{run.name}-seed{seed}"
        wb = _init(logger, run, config, out, name=name)
        mine = lambda rows: [r for r in rows if r.get("repeat", 0) == k]  # noqa: E731
        for s in mine(steps):
            cap = s.get("kv_capacity_tokens") or 0
            wb.log({"step/time_s": s["start"], **{f"step/{key}": s[key] for key in STEP_KEYS if key in s},
                    "step/kv_used_frac": s["kv_used_tokens"] / cap if cap else None}, step=s["index"])
        rows = [request_row(r) for r in mine(requests)]
        columns = list(dict.fromkeys([*REQUEST_COLUMNS, *(c for r in rows for c in r)]))
        wb.log({"requests": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})
        wb.summary.update({key: v for key, v in {**metrics, **sample}.items()
                           if key != "runs" and not isinstance(v, (dict, list)) and v is not None})
        wb.summary["machine"] = metrics["machine"]           # the noise the run saw (fastgen.analysis.noise)
        artifact = wandb.Artifact(f"run-files-{wb.id}", type="run-files",
                                  description=f"metrics.json, requests.jsonl, steps.jsonl of {out.resolve()}")
        for f in FILES:
            if (out / f).is_file():
                artifact.add_file(str(out / f))
        wb.log_artifact(artifact)
        wb.finish()


def _number(value: str) -> Any:
    """A table.csv cell as a number where it is one (wandb's tables sort and plot numbers)."""
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value if value != "" else None


def log_summary(logger, group: Optional[str], out: str | Path, table_csv: str | Path,
                images: Sequence[str | Path] = (), name: str = "summary", config: Optional[dict] = None) -> None:
    """A summary run in `group` (job type `summary`): the table (a CSV file) as a wandb.Table and each image."""
    out = Path(out)
    try:
        import wandb

        with open(table_csv, newline="") as f:
            rows = list(csv.reader(f))
        wb = _init(logger, WandbRun(group=group, name=name, job_type="summary"), redact(config or {}), out)
        wb.log({"table": wandb.Table(columns=rows[0], data=[[_number(v) for v in r] for r in rows[1:]]),
                **{Path(p).stem: wandb.Image(str(p)) for p in images}})
        wb.finish()
    except Exception as e:       # noqa: BLE001
        _finish_failed(out, f"the summary of {out}", e)
