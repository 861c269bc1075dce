"""fastgen vs its CPU peers at their best set-ups, on one machine, in one run, against a measured roofline: vLLM's CPU
backend as its documentation sets it up, OpenVINO GenAI's ContinuousBatchingPipeline (Dynamic SplitFuse of its own)
and transformers (issues 20, 33).

    python experiments/bench_peers.py                          # chat, long-prompt, short: every system
    python experiments/bench_peers.py quick=true               # a tiny end-to-end run (a few minutes)
    python experiments/bench_peers.py run=[chat] systems=[fastgen,vllm,openvino]

Config: conf/bench_peers.yaml (schema: BenchConfig below). Results: results.json and results.md in the Hydra run
directory (outputs/bench_peers/<timestamp>) or `out_dir`; the Markdown is also printed.

**vLLM** runs from PyPI's CPU build in its own virtual environment, never as a fastgen dependency
(fastgen/peers/vllm.py says how; the script makes the venv when `vllm.venv` is missing). The model is the embedded
SmolLM2-135M saved as a local float32 Hugging Face directory (`vllm.model_dir`).

**Systems**, each given the same requests (the workload's prompt token ids and output lengths, EOS ignored, greedy,
float32, every request submitted at t=0, two short warm-up requests first):

- ``hf-generate bs=B``: transformers ``generate``, static batches of B (fastgen.peers.hf, as bench_vs_hf; bs=1 on
  the first ``hf_generate.bs1_max_requests`` requests only);
- ``fastgen <scheduler>``: fastgen's engine in this process;
- ``openvino <setting>``: OpenVINO GenAI's ``ContinuousBatchingPipeline`` in its own venv (fastgen/peers/openvino.py:
  the same float32 HF directory converted with optimum-intel; dynamic_split_fuse on, fastgen's token budget, 2 GB KV;
  float32 rows with the f32 inference and KV-cache precision hints, and a row at OpenVINO's default precision);
- ``vllm <setting>``: ``LLM.generate`` in the vLLM venv (fastgen/peers/vllm_worker.py, a subprocess; token ids in
  and out through JSON files; its start-up and torch.compile time are reported apart and not timed);
- ``http``: vLLM's OpenAI server (its API-server entry point, the first vLLM setting) and fastgen's (``python -m
  fastgen.serve``), each driven by ``python run.py target=http`` on the workloads in ``http.workloads``, with the
  workload as run.py defines it (closed loop, warm-ups left out); TTFT and ITL P50/P99 at the client.

vLLM's set-up is its CPU documentation's: tcmalloc (Debian's libtcmalloc-minimal4, installed with apt-get when missing)
and its bundled Intel OpenMP preloaded (LD_PRELOAD), OpenMP threads bound to every core; every vLLM and OpenVINO row
states its set-up in the table. vLLM's settings (conf/bench_peers.yaml ``vllm``): float32; KV space = fastgen's KV
pool (2 GiB); OpenMP threads bound to every core (vLLM's default binding keeps one core for its engine-core process,
which on 2 cores halves its compute); prefix caching off (fastgen has none; random prompts could not hit); one row
at vLLM's own batching defaults and one at fastgen's token budget (max_num_batched_tokens 768), the best of them is
the peer.

**Roofline** (fastgen/roofline.py says what it charges each step): the ceilings are measured at the start and at the
end of the run, the better of the two counts. Hardware efficiency = roofline time / time in the model's forward, per
step kind (and / whole step time). The probes of the engine's limit (a budget-sized prompt pass; decode steps at
``roofline.decode_context`` for batch sizes up to the largest of ``roofline.decode_batches``) are reported the
same way.
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from peers import (ROOT, FastgenConfig, HFGenerateConfig, busy_neighbour, check, fmt, hf_generate_rows, log,
                   row, run_py, shrink, start_run, start_server, write_results)

from fastgen.cli import hydra_script
from fastgen.conf import compose_schema
from fastgen.machine import Machine, load_average, machine_line, machine_record
from fastgen.model_spec import ModelSpec
from fastgen.models import load_model
from fastgen.peers.hf import load_hf
from fastgen.peers.offline import (LimitConfig, agreement, build_fastgen, fastgen_timed, make_requests, measure_limit,
                                   summary, warmup_requests)
from fastgen.peers.servers import free_port, stop
from fastgen.peers import openvino as peer_openvino
from fastgen.peers.openvino import OpenVINOConfig, openvino_offline
from fastgen.peers.vllm import (VLLMConfig, ensure_tcmalloc, ensure_venv, export_hf_dir, serve_args, setup_line,
                                vllm_env, vllm_offline)
from fastgen.roofline import (PREFILL, Ceilings, StepShapes, best_ceilings, measure_ceilings, probe_rooflines,
                              probes_table, roofline_summary, summary_table)
from fastgen.sim.shapes import model_spec
from fastgen.workloads import WorkloadConfig

SYSTEMS = ("hf-generate", "fastgen", "vllm", "openvino", "http")


@dataclass
class HTTPConfig:
    workloads: list[str] = field(default_factory=lambda: ["chat"])
    overrides: list[str] = field(default_factory=list)
    fastgen_overrides: list[str] = field(default_factory=list)


@dataclass
class RooflineConfig:
    gemm_n: int = 2048
    bandwidth_mb: int = 512
    linear_tokens: list[int] = field(default_factory=lambda: [1, 8, 32, 64, 768])
    repeats: int = 5
    decode_context: int = 340
    decode_batches: list[int] = field(default_factory=lambda: [1, 8, 32, 64])
    limit_repeats: int = 4


@dataclass
class BenchConfig:
    model: str = "smollm2-135m"
    dtype: str = "float32"
    threads: Optional[int] = None
    run: list[str] = field(default_factory=lambda: ["chat", "long-prompt", "short"])
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    workloads: dict[str, WorkloadConfig] = field(default_factory=dict)
    hf_generate: HFGenerateConfig = field(default_factory=HFGenerateConfig)
    fastgen: FastgenConfig = field(default_factory=lambda: FastgenConfig(schedulers=["splitfuse"]))
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    openvino: OpenVINOConfig = field(default_factory=OpenVINOConfig)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    roofline: RooflineConfig = field(default_factory=RooflineConfig)
    neighbour: int = 0                   # busy processes beside every timed run (CPU contention); 0: none
    quick: bool = False
    out_dir: Optional[str] = None


def compose_bench_config(overrides: list[str] | tuple[str, ...] = ()) -> BenchConfig:
    return compose_schema("bench_peers", BenchConfig, overrides)


QUICK_HTTP = ["workload.num_requests=6", "workload.clients=2", "workload.prompt.mean=48", "workload.prompt.max=160",
              "workload.output.mean=8", "workload.output.max=16"]


def apply_quick(cfg: BenchConfig) -> None:
    """quick=true: 4 short requests per workload, one vLLM setting, one short HTTP workload, small probes."""
    shrink(cfg)
    cfg.hf_generate = HFGenerateConfig(batch_sizes=[1, 4], bs1_max_requests=4)
    cfg.vllm.settings = cfg.vllm.settings[:1]
    cfg.openvino.settings = cfg.openvino.settings[:1]
    cfg.openvino.cache_size_gb = 1
    cfg.http.workloads = cfg.http.workloads[:1]
    cfg.http.overrides = [*QUICK_HTTP, *cfg.http.overrides]
    cfg.vllm.kv_cache_gib, cfg.vllm.max_model_len = min(cfg.vllm.kv_cache_gib, 0.25), 1024
    cfg.roofline = RooflineConfig(gemm_n=512, bandwidth_mb=64, linear_tokens=[1, 8], repeats=2, decode_context=64,
                                  decode_batches=[1, 4], limit_repeats=1)


def validate(cfg: BenchConfig) -> None:
    check(cfg, SYSTEMS, [*cfg.run, *cfg.http.workloads], "run / http.workloads")
    if cfg.dtype != "float32":
        raise ValueError("the vLLM comparison is float32 only (vLLM's CPU kernels and fastgen's agree there)")
    if not cfg.vllm.settings:
        raise ValueError("vllm.settings needs at least one setting")


def ceilings_now(spec: ModelSpec, r: RooflineConfig, when: str) -> Ceilings:
    log(f"measuring the ceilings at the {when} (load {load_average()})")
    c = measure_ceilings(spec, r.linear_tokens, r.gemm_n, r.bandwidth_mb * 2**20, r.repeats)
    c.meta.update(when=when, loadavg=load_average())
    log(f"GEMM {c.gemm_flops / 1e9:.1f} GFLOP/s, bandwidth {c.bandwidth / 1e9:.1f} GB/s")
    return c


HTTP_KEYS = ("num_completed", "num_requests", "total_token_throughput", "output_token_throughput", "ttft_s_p50",
             "ttft_s_p99", "itl_s_p50", "itl_s_p99", "e2e_s_p50")


def http_rows(cfg: BenchConfig, out: Path) -> list[dict]:
    rows = []
    servers = {
        "vllm": lambda port: ([*serve_args(cfg.vllm, cfg.vllm.settings[0], port)], vllm_env(cfg.vllm)),
        "fastgen": lambda port: ([sys.executable, "-m", "fastgen.serve", f"port={port}", "hardware.dtype=float32",
                                  *cfg.fastgen.overrides, *cfg.http.fastgen_overrides],
                                 {**os.environ, "PYTHONPATH": str(ROOT)}),
    }
    for name, make in servers.items():
        port = free_port()
        cmd, env = make(port)
        log(f"http: starting {name} server: {' '.join(cmd)}")
        url = f"http://127.0.0.1:{port}"
        proc, ready = start_server(cmd, url, out / f"server-{name}.log", cfg.vllm.startup_timeout_s, env)
        try:
            for workload in cfg.http.workloads:
                log(f"http: {name} server, run.py target=http workload={workload}")
                load = load_average()
                m = run_py(["target=http", f"target.url={url}", f"workload={workload}", *cfg.http.overrides],
                           out / f"http-{name}-{workload}")
                rows.append({"server": name, "workload": workload, "startup_s": ready, "loadavg_before": load,
                             "loadavg_after": load_average(), **{k: m.get(k) for k in HTTP_KEYS},
                             "command": m["command"]})
        finally:
            stop(proc)
    return rows


def bench_workload(name: str, cfg: BenchConfig, reqs, hf, tok, fg_model, peer_runs: dict[tuple[str, str], dict]) \
        -> dict:
    """Every system on one workload; `peer_runs` holds the subprocess peers' results, per (system, setting)."""
    warm = warmup_requests(reqs)
    rows: list[dict] = []
    outputs: dict[str, list[list[int]]] = {}
    result: dict[str, Any] = {"rows": rows}
    bs1_n = min(cfg.hf_generate.bs1_max_requests, len(reqs))
    if "hf-generate" in cfg.systems:
        rows += hf_generate_rows(name, cfg, hf, tok, reqs, warm, outputs)

    if "fastgen" in cfg.systems:
        for sched in cfg.fastgen.schedulers:
            log(f"{name}: fastgen {sched} (load {load_average()})")
            shapes = StepShapes()
            fg = build_fastgen(fg_model, tok, sched, cfg.dtype, cfg.fastgen.overrides, instrument=shapes)
            wall, outs, steps, overhead = fastgen_timed(fg, reqs, warm)
            records = [(q, ctx, s["forward_s"]) for (q, ctx), s in zip(shapes.shapes[-len(steps):], steps)]
            rows.append(row("fastgen", sched, cfg.dtype, reqs, wall, outs, overhead=overhead, note=""))
            rows[-1]["_steps"] = (records, [s["duration_s"] for s in steps])   # held to the roofline at the end
            rows[-1]["step_split_s"] = {k: sum(s[k] for s in steps)
                                        for k in ("schedule_s", "prepare_s", "forward_s", "sample_s", "duration_s")}
            outputs[f"fastgen {sched}"] = outs
            del fg

    for (system, setting), res in peer_runs.items():
        run = res["runs"][name]
        rows.append(row(system, setting, cfg.dtype, reqs, run["wall_s"], run["outputs"],
                        note=f"start-up {res['startup_s']:.0f} s", setup=res["setup"],
                        version=res.get("vllm") or res.get("openvino_genai"), loadavg=res["loadavg"]))
        outputs[f"{system} {setting}"] = run["outputs"]

    ratios(rows)
    result["agreement"] = agreements(outputs, bs1_n)
    return result


F32_OPENVINO = "INFERENCE_PRECISION_HINT=f32"     # in the set-up of OpenVINO's float32 rows


def ratios(rows: list[dict]) -> None:
    """Each row over the best transformers generate row, the best vLLM row and the best float32 OpenVINO row
    (total-token throughput)."""
    peers = (("vs_best_hf", "hf-generate", ""), ("vs_best_vllm", "vllm", ""),
             ("vs_best_openvino_f32", "openvino", F32_OPENVINO))
    for key, system, setup in peers:
        best = max((r for r in rows if r["system"] == system and setup in r.get("setup", "")),
                   key=lambda r: r["total_tok_s"], default=None)
        if best is not None:
            best.setdefault("best_of", []).append(system + (" f32" if setup else ""))
        for r in rows:
            r[key] = r["total_tok_s"] / best["total_tok_s"] if best else None


def agreements(outputs: dict[str, list[list[int]]], bs1_n: int) -> dict:
    """Greedy tokens: every row vs fastgen splitfuse (all requests) and vs transformers bs=1 (its unpadded
    subset); identical_frac 1.0 means the same tokens for every request."""
    out: dict[str, dict] = {}
    for ref_name in ("fastgen splitfuse", "hf-generate bs=1"):
        ref = outputs.get(ref_name)
        if ref is None:
            continue
        out[f"vs {ref_name}"] = {k: agreement(ref[:min(len(ref), len(v))], v[:min(len(ref), len(v))])
                                 for k, v in outputs.items() if k != ref_name}
    return out


def timed_runs(cfg: BenchConfig, out: Path, requests: dict, hf, tok, fg_model, results: dict) -> None:
    """The peers' subprocess runs, every workload's rows, fastgen's limit probes and the HTTP rows, into `results`."""
    r = cfg.roofline
    peer_runs: dict[tuple[str, str], dict] = {}
    peers = [("vllm", s, lambda s, d: vllm_offline(cfg.vllm, s, requests, d), setup_line(cfg.vllm))
             for s in cfg.vllm.settings if "vllm" in cfg.systems]
    peers += [("openvino", s, lambda s, d: openvino_offline(cfg.openvino, s, requests, d),
               peer_openvino.setup_line(cfg.openvino, s)) for s in cfg.openvino.settings if "openvino" in cfg.systems]
    for system, setting, run_peer, setup in peers:
        log(f"{system} {setting.name}: offline on {', '.join(cfg.run)}; set-up: {setup} (load {load_average()})")
        d = out / f"{system}-{setting.name}"
        d.mkdir(parents=True, exist_ok=True)
        load = load_average()
        peer_runs[(system, setting.name)] = run_peer(setting, d) | {"loadavg": [load, load_average()],
                                                                    "setup": setup}
    for name, reqs in requests.items():
        results["workloads"][name] = bench_workload(name, cfg, reqs, hf, tok, fg_model, peer_runs) | \
            {"summary": summary(reqs)}

    if "fastgen" in cfg.systems:
        log(f"limit probes: a {r.decode_context}-token-context decode step at batch sizes up to "
            f"{max(r.decode_batches)} and a budget-sized prompt pass (load {load_average()})")
        limit = measure_limit(fg_model, tok, cfg.dtype, cfg.fastgen.overrides,
                              LimitConfig(repeats=r.limit_repeats, decode_repeats=r.limit_repeats),
                              r.decode_context, max(r.decode_batches), hf.config.vocab_size)
        results["limit"] = limit | {"loadavg": load_average()}
    if "http" in cfg.systems:
        results["http"] = http_rows(cfg, out)


def run_bench(cfg: BenchConfig, out_dir: str | Path) -> dict:
    out = start_run(cfg, out_dir, apply_quick, validate)
    if "vllm" in cfg.systems:
        ensure_venv(cfg.vllm, log)
        ensure_tcmalloc(cfg.vllm, log)
    if "openvino" in cfg.systems:
        peer_openvino.ensure_venv(cfg.openvino, log)
    machine = Machine.at_start()
    results: dict[str, Any] = {"config": OmegaConf.to_container(OmegaConf.structured(cfg)), "workloads": {}}
    log(f"loading {cfg.model} (transformers and fastgen, float32)")
    hf, tok = load_hf(cfg.model, cfg.dtype)
    if {"vllm", "openvino", "http"} & set(cfg.systems):
        export_hf_dir(cfg.model, Path(cfg.vllm.model_dir))
    if "openvino" in cfg.systems:
        peer_openvino.ensure_ir(cfg.openvino, Path(cfg.vllm.model_dir), log)
    fg_model = load_model(hf, dtype=cfg.dtype, tokenizer=tok)[0]
    spec = model_spec(hf.config)
    r = cfg.roofline
    start_ceilings = ceilings_now(spec, r, "start")

    requests = {name: make_requests(cfg.workloads[name], hf.config.vocab_size, tok) for name in cfg.run}
    with busy_neighbour(cfg.neighbour):
        timed_runs(cfg, out, requests, hf, tok, fg_model, results)
    ceilings = best_ceilings(start_ceilings, ceilings_now(spec, r, "end"))
    results["ceilings"] = asdict(ceilings)
    for w in results["workloads"].values():
        for r in w["rows"]:
            if "_steps" in r:
                r["roofline"] = roofline_summary(*r.pop("_steps"), spec, ceilings)
    if "limit" in results:
        results["probes"] = probe_rooflines(results.pop("limit"), spec, ceilings)
    results["machine"] = machine_record(machine)
    results["targets"] = targets(results)
    return write_results(out, results, markdown(results))


def _row(w: dict, system: str, setting: str | None = None) -> Optional[dict]:
    return next((r for r in w["rows"] if r["system"] == system and (setting is None or r["setting"] == setting)),
                None)


def targets(results: dict) -> list[dict]:
    """Issues 20 and 33: the targets, each with the measured value and whether it was met (None: not measured)."""
    out = []

    def add(what: str, value: Optional[float], goal: float, higher: bool = True) -> None:
        met = None if value is None else (value >= goal if higher else value < goal)
        out.append({"target": what, "value": value, "goal": goal, "met": met})

    for name, w in results["workloads"].items():
        sf = _row(w, "fastgen", "splitfuse")
        if sf is None:
            continue
        if name in ("chat", "short"):
            add(f"{name}: fastgen splitfuse / best transformers generate", sf.get("vs_best_hf"),
                3.0 if name == "chat" else 2.0)
        if name in ("chat", "long-prompt"):
            add(f"{name}: fastgen splitfuse / best vLLM offline", sf.get("vs_best_vllm"), 1.5)
        add(f"{name}: fastgen splitfuse / best OpenVINO GenAI f32 offline", sf.get("vs_best_openvino_f32"), 1.0)
        roof = sf.get("roofline", {})
        if "decode >= 8 seqs" in roof:
            add(f"{name}: decode steps of >= 8 seqs, roofline / forward time", roof["decode >= 8 seqs"]
                ["efficiency_forward"], 0.6)
        if PREFILL in roof:
            add(f"{name}: prefill steps, roofline / forward time", roof[PREFILL]["efficiency_forward"], 0.8)
    probes = results.get("probes")
    if probes:
        add(f"probe: {probes['prefill']['tokens']}-token prompt pass, GEMM-rate fraction",
            probes["prefill"]["efficiency"], 0.8)
        for b, d in probes["decode"].items():
            if int(b) >= 8:
                add(f"probe: decode step b={b}, roofline / measured", d["efficiency"], 0.6)
    for workload in {h["workload"] for h in results.get("http", [])}:
        rows = {h["server"]: h for h in results["http"] if h["workload"] == workload}
        if {"vllm", "fastgen"} <= rows.keys():
            for key in ("ttft_s_p99", "itl_s_p99"):
                f, v = rows["fastgen"][key], rows["vllm"][key]
                add(f"http {workload}: fastgen {key} / vLLM's", f / v if f is not None and v else None, 1.0,
                    higher=False)
    return out


def markdown(results: dict) -> str:
    from fastgen.analysis import markdown_table
    m, c = results["machine"], results["ceilings"]
    lines = [f"# fastgen vs its CPU peers ({results['config']['model']}, float32)", "",
             machine_line(m), "",
             *([f"**Under CPU contention**: {results['config']['neighbour']} busy process(es) (a pure-Python loop "
                "each) ran beside every timed run; the ceilings were measured without them.", ""]
               if results["config"].get("neighbour") else []),
             f"**Ceilings** (best of the start and the end of the run, loads "
             f"{[x['loadavg'][0] for x in c['meta']['measurements']]}): float32 GEMM {c['gemm_flops'] / 1e9:.1f} "
             f"GFLOP/s (square {c['meta']['gemm_n']}^3: {c['meta']['square_gemm_flops'] / 1e9:.1f}; the model's "
             "linear layers at " + ", ".join(f"{t} tokens: {f / 1e9:.1f}" for t, f in c["linear_flops"].items())
             + f"), streaming read {c['bandwidth'] / 1e9:.1f} GB/s.", ""]
    for name, w in results["workloads"].items():
        if not w["rows"]:
            continue
        s = w["summary"]
        lines += [f"## {name}: {s['num_requests']} requests, prompt mean {s['prompt_mean']:.0f}, output mean "
                  f"{s['output_mean']:.0f}, all at t=0", ""]
        table = [[r["system"], r["setting"], r["num_requests"], f"{r['wall_s']:.1f}", f"{r['total_tok_s']:.1f}",
                  f"{r['output_tok_s']:.1f}", fmt(r.get("vs_best_hf")), fmt(r.get("vs_best_vllm")),
                  fmt(r.get("vs_best_openvino_f32")),
                  "; ".join(x for x in [r.get("note", ""), "best " + "/".join(r["best_of"]) if r.get("best_of")
                                        else ""] if x)] for r in w["rows"]]
        lines += [markdown_table(["system", "setting", "requests", "wall s", "total tok/s", "output tok/s",
                                  "x best HF generate", "x best vLLM", "x best OpenVINO f32", "note"], table), ""]
        lines += [f"Set-up of {r['system']} {r['setting']}: {r['setup']}." for r in w["rows"] if r.get("setup")]
        lines.append("")
        for ref, agree in w["agreement"].items():
            if not agree:
                continue
            lines.append(f"Greedy tokens {ref} (identical sequences / positionwise): " + ", ".join(
                f"{k}: {a['identical_frac']:.2f}/{a['positionwise_frac']:.3f}" for k, a in agree.items()) + ".")
        lines.append("")
        for r in w["rows"]:
            if r.get("step_split_s"):
                t = r["step_split_s"]
                lines += [f"fastgen {r['setting']}'s steps ({t['duration_s']:.1f} s of the {r['wall_s']:.1f} s wall): "
                          + ", ".join(f"{k[:-2]} {t[k]:.1f} s ({t[k] / t['duration_s']:.0%})"
                                      for k in ("schedule_s", "prepare_s", "forward_s", "sample_s")) + ".", ""]
            if r.get("roofline"):
                lines += [f"Roofline of fastgen {r['setting']}'s steps:", "",
                          markdown_table(*summary_table(r["roofline"])), ""]
    p = results.get("probes")
    if p:
        pre = p["prefill"]
        lines += [f"## Probes (load {p['loadavg']})", "",
                  f"Prompt pass of {pre['tokens']} tokens: {pre['measured_s'] * 1e3:.0f} ms, "
                  f"{pre['achieved_flops'] / 1e9:.1f} GFLOP/s = **{pre['efficiency']:.1%}** of the GEMM rate.", "",
                  markdown_table(*probes_table(p)), ""]
    if results.get("http"):
        lines += ["## HTTP: run.py target=http against each server", "",
                  markdown_table(["workload", "server", "completed", "total tok/s", "TTFT p50 s", "TTFT p99 s",
                                  "ITL p50 s", "ITL p99 s", "load before/after"],
                                 [[h["workload"], h["server"], f"{h['num_completed']}/{h['num_requests']}",
                                   fmt(h["total_token_throughput"], ".1f"), fmt(h["ttft_s_p50"], ".3f"),
                                   fmt(h["ttft_s_p99"], ".3f"), fmt(h["itl_s_p50"], ".3f"), fmt(h["itl_s_p99"], ".3f"),
                                   f"{h['loadavg_before'][0]}/{h['loadavg_after'][0]}"]
                                  for h in results["http"]]), ""]
    if results.get("targets"):
        lines += ["## Targets (issues 20, 33)", "",
                  markdown_table(["target", "measured", "goal", "met"],
                                 [[t["target"], fmt(t["value"], ".3f"), t["goal"],
                                   {True: "yes", False: "**no**", None: "n/a"}[t["met"]]]
                                  for t in results["targets"]]), ""]
    return "\n".join(lines)


def main() -> None:
    hydra_script("bench_peers", BenchConfig, run_bench)


if __name__ == "__main__":
    main()
