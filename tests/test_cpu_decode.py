"""The CPU decode path: hardware.linear (the linear layers' GEMM on MKL, plain F.linear, or on weights reordered once
for oneDNN; auto times the two per weight shape at load and uses the reordered weights only for the row counts where
they measured faster), and KV pools that are head-major in memory under their [blocks, slots, heads, dim] view."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fastgen.config import HardwareConfig
from fastgen.kernels import reference
from fastgen.kv.cache import KVCache
from fastgen.kernels.linear import (CALIBRATION_ROWS, Calibration, ReorderedWeight, affordable, linear, reorder,
                                    reorder_weights, resolve_linear)
from fastgen.models.layers import Reorderable
from fastgen.ragged import RaggedBatch, SeqChunk
from fastgen.sampling import SamplingParams
from tiny import compose_engine, drain, fastgen_from_hf, reference_greedy, tiny_hf_model

onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def onednn_calls(fn) -> int:
    """How many oneDNN linear calls `fn` makes (torch.profiler's operator events)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")


def test_resolution_and_bad_values():
    assert resolve_linear("auto", "cpu", torch.float32) == ("auto" if torch.backends.mkldnn.is_available()
                                                           else "plain")
    assert resolve_linear("auto", "cpu", torch.bfloat16) == "plain"
    assert resolve_linear("auto", "cuda", torch.float32) == "plain"
    assert resolve_linear("plain", "cpu", torch.float32) == "plain"
    with pytest.raises(ValueError, match="hardware.linear=onednn runs float32 models on a CPU"):
        resolve_linear("onednn", "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="choose from auto, plain, onednn"):
        HardwareConfig(linear="mkl").validate()
    assert affordable("auto", 2**20) == "auto"
    assert affordable("auto", 2**62) == "plain"          # a copy larger than the memory: auto stays plain
    assert affordable("onednn", 2**62) == "onednn"       # asked for by name: done (or fails loudly)


@onednn
@pytest.mark.parametrize("rows", [1, 2, 8, 33, 200])
def test_reordered_weight_equals_f_linear_and_is_used_only_where_the_calibration_says(rows):
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 64), torch.randn(96), torch.randn(rows, 64)
    want = torch.nn.functional.linear(x, w, b)
    # oneDNN faster at 2 and 4 rows, and again from 32 rows on (each count decides up to the next one)
    faster = Calibration((1, 2, 4, 8, 32), plain_s=(1.0, 2.0, 2.0, 1.0, 2.0), onednn_s=(2.0, 1.0, 1.0, 2.0, 1.0))
    assert faster.onednn_rows() == [2, 4, 32]
    for r, used in ((ReorderedWeight(reorder(w)), True), (ReorderedWeight(reorder(w), faster), rows in (2, 33, 200))):
        assert onednn_calls(lambda: linear(x, w, b, r)) == int(used)
        torch.testing.assert_close(linear(x, w, b, r), want, rtol=1e-5, atol=1e-5)


@onednn
def test_auto_calibrates_each_weight_shape_once_and_keeps_copies_only_where_onednn_won():
    torch.manual_seed(0)
    weights = [torch.randn(48, 32), torch.randn(16, 32), torch.randn(48, 32), torch.randn(16, 32)]
    got = reorder_weights(weights, "auto")
    for a, b in ((0, 2), (1, 3)):                  # one calibration per shape, shared by its layers
        assert (got[a] is None) == (got[b] is None)
        if got[a] is not None:
            assert got[a].calibration is got[b].calibration and got[a].calibration.rows == CALIBRATION_ROWS
            assert got[a].calibration.onednn_rows()
    again = reorder_weights(weights, "auto")        # set up again in this process: the calibrations are reused
    assert all(a is b is None or a.calibration is b.calibration for a, b in zip(again, got))
    assert reorder_weights(weights, "plain") == [None] * 4
    assert all(r.calibration is None for r in reorder_weights(weights, "onednn"))
    c = Calibration.measure(weights[:1], [reorder(weights[0])], rows=(1, 3))
    assert c.rows == (1, 3) and all(0 < t < 1 for t in c.plain_s + c.onednn_s)


def greedy(model, prompts, news, linear_mode):
    eng = compose_engine(model, "splitfuse", "blocked", 64, 16, linear=linear_mode, token_budget=32).engine
    ids = [eng.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in zip(prompts, news)]
    finished = drain(eng)
    return [finished[i].output_token_ids for i in ids]


@onednn
def test_each_mode_is_greedy_equal_to_transformers_and_plain_switches_it_off():
    """Qwen2: biased QKV projection, tied LM head, grouped-query attention (the rest of the suite runs auto)."""
    hf = tiny_hf_model("qwen2", seed=0)
    model = fastgen_from_hf(hf)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (5, 40, 17, 3, 60)]
    news = [12, 7, 20, 30, 9]
    ref = [reference_greedy(hf, p, n) for p, n in zip(prompts, news)]
    for mode in ("onednn", "auto", "plain"):
        got = greedy(model, prompts, news, mode)
        layers = [m for m in model.modules() if isinstance(m, Reorderable)]
        kept = [m.reordered for m in layers if m.reordered is not None]
        assert layers and len(kept) == {"onednn": len(layers), "plain": 0}.get(mode, len(kept))
        assert all((r.calibration is None) == (mode == "onednn") for r in kept)
        calls = onednn_calls(lambda: greedy(model, prompts[:3], [3, 3, 3], mode))
        assert (calls > 0) == (mode == "onednn") if mode != "auto" else kept or not calls, (mode, calls)
        assert got == ref, mode


def test_head_major_pools_attend_like_contiguous_ones():
    """KVCache's pools are head-major in memory (each KV head's block one contiguous matrix) and the PyTorch
    attention gives the same result on them as on a plainly laid out pool with the same contents: decodes over
    scattered blocks (gathered), a chunk over consecutive blocks (a view) and one over scattered blocks."""
    hf = tiny_hf_model("llama", seed=0)
    spec = fastgen_from_hf(hf).spec
    cache = KVCache(spec, num_blocks=24, block_size=4, dtype=torch.float32)
    k, v = cache.layer(0)
    assert k.shape == (24, 4, spec.num_kv_heads, spec.head_dim)
    assert k.permute(2, 0, 1, 3).is_contiguous() and not k.is_contiguous()
    torch.manual_seed(0)
    k.copy_(torch.randn(k.shape)), v.copy_(torch.randn(v.shape))
    chunks = [SeqChunk([1], 9, [5, 2, 17]), SeqChunk([1], 3, [8]), SeqChunk([1, 2, 3, 4, 5], 2, [10, 11]),
              SeqChunk([1, 2, 3], 4, [20, 3])]
    batch = RaggedBatch.build(chunks, 4)
    q = torch.randn(batch.input_ids.shape[0], spec.num_heads, spec.head_dim)
    got = reference.attention(q, k, v, batch.attn, 0.125)
    plain = RaggedBatch.build(chunks, 4)            # a fresh plan: the step's plan keeps the gather buffers
    want = reference.attention(q, k.contiguous(), v.contiguous(), plain.attn, 0.125)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
