"""The requests every system gets and fastgen's side of a comparison: its engine timed through the library's
offline pipeline (all requests at t=0, greedy, EOS ignored), and the engine's limit that fastgen.roofline holds to
the machine's ceilings and `efficiency` holds a run to:

- prefill throughput P: the model forward of one fresh request of the token budget's prompt tokens (no past
  context), median of `repeats` passes, in tokens/s;
- decode step time D(b): the model forward of a decode step of b sequences at a given context, median of
  `decode_repeats` steps, at b on a grid of powers of two up to a largest batch (and that batch itself); D is
  linearly interpolated between grid points;
- predicted pure-forward time of a step with p prompt tokens and d decoding sequences: p / P + D(d) (D(0) = 0);
- engine efficiency = sum over a run's steps of the predicted time / measured wall time: the achieved total
  tokens/s over the forward-pass throughput at the scheduled token counts. It splits into forward efficiency
  (predicted / measured time inside the model's forward) times the in-forward fraction of wall time. P is measured
  at zero past context, so chunks of long prompts (which attend to earlier chunks) run slower than predicted,
  which lowers the efficiency; a fused step pays the weight read of both terms, which raises it slightly.
"""
from __future__ import annotations

import cProfile
import dataclasses
import io
import math
import pstats
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fastgen.compose import build_engine
from fastgen.conf import compose_config
from fastgen.pipeline import Pipeline
from fastgen.schedulers import SCHEDULERS
from fastgen.workloads import WorkloadConfig, build_workload


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


@dataclass
class LimitConfig:
    repeats: int = 5
    decode_repeats: int = 4
    decode_context: Optional[int] = None


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


def decode_seqs(step: dict) -> int:
    """Sequences in a step that are decoding (one token each); the rest of the tokens are prompt tokens."""
    return step["num_tokens"] - step["num_prefill_tokens"]


def interp_decode(decode_s: dict[int, float], d: int) -> float:
    """D(d) from the probed grid: linear between grid points, the last segment extended beyond it."""
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
    """A run's steps (fastgen.metrics.step_rows) against the engine's limit (see the module docstring)."""
    decode = {int(b): t for b, t in limit["decode_step_s"].items()}
    predicted = sum(s["num_prefill_tokens"] / limit["prefill_tok_s"] + interp_decode(decode, decode_seqs(s))
                    for s in steps)
    tokens = sum(s["num_tokens"] for s in steps)
    return {"predicted_forward_s": predicted, "limit_tok_s": tokens / predicted if predicted else None,
            "engine_efficiency": predicted / wall, "forward_efficiency": predicted / in_model if in_model else None,
            "mean_decode_batch": statistics.fmean([decode_seqs(s) for s in steps if decode_seqs(s)] or [0]),
            "max_decode_batch": max((decode_seqs(s) for s in steps), default=0),
            "mean_step_tokens": statistics.fmean([s["num_tokens"] for s in steps] or [0])}


def profile_engine(fg: Fastgen, reqs: list[Req], out: Path, top: int = 30) -> dict:
    """cProfile of a run: the `top` functions by own and by cumulative time, written to `out`."""
    prof = cProfile.Profile()
    prof.enable()
    wall, _, _ = fastgen_run(fg, reqs)
    prof.disable()
    s = io.StringIO()
    stats = pstats.Stats(prof, stream=s)
    stats.sort_stats("tottime").print_stats(top)
    s.write("\n\n--- by cumulative time ---\n")
    stats.sort_stats("cumulative").print_stats(top)
    out.write_text(s.getvalue())
    return {"file": out.name, "requests": len(reqs), "wall_s_under_cprofile": wall}
