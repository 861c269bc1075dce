"""Gather a Hydra multirun directory into one table and draw the two figures of the paper's method:
throughput vs latency (one point per client count) and effective throughput vs clients, one line per scheduler.

    python -m fastgen.analysis multirun/2026-11-24/21-00-00 [--latency e2e_s_p50] [--g 4]
"""
from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

COLUMNS = ["scheduler", "kv", "workload_prompt_mean", "workload_output_mean", "clients", "num_completed",
           "request_throughput", "total_token_throughput", "e2e_s_mean", "e2e_s_p50", "ttft_s_p50", "itl_s_p95",
           "token_latency_s_p95", "effective_throughput_g2", "effective_throughput_g4", "effective_throughput_g6"]


def gather(sweep_dir: str | Path) -> list[dict]:
    rows = []
    for path in sorted(Path(sweep_dir).glob("**/metrics.json")):
        m = json.loads(path.read_text())
        cfg = m["config"]
        rows.append({"scheduler": cfg["scheduler"]["name"], "kv": cfg["kv"]["name"],
                     "workload_prompt_mean": cfg["workload"]["prompt"]["mean"],
                     "workload_output_mean": cfg["workload"]["output"]["mean"],
                     "clients": cfg["workload"]["clients"], "run_dir": str(path.parent),
                     **{k: m.get(k) for k in COLUMNS if k in m}})
    if not rows:
        raise FileNotFoundError(f"no metrics.json under {sweep_dir}; is it a run.py multirun directory?")
    return sorted(rows, key=lambda r: (r["scheduler"], r["kv"], r["clients"]))


def write_table(rows: list[dict], out: Path) -> None:
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    (out / "table.md").write_text(markdown_table(COLUMNS, [[fmt(r.get(c)) for c in COLUMNS] for r in rows]))


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]) + "\n"


def plot(rows: list[dict], out: Path, latency: str = "e2e_s_mean", g: str = "4") -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = defaultdict(list)
    for r in rows:
        lines[f"{r['scheduler']} ({r['kv']})"].append(r)
    figures = []
    for name, x_key, y_key, xlabel, ylabel in [
            ("throughput_latency.png", "request_throughput", latency, "throughput (requests/s)", f"{latency}"),
            ("effective_throughput.png", "clients", f"effective_throughput_g{g}", "clients",
             f"effective throughput at {g} tok/s SLA (requests/s)")]:
        fig, ax = plt.subplots(figsize=(5, 4))
        for label, pts in sorted(lines.items()):
            pts = sorted((p for p in pts if p.get(x_key) is not None and p.get(y_key) is not None),
                         key=lambda p: p["clients"])
            ax.plot([p[x_key] for p in pts], [p[y_key] for p in pts], marker="o", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        figures.append(out / name)
    return figures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--latency", default="e2e_s_mean", help="latency metric on the y axis")
    parser.add_argument("--g", default="4", help="SLA generation rate for the effective-throughput figure")
    args = parser.parse_args(argv)
    rows = gather(args.sweep_dir)
    out = Path(args.sweep_dir)
    write_table(rows, out)
    figures = plot(rows, out, args.latency, args.g)
    print((out / "table.md").read_text())
    print("wrote", out / "table.csv", *figures)


if __name__ == "__main__":
    main()
