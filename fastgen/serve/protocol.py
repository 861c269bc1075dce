"""The OpenAI wire format: request bodies (validated strictly, so an unsupported parameter is refused by name
rather than silently ignored), error objects and the response and stream-chunk shapes."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# OpenAI parameters fastgen does not implement, with the values that ask for nothing: those (and null) are
# accepted and ignored, anything else is refused by name.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "best_of": (1,), "echo": (False,), "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},),
    "logprobs": (False,), "top_logprobs": (0,), "suffix": ("",), "tools": ([],), "tool_choice": ("none",),
    "functions": ([],), "function_call": ("none",), "parallel_tool_calls": (False,),
    "response_format": ({"type": "text"},),
}


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _is_neutral(name: str, value: Any) -> bool:
    """Booleans are kept apart from numbers: logprobs=false asks for nothing, logprobs=0 asks for logprobs."""
    return value is None or any(value == n and isinstance(value, bool) == isinstance(n, bool)
                                for n in NEUTRAL_VALUES[name])


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class GenerationBody(_Body):
    """Parameters shared by /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None          # extension; None or 0: no top-k filter
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list)
    n: int = 1
    ignore_eos: bool = False             # extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None           # accepted, unused

    @model_validator(mode="before")
    @classmethod
    def _drop_neutral(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (k in NEUTRAL_VALUES and _is_neutral(k, v))}
        return data

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n={n} is not supported: fastgen returns one choice per request (n must be 1)")
        return n

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, stop: Any) -> list[str]:
        stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("must be a non-empty string or a list of non-empty strings")
        return stops

    @model_validator(mode="after")
    def _options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationBody):
    prompt: str | list[int]

    @field_validator("prompt", mode="before")
    @classmethod
    def _single_prompt(cls, prompt: Any) -> str | list[int]:
        """A text prompt or one list of token ids; batches of one are unwrapped, larger ones refused."""
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            if len(prompt) != 1:
                raise ValueError(f"batched prompts ({len(prompt)}) are not supported; send one prompt per request")
            prompt = prompt[0]
        if isinstance(prompt, str) or (isinstance(prompt, list) and all(type(t) is int for t in prompt)):
            return prompt
        raise ValueError("must be a string or a list of token ids (integers)")


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str                         # a string, or text parts joined by newlines
    name: str | None = None           # accepted, unused

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, content: Any) -> Any:
        if not isinstance(content, list):
            return content
        kinds = [p.get("type") if isinstance(p, dict) else type(p).__name__ for p in content]
        if any(k != "text" for k in kinds) or not all(isinstance(p.get("text"), str) for p in content):
            raise ValueError(f"only text content parts ({{'type': 'text', 'text': ...}}) are supported, got {kinds}")
        return "\n".join(p["text"] for p in content)

    def as_template_input(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


class ChatCompletionRequest(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)   # OpenAI's newer name for max_tokens

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def validation_error(error: ValidationError) -> APIError:
    """A 400 naming each offending parameter, with pydantic's wording."""
    messages, params = [], []
    for e in error.errors(include_url=False):
        where = ".".join(map(str, e["loc"]))
        params.append(where)
        if e["type"] == "json_invalid":
            messages.append(f"the body is not valid JSON: {e['ctx'].get('error', e['msg'])}")
        elif e["type"] == "extra_forbidden":
            name = str(e["loc"][-1])
            allowed = NEUTRAL_VALUES.get(name)
            hint = f" (only {', '.join(map(repr, allowed))} or null)" if allowed else ""
            messages.append(f"unsupported parameter {where!r}: fastgen does not implement it{hint}")
        else:
            messages.append(f"{where or 'body'}: {e['msg'].removeprefix('Value error, ')}")
    unique = list(dict.fromkeys(messages))
    return APIError(400, "; ".join(unique), param=params[0] if len(set(params)) == 1 and params[0] else None)


@dataclass
class Responder:
    """Shapes one request's results as its endpoint's OpenAI objects (chat or legacy completion)."""

    chat: bool
    model: str
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _object(self, stream: bool) -> str:
        if not self.chat:
            return "text_completion"
        return "chat.completion.chunk" if stream else "chat.completion"

    def _envelope(self, stream: bool, choices: list[dict], usage: dict | None) -> dict:
        out = {"id": self.id, "object": self._object(stream), "created": self.created, "model": self.model,
               "choices": choices}
        if not stream or self.include_usage:
            out["usage"] = usage
        return out

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> dict:
        """A stream chunk; for chat, the first one only announces the assistant role."""
        if self.chat:
            delta = ({"role": "assistant", "content": ""} if first else
                     {} if finish_reason is not None and not text else {"content": text})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": finish_reason}
        return self._envelope(True, [choice], None)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return self._envelope(True, [], usage(prompt_tokens, completion_tokens))

    def response(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        choice = {"index": 0, **body, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope(False, [choice], usage(prompt_tokens, completion_tokens))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
