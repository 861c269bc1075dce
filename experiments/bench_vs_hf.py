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

**The limit** (per workload, fastgen, the main dtype):

- prefill throughput P: the model forward of one fresh request of ``scheduler.token_budget`` prompt tokens (no
  past context), median of ``limit.repeats`` passes, in tokens/s;
- decode step time D(b): the model forward of a decode step of b sequences at context ``limit.decode_context``
  (default: the workload's mean prompt + output/2), median of ``limit.decode_repeats`` steps, at b on a grid of
  powers of two up to the largest decode batch any fastgen row reached (and that batch itself); D is linearly
  interpolated between grid points;
- predicted pure-forward time of a step with p prompt tokens and d decoding sequences: p / P + D(d) (D(0) = 0);
- **engine efficiency** = sum over the run's steps of the predicted time / measured wall time, which equals the
  achieved total tokens/s divided by the forward-pass throughput at the scheduled token counts (tokens / sum of
  predicted times). It splits into forward efficiency (predicted / measured time inside the model's forward) times
  the in-forward fraction of wall time. Caveats: P is measured at zero past context, so chunks of long prompts
  (which attend to earlier chunks) run slower than predicted, which lowers the efficiency; a fused step pays the
  weight read of both terms, which raises it slightly.
- **time outside the forward**: the steps' forward time and executor time (prepare + forward) come from the
  engine's typed step stats; 1 - in-model time / wall is the fraction spent scheduling, building the ragged
  batch, sampling and bookkeeping ("outside model"), and 1 - executor time / wall
  the same without batch building ("outside executor"). With ``profile_requests`` > 0, a separate, smaller
  splitfuse run is cProfiled and the top functions (the forward included, for reference) go to
  ``profile_<workload>.txt``.

Correctness: with greedy decoding, fastgen's tokens for the requests timed at bs=1 (no padding) must equal
transformers generate's (transformers dequantizes the GGUF to float32); every other row's agreement with fastgen
splitfuse is reported too (padding and batched kernels can flip near-ties, so those are informative only).

bfloat16 (``compare_dtypes=[bfloat16]``): fastgen splitfuse is rerun in each extra dtype on every workload; the
result has its speed-up over the main dtype and its greedy agreement with it on ``agreement_requests`` prompts of
``agreement_tokens`` tokens (fraction of identical sequences, mean identical-prefix fraction, positionwise
agreement).

Timings on a shared machine are noisy; the load average at start and end is recorded with the machine info.
"""
from __future__ import annotations

import cProfile
import dataclasses
import io
import json
import math
import os
import platform
import pstats
import statistics
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

from fastgen.models import EMBEDDED, load_model, resolve_dtype  # noqa: E402
from fastgen.compose import build_engine  # noqa: E402
from fastgen.conf import CONF_DIR, compose_config  # noqa: E402
from fastgen.metrics import step_rows  # noqa: E402
from fastgen.schedulers import SCHEDULERS  # noqa: E402
from fastgen.sampling import SamplingParams  # noqa: E402
from fastgen.workloads import LengthSpec, WorkloadConfig, build_workload  # noqa: E402

SYSTEMS = ("hf-generate", "hf-generate-batch", "fastgen")


# ---------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class HFGenerateConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    bs1_max_requests: int = 6            # bs=1 runs on the first N requests of the workload


@dataclass
class GenerateBatchSetting:
    name: str = "default"
    page_size: int = 64
    num_blocks: Optional[int] = None     # None: enough pages for every request of the workload at once
    max_batch_tokens: int = 512
    scheduler: str = "fifo"              # fifo | prefill_first
    attn_implementation: str = "sdpa"    # sdpa | paged|eager (the CPU-capable continuous-batching attentions)


@dataclass
class FastgenConfig:
    schedulers: list[str] = field(default_factory=lambda: ["splitfuse", "continuous", "orca", "static"])
    overrides: list[str] = field(default_factory=list)


@dataclass
class LimitConfig:
    repeats: int = 5
    decode_repeats: int = 4
    decode_context: Optional[int] = None


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


def register_schema(config_name: str, schema: type) -> None:
    """A benchmark's config dataclass as `<config_name>_schema`, the first default of conf/<config_name>.yaml."""
    from hydra.core.config_store import ConfigStore
    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)


def compose_typed(config_name: str, schema: type, overrides: list[str] | tuple[str, ...] = ()):
    """conf/<config_name>.yaml with Hydra overrides applied, as a typed `schema` object (for tests and notebooks)."""
    register_schema(config_name, schema)
    return compose_config(overrides, config_name=config_name)


def register_configs() -> None:
    register_schema("bench_vs_hf", BenchConfig)


def compose_bench_config(overrides: list[str] | tuple[str, ...] = ()) -> BenchConfig:
    return compose_typed("bench_vs_hf", BenchConfig, overrides)


def apply_quick(cfg: BenchConfig) -> None:
    """quick=true: 4 short requests per workload, small batch sizes, one generate_batch setting, short probes."""
    for name, w in cfg.workloads.items():
        w.num_requests = 4
        w.prompt = LengthSpec(dist="normal", mean=48 if name != "long-prompt" else 96, std_frac=0.3, min=8, max=160)
        w.output = LengthSpec(dist="normal", mean=8, std_frac=0.3, min=2, max=16)
    cfg.hf_generate.batch_sizes = [1, 2, 4]
    cfg.hf_generate.bs1_max_requests = 4
    cfg.generate_batch = [GenerateBatchSetting(name="mbt128-p16", page_size=16, max_batch_tokens=128)]
    cfg.limit = LimitConfig(repeats=1, decode_repeats=2, decode_context=None)
    # a smaller budget (still above the longest quick prompt, which continuous/orca need) and KV pool
    cfg.fastgen.overrides = ["scheduler.token_budget=192", "kv.memory_gb=0.25", *cfg.fastgen.overrides]
    cfg.profile_requests = min(cfg.profile_requests, 2)
    cfg.agreement_requests, cfg.agreement_tokens = min(cfg.agreement_requests, 2), min(cfg.agreement_tokens, 8)


def validate(cfg: BenchConfig) -> None:
    unknown = [s for s in cfg.systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown systems {unknown}; choose from {SYSTEMS}")
    missing = [w for w in cfg.run if w not in cfg.workloads]
    if missing:
        raise ValueError(f"run names workloads {missing} that are not in `workloads` ({sorted(cfg.workloads)})")
    if any(b < 1 for b in cfg.hf_generate.batch_sizes):
        raise ValueError("hf_generate.batch_sizes must be >= 1")
    for w in cfg.workloads.values():
        w.validate()


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Req:
    prompt: list[int]
    max_new_tokens: int


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_start": _loadavg()}


def _loadavg() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def make_requests(wcfg: WorkloadConfig, vocab_size: int, tokenizer) -> list[Req]:
    workload = build_workload(wcfg, vocab_size, tokenizer)
    return [Req(list(r.prompt_token_ids), int(r.max_new_tokens)) for r in workload.requests]


def warmup_requests(reqs: list[Req]) -> list[Req]:
    """Two short requests (prompt 32 tokens, 4 new tokens) made from the workload's first prompts."""
    return [Req(r.prompt[:32], 4) for r in reqs[:2]]


PARTIAL: Optional[Path] = None          # rows/limits are appended here as they finish (a long run's progress)


def checkpoint(kind: str, item: dict) -> None:
    if PARTIAL is not None:
        with open(PARTIAL, "a") as f:
            f.write(json.dumps({"kind": kind, **item}) + "\n")
    if kind == "row":
        log(f"  {item['system']} {item['setting']} {item['dtype']}: {item['wall_s']:.1f} s, "
            f"{item['total_tok_s']:.1f} total tok/s, {item['output_tok_s']:.1f} output tok/s")


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


# ---------------------------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------------------------
def load_hf(model: str, dtype: str, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if model in EMBEDDED:
        emb = EMBEDDED[model]
        kw = dict(gguf_file=emb.gguf_file)
        directory = emb.directory()
    else:
        kw, directory = {}, model
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation=attn, **kw).eval()
    hf = hf.to(resolve_dtype(dtype))
    tok = AutoTokenizer.from_pretrained(directory, **kw)
    return hf, tok


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


def cb_num_blocks(reqs: list[Req], page_size: int) -> int:
    """Pages for every request at once, plus headroom: the fifo scheduler stops admitting prompts when fewer than
    its safety margin (15%) of the pages are free, so a cache sized exactly to the workload would serialize it."""
    need = sum(math.ceil((len(r.prompt) + r.max_new_tokens) / page_size) for r in reqs)
    return math.ceil(need / 0.8) + 4


def hf_generate_batch(hf, reqs: list[Req], setting: GenerateBatchSetting, warm: list[Req]) \
        -> tuple[float, list[list[int]], dict]:
    """transformers continuous batching, the manager generate_batch uses, with per-request output lengths."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    num_blocks = setting.num_blocks or cb_num_blocks(reqs, setting.page_size)
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(r.max_new_tokens for r in reqs), eos_token_id=-1,
                           pad_token_id=0)
    cb = ContinuousBatchingConfig(page_size=setting.page_size, num_blocks=num_blocks,
                                  max_batch_tokens=setting.max_batch_tokens, scheduler_type=setting.scheduler,
                                  allow_block_sharing=False, auto_switch_to_flash=False,
                                  max_requests_per_batch=max(len(reqs), 1))
    if hf.config._attn_implementation != setting.attn_implementation:   # the manager validates it
        hf.set_attn_implementation(setting.attn_implementation)

    def drain(manager, ids: list[str]) -> dict[str, Any]:
        results: dict[str, Any] = {}
        while len(results) < len(ids):
            r = manager.get_result(timeout=1)
            if r is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped before finishing")
                continue
            if r.is_finished():
                if r.error is not None:
                    raise RuntimeError(f"generate_batch request {r.request_id} failed: {r.error}")
                results[r.request_id] = r
        return results

    with hf.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb, block=True,
                                                timeout=10, warmup=False) as manager:
        drain(manager, [manager.add_request(r.prompt, request_id=f"warm{i}", max_new_tokens=r.max_new_tokens,
                                            eos_token_id=-1) for i, r in enumerate(warm)])
        start = time.perf_counter()
        ids = [manager.add_request(r.prompt, request_id=f"r{i}", max_new_tokens=r.max_new_tokens, eos_token_id=-1)
               for i, r in enumerate(reqs)]
        results = drain(manager, ids)
        wall = time.perf_counter() - start
        resolved = getattr(manager, "continuous_batching_config", None)
    info = {"page_size": setting.page_size, "num_blocks": num_blocks, "max_batch_tokens": setting.max_batch_tokens,
            "scheduler": setting.scheduler, "attn_implementation": setting.attn_implementation}
    if resolved is not None:
        info["resolved"] = {k: getattr(resolved, k, None) for k in
                            ("num_blocks", "max_batch_tokens", "max_requests_per_batch", "use_cuda_graph")}
    return wall, [list(results[i].generated_tokens) for i in ids], info


# ---------------------------------------------------------------------------------------------------------------
# fastgen
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Fastgen:
    """An engine and the step stats it reported (the engine's step observer fills `steps`)."""

    engine: object
    token_budget: int
    steps: list = field(default_factory=list)


def build_fastgen(model, tokenizer, scheduler: str, dtype: str, overrides: list[str], instrument=None) -> Fastgen:
    """`overrides` are shared by every scheduler: a `scheduler.<knob>` one applies to the policies that have it;
    `instrument` wraps the engine's executor (see fastgen.compose.build_engine)."""
    knobs = {f.name for f in dataclasses.fields(SCHEDULERS.get(scheduler).Config)}
    overrides = [o for o in overrides if not o.startswith("scheduler.") or o.split("=")[0].split(".", 1)[1] in knobs]
    cfg = compose_config([f"scheduler={scheduler}", f"hardware.dtype={dtype}", "progress=false", *overrides])
    fg = Fastgen(build_engine(cfg, model, tokenizer, instrument=instrument), getattr(cfg.scheduler, "token_budget", 0))
    fg.engine.add_step_observer(fg.steps.append)
    return fg


def fastgen_run(fg: Fastgen, reqs: list[Req]) -> tuple[float, list[list[int]], list]:
    """All requests at t=0, step to the end; returns (wall, outputs, the run's step stats)."""
    first = len(fg.steps)
    start = time.perf_counter()
    ids = [fg.engine.add_request(r.prompt, SamplingParams(max_new_tokens=r.max_new_tokens, ignore_eos=True,
                                                          detokenize=False)) for r in reqs]
    finished = {}
    while fg.engine.has_unfinished():
        finished.update((o.request_id, o.request) for o in fg.engine.step() if o.finished)
    wall = time.perf_counter() - start
    return wall, [list(finished[i].output_token_ids) for i in ids], fg.steps[first:]


def fastgen_timed(fg: Fastgen, reqs: list[Req], warm: list[Req]) -> tuple[float, list[list[int]], list[dict], dict]:
    fastgen_run(fg, warm)
    wall, outputs, steps = fastgen_run(fg, reqs)
    in_model = sum(s.forward_s for s in steps)
    in_executor = in_model + sum(s.prepare_s for s in steps)
    overhead = {"in_model_s": in_model, "in_executor_s": in_executor,
                "outside_model_frac": 1 - in_model / wall, "outside_executor_frac": 1 - in_executor / wall,
                "num_steps": len(steps)}
    return wall, outputs, step_rows(steps), overhead


def decode_seqs(step: dict) -> int:
    """Sequences in a step that are decoding (one token each); the rest of the tokens are prompt tokens."""
    return step["num_tokens"] - step["num_prefill_tokens"]


def measure_limit(model, tokenizer, dtype: str, overrides: list[str], lcfg: LimitConfig, context: int,
                  max_decode_batch: int, vocab: int) -> dict:
    """Prefill throughput of one budget-sized pass, and decode step time on a grid of batch sizes."""
    import random
    fg = build_fastgen(model, tokenizer, "splitfuse", dtype, overrides)
    engine, budget = fg.engine, fg.token_budget
    rng = random.Random(0)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    prefill_times = []
    for _ in range(lcfg.repeats + 1):                        # first pass is a warm-up
        engine.add_request(prompt(budget), SamplingParams(max_new_tokens=1, ignore_eos=True, detokenize=False))
        first = len(fg.steps)
        while engine.has_unfinished():
            engine.step()
        prefill_times.append(sum(s.forward_s for s in fg.steps[first:]))
    prefill_s = statistics.median(prefill_times[1:])

    grid = sorted({b for b in (2 ** k for k in range(12)) if b <= max_decode_batch} | {max(1, max_decode_batch)})
    levels = list(reversed(grid))
    # requests decode while later ones are still being prefilled: leave room for those steps too, so no probe
    # request finishes before the smallest batch size is timed
    prefill_steps = math.ceil(levels[0] * context / budget) + levels[0]
    steps_needed = (lcfg.decode_repeats + 1) * len(levels) + prefill_steps + 2
    ids = [engine.add_request(prompt(context), SamplingParams(max_new_tokens=steps_needed + 1, ignore_eos=True,
                                                              detokenize=False)) for _ in range(levels[0])]
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


def interp_decode(decode_s: dict[int, float], d: int) -> float:
    if d <= 0:
        return 0.0
    xs = sorted(decode_s)
    if d <= xs[0]:
        return decode_s[xs[0]] * d / xs[0] if d < xs[0] else decode_s[xs[0]]
    for lo, hi in zip(xs, xs[1:]):
        if lo <= d <= hi:
            return decode_s[lo] + (decode_s[hi] - decode_s[lo]) * (d - lo) / (hi - lo)
    hi, lo = xs[-1], xs[-2] if len(xs) > 1 else None         # beyond the grid: extrapolate the last segment
    if lo is None:
        return decode_s[hi] * d / hi
    return decode_s[hi] + (decode_s[hi] - decode_s[lo]) * (d - hi) / (hi - lo)


def efficiency(steps: list[dict], wall: float, in_model: float, limit: dict) -> dict:
    decode = {int(b): t for b, t in limit["decode_step_s"].items()}
    predicted = sum(s["num_prefill_tokens"] / limit["prefill_tok_s"] + interp_decode(decode, decode_seqs(s))
                    for s in steps)
    tokens = sum(s["num_tokens"] for s in steps)
    return {"predicted_forward_s": predicted, "limit_tok_s": tokens / predicted if predicted else None,
            "engine_efficiency": predicted / wall, "forward_efficiency": predicted / in_model if in_model else None,
            "mean_decode_batch": statistics.fmean([decode_seqs(s) for s in steps if decode_seqs(s)] or [0]),
            "max_decode_batch": max((decode_seqs(s) for s in steps), default=0),
            "mean_step_tokens": statistics.fmean([s["num_tokens"] for s in steps] or [0])}


def profile_engine(engine, reqs: list[Req], out: Path, top: int = 30) -> dict:
    prof = cProfile.Profile()
    prof.enable()
    wall, _, _ = fastgen_run(engine, reqs)
    prof.disable()
    s = io.StringIO()
    stats = pstats.Stats(prof, stream=s)
    stats.sort_stats("tottime").print_stats(top)
    s.write("\n\n--- by cumulative time ---\n")
    stats.sort_stats("cumulative").print_stats(top)
    out.write_text(s.getvalue())
    return {"file": out.name, "requests": len(reqs), "wall_s_under_cprofile": wall}


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
# the benchmark
# ---------------------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[bench_vs_hf {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def bench_workload(name: str, cfg: BenchConfig, reqs: list[Req], hf, tok, fg_models: dict, out: Path) -> dict:
    dtype = cfg.dtype
    warm = warmup_requests(reqs)
    rows: list[dict] = []
    outputs: dict[str, list[list[int]]] = {}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    bs1_n = min(cfg.hf_generate.bs1_max_requests, len(reqs))

    result: dict[str, Any] = {"rows": rows}
    fastgen_steps: dict[str, tuple[list[dict], float, float]] = {}
    for system in cfg.systems:                       # in the order given
        if system == "hf-generate":
            hf_generate(hf, warm, 1, pad)
            for bs in cfg.hf_generate.batch_sizes:
                subset = reqs[:bs1_n] if bs == 1 else reqs
                log(f"{name}: hf-generate bs={bs} on {len(subset)} requests")
                wall, outs = hf_generate(hf, subset, bs, pad)
                note = f"subset: first {len(subset)} of {len(reqs)} requests" if len(subset) < len(reqs) else ""
                rows.append(row("hf-generate", f"bs={bs}", dtype, subset, wall, outs, note=note))
                outputs[f"hf-generate bs={bs}"] = outs

        if system == "hf-generate-batch":
            for setting in cfg.generate_batch:
                log(f"{name}: hf-generate-batch {setting.name}")
                wall, outs, info = hf_generate_batch(hf, reqs, setting, warm)
                rows.append(row("hf-generate-batch", setting.name, dtype, reqs, wall, outs, cb=info, note=""))
                outputs[f"hf-generate-batch {setting.name}"] = outs

        if system == "fastgen":
            for sched in cfg.fastgen.schedulers:
                log(f"{name}: fastgen {sched}")
                engine = build_fastgen(fg_models[dtype], tok, sched, dtype, cfg.fastgen.overrides)
                wall, outs, steps, overhead = fastgen_timed(engine, reqs, warm)
                rows.append(row("fastgen", sched, dtype, reqs, wall, outs, overhead=overhead, note=""))
                outputs[f"fastgen {sched}"] = outs
                fastgen_steps[sched] = (steps, wall, overhead["in_model_s"])
                if sched == "splitfuse" and cfg.profile_requests > 0:
                    log(f"{name}: cProfile of splitfuse on {min(cfg.profile_requests, len(reqs))} requests")
                    result["profile"] = profile_engine(engine, reqs[:cfg.profile_requests],
                                                       out / f"profile_{name}.txt")
                del engine

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


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
def fmt(x, spec=".2f") -> str:
    return "" if x is None else format(x, spec)


def markdown(results: dict) -> str:
    lines = [f"# fastgen vs transformers ({results['config']['model']}, {results['config']['dtype']})", ""]
    m = results["machine"]
    lines += [f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
              f"transformers {m['transformers']}; load average at start {m['loadavg_start']}, at end "
              f"{m.get('loadavg_end')}. Ratios are total-token (output-token) throughput divided by the best "
              "transformers row of the same dtype.", ""]
    for name, w in results["workloads"].items():
        s = w["summary"]
        lines += [f"## {name}: {s['num_requests']} requests, prompt mean {s['prompt_mean']:.0f}, output mean "
                  f"{s['output_mean']:.0f} tokens, all submitted at t=0", "",
                  "| system | setting | dtype | requests | wall s | total tok/s | output tok/s | x best HF | "
                  "x best generate | x best generate_batch | note |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in w["rows"]:
            note = "; ".join(x for x in [r.get("note", ""), ("best " + "/".join(r["best_of"])) if r.get("best_of")
                                           else "", f"{r['wrong_output_lengths']} wrong lengths"
                                           if r["wrong_output_lengths"] else ""] if x)
            lines.append(
                f"| {r['system']} | {r['setting']} | {r['dtype']} | {r['num_requests']} | {r['wall_s']:.1f} | "
                f"{r['total_tok_s']:.1f} | {r['output_tok_s']:.1f} | "
                f"{fmt(r['vs_best_hf_total'])} ({fmt(r['vs_best_hf_output'])}) | {fmt(r['vs_best_generate_total'])} | "
                f"{fmt(r['vs_best_generate_batch_total'])} | {note} |")
        lines.append("")
        if "limit" in w:
            lim = w["limit"]
            dec = ", ".join(f"b={b}: {t * 1e3:.1f} ms" for b, t in lim["decode_step_s"].items())
            lines += [f"**The limit.** One forward pass of {lim['token_budget']} prompt tokens: "
                      f"{lim['prefill_pass_s'] * 1e3:.0f} ms = {lim['prefill_tok_s']:.0f} tok/s. Decode step at "
                      f"context {lim['decode_context']}: {dec}. Engine efficiency = predicted pure-forward time "
                      "(sum over steps of prompt tokens / prefill tok/s + decode step time at the step's decode "
                      "batch) / wall time = achieved total tok/s / forward-pass throughput at the scheduled token "
                      "counts. Outside model = 1 - time in the model's forward / wall (scheduling, batch building, "
                      "sampling, bookkeeping); outside executor = the same without batch building.", "",
                      "| fastgen | steps | mean step tokens | mean decode batch | limit tok/s | achieved tok/s | "
                      "engine efficiency | forward efficiency | outside model | outside executor |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for sched, e in lim["efficiency"].items():
                r = next(r for r in w["rows"] if r["system"] == "fastgen" and r["setting"] == sched
                         and r["dtype"] == results["config"]["dtype"])
                o = r["overhead"]
                lines.append(f"| {sched} | {o['num_steps']} | {e['mean_step_tokens']:.0f} | "
                             f"{e['mean_decode_batch']:.1f} | {fmt(e['limit_tok_s'], '.1f')} | "
                             f"{r['total_tok_s']:.1f} | {e['engine_efficiency']:.3f} | "
                             f"{fmt(e['forward_efficiency'], '.3f')} | {o['outside_model_frac']:.2%} | "
                             f"{o['outside_executor_frac']:.2%} |")
            lines.append("")
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


def start_run(cfg, out_dir: str | os.PathLike, shrink: Callable, check: Callable) -> Path:
    """A benchmark run's start: quick sizes (`shrink`), validation (`check`), the output directory with its
    partial.jsonl, torch's threads."""
    global PARTIAL
    if cfg.quick:
        shrink(cfg)
    check(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    PARTIAL = out / "partial.jsonl"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return out


def run_bench(cfg: BenchConfig, out_dir: str | os.PathLike) -> dict:
    out = start_run(cfg, out_dir, apply_quick, validate)

    results: dict[str, Any] = {"config": OmegaConf.to_container(OmegaConf.structured(cfg)), "machine": machine_info(),
                               "workloads": {}}
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
        w["summary"] = {"num_requests": len(reqs), "prompt_mean": statistics.fmean(len(r.prompt) for r in reqs),
                        "output_mean": statistics.fmean(r.max_new_tokens for r in reqs),
                        "prompt_tokens": sum(len(r.prompt) for r in reqs),
                        "output_tokens": sum(r.max_new_tokens for r in reqs)}
        results["workloads"][name] = w
        results["machine"]["loadavg_end"] = _loadavg()
        (out / "results.json").write_text(json.dumps(results, indent=2))      # partial results survive a crash
    return write_results(out, results, markdown(results))


def write_results(out: Path, results: dict, md: str) -> dict:
    """results.json and results.md into `out`; the Markdown is printed too."""
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(md)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}", flush=True)
    return results


def hydra_main(config_name: str, register: Callable[[], None], run: Callable[[Any, str], Any]) -> None:
    """A benchmark script's entry point: conf/<config_name>.yaml with the command line's overrides, run into
    `out_dir` or Hydra's run directory; a bad value ends with its message, not a traceback."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    register()

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base=None)
    def app(cfg) -> None:
        bench = OmegaConf.to_object(cfg)
        try:
            run(bench, bench.out_dir or HydraConfig.get().runtime.output_dir)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None

    app()


def main() -> None:
    hydra_main("bench_vs_hf", register_configs, run_bench)


if __name__ == "__main__":
    main()
