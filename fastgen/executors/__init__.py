"""Executors: what runs a step. The engine hands an executor plain step data (each sequence's new token ids, where
they start and its KV block table) and gets logits back; the executor owns the tensors (weights, KV pool), or
stands in for them. `real` runs the model on one device; `simulated` advances a virtual clock by a cost model's
prediction. A new executor is one file here (or anywhere, named by `executor.module`) with a
`@register_executor("name", config=MyConfig)` subclass of Executor, plus conf/executor/name.yaml."""
from fastgen.executors.base import EXECUTORS, Executor, StepResult, make_executor, register_executor

__all__ = ["EXECUTORS", "Executor", "StepResult", "make_executor", "register_executor"]
