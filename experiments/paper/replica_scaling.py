"""Figure: throughput vs number of replicas (Llama-2 70B, 4xA100 per replica, prompt/generation 2600/60), with N
simulated replicas behind each global router: round-robin (DeepSpeed-MII's load balancer), least-outstanding-
requests and random (Vidur's).

    python experiments/paper/replica_scaling.py [--quick]

Each configuration is one simulated cluster (run.py's replicas=N router=...): N engines on their own virtual clocks
behind the router, driven by 16 closed-loop clients per replica sending 256 requests per replica. One replica
needs no router.
"""
from __future__ import annotations

from common import (LABELS, LLAMA_70B_4XA100, SCHEDULERS, WORKLOADS, Point, fmt, markdown, mode_note, parser,
                    run_points, save, spread, subplots, title)

from fastgen.analysis import axis_label

REPLICAS, QUICK_REPLICAS = (1, 2, 4, 8, 16), (1, 2)
ROUTERS = ("round_robin", "least_outstanding", "random")
PAPER = {1: "1.46", 16: "23.7"}
REQUESTS_PER_REPLICA, QUICK_REQUESTS_PER_REPLICA = 256, 8


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, "replica_scaling")
    p.add_argument("--clients-per-replica", type=int, default=16)
    p.add_argument("--schedulers", nargs="+", choices=SCHEDULERS, default=list(SCHEDULERS))
    args = p.parse_args(argv)
    prompt, gen = WORKLOADS["2600/60"]
    per_replica = 2 if args.quick else args.clients_per_replica
    requests = QUICK_REQUESTS_PER_REPLICA if args.quick else REQUESTS_PER_REPLICA
    replicas = QUICK_REPLICAS if args.quick else REPLICAS

    def point(s: str, n: int, router: str) -> Point:
        extra = () if n == 1 else (f"replicas={n}", f"router={router}")
        return Point(LLAMA_70B_4XA100, s, prompt, gen, per_replica * n, extra, requests * n)

    grid = list(dict.fromkeys(point(s, n, r) for s in args.schedulers for r in ROUTERS for n in replicas))
    metrics = dict(zip(grid, run_points(args, grid)))
    runs = {(s, r): [metrics[point(s, n, r)] for n in replicas] for s in args.schedulers for r in ROUTERS}
    qps = {key: [m["request_throughput"] for m in ms] for key, ms in runs.items()}
    fig, axes = subplots(1)
    ax = axes[0][0]
    for (s, r), values in qps.items():
        std = spread(runs[s, r], "request_throughput")
        ax.errorbar(replicas, values, yerr=std if any(std) else None, capsize=3, marker="o", label=f"{LABELS[s]}, {r}",
                    linestyle={"round_robin": "-", "least_outstanding": "--", "random": ":"}[r])
    ax.set(xlabel="replicas (4 GPUs each)", ylabel=axis_label("request_throughput"), xticks=replicas)
    ax.set_title(title(LLAMA_70B_4XA100, list(metrics.values()),
                       f"prompt {prompt} / generation {gen} tokens, {per_replica} closed-loop clients per replica",
                       "N simulated replicas behind each router"), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    rows = [[s, r, *(fmt(v) for v in values), fmt(values[-1] / (replicas[-1] * values[0]), ".0%")]
            for (s, r), values in qps.items()]
    rows.append(["paper FastGen", "round_robin", *(PAPER.get(n, "-") for n in replicas),
                 fmt(float(PAPER[16]) / (16 * float(PAPER[1])), ".0%") if replicas[-1] == 16 else "-"])
    header = ["scheduler", "router", *(f"{n} ({4 * n} GPUs)" for n in replicas),
              f"scaling efficiency at {replicas[-1]}"]
    save(args, "replica_scaling", "# Replica scaling (requests/s)\n\n"
         + markdown(header, rows, [mode_note(args, list(metrics.values())),
                                   f"{per_replica} closed-loop clients and {requests} requests per replica.",
                                   f"Paper (DeepSpeed-FastGen): {PAPER[1]} rps with 1 replica, {PAPER[16]} with 16 "
                                   f"({fmt(float(PAPER[16]) / (16 * float(PAPER[1])), '.0%')} scaling efficiency)."]),
         {"replica_scaling": fig})


if __name__ == "__main__":
    main()
