"""Class-aware schedulers against FCFS SplitFuse, simulated at paper scale (Llama-2-7B on one A100-80GB): per-class
SLO attainment, goodput, fairness over tenants, Andes' QoE, on the shipped class workloads.

    python experiments/request_classes.py            # -> experiments/results/request_classes/ (a few minutes)

Each case is run.py's benchmark (fastgen.bench.run_benchmark) on executor=simulated; the loads are set so that FCFS
is overloaded (priority-mix at 40 req/s; two-tenant and azure-two-tenant with their arrival times compressed by
workload.time_scale). A tight-pool case (kv.num_blocks=120) forces preemption, by recompute and by swapping to host
memory (kv.swap_space_gb=8, charged over hardware.sim.host_link_bandwidth_gbs). Writes results.md, results.json,
request_classes.png and, for two-tenant under FCFS and VTC, each tenant's cumulative service (tenant_service_*.png);
then each policy's capacity on priority-mix under per-class SLOs (fastgen.capacity; capacity.json, in results.md).
The runs themselves go to --runs (a temporary folder by default).

The real CPU run through the server (SmolLM2-135M; minutes): start the server with each policy, drive it with
run.py, then tabulate the two runs' per-class TTFT (their requests.jsonl) into cpu_server.md:

    python -m fastgen.serve scheduler=priority scheduler.token_budget=32 port=8031        # then splitfuse
    python run.py target=http target.url=http://127.0.0.1:8031 workload=priority-mix workload.num_requests=60 \
        workload.rate=1.0 hydra.run.dir=<runs>/priority                                   # then <runs>/fcfs
    python experiments/request_classes.py --cpu-runs fcfs=<runs>/fcfs priority=<runs>/priority
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # run from a checkout without installing fastgen

from fastgen.analysis import markdown_table, subplots  # noqa: E402
from fastgen.bench import run_or_reuse  # noqa: E402
from fastgen.machine import uptime  # noqa: E402
from fastgen.metrics import W_INPUT, W_OUTPUT  # noqa: E402

SIM = ["progress=false", "executor=simulated", "hardware=a100-80gb", "model.source=llama-2-7b"]
CASES = {
    "priority-mix": ["workload=priority-mix", "workload.num_requests=300", "workload.rate=40"],
    "priority-mix, 120 KV blocks": ["workload=priority-mix", "workload.num_requests=300", "workload.rate=40",
                                    "kv.num_blocks=120", "kv.swap_space_gb=8"],
    "two-tenant": ["workload=two-tenant", "workload.num_requests=300", "workload.time_scale=0.04"],
    "azure-two-tenant": ["workload=azure-two-tenant", "workload.num_requests=300", "workload.time_scale=0.25"],
}
POLICIES = {"fcfs": ["scheduler=splitfuse"], "priority": ["scheduler=priority"], "edf": ["scheduler=edf"],
            "vtc": ["scheduler=vtc"], "andes": ["scheduler=andes"]}
SWAP = {"priority swap": ["scheduler=priority", "scheduler.preemption_mode=swap"],
        "andes swap": ["scheduler=andes", "scheduler.preemption_mode=swap"]}


CAPACITY = ["workload=priority-mix", "workload.num_requests=600", "capacity.slo.attainment=0.9", "capacity.rate=20",
            "capacity.tolerance=0.1", "capacity.max_probes=8"]


def policies(case: str) -> dict[str, list[str]]:
    return POLICIES | SWAP if "KV blocks" in case else POLICIES


def steps_total(run: Path, key: str) -> int:
    return sum(json.loads(line).get(key, 0) for line in (run / "steps.jsonl").read_text().splitlines())


def row(case: str, policy: str, m: dict, run: Path) -> dict:
    """The case's numbers, and VTC's bound for it: 2 x max(w_input x longest prompt, w_output x KV pool tokens)."""
    classes = sorted(k[len("slo_attainment_"):] for k in m if k.startswith("slo_attainment_"))
    prompts = [json.loads(line)["prompt_tokens"] for line in (run / "requests.jsonl").read_text().splitlines()]
    capacity = json.loads((run / "steps.jsonl").read_text().splitlines()[0])["kv_capacity_tokens"]
    return {"case": case, "policy": policy, "classes": classes,
            **{k: m.get(k) for k in ("slo_attainment", "goodput", "qoe_mean", "fairness_jain", "service_gap_max",
                                     "ttft_s_p99", "request_throughput")},
            **{f"slo_attainment_{c}": m.get(f"slo_attainment_{c}") for c in classes},
            **{f"qoe_mean_{c}": m.get(f"qoe_mean_{c}") for c in classes},
            "preempted": steps_total(run, "num_preempted"), "swapped_blocks": steps_total(run, "num_swapped_blocks"),
            "vtc_bound": 2 * max(W_INPUT * max(prompts), W_OUTPUT * capacity)}


def fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def table(rows: list[dict], base: dict[str, dict]) -> str:
    """`base`: each case's fcfs row (the QoE ratio's denominator)."""
    header = ["case", "policy", "SLO met", "SLO met per class", "goodput req/s", "QoE mean", "QoE per class",
              "QoE / fcfs", "Jain", "service gap max", "TTFT P99 s", "req/s", "preempted", "swapped blocks"]
    cells = [[r["case"], r["policy"], fmt(r["slo_attainment"]),
              " / ".join(f"{c} {fmt(r[f'slo_attainment_{c}'])}" for c in r["classes"]),
              fmt(r["goodput"]), fmt(r["qoe_mean"]), " / ".join(f"{c} {fmt(r[f'qoe_mean_{c}'])}" for c in r["classes"]),
              f"{r['qoe_mean'] / base[r['case']]['qoe_mean']:.2f}x", fmt(r["fairness_jain"]),
              fmt(r["service_gap_max"], 4), fmt(r["ttft_s_p99"]), fmt(r["request_throughput"]), r["preempted"],
              r["swapped_blocks"]] for r in rows]
    return markdown_table(header, cells)


def figure(rows: list[dict], out: Path) -> Path:
    """Per case: each policy's SLO attainment per class and its mean QoE."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = subplots(len(cases), sharey=True)
    for ax, case in zip(axes[0], cases):
        mine = [r for r in rows if r["case"] == case]
        bars = [f"slo_attainment_{c}" for c in mine[0]["classes"]] + ["qoe_mean"]
        width = 0.8 / len(bars)
        for k, key in enumerate(bars):
            ax.bar([i + k * width for i in range(len(mine))], [r[key] or 0 for r in mine], width,
                   label=key.replace("slo_attainment_", "SLO met: ").replace("qoe_mean", "QoE mean"))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(mine))], [r["policy"] for r in mine], rotation=30,
                      fontsize=7)
        ax.set_title(case, fontsize=9)
        ax.set_ylim(0, 1.3)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", ncol=3)
    fig.suptitle("Llama-2-7B on 1x A100-80GB, simulated: SLO attainment per class and Andes' QoE", fontsize=9)
    fig.tight_layout()
    path = out / "request_classes.png"
    fig.savefig(path, dpi=120)
    return path


def capacities(runs: Path) -> list[dict]:
    """Each policy's capacity (fastgen.capacity's search) on priority-mix: the largest rate at which >= 90% of the
    requests meet their own class's SLO; each class's attainment at that rate."""
    from fastgen.capacity import quiet_benchmark, search, write
    from fastgen.conf import compose_config
    out = []
    for policy, extra in POLICIES.items():
        cfg = compose_config([*SIM, *CAPACITY, *extra], config_name="capacity")
        result = search(cfg, runs / "capacity" / policy, quiet_benchmark)
        write(result, cfg, runs / "capacity" / policy)
        at = next((p.metrics for p in result.probes if p.rate == result.capacity), {})
        out.append({"policy": policy, "capacity": result.capacity, "failing": result.failing,
                    "probes": len(result.probes), **{k: v for k, v in at.items() if k.startswith("slo_attainment")}})
    return out


def capacity_table(rows: list[dict]) -> str:
    base = rows[0]["capacity"]
    cells = [[r["policy"], fmt(r["capacity"]), fmt(r["failing"]),
              f"{r['capacity'] / base:.2f}x" if r["capacity"] and base else "-", fmt(r.get("slo_attainment")),
              fmt(r.get("slo_attainment_interactive")), fmt(r.get("slo_attainment_batch")), r["probes"]]
             for r in rows]
    return markdown_table(["policy", "capacity req/s", "fails at req/s", "capacity / fcfs", "SLO met at capacity",
                           "interactive", "batch", "probes"], cells)


def cpu_table(runs: dict[str, Path], thresholds=(0.5, 1.0, 1.5)) -> str:
    """Per policy and class: TTFT median and max, and the share of requests within each TTFT threshold (s)."""
    cells = []
    for policy, run in runs.items():
        traces = [json.loads(line) for line in (run / "requests.jsonl").read_text().splitlines()]
        for c in sorted({t["request_class"] for t in traces}, reverse=True):
            ttft = sorted(t["token_times"][0] - t["arrival_time"] for t in traces if t["request_class"] == c)
            cells.append([policy, c, len(ttft), fmt(ttft[len(ttft) // 2]), fmt(ttft[-1]),
                          *(f"{sum(x <= s for x in ttft) / len(ttft):.0%}" for s in thresholds)])
    return markdown_table(["policy", "class", "requests", "TTFT P50 s", "TTFT max s",
                           *(f"TTFT <= {s:g} s" for s in thresholds)], cells)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "request_classes")
    parser.add_argument("--runs", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="keep runs already in --runs")
    parser.add_argument("--cpu-runs", nargs="+", metavar="POLICY=DIR",
                        help="only tabulate the real CPU runs through the server (see above) into cpu_server.md")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cpu_runs:
        runs = {k: Path(v) for k, v in (x.split("=", 1) for x in args.cpu_runs)}
        text = (f"# priority-mix through the server on this CPU: per-class TTFT\n\nCommands: see "
                f"experiments/request_classes.py's docstring. Wall-clock times; the machine's load (uptime) "
                f"when tabulated: `{uptime()}`\n\n{cpu_table(runs)}\n")
        (args.out / "cpu_server.md").write_text(text)
        print(text)
        return []
    runs = args.runs or Path(tempfile.mkdtemp(prefix="request_classes-"))
    before, rows = uptime(), []
    for case, overrides in CASES.items():
        for policy, extra in policies(case).items():
            run = runs / case.replace(" ", "_").replace(",", "") / policy.replace(" ", "_")
            metrics = run_or_reuse([*SIM, *overrides, *extra], run, args.reuse)
            rows.append(row(case, policy, metrics, run))
            base = {r["case"]: r for r in rows if r["policy"] == "fcfs"}
            print(table(rows[-1:], base).splitlines()[-1], flush=True)
            if case == "two-tenant" and policy in ("fcfs", "vtc"):
                shutil.copy(run / "tenant_service.png", args.out / f"tenant_service_{policy}.png")
    capacity = capacities(runs)
    print(capacity_table(capacity), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    (args.out / "capacity.json").write_text(json.dumps(capacity, indent=1))
    figure(rows, args.out)
    bounds = "\n".join(f"- {r['case']}, {r['policy']}: measured service gap {fmt(r['service_gap_max'], 4)}, VTC's "
                       f"bound {fmt(r['vtc_bound'], 4)}" for r in rows if r["policy"] in ("fcfs", "vtc"))
    cases = "\n".join(f"- {case}: `{' '.join(o)}`" for case, o in CASES.items())
    text = (f"# Request classes: class-aware policies vs FCFS SplitFuse, simulated\n\n"
            f"Command: `python experiments/request_classes.py` (the runs: `{' '.join(SIM)}` plus each case's "
            f"overrides and `scheduler=<policy>`; simulated, so the numbers do not depend on this machine's load).\n\n"
            f"{cases}\n\n{table(rows, base)}\n\nVTC's bound (2 x max(w_input x longest prompt, w_output x the KV "
            f"pool's tokens)) against the measured largest service difference between two backlogged tenants:\n\n"
            f"{bounds}\n\nCapacity per policy on priority-mix (fastgen.capacity: `python -m fastgen.capacity "
            f"{' '.join(SIM + CAPACITY)} scheduler=<policy>`): the largest Poisson rate at which >= 90% of the "
            f"requests meet their own class's SLO (bisected to within 10%, at most 8 probes: no 'fails at' means every "
            f"probed rate met it); per-class attainment at that rate:\n\n"
            f"{capacity_table(capacity)}\n\nuptime before: `{before}`  \nuptime after: `{uptime()}`\n")
    (args.out / "results.md").write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
