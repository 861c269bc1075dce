"""The engine's host time per step: its own CPU work (schedule, plan, commit, sample, detokenize, stop strings,
stats) with no model behind it (executor=null: fixed logits of the model's vocabulary at no cost), at 16, 256 and
1,024 running sequences, for every scheduler, prefix caching off and on.

    python experiments/host_time.py                          # -> experiments/results/host_time/results.{md,json}
    python experiments/host_time.py --sizes 256 --schedulers splitfuse --steps 50 --out /tmp/ht

Each point keeps N sequences running: N requests of `--prompt` tokens (the first half a prefix they all share, so
prefix caching has something to find), `--output` new tokens each with EOS ignored, detokenized, one stop string
each (as a server's requests are); every policy is allowed N sequences per step (max_seqs, token_budget,
batch_size raised to N where lower). Once every request is decoding, `--steps` steps are timed: the median step,
per sequence, and its split (schedule: the scheduler's plan; commit: sampling from the logits, detokenization, stop
checks, the scheduler's update and stats; wall-clock medians, the engine's StepStats). The headline is the step's CPU
time on the engine's thread (time.thread_time; torch runs `--threads 1`), which other jobs on a shared machine
barely change; the wall-clock median is beside it, and the mean CPU time, which counts the garbage collector's
full collections (rare steps, invisible in a median). The start-up heap is frozen first, as `python -m
fastgen.serve` does (fastgen.engine.freeze_startup_heap; `--no-freeze-heap` leaves it). The sampler's argmax over
N x vocab logits is included: on a CPU it is the engine's work (on a GPU it would be the device's; `--vocab-size
1024` leaves it out, nearly).
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # run from a checkout without installing fastgen

import torch  # noqa: E402

from fastgen.analysis import markdown_table  # noqa: E402
from fastgen.compose import build_engine  # noqa: E402
from fastgen.conf import compose_config  # noqa: E402
from fastgen.engine import freeze_startup_heap  # noqa: E402
from fastgen.machine import Machine, machine_line, machine_record, uptime  # noqa: E402
from fastgen.models import load_config  # noqa: E402
from fastgen.sampling import SamplingParams  # noqa: E402
from fastgen.schedulers import SCHEDULERS  # noqa: E402

OUT = ROOT / "experiments" / "results" / "host_time"


def policy_overrides(scheduler: str, n: int) -> list[str]:
    """N sequences per step for any policy: its per-step caps raised to N where they are lower."""
    defaults = compose_config([f"scheduler={scheduler}"]).scheduler
    out = [f"scheduler={scheduler}"]
    for knob in ("max_seqs", "token_budget", "batch_size"):
        value = getattr(defaults, knob, None)
        if hasattr(defaults, knob) and value is not None and value < n:
            out.append(f"scheduler.{knob}={n}")
    return out


def measure(scheduler: str, prefix_caching: bool, n: int, args, config, tokenizer) -> dict:
    blocks_per_seq = -(-(args.prompt + args.output) // args.block_size) + 1
    vocab = [f"executor.vocab_size={args.vocab_size}"] if args.vocab_size else []
    cfg = compose_config(["executor=null", "progress=false", *vocab, f"kv.prefix_caching={prefix_caching}",
                          f"kv.block_size={args.block_size}", f"kv.num_blocks={n * blocks_per_seq}",
                          *policy_overrides(scheduler, n)])
    engine = build_engine(cfg, config, tokenizer)
    if args.freeze_heap:
        freeze_startup_heap()                             # as the server does once its engine is built
    try:
        return timed(engine, scheduler, prefix_caching, n, args)
    finally:
        gc.unfreeze()                                     # this point's engine can be collected once it is gone


def timed(engine, scheduler: str, prefix_caching: bool, n: int, args) -> dict:
    steps = []
    engine.add_step_observer(steps.append)
    rng = random.Random(0)
    shared = [rng.randrange(1000, 40000) for _ in range(args.prompt // 2)]
    for _ in range(n):
        prompt = shared + [rng.randrange(1000, 40000) for _ in range(args.prompt - len(shared))]
        engine.add_request(prompt, SamplingParams(max_new_tokens=args.output, ignore_eos=True, stop=["<|stop|>"]))
    started: set[str] = set()
    while len(started) < n:                               # until every request has its first token: all N decode
        started.update(o.request_id for o in engine.step() if o.new_token_ids)
        if len(steps) > 20 * n:
            raise RuntimeError(f"{scheduler}: never reached {n} decoding sequences (last step: {steps[-1]})")
    walls, cpus = [], []
    first = len(steps)
    for _ in range(args.steps):
        start, cpu = time.perf_counter(), time.thread_time()
        engine.step()
        walls.append(time.perf_counter() - start)
        cpus.append(time.thread_time() - cpu)
    timed = steps[first:]
    if any(s.num_seqs != n or s.num_tokens != n for s in timed):
        bad = next(s for s in timed if s.num_seqs != n or s.num_tokens != n)
        raise RuntimeError(f"{scheduler}: a timed step was not {n} decodes: {bad}")
    step_s = statistics.median(cpus)
    return {"scheduler": scheduler, "prefix_caching": prefix_caching, "sequences": n, "steps": len(walls),
            "step_ms": step_s * 1e3, "per_seq_us": step_s / n * 1e6, "mean_step_ms": statistics.mean(cpus) * 1e3,
            "wall_step_ms": statistics.median(walls) * 1e3,
            "schedule_ms": statistics.median(s.schedule_s for s in timed) * 1e3,
            "commit_ms": statistics.median(s.sample_s for s in timed) * 1e3}


def markdown(rows: list[dict], sizes: list[int], header: str) -> str:
    table = []
    for (scheduler, caching) in dict.fromkeys((r["scheduler"], r["prefix_caching"]) for r in rows):
        cells = [scheduler, "on" if caching else "off"]
        for n in sizes:
            r = next((r for r in rows if (r["scheduler"], r["prefix_caching"], r["sequences"]) ==
                      (scheduler, caching, n)), None)
            cells += ["-"] * 6 if r is None else [f"{r['step_ms']:.2f}", f"{r['per_seq_us']:.1f}",
                                                  f"{r['mean_step_ms']:.2f}", f"{r['wall_step_ms']:.2f}",
                                                  f"{r['schedule_ms']:.2f}", f"{r['commit_ms']:.2f}"]
        table.append(cells)
    columns = ["scheduler", "prefix caching"]
    for n in sizes:
        columns += [f"{n}: CPU ms/step", "CPU us/seq", "CPU mean ms", "wall ms/step", "schedule ms", "commit ms"]
    return f"{header}\n\n{markdown_table(columns, table)}\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[16, 256, 1024])
    parser.add_argument("--schedulers", nargs="+", default=SCHEDULERS.names())
    parser.add_argument("--prefix-caching", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per point")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--output", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="the logits' width (executor.vocab_size); default: the model's vocabulary")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the host work is one thread)")
    parser.add_argument("--no-freeze-heap", dest="freeze_heap", action="store_false",
                        help="leave the start-up heap to the garbage collector (the server freezes it)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = Machine.at_start()
    load = uptime()
    config, tokenizer = load_config(args.model)
    rows = []
    for scheduler in args.schedulers:
        for caching in args.prefix_caching:
            for n in args.sizes:
                rows.append(measure(scheduler, caching == "on", n, args, config, tokenizer))
                r = rows[-1]
                print(f"{scheduler} prefix_caching={caching} N={n}: {r['step_ms']:.2f} ms/step, "
                      f"{r['per_seq_us']:.1f} us/seq, mean {r['mean_step_ms']:.2f} (schedule {r['schedule_ms']:.2f}, "
                      f"commit {r['commit_ms']:.2f})",
                      flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record = machine_record(machine)
    header = (f"# Engine host time per step (executor=null, {args.model}: "
              f"{args.vocab_size or config.vocab_size}-token logits)\n\n"
              f"{machine_line(record)}\n\n`uptime` before: {load}; after: {uptime()}.\n\n"
              f"Command: `python experiments/host_time.py {' '.join(argv if argv is not None else sys.argv[1:])}`. "
              f"Prompts of {args.prompt} tokens (half shared), outputs of {args.output} (EOS ignored), "
              f"detokenized with one stop string; median (and mean) of {args.steps} steps with every sequence decoding"
              f"{'' if args.freeze_heap else '; start-up heap not frozen'}.")
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "machine": record, "args": {
        k: str(v) for k, v in vars(args).items()}}, indent=2))
    md = markdown(rows, args.sizes, header)
    (args.out / "results.md").write_text(md)
    print(md)
    return rows


if __name__ == "__main__":
    main()
