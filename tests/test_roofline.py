"""fastgen.roofline: a step's work from the model's shape, the roofline time per step kind, and the ceilings'
measurements (on tiny sizes, so the test stays fast)."""
import pytest
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from fastgen.roofline import (DECODE, MIXED, PREFILL, Ceilings, StepShapes, best_ceilings, measure_ceilings,
                              probe_rooflines, probes_table, roofline_summary, roofline_s, step_work,
                              summary_table)
from fastgen.sim.shapes import model_spec

CFG = dict(vocab_size=100, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
SHAPE = model_spec(LlamaConfig(**CFG))
LAYER = 16 * (16 + 2 * 8) + 16 * 16 + 3 * 16 * 24           # QKV (head_dim 4, 2 KV heads), output, gate+up+down
KV_PER_TOKEN = 2 * 2 * 2 * 4 * 4                              # K and V x layers x KV heads x head_dim x 4 bytes


def test_step_work_splits_prefill_and_decode():
    assert SHAPE.layer_params == LAYER
    w = step_work(SHAPE, [5, 1, 1], [8, 10, 3])
    assert w.kind == MIXED and (w.prefill_tokens, w.decode_seqs) == (5, 2)
    layer_flops, head_flops = 2 * 2 * LAYER, 2 * 100 * 16
    attn = 4 * 16 * 5 * (8 - 2) * 2                          # q_size x tokens x mean keys seen x layers
    assert w.prefill_flops == pytest.approx(5 * layer_flops + head_flops + attn)
    assert w.decode_linear_flops == pytest.approx(2 * (layer_flops + head_flops))
    assert w.kv_bytes == (10 + 3) * KV_PER_TOKEN
    assert w.weight_bytes == (2 * LAYER + 100 * 16) * 4
    assert step_work(SHAPE, [7], [7]).kind == PREFILL and step_work(SHAPE, [1, 1], [4, 9]).kind == DECODE


def test_sliding_windows_cap_the_kv_read_and_the_attention_per_layer():
    mistral = model_spec(MistralConfig(**CFG, sliding_window=6))
    assert step_work(mistral, [1], [50]).kv_bytes == 6 * KV_PER_TOKEN
    qwen = model_spec(Qwen2Config(**CFG, use_sliding_window=True, sliding_window=6,
                                  layer_types=["sliding_attention", "full_attention"]))
    assert qwen.windows == (6, None)
    assert step_work(qwen, [1], [50]).kv_bytes == (6 + 50) * KV_PER_TOKEN / 2
    full, windowed = step_work(SHAPE, [10], [40]), step_work(qwen, [10], [40])
    qwen_linear = 10 * 2 * 2 * qwen.layer_params + 2 * 100 * 16
    assert windowed.prefill_flops - qwen_linear == pytest.approx(4 * 16 * 10 * (6 + 35.5))
    assert full.prefill_flops - (10 * 2 * 2 * LAYER + 2 * 100 * 16) == pytest.approx(4 * 16 * 10 * 35.5 * 2)


def test_roofline_per_step_kind():
    c = Ceilings(gemm_flops=1e9, bandwidth=1e8)
    prefill, decode = step_work(SHAPE, [5], [8]), step_work(SHAPE, [1, 1], [10, 3])
    assert roofline_s(prefill, c) == pytest.approx(prefill.prefill_flops / 1e9)
    memory_bound = max(decode.weight_bytes / 1e8, decode.decode_linear_flops / 1e9) + decode.kv_bytes / 1e8
    assert roofline_s(decode, c) == pytest.approx(memory_bound) and decode.weight_bytes / 1e8 > 0
    compute_bound = Ceilings(gemm_flops=1e3, bandwidth=1e12)
    assert roofline_s(decode, compute_bound) == pytest.approx(decode.decode_linear_flops / 1e3 + decode.kv_bytes / 1e12)
    mixed = step_work(SHAPE, [5, 1, 1], [8, 10, 3])
    assert roofline_s(mixed, c) == pytest.approx(roofline_s(prefill, c) + roofline_s(decode, c))


def test_bad_steps_are_refused():
    with pytest.raises(ValueError, match="one .new tokens, context. pair"):
        step_work(SHAPE, [1], [])
    with pytest.raises(ValueError, match="context >= its new tokens"):
        step_work(SHAPE, [4], [3])


def test_measured_ceilings_are_positive_and_take_the_best_gemm_rate():
    c = measure_ceilings(SHAPE, tokens=(1, 4), gemm_n=64, bandwidth_bytes=2**20, repeats=1)
    assert c.bandwidth > 0 and set(c.linear_flops) == {1, 4} and all(v > 0 for v in c.linear_flops.values())
    assert c.gemm_flops == max(c.meta["square_gemm_flops"], *c.linear_flops.values())


LLAMA_SMALL = model_spec(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def test_roofline_summary_per_step_kind():
    c = Ceilings(gemm_flops=1e9, bandwidth=1e8)
    records = [([20], [20], 0.5), ([1] * 8, [30] * 8, 0.2), ([1, 1], [5, 9], 0.1), ([10, 1], [10, 7], 0.3)]
    walls = [0.6, 0.25, 0.12, 0.35]
    s = roofline_summary(records, walls, LLAMA_SMALL, c)
    assert list(s) == ["prefill", "decode", "mixed", "decode >= 8 seqs"]
    assert s["decode"]["steps"] == 2 and s["decode >= 8 seqs"]["steps"] == 1 and s["decode"]["mean_seqs"] == 5
    eight = roofline_s(step_work(LLAMA_SMALL, [1] * 8, [30] * 8), c)
    assert s["decode >= 8 seqs"]["efficiency_forward"] == pytest.approx(eight / 0.2)
    assert s["decode >= 8 seqs"]["efficiency_step"] == pytest.approx(eight / 0.25)
    assert s["prefill"]["roofline_s"] == pytest.approx(roofline_s(step_work(LLAMA_SMALL, [20], [20]), c))
    header, rows = summary_table(s)
    assert len(header) == len(rows[0]) == 8 and [r[0] for r in rows] == list(s) and rows[0][1] == 1


def test_the_best_of_two_ceiling_measurements_is_the_ceiling():
    a = Ceilings(100.0, 10.0, {1: 5.0, 8: 40.0}, {"square_gemm_flops": 100.0, "loadavg": [3.0]})
    b = Ceilings(150.0, 8.0, {1: 6.0, 8: 30.0}, {"square_gemm_flops": 150.0, "loadavg": [0.5]})
    c = best_ceilings(a, b)
    assert (c.gemm_flops, c.bandwidth, c.linear_flops) == (150.0, 10.0, {1: 6.0, 8: 40.0})
    assert len(c.meta["measurements"]) == 2 and c.meta["square_gemm_flops"] == 150.0


def test_limit_probes_held_to_the_roofline():
    c = Ceilings(gemm_flops=1e9, bandwidth=1e8)
    limit = {"token_budget": 32, "prefill_pass_s": 0.01, "decode_context": 40,
             "decode_step_s": {"1": 0.002, "8": 0.004}}
    p = probe_rooflines(limit, LLAMA_SMALL, c)
    assert p["prefill"]["efficiency"] == pytest.approx(roofline_s(step_work(LLAMA_SMALL, [32], [32]), c) / 0.01)
    assert p["decode"]["8"]["roofline_s"] == pytest.approx(roofline_s(step_work(LLAMA_SMALL, [1] * 8, [40] * 8), c))
    assert p["decode"]["1"]["efficiency"] == pytest.approx(p["decode"]["1"]["roofline_s"] / 0.002)
    assert [r[0] for r in probes_table(p)[1]] == ["1", "8"] and probes_table(p)[1][0][1] == "2.0"


def test_step_shapes_records_each_step_then_runs_it():
    class Chunk:
        def __init__(self, start, n):
            self.start, self.token_ids = start, [0] * n

    class Executor:
        spec = "the executor's"

        def execute(self, chunks, copies=()):
            return len(chunks)

    shapes = StepShapes()
    wrapped = shapes(Executor())
    assert wrapped.execute([Chunk(0, 5), Chunk(9, 1)]) == 2 and wrapped.spec == "the executor's"
    assert shapes.shapes == [([5, 1], [5, 10])]
