"""fastgen vs transformers on one machine, in one invocation: same model, dtype and requests (issue #8).

    python experiments/bench_vs_hf.py                                  # chat + long-prompt, float32, every system
    python experiments/bench_vs_hf.py quick=true                       # tiny end-to-end run (< 1 min)
    python experiments/bench_vs_hf.py run=[chat] compare_dtypes=[bfloat16]
    python experiments/bench_vs_hf.py systems=[fastgen] fastgen.schedulers=[splitfuse]

Config: conf/bench_vs_hf.yaml (schema: BenchConfig below). Results go to results.json and results.md in the
Hydra run directory (outputs/bench_vs_hf/<timestamp>) or `out_dir`; the Markdown table is also printed.

Systems (each gets exactly the same requests: the workload's prompt token ids and output lengths, EOS ignored,
greedy; all requests are submitted at t=0, i.e. offline throughput):

- ``hf-generate bs=B``: transformers ``generate`` with static batching: the requests in order, B at a time, left
  padded with an attention mask; a batch runs to its longest member's output length
  (min_new_tokens = max_new_tokens), which is static batching's real cost, but only each request's own requested
  tokens count as output. bs=1 is timed on the first ``hf_generate.bs1_max_requests`` requests only (the row says
  so); its throughput is over that subset.
- ``hf-generate-batch <setting>``: transformers continuous batching (``ContinuousBatchingManager``, the engine
  behind ``generate_batch``, driven directly so each request gets its own max_new_tokens and eos_token_id=-1),
  sdpa attention, one row per setting of ``generate_batch`` (page size, num_blocks, max_batch_tokens, scheduler).
- ``fastgen <scheduler>``: fastgen's engine with splitfuse, continuous, orca, static.

Every system loads its model once and gets a short warm-up (two short requests) before timing. Throughputs:
total-token = (prompt + output tokens of all requests) / wall; output-token = output tokens / wall. Each row is
divided by the best transformers row (best of generate and generate_batch); fastgen splitfuse is also divided by
the best generate row and by the best generate_batch row.

**The limit** (per workload, fastgen, the main dtype; fastgen/peers/offline.py says how it is measured and what
engine efficiency means): a budget-sized prompt pass (``limit.repeats``) and decode steps at ``limit.decode_context``
(default: the workload's mean prompt + output/2; ``limit.decode_repeats``) up to the largest decode batch any fastgen
row reached. **Time outside the forward**: 1 - in-model time / wall ("outside model") and 1 - executor time / wall
("outside executor"), from the engine's step stats. With ``profile_requests`` > 0, a separate, smaller splitfuse
run is cProfiled and the top functions go to ``profile_<workload>.txt``.

Correctness: with greedy decoding, fastgen's tokens for the requests timed at bs=1 (no padding) must equal
transformers generate's (transformers dequantizes the GGUF to float32); every other row's agreement with fastgen
splitfuse is reported too (padding and batched kernels can flip near-ties, so those are informative only).

bfloat16 (``compare_dtypes=[bfloat16]``): fastgen splitfuse is rerun in each extra dtype on every workload; the
result has its speed-up over the main dtype and its greedy agreement with it on ``agreement_requests`` prompts of
``agreement_tokens`` tokens (fraction of identical sequences, mean identical-prefix fraction, positionwise
agreement).

Timings on a shared machine are noisy; the run's `machine` record (fastgen.machine) says how noisy.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from peers import (FastgenConfig, HFGenerateConfig, check, checkpoint, fmt, hf_generate_rows, log, row, shrink,
                   start_run, write_results)

from fastgen.analysis import markdown_table
from fastgen.cli import hydra_script
from fastgen.conf import compose_schema
from fastgen.machine import Machine, machine_line, machine_record
from fastgen.models import load_model
from fastgen.peers.hf import GenerateBatchSetting, hf_generate_batch, load_hf
from fastgen.peers.offline import (LimitConfig, Req, agreement, build_fastgen, decode_seqs, efficiency, fastgen_run,
                                   fastgen_timed, make_requests, measure_limit, profile_engine, summary,
                                   warmup_requests)
from fastgen.workloads import WorkloadConfig

SYSTEMS = ("hf-generate", "hf-generate-batch", "fastgen")


@dataclass
class BenchConfig:
    model: str = "smollm2-135m"
    dtype: str = "float32"
    compare_dtypes: list[str] = field(default_factory=list)
    threads: Optional[int] = None
    run: list[str] = field(default_factory=lambda: ["chat", "long-prompt"])
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    workloads: dict[str, WorkloadConfig] = field(default_factory=dict)
    hf_generate: HFGenerateConfig = field(default_factory=HFGenerateConfig)
    generate_batch: list[GenerateBatchSetting] = field(default_factory=lambda: [GenerateBatchSetting()])
    fastgen: FastgenConfig = field(default_factory=FastgenConfig)
    limit: LimitConfig = field(default_factory=LimitConfig)
    profile_requests: int = 8
    agreement_requests: int = 4
    agreement_tokens: int = 32
    quick: bool = False
    out_dir: Optional[str] = None


def compose_bench_config(overrides: list[str] | tuple[str, ...] = ()) -> BenchConfig:
    return compose_schema("bench_vs_hf", BenchConfig, overrides)


def apply_quick(cfg: BenchConfig) -> None:
    """quick=true: 4 short requests per workload, small batch sizes, one generate_batch setting, short probes."""
    shrink(cfg)
    cfg.hf_generate.batch_sizes = [1, 2, 4]
    cfg.hf_generate.bs1_max_requests = 4
    cfg.generate_batch = [GenerateBatchSetting(name="mbt128-p16", page_size=16, max_batch_tokens=128)]
    cfg.limit = LimitConfig(repeats=1, decode_repeats=2, decode_context=None)
    cfg.profile_requests = min(cfg.profile_requests, 2)
    cfg.agreement_requests, cfg.agreement_tokens = min(cfg.agreement_requests, 2), min(cfg.agreement_tokens, 8)


def validate(cfg: BenchConfig) -> None:
    check(cfg, SYSTEMS, cfg.run)
    if any(b < 1 for b in cfg.hf_generate.batch_sizes):
        raise ValueError("hf_generate.batch_sizes must be >= 1")


def bench_workload(name: str, cfg: BenchConfig, reqs: list[Req], hf, tok, fg_models: dict, out: Path) -> dict:
    dtype = cfg.dtype
    warm = warmup_requests(reqs)
    rows: list[dict] = []
    outputs: dict[str, list[list[int]]] = {}
    bs1_n = min(cfg.hf_generate.bs1_max_requests, len(reqs))

    result: dict[str, Any] = {"rows": rows}
    fastgen_steps: dict[str, tuple[list[dict], float, float]] = {}
    for system in cfg.systems:                       # in the order given
        if system == "hf-generate":
            rows += hf_generate_rows(name, cfg, hf, tok, reqs, warm, outputs)

        if system == "hf-generate-batch":
            for setting in cfg.generate_batch:
                log(f"{name}: hf-generate-batch {setting.name}")
                wall, outs, info = hf_generate_batch(hf, reqs, setting, warm)
                rows.append(row("hf-generate-batch", setting.name, dtype, reqs, wall, outs, cb=info, note=""))
                outputs[f"hf-generate-batch {setting.name}"] = outs

        if system == "fastgen":
            for sched in cfg.fastgen.schedulers:
                log(f"{name}: fastgen {sched}")
                fg = build_fastgen(fg_models[dtype], tok, sched, dtype, cfg.fastgen.overrides)
                wall, outs, steps, overhead = fastgen_timed(fg, reqs, warm)
                rows.append(row("fastgen", sched, dtype, reqs, wall, outs, overhead=overhead, note=""))
                outputs[f"fastgen {sched}"] = outs
                fastgen_steps[sched] = (steps, wall, overhead["in_model_s"])
                if sched == "splitfuse" and cfg.profile_requests > 0:
                    log(f"{name}: cProfile of splitfuse on {min(cfg.profile_requests, len(reqs))} requests")
                    result["profile"] = profile_engine(fg, reqs[:cfg.profile_requests],
                                                       out / f"profile_{name}.txt")
                del fg

            if fastgen_steps:
                max_d = max(max((decode_seqs(s) for s in st), default=1) for st, _, _ in fastgen_steps.values())
                ctx = cfg.limit.decode_context or int(statistics.fmean(len(r.prompt) + r.max_new_tokens / 2
                                                                       for r in reqs))
                log(f"{name}: the limit (prefill pass, decode steps up to batch {max_d} at context {ctx})")
                limit = measure_limit(fg_models[dtype], tok, dtype, cfg.fastgen.overrides, cfg.limit, ctx,
                                      max(max_d, 1), hf.config.vocab_size)
                limit["efficiency"] = {s: efficiency(st, w, m, limit) for s, (st, w, m) in fastgen_steps.items()}
                result["limit"] = limit
                checkpoint("limit", {"workload": name, **limit})

            for extra in cfg.compare_dtypes:
                log(f"{name}: fastgen splitfuse in {extra}")
                engine = build_fastgen(fg_models[extra], tok, "splitfuse", extra, cfg.fastgen.overrides)
                wall, outs, steps, overhead = fastgen_timed(engine, reqs, warm)
                rows.append(row("fastgen", "splitfuse", extra, reqs, wall, outs, overhead=overhead, note=""))
                agree_reqs = [Req(r.prompt, cfg.agreement_tokens) for r in reqs[:cfg.agreement_requests]]
                ref_engine = build_fastgen(fg_models[dtype], tok, "splitfuse", dtype, cfg.fastgen.overrides)
                _, ref, _ = fastgen_run(ref_engine, agree_reqs)
                del ref_engine
                _, got, _ = fastgen_run(engine, agree_reqs)
                base = next((r for r in rows if r["system"] == "fastgen" and r["setting"] == "splitfuse"
                             and r["dtype"] == dtype), None)
                result.setdefault("dtypes", {})[extra] = {
                    "speedup_total_tok_s": (rows[-1]["total_tok_s"] / base["total_tok_s"]) if base else None,
                    "greedy_agreement_vs_" + dtype: agreement(ref, got),
                    "workload_agreement_vs_" + dtype: agreement(outputs["fastgen splitfuse"], outs)
                    if "fastgen splitfuse" in outputs else None}
                del engine

    ratios(rows, dtype)
    result["correctness"] = correctness(outputs, bs1_n)
    return result


def ratios(rows: list[dict], dtype: str) -> None:
    hf_rows = [r for r in rows if r["system"].startswith("hf") and r["dtype"] == dtype]
    best = {k: max((r for r in hf_rows if k is None or r["system"] == k), key=lambda r: r["total_tok_s"],
                   default=None) for k in (None, "hf-generate", "hf-generate-batch")}
    for r in rows:
        for key, b in (("vs_best_hf", best[None]), ("vs_best_generate", best["hf-generate"]),
                       ("vs_best_generate_batch", best["hf-generate-batch"])):
            r[key + "_total"] = r["total_tok_s"] / b["total_tok_s"] if b else None
            r[key + "_output"] = r["output_tok_s"] / b["output_tok_s"] if b else None
    for k, b in best.items():
        if b is not None:
            b.setdefault("best_of", []).append(k or "transformers")


def correctness(outputs: dict[str, list[list[int]]], bs1_n: int) -> dict:
    """fastgen (every scheduler) vs transformers generate bs=1 (no padding) on the requests timed at bs=1; every
    other row vs fastgen splitfuse on all requests."""
    out: dict[str, Any] = {}
    ref = outputs.get("hf-generate bs=1")
    if ref is not None:
        out["vs_hf_generate_bs1"] = {k: agreement(ref, v[:len(ref)]) for k, v in outputs.items()
                                     if k.startswith("fastgen")}
        out["fastgen_equals_hf_greedy"] = all(a["identical_frac"] == 1.0 for a in out["vs_hf_generate_bs1"].values())
    sf = outputs.get("fastgen splitfuse")
    if sf is not None:
        out["vs_fastgen_splitfuse"] = {k: agreement(sf[:len(v)], v) for k, v in outputs.items()
                                       if k != "fastgen splitfuse"}
    return out


def note(r: dict) -> str:
    return "; ".join(x for x in [r.get("note", ""), "best " + "/".join(r["best_of"]) if r.get("best_of") else "",
                                 f"{r['wrong_output_lengths']} wrong lengths" if r["wrong_output_lengths"] else ""]
                     if x)


def markdown(results: dict) -> str:
    lines = [f"# fastgen vs transformers ({results['config']['model']}, {results['config']['dtype']})", ""]
    m = results["machine"]
    lines += [machine_line(m) + " Ratios are total-token (output-token) throughput divided by the best "
              "transformers row of the same dtype.", ""]
    for name, w in results["workloads"].items():
        s = w["summary"]
        lines += [f"## {name}: {s['num_requests']} requests, prompt mean {s['prompt_mean']:.0f}, output mean "
                  f"{s['output_mean']:.0f} tokens, all submitted at t=0", "",
                  markdown_table(["system", "setting", "dtype", "requests", "wall s", "total tok/s", "output tok/s",
                                  "x best HF", "x best generate", "x best generate_batch", "note"],
                                 [[r["system"], r["setting"], r["dtype"], r["num_requests"], f"{r['wall_s']:.1f}",
                                   f"{r['total_tok_s']:.1f}", f"{r['output_tok_s']:.1f}",
                                   f"{fmt(r['vs_best_hf_total'])} ({fmt(r['vs_best_hf_output'])})",
                                   fmt(r["vs_best_generate_total"]), fmt(r["vs_best_generate_batch_total"]),
                                   note(r)] for r in w["rows"]])]
        if "limit" in w:
            lim = w["limit"]
            dec = ", ".join(f"b={b}: {t * 1e3:.1f} ms" for b, t in lim["decode_step_s"].items())
            lines += [f"**The limit.** One forward pass of {lim['token_budget']} prompt tokens: "
                      f"{lim['prefill_pass_s'] * 1e3:.0f} ms = {lim['prefill_tok_s']:.0f} tok/s. Decode step at "
                      f"context {lim['decode_context']}: {dec}. Engine efficiency = predicted pure-forward time "
                      "(sum over steps of prompt tokens / prefill tok/s + decode step time at the step's decode "
                      "batch) / wall time = achieved total tok/s / forward-pass throughput at the scheduled token "
                      "counts. Outside model = 1 - time in the model's forward / wall (scheduling, batch building, "
                      "sampling, bookkeeping); outside executor = the same without batch building.", ""]
            table = []
            for sched, e in lim["efficiency"].items():
                r = next(r for r in w["rows"] if r["system"] == "fastgen" and r["setting"] == sched
                         and r["dtype"] == results["config"]["dtype"])
                o = r["overhead"]
                table.append([sched, o["num_steps"], f"{e['mean_step_tokens']:.0f}", f"{e['mean_decode_batch']:.1f}",
                              fmt(e["limit_tok_s"], ".1f"), f"{r['total_tok_s']:.1f}", f"{e['engine_efficiency']:.3f}",
                              fmt(e["forward_efficiency"], ".3f"), f"{o['outside_model_frac']:.2%}",
                              f"{o['outside_executor_frac']:.2%}"])
            lines += [markdown_table(["fastgen", "steps", "mean step tokens", "mean decode batch", "limit tok/s",
                                      "achieved tok/s", "engine efficiency", "forward efficiency", "outside model",
                                      "outside executor"], table)]
        c = w.get("correctness", {})
        if "vs_hf_generate_bs1" in c:
            agree = ", ".join(f"{k}: {v['identical_frac']:.2f}" for k, v in c["vs_hf_generate_bs1"].items())
            lines += [f"**Greedy check** (fastgen vs transformers generate bs=1, no padding, first "
                      f"{next(iter(c['vs_hf_generate_bs1'].values()))['requests']} requests, fraction identical): "
                      f"{agree}. fastgen == transformers: **{c['fastgen_equals_hf_greedy']}**.", ""]
        if "vs_fastgen_splitfuse" in c:
            agree = ", ".join(f"{k}: {v['identical_frac']:.2f}/{v['positionwise_frac']:.3f}"
                              for k, v in c["vs_fastgen_splitfuse"].items())
            lines += [f"Agreement with fastgen splitfuse (identical sequences / positionwise): {agree}.", ""]
        for dt, d in w.get("dtypes", {}).items():
            ga = next(v for k, v in d.items() if k.startswith("greedy_agreement"))
            lines += [f"**{dt}**: splitfuse speed-up over {results['config']['dtype']}: "
                      f"{fmt(d['speedup_total_tok_s'])}x; greedy agreement on {ga['requests']} prompts x "
                      f"{results['config']['agreement_tokens']} tokens: identical {ga['identical_frac']:.2f}, "
                      f"identical prefix {fmt(ga['mean_identical_prefix_frac'], '.2f')}, positionwise "
                      f"{ga['positionwise_frac']:.3f}.", ""]
        if "profile" in w:
            lines += [f"cProfile of a splitfuse run of {w['profile']['requests']} requests: {w['profile']['file']}.",
                      ""]
    return "\n".join(lines)


def run_bench(cfg: BenchConfig, out_dir: str | Path) -> dict:
    out = start_run(cfg, out_dir, apply_quick, validate)

    machine = Machine.at_start()
    results: dict[str, Any] = {"config": OmegaConf.to_container(OmegaConf.structured(cfg)), "workloads": {}}
    log(f"loading {cfg.model} (transformers, {cfg.dtype})")
    hf, tok = load_hf(cfg.model, cfg.dtype)
    fg_models = {}
    if "fastgen" in cfg.systems:
        src = hf if cfg.dtype == "float32" else load_hf(cfg.model, "float32")[0]
        for dt in dict.fromkeys([cfg.dtype, *cfg.compare_dtypes]):
            fg_models[dt] = load_model(src, dtype=dt, tokenizer=tok)[0]
    vocab = hf.config.vocab_size
    for name in cfg.run:
        reqs = make_requests(cfg.workloads[name], vocab, tok)
        w = bench_workload(name, cfg, reqs, hf, tok, fg_models, out)
        results["workloads"][name] = w | {"summary": summary(reqs)}
        write_results(out, results | {"machine": machine_record(machine)})     # partial results survive a crash
    results["machine"] = machine_record(machine)
    return write_results(out, results, markdown(results))


def main() -> None:
    hydra_script("bench_vs_hf", BenchConfig, run_bench)


if __name__ == "__main__":
    main()
