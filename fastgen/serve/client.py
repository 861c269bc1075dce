"""run_http_requests: the benchmark's load generator over HTTP, for this server or any OpenAI-compatible one.

Each request goes to /v1/completions as token ids with stream=true, ignore_eos=true and temperature 0, so the
server does exactly the work the workload asks for. The returned traces use one clock, seconds since the run
started: `arrival_time` is when the request was sent and `token_times` when each token reached the client, so
fastgen.metrics judges what a user would see (network and HTTP included). Send times come from an arrival process
(see fastgen.workloads.arrivals): open-loop times are sent as scheduled, closed-loop clients send their next
request when the previous one finished.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence

import httpx

from fastgen.trace import RequestTrace
from fastgen.workloads import ArrivalProcess, OpenLoopArrivals, WorkloadRequest

RequestSpec = WorkloadRequest | tuple[Sequence[int], int]     # (prompt token ids, max_new_tokens)


async def run_http_requests(url: str, requests: Sequence[RequestSpec],
                            arrivals: ArrivalProcess | Sequence[float] | None = None, *,
                            api_key: str | None = None, model: str | None = None,
                            timeout_s: float | None = None) -> list[RequestTrace]:
    """Sends `requests` to the server at `url` (with or without the /v1 suffix) and returns one trace per request
    sent, in request order (closed-loop warm-ups included: drop `arrivals.warmup_indices` before computing
    metrics). `arrivals` is an ArrivalProcess, a list of send times in seconds (open loop), or None (all at
    once). `model` defaults to the first model the server lists. A request that fails keeps no finish_time (so
    metrics do not count it as completed) and its finish_reason says why, starting with "error"."""
    process = _arrival_process(arrivals, len(requests))
    if process.total > len(requests):
        raise ValueError(f"the arrival process sends {process.total} requests but only {len(requests)} were given")
    base = url.rstrip("/") if url.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    traces: list[RequestTrace | None] = [None] * len(requests)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)   # never queue in the client
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout_s, limits=limits) as client:
        model = model or await _first_model(client)
        start = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - start

        async def run_one(index: int) -> None:
            prompt, max_new_tokens = _spec(requests[index])
            traces[index] = await _stream_completion(client, model, str(index), prompt, max_new_tokens, clock)

        await _drive(process, run_one, clock)
    return [t for t in traces if t is not None]


async def _drive(process: ArrivalProcess, run_one: Callable[[int], Awaitable[None]],
                 clock: Callable[[], float]) -> None:
    """Runs each request at its send time and reports every finish to the process (closed-loop clients wait on
    it), until no request is left to run."""
    tasks: set[asyncio.Task] = set()

    def schedule(sends: list[tuple[int, float]]) -> None:
        tasks.update(asyncio.ensure_future(timed(index, send_time)) for index, send_time in sends)

    async def timed(index: int, send_time: float) -> None:
        await asyncio.sleep(max(0.0, send_time - clock()))
        await run_one(index)
        schedule(process.on_finish(index, clock()))     # before this task ends, so the loop below sees them

    schedule(process.initial_requests())
    try:
        while tasks:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            tasks -= done
            for task in done:
                task.result()
    finally:
        for task in tasks:
            task.cancel()


def _arrival_process(arrivals: ArrivalProcess | Sequence[float] | None, n: int) -> ArrivalProcess:
    if arrivals is None:
        return OpenLoopArrivals([0.0] * n)
    if isinstance(arrivals, Sequence):
        return OpenLoopArrivals(arrivals)
    return arrivals


def _spec(request: RequestSpec) -> tuple[list[int], int]:
    if isinstance(request, WorkloadRequest):
        return request.prompt_token_ids, request.max_new_tokens
    prompt, max_new_tokens = request
    return [int(t) for t in prompt], int(max_new_tokens)


async def _first_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def _stream_completion(client: httpx.AsyncClient, model: str, request_id: str, prompt: list[int],
                             max_new_tokens: int, clock) -> RequestTrace:
    """One streamed request. A chunk with a choice is counted as one token; when the server reports usage, its
    completion_tokens count wins (a server that packs several tokens into one chunk gets them all at that chunk's
    time, and a chunk that only carries finish_reason does not count)."""
    payload = {"model": model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0.0, "stream": True,
               "ignore_eos": True, "stream_options": {"include_usage": True}}
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


def _message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:200]
