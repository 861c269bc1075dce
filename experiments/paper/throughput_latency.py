"""Figure: throughput vs latency of FastGen's splitfuse, the paper's vLLM 0.2 baseline and fastgen's prefill-first
continuous batching (the paper's Llama-2 70B on 4xA100 and 13B on one A100; prompt/generation means 1200/128,
1200/60, 2600/128, 2600/60; 1 to 32 clients, 512 requests).

    python experiments/paper/throughput_latency.py            # full size, simulated (~minutes of CPU)
    python experiments/paper/throughput_latency.py --quick    # CI size

Throughput is requests / (last finish - first arrival); latency is the mean end-to-end request latency. The table
reads each curve at the paper's operating points: throughput at 9 s latency and latency at 1.2 requests/s.
"""
from __future__ import annotations

from common import (CLIENTS, LABELS, LLAMA_13B_A100, LLAMA_70B_4XA100, QUICK_CLIENTS, SCHEDULERS, WORKLOADS, Point,
                    curve, fmt, interpolate, markdown, mode_note, parser, ratio, run_points, save, subplots, title)

PAPER = {LLAMA_70B_4XA100.name: {"1200/128": "1.36 vs 0.67 rps at 9 s (2.0x); 7 vs 14 s at 1.2 rps"}}
PAPER_NOTE = ("Paper: FastGen vs vLLM, Llama-2 70B on 4xA100, 1200/128: 1.36 vs 0.67 rps at 9 s (2.0x), 7 vs 14 s "
              "at 1.2 rps; other workloads and the 13B deployment: the same trends, no numbers.")
LATENCY_S, RATE = 9.0, 1.2
DEPLOYMENTS = (LLAMA_70B_4XA100, LLAMA_13B_A100)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, "throughput_latency")
    p.add_argument("--deployments", nargs="+", choices=[d.model for d in DEPLOYMENTS],
                   default=[d.model for d in DEPLOYMENTS])
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    args = p.parse_args(argv)
    clients = QUICK_CLIENTS if args.quick else CLIENTS
    workloads = {"2600/60": WORKLOADS["2600/60"]} if args.quick else {w: WORKLOADS[w] for w in args.workloads}
    deployments = [d for d in DEPLOYMENTS if d.model in args.deployments]
    grid = [Point(dep, s, prompt, gen, c) for dep in deployments for prompt, gen in workloads.values()
            for s in SCHEDULERS for c in clients]
    metrics = dict(zip(grid, run_points(args, grid)))
    rows, figures = [], {}
    for dep in deployments:
        fig, axes = subplots(len(workloads))
        for ax, (wname, (prompt, gen)) in zip(axes[0], workloads.items()):
            at_latency, at_rate, line = {}, {}, []
            for s in SCHEDULERS:
                points = [metrics[Point(dep, s, prompt, gen, c)] for c in clients]
                line += points
                rps = [m["request_throughput"] for m in points]
                latency = [m["e2e_s_mean"] for m in points]
                curve(ax, points, "request_throughput", "e2e_s_mean", LABELS[s])
                at_latency[s] = interpolate(latency, rps, LATENCY_S)
                at_rate[s] = interpolate(rps, latency, RATE)
            ax.set_title(title(dep, line, f"prompt {prompt} / generation {gen} tokens, closed loop",
                               "point labels: clients"), fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            sf, vl, cb = (at_latency[s] for s in SCHEDULERS)
            rows.append([dep.name, wname, fmt(sf), fmt(vl), fmt(cb), ratio(sf, vl), ratio(sf, cb),
                         *(fmt(at_rate[s], ".1f") for s in SCHEDULERS),
                         PAPER.get(dep.name, {}).get(wname, "-")])
        figures[f"throughput_latency_{dep.model}"] = fig
    header = ["deployment", "prompt/gen", *(f"{s} rps @ {LATENCY_S:g} s" for s in SCHEDULERS),
              "splitfuse / vllm-0.2", "splitfuse / continuous", *(f"{s} s @ {RATE} rps" for s in SCHEDULERS),
              "paper (FastGen vs vLLM)"]
    save(args, "throughput_latency", "# Throughput vs latency\n\n"
         + markdown(header, rows, [mode_note(args, list(metrics.values())), PAPER_NOTE]), figures)


if __name__ == "__main__":
    main()
