"""create_app: the OpenAI-compatible HTTP API around an LLMEngine (the persistent deployment).

Every check a request can fail runs in the handler before the request reaches the engine thread, so a bad request
costs a 4xx and nothing else; what only the engine can judge (add_request's own checks) comes back through the
request's stream as a 400. A request that is no longer wanted (client gone, deadline passed) is aborted at once,
which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastgen.engine import LLMEngine
from fastgen.sampling import SamplingParams
from fastgen.serve.config import ServeConfig
from fastgen.serve.engine_loop import EngineLoop, RequestStream
from fastgen.serve.metrics import ServerMetrics
from fastgen.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, GenerationBody, Responder,
                                    validation_error)

# max_tokens when a request leaves it out: OpenAI's 16 for /v1/completions; for chat, max_tokens_limit. Both are
# capped by the room the prompt leaves in the context.
DEFAULT_COMPLETION_TOKENS = 16

Body = TypeVar("Body", bound=GenerationBody)
T = TypeVar("T")


class Server:
    """What the routes share: the engine thread, the limits, the metrics and the tokenizer."""

    def __init__(self, engine: LLMEngine, cfg: ServeConfig):
        self.cfg = cfg
        self.metrics = ServerMetrics()
        self.loop = EngineLoop(engine, self.metrics)
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.model_name = cfg.model_name
        self.created = int(time.time())


def create_app(engine: LLMEngine, cfg: ServeConfig | None = None) -> FastAPI:
    """The app serving `engine`; the engine thread runs while the app does (its lifespan). cfg's engine fields
    are not used: the engine is already built."""
    cfg = cfg or ServeConfig()
    cfg.validate()
    server = Server(engine, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            server.loop.stop()

    # No /docs or /openapi.json: they would be endpoints outside the API key.
    app = FastAPI(title="fastgen", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_exception_handler(APIError, _api_error_response)
    app.add_exception_handler(StarletteHTTPException, _http_error_response)
    app.add_exception_handler(Exception, _internal_error_response)
    app.add_api_route("/health", health, methods=["GET"])
    app.include_router(router)
    return app


def _server(request: Request) -> Server:
    return request.app.state.server


async def _api_error_response(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _http_error_response(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return await _api_error_response(request, APIError(e.status_code, str(e.detail)))


async def _internal_error_response(request: Request, e: Exception) -> JSONResponse:
    return await _api_error_response(request, APIError(500, f"internal server error: {e}", type="server_error"))


def require_api_key(request: Request) -> None:
    key = _server(request).cfg.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


router = APIRouter(dependencies=[Depends(require_api_key)])     # every endpoint but /health


async def health(request: Request) -> JSONResponse:
    if _server(request).loop.alive:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "the engine thread has stopped"}, status_code=503)


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    server = _server(request)
    return JSONResponse({"object": "list", "data": [{"id": server.model_name, "object": "model",
                                                      "created": server.created, "owned_by": "fastgen",
                                                      "max_model_len": server.max_model_len}]})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    m = _server(request).metrics
    return Response(m.render(), media_type=m.content_type)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    server = _server(request)
    body = await _parse(request, CompletionRequest)
    prompt = body.prompt if isinstance(body.prompt, list) else _encode(server, body.prompt, "prompt")
    return await _generate(request, body, prompt, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    server = _server(request)
    body = await _parse(request, ChatCompletionRequest)
    if server.tokenizer is None:
        raise APIError(400, "this server's model has no tokenizer, so it cannot serve chat; use /v1/completions "
                            "with token ids", param="messages")
    try:
        text = server.tokenizer.apply_chat_template([m.as_template_input() for m in body.messages],
                                                    add_generation_prompt=True, tokenize=False)
    except (ValueError, TemplateError) as e:
        raise APIError(400, f"cannot apply the model's chat template: {e}", param="messages") from e
    # The template writes the special tokens (BOS included) itself.
    return await _generate(request, body, _encode(server, text, "messages", add_special_tokens=False), chat=True)


# -- one generation request ----------------------------------------------------------------------------------------
async def _parse(request: Request, schema: type[Body]) -> Body:
    server = _server(request)
    raw = await _read_body(request, server.cfg.max_body_bytes)
    try:
        body = schema.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e) from None
    if body.model != server.model_name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {server.model_name!r}",
                       param="model", code="model_not_found")
    return body


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit` bytes, before it is all buffered."""
    too_large = APIError(413, f"the request body exceeds the server's limit max_body_bytes={limit}",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _encode(server: Server, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
    if server.tokenizer is None:
        raise APIError(400, "this server's model has no tokenizer: send the prompt as a list of token ids",
                       param=param)
    return server.tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _max_tokens(server: Server, body: GenerationBody, prompt_tokens: int, chat: bool) -> int:
    """The request's max_tokens, checked against the server's limits and the model's context length."""
    cfg, param = server.cfg, "messages" if chat else "prompt"
    if prompt_tokens > cfg.max_prompt_tokens:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens, more than the server's limit "
                            f"max_prompt_tokens={cfg.max_prompt_tokens}", param=param, code="prompt_too_long")
    room = server.max_model_len - prompt_tokens
    requested = body.requested_max_tokens
    if requested is None:
        default = cfg.max_tokens_limit if chat else min(DEFAULT_COMPLETION_TOKENS, cfg.max_tokens_limit)
        requested = max(1, min(default, room))
    elif requested > cfg.max_tokens_limit:
        raise APIError(400, f"max_tokens={requested} exceeds the server's limit max_tokens_limit="
                            f"{cfg.max_tokens_limit}", param="max_tokens")
    if requested > room:
        raise APIError(400, f"the prompt ({prompt_tokens} tokens) + max_tokens ({requested}) = "
                            f"{prompt_tokens + requested} tokens exceeds the model's context length "
                            f"max_model_len={server.max_model_len}; shorten the prompt or lower max_tokens",
                       param=param, code="context_length_exceeded")
    return requested


def _sampling(body: GenerationBody, max_tokens: int) -> SamplingParams:
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k or 0, seed=body.seed, stop=body.stop, ignore_eos=body.ignore_eos)
    except ValueError as e:
        raise APIError(400, str(e)) from e


def _as_api_error(e: Exception, cfg: ServeConfig) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, asyncio.TimeoutError):
        return APIError(504, f"the request did not finish within the server's limit request_timeout_s="
                             f"{cfg.request_timeout_s:g} and was aborted", type="timeout_error", code="timeout")
    if isinstance(e, ValueError):     # add_request refused it
        return APIError(400, str(e))
    return APIError(500, str(e), type="server_error")


async def _generate(request: Request, body: GenerationBody, prompt: list[int], chat: bool) -> Response:
    server = _server(request)
    cfg = server.cfg
    sampling = _sampling(body, _max_tokens(server, body, len(prompt), chat))
    if server.loop.num_active >= cfg.max_concurrent_requests:
        raise APIError(429, f"the server is at its limit max_concurrent_requests={cfg.max_concurrent_requests}; "
                            "retry later", type="rate_limit_error", code="too_many_requests")
    responder = Responder(chat, server.model_name, body.include_usage)
    stream = server.loop.submit(responder.id, prompt, sampling, cfg.request_timeout_s)
    try:
        await stream.accepted()
    except BaseException as e:
        server.loop.release(stream)
        if isinstance(e, Exception):
            raise _as_api_error(e, cfg) from e
        raise
    if body.stream:
        return EventStream(_events(stream, responder, cfg), on_close=lambda: server.loop.release(stream))
    try:
        done = await _unless_disconnected(request, _collect(stream))
    except Exception as e:
        raise _as_api_error(e, cfg) from e
    finally:
        server.loop.release(stream)
    if done is None:
        return Response(status_code=499)      # nobody is left to read it
    text, finish_reason, completion_tokens = done
    return JSONResponse(responder.response(text, finish_reason, stream.prompt_tokens, completion_tokens))


async def _collect(stream: RequestStream) -> tuple[str, str, int]:
    text, completion_tokens = [], 0
    async for update in stream.updates():     # ends with the last update
        text.append(update.text)
        completion_tokens += len(update.token_ids)
    return "".join(text), update.finish_reason, completion_tokens


async def _events(stream: RequestStream, responder: Responder, cfg: ServeConfig) -> AsyncIterator[str]:
    """The OpenAI stream: one chunk per engine update (so per token), then usage if asked for, then [DONE]. An
    error after the 200 went out can only be reported in the stream, as an error object."""
    if responder.chat:
        yield _sse(responder.chunk("", first=True))
    completion_tokens = 0
    try:
        async for update in stream.updates():
            completion_tokens += len(update.token_ids)
            yield _sse(responder.chunk(update.text, update.finish_reason))
        if responder.include_usage:
            yield _sse(responder.usage_chunk(stream.prompt_tokens, completion_tokens))
    except Exception as e:      # reported to the client in the stream
        yield _sse(_as_api_error(e, cfg).body())
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events that release their request however the response ends: completed, client gone (Starlette
    cancels the stream), or failed."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None if the client hangs up first (then `work` is cancelled)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task.done() else None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
