"""Tensor parallelism on this CPU: step times at TP=1 and TP=2 for a prompt-sized and decode-sized steps, the share
of rank 0's step spent in all-reduce, and the simulator's all-reduce term fitted to the all-reduces of the run.

    python experiments/bench_tp.py                    # writes experiments/results/bench_tp/results.md
    python experiments/bench_tp.py --repeats 21 --threads 2
    python experiments/bench_tp.py --calibrate cpu-tp2   # also fits a simulator profile to a TP=2 run of the model

The model is a Llama of SmolLM2-135M's size with an even head count (SmolLM2's 9 query heads do not split over 2
ranks): 12 layers, hidden 768, 12 query / 4 KV heads, MLP 2048, vocabulary 32000 (125M parameters), with random
weights saved to a temporary safetensors directory (every rank reads its own slices). Each configuration uses the
same cores: TP=1 with --threads torch threads, TP=1 with one thread, TP=2 with --threads / 2 per rank. A step's
time is the executor's execute() (what the engine times as prepare + forward), median of --repeats after a
warm-up; "in all-reduce" is the time rank 0's layers spent in all-reduce and the LM head's gather, waiting for the
other rank included. The isolated all-reduce times are the same message sizes timed on their own after a barrier.
With --calibrate, `python -m fastgen.calibration.calibrate executor=tp hardware.tensor_parallel=2` runs on the same
model and writes fastgen/sim/profiles/<name>.json, whose all-reduce term is fitted to the calibration steps'
all-reduces (`executor=simulated hardware=cpu hardware.tensor_parallel=2 hardware.sim.profile=<name>` then simulates
it).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # run from a checkout without installing fastgen

import torch  # noqa: E402

from fastgen.compose import EngineConfig  # noqa: E402
from fastgen.distributed import COMM  # noqa: E402
from fastgen.executors import EXECUTORS, make_executor  # noqa: E402
from fastgen.kv import KV_MANAGERS  # noqa: E402
from fastgen.machine import uptime  # noqa: E402
from fastgen.calibration.calibrate import fit_allreduce, step_chunks, time_allreduces  # noqa: E402
from fastgen.sim.work import BatchShape  # noqa: E402

SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
STEPS = {"prompt 512": BatchShape.of([512], [512]), "prompt 128": BatchShape.of([128], [128]),
         "decode 16 x ctx 512": BatchShape.of([1] * 16, [512] * 16), "decode 1 x ctx 512": BatchShape.of([1], [512])}


def save_model(directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(directory)


def engine_config(directory: Path, executor: str, tp: int, threads: int) -> EngineConfig:
    knobs = {"threads_per_rank": threads} if executor == "tp" else {}
    cfg = EngineConfig(kv=KV_MANAGERS.config("blocked", block_size=64, num_blocks=160),
                       executor=EXECUTORS.config(executor, **knobs))
    cfg.model.source = str(directory)
    cfg.hardware.tensor_parallel, cfg.hardware.threads = tp, threads
    return cfg


def measure(executor, batch: BatchShape, repeats: int) -> tuple[float, float, float]:
    """Median step seconds, median share of it in rank 0's collectives, collectives per step."""
    chunks = step_chunks(batch, executor.block_size)
    times, shares = [], []
    executor.execute(chunks)
    for _ in range(repeats):
        COMM.reset()
        start = time.perf_counter()
        executor.execute(chunks)
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        shares.append(COMM.seconds / elapsed)
    return statistics.median(times), statistics.median(shares), COMM.calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="cores every configuration uses")
    parser.add_argument("--out", default=str(ROOT / "experiments/results/bench_tp"))
    parser.add_argument("--calibrate", metavar="PROFILE", help="also calibrate the simulator on a TP=2 run")
    args = parser.parse_args(argv)
    half = max(1, args.threads // 2)
    configs = [(f"TP=1, {args.threads} threads", "real", 1, args.threads), ("TP=1, 1 thread", "real", 1, 1),
               (f"TP=2, {half} thread(s) per rank", "tp", 2, half)]
    load_before = uptime()
    rows, allreduce_samples, isolated = {}, [], []
    with tempfile.TemporaryDirectory() as tmp:
        save_model(Path(tmp))
        for label, kind, tp, threads in configs:
            executor = make_executor(engine_config(Path(tmp), kind, tp, threads))
            try:
                for name, batch in STEPS.items():
                    COMM.reset(record=True)
                    rows[label, name] = measure(executor, batch, args.repeats)
                    allreduce_samples += COMM.samples
                    print(f"{label:28s} {name:20s} {rows[label, name][0] * 1e3:8.2f} ms  "
                          f"{rows[label, name][1]:6.1%} in collectives", flush=True)
                if tp > 1:
                    sizes = sorted({int(b.num_tokens) * SHAPE["hidden_size"] * 4 for b in STEPS.values()}
                                   | {2 ** k for k in range(10, 23, 2)})
                    isolated = executor.run_on_ranks(time_allreduces, sizes, args.repeats)[0]
            finally:
                executor.close()
                COMM.reset(record=False)
        profile = None
        if args.calibrate:
            from fastgen.calibration.calibrate import main as calibrate
            profile = calibrate(["executor=tp", "hardware.tensor_parallel=2", "model=local", f"model.source={tmp}",
                                 f"executor.threads_per_rank={half}", "--profile", args.calibrate,
                                 "--max-tokens", "512", "--max-context", "1024", "--max-seqs", "16", "--repeats", "5"])
    load_after = uptime()
    latency, bandwidth, report = fit_allreduce(allreduce_samples, 2)
    iso_latency, iso_bandwidth, iso_report = fit_allreduce([(b, s) for b, s in isolated], 2)
    write(Path(args.out), args, configs, rows, (latency, bandwidth, report), (iso_latency, iso_bandwidth, iso_report),
          profile, load_before, load_after)


def write(out: Path, args, configs, rows, in_steps, alone, profile, load_before: str, load_after: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    base = configs[0][0]
    lines = [f"# Tensor parallelism on the CPU ({datetime.date.today()})", "",
             f"`python experiments/bench_tp.py --repeats {args.repeats} --threads {args.threads}`; "
             f"{os.cpu_count()} cores, float32, torch {torch.__version__}, gloo. Model: Llama {SHAPE['num_hidden_layers']}"
             f" layers, hidden {SHAPE['hidden_size']}, {SHAPE['num_attention_heads']} query / "
             f"{SHAPE['num_key_value_heads']} KV heads, MLP {SHAPE['intermediate_size']}, vocabulary "
             f"{SHAPE['vocab_size']} (random weights).", "",
             f"Machine load: before `{load_before}`; after `{load_after}`.", "",
             "| step | " + " | ".join(c[0] for c in configs) + f" | TP=2 / ({base}) |",
             "| --- |" + " ---: |" * (len(configs) + 1)]
    for name in STEPS:
        cells = [f"{rows[c[0], name][0] * 1e3:.1f} ms" + (f" ({rows[c[0], name][1]:.0%} in all-reduce, "
                 f"{rows[c[0], name][2]} collectives)" if c[2] > 1 else "") for c in configs]
        ratio = rows[configs[-1][0], name][0] / rows[base, name][0]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    lines += ["", "## The simulator's all-reduce term", "",
              "Fitted (`fastgen.calibration.calibrate.fit_allreduce`: latency + 2 (n-1)/n x bytes / bus bandwidth, "
              "relative "
              "errors, median per message size):", "",
              "| all-reduces | latency | bus bandwidth | median error | max error |", "| --- | ---: | ---: | ---: | ---: |"]
    fits = [("inside the TP=2 steps above (rank 0, waits included)", in_steps), ("alone, after a barrier", alone)]
    if profile is not None:
        fits.append((f"inside the calibration steps (`--calibrate {args.calibrate}`, in the profile)",
                     (profile.allreduce_latency_s, profile.allreduce_bandwidth_gbs, profile.meta["allreduce_fit"])))
    for label, (latency, bandwidth, report) in fits:
        lines.append(f"| {label} | {latency * 1e6:.1f} us | {bandwidth:.3g} GB/s | "
                     f"{report['fit_rel_error_median']:.1%} | {report['fit_rel_error_max']:.1%} |")
    lines += ["", "| bytes | in steps: median | fit | alone: median | fit |", "| ---: | ---: | ---: | ---: | ---: |"]
    alone_points = {p["bytes"]: p for p in alone[2]["points"]}
    for p in in_steps[2]["points"]:
        a = alone_points.get(p["bytes"])
        lines.append(f"| {p['bytes']} | {p['median_s'] * 1e6:.0f} us | {p['predicted_s'] * 1e6:.0f} us | "
                     + (f"{a['median_s'] * 1e6:.0f} us | {a['predicted_s'] * 1e6:.0f} us |" if a else "| |"))
    if profile is not None:
        lines += ["", f"The `{args.calibrate}` profile's step-time fit over its {len(profile.meta['points'])} TP=2 "
                  f"steps: median error {profile.meta['fit_rel_error_median']:.1%}, max "
                  f"{profile.meta['fit_rel_error_max']:.1%}."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
