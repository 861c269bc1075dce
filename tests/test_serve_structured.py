"""Structured outputs and tool calling through the server, with the field's clients: the OpenAI SDK's
response_format (json_schema, json_object) and tools (tool_choice required, a named function, auto; streamed too),
vLLM's structured_outputs and guided_* fields, LangChain's with_structured_output(method="json_schema") and
bind_tools with a tool round-trip; and vLLM's response details: completions' top_logprobs include the chosen token,
echo with max_tokens=0, prompt_logprobs, chat template parameters, open /metrics and /ping."""
from __future__ import annotations

import json
import math
import re

import httpx
import jsonschema
import pytest

from serving import AUTH, MODEL, new_engine, serve_config, served as serving, tokenizer
from fastgen.serve.tools import HermesParser, template_messages

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 4}},
                                       "required": ["zone"], "additionalProperties": False}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def served():
    with serving(serve_config(open_metrics=True)) as s:
        yield s


def chat(served, **body) -> dict:
    r = served.post("/v1/chat/completions", {"model": MODEL, "max_tokens": 120,
                                             "messages": [{"role": "user", "content": "Hi"}]} | body)
    assert r.status_code == 200, r.text
    return r.json()


def test_response_format_json_schema_and_json_object_with_the_openai_sdk(served):
    client = served.client()
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A person?"}], max_tokens=120, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)
    assert out.choices[0].finish_reason == "stop"
    obj = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON?"}],
                                         max_tokens=200, response_format={"type": "json_object"}, temperature=0)
    assert obj.choices[0].finish_reason == "length" or isinstance(json.loads(obj.choices[0].message.content), dict)


@pytest.mark.parametrize("field, value, pattern", [
    ("structured_outputs", {"regex": "[0-9]{3}"}, r"[0-9]{3}"),
    ("structured_outputs", {"choice": ["red", "blue"]}, r"red|blue"),
    ("guided_regex", "(ab)+c", r"(ab)+c"),
    ("guided_choice", ["yes", "no"], r"yes|no"),
    ("guided_grammar", 'root ::= "x" [0-9] "y"', r"x[0-9]y"),
    ("guided_json", PERSON, None),
])
def test_vllm_fields_constrain_completions(served, field, value, pattern):
    r = served.post("/v1/completions", {"model": MODEL, "prompt": "Answer:", "max_tokens": 60, "temperature": 0,
                                        field: value})
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    if pattern is None:
        jsonschema.validate(json.loads(text), value)
    else:
        assert re.fullmatch(pattern, text), text


@pytest.mark.parametrize("body, match", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "nope"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "parenthesis"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "both constrain"),
    ({"guided_grammar": "root ::= missing"}, "missing"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nothere"}}}, "nothere"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"chat_template_kwargs": {"tokenize": True}}, "tokenize"),
    ({"continue_final_message": True}, "continue_final_message"),
])
def test_bad_constraints_are_400s_naming_the_problem(served, body, match):
    r = served.post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]} | body)
    assert r.status_code == 400 and match in r.json()["error"]["message"], r.text


def test_tool_choice_required_and_named_always_parse_and_match_the_schema(served):
    """(A random model would add parallel calls for ever: parallel_tool_calls=false bounds it to one.)"""
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        out = chat(served, tools=[WEATHER, TIME], tool_choice=choice, temperature=0,
                   parallel_tool_calls=False)["choices"][0]
        assert out["finish_reason"] == "tool_calls" and out["message"]["content"] is None
        for call in out["message"]["tool_calls"]:
            tool = {"get_weather": WEATHER, "get_time": TIME}[call["function"]["name"]]
            jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])
            assert call["type"] == "function" and call["id"].startswith("call_")
    named = chat(served, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"


def test_tool_calls_stream_in_openai_delta_shape(served):
    stream = served.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False, max_tokens=120, stream=True, temperature=0)
    calls, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and calls and calls[0].index == 0 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])


def test_hermes_parser_finds_calls_split_anywhere_and_keeps_other_text():
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    for cut in range(1, len(text)):
        parser = HermesParser()
        content, calls = parser.feed(text[:cut])
        more, rest = parser.feed(text[cut:], final=True)
        assert content + more == "Let me check." and [c.name for c in calls + rest] == ["get_weather"]
        assert json.loads((calls + rest)[0].arguments) == {"city": "Oslo"}
    assert HermesParser().feed("a <tool_call>not json</tool_call> b", final=True) == (
        "a <tool_call>not json</tool_call> b", [])


def test_auto_tool_choice_renders_tools_and_round_trips_tool_and_developer_messages(served):
    """SmolLM2's template ignores tools: they reach the model in a Hermes system message, and an earlier call
    and its result as Hermes text; the model (random weights) answers in text here, which auto returns as
    content."""
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}]
    tok = served.post("/tokenize", {"messages": [{"role": "user", "content": "x"}]})
    assert tok.status_code == 200
    out = chat(served, messages=messages, tools=[WEATHER], max_tokens=8)["choices"][0]
    assert out["finish_reason"] in ("stop", "length") and isinstance(out["message"]["content"], str)
    rendered = tokenizer().apply_chat_template(template_messages(messages, [WEATHER], False), tokenize=False)
    assert "<tools>" in rendered and '"get_weather"' in rendered and "<tool_response>\nSunny" in rendered
    assert "<|im_start|>system\nBe brief." in rendered and '<tool_call>\n{"name": "get_weather"' in rendered


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_choice_parses_hermes_calls_in_the_output(served, stream):
    """The model's output is made a Hermes call (a regex constraint beside tool_choice auto): the server returns
    it as tool_calls, with the text before it as content."""
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER],
            "max_tokens": 80, "structured_outputs": {"regex": re.escape("Checking." + call)}, "stream": stream}
    if not stream:
        out = served.post("/v1/chat/completions", body).json()["choices"][0]
        message, finish = out["message"], out["finish_reason"]
        calls = message["tool_calls"]
    else:
        with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, headers=AUTH,
                          timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        deltas = [c["choices"][0]["delta"] for c in chunks]
        message = {"content": "".join(d.get("content") or "" for d in deltas)}
        calls = [c for d in deltas for c in d.get("tool_calls") or []]
        finish = chunks[-1]["choices"][0]["finish_reason"]
        assert calls[0]["index"] == 0
    assert finish == "tool_calls" and message["content"] == "Checking."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo", "days": 2})]


def test_completions_top_logprobs_hold_the_chosen_token_and_echo_scores_the_prompt(served):
    r = served.post("/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12,
                                        "temperature": 1.5, "seed": 3, "logprobs": 1}).json()
    lp = r["choices"][0]["logprobs"]
    assert all(tok in top and top[tok] == chosen for tok, top, chosen in
               zip(lp["tokens"], lp["top_logprobs"], lp["token_logprobs"]))
    zero = served.post("/v1/completions", {"model": MODEL, "prompt": "Hi there", "max_tokens": 3,
                                           "temperature": 0, "logprobs": 0}).json()["choices"][0]["logprobs"]
    assert [list(top) for top in zero["top_logprobs"]] == [[t] for t in zero["tokens"]]
    echo = served.post("/v1/completions", {"model": MODEL, "prompt": "The cat sat on the mat", "max_tokens": 0,
                                           "echo": True, "logprobs": 1}).json()
    choice, n = echo["choices"][0], len(tokenizer().encode("The cat sat on the mat"))
    assert choice["text"] == "The cat sat on the mat" and echo["usage"]["completion_tokens"] == 0
    assert len(choice["logprobs"]["tokens"]) == n and choice["logprobs"]["token_logprobs"][0] is None
    assert all(math.isfinite(x) for x in choice["logprobs"]["token_logprobs"][1:])
    assert served.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}).status_code == 400
    prompt = served.post("/v1/completions", {"model": MODEL, "prompt": "The cat sat on the mat", "max_tokens": 1,
                                             "prompt_logprobs": 2}).json()["choices"][0]["prompt_logprobs"]
    ids = tokenizer().encode("The cat sat on the mat")
    assert prompt[0] is None and len(prompt) == len(ids)
    for token, entry, echoed in zip(ids[1:], prompt[1:], choice["logprobs"]["token_logprobs"][1:]):
        assert str(token) in entry and len(entry) <= 3 and entry[str(token)]["logprob"] == pytest.approx(echoed)


def test_chat_template_parameters_and_open_metrics(served):
    cont = chat(served, messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I"}],
                add_generation_prompt=False, continue_final_message=True, max_tokens=3,
                chat_template_kwargs={"enable_thinking": False})
    assert cont["choices"][0]["finish_reason"] in ("stop", "length")
    for path in ("/metrics", "/ping"):
        assert httpx.get(f"{served.url}{path}", timeout=10).status_code == 200      # no key
    text = httpx.get(f"{served.url}/metrics", timeout=10).text
    assert "fastgen_e2e_request_latency_seconds_count" in text and "fastgen_request_queue_time_seconds" in text
    assert float(re.search(r"fastgen_e2e_request_latency_seconds_count (\S+)", text).group(1)) > 0
    card = served.get("/v1/models").json()["data"][0]
    assert served.post("/v1/completions", {"model": MODEL, "prompt": "x",
                                           "max_tokens": card["max_model_len"] + 1}).status_code == 400


def test_metrics_and_ping_need_the_key_by_default():
    with serving(serve_config(), new_engine()) as s:
        assert httpx.get(f"{s.url}/metrics", timeout=10).status_code == 401
        assert httpx.get(f"{s.url}/ping", timeout=10).status_code == 401
        assert s.get("/ping").status_code == 200
        card = s.get("/v1/models").json()["data"][0]
        assert s.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 201}).status_code == 400
        assert card["max_model_len"] == s.engine.max_model_len


def test_langchain_structured_output_and_a_tool_round_trip(served):
    """LangChain's own client: with_structured_output(method="json_schema") returns a validated pydantic object;
    bind_tools with a forced tool gives a tool call, and the conversation goes on with its ToolMessage."""
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=8)
        age: int = Field(ge=0, le=120)

    @tool
    def get_weather(city: str = Field(max_length=6), days: int = Field(ge=1, le=7)) -> str:
        """The weather in a city."""
        return f"Sunny in {city} for {days} days"

    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=f"{served.url}/v1", api_key="test-key", temperature=0,
                                      max_tokens=80, max_retries=0)
    person = llm.with_structured_output(Person, method="json_schema").invoke("Describe a person.")
    assert isinstance(person, Person)
    with_tools = llm.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False)
    question = HumanMessage("What is the weather in Oslo?")
    ai = with_tools.invoke([question])
    call, = ai.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "days"}
    answer = llm.bind_tools([get_weather]).invoke([question, ai, ToolMessage(get_weather.invoke(call["args"]),
                                                                             tool_call_id=call["id"])])
    assert isinstance(answer.content, str)
