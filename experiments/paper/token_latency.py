"""Figure: per-token generation latency percentiles (P50, P90, P95) at 16 clients, Llama-2 70B on 4xA100,
prompt/generation 2600/128, measured as the paper's scripts do (fastgen.metrics.token_latency_percentiles).

    python experiments/paper/token_latency.py [--quick]
"""
from __future__ import annotations

import numpy as np

from common import LABELS, LLAMA_70B_4XA100, SCHEDULERS, WORKLOADS, fmt, markdown, mode_note, parser, run_point, \
    save, spread, subplots, title

PERCENTILES = (50, 90, 95)
CLIENTS, QUICK_CLIENTS = 16, 4
PAPER_P95_RATIO = 3.7


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__, "token_latency").parse_args(argv)
    prompt, gen = WORKLOADS["2600/128"]
    clients = QUICK_CLIENTS if args.quick else CLIENTS
    runs = {s: run_point(args, LLAMA_70B_4XA100, s, prompt, gen, clients) for s in SCHEDULERS}
    value = {s: [runs[s][f"token_latency_s_p{p}"] for p in PERCENTILES] for s in SCHEDULERS}
    fig, axes = subplots(1)
    ax, width = axes[0][0], 0.38
    for i, s in enumerate(SCHEDULERS):
        errors = [spread([runs[s]], f"token_latency_s_p{p}")[0] for p in PERCENTILES]
        ax.bar(np.arange(len(PERCENTILES)) + (i - 0.5) * width, value[s], width, label=LABELS[s],
               yerr=errors if any(errors) else None, capsize=3)
    ax.set(xticks=range(len(PERCENTILES)), xticklabels=[f"P{p}" for p in PERCENTILES],
           xlabel="percentile of the gaps between a request's tokens", ylabel="token latency (s)")
    ax.set_title(title(LLAMA_70B_4XA100, list(runs.values()),
                       f"prompt {prompt} / generation {gen} tokens, {clients} clients, closed loop"), fontsize=8)
    ax.legend(fontsize=7)
    rows = []
    for k, p in enumerate(PERCENTILES):
        s, c = value["splitfuse"][k], value["continuous"][k]
        rows.append([f"P{p}", fmt(s, ".3f"), fmt(c, ".3f"), fmt(c / s if s else None) + "x",
                     f"{PAPER_P95_RATIO}x" if p == 95 else "-"])
    header = ["percentile", "splitfuse (s)", "continuous (s)", "continuous / splitfuse", "paper vLLM / FastGen"]
    save(args, "token_latency", "# Token latency percentiles\n\n"
         + markdown(header, rows, [mode_note(args, list(runs.values()))]), {"token_latency": fig})


if __name__ == "__main__":
    main()
