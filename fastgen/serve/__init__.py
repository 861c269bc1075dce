"""The persistent deployment: an OpenAI-compatible HTTP server around one LLMEngine, like DeepSpeed-MII's `serve`.

    python -m fastgen.serve [group=option ...] [key=value ...]      # conf/serve.yaml, schema ServeConfig

`create_app(engine, cfg)` builds the FastAPI app around an engine already in memory; the streaming benchmark
client for this (or any OpenAI-compatible) server is fastgen.driver.HttpTarget.
"""
from fastgen.serve.app import create_app
from fastgen.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]
