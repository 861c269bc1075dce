"""Figure: effective throughput vs clients under the paper's chat SLA (first token within prompt_tokens / 512 s;
the EMA, span 16, of inter-token gaps below 1/4 s), Llama-2 70B on 4xA100, prompt/generation 1200/60 and 2600/60.

    python experiments/paper/effective_throughput.py [--quick]

Effective throughput = request throughput x the fraction of requests meeting the SLA (fastgen.metrics, the
defaults of `sla`: 512 prompt tokens/s, 4 generation tokens/s, span 16). The table gives each scheduler's best
point over the client counts and its SLA miss rate there.
"""
from __future__ import annotations

from common import (CLIENTS, LABELS, LLAMA_70B_4XA100, QUICK_CLIENTS, SCHEDULERS, WORKLOADS, Point, curve, fmt,
                    markdown, mode_note, parser, ratio, run_points, save, subplots, title)

from fastgen.analysis import describe

PAPER = {"2600/60": {"splitfuse": ("1.42", "<1%"), "vllm-0.2": ("0.63", "~28%")}}
PAPER_RATIO = {"2600/60": "2.3x"}
KEY = "effective_throughput_g4"


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__, "effective_throughput").parse_args(argv)
    clients = QUICK_CLIENTS if args.quick else CLIENTS
    dep, workloads = LLAMA_70B_4XA100, ("1200/60", "2600/60")
    grid = [Point(dep, s, *WORKLOADS[w], c) for w in workloads for s in SCHEDULERS for c in clients]
    metrics = dict(zip(grid, run_points(args, grid)))
    rows = []
    fig, axes = subplots(2)
    for ax, wname in zip(axes[0], workloads):
        prompt, gen = WORKLOADS[wname]
        best, line = {}, []
        for s in SCHEDULERS:
            points = [metrics[Point(dep, s, prompt, gen, c)] for c in clients]
            line += points
            curve(ax, points, "clients", KEY, LABELS[s])
            best[s] = max(points, key=lambda m: m[KEY])
        sla = describe(line[0]["config"])["sla"].replace("; EMA", ";\nEMA")
        ax.set_title(title(dep, line, f"prompt {prompt} / generation {gen} tokens, closed loop", sla), fontsize=8)
        ax.set_xticks(clients)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        for s in SCHEDULERS:
            m, paper = best[s], PAPER.get(wname, {}).get(s, ("-", "-"))
            rows.append([wname, s, fmt(m[KEY]), ratio(best["splitfuse"][KEY], m[KEY]),
                         m["config"]["workload"]["clients"], f"{1 - m['sla_frac_g4']:.0%}", *paper,
                         PAPER_RATIO.get(wname, "-") if s == "vllm-0.2" else "-"])
    header = ["prompt/gen", "scheduler", "effective qps (best)", "splitfuse / this", "clients there", "SLA miss",
              "paper qps", "paper SLA miss", "paper FastGen / vLLM"]
    save(args, "effective_throughput", "# Effective throughput (best over clients)\n\n"
         + markdown(header, rows, [mode_note(args, list(metrics.values()))]), {"effective_throughput": fig})


if __name__ == "__main__":
    main()
