"""Tool calling on /v1/chat/completions: what the model is told, what constrains it, and how its output becomes
OpenAI `tool_calls`.

The tools go to the model's chat template (`apply_chat_template(tools=...)`); a template that ignores them
(SmolLM2's) gets them in a system message in the Hermes format Qwen2.5's template writes, and assistant tool calls
and tool results as `<tool_call>` / `<tool_response>` text. With tool_choice `auto` the model may answer in text or
call tools as Hermes' `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, which `HermesParser` finds (in a
stream too: text that may begin a tag is held back until it is known not to). With `required` or a named function
the output is constrained by a grammar (vLLM's way): `required`, a JSON array of {"name", "arguments"} objects,
each matching its tool's parameters schema; a named function, its arguments object. So such a call always parses.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from fastgen.structured import StructuredOutput

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML "
    "tags. You may call one or more functions to assist with the user query. Don't make assumptions about what "
    "values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\nFor each function "
    "call return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    "<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")


@dataclass
class ToolCall:
    name: str
    arguments: str                    # a JSON object, as text (OpenAI's shape)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_api(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def constraint(tools: list[dict], choice: str | dict, parallel: bool) -> StructuredOutput | None:
    """The grammar that enforces tool_choice `required` or a named function (None for auto and none)."""
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        return StructuredOutput.json_schema(parameters(next(t for t in tools if t["function"]["name"] == name)))
    if choice != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]}, "arguments": parameters(t)},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    array = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    return StructuredOutput.json_schema(array | ({} if parallel else {"maxItems": 1}))


def template_messages(messages: list[dict], tools: list[dict] | None, template_knows_tools: bool) -> list[dict]:
    """The messages as the chat template gets them: `developer` is `system`; for a template that does not know
    tools, the tools join the system message and tool calls and results become Hermes text."""
    out = [m | {"role": "system"} if m["role"] == "developer" else dict(m) for m in messages]
    if template_knows_tools:
        return out
    for m in out:
        calls = m.pop("tool_calls", None)
        if calls:
            text = "\n".join(f"{TOOL_CALL_OPEN}\n{json.dumps(c['function'])}\n{TOOL_CALL_CLOSE}" for c in calls)
            m["content"] = f"{m.get('content') or ''}{text}"
        if m["role"] == "tool":
            m.pop("tool_call_id", None)
            m["content"] = f"<tool_response>\n{m['content']}\n</tool_response>"
        m["content"] = m.get("content") or ""
    if tools:
        system = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{system}"
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def _parsed(text: str) -> ToolCall | None:
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    args = call.get("arguments", call.get("parameters", {}))
    return ToolCall(call["name"], args if isinstance(args, str) else json.dumps(args))


class HermesParser:
    """tool_choice auto: text and `<tool_call>{...}</tool_call>` blocks, fed as the model writes them. `feed`
    returns the text that is surely content and the calls completed so far; a block that does not parse stays
    content (as the model wrote it)."""

    def __init__(self):
        self._pending = ""             # text not yet given out: a possible tag start, or an open block
        self.calls: list[ToolCall] = []

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self._pending += text
        content, calls = "", []
        while True:
            start = self._pending.find(TOOL_CALL_OPEN)
            if start < 0:
                keep = 0 if final else _partial_suffix(self._pending, TOOL_CALL_OPEN)
                content += self._pending[:len(self._pending) - keep]
                self._pending = self._pending[len(self._pending) - keep:]
                break
            end = self._pending.find(TOOL_CALL_CLOSE, start)
            if end < 0 and not final:
                content += self._pending[:start]
                self._pending = self._pending[start:]
                break
            body = self._pending[start + len(TOOL_CALL_OPEN):end if end >= 0 else None]
            call = _parsed(body.strip())
            if call is None:
                content += self._pending[:end + len(TOOL_CALL_CLOSE) if end >= 0 else None]
            else:
                content += self._pending[:start]
                calls.append(call)
            self._pending = self._pending[end + len(TOOL_CALL_CLOSE):] if end >= 0 else ""
        self.calls += calls
        if self.calls:           # text between or after calls is whitespace the format puts there
            content = content if content.strip() else ""
        return content, calls


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ForcedCalls:
    """tool_choice required or a named function: the constrained output is the calls' JSON, read at the end."""

    def __init__(self, name: str | None):
        self.name = name               # a named function: the output is its arguments
        self._text = ""
        self.calls: list[ToolCall] = []

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self._text += text
        if not final:
            return "", []
        if self.name is not None:
            self.calls = [ToolCall(self.name, self._text)]
        else:
            try:
                found = json.loads(self._text)
            except ValueError:       # cut short by max_tokens: nothing that parses
                return self._text, []
            self.calls = [ToolCall(c["name"], json.dumps(c["arguments"])) for c in found]
        return "", self.calls


def reader(tools: list[dict] | None, choice: str | dict | None) -> HermesParser | ForcedCalls | None:
    """What turns one choice's text into content and tool calls (None: plain text)."""
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        return ForcedCalls(choice["function"]["name"])
    return ForcedCalls(None) if choice == "required" else HermesParser()
