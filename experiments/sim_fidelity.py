"""How far to trust the simulator: run the same benchmarks for real and simulated, and tabulate the errors.

    python experiments/sim_fidelity.py                                   # 3 schedulers x 2 workloads, CPU profile
    python experiments/sim_fidelity.py --schedulers splitfuse --reuse    # one scheduler; keep earlier real runs
    python experiments/sim_fidelity.py --timer cpu --profile cpu-1thread          # on a busy machine (below)

Every case runs run.py's benchmark twice with the same config, once with executor=real (SmolLM2-135M, float32,
on this CPU) and once with executor=simulated (--profile, the datasheet's `cpu` unless given), and compares request
throughput, P50 TTFT and P50 inter-token latency. Both use the same KV pool (kv.num_blocks), so preemption
happens alike. Results go to --out: fidelity.md, and run.py's files under runs/real/<case>/ and runs/sim/<case>/.
On a machine other processes load, wall times are noise; `--timer cpu` runs single-threaded and times real runs in
process CPU seconds (fastgen.sim.CPUClock), against a profile calibrated the same way
(python -m fastgen.calibration.calibrate hardware=cpu hardware.threads=1 --timer cpu --profile cpu-1thread).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # run from a checkout without installing fastgen

from fastgen.analysis import markdown_table  # noqa: E402
from fastgen.bench import run_or_reuse  # noqa: E402
from fastgen.conf import compose_config  # noqa: E402
from fastgen.sim.clocks import CPUClock  # noqa: E402

# Two CPU-sized shapes of the paper's workload: chat-like and long-prompt; closed loop with warm-ups.
WORKLOADS = {
    "chat": ["workload.num_requests=10", "workload.clients=4", "workload.prompt.mean=128", "workload.prompt.max=512",
             "workload.output.mean=24", "workload.output.max=64"],
    "long-prompt": ["workload.num_requests=6", "workload.clients=3", "workload.prompt.mean=512",
                    "workload.prompt.max=1024", "workload.output.mean=12", "workload.output.max=32"],
}
SCHEDULERS = ["splitfuse", "continuous", "sarathi"]
METRICS = {"request_throughput": "throughput", "ttft_s_p50": "P50 TTFT", "itl_s_p50": "P50 ITL"}


def compare(real: dict, sim: dict) -> dict[str, float]:
    """Relative error of the simulation per metric (sim / real - 1)."""
    return {key: sim[key] / real[key] - 1 for key in METRICS if real.get(key) and sim.get(key) is not None}


def table(rows: list[tuple[str, str, dict, dict]]) -> str:
    header = ["scheduler", "workload"] + [h for n in METRICS.values() for h in (f"{n} real", "sim", "error")]
    cells, worst = [], {key: 0.0 for key in METRICS}
    for scheduler, workload, real, sim in rows:
        errors = compare(real, sim)
        line = [scheduler, workload]
        for key in METRICS:
            line += [f"{real[key]:.4g}", f"{sim[key]:.4g}", f"{errors[key]:+.1%}"]
            worst[key] = max(worst[key], abs(errors[key]))
        cells.append(line)
    cells.append(["**max abs error**", ""] + [c for k in METRICS for c in ("", "", f"**{worst[k]:.1%}**")])
    return markdown_table(header, cells)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs (model, hardware, ...)")
    parser.add_argument("--schedulers", nargs="+", default=SCHEDULERS)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "sim_fidelity")
    parser.add_argument("--reuse", action="store_true", help="keep real runs already in --out (they are slow)")
    parser.add_argument("--num-blocks", type=int, default=256, help="the KV pool of both runs (64-token blocks)")
    parser.add_argument("--profile", help="the simulator's fitted profile (name or .json); default: the datasheet's")
    parser.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                        help="cpu: time real runs in CPU seconds, single-threaded (steady on a shared machine); "
                             "use with a profile calibrated with --timer cpu")
    args = parser.parse_args(argv)

    cpu = ["hardware.threads=1"] if args.timer == "cpu" else []
    common = ["progress=false", "hardware=cpu", *cpu, f"kv.num_blocks={args.num_blocks}", *args.overrides]
    model = tokenizer = None
    rows = []
    for scheduler in args.schedulers:
        for workload in args.workloads:
            case = [*common, f"scheduler={scheduler}", *WORKLOADS[workload]]
            name = f"{scheduler}-{workload}"
            real_dir = args.out / "runs" / "real" / name
            if model is None and not (args.reuse and (real_dir / "metrics.json").exists()):
                from fastgen.models import load_model   # once, shared by every real run
                cfg = compose_config(case)
                model, tokenizer = load_model(cfg.model.source, cfg.hardware.dtype, cfg.hardware.device)
            real = run_or_reuse([*case, "executor=real"], real_dir, args.reuse, model, tokenizer,
                            CPUClock() if args.timer == "cpu" else None)
            profile = [f"hardware.sim.profile={args.profile}"] if args.profile else []
            sim = run_or_reuse([*case, "executor=simulated", *profile], args.out / "runs" / "sim" / name, False, model)
            rows.append((scheduler, workload, real, sim))
    text = table(rows)
    (args.out / "fidelity.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
