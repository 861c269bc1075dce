"""experiments/bench_vs_hf.py: its config composes, its arithmetic holds, and a quick end-to-end run (~45 s) has every
row, positive throughputs, consistent ratios and fastgen's greedy tokens equal to transformers'."""
import json
import math
import sys
from pathlib import Path

import pytest

from fastgen.peers.offline import agreement, efficiency, interp_decode

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "experiments"))    # the scripts import experiments/peers.py by name
    import bench_vs_hf
    return bench_vs_hf


def test_config_composes_with_the_project_workloads(bench):
    cfg = bench.compose_bench_config()
    assert cfg.dtype == "float32" and cfg.hf_generate.batch_sizes == [1, 8, 32]
    chat, long = cfg.workloads["chat"], cfg.workloads["long-prompt"]
    assert (chat.prompt.mean, chat.output.mean, chat.prompt.std_frac) == (256, 128, 0.3)
    assert (long.prompt.mean, long.output.mean) == (1200, 60)
    assert not chat.warmup and not long.warmup
    assert cfg.fastgen.schedulers == ["splitfuse", "continuous", "orca", "static"]
    assert len(cfg.generate_batch) >= 2
    bench.validate(cfg)
    cfg = bench.compose_bench_config(["quick=true", "run=[chat]", "compare_dtypes=[bfloat16]"])
    bench.apply_quick(cfg)
    assert cfg.workloads["chat"].num_requests == 4 and cfg.compare_dtypes == ["bfloat16"]
    with pytest.raises(ValueError, match="unknown systems"):
        bench.validate(bench.compose_bench_config(["systems=[vllm]"]))


def test_decode_interpolation_efficiency_and_agreement(bench):
    decode = {1: 0.010, 4: 0.016, 8: 0.024}
    assert interp_decode(decode, 0) == 0.0
    assert interp_decode(decode, 1) == pytest.approx(0.010)
    assert interp_decode(decode, 2) == pytest.approx(0.012)
    assert interp_decode(decode, 16) == pytest.approx(0.040)     # extrapolates the last segment
    limit = {"prefill_tok_s": 1000.0, "decode_step_s": {str(b): t for b, t in decode.items()}}
    steps = [{"num_tokens": 500, "num_prefill_tokens": 500, "num_seqs": 2},
             {"num_tokens": 504, "num_prefill_tokens": 500, "num_seqs": 5},
             {"num_tokens": 4, "num_prefill_tokens": 0, "num_seqs": 4}]
    e = efficiency(steps, wall=1.2, in_model=1.1, limit=limit)
    predicted = 0.5 + (0.5 + 0.016) + 0.016
    assert e["predicted_forward_s"] == pytest.approx(predicted)
    assert e["engine_efficiency"] == pytest.approx(predicted / 1.2)
    assert e["limit_tok_s"] == pytest.approx(1008 / predicted) and e["max_decode_batch"] == 4
    a = agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 0, 6]])
    assert a["identical_frac"] == 0.5 and a["positionwise_frac"] == pytest.approx(5 / 6)
    assert a["mean_identical_prefix_frac"] == pytest.approx((1 + 1 / 3) / 2)


def test_ratios_divide_by_the_best_transformers_row(bench):
    rows = [{"system": "hf-generate", "dtype": "float32", "total_tok_s": 10.0, "output_tok_s": 2.0},
            {"system": "hf-generate", "dtype": "float32", "total_tok_s": 20.0, "output_tok_s": 3.0},
            {"system": "hf-generate-batch", "dtype": "float32", "total_tok_s": 40.0, "output_tok_s": 8.0},
            {"system": "fastgen", "dtype": "float32", "total_tok_s": 100.0, "output_tok_s": 16.0}]
    bench.ratios(rows, "float32")
    fg = rows[-1]
    assert fg["vs_best_hf_total"] == 2.5 and fg["vs_best_hf_output"] == 2.0
    assert fg["vs_best_generate_total"] == 5.0 and fg["vs_best_generate_batch_total"] == 2.5
    assert rows[2]["vs_best_hf_total"] == 1.0 and "transformers" in rows[2]["best_of"]


# Slow: the quick run still loads the embedded model and runs HF generate, HF continuous batching and every
# scheduler end to end (~7 min on 2 busy cores); the script's table arithmetic is covered above in the default run.
@pytest.mark.slow
def test_quick_run_end_to_end(bench, tmp_path):
    cfg = bench.compose_bench_config(["quick=true", "run=[chat]", "compare_dtypes=[bfloat16]"])
    bench.run_bench(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert "fastgen" in (tmp_path / "results.md").read_text()
    w = results["workloads"]["chat"]
    rows = {(r["system"], r["setting"], r["dtype"]): r for r in w["rows"]}
    expected = {("hf-generate", f"bs={b}", "float32") for b in (1, 2, 4)} \
        | {("hf-generate-batch", "mbt128-p16", "float32")} \
        | {("fastgen", s, "float32") for s in ("splitfuse", "continuous", "orca", "static")} \
        | {("fastgen", "splitfuse", "bfloat16")}
    assert set(rows) == expected
    for r in rows.values():
        assert r["total_tok_s"] > 0 and r["output_tok_s"] > 0 and r["wall_s"] > 0
        assert r["wrong_output_lengths"] == 0
        assert r["total_tok_s"] == pytest.approx((r["prompt_tokens"] + r["output_tokens"]) / r["wall_s"])
    hf = [r for r in rows.values() if r["system"].startswith("hf") and r["dtype"] == "float32"]
    best = max(r["total_tok_s"] for r in hf)
    best_gen = max(r["total_tok_s"] for r in hf if r["system"] == "hf-generate")
    best_cb = max(r["total_tok_s"] for r in hf if r["system"] == "hf-generate-batch")
    assert best == max(best_gen, best_cb)
    for r in rows.values():
        assert r["vs_best_hf_total"] == pytest.approx(r["total_tok_s"] / best)
        assert r["vs_best_generate_total"] == pytest.approx(r["total_tok_s"] / best_gen)
        assert r["vs_best_generate_batch_total"] == pytest.approx(r["total_tok_s"] / best_cb)
    assert max(r["vs_best_hf_total"] for r in hf) == pytest.approx(1.0)
    # the real correctness check: greedy float32 fastgen == transformers generate (bs=1, no padding)
    assert w["correctness"]["fastgen_equals_hf_greedy"] is True
    assert all(a["identical_frac"] == 1.0 for a in w["correctness"]["vs_hf_generate_bs1"].values())
    lim = w["limit"]
    assert lim["prefill_tok_s"] > 0 and lim["decode_step_s"]
    for sched in ("splitfuse", "continuous", "orca", "static"):
        e = lim["efficiency"][sched]
        assert e["engine_efficiency"] > 0 and math.isfinite(e["engine_efficiency"])
        o = rows[("fastgen", sched, "float32")]["overhead"]
        assert 0 <= o["outside_executor_frac"] <= o["outside_model_frac"] < 1
    bf = w["dtypes"]["bfloat16"]
    assert bf["speedup_total_tok_s"] > 0 and 0 <= bf["greedy_agreement_vs_float32"]["identical_frac"] <= 1
    assert (tmp_path / w["profile"]["file"]).exists()
