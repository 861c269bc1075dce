"""The HTTP server (fastgen.serve) over real loopback HTTP: the openai client's round trips (logprobs, echo, n,
best_of, batched prompts, penalties, usage streaming) compared with Pipeline for the same settings, the
endpoints clients probe, 64 concurrent streams, every fault a client can cause, and the benchmark client.

The model is a tiny random Llama over SmolLM2's vocabulary, so the tokenizer and chat template are real while a
step takes milliseconds. One server (with an API key) serves the whole module."""
import asyncio
import json
import os
import subprocess
import sys
import time
from unittest import mock

import httpx
import numpy as np
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgen.conf import CONF_DIR, register_all
from fastgen.detokenizer import IncrementalDetokenizer
from fastgen.driver import run_workload
from fastgen.driver.http import HttpTarget, _stream_completion, carries_token
from fastgen.serve import ServeConfig
from fastgen.workloads import ClosedLoopArrivals, OpenLoopArrivals, Workload, WorkloadRequest
from serving import API_KEY, AUTH, MODEL, numbered_stream, stream_text, tiny_model
from serving import served as serve_app
from serving import tokenizer as load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def served():
    with serve_app(reference=True) as s:
        yield s


def completion(**extra):
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 2, **extra}


# -- the openai client ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["The quick brown fox", [5, 900, 17, 3000, 42]])
def test_greedy_completion_equals_pipeline(served, prompt):
    expected = served.reference(prompt, max_new_tokens=12, ignore_eos=True)[0]
    client = served.client()
    args = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**args)
    assert full.choices[0].text == expected.text
    assert full.choices[0].finish_reason == "length"
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (expected.prompt_tokens, 12)
    text, choices, usage = stream_text(client.completions.create(**args, stream=True,
                                                                 stream_options={"include_usage": True}), chat=False)
    assert text == expected.text
    assert len(choices) == 12 and choices[-1].finish_reason == "length"
    assert usage.completion_tokens == 12


def test_chat_completion(served, tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    template = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = served.reference(tokenizer.encode(template, add_special_tokens=False), max_new_tokens=10,
                                ignore_eos=True)[0]
    client = served.client()
    args = dict(model=MODEL, messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**args)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content == expected.text
    assert full.usage.prompt_tokens == expected.prompt_tokens
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text, choices, _ = stream_text(chunks, chat=True)
    assert text == expected.text and choices[-1].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_text_and_are_never_streamed(served, stream):
    text = served.reference("Once upon a time", max_new_tokens=24, ignore_eos=True)[0].text
    start = next(i for i in range(len(text) // 2, len(text) - 3) if "\ufffd" not in text[i:i + 3])
    stop = text[start:start + 3]
    expected = text[:text.find(stop)]
    client = served.client()
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0, stop=[stop, "\x00never"],
                extra_body={"ignore_eos": True})
    if stream:
        got, choices, _ = stream_text(client.completions.create(**args, stream=True), chat=False)
        assert all(stop not in c.text for c in choices)
        finish = choices[-1].finish_reason
    else:
        full = client.completions.create(**args)
        got, finish = full.choices[0].text, full.choices[0].finish_reason
    assert (got, finish) == (expected, "stop")


def test_seed_makes_sampling_reproducible(served):
    client = served.client()

    def sample(seed):
        return client.completions.create(model=MODEL, prompt="Hello", max_tokens=16, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text
    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_models_health_and_metrics(served):
    assert [m.id for m in served.client().models.list()] == [MODEL]
    assert httpx.get(f"{served.url}/health").json() == {"status": "ok"}         # no key needed
    metrics = httpx.get(f"{served.url}/metrics", headers=AUTH).text
    for name in ("fastgen_requests_running", "fastgen_requests_waiting", "fastgen_kv_blocks_used",
                 "fastgen_kv_blocks_free", "fastgen_prompt_tokens_total", "fastgen_generation_tokens_total",
                 "fastgen_time_to_first_token_seconds_bucket", "fastgen_inter_token_latency_seconds_bucket"):
        assert name in metrics


# -- logprobs, echo, choices, batches, penalties (issue 16), against Pipeline ---------------------------------------
def close(a, b, tol=1e-4):
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def test_completion_logprobs_equal_the_pipelines(served):
    expected = served.reference("The quick brown fox", max_new_tokens=6, ignore_eos=True, logprobs=3)[0]
    lp = served.client().completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0,
                                            logprobs=3, extra_body={"ignore_eos": True}).choices[0].logprobs
    text = served.reference.engine.tokenizer.decode
    assert lp.tokens == [text([t]) for t in expected.token_ids]
    assert close(lp.token_logprobs, [e.logprob for e in expected.logprobs])
    for top, e in zip(lp.top_logprobs, expected.logprobs):
        assert list(top) == [text([t]) for t, _ in e.top] and close(top.values(), [v for _, v in e.top])
    assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_equal_the_pipelines(served, tokenizer, stream):
    messages = [{"role": "user", "content": "Name a colour."}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                              add_special_tokens=False)
    expected = served.reference(prompt, max_new_tokens=5, ignore_eos=True, logprobs=2)[0]
    out = served.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                                  logprobs=True, top_logprobs=2, stream=stream,
                                                  extra_body={"ignore_eos": True})
    if stream:
        chunks = list(out)
        assert all(len(c.choices[0].logprobs.content) == 1 for c in chunks)   # one token per chunk, from the first
        content = [e for c in chunks for e in c.choices[0].logprobs.content]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        content, text = out.choices[0].logprobs.content, out.choices[0].message.content
    assert text == expected.text
    assert close([e.logprob for e in content], [e.logprob for e in expected.logprobs])
    assert [e.token for e in content] == [tokenizer.decode([t]) for t in expected.token_ids]
    assert all(len(e.top_logprobs) == 2 and bytes(e.bytes).decode() == e.token for e in content)


def test_echo_with_logprobs_scores_the_prompt_like_lm_eval_asks(served, tokenizer):
    """lm-eval's loglikelihood request: token ids, echo, logprobs=1, max_tokens=1, temperature 0."""
    prompt = tokenizer.encode("The capital of France is Paris")
    expected = served.reference(prompt, max_new_tokens=1, prompt_logprobs=1, logprobs=1)[0]
    choice = served.client().completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=1,
                                                temperature=0, seed=1234).choices[0]
    assert choice.text == tokenizer.decode(prompt) + tokenizer.decode(expected.token_ids)
    lp = choice.logprobs
    assert len(lp.tokens) == len(prompt) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert close(lp.token_logprobs[1:], [e.logprob for e in expected.prompt_logprobs + expected.logprobs])
    greedy = [t == max(top.values()) for t, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:])]
    assert greedy == [e.token_id == e.top[0][0] for e in expected.prompt_logprobs + expected.logprobs]


def test_n_choices_and_batched_prompts(served, tokenizer):
    """Two prompts (as text, or as token ids) x n=2 seeded choices, forked by the engine at the first token: choice
    i*n + j is prompt i sampled alone with sequence j's seed (fork_seed: choice 0 keeps the request's seed)."""
    from fastgen.request import fork_seed
    prompts = ["Once upon a time", "In a galaxy far away"]
    common = dict(temperature=1.0, ignore_eos=True)
    expected = [[served.reference(p, max_new_tokens=5, seed=fork_seed(7, j), **common)[0].text for j in range(2)]
                for p in prompts]
    for batch in (prompts, [tokenizer.encode(p) for p in prompts]):
        out = served.client().completions.create(model=MODEL, prompt=batch, max_tokens=5, n=2, seed=7,
                                                 temperature=1.0, extra_body={"ignore_eos": True})
        assert [c.index for c in out.choices] == [0, 1, 2, 3]
        assert [c.text for c in out.choices] == [t for pair in expected for t in pair]
        assert out.usage.completion_tokens == 20
    stream = served.client().completions.create(model=MODEL, prompt=prompts, max_tokens=5, n=2, seed=7,
                                                temperature=1.0, stream=True, extra_body={"ignore_eos": True})
    texts = ["", "", "", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [t for pair in expected for t in pair]
    chat = served.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=4, n=3, temperature=1.0, seed=1)
    assert [c.index for c in chat.choices] == [0, 1, 2] and len({c.message.content for c in chat.choices}) > 1


def test_best_of_returns_the_most_likely_sequence(served):
    from fastgen.request import fork_seed
    runs = [served.reference("Hello there", max_new_tokens=6, temperature=1.0, seed=fork_seed(11, j), logprobs=0,
                             ignore_eos=True)[0] for j in range(3)]
    best = max(runs, key=lambda r: sum(e.logprob for e in r.logprobs))
    out = served.client().completions.create(model=MODEL, prompt="Hello there", max_tokens=6, temperature=1.0,
                                             seed=11, best_of=3, extra_body={"ignore_eos": True})
    assert [c.text for c in out.choices] == [best.text] and out.choices[0].logprobs is None
    assert out.usage.completion_tokens == 6      # the returned choice's tokens, as vLLM counts them


# The random model never repeats itself unprompted, so each setting is chosen to change its greedy output
# (penalties below 1 / 0 reward repetition; a bias makes one token repeat until a positive penalty stops it).
PENALTIES = [dict(repetition_penalty=0.3), dict(frequency_penalty=-2.0), dict(presence_penalty=-2.0),
             dict(logit_bias={"11": 3.0}, frequency_penalty=1.5), dict(logit_bias={"11": 8.0}),
             dict(min_tokens=6, stop=["e"]),
             dict(frequency_penalty=0.7, presence_penalty=-1.5, repetition_penalty=1.2, logit_bias={"28": -100})]


@pytest.mark.parametrize("params", PENALTIES, ids=lambda p: ",".join(p))
def test_every_penalty_and_bias_equals_the_pipeline(served, params):
    engine_params = {"min_new_tokens" if k == "min_tokens" else k: v for k, v in params.items()}
    if "logit_bias" in params:
        engine_params["logit_bias"] = {int(k): v for k, v in params["logit_bias"].items()}
    expected = served.reference("the the the cat sat on the", max_new_tokens=10, **engine_params)[0]
    plain = served.reference("the the the cat sat on the", max_new_tokens=10)[0]
    extra = {k: v for k, v in params.items() if k in ("repetition_penalty", "min_tokens")}
    standard = {k: v for k, v in params.items() if k not in extra}
    out = served.client().completions.create(model=MODEL, prompt="the the the cat sat on the", max_tokens=10,
                                             temperature=0, extra_body=extra, **standard).choices[0]
    assert (out.text, out.finish_reason) == (expected.text, expected.finish_reason)
    assert expected.token_ids != plain.token_ids or "min_tokens" in params     # the setting changed the output


def test_usage_in_every_chunk_with_continuous_usage_stats(served):
    chunks = list(served.client().completions.create(
        model=MODEL, prompt="Count:", max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True}))
    token_chunks, last = chunks[:-1], chunks[-1]
    assert [c.usage.completion_tokens for c in token_chunks] == [1, 2, 3, 4, 5]
    assert all(c.usage.prompt_tokens == last.usage.prompt_tokens for c in token_chunks)
    assert last.choices == [] and last.usage.completion_tokens == 5


def test_chat_stream_sends_nothing_before_the_first_token(served):
    """TTFT honesty: a 300-token prompt takes two steps (token budget 256); the first chunk (role and first token
    together) reaches the client only after the step that sampled the first token."""
    steps = []
    served.engine.add_step_observer(lambda s: steps.append(s.start + s.duration_s))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go " * 290}], "max_tokens": 3,
            "stream": True, "ignore_eos": True, "logprobs": True}
    before = len(steps)
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        lines = [(time.perf_counter(), line) for line in r.iter_lines() if line.startswith("data: {")]
    first_time, first = lines[0][0], json.loads(lines[0][1][6:])
    assert first["choices"][0]["delta"]["role"] == "assistant" and len(first["choices"][0]["logprobs"]["content"]) == 1
    assert first_time >= steps[before + 1] > steps[before]           # after the second step, the sampling one
    assert all(carries_token(json.loads(line[6:])["choices"][0]) for _, line in lines)


def test_http_target_counts_only_chunks_that_carry_a_token():
    """A server that sends a role-only chat chunk first (as vLLM does): the benchmark client does not count it,
    so TTFT is timed to the first token."""
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
              *({"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]} for w in "abc"),
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
              {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=body))
    ticks = iter(range(100))

    async def run():
        async with httpx.AsyncClient(transport=transport, base_url="http://test/v1") as client:
            return await _stream_completion(client, MODEL, "0", [1, 2, 3], 3, lambda: float(next(ticks)))
    trace = asyncio.run(run())
    assert trace.token_times == [2.0, 3.0, 4.0] and trace.finish_reason == "length"   # tick 1: the role chunk


def test_endpoints_clients_probe(served):
    client = served.client()
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    tokens = served.post("/tokenize", {"prompt": "Hello world", "add_special_tokens": False}).json()
    assert tokens["tokens"] == served.reference.engine.tokenizer.encode("Hello world", add_special_tokens=False)
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 512
    chat = served.post("/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 3
    assert served.post("/detokenize", {"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world"}
    assert served.post("/detokenize", {"tokens": [10**7]}).status_code == 400
    info = served.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and "im_start" in info["chat_template"]
    assert served.get("/version").json()["version"]
    mine = served.get("/v1/models", headers={"X-Request-Id": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"
    assert len(served.get("/v1/models").headers["x-request-id"]) == 32
    assert served.post("/v1/completions", completion(model="nope")).headers["x-request-id"]


# -- load ----------------------------------------------------------------------------------------------------------
def test_64_concurrent_streams_all_complete_and_free_the_kv(served):
    async def main():
        async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(numbered_stream(client, i) for i in range(64)))

    before = served.counter("fastgen_generation_tokens_total")
    results = asyncio.run(main())
    assert all((chunks, finish, used) == (n, "length", n) for n, chunks, finish, used in results)
    assert served.idle()
    assert served.counter("fastgen_generation_tokens_total") - before == sum(n for n, *_ in results)


# -- faults --------------------------------------------------------------------------------------------------------
FAULTS = [  # (path, body, status, words the message must contain)
    ("/v1/completions", b'{"model": "tiny-smollm2", "prompt": ', 400, "not valid JSON"),
    ("/v1/completions", completion(max_tokens="ten"), 400, "max_tokens"),
    ("/v1/completions", completion(temperature="hot"), 400, "temperature"),
    ("/v1/completions", completion(prompt=12), 400, "prompt"),
    ("/v1/completions", completion(prompt=[]), 400, "prompt"),
    ("/v1/completions", completion(max_tokens=-1), 400, "max_tokens"),
    ("/v1/completions", completion(max_tokens=10**6), 400, "max_tokens_limit=200"),
    ("/v1/completions", completion(prompt=[7] * 401), 400, "max_prompt_tokens=400"),
    ("/v1/completions", completion(prompt=[7] * 350, max_tokens=200), 400, "max_model_len=512"),
    ("/v1/completions", completion(prompt="word " * 4000), 413, "max_body_bytes=16384"),
    ("/v1/completions", completion(prompt=[10**6]), 400, "outside the vocabulary"),     # refused by add_request
    ("/v1/completions", completion(temperature=-1.0), 400, "temperature"),
    ("/v1/completions", completion(model="gpt-4"), 404, "gpt-4"),
    ("/v1/completions", completion(logprobs=21), 400, "logprobs"),
    ("/v1/completions", completion(best_of=1, n=2), 400, "best_of=1 must be >= n=2"),
    ("/v1/completions", completion(best_of=3, stream=True), 400, "cannot be streamed"),
    ("/v1/completions", completion(n=65), 400, "max_sequences_per_request=64"),
    ("/v1/completions", completion(presence_penalty=2.5), 400, "presence_penalty"),
    ("/v1/completions", completion(repetition_penalty=0), 400, "repetition_penalty"),
    ("/v1/completions", completion(logit_bias={"5": 101}), 400, "logit_bias"),
    ("/v1/completions", completion(logit_bias={"49152": 1}), 400, "logit_bias"),
    ("/v1/completions", completion(min_tokens=5, max_tokens=2), 400, "min_tokens"),
    ("/v1/completions", completion(top_k=9223372036854775808, temperature=1.0), 400, "top_k"),
    ("/v1/completions", completion(stop=["x"] * 17), 400, "MAX_STOP_STRINGS=16"),
    ("/v1/completions", completion(suffix="tail"), 400, "'suffix'"),
    ("/v1/completions", completion(stream_options={"include_usage": True}), 400, "stream=true"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, 400, "tools.0.function"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema"}}, 400, "json_schema.schema"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, 400, "top_logprobs needs logprobs=true"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 30}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool"}]}, 400, "needs content"),
]


@pytest.mark.parametrize("path,body,status,words", FAULTS, ids=[f"{i}-{f[3]}" for i, f in enumerate(FAULTS)])
def test_faults_get_a_clear_error(served, path, body, status, words):
    response = served.post(path, content=body) if isinstance(body, bytes) else served.post(path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"] and error["param"]


def test_neutral_values_and_extensions_real_clients_send_are_accepted(served):
    body = completion(best_of=1, presence_penalty=0, frequency_penalty=0.0, logprobs=None, echo=False, user="u1",
                      store=False, suffix="", min_p=0.0, use_beam_search=False, repetition_penalty=1.0, top_k=-1,
                      skip_special_tokens=True, spaces_between_special_tokens=False, stop=None, ignore_eos=True,
                      max_completion_tokens=2)
    assert served.post("/v1/completions", body).status_code == 200
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2,
            "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "parallel_tool_calls": False}
    assert served.post("/v1/chat/completions", chat).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_api_key_is_required_everywhere_but_health(served, headers):
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions")]:
        response = httpx.request(method, f"{served.url}{path}", json=completion(), headers=headers)
        assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
    assert httpx.get(f"{served.url}/health").status_code == 200


LONG_STREAM = completion(prompt=[7] * 300, max_tokens=200, stream=True, ignore_eos=True)   # seconds of work


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_and_frees_kv(served, stream):
    before = served.counter("fastgen_generation_tokens_total")
    if stream:
        with httpx.stream("POST", f"{served.url}/v1/completions", headers=AUTH, timeout=60,
                          json=LONG_STREAM) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: {")
    else:
        with pytest.raises(httpx.ReadTimeout):     # the client gives up and hangs up
            httpx.post(f"{served.url}/v1/completions", headers=AUTH, timeout=0.1, json={**LONG_STREAM, "stream": False})
    assert served.idle(), "the aborted request still holds KV blocks"
    assert served.counter("fastgen_generation_tokens_total") - before < 200
    assert served.post("/v1/completions", completion()).status_code == 200


def test_concurrency_limit_answers_429(served):
    served.cfg.max_concurrent_requests = 1
    try:
        with httpx.stream("POST", f"{served.url}/v1/completions", headers=AUTH, timeout=60,
                          json=LONG_STREAM) as response:
            lines = response.iter_lines()       # kept: dropping the iterator would close the connection
            next(lines)
            refused = served.post("/v1/completions", completion())
        assert refused.status_code == 429
        assert "max_concurrent_requests=1" in refused.json()["error"]["message"]
    finally:
        served.cfg.max_concurrent_requests = 128
    assert served.idle()


def test_request_timeout_aborts(served):
    served.cfg.request_timeout_s = 0.05
    try:
        response = served.post("/v1/completions", completion(max_tokens=200, ignore_eos=True))
    finally:
        served.cfg.request_timeout_s = 60.0
    assert response.status_code == 504 and "request_timeout_s=0.05" in response.json()["error"]["message"]
    assert served.idle()


def test_a_failing_step_fails_its_requests_and_the_server_lives_on(served, monkeypatch):
    real_step = served.engine.step

    def failing_step():
        served.engine.step = real_step
        raise RuntimeError("boom")
    monkeypatch.setattr(served.engine, "step", failing_step)
    response = served.post("/v1/completions", completion())
    assert response.status_code == 500 and "boom" not in response.json()["error"]["message"]     # logged only
    assert served.idle()
    assert served.post("/v1/completions", completion()).status_code == 200


# -- the benchmark client ------------------------------------------------------------------------------------------
def test_http_target_closed_and_open_loop(served):
    """The one driver over HTTP: closed loop (2 warm-ups left out of the results) and open loop."""
    requests = [WorkloadRequest(i, [11 + i, 400, 9000 + i], 3 + i % 4) for i in range(6)]
    arrivals = ClosedLoopArrivals(num_requests=4, clients=2, rng=np.random.default_rng(0), jitter_s_per_client=0.001)
    for process, measured in ((arrivals, requests[2:]), (OpenLoopArrivals([0.0, 0.02, 0.04, 0.06, 0.08, 0.1]),
                                                         requests)):
        with HttpTarget(served.url, api_key=API_KEY) as target:
            traces = run_workload(target, Workload(requests, process), progress=False).traces
        assert [t.output_tokens for t in traces] == [r.max_new_tokens for r in measured]
        assert all(t.finish_reason == "length" and t.finish_time >= t.token_times[-1] >= t.arrival_time
                   for t in traces)
    with HttpTarget(served.url, api_key="wrong", model=MODEL) as target:
        bad = run_workload(target, Workload(requests[:1], OpenLoopArrivals([0.0])), progress=False).traces
    assert bad[0].finish_reason.startswith("error: HTTP 401") and bad[0].finish_time is None


# -- pieces without a server ---------------------------------------------------------------------------------------
def test_detokenizer_streams_split_characters_and_holds_back_stop_prefixes(tokenizer):
    text = "naïve café 日本語 😀 done. STOP here"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)

    def push(t):
        detok.push([t])
        return detok.delta()
    assert "".join(push(t) for t in ids) + detok.delta(finished=True) == tokenizer.decode(ids)
    detok = IncrementalDetokenizer(tokenizer, stop=[" STOP"])
    kept = text[:text.index(" STOP")]
    stop_at = len(tokenizer.encode(kept))
    streamed = "".join(push(t) for t in ids[:stop_at + 1])     # the last token, " ST", may begin " STOP"
    assert streamed == kept and detok.stop_at is None
    push(ids[stop_at + 1])                                     # "OP": the stop string is complete
    assert detok.stop_at == len(kept) and detok.delta(finished=True) == "" and detok.final_text == kept


class CharTokenizer:
    """One token per character: the detokenizer's text is exactly the pushed characters."""

    def decode(self, ids, **kwargs):
        return "".join(map(chr, ids))


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="abc", max_size=30), stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=5),
                                                                   min_size=1, max_size=4),
       include=st.booleans())
def test_detokenizer_streams_exactly_the_final_text_and_never_a_stop_string(text, stops, include):
    """Against the definition: generation stops at the shortest prefix of the text that contains a stop string;
    the final text ends before (or, with include_stop, after) the first one in it (the longest, if several start
    there); what was streamed is exactly that and, without include_stop, never contains a stop string."""
    detok = IncrementalDetokenizer(CharTokenizer(), stops, include_stop=include)
    streamed = ""
    for i, char in enumerate(text):
        detok.push([ord(char)])
        finished = detok.stop_at is not None or i == len(text) - 1
        streamed += detok.delta(finished=finished)
        if finished:
            break
    expected = text
    end = next((n for n in range(1, len(text) + 1) if any(s in text[:n] for s in stops)), None)
    if end is not None:
        at, minus = min((text[:end].find(s), -len(s)) for s in stops if s in text[:end])
        expected = text[:at - minus] if include else text[:at]
    assert streamed == detok.final_text == expected
    assert include or not any(s in streamed for s in stops)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="abc", max_size=60), stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=5),
                                                                   max_size=3),
       include=st.booleans(), settle=st.integers(0, 4))
def test_detokenizer_that_settles_its_text_early_streams_the_same(text, stops, include, settle):
    """Text moved out of the string that grows (fastgen.detokenizer.SETTLE_CHARS: what lies that far behind the
    unsent text and the stop-string search) changes nothing: the same deltas, stop and final text as keeping it all
    in one string."""
    def run(settle_chars: int) -> tuple:
        with mock.patch("fastgen.detokenizer.SETTLE_CHARS", settle_chars):
            detok = IncrementalDetokenizer(CharTokenizer(), stops, include_stop=include)
            deltas = []
            for i, char in enumerate(text):
                detok.push([ord(char)])
                finished = detok.stop_at is not None or i == len(text) - 1
                deltas.append(detok.delta(finished=finished))
                if finished:
                    break
            return deltas, detok.stop_at, detok.stop_end, detok.final_text, detok.text, detok._base > 0
    settled, whole = run(settle), run(len(text) + 1)
    assert settled[:-1] == whole[:-1] and not whole[-1]


def test_serve_config_composes_from_conf(monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    monkeypatch.setenv("FASTGEN_API_KEY", "from-env")
    register_all()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = OmegaConf.to_object(compose("serve", overrides=["port=9001", "scheduler=sarathi"]))
    assert isinstance(cfg, ServeConfig)
    assert (cfg.host, cfg.port, cfg.api_key, cfg.scheduler.name, cfg.model_name) == \
        ("127.0.0.1", 9001, "from-env", "sarathi", "smollm2-135m")


@pytest.mark.slow
def test_module_entry_point_prints_its_config():
    out = subprocess.run([sys.executable, "-m", "fastgen.serve", "--cfg", "job", "port=9002"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "FASTGEN_API_KEY": ""})
    assert out.returncode == 0, out.stderr
    assert "port: 9002" in out.stdout and "host: 127.0.0.1" in out.stdout


# -- the benchmark runner's HTTP target ----------------------------------------------------------------------------
def test_benchmark_http_target_writes_the_same_metrics_as_in_process(served, tokenizer, tmp_path):
    """run.py's target=http against this server and the in-process target on the same model and workload: both
    complete every request and write metrics.json with the same keys (the values differ)."""
    from fastgen.bench import run_benchmark
    from fastgen.conf import compose_config

    model = tiny_model()
    common = ["workload.num_requests=6", "workload.clients=2", "workload.prompt.mean=20", "workload.prompt.max=60",
              "workload.output.mean=5", "kv.block_size=16", "kv.num_blocks=64", "progress=false"]
    over_http = run_benchmark(compose_config(common + ["target=http", f"target.url={served.url}",
                                                       f"target.api_key={API_KEY}"]),
                              tmp_path / "http", model=model, tokenizer=tokenizer)
    in_process = run_benchmark(compose_config(common), tmp_path / "engine", model=model, tokenizer=tokenizer)
    assert over_http["num_completed"] == in_process["num_completed"] == 6
    assert set(over_http) == set(in_process)
    assert over_http["num_output_tokens"] == in_process["num_output_tokens"]
    for d in ("http", "engine"):
        assert len((tmp_path / d / "requests.jsonl").read_text().splitlines()) == 6
    assert served.idle()


def test_http_target_needs_a_url(tmp_path):
    from fastgen.bench import run_benchmark
    from fastgen.conf import compose_config
    with pytest.raises(ValueError, match="target=http needs target.url"):
        run_benchmark(compose_config(["target=http", "target.url=null"]), tmp_path)
