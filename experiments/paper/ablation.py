"""Ablation: how much of the gap between FastGen (splitfuse) and the paper's vLLM 0.2 baseline each of the
baseline's differences explains (Llama-2 70B on 4xA100, simulated).

    python experiments/paper/ablation.py [--quick] [--wandb]

vllm-0.2 differs from FastGen's configuration in six ways: its steps are all prefill or all decode with whole
prompts (FastGen: mixed steps, prompts split to fill a 768-token budget); its prompts are padded to the longest of
their batch and the pads computed; padding is capped at 256 tokens per step; its prefill budget is 4096 tokens;
its KV block is 16 tokens (FastGen's 64); and 0.2.7 replays decode steps from CUDA graphs. Each row turns one of
them to FastGen's side (or, for CUDA graphs, on), all else as vllm-0.2 runs; the ladder turns them over one after
the other until vllm-0.2 has become FastGen. Every configuration is measured on the paper's three headline figures:

- throughput at 9 s mean latency, prompt/generation 1200/128 (the curve over 4 to 32 clients, as throughput_latency
  without its 1 and 2 clients, the costliest points to simulate, far below 9 s and every configuration's best);
- the best effective throughput over those clients at the 4 tokens/s chat SLA, 2600/60 (as effective_throughput);
- P95 token latency at 16 clients, 2600/128 (as token_latency).

"Share of the gap" is how far a row moves the figure from vllm-0.2's value toward FastGen's, as a fraction of the
whole distance (1 = all of it, negative = away from FastGen).

A last section reads the paper's absolute numbers backwards: the simulator's GPU costs are measured operator times,
its host costs per step are typical values (the profile's step_overhead_s), so it asks how much more host time per
step each system would have needed to serve what the paper reports at 9 s (1.36 and 0.67 rps): the 1200/128 curve
is rerun with step_overhead_s raised by each of EXTRA_STEP_MS (over 1 to 32 clients: with 40 ms more per step even
4 clients wait longer than 9 s) and the paper's rate is read off between them. These are implied figures, not
measurements, and nothing else uses them.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, replace

import numpy as np

from common import (LLAMA_70B_4XA100, QUICK_CLIENTS, WORKLOADS, Point, base_config, fmt, interpolate,
                    markdown, mode_note, parser, ratio, run_points, save, subplots)

from fastgen.ablate import combine
from fastgen.ablate import variants as ablation_variants
from fastgen.sim import Profile

LATENCY_S, TOKEN_CLIENTS, QUICK_TOKEN_CLIENTS = 9.0, 16, 4
CLIENTS = (4, 6, 8, 12, 16, 20, 24, 32)     # common.CLIENTS around the 9 s crossing and every configuration's best


@dataclass(frozen=True)
class Variant:
    label: str
    scheduler: str
    extra: tuple[str, ...] = ()


FASTGEN = Variant("FastGen: splitfuse, budget 768, block 64", "splitfuse")
BASE = ("scheduler=vllm-0.2",)
VLLM = Variant("vllm-0.2 as the paper ran it (budget 4096, block 16, pads <= 256, eager)", "vllm-0.2")
# Each of vllm-0.2's differences turned to FastGen's side, as fastgen.ablate's factors of the base.
FACTORS = {"mixed steps, prompts split (splitfuse at vLLM's budget 4096, block 16)":
           ("scheduler=splitfuse", "scheduler.token_budget=4096", "kv.block_size=16"),
           "no padding (flattened prompts, as vLLM 0.2.0-0.2.1)": ("scheduler.pad_prompts=false",),
           "max_paddings unlimited": ("scheduler.max_paddings=1000000",),
           "budget 768 (FastGen's)": ("scheduler.token_budget=768",),
           "KV block 64 (FastGen's)": ("kv.block_size=64",),
           "CUDA graphs on (vLLM 0.2.7)": ("executor.cuda_graphs=true",)}
# The ladder: these turned over one after the other (fastgen.ablate's ladder) until vllm-0.2 has become FastGen.
LADDER_FACTORS = {"+ no padding": ("scheduler.pad_prompts=false",), "+ KV block 64": ("kv.block_size=64",),
                  "+ budget 768": ("scheduler.token_budget=768",),
                  "+ mixed steps, prompts split = FastGen": ("scheduler=splitfuse",)}


def as_variant(label: str, change: list[str]) -> Variant:
    """The base with `change` applied (fastgen.ablate.combine) as this script's (scheduler, further overrides)."""
    overrides = combine(BASE, change)
    scheduler = next(o.partition("=")[2] for o in overrides if o.startswith("scheduler="))
    return Variant(label, scheduler, tuple(o for o in overrides if not o.startswith("scheduler=")))


ONE_AT_A_TIME = [as_variant(label, v.overrides)
                 for label, v in zip(FACTORS, ablation_variants(list(FACTORS.values()))[1:])]
LADDER = [VLLM, *(as_variant(label, v.overrides) for label, v in
                  zip(LADDER_FACTORS, [v for v in ablation_variants(list(LADDER_FACTORS.values()), ladder=True)
                                       if v.kind == "ladder"]))]
CONTINUOUS = Variant("continuous (prefill-first on fastgen's engine, budget 8192, block 64)", "continuous")
EXTRA_STEP_MS, QUICK_EXTRA_STEP_MS = (0, 10, 20, 30, 40), (0, 40)
IMPLIED_CLIENTS = (1, 2, *CLIENTS)
PAPER_AT_9S = {"splitfuse": 1.36, "vllm-0.2": 0.67}
FIGURES = ("rps @ 9 s (1200/128)", "effective qps (2600/60)", "P95 token latency s (2600/128)")
HIGHER_IS_BETTER = (True, True, False)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, "ablation")
    p.add_argument("--skip", nargs="*", choices=("ladder", "implied"), default=[],
                   help="leave these sections out (and their points)")
    p.add_argument("--wandb", action="store_true", help="also log the table (ablation.csv) and the figure to wandb "
                                                        "as one group (logger=wandb: offline unless WANDB_MODE says)")
    args = p.parse_args(argv)
    ladder_variants = [] if "ladder" in args.skip else LADDER
    clients = QUICK_CLIENTS if args.quick else CLIENTS
    token_clients = QUICK_TOKEN_CLIENTS if args.quick else TOKEN_CLIENTS
    variants = list(dict.fromkeys([FASTGEN, VLLM, *ONE_AT_A_TIME, *ladder_variants, CONTINUOUS]))
    dep = LLAMA_70B_4XA100

    def points(v: Variant) -> dict[str, list[Point]]:
        return {"curve": [Point(dep, v.scheduler, *WORKLOADS["1200/128"], c, v.extra) for c in clients],
                "sla": [Point(dep, v.scheduler, *WORKLOADS["2600/60"], c, v.extra) for c in clients],
                "tokens": [Point(dep, v.scheduler, *WORKLOADS["2600/128"], token_clients, v.extra)]}

    extra_ms = () if "implied" in args.skip else QUICK_EXTRA_STEP_MS if args.quick else EXTRA_STEP_MS
    overheads = {ms: slower_host_profile(args, ms) for ms in extra_ms if ms}

    def implied_curve(scheduler: str, ms: int) -> list[Point]:
        extra = (f"hardware.sim.profile={overheads[ms]}",) if ms else ()
        return [Point(dep, scheduler, *WORKLOADS["1200/128"], c, extra)
                for c in (clients if args.quick else IMPLIED_CLIENTS)]

    grid = list(dict.fromkeys([*(p for v in variants for ps in points(v).values() for p in ps),
                               *(p for s in PAPER_AT_9S for ms in extra_ms for p in implied_curve(s, ms))]))
    metrics = dict(zip(grid, run_points(args, grid)))

    def figures(v: Variant) -> tuple:
        ps = points(v)
        curve = [metrics[p] for p in ps["curve"]]
        at_9s = interpolate([m["e2e_s_mean"] for m in curve], [m["request_throughput"] for m in curve], LATENCY_S)
        effective = max(metrics[p]["effective_throughput_g4"] for p in ps["sla"])
        return at_9s, effective, metrics[ps["tokens"][0]]["token_latency_s_p95"]

    value = {v: figures(v) for v in variants}

    def share(v: Variant, k: int) -> str:
        a, b, x = value[VLLM][k], value[FASTGEN][k], value[v][k]
        if None in (a, b, x) or a == b:
            return "-"
        return f"{(x - a) / (b - a):+.0%}"

    def row(v: Variant) -> list:
        cells = [fmt(value[v][0]), fmt(value[v][1]), fmt(value[v][2], ".3f")]
        return [v.label, *cells, *(share(v, k) for k in range(3))]

    header = ["configuration", *FIGURES, *(f"share of the gap: {f.split(' (')[0]}" for f in FIGURES)]
    gap = ["**FastGen vs vllm-0.2** (paper's in brackets)", f"{ratio(value[FASTGEN][0], value[VLLM][0])} (2.0x)",
           f"{ratio(value[FASTGEN][1], value[VLLM][1])} (2.3x)",
           f"{ratio(value[VLLM][2], value[FASTGEN][2])} lower (3.7x)", "", "", ""]
    one = [row(FASTGEN), row(VLLM), *(row(v) for v in ONE_AT_A_TIME), row(CONTINUOUS), gap]
    ladder = [row(v) for v in ladder_variants]
    table = ("# Ablation: what explains the gap between FastGen and vLLM 0.2\n\n"
             "## One difference at a time (from vllm-0.2 toward FastGen)\n\n"
             + markdown(header, one, [mode_note(args, list(metrics.values()))]))
    if ladder:
        table += "\n## The ladder (differences turned over one after the other)\n\n" + markdown(header, ladder)
    if extra_ms:
        implied_rows = []
        for s, paper in PAPER_AT_9S.items():
            at_9s = [interpolate(*zip(*[(m["e2e_s_mean"], m["request_throughput"])
                                       for m in (metrics[p] for p in implied_curve(s, ms))]), LATENCY_S)
                     for ms in extra_ms]
            implied_rows.append([s, *(fmt(r) for r in at_9s), paper,
                                 implied_host_ms([(ms, r) for ms, r in zip(extra_ms, at_9s) if r is not None], paper)])
        implied_header = ["scheduler", *(f"rps @ 9 s, +{ms} ms/step" for ms in extra_ms), "paper rps @ 9 s",
                          "implied extra host time per step"]
        table += ("\n## What the paper's absolute numbers imply (not measurements)\n\n"
                  + markdown(implied_header, implied_rows,
                             [f"The profile's step_overhead_s ({base_profile(args).step_overhead_s * 1e3:g} ms, a typical "
                              "value) raised by each amount; 1200/128, Llama-2 70B on 4xA100."]))
    fig, axes = subplots(3)
    labels = [v.label.split(" (")[0] for v in ONE_AT_A_TIME]
    for k, ax in enumerate(axes[0]):
        a, b = value[VLLM][k], value[FASTGEN][k]
        shares = [((value[v][k] - a) / (b - a)) if None not in (a, b, value[v][k]) and a != b else 0.0
                  for v in ONE_AT_A_TIME]
        ax.barh(range(len(labels)), shares)
        ax.set(yticks=range(len(labels)), yticklabels=labels if k == 0 else [], xlabel="share of the gap",
               title=FIGURES[k])
        ax.axvline(0, color="k", lw=0.5)
        ax.grid(alpha=0.3)
    save(args, "ablation", table, {"ablation": fig})
    with open(args.out / "ablation.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *one[:-1], *ladder])
    if args.wandb:
        from fastgen.conf import compose_config
        from fastgen.tracking import log_summary
        log_summary(compose_config(["logger=wandb"]).logger, f"ablation_{args.out.resolve().name}", args.out,
                    args.out / "ablation.csv", [args.out / "ablation.png"], name="ablation",
                    config={"base": list(BASE), "factors": {k: list(v) for k, v in FACTORS.items()},
                            "ladder": {k: list(v) for k, v in LADDER_FACTORS.items()}})


def implied_host_ms(known: list[tuple[int, float]], paper: float) -> str:
    """The extra host ms per step at which the rate at 9 s falls to the paper's, read off between the measured
    (ms, rps) pairs; a bound where the paper's rate lies outside them."""
    if not known:
        return "-"
    by_rate = sorted(known, key=lambda k: k[1])
    if paper < by_rate[0][1]:
        return f"> {max(ms for ms, _ in known)} ms"
    if paper > by_rate[-1][1]:
        return f"< {min(ms for ms, _ in known)} ms"
    return f"{float(np.interp(paper, [r for _, r in by_rate], [ms for ms, _ in by_rate])):.0f} ms"


def base_profile(args) -> Profile:
    cfg = base_config((*LLAMA_70B_4XA100.overrides, "executor=simulated"))
    return Profile.load(cfg.hardware.sim.profile)


def slower_host_profile(args, extra_ms: int) -> str:
    """A copy of the deployment's profile with step_overhead_s raised by extra_ms, saved under --out/profiles/."""
    base = base_profile(args)
    path = args.out / "profiles" / f"step-overhead-plus-{extra_ms}ms.json"
    replace(base, step_overhead_s=base.step_overhead_s + extra_ms * 1e-3).save(path)
    return str(path.resolve())


if __name__ == "__main__":
    main()
