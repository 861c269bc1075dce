"""The field's own clients against the server: lm-eval's `local-completions` model (real, a tiny local
multiple-choice task in tests/data), guidellm's and vLLM's benchmark requests (their exact bodies, replayed in
streaming mode; the real guidellm, from its own virtual environment, in a slow test)."""
import asyncio
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from fastgen.pipeline import Pipeline
from serving import API_KEY, AUTH, MODEL, new_engine, served, serve_config, tokenizer
from tiny import smollm2_files

DATA = Path(__file__).parent / "data"
GUIDELLM = Path("/work/venvs/guidellm/bin/guidellm")


@pytest.fixture(scope="module")
def server():
    with served(serve_config(max_body_bytes=1 << 20)) as s:
        yield s


# -- lm-eval -------------------------------------------------------------------------------------------------------
TASKS = """
task: fastgen_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
---
"""


def write_tasks(directory: Path) -> None:
    common = dict(data=DATA / "lm_eval_tiny_mc.jsonl", cache=directory / "cache")
    (directory / "tiny_mc.yaml").write_text(TASKS.split("---")[0].format(**common))
    (directory / "tiny_gen.yaml").write_text(f"""
task: fastgen_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files: {{test: {common['data']}}}
  cache_dir: {common['cache']}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n", "Question:"]
  max_gen_toks: 6
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""")


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair: trailing spaces move to the continuation; the continuation's tokens are
    the whole's tokens after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


def test_lm_eval_local_completions_loglikelihood_and_generate_until(server, tmp_path, monkeypatch):
    """lm-eval (its remote tokenizer auto-detected through /tokenizer_info and /tokenize) runs a multiple-choice
    task with batched loglikelihood requests (echo + logprobs) and a generate_until task with batch_size=4; its
    loglikelihoods equal fastgen's own prompt logprobs, so it picks the same answers."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_tasks(tmp_path)
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=dict(model=MODEL, base_url=f"{server.url}/v1/completions", auth_token=API_KEY, max_length=512,
                        num_concurrent=1, max_retries=1, seed=1234),
        tasks=["fastgen_tiny_mc", "fastgen_tiny_gen"], task_manager=TaskManager(include_path=str(tmp_path)),
        batch_size=4, log_samples=True, limit=None)
    assert results["results"]["fastgen_tiny_mc"]["acc,none"] is not None
    tok = tokenizer()
    reference = Pipeline(new_engine())
    samples = results["samples"]["fastgen_tiny_mc"]
    assert len(samples) == 8
    for sample in samples:
        scores = []
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            loglikelihood, _ = resp[0]
            ctx, cont = encode_pair(tok, context, continuation)
            out = reference(ctx + cont, max_new_tokens=1, prompt_logprobs=0)[0]
            ours = sum(e.logprob for e in out.prompt_logprobs[len(ctx) - 1:])
            assert loglikelihood == pytest.approx(ours, abs=1e-4)
            scores.append(ours)
        chosen = max(range(len(scores)), key=scores.__getitem__)
        assert sample["acc"] == float(chosen == sample["target"])
    generated = results["samples"]["fastgen_tiny_gen"]
    assert len(generated) == 8
    for sample in generated:
        prompt = sample["arguments"][0][0]
        expected = reference(tok.encode(prompt, add_special_tokens=False), max_new_tokens=6,
                             stop=["\n", "Question:"])[0].text
        assert sample["resps"][0][0] == expected


# -- guidellm and vLLM's benchmark: their exact request bodies -----------------------------------------------------
def guidellm_body(chat: bool, prompt: str, output_tokens: int) -> dict:
    """What guidellm 0.8.1's OpenAIHTTPBackend sends for a synthetic request in its default streaming mode
    (guidellm/backends/openai/request_handlers.py: TextCompletionsRequestHandler / ChatCompletionsRequestHandler
    .format)."""
    body = {"model": MODEL, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if chat:
        return body | {"max_completion_tokens": output_tokens, "stop": None, "ignore_eos": True,
                       "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}]}
    return body | {"max_tokens": output_tokens, "stop": None, "ignore_eos": True, "prompt": prompt}


def vllm_bench_body(prompt: str, output_tokens: int) -> dict:
    """vLLM's `vllm bench serve` (openai backend, completions; vllm/benchmarks/lib/endpoint_request_func.py) with
    --ignore-eos."""
    return {"model": MODEL, "prompt": prompt, "repetition_penalty": 1.0, "max_tokens": output_tokens,
            "logprobs": None, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}


async def stream_like_guidellm(client: httpx.AsyncClient, path: str, body: dict) -> dict:
    """One request timed as guidellm does: the first iteration with text (chat: delta content) is the first
    token; usage from the last chunk that has it."""
    start = time.perf_counter()
    token_times, usage, text, error = [], None, "", None
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            data = json.loads(line[5:])
            if "error" in data:
                error = data["error"]["message"]
                continue
            choice = (data.get("choices") or [{}])[0]
            piece = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
            if piece:
                token_times.append(time.perf_counter())
                text += piece
            usage = data.get("usage") or usage
    if error or not token_times:
        return {"error": error or "no token"}
    return {"ttft": token_times[0] - start, "itl": [b - a for a, b in zip(token_times, token_times[1:])],
            "usage": usage, "text": text}


@pytest.mark.parametrize("client_name,chat", [("guidellm", False), ("guidellm", True), ("vllm-bench", False)])
def test_benchmark_clients_request_bodies_replayed_streaming(server, client_name, chat):
    """8 concurrent streams of each client's exact body: none fails, each reports TTFT and ITL, and usage counts
    every token (guidellm: usage in every chunk, continuous_usage_stats)."""
    prompts = [f"Request {i}: tell me a story about the number {i}." for i in range(8)]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    make = (lambda p: guidellm_body(chat, p, 12)) if client_name == "guidellm" else (lambda p: vllm_bench_body(p, 12))

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as client:
            return await asyncio.gather(*(stream_like_guidellm(client, path, make(p)) for p in prompts))
    results = asyncio.run(run())
    failed = [r["error"] for r in results if "error" in r]
    assert failed == []
    assert all(r["usage"]["completion_tokens"] == 12 and r["ttft"] > 0 and len(r["itl"]) <= 11 for r in results)
    assert statistics.median(x for r in results for x in r["itl"]) > 0
    assert server.idle()


@pytest.mark.slow
@pytest.mark.skipif(not GUIDELLM.exists(), reason="guidellm is installed in /work/venvs/guidellm "
                                                  "(python -m venv --system-site-packages; pip install guidellm)")
@pytest.mark.parametrize("request_format", ["/v1/completions", "/v1/chat/completions"])
def test_real_guidellm_against_the_server(server, tmp_path, request_format):
    """The real guidellm 0.8.1 (streaming, its default), synchronous then 4 concurrent streams: every request
    completes, and its report has TTFT and ITL."""
    directory, gguf_file = smollm2_files()
    scenario = {"metadata": {"name": "fastgen-test", "description": "fastgen's server"}, "spec": {
        "backend": {"kind": "openai_http", "target": server.url, "model": MODEL, "api_key": API_KEY,
                    "request_format": request_format},
        "tokenizer": {"kind": "hf_auto", "model": directory, "load_kwargs": {"gguf_file": gguf_file}},
        "profile": {"kind": "concurrent", "streams": 4},
        "data": [{"kind": "synthetic_text", "prompt_tokens": 64, "output_tokens": 16}],
        "constraints": [{"kind": "max_requests", "count": 12}]}}
    (tmp_path / "scenario.json").write_text(json.dumps(scenario))
    out = subprocess.run([str(GUIDELLM), "run", "-c", str(tmp_path / "scenario.json"), "--disable-progress",
                          "--output", f"kind=json,path={tmp_path / 'report.json'}"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    benchmark = report["benchmarks"][0]
    totals = benchmark["metrics"]["request_totals"]
    assert (totals["successful"], totals["errored"]) == (12, 0)
    assert benchmark["metrics"]["time_to_first_token_ms"]["successful"]["median"] > 0
    assert benchmark["metrics"]["inter_token_latency_ms"]["successful"]["median"] > 0
    print(request_format, {k: (round(benchmark["metrics"][k]["successful"]["median"], 1),
                               round(benchmark["metrics"][k]["successful"]["percentiles"]["p99"], 1))
                           for k in ("time_to_first_token_ms", "inter_token_latency_ms", "request_latency")})
