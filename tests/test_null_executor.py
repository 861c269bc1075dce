"""executor=null: the engine runs end to end with no model (fixed logits of the model's vocabulary), so its own host
work can be timed (experiments/host_time.py)."""
from __future__ import annotations

import pytest
from tiny import drain, tiny_config

from fastgen.compose import build_engine
from fastgen.conf import compose_config
from fastgen.executors.null import NullExecutor, NullExecutorConfig
from fastgen.ragged import SeqChunk
from fastgen.sampling import SamplingParams
from fastgen.schedulers import SCHEDULERS


@pytest.mark.parametrize("scheduler", SCHEDULERS.names())
def test_every_policy_runs_its_requests_to_their_lengths(scheduler):
    config = tiny_config("llama")
    cfg = compose_config(["executor=null", f"scheduler={scheduler}", "kv.block_size=16", "kv.num_blocks=64"])
    engine = build_engine(cfg, config)
    assert isinstance(engine._executor, NullExecutor)
    lens = [(5, 7), (40, 3), (17, 12), (1, 1)]
    ids = [engine.add_request(list(range(1, p + 1)), SamplingParams(max_new_tokens=n, ignore_eos=True))
           for p, n in lens]
    finished = drain(engine)
    for rid, (_, n) in zip(ids, lens):
        tokens = finished[rid].output_token_ids
        assert len(tokens) == n and finished[rid].finish_reason == "length"
        # the fixed logits peak in the middle of the vocabulary, away from the special tokens at its start
        assert all(config.vocab_size // 2 <= t < config.vocab_size * 3 // 4 for t in tokens)


def test_logits_have_the_model_shape_and_vocab_size_narrows_them():
    config = tiny_config("llama")
    wide = NullExecutor(compose_config(["executor=null"]), config)
    assert wide.num_kv_blocks == wide.spec.kv_blocks_in(2 * 2**30, 64, 4)       # kv.memory_gb=2 at float32
    narrow = NullExecutor(compose_config(["executor=null", "executor.vocab_size=32", "kv.num_blocks=8"]), config)
    assert narrow.num_kv_blocks == 8 and narrow.spec.vocab_size == config.vocab_size
    chunks = [SeqChunk([1, 2, 3], 0, [0]), SeqChunk([4], 9, [1]), SeqChunk([5, 6], 0, [2], all_logits=True)]
    assert tuple(wide.execute(chunks).logits.shape) == (4, config.vocab_size)
    assert tuple(narrow.execute(chunks).logits.shape) == (4, 32)
    with pytest.raises(ValueError, match="executor.vocab_size"):
        NullExecutorConfig(vocab_size=0).validate()
    with pytest.raises(ValueError, match="exceeds the model's vocabulary"):
        NullExecutor(compose_config(["executor=null", f"executor.vocab_size={config.vocab_size + 1}"]), config)


def test_the_embedded_model_detokenizes_and_stops_on_a_stop_string():
    """`executor=null` from the command line's spelling: the embedded model's config and tokenizer, no weights;
    text is the tokenizer's decoding of the tokens, and a stop string spanning two tokens ends a request."""
    engine = build_engine(compose_config(["executor=null", "kv.num_blocks=32"]))
    tok = engine.tokenizer
    free = engine.add_request("Hello, my name is", SamplingParams(max_new_tokens=6, ignore_eos=True))
    first = drain(engine)[free]
    assert len(first.output_token_ids) == 6
    assert first.output_text == tok.decode(first.output_token_ids, skip_special_tokens=True)
    stop = tok.decode(first.output_token_ids[:2])
    stopped = engine.add_request("Hello, my name is", SamplingParams(
        max_new_tokens=6, ignore_eos=True, stop=[stop], include_stop_str_in_output=True))
    second = drain(engine)[stopped]
    assert (second.finish_reason, second.output_token_ids, second.output_text) == \
        ("stop", first.output_token_ids[:2], stop)
