"""Speculative decoding on and off: prompt lookup (speculative=ngram) on the embedded SmolLM2-135M (this CPU), on
prompts the answer quotes (workload=quote), on random prompts and on prose the model continues
(workload.prompt_source=corpus), where lookups pay only as far as the output repeats itself (adaptive speculation
switches them off for requests whose proposals fail); and, simulated at paper scale (Llama-2-70B on 4xA100), how
the best speculative budget (scheduler.max_speculative_tokens) moves with load (1, 4, 16, 64 clients), proposals
accepted at a per-request rate ~ Beta(3, 2) (speculative=synthetic). The `sampled` part draws SmolLM2's tokens at
temperature 1 on random prompts (seeded), whose outputs rarely repeat: there speculation must not cost. The
`draft` part charges each simulated proposal step a Llama-2-7B draft model's decode steps
(speculative.draft_model) and draws acceptance from the rates measured on SmolLM2 with ngram on workload=quote.

    python experiments/speculative.py                    # both parts -> experiments/results/speculative/
    python experiments/speculative.py --parts real --rounds 3
    python experiments/speculative.py --parts sampled
    python experiments/speculative.py --parts draft --clients 1 4 16

The real part runs each case off and on back to back, `--rounds` times (interleaved, so a shared machine's load
falls on both alike), single-threaded and timed in this process's CPU seconds (fastgen.sim.CPUClock); the ratio
is on / off of the summed rounds. `uptime` before and after goes into the file.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # run from a checkout without installing fastgen

from fastgen.analysis import markdown_table  # noqa: E402
from fastgen.bench import run_or_reuse  # noqa: E402
from fastgen.compose import build_engine  # noqa: E402
from fastgen.conf import compose_config  # noqa: E402
from fastgen.machine import uptime  # noqa: E402
from fastgen.pipeline import Pipeline  # noqa: E402
from fastgen.sim.clocks import CPUClock  # noqa: E402

REAL = ["hardware.threads=1", "workload.clients=1", "workload.num_requests=4"]
OWN = ["workload=default", "workload.prompt.mean=192", "workload.prompt.max=512", "workload.output.dist=fixed",
       "workload.output.mean=96"]
REAL_CASES = {"quote": ["workload=quote"], "random": OWN, "corpus": [*OWN, "workload.prompt_source=corpus"]}
SIM = ["executor=simulated", "hardware=a100-80gb", "hardware.tensor_parallel=4", "model.source=llama-2-70b",
       "workload.num_requests=128", "workload.prompt.mean=1200", "workload.output.mean=128", "workload.output.max=512"]
SPECULATIVE = ["speculative=synthetic", "scheduler.speculate_first=true"]
METRICS = {"output_token_throughput": "out tok/s", "tpot_s_p50": "TPOT P50 s", "spec_acceptance_rate": "accepted",
           "spec_accepted_per_verify": "accepted/verify", "spec_token_share": "spec share"}
SIM_METRICS = {**METRICS, "spec_draft_s": "draft s"}
SIM_HEADER = ["clients", "case", *SIM_METRICS.values(), "vs off", ""]


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def real(args, out: Path) -> str:
    from fastgen.models import load_model    # once, shared by every run
    cfg = compose_config(REAL)
    model, tokenizer = load_model(cfg.model.source, cfg.hardware.dtype, cfg.hardware.device)
    before, rows = uptime(), []
    for case, extra in REAL_CASES.items():
        runs = {"none": [], "ngram": []}
        for r in range(args.rounds):
            for spec in runs:
                runs[spec].append(run_or_reuse(["progress=false", "timer=cpu", *REAL, *extra, f"speculative={spec}",
                                                f"workload.seed={r}"], out / "runs" / "real" / f"{case}-{spec}-{r}",
                                               args.reuse, model, tokenizer, CPUClock()))
        tokens = {s: sum(m["num_output_tokens"] for m in ms) for s, ms in runs.items()}
        seconds = {s: sum(m["num_output_tokens"] / m["output_token_throughput"] for m in ms) for s, ms in runs.items()}
        speed = {s: tokens[s] / seconds[s] for s in runs}
        on = runs["ngram"][-1]
        rows.append([case, fmt(speed["none"]), fmt(speed["ngram"]), f"{speed['ngram'] / speed['none']:.2f}x",
                     *(fmt(on.get(k)) for k in list(METRICS)[2:])])
        print(markdown_table(["case", "out tok/s off", "on", "on/off", *list(METRICS.values())[2:]], rows[-1:]),
              flush=True)
    header = ["workload", "out tok/s off", "out tok/s on", "on/off", "accepted (last on run)", "accepted/verify",
              "spec share"]
    return (f"## SmolLM2-135M on this CPU (1 thread, CPU seconds; {args.rounds} interleaved rounds, 1 client)\n\n"
            f"Overrides: `{' '.join(REAL)}`; cases: {REAL_CASES}\n\nuptime before: `{before}`  \nuptime after: "
            f"`{uptime()}`\n\n" + markdown_table(header, rows))


SAMPLED = {"off": ["speculative=none"], "ngram": ["speculative=ngram"],
           "ngram min_n=1": ["speculative=ngram", "speculative.min_n=1"],
           "ngram min_n=1, not adaptive": ["speculative=ngram", "speculative.min_n=1",
                                           "scheduler.adaptive_speculation=false"]}


def sampled(args, out: Path) -> str:
    """One client's requests one after another through the pipeline, temperature 1, every case in turn for each
    prompt; output tokens per CPU second (single-threaded). min_n=1 makes lookups find (mostly wrong) matches."""
    from fastgen.models import load_model
    cfg = compose_config(REAL)
    model, tokenizer = load_model(cfg.model.source, cfg.hardware.dtype, cfg.hardware.device)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.spec.vocab_size, 192).tolist() for _ in range(args.rounds * 3)]
    before = uptime()
    pipes = {case: Pipeline(build_engine(compose_config([*REAL, *extra]), model, tokenizer))
             for case, extra in SAMPLED.items()}
    seconds, tokens, stats = dict.fromkeys(pipes, 0.0), dict.fromkeys(pipes, 0), {case: [] for case in pipes}
    for case, pipe in pipes.items():
        pipe.engine.add_step_observer(stats[case].append)
    for i, prompt in enumerate(prompts):
        for case, pipe in pipes.items():
            start = time.process_time()
            output, = pipe([prompt], max_new_tokens=96, temperature=1.0, seed=i, ignore_eos=True)
            seconds[case] += time.process_time() - start
            tokens[case] += len(output.token_ids)
    rows = []
    for case in pipes:
        proposed, accepted = (sum(getattr(s, k) for s in stats[case])
                              for k in ("num_proposed_tokens", "num_accepted_tokens"))
        speed = tokens[case] / seconds[case]
        rows.append([case, fmt(speed), f"{speed / (tokens['off'] / seconds['off']):.2f}x",
                     fmt(accepted / proposed if proposed else None), str(sum(s.num_verifies for s in stats[case]))])
    return (f"## SmolLM2-135M on this CPU, sampled (temperature 1, random 192-token prompts, 96 tokens, 1 client, "
            f"{len(prompts)} requests per case, cases in turn per prompt; 1 thread, CPU seconds)\n\n"
            f"uptime before: `{before}`  \nuptime after: `{uptime()}`\n\n"
            + markdown_table(["case", "out tok/s", "vs off", "accepted", "verifies"], rows))


def sim_rows(args, out: Path, part: str, cases: dict[str, list[str]]) -> list[list]:
    """Each case at each client count, simulated; its throughput vs the case `off`, and the best case marked."""
    rows = []
    for clients in args.clients:
        results = {case: run_or_reuse(["progress=false", *SIM, f"workload.clients={clients}", *extra],
                                      out / "runs" / part / f"c{clients}-{case.replace(' ', '')}", args.reuse)
                   for case, extra in cases.items()}
        base = results["off"]["output_token_throughput"]
        best = max(results, key=lambda c: results[c]["output_token_throughput"])
        for case, m in results.items():
            rows.append([clients, case, *(fmt(m.get(k)) for k in SIM_METRICS),
                         f"{m['output_token_throughput'] / base:.2f}x", "best" if case == best else ""])
        print(markdown_table(SIM_HEADER, rows[-len(cases):]), flush=True)
    return rows


def sim(args, out: Path) -> str:
    before = uptime()
    cases = {"off": ["speculative=none"], **{f"cap {c}": [*SPECULATIVE, f"scheduler.max_speculative_tokens={c}"]
                                             for c in args.caps},
             "after prompts": ["speculative=synthetic"]}
    rows = sim_rows(args, out, "sim", cases)
    return (f"## Llama-2-70B on 4xA100-80GB, simulated\n\nOverrides: `{' '.join(SIM)}`; speculative cases: "
            f"`{' '.join(SPECULATIVE)} scheduler.max_speculative_tokens=<cap>` (proposal slots granted before "
            "prompt chunks, at most <cap> a step) and `after prompts` (`speculative=synthetic` with SplitFuse's "
            "default: slots only from what prompts leave, cap 256)\n\n"
            f"uptime before: `{before}`  \nuptime after: `{uptime()}`\n\n" + markdown_table(SIM_HEADER, rows))


MEASURED = "speculative.acceptance=measured:smollm2-ngram-quote"
DRAFT = "speculative.draft_model=llama-2-7b"
DRAFT_CASES = {"off": ["speculative=none"], "Beta(3,2)": ["speculative=synthetic"],
               "Beta(3,2) + 7B draft": ["speculative=synthetic", DRAFT],
               "measured": ["speculative=synthetic", MEASURED],
               "measured + 7B draft": ["speculative=synthetic", MEASURED, DRAFT]}


def draft(args, out: Path) -> str:
    rows = sim_rows(args, out, "draft", DRAFT_CASES)
    return (f"## Llama-2-70B on 4xA100-80GB, simulated: draft cost and measured acceptance\n\nOverrides: "
            f"`{' '.join(SIM)}`; cases: {DRAFT_CASES}. `measured`: per-request rates of SmolLM2-135M with "
            "speculative=ngram on workload=quote (fastgen/sim/profiles/acceptance/smollm2-ngram-quote.json); "
            "`7B draft`: each proposal step costs Llama-2-7B's k decode steps on the same 4 GPUs.\n\n"
            + markdown_table(SIM_HEADER, rows))


PARTS = ["real", "sampled", "sim", "draft"]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["real", "sampled", "sim", "draft"], choices=PARTS)
    parser.add_argument("--rounds", type=int, default=2, help="real part: interleaved off/on rounds per case")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16, 64], help="simulated part")
    parser.add_argument("--caps", nargs="+", type=int, default=[16, 64, 256], help="simulated part: budgets")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "speculative")
    parser.add_argument("--reuse", action="store_true", help="keep runs already in --out")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    title = (f"# Speculative decoding: off vs on\n\nCommand: `python experiments/speculative.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}` on {os.cpu_count()} CPU cores.\n\n")
    sections = []
    for part, run in (("real", real), ("sampled", sampled), ("sim", sim), ("draft", draft)):
        if part in args.parts:
            sections.append(run(args, args.out))
            (args.out / f"{part}.md").write_text(title + sections[-1] + "\n")
    text = "\n\n".join(sections)
    print(text)
    return text


if __name__ == "__main__":
    main()
