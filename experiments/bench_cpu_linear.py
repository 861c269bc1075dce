"""The model's linear layers at few rows on a CPU: each way of running a GEMM, side by side, against the machine's
square-GEMM rate and the weight-read roofline (issue 33, item 2).

    python experiments/bench_cpu_linear.py                                  # all shapes and rows, both timings
    python experiments/bench_cpu_linear.py --inductor --rows 1 8 32 64 --shapes gate_up down --timings cpu
                                                                            # + torch.compile's C++ GEMM template
    python experiments/bench_cpu_linear.py --out experiments/results/cpu_linear

Shapes are SmolLM2-135M's (fastgen.model_spec): fused QKV, output, fused gate/up, down and the LM head. Each shape
gets as many distinct float32 weights as the model has (one per layer, one LM head), so a pass over them reads the
weights from memory as a decode step does; a time is the best of `--repeats` passes (a loaded machine's least
disturbed one), per layer. Two timings, in one run, variants interleaved per (shape, rows):
- `1 thread, CPU time`: torch.set_num_threads(1) and time.thread_time, which other processes on a loaded machine
  disturb least (shared caches and memory bandwidth still are);
- `N threads, wall`: torch's default thread count and time.perf_counter, what a step sees on an idle machine.
Each is held to ceilings measured in the same run at the same thread count and on the same clock
(fastgen.roofline): the square-GEMM rate (the better of MKL and oneDNN) and the streaming bandwidth; at M rows a
weight read once allows M/2 flop per byte, so a layer's roofline is min(GEMM rate, M/2 x bandwidth).

Variants: `mkl` F.linear on the plain weight (MKL sgemm), `onednn` oneDNN on the weight reordered once
(fastgen.kernels.linear), `auto` which of the two hardware.linear=auto picked for this row count, calibrated in
this run at that thread count (on one thread it times CPU time, on several wall time, so under load its
picks may disagree with the columns where the two are close), and with
--inductor `inductor`: torch.compile with max-autotune restricted to inductor's C++ GEMM template
(max_autotune_gemm_backends="CPP", freezing so that the weights are constants it packs).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastgen.kernels.linear import Calibration, onednn_linear, reorder  # noqa: E402
from fastgen.models import load_config, model_class  # noqa: E402
from fastgen.roofline import best_s, measure_bandwidth, measure_gemm_flops  # noqa: E402

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 768)


def model_shapes(name: str) -> dict[str, tuple[int, int, int]]:
    """{layer: (out features, in features, how many of them)} of a model's linear layers."""
    spec = model_class(config := load_config(name, load_tokenizer=False)[0]).describe(config)
    mlp_out = 2 * spec.intermediate if spec.gated_mlp else spec.intermediate
    return {"qkv": (spec.q_size + 2 * spec.kv_size, spec.hidden, spec.num_layers),
            "o": (spec.hidden, spec.q_size, spec.num_layers),
            "gate_up": (mlp_out, spec.hidden, spec.num_layers),
            "down": (spec.hidden, spec.intermediate, spec.num_layers),
            "lm_head": (spec.vocab_size, spec.hidden, 1)}


def inductor_pass(weights: list[torch.Tensor], x: torch.Tensor) -> Callable[[], object]:
    """One compiled module holding every weight as a frozen constant, applying each to x."""
    import torch._inductor.config as ic
    ic.max_autotune = True
    ic.max_autotune_gemm_backends = "CPP"
    ic.freezing = True
    layers = torch.nn.ModuleList(torch.nn.Linear(w.shape[1], w.shape[0], bias=False) for w in weights)
    for lin, w in zip(layers, weights):
        lin.weight.data = w

    class Pass(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            return [lin(x) for lin in self.layers]

    compiled = torch.compile(Pass().eval(), dynamic=False)

    def run():
        with torch.no_grad():
            return compiled(x)
    run()
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    ap.add_argument("--shapes", nargs="+", default=None, help="a subset of qkv o gate_up down lm_head")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="the wall-time timing's threads")
    ap.add_argument("--inductor", action="store_true", help="add torch.compile's C++ GEMM template (slow to build)")
    ap.add_argument("--timings", choices=("both", "cpu", "wall"), default="both")
    ap.add_argument("--out", type=Path, default=None, help="a folder for linear.md")
    args = ap.parse_args()
    shapes = model_shapes(args.model)
    shapes = {k: v for k, v in shapes.items() if args.shapes is None or k in args.shapes}
    torch.manual_seed(0)
    weights = {k: [torch.randn(o, i) * 0.02 for _ in range(n)] for k, (o, i, n) in shapes.items()}
    reordered = {k: [reorder(w) for w in ws] for k, ws in weights.items()}
    timings = {"1 thread, CPU time": (1, time.thread_time), f"{args.threads} threads, wall": (args.threads,
                                                                                               time.perf_counter)}
    timings = {k: v for k, v in timings.items() if args.timings == "both" or (args.timings == "cpu") == (v[0] == 1)}
    lines = [f"load average at start {tuple(round(x, 2) for x in os.getloadavg())}, torch {torch.__version__}, "
             f"capability {torch.backends.cpu.get_cpu_capability()}"]
    with torch.no_grad():                 # (not inference mode: torch.compile's freezing needs normal tensors)
        for title, (threads, clock) in timings.items():
            torch.set_num_threads(threads)
            gemm, bw = measure_gemm_flops(clock=clock), measure_bandwidth(clock=clock)
            start = time.perf_counter()
            calibrations = {k: Calibration.measure(weights[k], reordered[k]) for k in shapes}
            calibrated_s = time.perf_counter() - start
            lines += ["", f"## {title}: square GEMM {gemm / 1e9:.1f} GFLOP/s, bandwidth {bw / 1e9:.1f} GB/s, "
                      f"load {os.getloadavg()[0]:.2f}; auto's calibration of these shapes took {calibrated_s:.2f} s",
                      "",
                      "| layer | rows | variant | ms/layer | GFLOP/s | weights GB/s | % square GEMM | % roofline |",
                      "|---|---:|---|---:|---:|---:|---:|---:|"]
            for k, (o, i, n) in shapes.items():
                for m in args.rows:
                    x = torch.randn(m, i)
                    variants = {"mkl": lambda: [F.linear(x, w) for w in weights[k]],
                                "onednn": lambda: [onednn_linear(x, p, None) for p in reordered[k]]}
                    if args.inductor:
                        torch.set_num_threads(threads)
                        variants["inductor"] = inductor_pass(weights[k], x)
                    flops, nbytes = 2 * m * o * i * n, 4 * o * i * n
                    roof = min(gemm, m / 2 * bw)
                    for name, fn in variants.items():
                        t = best_s(fn, args.repeats, clock)
                        lines.append(f"| {k} {i}->{o} | {m} | {name} | {t / n * 1e3:.3f} | {flops / t / 1e9:.1f} | "
                                     f"{nbytes / t / 1e9:.1f} | {flops / t / gemm:.0%} | {flops / t / roof:.0%} |")
                    pick = "onednn" if calibrations[k].uses_onednn(m) else "mkl"
                    lines.append(f"| | | auto (calibrated at load) | {pick} | | | | |")
                    print("\n".join(lines[-len(variants) - 1:]), flush=True)
    lines.append(f"\nload average at end {tuple(round(x, 2) for x in os.getloadavg())}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "linear.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
