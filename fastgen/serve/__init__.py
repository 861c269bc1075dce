"""The persistent deployment: an OpenAI-compatible HTTP server around one LLMEngine, like DeepSpeed-MII's `serve`.

    python -m fastgen.serve [group=option ...] [key=value ...]      # conf/serve.yaml, schema ServeConfig

`create_app(engine, cfg)` builds the FastAPI app around an engine already in memory; `HttpTarget` is the
streaming benchmark client for this (or any OpenAI-compatible) server, driven by fastgen.driver.
"""
from fastgen.serve.app import create_app
from fastgen.serve.client import HttpTarget
from fastgen.serve.config import ServeConfig

__all__ = ["HttpTarget", "ServeConfig", "create_app"]
