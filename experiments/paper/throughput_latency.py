"""Figure: throughput vs latency of splitfuse and continuous batching (the paper's Llama-2 70B on 4xA100 and
13B on one A100; prompt/generation means 1200/128, 1200/60, 2600/128, 2600/60; 1 to 32 clients, 512 requests).

    python experiments/paper/throughput_latency.py            # full size, simulated (~minutes of CPU)
    python experiments/paper/throughput_latency.py --quick    # CI size

Throughput is requests / (last finish - first arrival); latency is the mean end-to-end request latency. The table
reads each curve at the paper's operating points: throughput at 9 s latency and latency at 1.2 requests/s.
"""
from __future__ import annotations

from common import (CLIENTS, LABELS, LLAMA_13B_A100, LLAMA_70B_4XA100, QUICK_CLIENTS, SCHEDULERS, WORKLOADS, curve,
                    fmt, interpolate, markdown, mode_note, parser, run_point, save, subplots, title)

PAPER = {LLAMA_70B_4XA100.name: "1.36 vs 0.67 rps at 9 s; 7 vs 14 s at 1.2 rps (best workload)"}
LATENCY_S, RATE = 9.0, 1.2


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__, "throughput_latency").parse_args(argv)
    clients = QUICK_CLIENTS if args.quick else CLIENTS
    workloads = {"2600/60": WORKLOADS["2600/60"]} if args.quick else WORKLOADS
    runs, rows, figures = [], [], {}
    for dep in (LLAMA_70B_4XA100, LLAMA_13B_A100):
        fig, axes = subplots(len(workloads))
        for ax, (wname, (prompt, gen)) in zip(axes[0], workloads.items()):
            at_latency, at_rate, line = {}, {}, []
            for scheduler in SCHEDULERS:
                points = [run_point(args, dep, scheduler, prompt, gen, c) for c in clients]
                runs += points
                line += points
                rps = [m["request_throughput"] for m in points]
                latency = [m["e2e_s_mean"] for m in points]
                curve(ax, points, "request_throughput", "e2e_s_mean", LABELS[scheduler])
                at_latency[scheduler] = interpolate(latency, rps, LATENCY_S)
                at_rate[scheduler] = interpolate(rps, latency, RATE)
            ax.set_title(title(dep, line, f"prompt {prompt} / generation {gen} tokens, closed loop",
                               "point labels: clients"), fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            ratio = (at_latency["splitfuse"] / at_latency["continuous"]
                     if at_latency["splitfuse"] and at_latency["continuous"] else None)
            rows.append([dep.name, wname, fmt(at_latency["splitfuse"]), fmt(at_latency["continuous"]),
                         fmt(ratio, ".2f") + ("x" if ratio else ""), fmt(at_rate["splitfuse"], ".1f"),
                         fmt(at_rate["continuous"], ".1f"), PAPER.get(dep.name, "same trends (no number)")])
        figures[f"throughput_latency_{dep.model}"] = fig
    header = ["deployment", "prompt/gen", f"splitfuse rps @ {LATENCY_S:g} s", f"continuous rps @ {LATENCY_S:g} s",
              "ratio", f"splitfuse s @ {RATE} rps", f"continuous s @ {RATE} rps", "paper (FastGen vs vLLM)"]
    save(args, "throughput_latency", "# Throughput vs latency\n\n" + markdown(header, rows, [mode_note(args, runs)]),
         figures)


if __name__ == "__main__":
    main()
