"""Structured outputs: a request's constraint (a JSON schema, any JSON object, a regex, an EBNF grammar or a list of
choices), compiled by xgrammar into a token mask that the sampler applies each step and a matcher that each
accepted token advances. The request ends when its grammar is complete (the mask allows the end-of-sequence token
only then).

xgrammar (also vLLM's and SGLang's default backend) runs on CPUs, caches compiled grammars (by schema string) and
fills a step's bitmask in microseconds per sequence. Compilation runs in a worker thread (`GrammarCompiler.submit`),
so the engine keeps stepping while a new request's grammar compiles; `check` converts a constraint into a grammar
without a tokenizer, which finds an invalid schema, regex or grammar cheaply before a request is queued.
JSON is generated compactly (no free whitespace between tokens, vLLM's `disable_any_whitespace`), so a model that
rambles cannot fill its output with blanks.
"""
from __future__ import annotations

import functools
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Collection, Sequence

import torch

KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")
MAX_CONSTRAINT_CHARS = 65536     # a schema, regex or grammar longer than this is refused (compilation cost)
MAX_CHOICES = 256


class ConstraintError(ValueError):
    """A constraint that cannot be compiled: the message says what is wrong with it."""


@dataclass(frozen=True)
class StructuredOutput:
    """A request's constraint: `kind` (one of KINDS) and its `spec`: the JSON schema as a JSON string, the regex,
    the EBNF grammar, or the choices as a JSON list of strings (json_object: empty). Hashable: compiled grammars
    are cached by it."""

    kind: str
    spec: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConstraintError(f"unknown kind {self.kind!r}; one of {', '.join(KINDS)}")
        if not isinstance(self.spec, str):
            raise ConstraintError(f"{self.kind} must be given as a string")
        if len(self.spec) > MAX_CONSTRAINT_CHARS:
            raise ConstraintError(f"the {self.kind} has {len(self.spec)} characters; at most "
                                  f"MAX_CONSTRAINT_CHARS={MAX_CONSTRAINT_CHARS} are allowed")

    @classmethod
    def of(cls, value: Any) -> "StructuredOutput":
        """From vLLM's structured-outputs shape: a dict with exactly one of `json` (a schema, as a dict or a JSON
        string), `json_object` (true), `regex`, `grammar` (EBNF) and `choice` (a list of strings)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ConstraintError("must be an object with one of json, json_object, regex, grammar, choice")
        given = {k: v for k, v in value.items() if v is not None and v is not False}
        unknown = set(given) - {"json", "json_object", "regex", "grammar", "choice"}
        if unknown or len(given) != 1:
            raise ConstraintError(f"needs exactly one of json, json_object, regex, grammar, choice; got "
                                  f"{sorted(given) or 'none'}")
        (key, v), = given.items()
        if key == "json":
            return cls.json_schema(v)
        if key == "json_object":
            return cls("json_object")
        if key == "choice":
            return cls.choices(v)
        return cls("regex" if key == "regex" else "grammar", v)

    @classmethod
    def json_schema(cls, schema: Any) -> "StructuredOutput":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ConstraintError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ConstraintError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema, sort_keys=True))

    @classmethod
    def choices(cls, choices: Any) -> "StructuredOutput":
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise ConstraintError("choice must be a non-empty list of non-empty strings")
        if len(choices) > MAX_CHOICES:
            raise ConstraintError(f"{len(choices)} choices; at most MAX_CHOICES={MAX_CHOICES} are allowed")
        return cls("choice", json.dumps(choices))

    def source(self) -> tuple[str, str]:
        """(the xgrammar converter that reads it: regex or ebnf; its input). JSON schemas are converted to EBNF
        here (see json_ebnf)."""
        if self.kind in ("json_schema", "json_object"):
            return "ebnf", json_ebnf(self.spec if self.kind == "json_schema" else '{"type": "object"}')
        if self.kind == "choice":
            return "ebnf", "root ::= " + " | ".join(map(json.dumps, json.loads(self.spec)))
        return {"regex": "regex", "grammar": "ebnf"}[self.kind], self.spec


# xgrammar 0.2.9 writes the characters of a string with minLength/maxLength as [^"\\\r\n], which lets raw control
# characters (U+0000-U+001F) into the string: not JSON. Its plain strings exclude them; so do these, here.
_LENGTH_STRING_CHARS = r'[^\"\\\r\n]'
_JSON_STRING_CHARS = r'[^\0-\x1f\"\\\r\n]'


@functools.lru_cache(maxsize=1024)
def json_ebnf(schema: str) -> str:
    """The EBNF grammar of a JSON schema (compact JSON), with JSON's string characters (see above)."""
    import xgrammar as xgr
    grammar = _converted("json_schema", xgr.Grammar.from_json_schema, schema, any_whitespace=False)
    return str(grammar).replace(_LENGTH_STRING_CHARS, _JSON_STRING_CHARS)


def _converted(kind: str, convert, *args, **kwargs):
    try:
        return convert(*args, **kwargs)
    except (RuntimeError, ValueError, TypeError) as e:    # xgrammar's errors read "[time] file.cc:line: what"
        raise ConstraintError(f"invalid {kind}: {str(e).strip().split(': ', 1)[-1]}") from None


def check(constraint: StructuredOutput) -> None:
    """Raises ConstraintError if `constraint` does not convert into a grammar (cheap: no tokenizer, no mask)."""
    import xgrammar as xgr
    converter, text = constraint.source()
    convert = {"regex": xgr.Grammar.from_regex, "ebnf": xgr.Grammar.from_ebnf}[converter]
    _converted(constraint.kind, convert, text)


class GrammarCompiler:
    """Compiles constraints against one tokenizer and vocabulary (the model's logits may be wider than the
    tokenizer: the extra ids are never allowed), in a worker thread, with xgrammar's cache (by constraint)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Collection[int], threads: int = 1):
        import xgrammar as xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=threads)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="fastgen-grammar")
        self.vocab_size = vocab_size

    def compile(self, constraint: StructuredOutput):
        """A new matcher (GrammarMatcher) for `constraint`; ConstraintError if it is invalid."""
        import xgrammar as xgr
        converter, text = constraint.source()
        compile_ = {"regex": self._compiler.compile_regex, "ebnf": self._compiler.compile_grammar}[converter]
        return xgr.GrammarMatcher(_converted(constraint.kind, compile_, text))

    def submit(self, constraint: StructuredOutput) -> Future:
        """compile() in the worker thread."""
        return self._pool.submit(self.compile, constraint)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def apply_masks(logits: torch.Tensor, matchers: Sequence, rows: Sequence[int]) -> float:
    """Masks, in place, each of `rows` of `logits` to the tokens its matcher allows next; returns the seconds it
    took (filling the bitmasks and applying them: the step's grammar work)."""
    import xgrammar as xgr
    start = time.perf_counter()
    bitmask = xgr.allocate_token_bitmask(len(logits), logits.shape[-1])
    for row, matcher in zip(rows, matchers):
        matcher.fill_next_token_bitmask(bitmask, row)
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=list(rows))
    return time.perf_counter() - start
