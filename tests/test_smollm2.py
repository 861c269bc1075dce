"""The embedded SmolLM2-135M: loads offline from its package and decodes exactly as transformers does."""
import dataclasses

import pytest
import torch

import fastgen
from fastgen.models import load_model
from fastgen.schedulers import SCHEDULERS
from tiny import reference_greedy, smollm2_files


@pytest.fixture(scope="module")
def hf_and_tok():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    directory, gguf_file = smollm2_files()
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32).eval()
    return hf, AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)


def chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)


def test_short_name_loads_offline_and_greedy_32_tokens_match(hf_and_tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf, tok = hf_and_tok
    model, tokenizer = load_model("smollm2-135m")
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    assert len(model.model.layers) == 30
    prompt = chat(tokenizer, "Write a haiku about the sea.")
    ids = tokenizer.encode(prompt)
    pipe = fastgen.Pipeline(fastgen.build_engine(fastgen.compose_config(), model, tokenizer))
    out = pipe([ids], max_new_tokens=32, ignore_eos=True)[0]
    assert out.token_ids == reference_greedy(hf, ids, 32)
    assert out.prompt_tokens == len(ids) and out.finish_reason == "length"


@pytest.mark.parametrize("scheduler", ["splitfuse", "continuous", "orca", "sarathi", "static"])
def test_pipeline_from_in_memory_model_matches_transformers_for_every_scheduler(hf_and_tok, scheduler):
    hf, tok = hf_and_tok
    texts = ["What is the capital of France?", "Explain KV caching in one sentence.", "Hi"]
    prompts = [tok.encode(chat(tok, t)) for t in texts] + [list(range(100, 400))]   # one longer than the budget
    news = [12, 9, 5, 7]
    knobs = {f.name for f in dataclasses.fields(SCHEDULERS.get(scheduler).Config)}
    policy = [f"scheduler.{k}={v}" for k, v in (("token_budget", 128), ("chunk_size", 64)) if k in knobs]
    pipe = fastgen.pipeline(hf, scheduler=scheduler, tokenizer=tok,
                            overrides=[*policy, "kv.block_size=16", "kv.num_blocks=128"])
    outs = pipe(prompts, max_new_tokens=news, ignore_eos=True)
    assert [o.token_ids for o in outs] == [reference_greedy(hf, p, n) for p, n in zip(prompts, news)]
    assert pipe.engine.snapshot().kv_blocks_free == 128


def test_pipeline_text_stop_strings_and_eos(hf_and_tok):
    hf, tok = hf_and_tok
    pipe = fastgen.pipeline(hf, tokenizer=tok, overrides=["kv.num_blocks=64"])
    prompt = chat(tok, "What is the capital of France?")
    full, = pipe([prompt], max_new_tokens=40)
    assert full.finish_reason == "stop" and full.token_ids[-1] == tok.eos_token_id   # EOS ends it by default
    assert "Paris" in full.text
    cut, = pipe([prompt], max_new_tokens=40, stop=["Paris"])
    assert cut.finish_reason == "stop" and "Paris" not in cut.text and full.text.startswith(cut.text)
    with pytest.raises(TypeError, match="unknown sampling parameter"):
        pipe([prompt], max_new_tokens=4, temprature=0.5)
