"""HttpTarget: the benchmark's load generator over HTTP, for this server or any OpenAI-compatible one.

Each request goes to /v1/completions as token ids with stream=true, ignore_eos=true and temperature 0, so the
server does exactly the work the workload asks for. Traces use one clock, seconds since the target was made:
`arrival_time` is when the request was sent and `token_times` when each chunk carrying a token reached the client
(so TTFT is timed to the first token, not to the response headers or to a role-only chat chunk that some servers
send before the first token; fastgen's own server sends nothing before it), so fastgen.metrics judges what
a user would see (network and HTTP included). fastgen.driver decides when each request is sent; the streams run on
an asyncio loop in a background thread.
"""
from __future__ import annotations

import asyncio
import json
import queue
import threading
import time

import httpx

from fastgen.request_trace import DEFAULT_TENANT, RequestTrace
from fastgen.workloads import WorkloadRequest


class HttpTarget:
    """A driver target (fastgen.driver.Target) that streams each request from the server at `url` (with or
    without the /v1 suffix). `model` defaults to the first model the server lists. A request that fails keeps no
    finish_time (so metrics do not count it as completed) and its finish_reason says why, starting with "error"."""

    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None,
                 timeout_s: float | None = None):
        self.base = url.rstrip("/") if url.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fastgen-http-target", daemon=True)
        self._thread.start()
        self._client = self._call(self._open())
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._in_flight = 0
        self._start = time.perf_counter()
        try:
            self.model = model or self._call(_first_model(self._client))
        except BaseException:
            self.close()
            raise

    def clock(self) -> float:
        return time.perf_counter() - self._start

    def send(self, index: int, request_id: str, request: WorkloadRequest, send_time: float) -> None:
        self._in_flight += 1
        asyncio.run_coroutine_threadsafe(self._one(index, request_id, request), self._loop)

    def wait(self, until: float | None) -> list[tuple[int, RequestTrace]]:
        try:
            done = [self._done.get(timeout=None if until is None else max(0.0, until - self.clock()))]
        except queue.Empty:
            return []
        while True:
            try:
                done.append(self._done.get_nowait())
            except queue.Empty:
                break
        self._in_flight -= len(done)
        return done

    def busy(self) -> bool:
        return self._in_flight > 0

    def steps(self) -> list:
        return []         # a server has no per-step records to give

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._client.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()

    def __enter__(self) -> "HttpTarget":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def _open(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)   # never queue in the client
        return httpx.AsyncClient(base_url=self.base, headers=self.headers, timeout=self.timeout_s, limits=limits)

    async def _one(self, index: int, request_id: str, request: WorkloadRequest) -> None:
        try:
            trace = await _stream_completion(self._client, self.model, request_id, request.prompt_token_ids,
                                             request.max_new_tokens, self.clock, _class_fields(request))
        except BaseException as e:   # noqa: BLE001  (whatever happens, the driver must hear this request ended)
            trace = RequestTrace(request_id, len(request.prompt_token_ids), self.clock(),
                                 finish_reason=f"error: {type(e).__name__}: {e}")
        trace.request_class, trace.tenant, trace.priority, trace.slo = (
            request.request_class, request.tenant, request.priority, request.slo)
        self._done.put((index, trace))

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()


async def _first_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def _class_fields(request: WorkloadRequest) -> dict:
    """The request's class as the server takes it: vLLM's `priority` (sent only when not 0, as servers without
    priority scheduling refuse it) and OpenAI's `user` as the tenant (sent only for a tenant other than the
    default)."""
    fields: dict = {}
    if request.priority:
        fields["priority"] = request.priority
    if request.tenant != DEFAULT_TENANT:
        fields["user"] = request.tenant
    return fields


async def _stream_completion(client: httpx.AsyncClient, model: str, request_id: str, prompt: list[int],
                             max_new_tokens: int, clock, extra: dict | None = None) -> RequestTrace:
    """One streamed request. A chunk whose choice carries a token (`carries_token`) is counted as one token; when
    the server reports usage, its completion_tokens count wins (a server that packs several tokens into one chunk
    gets them all at that chunk's time, and a chunk that only carries finish_reason does not count)."""
    payload = {"model": model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0.0, "stream": True,
               "ignore_eos": True, "stream_options": {"include_usage": True}, **(extra or {})}
    trace = RequestTrace(request_id, len(prompt), clock())
    completion_tokens = None
    try:
        async with client.stream("POST", "/completions", json=payload) as response:
            if response.status_code != 200:
                trace.finish_reason = f"error: HTTP {response.status_code}: {_message(await response.aread())}"
                return trace
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk, now = json.loads(line[5:]), clock()
                if "error" in chunk:
                    trace.finish_reason = f"error: {chunk['error'].get('message')}"
                    return trace
                for choice in chunk.get("choices") or ():
                    if carries_token(choice):
                        trace.token_times.append(now)
                    trace.finish_reason = choice.get("finish_reason") or trace.finish_reason
                if chunk.get("usage"):
                    completion_tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        trace.finish_reason = f"error: {type(e).__name__}: {e}"
        return trace
    if completion_tokens is not None and trace.token_times:
        times = trace.token_times[:completion_tokens]
        trace.token_times = times + [times[-1]] * (completion_tokens - len(times))
    trace.finish_time = clock()
    return trace


def carries_token(choice: dict) -> bool:
    """Whether a stream chunk's choice stands for a token: every completion choice does (its text may be empty
    while a server holds it back), a chat choice unless its delta only announces the role (an empty delta with a
    role and no content, logprobs or finish_reason, which some servers send first)."""
    delta = choice.get("delta")
    if delta is None:
        return True
    role_only = "role" in delta and not delta.get("content") and not delta.get("tool_calls")
    return not (role_only and choice.get("logprobs") is None and choice.get("finish_reason") is None)


def _message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:200]
