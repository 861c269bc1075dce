"""Replica scaling on Ray Serve (SmolLM2 on this machine), measured over HTTP beside the simulator's prediction
(the paper's figure, simulated at Llama-2 70B scale, is experiments/paper/replica_scaling.py).

For each N: `python -m fastgen.serve replicas=N router=round_robin hardware.threads=1` (N=1: the single-process
server, no Ray), then `run.py target=http` against it (the same closed-loop workload for every N), then SIGTERM.
The simulated column is `run.py executor=simulated replicas=N` (fastgen.driver.cluster, the same router) on the same
workload. Writes experiments/results/ray_replica_scaling/{results.md,results.json,replica_scaling.png}.

    python experiments/ray_replica_scaling.py [--replicas 1 2 4] [--requests 32] [--clients 8]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from peers import ROOT, run_py, start_server

from fastgen.machine import available_cpus, cpu_model, uptime
from fastgen.peers.servers import stop

OUT = ROOT / "experiments" / "results" / "ray_replica_scaling"


def serve(n: int, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fastgen.serve", f"replicas={n}", "router=round_robin", "hardware.threads=1",
           f"port={port}", "shutdown_grace_s=5", "max_connections=4096"]
    return start_server(cmd, f"http://127.0.0.1:{port}", log)[0]


def row(m: dict) -> dict:
    return {"request_throughput": m["request_throughput"], "ttft_s_p50": m["ttft_s_p50"],
            "ttft_s_p99": m["ttft_s_p99"], "errors": m["num_requests"] - m["num_completed"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--port", type=int, default=8931)
    args = p.parse_args()
    workload = [f"workload.num_requests={args.requests}", f"workload.clients={args.clients}"]
    OUT.mkdir(parents=True, exist_ok=True)
    results = {"machine": f"{available_cpus()} cores of {cpu_model()}", "workload": workload, "measured": {},
               "simulated": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.replicas:
            before = uptime()
            server = serve(n, args.port, OUT / f"server_{n}.log")
            try:
                m = run_py(["target=http", f"target.url=http://127.0.0.1:{args.port}", *workload],
                           Path(tmp) / f"http_{n}")
            finally:
                stop(server, 120)
            results["measured"][n] = row(m) | {"uptime_before": before, "uptime_after": uptime()}
            print(n, results["measured"][n], flush=True)
            results["simulated"][n] = row(run_py(["executor=simulated", f"replicas={n}", "router=round_robin",
                                                  *workload], Path(tmp) / f"sim_{n}"))
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"Replica scaling, SmolLM2-135M, {results['machine']}, one torch thread per replica, closed loop "
             f"({' '.join(workload)}), router=round_robin. Measured: `run.py target=http` against "
             "`python -m fastgen.serve replicas=N` (N=1: the single-process server). Simulated: `run.py "
             "executor=simulated replicas=N` (hardware=cpu cost model).", "",
             "| replicas | measured req/s | x of 1 | TTFT p50 s | TTFT p99 s | errors | simulated req/s | x of 1 |",
             "|---|---|---|---|---|---|---|---|"]
    base_m, base_s = (results[k][args.replicas[0]]["request_throughput"] for k in ("measured", "simulated"))
    for n in args.replicas:
        m, s = results["measured"][n], results["simulated"][n]
        lines.append(f"| {n} | {m['request_throughput']:.3f} | {m['request_throughput'] / base_m:.2f} | "
                     f"{m['ttft_s_p50']:.2f} | {m['ttft_s_p99']:.2f} | {m['errors']} | "
                     f"{s['request_throughput']:.3f} | {s['request_throughput'] / base_s:.2f} |")
    lines += ["", "Load (uptime) before/after each measured run:", ""]
    lines += [f"- {n}: {results['measured'][n]['uptime_before']} / {results['measured'][n]['uptime_after']}"
              for n in args.replicas]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, args.replicas)


def plot(results: dict, replicas: list[int]) -> None:
    """OUT/replica_scaling.png: measured and simulated throughput relative to one replica, beside linear."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for kind, style in (("measured", "o-"), ("simulated", "s--")):
        rps = [results[kind][n]["request_throughput"] for n in replicas]
        ax.plot(replicas, [r / rps[0] for r in rps], style, label=f"{kind} ({rps[0]:.2f} req/s with {replicas[0]})")
    ax.plot(replicas, [n / replicas[0] for n in replicas], ":", color="grey", label="linear")
    ax.set(xlabel="replicas (one torch thread each)", ylabel=f"throughput / throughput of {replicas[0]}",
           xticks=replicas)
    ax.set_title(f"Replica scaling, SmolLM2-135M, router round_robin\n{results['machine']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "replica_scaling.png", dpi=120)


if __name__ == "__main__":
    main()
