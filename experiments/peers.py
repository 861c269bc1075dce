"""What the experiments that measure fastgen beside its peers share (bench_vs_hf.py, bench_vs_vllm.py,
ray_replica_scaling.py, serve_neighbour_gap.py): their Hydra entry, the machine record, the requests every system gets, transformers
`generate`, fastgen's engine timed through the library's offline pipeline, its limit probes, servers driven by
run.py target=http, and the results files. A script imports it by name (its own directory is on sys.path).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # run from a checkout without installing fastgen
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from fastgen.compose import build_engine  # noqa: E402
from fastgen.conf import CONF_DIR, compose_config  # noqa: E402
from fastgen.machine import Machine, load_average  # noqa: E402
from fastgen.models import EMBEDDED, resolve_dtype  # noqa: E402
from fastgen.pipeline import Pipeline  # noqa: E402
from fastgen.schedulers import SCHEDULERS  # noqa: E402
from fastgen.workloads import WorkloadConfig, build_workload  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# config entry: conf/<name>.yaml, whose first default is `<name>_schema`, the script's config dataclass
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class HFGenerateConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    bs1_max_requests: int = 6            # bs=1 runs on the first N requests of the workload


@dataclass
class FastgenConfig:
    schedulers: list[str] = field(default_factory=lambda: ["splitfuse", "continuous", "orca", "static"])
    overrides: list[str] = field(default_factory=list)


@dataclass
class LimitConfig:
    repeats: int = 5
    decode_repeats: int = 4
    decode_context: Optional[int] = None


def _register(config_name: str, schema: type) -> None:
    from hydra.core.config_store import ConfigStore
    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)


def compose(config_name: str, schema: type, overrides: list[str] | tuple[str, ...] = ()):
    """conf/<config_name>.yaml with Hydra overrides applied, as a typed `schema` object (tests, notebooks)."""
    _register(config_name, schema)
    return compose_config(overrides, config_name=config_name)


def hydra_main(config_name: str, schema: type, run: Callable[[Any, str], Any]) -> None:
    """A script's entry point: conf/<config_name>.yaml with the command line's overrides through fastgen.cli's
    run_hydra (a bad value ends with one `error:` line), run into `out_dir` or Hydra's run directory."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from fastgen.cli import run_hydra

    _register(config_name, schema)

    def app(cfg) -> None:
        bench = OmegaConf.to_object(cfg)
        try:
            run(bench, bench.out_dir or HydraConfig.get().runtime.output_dir)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None

    app.__module__ = "__main__"            # Hydra names the job (and its --help) after the script, not this module
    run_hydra(hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base=None)(app), config_name)


def shrink(cfg) -> None:
    """quick=true's common part: 4 short requests per workload, a small token budget (still above the longest
    quick prompt, which continuous/orca need) and KV pool for fastgen."""
    from fastgen.workloads import LengthSpec
    for name, w in cfg.workloads.items():
        w.num_requests = 4
        w.prompt = LengthSpec(dist="normal", mean=96 if name == "long-prompt" else 48, std_frac=0.3, min=8, max=160)
        w.output = LengthSpec(dist="normal", mean=8, std_frac=0.3, min=2, max=16)
    cfg.fastgen.overrides = ["scheduler.token_budget=192", "kv.memory_gb=0.25", *cfg.fastgen.overrides]


def check(cfg, systems: tuple[str, ...], workloads: list[str], what: str = "run") -> None:
    """The systems are known, the workloads named are defined, and each workload is valid."""
    unknown = [s for s in cfg.systems if s not in systems]
    if unknown:
        raise ValueError(f"unknown systems {unknown}; choose from {systems}")
    missing = [w for w in workloads if w not in cfg.workloads]
    if missing:
        raise ValueError(f"{what} name workloads {missing} that are not in `workloads` ({sorted(cfg.workloads)})")
    for w in cfg.workloads.values():
        w.validate()


def log(msg: str) -> None:
    print(f"[{Path(sys.argv[0]).stem} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# a run's files: partial.jsonl as rows finish, results.json and results.md at the end
# ---------------------------------------------------------------------------------------------------------------
PARTIAL: Optional[Path] = None


def start_run(cfg, out_dir: str | os.PathLike, apply_quick: Callable, validate: Callable) -> Path:
    """quick sizes, validation, the output directory with its partial.jsonl, torch's threads."""
    global PARTIAL
    if cfg.quick:
        apply_quick(cfg)
    validate(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    PARTIAL = out / "partial.jsonl"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return out


def machine_record(machine: Machine) -> dict:
    """fastgen.machine's record (CPU, flags, load, CPU wait, noise warning) as of now, with the library versions."""
    import transformers
    return machine.finish(torch.get_num_threads()).asdict() | {
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def machine_line(m: dict) -> str:
    """A results page's line about the machine record: CPU, the SIMD/matrix flags that pick kernels, load, noise."""
    flags = " ".join(f for f in m["cpu_flags"].split() if f.startswith(("avx", "amx", "fma", "f16c")))
    return (f"Machine: {m['cpu_model']}, {m['cpus']} CPUs, flags {flags}; torch {m['torch']} ({m['threads']} "
            f"threads), transformers {m['transformers']}; load average at start {m['load_average_start']}, at end "
            f"{m['load_average_end']}" + (f"; **{m['noise_warning']}**" if m["noise_warning"] else "") + ".")


def write_results(out: Path, results: dict, md: str | None = None) -> dict:
    """results.json (and results.md, printed too) into `out`."""
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if md is not None:
        (out / "results.md").write_text(md)
        print(md)
        print(f"wrote {out / 'results.json'} and {out / 'results.md'}", flush=True)
    return results


def checkpoint(kind: str, item: dict) -> None:
    if PARTIAL is not None:
        with open(PARTIAL, "a") as f:
            f.write(json.dumps({"kind": kind, **item}) + "\n")
    if kind == "row":
        log(f"  {item['system']} {item['setting']} {item['dtype']}: {item['wall_s']:.1f} s, "
            f"{item['total_tok_s']:.1f} total tok/s, {item['output_tok_s']:.1f} output tok/s")


def fmt(x, spec=".2f") -> str:
    return "" if x is None else format(x, spec)


# ---------------------------------------------------------------------------------------------------------------
# requests, rows and agreement
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Req:
    prompt: list[int]
    max_new_tokens: int


def make_requests(wcfg: WorkloadConfig, vocab_size: int, tokenizer) -> list[Req]:
    workload = build_workload(wcfg, vocab_size, tokenizer)
    return [Req(list(r.prompt_token_ids), int(r.max_new_tokens)) for r in workload.requests]


def warmup_requests(reqs: list[Req]) -> list[Req]:
    """Two short requests (prompt 32 tokens, 4 new tokens) made from the workload's first prompts."""
    return [Req(r.prompt[:32], 4) for r in reqs[:2]]


def summary(reqs: list[Req]) -> dict:
    return {"num_requests": len(reqs), "prompt_mean": statistics.fmean(len(r.prompt) for r in reqs),
            "output_mean": statistics.fmean(r.max_new_tokens for r in reqs),
            "prompt_tokens": sum(len(r.prompt) for r in reqs), "output_tokens": sum(r.max_new_tokens for r in reqs)}


def row(system: str, setting: str, dtype: str, reqs: list[Req], wall: float, outputs: list[list[int]],
        **extra) -> dict:
    prompt_tokens = sum(len(r.prompt) for r in reqs)
    output_tokens = sum(r.max_new_tokens for r in reqs)
    bad = [i for i, (r, o) in enumerate(zip(reqs, outputs)) if len(o) != r.max_new_tokens]
    r = {"system": system, "setting": setting, "dtype": dtype, "num_requests": len(reqs),
         "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "wall_s": wall,
         "total_tok_s": (prompt_tokens + output_tokens) / wall, "output_tok_s": output_tokens / wall,
         "wrong_output_lengths": len(bad), **extra}
    checkpoint("row", r)
    return r


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    same = sum(x == y for x, y in zip(a, b))
    prefix, pos, n = [], 0, 0
    for x, y in zip(a, b):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefix.append(k / max(len(x), 1))
        pos += sum(p == q for p, q in zip(x, y))
        n += max(len(x), len(y))
    return {"requests": len(a), "identical_frac": same / max(len(a), 1),
            "mean_identical_prefix_frac": statistics.fmean(prefix) if prefix else None,
            "positionwise_frac": pos / max(n, 1)}


# ---------------------------------------------------------------------------------------------------------------
# transformers generate
# ---------------------------------------------------------------------------------------------------------------
def load_hf(model: str, dtype: str, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kw, directory = ({"gguf_file": EMBEDDED[model].gguf_file}, EMBEDDED[model].directory()) if model in EMBEDDED \
        else ({}, model)
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation=attn, **kw).eval()
    return hf.to(resolve_dtype(dtype)), AutoTokenizer.from_pretrained(directory, **kw)


@torch.inference_mode()
def hf_generate(hf, reqs: list[Req], batch_size: int, pad_id: int) -> tuple[float, list[list[int]]]:
    """Static batching: batches of `batch_size` in order, left padded, each run to its longest output."""
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(reqs), batch_size):
        batch = reqs[i:i + batch_size]
        width = max(len(r.prompt) for r in batch)
        n = max(r.max_new_tokens for r in batch)
        ids = torch.tensor([[pad_id] * (width - len(r.prompt)) + r.prompt for r in batch])
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch])
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=pad_id, use_cache=True)
        for r, o in zip(batch, out[:, width:].tolist()):
            outputs.append(o[:r.max_new_tokens])
    return time.perf_counter() - start, outputs


def hf_generate_rows(name: str, cfg, hf, tok, reqs: list[Req], warm: list[Req], outputs: dict) -> list[dict]:
    """A row per `cfg.hf_generate.batch_sizes`; bs=1 on the first `bs1_max_requests` requests only (said so)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    hf_generate(hf, warm, 1, pad)
    rows = []
    for bs in cfg.hf_generate.batch_sizes:
        subset = reqs[:min(cfg.hf_generate.bs1_max_requests, len(reqs))] if bs == 1 else reqs
        log(f"{name}: hf-generate bs={bs} on {len(subset)} requests (load {load_average()})")
        wall, outs = hf_generate(hf, subset, bs, pad)
        note = f"subset: first {len(subset)} of {len(reqs)} requests" if len(subset) < len(reqs) else ""
        rows.append(row("hf-generate", f"bs={bs}", cfg.dtype, subset, wall, outs, note=note))
        outputs[f"hf-generate bs={bs}"] = outs
    return rows


# ---------------------------------------------------------------------------------------------------------------
# fastgen: the library's offline pipeline over an engine whose step stats are kept
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Fastgen:
    pipe: Pipeline
    token_budget: int
    steps: list = field(default_factory=list)      # the engine's step observer fills it

    @property
    def engine(self):
        return self.pipe.engine


def build_fastgen(model, tokenizer, scheduler: str, dtype: str, overrides: list[str], instrument=None) -> Fastgen:
    """`overrides` are shared by every scheduler: a `scheduler.<knob>` one applies to the policies that have it;
    `instrument` wraps the engine's executor (see fastgen.compose.build_engine)."""
    knobs = {f.name for f in dataclasses.fields(SCHEDULERS.get(scheduler).Config)}
    overrides = [o for o in overrides if not o.startswith("scheduler.") or o.split("=")[0].split(".", 1)[1] in knobs]
    cfg = compose_config([f"scheduler={scheduler}", f"hardware.dtype={dtype}", "progress=false", *overrides])
    fg = Fastgen(Pipeline(build_engine(cfg, model, tokenizer, instrument=instrument)),
                 getattr(cfg.scheduler, "token_budget", 0))
    fg.engine.add_step_observer(fg.steps.append)
    return fg


def fastgen_run(fg: Fastgen, reqs: list[Req]) -> tuple[float, list[list[int]], list]:
    """All requests at t=0 (greedy, EOS ignored), stepped to the end; (wall, outputs, the run's step stats)."""
    first = len(fg.steps)
    start = time.perf_counter()
    outs = fg.pipe([r.prompt for r in reqs], [r.max_new_tokens for r in reqs], ignore_eos=True, detokenize=False)
    return time.perf_counter() - start, [o.token_ids for o in outs], fg.steps[first:]


def fastgen_timed(fg: Fastgen, reqs: list[Req], warm: list[Req]) -> tuple[float, list[list[int]], list, dict]:
    """The warm-up, then the timed run; its step stats and the time outside the model's forward."""
    from fastgen.metrics import step_rows
    fastgen_run(fg, warm)
    wall, outputs, steps = fastgen_run(fg, reqs)
    in_model = sum(s.forward_s for s in steps)
    in_executor = in_model + sum(s.prepare_s for s in steps)
    overhead = {"in_model_s": in_model, "in_executor_s": in_executor,
                "outside_model_frac": 1 - in_model / wall, "outside_executor_frac": 1 - in_executor / wall,
                "num_steps": len(steps)}
    return wall, outputs, step_rows(steps), overhead


def measure_limit(model, tokenizer, dtype: str, overrides: list[str], lcfg: LimitConfig, context: int,
                  max_decode_batch: int, vocab: int) -> dict:
    """Prefill throughput of one budget-sized pass, and decode step time on a grid of batch sizes."""
    from fastgen.sampling import SamplingParams
    fg = build_fastgen(model, tokenizer, "splitfuse", dtype, overrides)
    engine, budget = fg.engine, fg.token_budget
    rng = random.Random(0)

    def add(n: int, new_tokens: int) -> str:
        return engine.add_request([rng.randrange(vocab) for _ in range(n)],
                                  SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, detokenize=False))

    prefill_times = []
    for _ in range(lcfg.repeats + 1):                        # first pass is a warm-up
        add(budget, 1)
        first = len(fg.steps)
        while engine.has_unfinished():
            engine.step()
        prefill_times.append(sum(s.forward_s for s in fg.steps[first:]))
    prefill_s = statistics.median(prefill_times[1:])

    levels = sorted({b for b in (2 ** k for k in range(12)) if b <= max_decode_batch} | {max(1, max_decode_batch)},
                    reverse=True)
    # requests decode while later ones are still being prefilled: leave room for those steps too, so no probe
    # request finishes before the smallest batch size is timed
    prefill_steps = math.ceil(levels[0] * context / budget) + levels[0]
    steps_needed = (lcfg.decode_repeats + 1) * len(levels) + prefill_steps + 2
    ids = [add(context, steps_needed + 1) for _ in range(levels[0])]
    started: set[str] = set()
    while len(started) < len(ids):                                      # prefill all of them
        started.update(o.request_id for o in engine.step())
    decode_s: dict[int, float] = {}
    for b in levels:
        while len(ids) > b:
            engine.abort(ids.pop())
        times = []
        for _ in range(lcfg.decode_repeats + 1):
            engine.step()
            last = fg.steps[-1]
            if last.num_prefill_tokens != 0 or last.num_seqs != b:
                raise RuntimeError(f"decode probe at batch {b} ran a step of {last.num_seqs} sequences with "
                                   f"{last.num_prefill_tokens} prompt tokens")
            times.append(last.forward_s)
        decode_s[b] = statistics.median(times[1:])
    for i in ids:
        engine.abort(i)
    return {"token_budget": budget, "prefill_pass_s": prefill_s, "prefill_tok_s": budget / prefill_s,
            "decode_context": context, "decode_step_s": {str(b): t for b, t in sorted(decode_s.items())},
            "decode_tok_s": {str(b): b / t for b, t in sorted(decode_s.items())}}


# ---------------------------------------------------------------------------------------------------------------
# servers over HTTP, driven by run.py
# ---------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], url: str, log_path: Path | None, timeout_s: float = 600,
                 env: dict | None = None) -> tuple[subprocess.Popen, float]:
    """Starts `cmd` (its output to `log_path`) and waits for `url`/health; (the process, seconds to ready)."""
    import httpx
    env = env or {**os.environ, "PYTHONPATH": str(ROOT)}
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready; its log: {log_path}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(proc)
    raise RuntimeError(f"server not healthy after {timeout_s:.0f} s; its log: {log_path}")


def stop(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_py(overrides: list[str], out: Path) -> dict:
    """`python run.py progress=false <overrides>` into `out` (its console in out.client.log); its metrics.json."""
    cmd = [sys.executable, str(ROOT / "run.py"), "progress=false", f"hydra.run.dir={out}", *overrides]
    log_path = out.parent / f"{out.name}.client.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as logf:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=logf,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log_path}")
    return json.loads((out / "metrics.json").read_text()) | {"command": " ".join(cmd[1:])}
