"""The HTTP server (fastgen.serve) over real loopback HTTP: the openai client's round trips, exactness against
Pipeline, 64 concurrent streams, every fault a client can cause, and the benchmark client.

The model is a tiny random Llama over SmolLM2's vocabulary, so the tokenizer and chat template are real while a
step takes milliseconds. One server (with an API key) serves the whole module."""
import asyncio
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np
import openai
import pytest
import torch
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastgen.compose import CONF_DIR, build_engine, register_all
from fastgen.config import EngineConfig
from fastgen.detokenizer import IncrementalDetokenizer
from fastgen.driver import run_workload
from fastgen.engine import LLMEngine
from fastgen.kv import KV_MANAGERS
from fastgen.pipeline import Pipeline
from fastgen.schedulers import SCHEDULERS
from fastgen.serve import HttpTarget, ServeConfig, create_app
from fastgen.workloads import ClosedLoopArrivals, OpenLoopArrivals, Workload, WorkloadRequest
from tiny import fastgen_from_hf, smollm2_files, tiny_config

API_KEY = "test-key"
MODEL = "tiny-smollm2"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ENGINE_CFG = EngineConfig(scheduler=SCHEDULERS.config("splitfuse", token_budget=256),
                          kv=KV_MANAGERS.config("blocked", block_size=16, num_blocks=512))


@dataclass
class Served:
    url: str
    engine: LLMEngine
    model: object
    cfg: ServeConfig
    reference: Pipeline          # a second engine over the same weights, driven directly

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)

    def post(self, path: str, body=None, content: bytes | None = None, headers=AUTH) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, content=content, headers=headers, timeout=60)

    def idle(self, timeout_s: float = 10.0) -> bool:
        """Waits until the engine holds no request and every KV block is free again."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.engine.snapshot()
            if state.num_running == state.num_waiting == 0 and state.kv_blocks_free == state.kv_blocks_total:
                return True
            time.sleep(0.02)
        return False

    def counter(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", headers=AUTH).text
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


@pytest.fixture(scope="module")
def tokenizer():
    directory, gguf_file = smollm2_files()
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)


@pytest.fixture(scope="module")
def served(tokenizer):
    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=len(tokenizer), max_position_embeddings=512)
    model = fastgen_from_hf(AutoModelForCausalLM.from_config(config, attn_implementation="eager"))
    engine = build_engine(ENGINE_CFG, model, tokenizer)
    cfg = ServeConfig(port=0, api_key=API_KEY, served_model_name=MODEL, max_prompt_tokens=400, max_tokens_limit=200,
                      max_concurrent_requests=128, max_body_bytes=16384, request_timeout_s=60.0)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, cfg), host=cfg.host, port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield Served(f"http://127.0.0.1:{port}", engine, model, cfg, Pipeline(build_engine(ENGINE_CFG, model, tokenizer)))
    server.should_exit = True
    thread.join(timeout=10)


def stream_text(chunks, chat: bool) -> tuple[str, list, object]:
    """(concatenated text, the chunks that carry a choice, the usage) of an openai stream."""
    text, choices, usage = "", [], None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            choices.append(choice)
            text += (choice.delta.content or "") if chat else choice.text
    return text, choices, usage


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


# -- load ----------------------------------------------------------------------------------------------------------
def test_64_concurrent_streams_all_complete_and_free_the_kv(served):
    async def one(client, i):
        n = 4 + i % 5
        stream = await client.completions.create(model=MODEL, prompt=f"Request number {i} says", max_tokens=n,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        choices, usage = [], None
        async for chunk in stream:
            choices += chunk.choices
            usage = chunk.usage or usage
        return n, len(choices), choices[-1].finish_reason, usage.completion_tokens

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    before = served.counter("fastgen_generation_tokens_total")
    results = asyncio.run(main())
    assert all((chunks, finish, used) == (n, "length", n) for n, chunks, finish, used in results)
    assert served.idle()
    assert served.counter("fastgen_generation_tokens_total") - before == sum(n for n, *_ in results)


# -- faults --------------------------------------------------------------------------------------------------------
def completion(**extra):
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 2, **extra}


FAULTS = [  # (path, body, status, words the message must contain)
    ("/v1/completions", b'{"model": "tiny-smollm2", "prompt": ', 400, "not valid JSON"),
    ("/v1/completions", completion(max_tokens="ten"), 400, "max_tokens"),
    ("/v1/completions", completion(temperature="hot"), 400, "temperature"),
    ("/v1/completions", completion(prompt=12), 400, "prompt"),
    ("/v1/completions", completion(max_tokens=-1), 400, "max_tokens"),
    ("/v1/completions", completion(max_tokens=10**6), 400, "max_tokens_limit=200"),
    ("/v1/completions", completion(prompt=[7] * 401), 400, "max_prompt_tokens=400"),
    ("/v1/completions", completion(prompt=[7] * 350, max_tokens=200), 400, "max_model_len=512"),
    ("/v1/completions", completion(prompt="word " * 4000), 413, "max_body_bytes=16384"),
    ("/v1/completions", completion(prompt=[10**6]), 400, "outside the vocabulary"),     # refused by add_request
    ("/v1/completions", completion(temperature=-1.0), 400, "temperature"),
    ("/v1/completions", completion(model="gpt-4"), 404, "gpt-4"),
    ("/v1/completions", completion(n=2), 400, "n=2"),
    ("/v1/completions", completion(logprobs=2), 400, "'logprobs'"),
    ("/v1/completions", completion(best_of=3), 400, "'best_of'"),
    ("/v1/completions", completion(echo=True), 400, "'echo'"),
    ("/v1/completions", completion(presence_penalty=0.5), 400, "'presence_penalty'"),
    ("/v1/completions", completion(frequency_penalty=1.0), 400, "'frequency_penalty'"),
    ("/v1/completions", completion(logit_bias={"5": 10}), 400, "'logit_bias'"),
    ("/v1/completions", completion(prompt=["a", "b"]), 400, "batched prompts"),
    ("/v1/completions", completion(stream_options={"include_usage": True}), 400, "stream=true"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, 400, "'tools'"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
]


@pytest.mark.parametrize("path,body,status,words", FAULTS, ids=[f"{i}-{f[3]}" for i, f in enumerate(FAULTS)])
def test_faults_get_a_clear_error(served, path, body, status, words):
    response = served.post(path, content=body) if isinstance(body, bytes) else served.post(path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"]


def test_neutral_values_of_unsupported_parameters_are_accepted(served):
    body = completion(best_of=1, presence_penalty=0, frequency_penalty=0.0, logprobs=None, echo=False, user="u1")
    assert served.post("/v1/completions", body).status_code == 200


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
    assert response.status_code == 500 and "boom" in response.json()["error"]["message"]
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
    from fastgen.compose import compose_config

    model = served.model
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
    from fastgen.compose import compose_config
    with pytest.raises(ValueError, match="target=http needs target.url"):
        run_benchmark(compose_config(["target=http", "target.url=null"]), tmp_path)
