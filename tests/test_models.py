"""fastgen's own model definitions against transformers, through the ragged forward pass over blocked KV."""
import pytest
import torch

from fastgen.models import build_model, load_model
from tiny import FAMILIES, ChunkRunner, fastgen_from_hf, tiny_config, tiny_hf_model


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_whole_prompt_logits_match_transformers(family, seed):
    hf = tiny_hf_model(family, seed)
    runner = ChunkRunner(fastgen_from_hf(hf))
    ids = torch.randint(0, hf.config.vocab_size, (1, 33), generator=torch.Generator().manual_seed(seed))
    ref = hf(ids).logits[0, -1]
    got = runner.step({0: ids[0].tolist()})[0]
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_uneven_chunks_then_decode_match_single_pass(family):
    hf = tiny_hf_model(family, seed=3)
    runner = ChunkRunner(fastgen_from_hf(hf), block_size=16)
    ids = torch.randint(0, hf.config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(7))[0]
    ref = hf(ids[None]).logits[0]
    pos = 0
    for n in [5, 1, 17, 30] + [1] * 7:
        got = runner.step({0: ids[pos:pos + n].tolist()})[0]
        pos += n
        assert rel_err(got, ref[pos - 1]) < 1e-5, f"position {pos - 1}"
    assert pos == 60


@pytest.mark.parametrize("family", ["llama", "mistral", "opt"])
def test_mixed_ragged_batch_equals_each_sequence_alone(family):
    hf = tiny_hf_model(family, seed=5)
    model = fastgen_from_hf(hf)
    g = torch.Generator().manual_seed(11)
    prompts = {i: torch.randint(0, 211, (n,), generator=g).tolist() for i, n in enumerate([3, 29, 1, 40])}
    alone = {}
    for sid, p in prompts.items():
        alone[sid] = ChunkRunner(model).step({sid: p})[sid]
    mixed = ChunkRunner(model, block_size=32)
    mixed.step({0: prompts[0][:-1], 1: prompts[1][:20], 3: prompts[3][:-1]})
    # one step mixing two decode-like single tokens, a prompt-chunk continuation and a whole new prompt
    out = mixed.step({0: prompts[0][-1:], 1: prompts[1][20:], 2: prompts[2], 3: prompts[3][-1:]})
    for sid in prompts:
        assert rel_err(out[sid], alone[sid]) < 1e-4, f"sequence {sid}"


def test_mistral_window_is_applied():
    """The tiny Mistral's window (7) is shorter than the sequence: ignoring it must change the logits."""
    hf = tiny_hf_model("mistral", seed=0)
    ids = torch.randint(0, 211, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    with_window = ChunkRunner(fastgen_from_hf(hf)).step({0: ids})[0]
    no_window = fastgen_from_hf(hf)
    for layer in no_window.model.layers:
        layer.self_attn.window = None
    assert rel_err(ChunkRunner(no_window).step({0: ids})[0], with_window) > 1e-3


@pytest.mark.parametrize("family", ["llama", "mixtral", "gemma2"])
def test_bfloat16_runs_and_agrees_on_top1(family):
    hf = tiny_hf_model(family, seed=2)
    ids = torch.randint(0, 211, (1, 48), generator=torch.Generator().manual_seed(2))
    ref = hf(ids).logits[0]
    runner = ChunkRunner(build_model(hf.config, hf.state_dict(), torch.bfloat16, "cpu", "test"))
    agree = 0
    runner.step({0: ids[0, :16].tolist()})
    for p in range(16, 48):
        got = runner.step({0: [ids[0, p].item()]})[0]
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        agree += int(got.argmax() == ref[p].argmax())
    assert agree >= 0.8 * 32


@pytest.mark.parametrize("flags, expected", [("avx512f avx512_bf16", torch.float32),
                                              ("avx512_bf16 amx_tile amx_bf16", torch.bfloat16)])
def test_auto_dtype_picks_bfloat16_only_with_bf16_matrix_units(monkeypatch, flags, expected):
    from fastgen.models import loader
    monkeypatch.setattr(loader, "cpu_flags", lambda: flags)
    assert loader.resolve_dtype("auto", "cpu") is expected
    with pytest.raises(ValueError, match="unknown dtype 'fp8'.*or auto"):
        loader.resolve_dtype("fp8")


def test_unsupported_architecture_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'.*llama.*mistral.*opt.*qwen2"):
        load_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)))


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'no-such-model'.*smollm2-135m"):
        load_model("no-such-model")


def test_local_directory_roundtrip_and_bad_files(tmp_path):
    hf = tiny_hf_model("qwen2", seed=4)
    hf.save_pretrained(tmp_path / "m")
    model, tok = load_model(tmp_path / "m")
    ids = torch.randint(0, 211, (1, 20), generator=torch.Generator().manual_seed(4))
    assert rel_err(ChunkRunner(model).step({0: ids[0].tolist()})[0], hf(ids).logits[0, -1]) < 1e-4
    assert tok is None
    weights = next((tmp_path / "m").glob("*.safetensors"))
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=f"weight file .*{weights.name} is corrupt"):
        load_model(tmp_path / "m")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weight file"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_text(
        '{"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}')
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors is missing"):
        load_model(tmp_path / "m")


def test_weights_from_another_architecture_are_refused():
    hf = tiny_hf_model("opt")
    with pytest.raises(ValueError, match="has no place"):
        build_model(tiny_config("llama"), hf.state_dict(), torch.float32, "cpu", "ckpt")
