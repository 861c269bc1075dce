"""Speculative decoding's proposers behind one interface and a registry: `speculative=none|ngram|draft|synthetic`.
A proposer guesses a decoding sequence's next tokens; the engine verifies them in the step's ragged pass. A new
proposer is one file here with a `@register_proposer("name", config=MyConfig)` subclass of Proposer, plus
conf/speculative/name.yaml whose defaults list names `name_schema`."""
from __future__ import annotations

from fastgen.speculative.base import PROPOSERS, Proposer, SpeculativeConfig, make_proposer, register_proposer

__all__ = ["PROPOSERS", "Proposer", "SpeculativeConfig", "make_proposer", "register_proposer"]
