"""Calibrate the simulator on this device: time the real executor's steps over a grid of ragged batches and fit
the cost model's efficiencies and overheads to them, writing a profile that executor=simulated loads.

    python -m fastgen.calibration.calibrate hardware=cpu --profile cpu                       # SmolLM2-135M, float32
    python -m fastgen.calibration.calibrate hardware=a100-80gb model=local model.source=/models/Llama-2-7b-hf \\
        --profile a100-80gb --max-tokens 4096 --max-context 8192 --max-seqs 256           # the same on a GPU

    python -m fastgen.calibration.calibrate executor=tp hardware.tensor_parallel=2 model=local model.source=DIR \\
        --profile cpu-tp2        # tensor-parallel: also fits the all-reduce term to the run's own all-reduces

Positional arguments are Hydra overrides of run.py's config (model, hardware, kv, ...). Each grid point is a
step the engine could run: prefill chunks from scratch and after a history, batches of decodes, and the
decodes-plus-prompt-chunk mixes that splitfuse makes. A point's time is the median of `--repeats` runs of
the real executor's step plus the greedy sampler (what the engine times as a step), after one warm-up run; on CUDA
the device is synchronized before the clock is read. The fit minimises squared log errors (relative error).
With tensor parallelism (executor=tp) every all-reduce rank 0's layers run during the measured steps is timed
too (its bytes and seconds, waiting for the other ranks included: fastgen.distributed.COMM); the all-reduce term
(allreduce_latency_s + 2 (n-1)/n x bytes / allreduce_bandwidth_gbs) is fitted to their median per message size
first (relative errors), and the step-time fit then takes it as given.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import time

from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from scipy.optimize import least_squares

from fastgen.conf import compose_config
from fastgen.distributed import COMM
from fastgen.executors import Executor, make_executor
from fastgen.ragged import SeqChunk
from fastgen.sampling import Sampler, SamplingParams, SamplingRow
from fastgen.sim.cost_model import PROFILES_DIR, CostModel, DeviceSheet, Profile
from fastgen.sim.work import BatchShape, StepWork


def grid(max_tokens: int, max_context: int, max_seqs: int) -> list[BatchShape]:
    """(query lens, context lens) of each point: a few shapes of every kind of step, up to the given sizes."""
    sizes = sorted({max(1, max_tokens >> k) for k in range(0, 6)} | {1})
    seqs = sorted({max(1, max_seqs >> k) for k in range(0, 6)} | {1})
    history = max(0, max_context - max_tokens)
    points = [([t], [t]) for t in sizes]                                       # a prompt chunk from scratch
    points += [([t], [t + history]) for t in sizes[-2:] if history]            # ... after a history
    points += [([1] * s, [c] * s) for s in seqs for c in (max_context // 8, max_context // 2, max_context)]  # decodes
    for s, h in zip(seqs[1::2], (0, history // 2, history)):                  # decodes + one chunk (splitfuse)
        chunk = max(1, max_tokens - s)
        points.append(([1] * s + [chunk], [max_context // 2] * s + [chunk + h]))
    for n in (4, 8):                                                           # short prompts fused into one pass
        points.append(([max_tokens // n] * n, [max_tokens // n] * n))
    return [BatchShape.of(q, c) for q, c in points]


TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}


def step_chunks(batch: BatchShape, block_size: int) -> list[SeqChunk]:
    """Plain step data of this shape: each sequence owns its own consecutive blocks (contents are irrelevant to
    the time)."""
    chunks, next_block = [], 0
    for q, ctx in zip(batch.query_lens.astype(int), batch.context_lens.astype(int)):
        n = -(-int(ctx) // block_size)
        chunks.append(SeqChunk([1] * int(q), int(ctx - q), list(range(next_block, next_block + n))))
        next_block += n
    return chunks


def device_sheet(overrides: list[str]) -> DeviceSheet:
    """The datasheet executor=simulated reads with these overrides (hardware.sim; those choosing or setting the
    measured executor left out): the ceilings the fit's efficiencies scale."""
    sheet = [o for o in overrides if not o.startswith("executor")]
    return compose_config(["executor=simulated", *sheet]).hardware.sim


def measure(executor: Executor, batch: BatchShape, repeats: int, timer=time.perf_counter) -> float:
    """Median seconds of one real step of this shape: the executor's step and the greedy sampler."""
    chunks = step_chunks(batch, executor.block_size)
    sampler, greedy = Sampler(), [SamplingRow(SamplingParams(), None, (), ())] * len(chunks)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(repeats + 1):
        sync()
        start = timer()
        logits = executor.execute(chunks).logits
        sampler(logits, greedy)
        sync()
        times.append(timer() - start)
    return statistics.median(times[1:])


def fit_allreduce(samples: list[tuple[int, float]], tensor_parallel: int) -> tuple[float, float, dict]:
    """(allreduce_latency_s, allreduce_bandwidth_gbs, report) of the cost model's all-reduce term fitted to timed
    all-reduces (bytes, seconds): the median per message size, least squares on relative errors, both >= 0."""
    from scipy.optimize import nnls

    sizes = sorted({b for b, _ in samples})
    if len(sizes) < 2:
        raise ValueError(f"fitting the all-reduce term needs all-reduces of >= 2 sizes, got {sizes}")
    medians = np.array([statistics.median(s for b, s in samples if b == size) for size in sizes])
    moved = 2 * (tensor_parallel - 1) / tensor_parallel * np.array(sizes, dtype=np.float64)
    (latency, per_byte), _ = nnls(np.stack([1 / medians, moved / medians], axis=1), np.ones(len(sizes)))
    predicted = latency + per_byte * moved
    bandwidth = 1 / per_byte / 1e9 if per_byte > 0 else float("inf")
    errors = np.abs(predicted / medians - 1)
    report = {"samples": len(samples), "fit_rel_error_median": float(np.median(errors)),
              "fit_rel_error_max": float(errors.max()),
              "points": [{"bytes": int(b), "median_s": float(m), "count": sum(1 for x, _ in samples if x == b),
                          "predicted_s": float(p)} for b, m, p in zip(sizes, medians, predicted)]}
    return float(latency), bandwidth, report


def time_allreduces(state, sizes: Sequence[int], repeats: int) -> list[tuple[int, float]]:
    """Run on every rank of a tensor-parallel group (TensorParallelExecutor.run_on_ranks): the median seconds of a
    float32 all-reduce of each size in bytes, on its own after a barrier: the link's cost, without waiting for a
    slower rank's compute."""
    device = state.options.rank_device(state.rank)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    out = []
    for nbytes in sizes:
        x = torch.ones(max(1, nbytes // 4), device=device)
        times = []
        for _ in range(repeats + 1):
            dist.barrier()
            sync()
            start = time.perf_counter()
            dist.all_reduce(x)
            sync()
            times.append(time.perf_counter() - start)
        out.append((nbytes, statistics.median(times[1:])))
    return out


def fit(cost: CostModel, batches: list[BatchShape], seconds: list[float], given: Profile | None = None) -> Profile:
    """Least squares on log times over log parameters (all positive), from a few starts (max() is not smooth);
    the fields `given` sets beyond the fitted ones (a measured all-reduce term) are kept."""
    names = Profile.fitted_names()
    given = given or Profile()
    works: list[StepWork] = [cost.work(b) for b in batches]
    measured = np.log(seconds)

    def predict(x: np.ndarray) -> np.ndarray:
        profile = dataclasses.replace(given, **dict(zip(names, np.exp(x))))
        return np.log([cost.breakdown(w, profile)["total"] for w in works])

    lo = np.log([1e-4 if "efficiency" in n else 1e-9 for n in names])
    hi = np.log([1.0 if "efficiency" in n else 1e5 if n == "matmul_half_tokens" else 10.0 for n in names])
    best = None
    for scale in (1.0, 0.1, 0.01):
        start = Profile()
        x0 = np.log([getattr(start, n) * (scale if "efficiency" in n else 1 / scale) for n in names])
        result = least_squares(lambda x: predict(x) - measured, np.clip(x0, lo + 1e-6, hi - 1e-6), bounds=(lo, hi))
        if best is None or result.cost < best.cost:
            best = result
    profile = dataclasses.replace(given, **dict(zip(names, np.exp(best.x).tolist())))
    profile.token_correction = token_correction(cost, profile, works, seconds)
    return profile


def token_correction(cost: CostModel, profile: Profile, works: list[StepWork], seconds: list[float]) -> dict:
    """Per token count, measured / modelled time (geometric mean over the points with that count), so the
    simulator follows BLAS's steps between sizes that the smooth model cannot."""
    ratios: dict[int, list[float]] = {}
    for work, measured in zip(works, seconds):
        ratios.setdefault(int(work.linear[2]), []).append(np.log(measured / cost.breakdown(work, profile)["total"]))
    return {str(t): float(np.exp(np.mean(r))) for t, r in sorted(ratios.items())}


def main(argv: list[str] | None = None) -> Profile:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. hardware=cpu model.source=...")
    parser.add_argument("--profile", default="cpu", help="name (fastgen/sim/profiles/NAME.json) or .json path")
    parser.add_argument("--max-tokens", type=int, default=768, help="largest step, in tokens")
    parser.add_argument("--max-context", type=int, default=1024, help="longest KV history")
    parser.add_argument("--max-seqs", type=int, default=32, help="most sequences in a step")
    parser.add_argument("--repeats", type=int, default=7, help="median of this many runs per point")
    parser.add_argument("--timer", choices=TIMERS, default="wall",
                        help="cpu: process CPU time, steadier on a shared machine (CPU, hardware.threads=1 only)")
    args = parser.parse_args(argv)

    points = grid(args.max_tokens, args.max_context, args.max_seqs)
    cfg = compose_config(["progress=false", "executor=real", *args.overrides])
    cfg.kv.num_blocks = max(int(np.ceil(b.context_lens / cfg.kv.block_size).sum()) for b in points)
    if args.timer == "cpu" and (cfg.hardware.device != "cpu" or cfg.hardware.threads != 1):
        raise SystemExit("--timer cpu measures a single-threaded CPU run: set hardware=cpu hardware.threads=1")
    executor = make_executor(cfg)
    sheet = device_sheet(args.overrides)
    tp = cfg.hardware.tensor_parallel
    cost = CostModel(executor.spec, sheet, cfg.hardware.dtype, tp)
    seconds = []
    started = time.perf_counter()
    for batch in points[-3:]:       # warm-up: first calls pay for allocation and kernel selection
        measure(executor, batch, 1)
    COMM.reset(record=True)
    for i, batch in enumerate(points):
        seconds.append(measure(executor, batch, args.repeats, TIMERS[args.timer]))
        print(f"[{i + 1}/{len(points)}] tokens {batch.num_tokens:5d}  seqs {batch.num_seqs:3d}  "
              f"max context {int(batch.context_lens.max()):5d}  {seconds[-1] * 1e3:9.2f} ms", flush=True)
    given, allreduce = Profile(), None
    if tp > 1:
        given.allreduce_latency_s, given.allreduce_bandwidth_gbs, allreduce = fit_allreduce(COMM.samples, tp)
    COMM.reset(record=False)
    executor.close()
    profile = fit(cost, points, seconds, given)
    predicted = np.array([cost.breakdown(b, profile)["total"] for b in points])
    errors = np.abs(predicted / np.array(seconds) - 1)
    ints = lambda a: a.astype(int).tolist()  # noqa: E731
    profile.meta = {
        "device": cfg.hardware.device, "dtype": cfg.hardware.dtype, "model": cfg.model.source,
        "threads": torch.get_num_threads(), "timer": args.timer, "hardware": dataclasses.asdict(cfg.hardware),
        "device_sheet": dataclasses.asdict(sheet),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv[1:] if argv is None else argv),
        "measure_s": round(time.perf_counter() - started, 1),
        "fit_rel_error_median": float(np.median(errors)), "fit_rel_error_max": float(errors.max()),
        **({"allreduce_fit": allreduce} if allreduce else {}),
        "points": [{"query_lens": ints(b.query_lens), "context_lens": ints(b.context_lens), "measured_s": s,
                    "predicted_s": float(p)} for b, s, p in zip(points, seconds, predicted)]}
    path = profile.save(args.profile if args.profile.endswith(".json") else PROFILES_DIR / f"{args.profile}.json")
    print(f"fit: median |error| {np.median(errors):.1%}, max {errors.max():.1%}; wrote {path}")
    if allreduce:
        print(f"all-reduce: latency {profile.allreduce_latency_s * 1e6:.1f} us, bus bandwidth "
              f"{profile.allreduce_bandwidth_gbs:.3g} GB/s over {allreduce['samples']} all-reduces; median |error| "
              f"{allreduce['fit_rel_error_median']:.1%}, max {allreduce['fit_rel_error_max']:.1%}")
    for name in Profile.fitted_names():
        print(f"  {name:22s} {getattr(profile, name):.4g}")
    return profile


if __name__ == "__main__":
    main()
