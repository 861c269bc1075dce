"""The families beyond Llama/Mistral/Qwen2/OPT: mixtures of experts (Mixtral, Qwen2-MoE), Phi-3, Falcon, Gemma-2.

Logits against transformers for every family (whole prompts, odd chunks, decodes) are in test_models.py (FAMILIES),
greedy tokens for every scheduler and KV manager in test_engine.py, the Triton kernels in test_kernels_triton.py.
Here: what is particular to these families (idle experts, the loaders' per-expert checkpoints, the features each
family needed mattering at all), their shapes in the simulator, and the cost model's charge for routed experts.
"""
import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from fastgen.conf import compose_config
from fastgen.models import build_model, load_model
from fastgen.models.moe import Experts
from fastgen.sim import BatchShape, model_spec
from test_sim import cost
from tiny import MOE_FAMILIES, ChunkRunner, fastgen_from_hf, tiny_config, tiny_hf_model

NEW_FAMILIES = ["mixtral", "qwen2_moe-mixed", "phi3", "falcon", "gemma2"]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_steps_with_idle_experts_match_transformers(family, monkeypatch):
    """Top-1 and top-2 (and top-3) routing through the ragged batch: a mixed step of prompt chunks, then decode
    steps of three and of one sequence, where the top-k experts of one token leave the others without work."""
    hf = tiny_hf_model(family, seed=2)
    runner = ChunkRunner(fastgen_from_hf(hf))
    used: list[int] = []
    forward = Experts.forward
    monkeypatch.setattr(Experts, "forward",
                        lambda self, x, w, e: used.append(e.unique().numel()) or forward(self, x, w, e))
    g = torch.Generator().manual_seed(2)
    seqs = {s: torch.randint(0, 211, (n,), generator=g).tolist() for s, n in enumerate([19, 6, 30])}
    runner.step({s: p[:-3] for s, p in seqs.items()})
    for last in (-3, -2):
        out = runner.step({s: [p[last]] for s, p in seqs.items()})
        for s, p in seqs.items():
            assert rel_err(out[s], hf(torch.tensor([p[:len(p) + last + 1]])).logits[0, -1]) < 1e-5
    used.clear()
    out = runner.step({1: [seqs[1][-1]]})
    assert rel_err(out[1], hf(torch.tensor([seqs[1]])).logits[0, -1]) < 1e-5
    experts, top_k = hf.config.num_local_experts if family.startswith("mixtral") else hf.config.num_experts, \
        hf.config.num_experts_per_tok
    assert used and all(n == top_k < experts for n in used)      # one token: top_k experts busy, the rest idle


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_local_directory_loads_and_describes_every_family(tmp_path, family):
    """`model.source=<dir>`: a saved checkpoint (Mixtral's and Qwen2-MoE's with one tensor per expert, as on the
    hub) loads to the same logits, and the simulator reads the same spec from the directory."""
    hf = tiny_hf_model(family, seed=4)
    hf.save_pretrained(tmp_path / family)
    saved = load_file(next((tmp_path / family).glob("*.safetensors")))
    assert any(".experts.0." in k for k in saved) == (family in MOE_FAMILIES)
    model, _ = load_model(tmp_path / family)
    ids = torch.randint(0, 211, (1, 25), generator=torch.Generator().manual_seed(4))
    assert rel_err(ChunkRunner(model).step({0: ids[0].tolist()})[0], hf(ids).logits[0, -1]) < 1e-5
    assert model_spec(str(tmp_path / family)) == model.spec


def test_checkpoint_mismatches_name_the_first_bad_tensor(tmp_path):
    hf = tiny_hf_model("mixtral")
    hf.save_pretrained(tmp_path)
    state = load_file(next(tmp_path.glob("*.safetensors")))
    prefix = "model.layers.1.block_sparse_moe.experts"

    def build(state_dict):
        return build_model(hf.config, state_dict, torch.float32, "cpu", "ckpt")

    build(state)    # the per-expert checkpoint as saved loads
    missing = {k: v for k, v in state.items() if k != f"{prefix}.3.w3.weight"}
    with pytest.raises(ValueError, match=r"missing weights \['model.layers.1.mlp.experts.gate_up_proj\[expert 3 part "
                                         r"2/2\]'\]"):
        build(missing)
    with pytest.raises(ValueError, match=rf"weight '{prefix}.2.w2.weight' has shape \(64, 95\), fastgen expects "
                                         r"\(64, 96\)"):
        build({**state, f"{prefix}.2.w2.weight": torch.zeros(64, 95)})
    with pytest.raises(ValueError, match=rf"'{prefix}.4.w1.weight' is for expert 4, but the config has 4 experts"):
        build({**state, f"{prefix}.4.w1.weight": torch.zeros(96, 64)})
    falcon = tiny_hf_model("falcon").state_dict()
    qkv = "transformer.h.0.self_attention.query_key_value.weight"
    with pytest.raises(ValueError, match=rf"weight '{qkv}' has shape \(127, 64\)"):
        build_model(tiny_config("falcon"), {**falcon, qkv: torch.zeros(127, 64)}, torch.float32, "cpu", "ckpt")


def test_unsupported_variants_are_refused_by_name():
    from transformers import GPT2Config, GPT2LMHeadModel
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'; fastgen supports: falcon, gemma2, llama, "
                                         r"mistral, mixtral, opt, phi3, qwen2, qwen2_moe"):
        load_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)))
    with pytest.raises(ValueError, match="ALiBi positions.*not supported"):
        build_model(tiny_config("falcon-seq", alibi=True), {}, torch.float32, "cpu", "ckpt")
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
    with pytest.raises(ValueError, match="rope type 'longrope' depends on the sequence length"):
        build_model(tiny_config("phi3", rope_parameters=longrope, original_max_position_embeddings=64), {},
                    torch.float32, "cpu", "ckpt")


def test_gemma2_soft_capping_and_windows_each_change_the_logits():
    """The tiny Gemma-2's caps bind and its window (7) is shorter than the sequence, so the equality with
    transformers elsewhere depends on each: dropping one changes the logits."""
    hf = tiny_hf_model("gemma2")
    ids = torch.randint(0, 211, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    model = fastgen_from_hf(hf)
    full = ChunkRunner(model).step({0: ids})[0]
    for attr, owners in (("softcap", [layer.self_attn for layer in model.model.layers]),
                         ("window", [layer.self_attn for layer in model.model.layers]),
                         ("final_logit_softcapping", [model])):
        saved = [getattr(o, attr) for o in owners]
        for o in owners:
            setattr(o, attr, None)
        assert rel_err(ChunkRunner(model).step({0: ids})[0], full) > 1e-2, attr
        for o, v in zip(owners, saved):
            setattr(o, attr, v)


def test_named_family_shapes():
    """The simulator's named sizes: total weights as published, and for the mixtures the weights a token uses."""
    published = {"mixtral-8x7b": (46.7, 12.9), "qwen1.5-moe-a2.7b": (14.3, 2.7), "phi-3-mini-4k": (3.82, 3.82),
                 "falcon-7b": (6.92, 6.92), "gemma-2-9b": (9.24, 9.24)}
    for name, (total, active) in published.items():
        spec = model_spec(name)
        assert (spec.num_params / 1e9, spec.active_params / 1e9) == pytest.approx((total, active), rel=0.01), name
    gemma, falcon = model_spec("gemma-2-9b"), model_spec("falcon-7b")
    assert gemma.windows[:2] == (4096, None) and gemma.head_dim == 256
    assert falcon.num_kv_heads == 1 and not falcon.gated_mlp
    mixed = fastgen_from_hf(tiny_hf_model("qwen2_moe-mixed")).spec
    assert (mixed.num_moe_layers, mixed.num_experts, mixed.experts_per_token, mixed.windows) == (1, 6, 3, (7, None))


def test_moe_cost_charges_routed_experts_not_a_dense_model():
    """Mixtral's step: the flops of k experts per token, and the weights of min(experts, tokens x k) experts;
    a decode step costs a fraction of a dense model holding all the experts' weights."""
    moe = cost("mixtral-8x7b")
    spec, layers, b = moe.spec, 32, 2
    expert = spec.expert_params
    for tokens, streamed in ((1, 2), (3, 6), (4, 8), (500, 8)):
        flops, nbytes, rows = moe.work(BatchShape.of([tokens], [tokens])).experts
        assert flops == 2 * tokens * 2 * expert * layers
        activations = tokens * 2 * (2 * 14336 + 4096 + 4096 + 14336) * layers * b
        assert nbytes == pytest.approx(streamed * expert * layers * b + activations)
        assert rows == tokens * 2 / streamed
    dense_all = dataclasses.replace(spec, num_experts=0, experts_per_token=0, expert_intermediate=0, num_moe_layers=0,
                                    intermediate=8 * 14336)
    dense = type(moe)(dense_all, moe.device, "float16")        # a100-80gb's dtype
    decode = BatchShape.of([1], [512])
    assert moe.step_time(decode) < 0.4 * dense.step_time(decode)
    assert moe.breakdown(decode)["experts_s"] > 0 == dense.breakdown(decode)["experts_s"]


def test_simulated_run_of_a_mixture_of_experts():
    from fastgen.compose import build_engine
    from fastgen.sampling import SamplingParams
    from tiny import drain
    cfg = compose_config(["model.source=mixtral-8x7b", "hardware=a100-80gb", "hardware.tensor_parallel=2",
                          "executor=simulated", "progress=false"])
    engine = build_engine(cfg)
    ids = [engine.add_request([1] * n, SamplingParams(max_new_tokens=8, ignore_eos=True)) for n in (100, 3000, 7)]
    finished = drain(engine)
    assert [len(finished[i].output_token_ids) for i in ids] == [8, 8, 8] and engine.clock() > 0
