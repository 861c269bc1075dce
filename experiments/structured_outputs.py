"""What structured outputs cost, on the embedded model (SmolLM2-135M, 49,152-token vocabulary) on this CPU:

1. the grammar mask per step (fill + apply, StepStats.grammar_mask_s) at 1, 16 and 64 constrained decode
   sequences, beside the step's whole time;
2. end-to-end throughput of a batch of requests with half of them constrained, against none constrained;
3. (--micro) the mask alone in this thread's CPU time (other processes barely change it), split into xgrammar's
   bitmask fill and its application to the logits, per sequence: what the simulator's executor.grammar_mask_s is.

    python experiments/structured_outputs.py                 # results in experiments/results/structured_outputs/
    python experiments/structured_outputs.py --rounds 5 --requests 32
    python experiments/structured_outputs.py --micro         # micro.md only (a minute)

The two arms of (2) alternate round by round (the machine is shared: load drifts into both alike); figures are
medians over the rounds. Constrained requests follow a small JSON schema and end when it completes; unconstrained
ones generate their max_new_tokens (ignore_eos), so throughput is compared in output tokens per second.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import fastgen
from fastgen.sampling import SamplingParams
from fastgen.structured import GrammarCompiler, StructuredOutput

OUT = Path(__file__).parent / "results" / "structured_outputs"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                    "maxItems": 4}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
STEPS: list = []          # every step's StepStats, in order (StepStats.index)
PROMPT = "Describe a fictional person as JSON with a name, an age and some tags:"


def run(engine, params: list[SamplingParams]) -> tuple[float, int, list]:
    """(seconds, output tokens, step stats) of one batch submitted at once."""
    first = engine.snapshot().num_steps
    start = time.perf_counter()
    for i, p in enumerate(params):
        engine.add_request(f"{PROMPT} #{i}", p)
    tokens = 0
    while engine.has_unfinished():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    return time.perf_counter() - start, tokens, STEPS[first:]


def constrained(max_new_tokens: int, seed: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, structured={"json": SCHEMA})


def mask_cost(engine, batch: int, tokens: int) -> dict:
    _, _, steps = run(engine, [constrained(tokens, i) for i in range(batch)])
    decode = [s for s in steps if s.num_constrained_seqs == batch and s.num_prefill_tokens == 0]
    per_step = statistics.median(s.grammar_mask_s for s in decode)
    return {"constrained_seqs": batch, "decode_steps": len(decode), "mask_ms_per_step": 1e3 * per_step,
            "mask_us_per_seq": 1e6 * per_step / batch,
            "step_ms": 1e3 * statistics.median(s.duration_s for s in decode),
            "mask_share_of_step": statistics.median(s.grammar_mask_s / s.duration_s for s in decode)}


def micro(tokenizer, batch: int, steps: int = 40) -> dict:
    """CPU seconds per sequence of filling and applying the masks, over `steps` steps of random logits (each
    sequence takes its masked argmax; a finished one starts again)."""
    import torch
    import xgrammar as xgr
    compiler = GrammarCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id})
    constraint = StructuredOutput.of({"json": SCHEMA})
    matchers = [compiler.compile(constraint) for _ in range(batch)]
    noise = torch.Generator().manual_seed(batch)
    fill = apply = 0.0
    for _ in range(steps):
        logits = torch.randn(batch, len(tokenizer), generator=noise)
        bitmask = xgr.allocate_token_bitmask(batch, len(tokenizer))
        start = time.thread_time()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        filled = time.thread_time()
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=list(range(batch)))
        apply += time.thread_time() - filled
        fill += filled - start
        for i, m in enumerate(matchers):
            m.accept_token(int(logits[i].argmax()))
            if m.is_terminated():
                matchers[i] = compiler.compile(constraint)
    return {"seqs": batch, "fill_us_per_seq": 1e6 * fill / steps / batch,
            "apply_us_per_seq": 1e6 * apply / steps / batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--micro", action="store_true", help="only the mask's CPU time (micro.md)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.micro:
        rows = [micro(fastgen.pipeline("smollm2-135m").engine.tokenizer, b) for b in (1, 16, 64)]
        lines = ["# Grammar mask, CPU time of this thread per sequence (SmolLM2's 49,152 tokens)", "",
                 "| seqs | fill us/seq | apply us/seq | total us/seq |", "|---|---|---|---|"]
        lines += [f"| {r['seqs']} | {r['fill_us_per_seq']:.0f} | {r['apply_us_per_seq']:.0f} | "
                  f"{r['fill_us_per_seq'] + r['apply_us_per_seq']:.0f} |" for r in rows]
        (args.out / "micro.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    engine = fastgen.pipeline("smollm2-135m").engine
    engine.add_step_observer(STEPS.append)
    run(engine, [constrained(8, 0), SamplingParams(max_new_tokens=8)])          # warm-up (and the compiler)
    masks = [mask_cost(engine, b, args.tokens) for b in (1, 16, 64)]
    arms: dict[str, list[dict]] = {"none": [], "half": []}
    for r in range(args.rounds):
        for arm in arms:
            params = [constrained(args.tokens, r * 1000 + i) if arm == "half" and i % 2 else
                      SamplingParams(max_new_tokens=args.tokens, temperature=1.0, seed=r * 1000 + i, ignore_eos=True)
                      for i in range(args.requests)]
            seconds, tokens, steps = run(engine, params)
            arms[arm].append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                              "mask_s": sum(s.grammar_mask_s for s in steps)})
    summary = {arm: {k: statistics.median(x[k] for x in runs) for k in runs[0]} for arm, runs in arms.items()}
    ratio = summary["half"]["tokens_per_s"] / summary["none"]["tokens_per_s"]
    (args.out / "results.json").write_text(json.dumps({"mask": masks, "throughput": arms, "median": summary,
                                                       "half_over_none": ratio, "args": vars(args) | {
                                                           "out": str(args.out)}}, indent=1))
    lines = ["# Structured outputs: mask cost and throughput (SmolLM2-135M, this CPU)", "",
             f"1-min load average when written: {os.getloadavg()[0]:.2f} (2 cores)", "",
             "| constrained seqs | mask ms/step | mask us/seq | step ms | mask share of step |",
             "|---|---|---|---|---|"]
    lines += [f"| {m['constrained_seqs']} | {m['mask_ms_per_step']:.2f} | {m['mask_us_per_seq']:.0f} | "
              f"{m['step_ms']:.1f} | {m['mask_share_of_step']:.1%} |" for m in masks]
    lines += ["", f"{args.requests} requests at once, {args.tokens} max tokens, {args.rounds} rounds (arms "
              "interleaved), medians:", "", "| arm | output tokens | seconds | tokens/s | mask s |",
              "|---|---|---|---|---|"]
    lines += [f"| {arm} | {s['tokens']:.0f} | {s['seconds']:.2f} | {s['tokens_per_s']:.1f} | {s['mask_s']:.3f} |"
              for arm, s in summary.items()]
    lines += ["", f"half constrained / none: {ratio:.3f} (tokens/s)"]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
