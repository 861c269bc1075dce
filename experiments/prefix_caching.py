"""What prefix caching does to each scheduler: the shared-prefix workload with kv.prefix_caching off and on, for
every policy, on the embedded SmolLM2-135M (this CPU) and simulated at paper scale (Llama-2-70B on 4xA100).

    python experiments/prefix_caching.py                    # both parts -> experiments/results/prefix_caching/
    python experiments/prefix_caching.py --parts sim        # only the simulated part (minutes of CPU): sim.md
    python experiments/prefix_caching.py --timer wall       # real runs timed on the wall clock, all threads

Each case runs run.py's benchmark (fastgen.bench.run_benchmark) and reports request throughput, TTFT P50 / P99,
ITL P50 and the prefix cache's token hit rate; the ratio columns are caching on / off of the same case. The real
part times runs in this process's CPU seconds, single-threaded, by default (--timer cpu, fastgen.sim.CPUClock):
other jobs on a shared machine then do not slow them. `uptime` before and after each part goes into its file (real.md, sim.md).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # run from a checkout without installing fastgen

from fastgen.analysis import markdown_table  # noqa: E402
from fastgen.bench import run_or_reuse  # noqa: E402
from fastgen.conf import compose_config  # noqa: E402
from fastgen.machine import uptime  # noqa: E402
from fastgen.sim.clocks import CPUClock  # noqa: E402

SCHEDULERS = ["splitfuse", "sarathi", "continuous", "orca", "static"]
METRICS = {"request_throughput": "req/s", "ttft_s_p50": "TTFT P50 s", "ttft_s_p99": "TTFT P99 s",
           "itl_s_p50": "ITL P50 s", "prefix_hit_rate_tokens": "hit rate"}
# The CPU-sized shared-prefix workload: 512-token prompts (std 20%) of which share x 512 are a common system prompt.
REAL = ["workload=shared-prefix", "workload.num_requests=16", "workload.clients=4", "workload.prompt.mean=512",
        "workload.prompt.max=1024", "workload.output.mean=24", "workload.output.max=64", "kv.num_blocks=256"]
# The paper's long-prompt shape (2600 / 60, within Llama-2's 4096 context), 16 closed-loop clients, 512 requests.
SIM = ["workload=shared-prefix", "executor=simulated", "hardware=a100-80gb", "hardware.tensor_parallel=4",
       "model.source=llama-2-70b", "workload.num_requests=512", "workload.clients=16", "workload.prompt.mean=2600",
       "workload.prompt.std_frac=0.3", "workload.prompt.max=3840", "workload.output.mean=60", "workload.output.max=256"]


def table(rows: list[tuple[str, str, dict, dict]]) -> str:
    """One row per case: each metric off and on, and on / off for the timing ones."""
    header = ["scheduler", "case"]
    for name in METRICS.values():
        header += [f"{name} off", "on"] + ([] if name == "hit rate" else ["on/off"])
    cells = []
    for scheduler, case, off, on in rows:
        line = [scheduler, case]
        for key, name in METRICS.items():
            a, b = off.get(key), on.get(key)
            line += [fmt(a), fmt(b)] + ([] if name == "hit rate" else [f"{b / a:.2f}x" if a and b else "-"])
        cells.append(line)
    return markdown_table(header, cells)


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def sweep(part: str, base: list[str], cases: dict[str, list[str]], schedulers: list[str], out: Path, reuse: bool,
          model=None, tokenizer=None, clock=None) -> list[tuple[str, str, dict, dict]]:
    rows = []
    for case, extra in cases.items():
        for scheduler in schedulers:
            results = [run_or_reuse(["progress=false", *base, *extra, f"scheduler={scheduler}",
                                     f"kv.prefix_caching={on}"],
                                    out / "runs" / part / f"{scheduler}-{case}-{'on' if on else 'off'}", reuse, model,
                                    tokenizer, clock() if clock else None) for on in (False, True)]
            rows.append((scheduler, case, *results))
            print(table(rows[-1:]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["real", "sim"], choices=["real", "sim"])
    parser.add_argument("--schedulers", nargs="+", default=SCHEDULERS)
    parser.add_argument("--shares", nargs="+", type=float, default=[0.5, 0.9],
                        help="simulated part: prefix.share values")
    parser.add_argument("--real-shares", nargs="+", type=float, default=[0.75], help="real part: prefix.share values")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "prefix_caching")
    parser.add_argument("--reuse", action="store_true", help="keep runs already in --out")
    parser.add_argument("--timer", choices=("wall", "cpu"), default="cpu",
                        help="real part: cpu = single-threaded, timed in process CPU seconds (steady on a shared "
                             "machine); wall = the wall clock and torch's threads")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    title = (f"# Prefix caching: caching off vs on, per scheduler\n\nCommand: `python experiments/prefix_caching.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}` on {os.cpu_count()} CPU cores.\n\n")
    sections = []
    if "real" in args.parts:
        before = uptime()
        from fastgen.models import load_model    # once, shared by every real run
        threads = ["hardware.threads=1"] if args.timer == "cpu" else []
        cfg = compose_config(REAL)
        model, tokenizer = load_model(cfg.model.source, cfg.hardware.dtype, cfg.hardware.device)
        cases = {f"share {s:g}": [f"workload.prefix.share={s}"] for s in args.real_shares}
        rows = sweep("real", [*REAL, *threads], cases, args.schedulers, args.out, args.reuse, model, tokenizer,
                     CPUClock if args.timer == "cpu" else None)
        sections.append(f"## SmolLM2-135M on this CPU ({'1 thread, CPU seconds' if threads else 'wall clock'})\n\n"
                        f"Overrides: `{' '.join(REAL)}`\n\nuptime before: `{before}`  \nuptime after: `{uptime()}`\n\n"
                        + table(rows))
        (args.out / "real.md").write_text(title + sections[-1])
    if "sim" in args.parts:
        before = uptime()
        cases = {f"share {s:g}": [f"workload.prefix.share={s}"] for s in args.shares}
        cases["4 turns"] = ["workload.prefix.share=0.25", "workload.prefix.turns=4", "workload.prompt.mean=800",
                            "workload.warmup=false", "workload.too_long=clip"]
        rows = sweep("sim", SIM, cases, args.schedulers, args.out, args.reuse)
        sections.append(f"## Llama-2-70B on 4xA100-80GB, simulated\n\nOverrides: `{' '.join(SIM)}`; the 4-turn case: "
                        f"`{' '.join(cases['4 turns'])}`\n\nuptime before: `{before}`  \nuptime after: `{uptime()}`\n\n"
                        + table(rows))
        (args.out / "sim.md").write_text(title + sections[-1])
    text = "\n\n".join(sections)
    print(text)
    return text


if __name__ == "__main__":
    main()
