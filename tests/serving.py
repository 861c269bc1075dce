"""A served tiny model for the server's tests: a random Llama over SmolLM2's real tokenizer and chat template (a
step takes milliseconds), the app under fastgen's own uvicorn edge on a loopback port, and helpers to talk to it."""
from __future__ import annotations

import contextlib
import functools
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastgen.compose import build_engine
from fastgen.compose import EngineConfig
from fastgen.engine import LLMEngine
from fastgen.kv import KV_MANAGERS
from fastgen.pipeline import Pipeline
from fastgen.schedulers import SCHEDULERS
from fastgen.serve import ServeConfig, create_app
from fastgen.serve.edge import uvicorn_server
from tiny import fastgen_from_hf, smollm2_files, tiny_config

API_KEY = "test-key"
MODEL = "tiny-smollm2"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ENGINE_CFG = EngineConfig(scheduler=SCHEDULERS.config("splitfuse", token_budget=256),
                          kv=KV_MANAGERS.config("blocked", block_size=16, num_blocks=512))


@functools.lru_cache(maxsize=None)
def tokenizer():
    directory, gguf_file = smollm2_files()
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)


@functools.lru_cache(maxsize=None)
def tiny_model():
    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=len(tokenizer()), max_position_embeddings=512)
    return fastgen_from_hf(AutoModelForCausalLM.from_config(config, attn_implementation="eager"))


def new_engine() -> LLMEngine:
    return build_engine(ENGINE_CFG, tiny_model(), tokenizer())


def serve_config(**limits) -> ServeConfig:
    limits = dict(port=0, api_key=API_KEY, served_model_name=MODEL, max_prompt_tokens=400, max_tokens_limit=200,
                  max_concurrent_requests=128, max_body_bytes=16384, request_timeout_s=60.0) | limits
    return ServeConfig(**limits)


@dataclass
class Served:
    url: str
    engine: LLMEngine
    cfg: ServeConfig
    server: object               # the uvicorn server
    reference: Pipeline | None   # a second engine over the same weights, driven directly

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)

    def post(self, path: str, body=None, content: bytes | None = None, headers=None) -> httpx.Response:
        headers = AUTH | ({"Content-Type": "application/json"} if content is not None else {}) | (headers or {})
        return httpx.post(f"{self.url}{path}", json=body, content=content, headers=headers, timeout=60)

    def get(self, path: str, headers=None) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers=AUTH | (headers or {}), timeout=60)

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
        text = self.get("/metrics").text
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


@contextlib.contextmanager
def served(cfg: ServeConfig | None = None, engine: LLMEngine | None = None, reference: bool = False):
    """The app on a free loopback port, in a thread, for the duration of the block."""
    cfg = cfg or serve_config()
    engine = engine or new_engine()
    server = uvicorn_server(create_app(engine, cfg), cfg, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Served(f"http://127.0.0.1:{port}", engine, cfg, server, Pipeline(new_engine()) if reference else None)
    finally:
        server.should_exit = True
        thread.join(timeout=cfg.shutdown_grace_s + 10)


async def numbered_stream(client: openai.AsyncOpenAI, i: int) -> tuple[int, int, str, int]:
    """Streams request number i (4 + i % 5 tokens, EOS ignored): (tokens asked, chunks with a choice, the last
    finish_reason, usage's completion_tokens)."""
    n = 4 + i % 5
    stream = await client.completions.create(model=MODEL, prompt=f"Request number {i} says", max_tokens=n,
                                             temperature=0, stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    choices, usage = [], None
    async for chunk in stream:
        choices += chunk.choices
        usage = chunk.usage or usage
    return n, len(choices), choices[-1].finish_reason, usage.completion_tokens


def stream_text(chunks, chat: bool) -> tuple[str, list, object]:
    """(concatenated text, the chunks that carry a choice, the usage) of an openai stream."""
    text, choices, usage = "", [], None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            choices.append(choice)
            text += (choice.delta.content or "") if chat else choice.text
    return text, choices, usage
