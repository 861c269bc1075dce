"""Figure: effective throughput vs clients under the paper's chat SLA (first token within prompt_tokens / 512 s;
the EMA, span 16, of inter-token gaps below 1/4 s), Llama-2 70B on 4xA100, prompt/generation 1200/60 and 2600/60.

    python experiments/paper/effective_throughput.py [--quick]

Effective throughput = request throughput x the fraction of requests meeting the SLA (fastgen.metrics, the
defaults of `sla`: 512 prompt tokens/s, 4 generation tokens/s, span 16). The table gives each scheduler's best
point over the client counts and its SLA miss rate there.
"""
from __future__ import annotations

from common import (CLIENTS, LABELS, LLAMA_70B_4XA100, QUICK_CLIENTS, SCHEDULERS, WORKLOADS, curve, fmt, markdown,
                    mode_note, parser, run_point, save, subplots, title)
from fastgen.analysis import describe

PAPER = {"2600/60": ("1.42", "0.63", "<1%", "~28%")}
KEY = "effective_throughput_g4"


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__, "effective_throughput").parse_args(argv)
    clients = QUICK_CLIENTS if args.quick else CLIENTS
    dep, runs, rows = LLAMA_70B_4XA100, [], []
    fig, axes = subplots(2)
    for ax, wname in zip(axes[0], ("1200/60", "2600/60")):
        prompt, gen = WORKLOADS[wname]
        best, line = {}, []
        for scheduler in SCHEDULERS:
            points = [run_point(args, dep, scheduler, prompt, gen, c) for c in clients]
            runs += points
            line += points
            curve(ax, points, "clients", KEY, LABELS[scheduler])
            best[scheduler] = max(points, key=lambda m: m[KEY])
        sla = describe(line[0]["config"])["sla"].replace("; EMA", ";\nEMA")
        ax.set_title(title(dep, line, f"prompt {prompt} / generation {gen} tokens, closed loop", sla), fontsize=8)
        ax.set_xticks(clients)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        s, c = best["splitfuse"], best["continuous"]
        paper = PAPER.get(wname, ("-", "-", "-", "-"))
        rows.append([wname, fmt(s[KEY]), fmt(c[KEY]), fmt(s[KEY] / c[KEY] if c[KEY] else None) + "x",
                     s["config"]["workload"]["clients"], c["config"]["workload"]["clients"],
                     f"{1 - s['sla_frac_g4']:.0%}", f"{1 - c['sla_frac_g4']:.0%}", *paper])
    header = ["prompt/gen", "splitfuse qps", "continuous qps", "ratio", "splitfuse clients", "continuous clients",
              "splitfuse SLA miss", "continuous SLA miss", "paper FastGen qps", "paper vLLM qps",
              "paper FastGen miss", "paper vLLM miss"]
    save(args, "effective_throughput", "# Effective throughput (best over clients)\n\n"
         + markdown(header, rows, [mode_note(args, runs)]), {"effective_throughput": fig})


if __name__ == "__main__":
    main()
