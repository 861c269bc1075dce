"""Figure: per-token generation latency percentiles (P50, P90, P95) at 16 clients, Llama-2 70B on 4xA100,
prompt/generation 2600/128, measured as the paper's scripts do (fastgen.metrics.token_latency_percentiles).

    python experiments/paper/token_latency.py [--quick]
"""
from __future__ import annotations

import numpy as np

from common import (LABELS, LLAMA_70B_4XA100, SCHEDULERS, WORKLOADS, Point, fmt, markdown, mode_note, parser, ratio,
                    run_points, save, spread, subplots, title)

PERCENTILES = (50, 90, 95)
CLIENTS, QUICK_CLIENTS = 16, 4
PAPER_P95_RATIO = 3.7


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__, "token_latency").parse_args(argv)
    prompt, gen = WORKLOADS["2600/128"]
    clients = QUICK_CLIENTS if args.quick else CLIENTS
    points = [Point(LLAMA_70B_4XA100, s, prompt, gen, clients) for s in SCHEDULERS]
    runs = dict(zip(SCHEDULERS, run_points(args, points)))
    value = {s: [runs[s][f"token_latency_s_p{p}"] for p in PERCENTILES] for s in SCHEDULERS}
    fig, axes = subplots(1)
    ax, width = axes[0][0], 0.8 / len(SCHEDULERS)
    for i, s in enumerate(SCHEDULERS):
        errors = [spread([runs[s]], f"token_latency_s_p{p}")[0] for p in PERCENTILES]
        ax.bar(np.arange(len(PERCENTILES)) + (i - (len(SCHEDULERS) - 1) / 2) * width, value[s], width,
               label=LABELS[s], yerr=errors if any(errors) else None, capsize=3)
    ax.set(xticks=range(len(PERCENTILES)), xticklabels=[f"P{p}" for p in PERCENTILES],
           xlabel="percentile of the gaps between a request's tokens", ylabel="token latency (s)")
    ax.set_title(title(LLAMA_70B_4XA100, list(runs.values()),
                       f"prompt {prompt} / generation {gen} tokens, {clients} clients, closed loop"), fontsize=8)
    ax.legend(fontsize=7)
    rows = []
    for k, p in enumerate(PERCENTILES):
        sf, vl, cb = (value[s][k] for s in SCHEDULERS)
        rows.append([f"P{p}", fmt(sf, ".3f"), fmt(vl, ".3f"), fmt(cb, ".3f"), ratio(vl, sf), ratio(cb, sf),
                     f"{PAPER_P95_RATIO}x" if p == 95 else "-"])
    header = ["percentile", "splitfuse (s)", "vllm-0.2 (s)", "continuous (s)", "vllm-0.2 / splitfuse",
              "continuous / splitfuse", "paper vLLM / FastGen"]
    save(args, "token_latency", "# Token latency percentiles\n\n"
         + markdown(header, rows, [mode_note(args, list(runs.values()))]), {"token_latency": fig})


if __name__ == "__main__":
    main()
