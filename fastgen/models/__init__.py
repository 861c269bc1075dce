"""Model definitions written in fastgen, all running on the shared ragged forward pass."""
from fastgen.models.base import CausalLM
from fastgen.models.loader import (ARCHITECTURES, EMBEDDED, build_model, load_config, load_model, model_class,
                                   resolve_dtype)

__all__ = ["ARCHITECTURES", "EMBEDDED", "CausalLM", "build_model", "load_config", "load_model", "model_class",
           "resolve_dtype"]
