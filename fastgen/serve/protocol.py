"""The OpenAI wire format: request bodies (validated strictly, so an unsupported parameter is refused by name
rather than silently ignored), error objects and the response and stream-chunk shapes, logprobs included.

Types are checked here; ranges are checked once, where fastgen.sampling.SamplingParams is made (the server names
the API's parameter in its 400)."""
from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fastgen.sampling import TokenLogprob
from fastgen.serve.tools import ForcedCalls, HermesParser, constraint as tool_constraint
from fastgen.structured import ConstraintError, StructuredOutput

# OpenAI (and vLLM) parameters fastgen does not implement, with the values that ask for nothing: those (and null)
# are accepted and ignored, anything else is refused by name.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "suffix": ("",), "functions": ([],), "function_call": ("none",), "min_p": (0,), "use_beam_search": (False,),
}
# chat_template_kwargs may not set what the server sets itself
RESERVED_TEMPLATE_KWARGS = {"conversation", "messages", "tools", "documents", "chat_template", "tokenize",
                            "add_generation_prompt", "continue_final_message", "return_tensors", "return_dict",
                            "return_assistant_tokens_mask", "tokenizer_kwargs", "padding", "truncation",
                            "max_length"}


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
    """Booleans are kept apart from numbers: False asks for nothing, 0 is a number."""
    return value is None or any(value == n and isinstance(value, bool) == isinstance(n, bool)
                                for n in NEUTRAL_VALUES[name])


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False      # vLLM's extension: usage in every chunk (with include_usage)


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class GenerationBody(_Body):
    """Parameters shared by /v1/completions and /v1/chat/completions (OpenAI's, and vLLM's extensions)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None                  # extension; None, 0 or -1: no top-k filter
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] | None = None   # extension
    n: int = Field(1, ge=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None   # extension
    logit_bias: dict[str, float] | None = None
    min_tokens: int = 0                       # extension
    ignore_eos: bool = False                  # extension
    skip_special_tokens: bool = True          # extension
    spaces_between_special_tokens: bool = True   # extension
    include_stop_str_in_output: bool = False  # extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None                   # the tenant (admission shares; fairness policies such as vtc)
    priority: int = Field(0, ge=-2**31, le=2**31 - 1)   # extension (vLLM's): lower is more urgent (scheduler=priority)
    store: bool | None = None                 # accepted; nothing is stored
    metadata: dict[str, str] | None = None    # accepted with store, unused
    response_format: ResponseFormat | None = None       # OpenAI's structured outputs: json_schema, json_object
    structured_outputs: dict | None = None    # extension (vLLM's): one of json, json_object, regex, grammar, choice
    guided_json: dict | str | None = None     # extension (vLLM's older names for the same)
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = None
    prompt_logprobs: int | None = None        # extension (vLLM's): the prompt tokens' logprobs, top k each

    @model_validator(mode="before")
    @classmethod
    def _drop_neutral(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (k in NEUTRAL_VALUES and _is_neutral(k, v))}
            if data.get("response_format") == {"type": "text"}:
                del data["response_format"]
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, stop: Any) -> list[str]:
        stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("must be a non-empty string or a list of non-empty strings")
        return stops

    def check(self) -> None:
        """What depends on several parameters (a 400 naming the one to change)."""
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
        self.structured()

    def structured(self) -> StructuredOutput | None:
        """The constraint the request asks for, by whichever name (at most one); 400 naming it if malformed."""
        given = {name: value for name, value in self._constraints().items() if value is not None}
        if len(given) > 1:
            raise APIError(400, f"{' and '.join(given)} both constrain the output; send one", param=list(given)[1])
        if not given:
            return None
        (name, value), = given.items()
        try:
            return StructuredOutput.of(value)
        except ConstraintError as e:
            raise APIError(400, f"{name}: {e}", param=name) from None

    def _constraints(self) -> dict[str, dict | None]:
        fmt, guided = self.response_format, {"guided_json": "json", "guided_regex": "regex",
                                             "guided_grammar": "grammar", "guided_choice": "choice"}
        out = {name: {key: getattr(self, name)} if getattr(self, name) is not None else None
               for name, key in guided.items()}
        out["structured_outputs"] = self.structured_outputs
        if fmt is not None and fmt.type == "json_object":
            out["response_format"] = {"json_object": True}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
            out["response_format"] = {"json": fmt.json_schema.schema_}
        return out

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options.continuous_usage_stats

    @property
    def sampled_logprobs(self) -> int | None:
        """How many alternatives each sampled token's logprobs list (None: no logprobs)."""
        raise NotImplementedError

    @property
    def best_of_count(self) -> int:
        """Sequences generated per prompt (the best `n` are returned)."""
        return self.n


class CompletionRequest(GenerationBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)    # 0 with echo: score the prompt only (vLLM)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)   # sent by some clients here too

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Any:
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and prompt:
            if all(type(t) is int for t in prompt) or all(isinstance(p, str) for p in prompt):
                return prompt
            if all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompt):
                return prompt
        raise ValueError("must be a string, a list of token ids (integers), or a non-empty list of either")

    def check(self) -> None:
        super().check()
        if self.best_of is not None and self.best_of < self.n:
            raise APIError(400, f"best_of={self.best_of} must be >= n={self.n}", param="best_of")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise APIError(400, "best_of > n cannot be streamed (the best choices are known only at the end)",
                           param="best_of")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens=0 generates nothing: it is only allowed with echo=true (to score the "
                                "prompt)", param="max_tokens")

    @property
    def prompt_only(self) -> bool:
        """echo with max_tokens=0: the prompt (and its logprobs), nothing generated."""
        return self.max_tokens == 0
    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch: one prompt per entry."""
        if isinstance(self.prompt, str) or type(self.prompt[0]) is int:
            return [self.prompt]
        return list(self.prompt)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def sampled_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def best_of_count(self) -> int:
        return self.best_of or self.n


class FunctionCall(_Body):
    name: str
    arguments: str                    # a JSON object, as text


class MessageToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None        # a string, or text parts joined by newlines; None: an assistant's tool calls
    name: str | None = None           # accepted, unused
    tool_calls: list[MessageToolCall] | None = None      # an assistant's calls
    tool_call_id: str | None = None   # a tool message: the call it answers

    @model_validator(mode="after")
    def _content_needed(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, content: Any) -> Any:
        if not isinstance(content, list):
            return content
        kinds = [p.get("type") if isinstance(p, dict) else type(p).__name__ for p in content]
        if any(k != "text" for k in kinds) or not all(isinstance(p.get("text"), str) for p in content):
            raise ValueError(f"only text content parts ({{'type': 'text', 'text': ...}}) are supported, got {kinds}")
        return "\n".join(p["text"] for p in content)

    def as_template_input(self) -> dict:
        """The message as chat templates read it (HF's convention: a tool call's arguments as an object)."""
        out: dict = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionSpec(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ToolSpec(_Body):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)   # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict | None = None     # extension (vLLM's): extra variables for the chat template
    add_generation_prompt: bool = True           # extension
    continue_final_message: bool = False         # extension: the last (assistant) message is continued

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not self.tools:
            raise APIError(400, f"tool_choice {choice if isinstance(choice, str) else 'naming a function'} needs "
                                "tools", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in self.tool_names:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not one of the tools "
                                f"{self.tool_names}", param="tool_choice")
        if self.tool_constraint() is not None and self.structured() is not None:
            raise APIError(400, "tool_choice required (or a named function) constrains the output already; drop "
                                "the response format", param="tool_choice")
        if self.continue_final_message and (self.add_generation_prompt or self.messages[-1].role != "assistant"):
            raise APIError(400, "continue_final_message needs add_generation_prompt=false and a final assistant "
                                "message", param="continue_final_message")
        reserved = sorted(set(self.chat_template_kwargs or ()) & RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise APIError(400, f"chat_template_kwargs may not set {reserved}: use the request's own parameters",
                           param="chat_template_kwargs")

    @property
    def tool_names(self) -> list[str]:
        return [t.function.name for t in self.tools or ()]

    @property
    def tool_dicts(self) -> list[dict] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    @property
    def tool_choice_value(self) -> str | dict:
        """auto when tools are given and no choice is (OpenAI's default), else the choice as sent."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return choice.model_dump()
        return choice or ("auto" if self.tools else "none")

    def tool_constraint(self) -> StructuredOutput | None:
        if not self.tools:
            return None
        return tool_constraint(self.tool_dicts, self.tool_choice_value, self.parallel_tool_calls is not False)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def sampled_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a text prompt, or chat messages put through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "send exactly one of prompt and messages", param="prompt")


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]

    def check(self) -> None:
        pass


_OUT_OF_RANGE = re.compile(r"number out of range at line (\d+) column (\d+)")
_NESTED_KEY_BEFORE = re.compile(r'"([^"\\]{1,64})"\s*:\s*\{[^{}]*"([^"\\]{1,64})"\s*:\s*$')
_KEY_BEFORE = re.compile(r'"([^"\\]{1,64})"\s*:[\s\[\]{},0-9eE.+-]*$')


def _field_at(raw: str | bytes | None, reason: str) -> str | None:
    """The JSON key whose value holds the number the parser refused (a numeral of thousands of digits), if the
    raw body shows it."""
    found = _OUT_OF_RANGE.search(reason)
    if raw is None or not found:
        return None
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    line, column = int(found.group(1)), int(found.group(2))
    lines = text.split("\n")
    if line > len(lines):
        return None
    before = "\n".join(lines[:line - 1] + [lines[line - 1][:column]]).rstrip("0123456789.eE+-}], \t\r")[-4096:]
    nested = _NESTED_KEY_BEFORE.search(before)
    if nested:
        return f"{nested.group(1)}.{nested.group(2)}"
    key = _KEY_BEFORE.search(before)
    return key.group(1) if key else None


def validation_error(error: ValidationError, raw: str | bytes | None = None) -> APIError:
    """A 400 naming each offending parameter, with pydantic's wording (a numeral too long to parse: the key that
    holds it, found in the raw body)."""
    messages, params = [], []
    for e in error.errors(include_url=False):
        where = ".".join(map(str, e["loc"]))
        params.append(where or "body")
        if e["type"] == "json_invalid":
            reason = e['ctx'].get('error', e['msg'])
            key = _field_at(raw, str(reason))
            if key is not None:
                params[-1] = key
                messages.append(f"{key}: a number too long to parse (JSON numbers here have at most 4300 digits)")
                continue
            messages.append(f"the body is not valid JSON: {reason}")
        elif e["type"] == "extra_forbidden":
            name = str(e["loc"][-1])
            allowed = NEUTRAL_VALUES.get(name)
            hint = f" (only {', '.join(map(repr, allowed))} or null)" if allowed else ""
            messages.append(f"unsupported parameter {where!r}: fastgen does not implement it{hint}")
        else:
            messages.append(f"{where or 'body'}: {e['msg'].removeprefix('Value error, ')}")
    unique = list(dict.fromkeys(messages))
    return APIError(400, "; ".join(unique), param=params[0] if params else "body")


# -- responses -----------------------------------------------------------------------------------------------------
TokenText = Callable[[int], str]


def completion_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText, offset: int) -> dict:
    """The legacy completions shape: parallel lists; each position's top_logprobs holds the top k and the chosen
    (sampled or echoed) token, as vLLM's and OpenAI's do. The echoed prompt's first token has no logprob (an entry
    with logprob None and top None). `offset`: the characters before the first token."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for e in entries:
        text = token_text(e.token_id)
        tokens.append(text)
        token_logprobs.append(e.logprob)
        top_logprobs.append(None if e.top is None else {token_text(t): lp for t, lp in e.top} | {text: e.logprob})
        text_offset.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {"content": [item(e.token_id, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


@dataclass
class ChoiceState:
    """One choice as it is streamed or collected: its text and tokens so far."""

    index: int
    prompt_index: int
    echo_text: str = ""                                   # echo: the prompt, put before the first token
    echo_logprobs: list[TokenLogprob] = field(default_factory=list)   # echo with logprobs: the prompt's
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_tokens: int = 0
    text_offset: int = 0            # characters sent so far (echo included), for completion logprobs
    started: bool = False
    finish_reason: str | None = None
    tools: HermesParser | ForcedCalls | None = None   # chat with tools: finds the calls
    num_calls: int = 0              # tool calls sent so far (a stream's tool_calls[].index)
    prompt_logprobs: list[TokenLogprob] | None = None      # vLLM's prompt_logprobs, if asked for


@dataclass
class Responder:
    """Shapes one request's results as its endpoint's OpenAI objects (chat or legacy completion)."""

    chat: bool
    model: str
    token_text: TokenText
    logprobs: int | None = None         # what the client asked for (None: no logprobs in the output)
    include_usage: bool = False
    continuous_usage: bool = False
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

    def _logprobs(self, entries: Sequence[TokenLogprob], offset: int) -> dict | None:
        if self.logprobs is None:
            return None
        if self.chat:
            return chat_logprobs(entries, self.token_text)
        return completion_logprobs(entries, self.token_text, offset)

    def chunk(self, choice: ChoiceState, text: str, entries: Sequence[TokenLogprob],
              finish_reason: str | None, usage: dict | None = None) -> dict:
        """A stream chunk with one choice's news. For chat, a choice's first chunk also carries the assistant
        role (with the first token's text: no chunk goes out before the first token); with tools, text that is
        a tool call goes out as `tool_calls` deltas (each call whole, once it is complete)."""
        if not choice.started:
            text, entries = choice.echo_text + text, [*choice.echo_logprobs, *entries]
        logprobs = self._logprobs(entries, choice.text_offset)
        choice.text_offset += len(text)
        if self.chat:
            calls = []
            if choice.tools is not None:
                text, calls = choice.tools.feed(text, final=finish_reason is not None)
            delta = {} if finish_reason is not None and not text and choice.started else {"content": text}
            if calls:
                delta = {"content": text or None, "tool_calls": [
                    c.as_api(choice.num_calls + i) for i, c in enumerate(calls)]}
                choice.num_calls += len(calls)
            if not choice.started:
                delta = {"role": "assistant", **delta}
            body = {"index": choice.index, "delta": delta}
            finish_reason = self._finish_reason(choice, finish_reason)
        else:
            body = {"index": choice.index, "text": text}
        choice.started = True
        body |= {"logprobs": logprobs, "finish_reason": finish_reason}
        if choice.prompt_logprobs is not None and finish_reason is not None:
            body["prompt_logprobs"] = self.prompt_logprobs(choice.prompt_logprobs)
        return self._envelope(True, [body], usage if self.continuous_usage else None)

    @staticmethod
    def _finish_reason(choice: ChoiceState, reason: str | None) -> str | None:
        """A chat that ended by calling tools ends with `tool_calls` (OpenAI's)."""
        return "tool_calls" if reason == "stop" and choice.tools is not None and choice.tools.calls else reason

    def prompt_logprobs(self, entries: Sequence[TokenLogprob]) -> list[dict | None]:
        """vLLM's shape: None for the first prompt token, then {token id: {logprob, rank, decoded_token}} with the
        prompt's token and the top alternatives (rank: the position among them, None if it is not one)."""
        out: list[dict | None] = [None]
        for e in entries:
            ranks = {t: r for r, (t, _) in enumerate(e.top or (), start=1)}
            items = {e.token_id: e.logprob, **dict(e.top or ())}
            out.append({str(t): {"logprob": lp, "rank": ranks.get(t), "decoded_token": self.token_text(t)}
                        for t, lp in items.items()})
        return out

    def usage_chunk(self, usage: dict) -> dict:
        return self._envelope(True, [], usage)

    def response(self, choices: Sequence[ChoiceState], usage: dict) -> dict:
        """The whole answer (with each choice's echo, if any)."""
        bodies = []
        for choice in choices:
            text = choice.echo_text + "".join(choice.text)
            logprobs = self._logprobs([*choice.echo_logprobs, *choice.logprobs], 0)
            body = {"message": self._message(choice, text)} if self.chat else {"text": text}
            bodies.append({"index": choice.index, **body, "logprobs": logprobs,
                           "finish_reason": self._finish_reason(choice, choice.finish_reason)})
            if choice.prompt_logprobs is not None:
                bodies[-1]["prompt_logprobs"] = self.prompt_logprobs(choice.prompt_logprobs)
        return self._envelope(False, bodies, usage)

    @staticmethod
    def _message(choice: ChoiceState, text: str) -> dict:
        if choice.tools is None:
            return {"role": "assistant", "content": text}
        content, calls = choice.tools.feed(text, final=True)
        message = {"role": "assistant", "content": content or (None if calls else "")}
        return message | ({"tool_calls": [c.as_api() for c in calls]} if calls else {})


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
