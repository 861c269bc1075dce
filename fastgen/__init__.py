"""fastgen: a research framework for LLM serving schedulers on one ragged forward pass."""

from fastgen.openmp import set_spin_count

set_spin_count()   # first: the OpenMP runtime reads its spin count when torch loads it

from fastgen.compose import build_engine
from fastgen.conf import compose_config
from fastgen.engine import LLMEngine, RequestOutput
from fastgen.models import load_model
from fastgen.pipeline import Pipeline, pipeline
from fastgen.sampling import SamplingParams

__all__ = ["LLMEngine", "Pipeline", "RequestOutput", "SamplingParams", "build_engine", "compose_config", "load_model",
           "pipeline"]
