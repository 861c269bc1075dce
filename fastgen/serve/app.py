"""create_app: the OpenAI-compatible HTTP API around an LLMEngine (the persistent deployment).

Every check a request can fail runs in the handler before the request reaches the engine thread, so a bad request
costs a 4xx and nothing else; what only the engine can judge (add_request's own checks, e.g. top_k against the
vocabulary) comes back through the request's group as a 400 before anything is streamed. Text is tokenized (and chat
templates applied) in a worker pool, after a character-count check, so a large prompt never stalls the event loop.
A request that is no longer wanted (client gone, deadline passed) is aborted at once, which frees its KV blocks.

One HTTP request may hold several engine requests (batched prompts), with ids `<id>-<k>`; a request's n choices
(or best_of sequences) are forks made by the engine at the first token, sharing the prompt's KV blocks, and with
best_of > n the engine returns the n best.
"""
from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect

from fastgen.disaggregated import DisaggregatedEngine
from fastgen.engine import LLMEngine
from fastgen.sampling import ParameterError, SamplingParams, TokenLogprob
from fastgen.serve.tools import reader as tool_reader, template_messages
from fastgen.serve.admission import TenantLedger
from fastgen.serve.config import ServeConfig
from fastgen.serve.edge import RequestIdMiddleware, request_id
from fastgen.serve.engine_loop import (EngineLoop, ReplicaUnavailable, RequestFailed, RequestGroup, SequenceRequest,
                                      ServerShuttingDown, Update)
from fastgen.serve.prometheus import ServerMetrics
from fastgen.serve.protocol import (APIError, ChatCompletionRequest, ChatMessage, ChoiceState, CompletionRequest,
                                    DetokenizeRequest, GenerationBody, Responder, TokenizeRequest, usage,
                                    validation_error)
from fastgen.structured import ConstraintError, StructuredOutput, check as check_constraint

# max_tokens when a request leaves it out: OpenAI's 16 for /v1/completions; for chat, max_tokens_limit. Both are
# capped by the room the prompt leaves in the context.
DEFAULT_COMPLETION_TOKENS = 16
# SamplingParams' names for the API's parameters, where they differ
API_PARAMS = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "prompt_logprobs": "logprobs",
              "structured": "structured_outputs"}

Body = TypeVar("Body", bound=GenerationBody)
log = logging.getLogger(__name__)
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}", re.ASCII)


class Backend(Protocol):
    """What the app serves through: an EngineLoop (one engine in this process) or a ReplicaSet
    (fastgen.serve.replicas: engine replicas on Ray Serve)."""

    metrics: ServerMetrics | object          # has content_type
    tokenizer: object
    max_model_len: int
    vocab_size: int
    shutting_down: bool
    alive: bool
    num_active: int

    def start(self, event_loop: asyncio.AbstractEventLoop) -> None: ...
    def stop(self) -> None: ...
    def submit(self, requests: Sequence[SequenceRequest], timeout_s: float) -> RequestGroup: ...
    def release(self, group: RequestGroup) -> None: ...
    def begin_shutdown(self, grace_s: float) -> None: ...
    async def render_metrics(self) -> bytes: ...
    async def health(self) -> tuple[int, dict]: ...
T = TypeVar("T")


class Server:
    """What the routes share: the engine thread, the limits, the metrics, the tokenizer and its worker pool."""

    def __init__(self, loop: Backend, cfg: ServeConfig):
        self.cfg = cfg
        self.loop = loop
        self.metrics = loop.metrics
        self.tokenizer = loop.tokenizer
        self.max_model_len = loop.max_model_len
        self.max_tokens_limit = min(cfg.max_tokens_limit or self.max_model_len, self.max_model_len)
        self.vocab_size = loop.vocab_size
        self.model_name = cfg.model_name
        self.created = int(time.time())
        self.pool = ThreadPoolExecutor(cfg.tokenizer_workers, thread_name_prefix="fastgen-tokenize")
        self._token_texts: dict[int, str] = {}
        self.ledger = TenantLedger(cfg)

    async def off_loop(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """`fn` in the tokenizer pool: the event loop (and every stream) goes on meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    def token_text(self, token_id: int) -> str:
        """A token's own text, as logprobs show it (cached: one decode per token id)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"token_id:{token_id}"
            self._token_texts[token_id] = text
        return text

    def need_tokenizer(self, param: str) -> None:
        if self.tokenizer is None:
            raise APIError(400, "this server's model has no tokenizer: send token ids", param=param)

    def check_chars(self, texts: Sequence[str], param: str) -> None:
        chars = sum(map(len, texts))
        if chars > self.cfg.max_prompt_chars:
            raise APIError(400, f"{param} has {chars} characters, more than the server's limit max_prompt_chars="
                                f"{self.cfg.max_prompt_chars}", param=param, code="prompt_too_long")

    def encode(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Runs in the pool."""
        return [self.tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts]

    def apply_template(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True,
                       tools: list[dict] | None = None, continue_final_message: bool = False,
                       template_kwargs: dict | None = None) -> str:
        """Runs in the pool. A template that does not read `tools` gets them (and tool calls and results) as
        Hermes text (fastgen.serve.tools)."""
        knows_tools = "tools" in (self.tokenizer.chat_template or "")
        conversation = template_messages([m.as_template_input() for m in messages], tools, knows_tools)
        try:
            return self.tokenizer.apply_chat_template(
                conversation, tools=tools if knows_tools else None, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=False, **(template_kwargs or {}))
        except (ValueError, TypeError, TemplateError) as e:
            raise APIError(400, f"cannot apply the model's chat template: {e}", param="messages") from e

    async def check_constraint(self, constraint: StructuredOutput | None, param: str) -> None:
        """A constraint that does not convert into a grammar is a 400 (converted in the pool: schemas can be
        large)."""
        if constraint is not None:
            try:
                await self.off_loop(check_constraint, constraint)
            except ConstraintError as e:
                raise APIError(400, f"{param}: {e}", param=param) from None


def create_app(engine: LLMEngine | DisaggregatedEngine | Backend, cfg: ServeConfig | None = None) -> FastAPI:
    """The app serving `engine` (in this process: its engine thread runs while the app does) or a backend with
    EngineLoop's interface (fastgen.serve.replicas.ReplicaSet), which the app stops when it ends. cfg's engine
    fields are not used: the engine is already built."""
    cfg = cfg or ServeConfig()
    cfg.validate()
    in_process = isinstance(engine, (LLMEngine, DisaggregatedEngine))     # disaggregated: its pools, one front
    server = Server(EngineLoop(engine, ServerMetrics()) if in_process else engine, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            server.loop.stop()
            server.pool.shutdown(wait=False, cancel_futures=True)

    # No /docs or /openapi.json: they would be endpoints outside the API key.
    app = FastAPI(title="fastgen", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_exception_handler(APIError, _api_error_response)
    app.add_exception_handler(StarletteHTTPException, _http_error_response)
    app.add_exception_handler(Exception, _internal_error_response)
    app.add_api_route("/health", health, methods=["GET"])
    keyed = [] if cfg.open_metrics else [Depends(require_api_key)]    # vLLM serves /metrics and /ping open
    app.add_api_route("/metrics", metrics, methods=["GET"], dependencies=keyed)
    app.add_api_route("/ping", ping, methods=["GET", "POST"], dependencies=keyed)
    app.include_router(router)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=cfg.hosts)
    app.add_middleware(RequestIdMiddleware)        # outermost: every answer carries x-request-id
    return app


def _server(request: Request) -> Server:
    return request.app.state.server


async def _api_error_response(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _http_error_response(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return await _api_error_response(request, APIError(e.status_code, str(e.detail)))


async def _internal_error_response(request: Request, e: Exception) -> JSONResponse:
    """Reached only if RequestIdMiddleware did not answer first: the same generic body, no exception text."""
    return await _api_error_response(request, internal_error(request.scope))


def internal_error(scope, code: str | None = None) -> APIError:
    """A 5xx body never carries exception text (that goes to the log, under the request id)."""
    return APIError(500, f"internal server error; the server log has the details under request id "
                         f"{request_id(scope)}", type="server_error", code=code)


def has_api_key(request: Request) -> bool:
    key = _server(request).cfg.api_key
    if key is None:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())


def require_api_key(request: Request) -> None:
    if not has_api_key(request):
        raise APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def require_json(request: Request) -> None:
    """POST bodies must be declared JSON: a browser cannot send that cross-origin without a CORS preflight,
    which this server never grants."""
    if request.method == "POST":
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise APIError(415, f"the body must be sent with 'Content-Type: application/json' (got "
                                f"{media_type or 'none'!r})", param="content-type", code="unsupported_media_type")


# every endpoint but /health, /metrics and /ping (create_app adds those)
router = APIRouter(dependencies=[Depends(require_api_key), Depends(require_json)])


async def health(request: Request) -> JSONResponse:
    """ok or degraded, and nothing more without the key (replicas' pids, queues and KV occupancy would be a live
    traffic side channel): the details with the key, or for everyone with health_details=true."""
    server = _server(request)
    status, body = await server.loop.health()
    if not (server.cfg.health_details or (server.cfg.api_key is not None and has_api_key(request))):
        body = {"status": "ok" if status == 200 and body.get("status") == "ok" else "degraded"}
    return JSONResponse(body, status_code=status)


def _model_card(server: Server) -> dict:
    return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "fastgen",
            "max_model_len": server.max_model_len}


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [_model_card(_server(request))]})


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str) -> JSONResponse:
    server = _server(request)
    _check_model(server, model_id)
    return JSONResponse(_model_card(server))


@router.get("/version")
async def version() -> JSONResponse:
    return JSONResponse({"version": importlib.metadata.version("fastgen")})


async def metrics(request: Request) -> Response:
    server = _server(request)
    return Response(await server.loop.render_metrics(), media_type=server.metrics.content_type)


async def ping(request: Request) -> Response:
    """vLLM's (and SageMaker's) liveness probe: 200 while the engine runs."""
    return Response(status_code=200 if _server(request).loop.alive else 503)


# -- the tokenizer (vLLM's endpoints, which lm-eval's remote tokenizer reads) -------------------------------------
@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> JSONResponse:
    server = _server(request)
    tok = server.tokenizer
    if tok is None:
        raise APIError(404, "this server's model has no tokenizer", code="no_tokenizer")
    return JSONResponse({"tokenizer_class": type(tok).__name__, "bos_token": tok.bos_token,
                         "eos_token": tok.eos_token, "pad_token": tok.pad_token, "unk_token": tok.unk_token,
                         "chat_template": tok.chat_template, "model_max_length": server.max_model_len,
                         "vocab_size": server.vocab_size})


@router.post("/tokenize")
async def tokenize(request: Request) -> JSONResponse:
    server = _server(request)
    body = await _parse(request, TokenizeRequest)
    server.need_tokenizer("prompt")
    if body.messages is not None:
        server.check_chars([m.content or "" for m in body.messages], "messages")
        text = await server.off_loop(server.apply_template, body.messages, body.add_generation_prompt)
        add_special = bool(body.add_special_tokens)        # the template writes them
    else:
        server.check_chars([body.prompt], "prompt")
        text, add_special = body.prompt, body.add_special_tokens is not False
    tokens = (await server.off_loop(server.encode, [text], add_special))[0]
    return JSONResponse({"count": len(tokens), "max_model_len": server.max_model_len, "tokens": tokens,
                         "token_strs": [server.token_text(t) for t in tokens] if body.return_token_strs else None})


@router.post("/detokenize")
async def detokenize(request: Request) -> JSONResponse:
    server = _server(request)
    body = await _parse(request, DetokenizeRequest)
    server.need_tokenizer("tokens")
    bad = [t for t in body.tokens if not 0 <= t < server.vocab_size]
    if bad:
        raise APIError(400, f"tokens {bad[:5]} are outside the vocabulary [0, {server.vocab_size})", param="tokens")
    return JSONResponse({"prompt": await server.off_loop(server.tokenizer.decode, body.tokens)})


# -- generation ----------------------------------------------------------------------------------------------------
@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    server = _server(request)
    body = await _parse(request, CompletionRequest)
    _sampling(body, chat=False, max_tokens=None)            # parameters refused before any tokenizing
    await server.check_constraint(body.structured(), _constraint_param(body))
    prompts = body.prompts
    for p in prompts:
        bad = [t for t in p if not 0 <= t < server.vocab_size] if isinstance(p, list) else None
        if bad:
            raise APIError(400, f"prompt token ids {bad[:5]} are outside the vocabulary [0, {server.vocab_size})",
                           param="prompt")
    texts = [p for p in prompts if isinstance(p, str)]
    if texts:
        server.need_tokenizer("prompt")
        for text in texts:
            server.check_chars([text], "prompt")
        encoded = iter(await server.off_loop(server.encode, texts))
        prompts = [next(encoded) if isinstance(p, str) else p for p in prompts]
    echoes = None
    if body.echo:
        echoes = [p if isinstance(p, str) else server.tokenizer.decode(ids) if server.tokenizer else ""
                  for p, ids in zip(body.prompts, prompts)]
    return await _generate(request, body, prompts, chat=False, echoes=echoes)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    server = _server(request)
    body = await _parse(request, ChatCompletionRequest)
    server.need_tokenizer("messages")
    _sampling(body, chat=True, max_tokens=None)
    await server.check_constraint(body.tool_constraint(), "tools")
    await server.check_constraint(body.structured(), _constraint_param(body))
    server.check_chars([m.content or "" for m in body.messages] + [json.dumps(body.tool_dicts or [])], "messages")
    text = await server.off_loop(server.apply_template, body.messages, body.add_generation_prompt, body.tool_dicts,
                                 body.continue_final_message, body.chat_template_kwargs)
    # The template writes the special tokens (BOS included) itself.
    prompt = (await server.off_loop(server.encode, [text], False))[0]
    return await _generate(request, body, [prompt], chat=True)


def _constraint_param(body: GenerationBody) -> str:
    return next((name for name, value in body._constraints().items() if value is not None), "structured_outputs")


async def _parse(request: Request, schema: type[Body]) -> Body:
    server = _server(request)
    raw = await _read_body(request, server.cfg)
    try:
        body = schema.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e, raw) from None
    if getattr(body, "model", None) is not None:
        _check_model(server, body.model)
    body.check()
    return body


def _check_model(server: Server, name: str) -> None:
    if name != server.model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {server.model_name!r}",
                       param="model", code="model_not_found")


async def _read_body(request: Request, cfg: ServeConfig) -> bytes:
    """The body, refused (413) as soon as it is known to exceed max_body_bytes, before it is all buffered, and
    (408) if it has not all arrived within body_timeout_s."""
    limit = cfg.max_body_bytes
    too_large = APIError(413, f"the request body exceeds the server's limit max_body_bytes={limit}",
                         param="body", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared and not _CONTENT_LENGTH.fullmatch(declared):
        raise APIError(400, "content-length must be a decimal number of ASCII digits", param="content-length")
    if declared and int(declared) > limit:
        raise too_large

    async def read() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)
    try:
        return await asyncio.wait_for(read(), cfg.body_timeout_s)
    except ClientDisconnect:     # one line, no traceback: a client may do this as often as it likes
        log.info("request %s: the client went away during the body read", request_id(request.scope))
        raise APIError(499, "the client went away during the body read", param="body",
                       code="client_disconnected") from None
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within the server's limit body_timeout_s="
                            f"{cfg.body_timeout_s:g}", param="body", code="request_timeout") from None


def _max_tokens(server: Server, body: GenerationBody, prompt_tokens: int, chat: bool) -> int:
    """The request's max_tokens, checked against the server's limits and the model's context length."""
    cfg, param = server.cfg, "messages" if chat else "prompt"
    if prompt_tokens > cfg.max_prompt_tokens:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens, more than the server's limit "
                            f"max_prompt_tokens={cfg.max_prompt_tokens}", param=param, code="prompt_too_long")
    if not prompt_tokens:
        raise APIError(400, "the prompt is empty", param=param)
    room = server.max_model_len - prompt_tokens
    limit = server.max_tokens_limit
    requested = body.requested_max_tokens
    if requested == 0:          # echo only (checked by the body): one token is computed and not returned
        requested = 1
    if requested is None:
        default = limit if chat else min(DEFAULT_COMPLETION_TOKENS, limit)
        requested = max(1, min(default, room))
    elif requested > limit:
        raise APIError(400, f"max_tokens={requested} exceeds the server's limit max_tokens_limit={limit}",
                       param="max_tokens")
    if requested > room:
        raise APIError(400, f"the prompt ({prompt_tokens} tokens) + max_tokens ({requested}) = "
                            f"{prompt_tokens + requested} tokens exceeds the model's context length "
                            f"max_model_len={server.max_model_len}; shorten the prompt or lower max_tokens",
                       param=param, code="context_length_exceeded")
    return requested


def _sampling(body: GenerationBody, chat: bool, max_tokens: int | None) -> SamplingParams:
    """The engine's parameters for one prompt and its n (best_of) choices, validated by SamplingParams. max_tokens
    None: validation only, before tokenizing."""
    logprobs = body.sampled_logprobs
    asked = [body.logprobs if getattr(body, "echo", False) else None, body.prompt_logprobs]
    prompt_logprobs = max((k for k in asked if k is not None), default=None)
    if max_tokens is None:
        max_tokens = max(body.requested_max_tokens or 1, body.min_tokens, 1)
    try:
        return SamplingParams(
            max_new_tokens=max_tokens, min_new_tokens=body.min_tokens, temperature=body.temperature,
            top_p=body.top_p, top_k=body.top_k or 0, seed=body.seed, n=body.n, best_of=body.best_of_count,
            stop=body.stop, stop_token_ids=body.stop_token_ids or [], ignore_eos=body.ignore_eos,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            frequency_penalty=body.frequency_penalty or 0.0, presence_penalty=body.presence_penalty or 0.0,
            logit_bias=body.logit_bias or {}, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=body.include_stop_str_in_output,
            skip_special_tokens=body.skip_special_tokens,
            spaces_between_special_tokens=body.spaces_between_special_tokens,
            structured=(body.tool_constraint() if chat else None) or body.structured())
    except ParameterError as e:
        raise _parameter_error(e, chat) from None


def _parameter_error(e: ParameterError, chat: bool) -> APIError:
    name = "top_logprobs" if chat and e.param == "logprobs" else API_PARAMS.get(e.param, e.param)
    return APIError(400, f"{name}: {e.reason}", param=name)


def _as_api_error(e: Exception, cfg: ServeConfig, chat: bool, scope) -> APIError:
    """The error's API body: 4xx bodies say what to change; 5xx bodies name no exception text (logged with the
    request id instead)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ServerShuttingDown):
        return APIError(503, f"the server is shutting down: the request was ended after its grace period "
                             f"shutdown_grace_s={cfg.shutdown_grace_s:g}", type="server_error", code="server_shutdown")
    if isinstance(e, asyncio.TimeoutError):
        return APIError(504, f"the request did not finish within the server's limit request_timeout_s="
                             f"{cfg.request_timeout_s:g} and was aborted", type="timeout_error", code="timeout")
    if isinstance(e, ParameterError):       # add_request refused it
        return _parameter_error(e, chat)
    if isinstance(e, ValueError):
        return APIError(400, str(e), param="prompt")
    if isinstance(e, ReplicaUnavailable):       # fastgen's own words; Ray's are in the log
        return APIError(503, f"the request failed: {e} (request id {request_id(scope)})", type="server_error",
                        code="replica_unavailable")
    log.error("request %s failed: %s: %s", request_id(scope), type(e).__name__, e)
    return internal_error(scope, code="request_failed" if isinstance(e, RequestFailed) else None)


async def _generate(request: Request, body: GenerationBody, prompts: list[list[int]], chat: bool,
                    echoes: list[str] | None = None) -> Response:
    server = _server(request)
    cfg = server.cfg
    if server.loop.shutting_down:
        raise APIError(503, "the server is shutting down", type="server_error", code="server_shutdown")
    per_prompt = body.best_of_count
    total = len(prompts) * per_prompt
    if total > cfg.max_sequences_per_request:
        raise APIError(400, f"{len(prompts)} prompt(s) x {per_prompt} choice(s) = {total} sequences, more than the "
                            f"server's limit max_sequences_per_request={cfg.max_sequences_per_request}",
                       param="best_of" if per_prompt > body.n else "n" if per_prompt > 1 else "prompt")
    responder = Responder(chat, server.model_name, server.token_text, body.sampled_logprobs, body.include_usage,
                          body.continuous_usage)
    header = (cfg.tenant_header, request.headers.get(cfg.tenant_header)) if cfg.tenant_header else ("", None)
    tenant = TenantLedger.tenant_of(body.user, request.client.host if request.client else None, header)
    sequences, choices = [], []
    for i, prompt in enumerate(prompts):
        sampling = _sampling(body, chat, _max_tokens(server, body, len(prompt), chat))
        sequences.append(SequenceRequest(f"{responder.id}-{i}", prompt, sampling, body.priority, tenant,
                                         cfg.slo if cfg.slo.active else None))
        choices += [ChoiceState(index=i * body.n + j, prompt_index=i, echo_text=echoes[i] if echoes else "",
                                tools=tool_reader(body.tool_dicts, body.tool_choice_value) if chat else None)
                    for j in range(body.n)]
    prompt_tokens = sum(map(len, prompts))
    ticket = server.ledger.admit(tenant, total, sum(len(s.prompt_token_ids) + s.sampling.max_new_tokens
                                                    for s in sequences) * per_prompt, server.loop.num_active)
    try:
        group = server.loop.submit(sequences, cfg.request_timeout_s)
    except BaseException:
        server.ledger.release(ticket)
        raise

    def release() -> None:
        server.loop.release(group)
        server.ledger.release(ticket)
    try:
        await group.accepted()
    except BaseException as e:
        release()
        if isinstance(e, Exception):
            raise _as_api_error(e, cfg, chat, request.scope) from e
        raise
    reading = Reading(body.sampled_logprobs if echoes else None, body.prompt_logprobs,
                      getattr(body, "prompt_only", False))
    if body.stream:
        return EventStream(_events(group, responder, choices, reading, prompt_tokens, cfg, request.scope),
                           on_close=release)
    try:
        done = await _unless_disconnected(request, _collect(group, choices, reading))
    except Exception as e:
        raise _as_api_error(e, cfg, chat, request.scope) from e
    finally:
        release()
    if done is None:
        return Response(status_code=499)      # nobody is left to read it
    completion_tokens = sum(c.num_tokens for c in choices)
    return JSONResponse(responder.response(choices, usage(prompt_tokens, completion_tokens)))


@dataclass(frozen=True)
class Reading:
    """What a response takes from the engine's updates besides the generated tokens."""

    echo_k: int | None          # echo with logprobs: the prompt's, top k each
    prompt_k: int | None        # prompt_logprobs (vLLM's): top k each
    prompt_only: bool           # echo with max_tokens=0: the one token computed is not returned

    def take(self, group: RequestGroup, index: int, update: Update, choice: ChoiceState) -> Update:
        """Records the update's prompt logprobs in `choice`; the update as the response shows it."""
        if update.prompt_logprobs is not None:
            if self.echo_k is not None:
                first = group.slot_request[index].prompt_token_ids[0]      # it has no logprob
                choice.echo_logprobs = [TokenLogprob(first, None, None), *_top(update.prompt_logprobs, self.echo_k)]
            if self.prompt_k is not None:
                choice.prompt_logprobs = _top(update.prompt_logprobs, self.prompt_k)
        if self.prompt_only:
            return Update(finish_reason=update.finish_reason and "length", index=update.index)
        return update


def _top(entries: Sequence[TokenLogprob], k: int) -> list[TokenLogprob]:
    """The entries with their k best alternatives (the engine computed the most any field asked for)."""
    return [TokenLogprob(e.token_id, e.logprob, e.top[:k]) for e in entries]


async def _collect(group: RequestGroup, choices: list[ChoiceState], reading: Reading) -> bool:
    async for index, update in group.updates():     # ends with every sequence's last update
        choice = choices[index]
        update = reading.take(group, index, update, choice)
        choice.text.append(update.text)
        choice.num_tokens += len(update.token_ids)
        choice.logprobs += update.logprobs or ()
        choice.finish_reason = update.finish_reason or choice.finish_reason
    return True


async def _events(group: RequestGroup, responder: Responder, choices: list[ChoiceState], reading: Reading,
                  prompt_tokens: int, cfg: ServeConfig, scope) -> AsyncIterator[str]:
    """The OpenAI stream: one chunk per sequence per engine update, so per token, sent the step the token is
    sampled (nothing goes out before a choice's first token, not even chat's role), then usage if asked for, then
    [DONE]. An error after the 200 went out can only be reported in the stream, as an error object."""
    completion_tokens = 0
    try:
        async for index, update in group.updates():
            choice = choices[index]
            update = reading.take(group, index, update, choice)
            completion_tokens += len(update.token_ids)
            choice.num_tokens += len(update.token_ids)
            yield _sse(responder.chunk(choice, update.text, update.logprobs or (), update.finish_reason,
                                       usage(prompt_tokens, completion_tokens)))
        if responder.include_usage:
            yield _sse(responder.usage_chunk(usage(prompt_tokens, completion_tokens)))
    except Exception as e:      # reported to the client in the stream
        yield _sse(_as_api_error(e, cfg, responder.chat, scope).body())
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events that release their requests however the response ends: completed, client gone
    (Starlette cancels the stream), or failed."""

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
