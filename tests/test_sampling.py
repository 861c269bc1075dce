"""Sampling parameters and the sampler: validation in one place, penalties and biases against transformers' own
logits processors, logprobs (sampled and prompt) against transformers' log-softmax, and fault isolation in the
engine step (one request's bad parameters or a failed forward pass end only the requests concerned)."""
import functools
import math

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation import (MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                                     SequenceBiasLogitsProcessor)

from fastgen.executors.real import RealExecutor
from fastgen.pipeline import Pipeline
from fastgen.sampling import (MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, ParameterError, Sampler, SamplingParams,
                              SamplingRow)
from tiny import compose_engine, drain, fastgen_from_hf, reference_greedy, tiny_hf_model

VOCAB = 211


@functools.lru_cache(maxsize=None)
def tiny():
    hf = tiny_hf_model("llama", seed=0)
    return hf, fastgen_from_hf(hf)


def engine(**knobs):
    knobs = {"token_budget": 16, "chunk_size": 8, **knobs}
    return compose_engine(tiny()[1], "splitfuse", "blocked", 64, 16, **knobs)


PROMPTS = [[5, 17, 17, 42, 9, 17, 100, 3], [7] * 3 + [60, 61, 62, 7], list(range(30, 70))]


class FrequencyPresence(LogitsProcessor):
    """OpenAI's documented definition: logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty, with
    c[j] the count of token j in the output so far (transformers has no processor for these two)."""

    def __init__(self, prompt_len: int, frequency: float, presence: float):
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores)
        out = input_ids[:, self.prompt_len:]
        counts.scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def hf_processors(prompt_len: int, p: SamplingParams, eos: int) -> LogitsProcessorList:
    """transformers' processors for `p`, in fastgen's (and vLLM's) order."""
    procs = []
    if p.logit_bias:
        procs.append(SequenceBiasLogitsProcessor([[[t], b] for t, b in p.logit_bias.items()]))
    if p.min_new_tokens:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, p.min_new_tokens, eos))
    if p.repetition_penalty != 1:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.frequency_penalty or p.presence_penalty:
        procs.append(FrequencyPresence(prompt_len, p.frequency_penalty, p.presence_penalty))
    return LogitsProcessorList(procs)


SETTINGS = [
    dict(repetition_penalty=1.5),
    dict(repetition_penalty=0.7),
    dict(frequency_penalty=1.2),
    dict(presence_penalty=-0.8, frequency_penalty=0.3),
    dict(logit_bias={17: 4.0, 3: -100.0, 150: 2.5}),
    dict(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.4, logit_bias={9: 3.0}),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(s))
def test_processed_logits_equal_transformers_processors(settings):
    """The batched processing of one step (rows with different settings and histories, some not processed at all)
    equals each row run through transformers' processors alone."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, VOCAB, generator=g) * 3
    histories = [(PROMPTS[i % 3], torch.randint(0, VOCAB, (n,), generator=g).tolist()) for i, n in
                 enumerate([0, 5, 12, 7])]
    params = [SamplingParams(**settings), SamplingParams(), SamplingParams(**settings), SamplingParams(**settings)]
    rows = [SamplingRow(p, None, prompt, out) for p, (prompt, out) in zip(params, histories)]
    got = Sampler().process(logits, rows)
    for i, (p, (prompt, out)) in enumerate(zip(params, histories)):
        ids = torch.tensor([prompt + out])
        expected = hf_processors(len(prompt), p, eos=0)(ids, logits[i:i + 1].clone())[0]
        torch.testing.assert_close(got[i], expected, rtol=0, atol=1e-5)


def test_min_tokens_bans_stop_tokens_like_transformers():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(2))
    rows = [SamplingRow(SamplingParams(min_new_tokens=4), None, [1, 2], [5], banned=[7, 8]),
            SamplingRow(SamplingParams(), None, [1, 2], [5, 6, 7, 8])]
    got = Sampler().process(logits, rows)
    expected = MinNewTokensLengthLogitsProcessor(2, 4, [7, 8])(torch.tensor([[1, 2, 5]]), logits[:1].clone())
    torch.testing.assert_close(got[:1], expected)
    torch.testing.assert_close(got[1], logits[1])


@pytest.mark.parametrize("settings", SETTINGS + [dict(min_new_tokens=6, logit_bias={0: 30.0})],
                         ids=lambda s: ",".join(s))
def test_greedy_generation_with_penalties_equals_transformers_generate(settings):
    """Whole generations: fastgen's greedy tokens under each setting equal transformers' generate() with its own
    processors for it (the histories, and so the penalties, change every step)."""
    hf, _ = tiny()
    eng = engine().engine
    n = 14
    ids = [eng.add_request(p, SamplingParams(max_new_tokens=n, stop_token_ids=[0], ignore_eos=True, **settings))
           for p in PROMPTS]
    finished = drain(eng)
    for prompt, rid in zip(PROMPTS, ids):
        p = SamplingParams(max_new_tokens=n, **settings)
        x = torch.tensor([prompt])
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=0,
                          pad_token_id=0, logits_processor=hf_processors(len(prompt), p, eos=0))
        expected = out[0, len(prompt):].tolist()
        got = finished[rid].output_token_ids
        assert got == expected[:len(got)] and (len(got) == n or got[-1] == 0), (settings, got, expected)


def test_pipeline_takes_every_sampling_parameter():
    pipe = Pipeline(engine().engine)
    out = pipe([PROMPTS[0]], max_new_tokens=8, repetition_penalty=1.4, frequency_penalty=0.6, presence_penalty=0.2,
               logit_bias={17: 2.0}, min_new_tokens=3, logprobs=2, prompt_logprobs=1, ignore_eos=True)[0]
    assert len(out.token_ids) == 8 and len(out.logprobs) == 8 and len(out.prompt_logprobs) == len(PROMPTS[0]) - 1
    assert [lp.token_id for lp in out.logprobs] == out.token_ids


# -- logprobs ------------------------------------------------------------------------------------------------------
def hf_logprobs(prompt: list[int], output: list[int]) -> torch.Tensor:
    """transformers' log-softmax (float32) at every position of prompt + output: row j scores token j + 1."""
    hf, _ = tiny()
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([prompt + output])).logits[0].float(), -1)


@pytest.mark.parametrize("token_budget", [16, 512])
def test_greedy_and_prompt_logprobs_equal_transformers_log_softmax(token_budget):
    """Sampled-token and prompt logprobs (with their top-k) equal transformers' log-softmax to 1e-4, whether the
    prompt runs in one chunk or in many (token_budget=16 splits the 40-token prompt and mixes it with decodes)."""
    eng = engine(token_budget=token_budget).engine
    ids = [eng.add_request(p, SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2))
           for p in PROMPTS]
    plain = eng.add_request(PROMPTS[2], SamplingParams(max_new_tokens=6, ignore_eos=True))
    finished = drain(eng)
    hf, _ = tiny()
    for prompt, rid in zip(PROMPTS, ids):
        req = finished[rid]
        assert req.output_token_ids == reference_greedy(hf, prompt, 6)
        ref = hf_logprobs(prompt, req.output_token_ids)
        targets = prompt[1:] + req.output_token_ids
        got = req.prompt_logprobs + req.logprobs
        assert [lp.token_id for lp in got] == targets
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in got]),
                                   ref[:-1].gather(1, torch.tensor(targets)[:, None])[:, 0], rtol=0, atol=1e-4)
        for j, lp in enumerate(got):
            k = 3 if j >= len(prompt) - 1 else 2
            top = ref[j].topk(k)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), top.values, rtol=0, atol=1e-4)
    assert finished[plain].logprobs == [] and finished[plain].prompt_logprobs == []


def test_prompt_logprobs_survive_preemption_once():
    """Two 12-token prompts fed 4 tokens at a time (sarathi) into 4 blocks of 4 slots: one is preempted and
    recomputed; its prompt logprobs are still one per prompt token, equal to transformers'."""
    eng = compose_engine(tiny()[1], "sarathi", "blocked", num_blocks=4, block_size=4, token_budget=8,
                         chunk_size=4, batch_size=3).engine
    prompts = [list(range(10 + i, 22 + i)) for i in range(2)]
    ids = [eng.add_request(p, SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=0)) for p in prompts]
    finished = drain(eng)
    assert any(finished[i].num_preemptions for i in ids)
    for prompt, rid in zip(prompts, ids):
        got = finished[rid].prompt_logprobs
        ref = hf_logprobs(prompt, [])[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in got]), ref, rtol=0, atol=1e-4)


def test_logprobs_are_of_the_raw_distribution_not_the_processed_one():
    """Documented choice (vLLM's raw_logprobs): a bias changes what is sampled, not the logprobs reported."""
    eng = engine().engine
    a = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=1, logprobs=1, logit_bias={150: 100.0}))
    b = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=1, logprobs=1))
    finished = drain(eng)
    biased, plain = finished[a].logprobs[0], finished[b].logprobs[0]
    assert biased.token_id == 150 and plain.token_id != 150
    assert biased.top == plain.top
    assert biased.logprob == pytest.approx(hf_logprobs(PROMPTS[0], [])[-1, 150].item(), abs=1e-4)


# -- validation ----------------------------------------------------------------------------------------------------
BAD = [  # (parameters, the parameter named)
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(min_new_tokens=9, max_new_tokens=4), "min_new_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.inf), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=math.nan), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(top_k=True), "top_k"), (dict(seed=-1), "seed"), (dict(seed=2**64), "seed"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(repetition_penalty=math.inf), "repetition_penalty"),
    (dict(frequency_penalty=2.5), "frequency_penalty"), (dict(presence_penalty=-3), "presence_penalty"),
    (dict(logit_bias={5: 101}), "logit_bias"), (dict(logit_bias={-1: 1}), "logit_bias"),
    (dict(logit_bias={"x": 1}), "logit_bias"), (dict(logit_bias=[1]), "logit_bias"),
    (dict(logprobs=21), "logprobs"), (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(stop=["a"] * (MAX_STOP_STRINGS + 1)), "stop"), (dict(stop=["x" * (MAX_STOP_STRING_CHARS + 1)]), "stop"),
    (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-4]), "stop_token_ids"),
]


@pytest.mark.parametrize("params,param", BAD, ids=[f"{i}-{p}" for i, (_, p) in enumerate(BAD)])
def test_bad_sampling_parameters_are_refused_by_name(params, param):
    with pytest.raises(ParameterError) as e:
        SamplingParams(**params)
    assert e.value.param == param and param in str(e.value)


def test_vocabulary_checks_run_before_the_engine_accepts():
    eng = engine().engine
    for params, param in [(dict(top_k=2**63), "top_k"), (dict(top_k=VOCAB + 1), "top_k"),
                          (dict(logit_bias={VOCAB: 1.0}), "logit_bias"),
                          (dict(stop_token_ids=[VOCAB]), "stop_token_ids")]:
        with pytest.raises(ParameterError) as e:
            eng.add_request([1, 2], SamplingParams(**params))
        assert e.value.param == param
    assert not eng.has_unfinished()
    eng.add_request([1, 2], SamplingParams(top_k=VOCAB, temperature=1.0))
    assert drain(eng)


def test_underflowing_temperature_and_top_p_are_greedy():
    """temperature=1e-320 (0 in float32) is treated as greedy (below GREEDY_BELOW); a top_p that underflows keeps
    the most likely token: both give the greedy tokens instead of NaN probabilities and token 0."""
    hf, _ = tiny()
    eng = engine().engine
    ids = [eng.add_request(PROMPTS[1], SamplingParams(max_new_tokens=8, ignore_eos=True, **p))
           for p in (dict(temperature=1e-320), dict(temperature=1.0, top_p=1e-300), dict(temperature=1e-6, seed=3))]
    finished = drain(eng)
    expected = reference_greedy(hf, PROMPTS[1], 8)
    assert [finished[i].output_token_ids for i in ids] == [expected] * 3
    assert SamplingParams(temperature=1e-320).greedy and not SamplingParams(temperature=1e-4).greedy


def test_plain_greedy_rows_and_processed_rows_in_one_step_get_what_each_gets_alone():
    """The engine takes plain greedy rows (SamplingParams.plain_greedy, past min_new_tokens) with one argmax and
    no per-row objects, and sends the others through the sampler: in steps that mix both, each request gets the
    tokens and logprobs it gets alone."""
    mixed = [SamplingParams(max_new_tokens=8, ignore_eos=True),
             SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=2),
             SamplingParams(max_new_tokens=8, ignore_eos=True, logit_bias={17: 4.0}),
             SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=0.8, seed=5),
             SamplingParams(max_new_tokens=8, min_new_tokens=3, stop_token_ids=[17, 42]),
             SamplingParams(max_new_tokens=8, ignore_eos=True, repetition_penalty=1.5)]
    assert [p.plain_greedy for p in mixed] == [True, False, False, False, True, False]

    def run(which: list[int]) -> list[tuple]:
        eng = engine().engine
        ids = [eng.add_request(PROMPTS[i % len(PROMPTS)], mixed[i]) for i in which]
        done = drain(eng)
        return [(done[i].output_token_ids, [(lp.token_id, lp.logprob) for lp in done[i].logprobs]) for i in ids]
    together, alone = run(list(range(len(mixed)))), [run([i])[0] for i in range(len(mixed))]
    assert [tokens for tokens, _ in together] == [tokens for tokens, _ in alone] and together[1][1]
    for (_, a), (_, b) in zip(together, alone):   # logprobs up to float32 rounding: a batch's rows may run another
        assert [t for t, _ in a] == [t for t, _ in b]   # GEMM than one row does (hardware.linear=auto, per row count)
        assert [lp for _, lp in a] == pytest.approx([lp for _, lp in b], abs=1e-5)


# -- fault isolation -----------------------------------------------------------------------------------------------
def test_a_request_whose_sampling_fails_ends_alone():
    """The issue's reproduction at the engine: top_k=2**63 overflowed the sampler's tensor and killed the whole
    step. Validation now refuses it; injected past validation (the params changed after acceptance), it fails only
    its own request, and the neighbours' tokens are the ones they get alone."""
    hf, _ = tiny()
    built = engine()
    eng = built.engine
    neighbours = [eng.add_request(p, SamplingParams(max_new_tokens=10, ignore_eos=True)) for p in PROMPTS]
    bad_params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=5, ignore_eos=True)
    bad = eng.add_request(PROMPTS[0], bad_params)
    eng.step()
    bad_params.top_k = 2**63                           # injected fault
    outputs = []
    while eng.has_unfinished():
        outputs += eng.step()
    failed = [o for o in outputs if o.finish_reason == "error"]
    assert [o.request_id for o in failed] == [bad] and "sampling failed" in failed[0].error
    assert failed[0].request.trace.finish_time is None and failed[0].request.trace.finish_reason.startswith("error")
    done = {o.request_id: o.request for o in outputs if o.finished}
    assert [done[i].output_token_ids for i in neighbours] == [reference_greedy(hf, p, 10) for p in PROMPTS]
    state = eng.snapshot()
    assert state.kv_blocks_free == state.kv_blocks_total and not built.kv.tables


def test_a_failed_forward_pass_ends_its_step_and_the_engine_serves_on(monkeypatch):
    hf, _ = tiny()
    built = engine(token_budget=64)
    eng = built.engine
    first = [eng.add_request(p, SamplingParams(max_new_tokens=6, ignore_eos=True)) for p in PROMPTS[:2]]
    eng.step()
    calls = {"n": 0}
    real_forward = RealExecutor.forward

    def failing_forward(self, batch):
        calls["n"] += 1
        raise RuntimeError("injected device fault")
    monkeypatch.setattr(RealExecutor, "forward", failing_forward)
    outputs = eng.step()
    monkeypatch.setattr(RealExecutor, "forward", real_forward)
    assert calls["n"] == 1
    assert sorted(o.request_id for o in outputs) == sorted(first)
    assert all(o.finish_reason == "error" and "injected device fault" in o.error for o in outputs)
    state = eng.snapshot()
    assert not eng.has_unfinished() and state.kv_blocks_free == state.kv_blocks_total and not built.kv.tables
    again = [eng.add_request(p, SamplingParams(max_new_tokens=6, ignore_eos=True)) for p in PROMPTS]
    finished = drain(eng)
    assert [finished[i].output_token_ids for i in again] == [reference_greedy(hf, p, 6) for p in PROMPTS]
