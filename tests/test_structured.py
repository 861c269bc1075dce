"""Structured outputs in the engine: every constrained output parses and validates against its schema, whatever the
model (random weights over SmolLM2's tokenizer), for hypothesis-generated schemas; constrained neighbours leave
unconstrained greedy outputs unchanged; a grammar compiles while the engine keeps stepping; the simulator charges
the mask's host time."""
from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fastgen.conf import compose_config
from fastgen.executors.simulated import SimulatedExecutor
from fastgen.ragged import SeqChunk
from fastgen.sampling import ParameterError, SamplingParams
from fastgen.structured import ConstraintError, GrammarCompiler, StructuredOutput, check
from serving import new_engine

NAMES = st.sampled_from(["a", "b", "id", "name", "x_1", "ok"])
LEAVES = st.one_of(
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(0, 100)),
    st.just({"type": "boolean"}), st.just({"type": "null"}),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.builds(lambda vals: {"enum": vals}, st.lists(st.one_of(st.integers(-9, 9), st.sampled_from(["u", "v w"])),
                                                     min_size=1, max_size=3, unique=True)),
    st.just({"type": "string", "pattern": "^[a-c]{1,3}$"}),
)


def _object(props: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": props, "required": sorted(set(required) & set(props)),
            "additionalProperties": False}


SCHEMAS = st.recursive(LEAVES, lambda inner: st.one_of(
    st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, inner, st.integers(0, 3)),
    st.builds(_object, st.dictionaries(NAMES, inner, min_size=1, max_size=3), st.lists(NAMES, max_size=3)),
    st.builds(lambda a, b: {"anyOf": [a, b]}, inner, inner),
), max_leaves=6)


def run(engine, requests: list[tuple[str, SamplingParams]]) -> list:
    """Each request's last output, in order (n = 1)."""
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    last = {}
    while engine.has_unfinished():
        for out in engine.step():
            last[out.request_id] = out
    return [last[i] for i in ids]


@pytest.fixture(scope="module")
def engine():
    return new_engine()


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(schemas=st.lists(SCHEMAS, min_size=20, max_size=20))
def test_every_constrained_output_validates_against_its_schema(engine, schemas):
    """5 batches of 20 random schemas (100 in all), greedy on a random-weight model (the constraint must hold
    however poor the model; every schema here is bounded, so each output ends by its grammar) validate."""
    outs = run(engine, [(f"Reply in JSON {i}:", SamplingParams(max_new_tokens=300, structured={"json": schema}))
                        for i, schema in enumerate(schemas)])
    for schema, out in zip(schemas, outs):
        assert out.finish_reason == "stop", (schema, out.request.output_text)
        jsonschema.validate(json.loads(out.request.output_text), schema)


def test_regex_choice_grammar_and_json_object_constraints_hold_greedy_and_forked(engine):
    kinds = [{"regex": r"[0-9]{2,4}-(ab|cd)"}, {"choice": ["yes", "no", "maybe \"so\""]},
             {"grammar": 'root ::= "(" [a-z]+ ")" | "[" [0-9] "]"'}, {"json_object": True}]
    outs = run(engine, [("Hello", SamplingParams(max_new_tokens=300, structured=k)) for k in kinds] +
               [("Hello", SamplingParams(max_new_tokens=40, temperature=1.0, n=3, seed=1, structured=kinds[0]))])
    texts = [o.request.output_text for o in outs]
    assert re.fullmatch(r"[0-9]{2,4}-(ab|cd)", texts[0]) and texts[1] in ("yes", "no", 'maybe "so"')
    assert re.fullmatch(r"\([a-z]+\)|\[[0-9]\]", texts[2]) or outs[2].finish_reason == "length"
    assert outs[3].finish_reason == "length" or isinstance(json.loads(texts[3]), dict)
    assert all(o.finish_reason == "stop" for i, o in enumerate(outs) if i in (0, 1))


def test_unconstrained_greedy_outputs_are_unchanged_by_constrained_neighbours():
    prompts = ["The capital of France is", "def fib(n):", "One, two, three,"]
    alone = run(new_engine(), [(p, SamplingParams(max_new_tokens=24)) for p in prompts])
    neighbours = [("Reply:", SamplingParams(max_new_tokens=40, temperature=t, seed=3,
                                            structured={"json": {"type": "object", "properties": {
                                                "k": {"type": "string", "maxLength": 8}}, "required": ["k"]}}))
                  for t in (0.0, 1.0)] + [("Pick:", SamplingParams(max_new_tokens=8, structured={"regex": "[xy]+"}))]
    mixed = run(new_engine(), [(p, SamplingParams(max_new_tokens=24)) for p in prompts] + neighbours)
    assert [o.request.output_token_ids for o in mixed[:3]] == [o.request.output_token_ids for o in alone]
    assert all(re.fullmatch("[xy]+", mixed[-1].request.output_text) for _ in [0])


def test_a_grammar_compiles_while_the_engine_steps_and_a_bad_one_fails_alone(monkeypatch):
    """The constrained request waits (not scheduled) while its grammar compiles in the worker thread; the other
    request runs to its end meanwhile. A constraint that does not compile ends its own request only."""
    release = threading.Event()
    compile_ = GrammarCompiler.compile

    def slow(self, constraint):
        assert release.wait(30)
        return compile_(self, constraint)
    monkeypatch.setattr(GrammarCompiler, "compile", slow)
    engine = new_engine()
    slow_id = engine.add_request("Hi", SamplingParams(max_new_tokens=20, structured={"regex": "[ab]{3}"}))
    free_id = engine.add_request("Hi", SamplingParams(max_new_tokens=5, ignore_eos=True))
    finished = {}
    while free_id not in finished:
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    assert slow_id not in finished and engine.snapshot().num_waiting == 1
    release.set()
    bad_id = engine.add_request("Hi", SamplingParams(structured={"grammar": "root ::= undefined_rule"}))
    while engine.has_unfinished():
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    assert re.fullmatch("[ab]{3}", finished[slow_id].request.output_text)
    assert finished[bad_id].finish_reason == "error" and "undefined_rule" in finished[bad_id].error


@pytest.mark.parametrize("value, match", [
    ({"json": '{"type": "bogus"}'}, "bogus"), ({"regex": "(ab"}, "parenthesis"), ({"json": "{"}, "not valid JSON"),
    ({"grammar": "root ::= x"}, "x"), ({"choice": []}, "non-empty"), ({"json": {}, "regex": "a"}, "exactly one"),
])
def test_invalid_constraints_are_refused_naming_the_problem(value, match):
    with pytest.raises((ParameterError, ConstraintError), match=match):
        check(SamplingParams(structured=value).structured)


def test_the_simulator_charges_each_constrained_sequence_its_mask_time():
    executor = SimulatedExecutor(compose_config(["model.source=llama-2-7b", "hardware=a100-80gb",
                                                 "kv.num_blocks=4096", "executor=simulated", "progress=false",
                                                 "executor.grammar_mask_s=0.001"]))

    def charged(constrained: int) -> float:
        before = executor.clock()
        executor.execute([SeqChunk([1], 100, [0] * 8, constrained=i < constrained) for i in range(8)])
        return executor.clock() - before
    assert charged(5) - charged(0) == pytest.approx(0.005)
    assert StructuredOutput.of({"json_object": True}).kind == "json_object"
