"""Figure: throughput vs number of replicas (Llama-2 70B, 4xA100 per replica, prompt/generation 2600/60).

    python experiments/paper/replica_scaling.py [--quick]

DeepSpeed-MII balances clients over replicas round-robin and replicas share nothing, so N replicas serving N x c
closed-loop clients behave as N copies of one replica serving c: one replica is simulated at c clients per
replica and its throughput scaled by N. The curve is therefore linear by construction; what the simulation adds
is the single-replica throughput under the paper's load.
"""
from __future__ import annotations

from common import LABELS, LLAMA_70B_4XA100, SCHEDULERS, WORKLOADS, fmt, markdown, mode_note, parser, run_point, \
    save, spread, subplots, title

REPLICAS = (1, 2, 4, 8, 16)
PAPER = {1: "1.46", 16: "23.7"}


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, "replica_scaling")
    p.add_argument("--clients-per-replica", type=int, default=16)
    args = p.parse_args(argv)
    prompt, gen = WORKLOADS["2600/60"]
    clients = 4 if args.quick else args.clients_per_replica
    one = {s: run_point(args, LLAMA_70B_4XA100, s, prompt, gen, clients) for s in SCHEDULERS}
    fig, axes = subplots(1)
    ax = axes[0][0]
    for s in SCHEDULERS:
        std = spread([one[s]], "request_throughput")[0]
        ax.errorbar(REPLICAS, [n * one[s]["request_throughput"] for n in REPLICAS], marker="o", label=LABELS[s],
                    yerr=[n * std for n in REPLICAS] if std else None, capsize=3)
    ax.set(xlabel="replicas (4 GPUs each)", ylabel="throughput (requests/s)", xticks=REPLICAS)
    ax.set_title(title(LLAMA_70B_4XA100, list(one.values()), f"per replica: prompt {prompt} / generation {gen}, "
                       f"{clients} clients (closed loop)", "N replicas = N x one replica's throughput"), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    rows = [[n, n * 4, fmt(n * one["splitfuse"]["request_throughput"]),
             fmt(n * one["continuous"]["request_throughput"]), PAPER.get(n, "-")] for n in REPLICAS]
    header = ["replicas", "GPUs", "splitfuse qps", "continuous qps", "paper FastGen qps"]
    save(args, "replica_scaling", "# Replica scaling\n\n"
         + markdown(header, rows, [mode_note(args, list(one.values()))]), {"replica_scaling": fig})


if __name__ == "__main__":
    main()
