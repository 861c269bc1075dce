"""Ablations: a base configuration and each one-factor change of it (optionally the cumulative ladder, the factors
turned over one after the other), run in one process (the model is loaded once and reused, fastgen.bench), with a
factor table of each factor's effect on the chosen metrics (mean ± std over `repeats`) and, with logger=wandb,
every run and the table in one wandb group.

    python -m fastgen.ablate executor=simulated hardware=a100-80gb model.source=llama-2-7b logger=wandb \\
        factors='[scheduler=continuous,kv.block_size=16,[scheduler.token_budget=256,kv.block_size=32]]' \\
        [ladder=true] [repeats=3] [metrics='[request_throughput,e2e_s_mean]'] [out=DIR] [group=NAME]

Every argument that is not one of the ablation's own (`factors`, `ladder`, `metrics`, `out`, `group`, `base`: a
list of overrides, the same as giving them one by one) is an override of the base, as for run.py. A factor is one
override or a list of them (one change that needs several knobs); its overrides replace the base's of the same key,
and a factor that picks a config group (`scheduler=continuous`) drops the base's knobs of that group.
"""
from __future__ import annotations

import csv
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from fastgen.analysis import markdown_table, samples
from fastgen.tracking import WandbRun, log_summary

METRICS = ("request_throughput", "e2e_s_mean", "ttft_s_p50", "token_latency_s_p95")
OWN = ("base", "factors", "ladder", "metrics", "out", "group")


@dataclass
class Variant:
    label: str
    kind: str                           # base | factor | ladder
    overrides: list[str] = field(default_factory=list)    # what it changes of the base


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def combine(base: Sequence[str], change: Sequence[str]) -> list[str]:
    """base with `change` applied: an override of the change replaces the base's of the same key, and one that
    picks a config group (no dot: `scheduler=continuous`) also drops the base's knobs of that group."""
    keys = {_key(o) for o in change}
    groups = {k for k in keys if "." not in k}
    kept = [o for o in base if _key(o) not in keys and _key(o).split(".")[0] not in groups]
    return kept + list(change)


def variants(factors: Sequence[str | Sequence[str]], ladder: bool = False) -> list[Variant]:
    """The base, each factor alone, and (`ladder`) the factors accumulated one after the other."""
    changes = [[f] if isinstance(f, str) else list(f) for f in factors]
    out = [Variant("base", "base")] + [Variant(" ".join(c), "factor", c) for c in changes]
    if ladder:
        acc: list[str] = []
        for c in changes:
            acc = combine(acc, c)
            out.append(Variant("+ " + " ".join(c), "ladder", list(acc)))
    return out


def spread(metrics: dict, key: str) -> tuple[Optional[float], Optional[float]]:
    """A metric's mean and standard deviation over the run's repeats (std None for a single run)."""
    values = [s.get(key) for s in samples(metrics)]
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def factor_table(results: Sequence[tuple[Variant, dict]], keys: Sequence[str]) -> tuple[list[str], list[list]]:
    """One row per variant: each metric's mean (± std over repeats) and its effect against the base's (the
    difference, and as a percentage of the base's value)."""
    base = next(m for v, m in results if v.kind == "base")
    header = ["variant", "kind", "n"] + [c for k in keys for c in (k, f"{k}_std", f"{k}_effect", f"{k}_effect_pct")]
    rows = []
    for v, m in results:
        row: list = [v.label, v.kind, len(samples(m))]
        for k in keys:
            mean, std = spread(m, k)
            ref, _ = spread(base, k)
            effect = None if mean is None or ref is None else mean - ref
            row += [mean, std, effect, None if effect is None or not ref else 100 * effect / ref]
        rows.append(row)
    return header, rows


def markdown(header: list[str], rows: list[list], keys: Sequence[str]) -> str:
    """The factor table for reading: `mean ± std` and `effect (pct)` per metric."""
    fmt = lambda v, spec=".4g": "-" if v is None else format(v, spec)  # noqa: E731
    out_header = ["variant", "kind", "n"] + [c for k in keys for c in (k, f"effect on {k}")]
    out_rows = []
    for row in rows:
        cells = row[:3]
        for i in range(len(keys)):
            mean, std, effect, pct = row[3 + 4 * i:7 + 4 * i]
            cells += [fmt(mean) + (f" ± {std:.2g}" if std is not None else ""),
                      "" if effect is None else f"{effect:+.4g}" + (f" ({pct:+.1f}%)" if pct is not None else "")]
        out_rows.append(cells)
    return markdown_table(out_header, out_rows)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")[:80] or "base"


def run_ablation(base: Sequence[str], factors: Sequence[str | Sequence[str]], ladder: bool = False,
                 metrics: Sequence[str] = METRICS, out: Optional[str | Path] = None, group: Optional[str] = None,
                 measure: Optional[Callable[[Variant, list[str], Path, WandbRun], dict]] = None
                 ) -> list[tuple[Variant, dict]]:
    """Runs every variant (identical ones once) and writes ablation.md and ablation.csv into `out`; returns each
    variant with its metrics. `measure(variant, overrides, run_dir, wandb_run)`: how a variant is measured
    (default: run.py's config with the overrides, benchmarked in this process by fastgen.bench)."""
    from fastgen.conf import compose_config

    out = Path(out or Path("ablations") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    out.mkdir(parents=True, exist_ok=True)
    group = group or f"ablation_{out.resolve().name}"
    measure = measure or _benchmark
    done: dict[tuple, dict] = {}
    results = []
    for i, v in enumerate(variants(factors, ladder)):
        overrides = combine(base, v.overrides)
        key = tuple(sorted(overrides))
        if key not in done:
            run = WandbRun(group=group, name=v.label, job_type=v.kind, diff={_key(o): o.partition("=")[2]
                                                                               for o in v.overrides}, tags=["ablation"])
            done[key] = measure(v, overrides, out / f"{i:02d}-{slug(v.label)}", run)
        results.append((v, done[key]))
    header, rows = factor_table(results, metrics)
    with open(out / "ablation.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    (out / "ablation.md").write_text(markdown(header, rows, metrics))
    cfg = compose_config(list(base))
    if cfg.logger.name == "wandb":
        log_summary(cfg.logger, group, out, out / "ablation.csv", name="factor table",
                    config={"base": list(base), "factors": [v.overrides for v, _ in results if v.kind == "factor"],
                            "metrics": list(metrics)})
    print((out / "ablation.md").read_text())
    print(f"ablation of {len(results)} variants ({len(done)} runs): {out.resolve()}")
    return results


def _benchmark(variant: Variant, overrides: list[str], run_dir: Path, wandb_run: WandbRun) -> dict:
    from fastgen.bench import run_benchmark
    from fastgen.conf import compose_config

    return run_benchmark(compose_config(overrides), run_dir, wandb_run=wandb_run)


def parse(argv: Sequence[str]) -> dict:
    """The command line: the ablation's own keys (YAML values: lists, booleans) and the base's overrides."""
    import yaml

    args: dict = {"base": []}
    for a in argv:
        key, _, value = a.partition("=")
        if key in OWN:
            parsed = yaml.safe_load(value)
            if key == "base":
                args["base"] += list(parsed or [])
            else:
                args[key] = parsed
        else:
            args["base"].append(a)
    if not args.get("factors"):
        raise SystemExit("error: no factors: give factors='[override,...]' (see python -m fastgen.ablate --help)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return
    from fastgen.plugins import PluginError
    args = parse(argv)
    try:
        run_ablation(args["base"], args["factors"], ladder=bool(args.get("ladder")),
                     metrics=args.get("metrics") or METRICS, out=args.get("out"), group=args.get("group"))
    except (PluginError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
