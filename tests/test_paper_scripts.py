"""experiments/paper/: every figure script and the ablation run end to end at reduced size (--quick), simulated,
and write their PNG(s) and a Markdown table with the paper's numbers beside fastgen's, for FastGen's splitfuse, the
paper's vLLM 0.2 baseline and continuous batching. One of them runs its points in two worker processes."""
import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments" / "paper"))

SCRIPTS = {"throughput_latency": ("1.36 vs 0.67", 2, 1), "effective_throughput": ("1.42", 1, 1),
           "token_latency": ("3.7x", 1, 2), "replica_scaling": ("23.7", 1, 1), "ablation": ("(2.3x)", 1, 1)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_paper_script_quick_writes_png_and_table(script, tmp_path):
    paper_number, figures, jobs = SCRIPTS[script]
    importlib.import_module(script).main(["--quick", "--executor", "simulated", "--out", str(tmp_path),
                                          "--jobs", str(jobs)])
    table = (tmp_path / f"{script}.md").read_text()
    assert paper_number in table and "simulated executor" in table
    assert all(s in table for s in ("splitfuse", "vllm-0.2", "continuous"))
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == figures and all(p.stat().st_size > 5000 for p in pngs)


def test_quick_writes_to_scratch_never_over_the_committed_results():
    import hashlib
    import time

    from common import RESULTS, SCRATCH

    def hashes():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(RESULTS.rglob("*")) if p.is_file()}
    before, start = hashes(), time.time()
    importlib.import_module("token_latency").main(["--quick", "--executor", "simulated"])
    assert hashes() == before and before
    assert (SCRATCH / "token_latency" / "token_latency.png").stat().st_mtime >= start - 1
    assert not RESULTS.is_relative_to(SCRATCH) and not SCRATCH.is_relative_to(RESULTS)


def test_implied_host_time_interpolates_between_measured_rates_and_bounds_outside_them():
    from ablation import implied_host_ms

    known = [(0, 2.2), (10, 1.6), (20, 1.0)]       # the rate at 9 s falls as host time per step grows
    assert implied_host_ms(known, 1.3) == "15 ms"
    assert implied_host_ms(known, 0.5) == "> 20 ms"
    assert implied_host_ms(known, 3.0) == "< 0 ms"
    assert implied_host_ms([], 1.0) == "-"


def test_ablation_variants_are_fastgen_ablate_factors_and_ladder_of_vllm_02():
    """The paper ablation's rows come from fastgen.ablate (the base, each factor alone, the ladder accumulated with
    its combine rule), and are the configurations the hand-written lists had."""
    ablation = importlib.import_module("ablation")
    assert [(v.scheduler, v.extra) for v in ablation.ONE_AT_A_TIME] == [
        ("splitfuse", ("scheduler.token_budget=4096", "kv.block_size=16")),
        ("vllm-0.2", ("scheduler.pad_prompts=false",)), ("vllm-0.2", ("scheduler.max_paddings=1000000",)),
        ("vllm-0.2", ("scheduler.token_budget=768",)), ("vllm-0.2", ("kv.block_size=64",)),
        ("vllm-0.2", ("executor.cuda_graphs=true",))]
    assert [(v.scheduler, v.extra) for v in ablation.LADDER] == [
        ("vllm-0.2", ()), ("vllm-0.2", ("scheduler.pad_prompts=false",)),
        ("vllm-0.2", ("scheduler.pad_prompts=false", "kv.block_size=64")),
        ("vllm-0.2", ("scheduler.pad_prompts=false", "kv.block_size=64", "scheduler.token_budget=768")),
        ("splitfuse", ("kv.block_size=64",))]      # FastGen: a group pick drops the scheduler's knobs of the base
