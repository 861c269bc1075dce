"""How well the measured GPU profiles predict operator times they were not fitted to: the fidelity table.

    python experiments/gpu_profile_fit.py            # -> experiments/results/gpu_profile_fit/fidelity.md

Uses the shipped profiles (fastgen/sim/profiles/{a100,h100}-80gb.json, made by `python -m fastgen.calibration.measured`)
and the shipped rows (fastgen/calibration/data/vidur/): every row compared here was held out of the fit. Errors are
|predicted / measured - 1| per row. Also: how a model whose GEMM shapes were not measured fares (the roofline
efficiencies fitted on one model, evaluated on the other), the all-reduce fit by GPU count, and the share of a
layer's time the elementwise kernels take.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # run from a checkout without installing fastgen

from fastgen.analysis import markdown_table  # noqa: E402
from fastgen.sim.cost_model import Profile  # noqa: E402
from fastgen.calibration.measured import (GEMM_OPS, GPUS, MODELS, Prediction, cost_model, evaluate, fit,  # noqa: E402
                                  held_out, load_allreduce, operator_series)

PARTS = [*GEMM_OPS, "linear", "elementwise"]
LABELS = {"attn_pre_proj": "QKV", "attn_post_proj": "O", "mlp_up_proj": "gate+up", "mlp_down_proj": "down",
          "linear": "linear part (4 GEMMs)", "elementwise": "elementwise (norms, rope, act, adds)"}


def stats(errors: list[float]) -> str:
    """median / P95 / worst, in percent."""
    e = np.asarray(errors) * 100
    return f"{np.median(e):.1f} / {np.quantile(e, 0.95):.1f} / {e.max():.1f}" if len(e) else "-"


def errors(predictions: list[Prediction], **match) -> list[float]:
    return [p.error for p in predictions if all(getattr(p, k) == v for k, v in match.items())]


def worst_rows(predictions: list[Prediction], part: str, n: int = 3) -> list[Prediction]:
    return sorted((p for p in predictions if p.part == part), key=lambda p: -p.error)[:n]


def bimodal_note() -> str:
    """Small all-reduces on the A100 take one of two times; one latency cannot follow that."""
    times = np.array([r.ms * 1e3 for r in load_allreduce()
                      if (r.gpu, r.workers) == ("a100-80gb", 4) and 2**17 <= r.nbytes < 2**20])
    fast, slow = int(((times >= 15) & (times < 30)).sum()), int(((times >= 55) & (times < 70)).sum())
    return (f"All-reduces of 128 KiB to 1 MiB are bimodal on the A100 (4 GPUs: {fast} of {len(times)} measured sizes "
            f"took 15-30 us, {slow} took 55-70 us); the fitted latency sits between. fastgen's decode-step "
            "all-reduces are that size (16 sequences x 8192 x 2 B = 256 KiB for Llama-2-70B), so there the fit gives a "
            "middle value, not each one's time.")


def curve_form_selection(gpu: str) -> list[list]:
    """How the measured curves read between token counts, chosen on the training rows alone: every second training
    row validates curves through the others, read log-log (the shipped form) or as a staircase (the time at the
    next token count up, as if every step were a tile boundary). The held-out rows' errors of both readings (the
    linear part) are shown beside, but played no part in the choice."""
    forms = {"log-log interpolation": lambda knots, values, at: np.exp(np.interp(np.log(at), np.log(knots),
                                                                                 np.log(values))),
             "staircase (next count up)": lambda knots, values, at: values[np.searchsorted(knots, at)]}
    validation: dict[str, list[float]] = {form: [] for form in forms}
    held: dict[str, list[float]] = {form: [] for form in forms}
    for series, test in operator_series(gpu):
        tokens = np.array([r.tokens for r in series], dtype=float)
        train = ~test
        validate = held_out(int(train.sum()))
        for form, read in forms.items():
            linear_measured, linear_predicted = 0.0, 0.0
            for op in GEMM_OPS:
                ms = np.array([r.ms[op] for r in series])
                knots, values = tokens[train][~validate], ms[train][~validate]
                at, measured = tokens[train][validate], ms[train][validate]
                validation[form] += list(np.abs(read(knots, values, at) / measured - 1))
                linear_measured = linear_measured + ms[test]
                linear_predicted = linear_predicted + read(tokens[train], ms[train], tokens[test])
            held[form] += list(np.abs(linear_predicted / linear_measured - 1))
    return [[gpu, form, stats(validation[form]), stats(held[form])] for form in forms]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "gpu_profile_fit")
    args = parser.parse_args(argv)
    header = ["GPU", "model", "TP", *(LABELS[p] for p in PARTS)]
    lines = ["# Measured GPU profiles: held-out fidelity", "",
             "Predicted vs measured per-layer operator times on rows **held out of the fit** (every second token "
             "count of each series, 1..4096 tokens; the fit saw the others). Cells: median / P95 / worst "
             "|predicted / measured - 1| in %. Source: Vidur's A100-80GB / H100-80GB profiling (microsoft/vidur "
             "commit 7d47513363ec, MIT), thinned in `fastgen/calibration/data/vidur/`. Profiles: "
             "`fastgen/sim/profiles/{a100,h100}-80gb.json` "
             "(`python -m fastgen.calibration.measured a100-80gb h100-80gb`). "
             "Reproduce this file: `python experiments/gpu_profile_fit.py`.", ""]
    summary_rows, detail_rows, allreduce_rows, fallback_rows, share_rows, worst, forms = [], [], [], [], [], [], []
    all_predictions = []
    for gpu in GPUS:
        profile = Profile.load(gpu)
        predictions = evaluate(profile, gpu)
        forms += curve_form_selection(gpu)
        all_predictions += predictions
        for tp in (1, 2, 4, 8):
            summary_rows.append([gpu, "7B + 70B", tp, *(stats(errors(predictions, part=p, tensor_parallel=tp))
                                                        for p in PARTS)])
            for model in MODELS:
                detail_rows.append([gpu, model, tp, *(stats(errors(predictions, part=p, tensor_parallel=tp,
                                                                   model=model)) for p in PARTS)])
        summary_rows.append([gpu, "all", "all", *(stats(errors(predictions, part=p)) for p in PARTS)])
        for workers in sorted({p.tensor_parallel for p in predictions if p.part == "all_reduce"}):
            rows = [p for p in predictions if p.part == "all_reduce" and p.tensor_parallel == workers]
            allreduce_rows.append([gpu, workers, len(rows), stats([p.error for p in rows]),
                                   stats([p.error for p in rows if p.x < 2**20]),
                                   stats([p.error for p in rows if p.x >= 2**20])])
        allreduce_rows.append([gpu, "fit", "", f"latency {profile.allreduce_latency_s * 1e6:.1f} us",
                               f"bus bandwidth {profile.allreduce_bandwidth_gbs:.0f} GB/s", ""])
        for fitted_on in MODELS:                   # the roofline efficiencies on one model, the other predicted
            other = tuple(m for m in MODELS if m != fitted_on)
            fallback = evaluate(fit(gpu, (fitted_on,)), gpu, fallback_only=True, models=other)
            fallback_rows.append([gpu, fitted_on, other[0], *(stats(errors(fallback, part=p)) for p in PARTS[:5])])
        fallback = evaluate(profile, gpu, fallback_only=True)
        fallback_rows.append([gpu, "both", "both (held-out rows)", *(stats(errors(fallback, part=p))
                                                                     for p in PARTS[:5])])
        cost = cost_model(gpu, "llama-2-70b", 4, profile)
        for tokens in (1, 64, 768, 4096):
            linear = sum(profile.gemm_seconds(g.key, tokens) for g in cost.gemms)
            elementwise = profile.layer_overhead_s + cost.elementwise_seconds(tokens) / cost.spec.num_layers
            share_rows.append([gpu, tokens, f"{linear * 1e3:.3f}", f"{elementwise * 1e3:.3f}",
                               f"{elementwise / (linear + elementwise):.1%}"])
        for part in ("linear", "mlp_down_proj"):
            worst += [[gpu, LABELS[part], p.model, p.tensor_parallel, p.x, f"{p.measured_s * 1e3:.4f}",
                       f"{p.predicted_s * 1e3:.4f}", f"{p.error:.1%}"] for p in worst_rows(predictions, part, 2)]

    linear_medians = [np.median(errors(all_predictions, part=p, gpu=g, model=m, tensor_parallel=tp))
                      for p in PARTS[:5] for g in GPUS for m in MODELS for tp in (1, 2, 4, 8)]
    linear_worst = max(errors(all_predictions, part="linear"))
    op_worst = max(e for p in GEMM_OPS for e in errors(all_predictions, part=p))
    lines += [
        "## Against the targets (median <= 5%, worst <= 15%)", "",
        f"- Median: met. The largest median over every GPU x model x TP x (GEMM or linear part) is "
        f"{max(linear_medians):.1%}.",
        f"- Worst: **not met** row by row: worst {op_worst:.0%} for a single GEMM and {linear_worst:.0%} for the "
        "linear part. The measured GEMM curves predict a held-out row by interpolating its two neighbours (8 to 32 "
        "tokens away), so these are the data's own row-to-row jumps: cuBLAS changes tile configuration between "
        "neighbouring token counts, and some rows are bimodal (e.g. H100 Llama-2-70B TP1 `mlp_down_proj` at 520 "
        "to 640 tokens: 0.75 ms, std 0.07-0.1 ms, while 576 tokens measured 0.46 ms). A model of token count alone "
        "cannot predict such a row from its neighbours; smooth efficiency curves (the roofline with fitted "
        "efficiencies, below) do worse, not better. P95 is within 15% everywhere for the linear part.",
        "- Elementwise kernels (norms, rotary, activation, residual adds) and all-reduce use the two-parameter forms "
        "(launch + bytes / bandwidth; latency + bytes / bus bandwidth): their medians are 5-15% (elementwise, per "
        "model and TP) and 4-12% (all-reduce, per GPU count), mostly above 5%. The elementwise kernels are 5-15% "
        "of a layer's time (table below); the data's 1 us resolution is 12-25% of their 4-8 us times at small "
        "token counts. " + bimodal_note(),
        "", "## Still modelled, not measured", "",
        "These data hold no attention kernels and no host-side costs. In the fitted profiles the attention "
        "efficiencies (`prefill_attention_efficiency` 0.4, `decode_attention_efficiency` 0.6), `chunk_overhead_s`, "
        "`step_overhead_s` and `seq_overhead_s` keep their typical values, and the LM head (a GEMM shape not "
        "measured) uses the fitted roofline efficiencies; each profile's `meta.modelled` lists them.", "",
        "## Per GPU and TP degree (both models)", "", markdown_table(header, summary_rows),
        "## Per GPU, model and TP degree", "", markdown_table(header, detail_rows),
        "## Worst held-out rows", "",
        markdown_table(["GPU", "part", "model", "TP", "tokens", "measured ms", "predicted ms", "error"], worst),
        "## How the curves read between token counts", "",
        "cuBLAS's times are staircases in the token count, so a curve could also be read as a staircase (the time "
        "at the next measured count up). The choice is made on the training rows alone: every second training row "
        "validates curves through the others (32-token spacing), and there the staircase reads worse, so the "
        "shipped form is log-log interpolation. On the held-out rows (16-token spacing, shown for the record, not "
        "used to choose) the staircase would have read better. Median / P95 / worst %, per GEMM row (validation) "
        "and per linear part (held out):", "",
        markdown_table(["GPU", "form", "validation error (GEMMs)", "held-out error (linear part)"], forms),
        "## GEMM shapes outside the measured curves", "",
        "Models whose GEMM shapes were not measured (Llama-2-13B, Mistral-7B, the LM head) get the roofline "
        "max(flops / (peak x eff(tokens)), bytes / (bandwidth x eff)) with efficiencies fitted on all measured GEMM "
        "rows. How well that transfers: fitted on one model's rows, evaluated on the other's held-out rows "
        "(median / P95 / worst %). The A100's efficiencies transfer to within 4-9% median (P95 up to 41%); the "
        "H100's do not (median 7-22%, P95 up to 98%): a simulated model whose GEMMs were not measured (Llama-2-13B "
        "in the paper scripts) is correspondingly less certain, on the H100 most.", "",
        markdown_table(["GPU", "fitted on", "evaluated on", *(LABELS[p] for p in PARTS[:5])], fallback_rows),
        "## All-reduce (inside one DGX node)", "",
        "One latency and one bus bandwidth per GPU kind, fitted on every second message size of the 2-, 4- and "
        "8-GPU rows; evaluated on the others (median / P95 / worst %). Message sizes are bytes: Vidur's own "
        "predictor reads the `size` column as bytes (size / hidden / 2 = tokens), and as bytes the large-message "
        "bus bandwidths are the plausible 160-170 GB/s (A100) and ~350 GB/s (H100).", "",
        markdown_table(["GPU", "GPUs", "rows", "all sizes", "< 1 MiB", ">= 1 MiB"], allreduce_rows),
        "## Elementwise share of a layer (Llama-2-70B, TP 4, predicted)", "",
        markdown_table(["GPU", "tokens", "linear ms", "elementwise ms", "elementwise share"], share_rows)]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fidelity.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines))
    print("wrote", path)


if __name__ == "__main__":
    main()
