"""Disaggregated prefill/decode vs SplitFuse co-located on the same GPUs, simulated at paper scale; the simulator's
KV-transfer link against Vidur's measured send/recv rows; a small real run on this CPU.

    python experiments/disaggregation.py                     # all parts -> experiments/results/disaggregation/
    python experiments/disaggregation.py --parts link real   # the link fit and the CPU run only (seconds)
    python experiments/disaggregation.py --parts sim --setups 13b-a100 --workloads azure-conv   # one slice

sim: for each setup (model, GPU, tensor parallelism per instance) and workload (Azure conversation and code
traces' lengths, arXiv summarization lengths, Poisson arrivals), SplitFuse co-located on N instances (round-robin)
against disaggregated P:D pools (1:1, 1:2, 2:1, 1:3) on the same N = P + D instances, the latter over NVLink (the
fit to measured send/recv) and over the datasheet's inter-node InfiniBand; at three offered loads per GPU. Every
request carries the workload's SLO (TTFT, TPOT; DistServe's two targets) and `goodput` counts the SLO-meeting
requests per second; `max load at 90%` is DistServe's goodput: the highest offered load per GPU whose SLO
attainment is at least 90%. Each case runs run.py's benchmark (fastgen.bench.run_benchmark); runs are kept in
runs/ (--reuse skips those already there).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # run from a checkout without installing fastgen

from fastgen.analysis import markdown_table  # noqa: E402
from fastgen.bench import run_or_reuse  # noqa: E402
from fastgen.machine import uptime  # noqa: E402

# (model, GPU, tensor parallelism of one instance, offered requests/s per GPU at load x1 for each workload)
SETUPS = {"13b-a100": (["model.source=llama-2-13b", "hardware=a100-80gb"], 1),
          "70b-h100": (["model.source=llama-2-70b", "hardware=h100-80gb", "hardware.tensor_parallel=4"], 4)}
BASE_RATE = {"13b-a100": {"azure-conv": 1.0, "azure-code": 1.0, "arxiv": 0.5},
             "70b-h100": {"azure-conv": 0.5, "azure-code": 0.5, "arxiv": 0.25}}
# Each workload's SLO (ttft_s, tpot_s): TTFT about 5x a lone request's prompt time at the workload's mean prompt
# (conversation ~1k, code ~2k, arXiv ~2.6k tokens), TPOT about 2.5x a lone decode step (~22 ms on both setups).
SLOS = {"azure-conv": (0.5, 0.06), "azure-code": (1.0, 0.06), "arxiv": (1.5, 0.06)}
WORKLOADS = {"azure-conv": ["workload=azure-conv"], "azure-code": ["workload=azure-code"], "arxiv": ["workload=arxiv"]}
RATIOS = [(1, 1), (1, 2), (2, 1), (1, 3)]
LINKS = ["nvlink", "internode"]
LOADS = [1.0, 2.0, 3.0]
COMMON = ["executor=simulated", "scheduler=splitfuse", "workload.arrival=poisson", "workload.too_long=clip",
          "progress=false"]
PREFILL_BUDGET = 4096                   # the prefill pool runs whole prompts (DistServe's prefill instances)
METRICS = {"slo_attainment": "SLO met", "goodput": "goodput req/s", "request_throughput": "req/s",
           "ttft_s_p99": "TTFT P99 s", "tpot_s_p99": "TPOT P99 s", "kv_transfer_s": "KV move s",
           "decode_wait_s_mean": "decode wait s", "busy_frac_prefill": "busy P", "busy_frac_decode": "busy D"}


def cases(instances: int, budgets: list[int]) -> dict[str, list[str]]:
    """SplitFuse co-located on `instances`, and each P:D split of them over each link, for each prefill budget."""
    out = {f"splitfuse x{instances}": [f"replicas={instances}"] if instances > 1 else []}
    for p, d in RATIOS:
        if p + d == instances:
            for link in LINKS:
                for budget in budgets:
                    name = f"disagg {p}:{d} {link}" + ("" if budget == PREFILL_BUDGET else f" budget {budget}")
                    out[name] = ["deployment=disaggregated", f"deployment.prefill_replicas={p}",
                                 f"deployment.decode_replicas={d}",
                                 f"+deployment.prefill_scheduler.token_budget={budget}", f"deployment.link={link}"]
    return out


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def figure(curves: dict, path: Path) -> None:
    """SLO attainment against offered load per GPU: one panel per (setup, workload), one line per deployment."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = sorted({(setup, workload) for setup, workload, _ in curves})
    fig, axes = plt.subplots(2, -(-len(panels) // 2), figsize=(4.5 * -(-len(panels) // 2), 7.2), squeeze=False)
    shapes = sorted({case.replace(" nvlink", "").replace(" internode", "") for _, _, case in curves})
    colors = dict(zip(shapes, plt.get_cmap("tab10").colors))
    for ax, (setup, workload) in zip(axes.flat, panels):
        for (s, w, case), points in curves.items():
            if (s, w) == (setup, workload):
                x, y = zip(*points)
                ax.plot(x, y, marker="o", color=colors[case.replace(" nvlink", "").replace(" internode", "")],
                        linestyle="-" if "splitfuse" in case else "--" if "nvlink" in case else ":", label=case)
        ax.axhline(0.9, color="grey", linewidth=0.8)
        ax.set(title=f"{setup}, {workload}", xlabel="offered load (req/s per GPU)", ylabel="SLO attainment",
               ylim=(0, 1.02))
    axes.flat[0].legend(fontsize=6, loc="lower left")
    fig.suptitle("solid: SplitFuse co-located; dashed: disaggregated over NVLink; dotted: over InfiniBand")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def sim(args, out: Path) -> str:
    sections, curves = [], {}
    for setup in args.setups:
        overrides, tp = SETUPS[setup]
        for workload in args.workloads:
            ttft, tpot = SLOS[workload]
            slo = [f"workload.classes=[{{name: all, share: 1.0, slo: {{ttft_s: {ttft}, tpot_s: {tpot}}}}}]"]
            rows, best = [], {}
            for instances in sorted({p + d for p, d in RATIOS}):
                gpus = instances * tp
                for case, extra in cases(instances, args.prefill_budgets).items():
                    for load in args.loads:
                        per_gpu = BASE_RATE[setup][workload] * load
                        run = [*COMMON, *overrides, *WORKLOADS[workload], *slo, *extra,
                               f"workload.num_requests={args.num_requests}", f"workload.rate={per_gpu * gpus}"]
                        m = run_or_reuse(run, out / "runs" / setup / workload / f"{case.replace(' ', '_')}-x{load:g}",
                                         args.reuse)
                        rows.append([gpus, case, f"{per_gpu:.3g}", *(fmt(m.get(k)) for k in METRICS)])
                        curves.setdefault((setup, workload, case), []).append((per_gpu, m.get("slo_attainment") or 0))
                        if (m.get("slo_attainment") or 0) >= 0.9:
                            best[(gpus, case)] = max(best.get((gpus, case), 0.0), per_gpu)
                        print(setup, workload, rows[-1], flush=True)
            table = markdown_table(["GPUs", "deployment", "load req/s/GPU", *METRICS.values()], rows)
            deployments = dict.fromkeys((r[0], r[1]) for r in rows)
            goodput = markdown_table(["GPUs", "deployment", "max load at 90% SLO (req/s/GPU)"],
                                     [[g, c, fmt(best.get((g, c)))] for g, c in deployments])
            sections.append(f"### {setup}, {workload}: SLO TTFT <= {ttft} s, TPOT <= {tpot} s\n\n"
                            f"Overrides: `{' '.join(COMMON + overrides + WORKLOADS[workload])}`\n\n{table}\n{goodput}")
    figure(curves, out / "sim.png")
    return "![SLO attainment vs load](sim.png)\n\n" + "\n\n".join(sections)


def link(_args, _out: Path) -> str:
    """The fitted in-node link and the datasheet's inter-node link against the measured send/recv rows."""
    from fastgen.calibration.measured import internode_errors, link_of, send_recv_series
    from fastgen.conf import compose_config
    from fastgen.kv.connector import Link
    from fastgen.sim.cost_model import Profile
    import numpy as np
    rows = []
    for gpu in ("a100-80gb", "h100-80gb"):
        fitted = link_of(Profile.load(gpu))
        errors = [abs(fitted.seconds(r.nbytes) / (r.ms * 1e-3) - 1)
                  for series, test in send_recv_series(gpu) for r, t in zip(series, test) if t]
        rows.append([gpu, "in-node (NVLink), fitted", f"{fitted.latency_s * 1e6:.3g}", f"{fitted.bandwidth_gbs:.4g}",
                     len(errors), f"{np.median(errors):.1%}", f"{max(errors):.1%}", "-"])
        sheet = compose_config([f"hardware={gpu}", "executor=simulated"]).hardware.sim
        datasheet = Link(sheet.internode_latency_us * 1e-6, sheet.internode_bandwidth_gbs)
        e = internode_errors(gpu, datasheet)
        rows.append([gpu, "between nodes, datasheet", f"{sheet.internode_latency_us:g}",
                     f"{sheet.internode_bandwidth_gbs:g}", e["rows"], f"{e['median']:.1%}", f"{e['max']:.1%}",
                     f"{e['measured_gbs_at_16mb_plus']:g}"])
    return ("Link model: latency + bytes / bandwidth. In-node: fitted to every second in-node send/recv size of "
            "Vidur's `{a100,h100}_dgx/send_recv.csv`, errors over the other half (held out). Between nodes: the "
            "datasheet value of conf/hardware/<gpu>.yaml against every measured cross-node row (not fitted).\n\n"
            + markdown_table(["GPU", "link", "latency us", "GB/s", "rows", "median error", "worst error",
                              "measured GB/s (>=16 MB)"], rows))


def real(_args, out: Path) -> str:
    """The embedded model on this CPU: greedy outputs co-located vs disaggregated (engines in this process, and each
    in a process of its own), and the move's cost."""
    import fastgen
    from fastgen.bench import run_benchmark
    from fastgen.conf import compose_config
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The three laws of robotics"]
    disagg = ["deployment=disaggregated", "deployment.decode_replicas=2"]
    cases = {"colocated": [], "disaggregated 1:2 inline": disagg + ["deployment.placement=inline"],
             "disaggregated 1:2 process": disagg + ["deployment.placement=process"]}
    greedy = {}
    for name, extra in cases.items():
        with fastgen.pipeline(overrides=["kv.num_blocks=256", *extra]) as pipe:
            greedy[name] = [o.token_ids for o in pipe(prompts, max_new_tokens=16)]
    same = {name: "identical" if tokens == greedy["colocated"] else "DIFFERENT" for name, tokens in greedy.items()}
    base = ["workload.num_requests=8", "workload.clients=2", "workload.prompt.mean=128", "workload.output.mean=16",
            "kv.num_blocks=256", "progress=false"]
    rows = []
    for name, extra in cases.items():
        m = run_benchmark(compose_config(base + extra), out / "runs" / "real" / "-".join(name.split()[::2]))
        rows.append([name, fmt(m["request_throughput"]), fmt(m["ttft_s_p50"]), fmt(m["tpot_s_p50"]),
                     fmt(m["step_time_s_mean"]), fmt(m.get("kv_transfer_s")), fmt(m.get("kv_transfer_bytes")),
                     fmt(m.get("busy_frac_prefill")), fmt(m.get("busy_frac_decode"))])
    return (f"Greedy outputs of {len(prompts)} prompts x 16 tokens against co-located: disaggregated, 1 prefill + 2 "
            f"decode engines in this process taking turns (inline): {same['disaggregated 1:2 inline']}; each engine "
            f"in a process of its own, stepping at once (process): {same['disaggregated 1:2 process']}.\n\n"
            f"Benchmark overrides: `{' '.join(base)}` (SmolLM2-135M, wall clock, 2 shared cores: the speed is not "
            "the point, the move's cost beside a step's is; with processes each engine gets 2 // 3 -> 1 torch "
            "thread, and three processes share two cores). KV move: read out, carried (process: in shared memory "
            "through this process) and written in, per request. Busy: the share of the run a pool's engines were "
            "stepping (summed over its engines).\n\n"
            + markdown_table(["deployment", "req/s", "TTFT P50 s", "TPOT P50 s", "step mean s", "KV move mean s",
                              "KV bytes moved", "busy prefill", "busy decode"], rows))


PARTS = {"link": ("The KV-transfer link against measured send/recv", link),
         "real": ("The real path on this CPU", real),
         "sim": ("Simulated at paper scale: disaggregated vs SplitFuse co-located", sim)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--loads", nargs="+", type=float, default=LOADS, help="multiples of the base rate per GPU")
    parser.add_argument("--num-requests", type=int, default=150)
    parser.add_argument("--prefill-budgets", nargs="+", type=int, default=[PREFILL_BUDGET],
                        help="the prefill pool's token budgets (SplitFuse co-located keeps its 768)")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "disaggregation")
    parser.add_argument("--reuse", action="store_true", help="keep runs already in --out")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    command = f"python experiments/disaggregation.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    for part in args.parts:
        title, run = PARTS[part]
        before = uptime()
        text = run(args, args.out)
        (args.out / f"{part}.md").write_text(f"# {title}\n\nCommand: `{command}` on {os.cpu_count()} CPU cores.\n\n"
                                             f"uptime before: `{before}`  \nuptime after: `{uptime()}`\n\n{text}\n")
        print(text, flush=True)


if __name__ == "__main__":
    main()
