"""ServeConfig: the engine config plus what a long-running HTTP server needs (where to listen, who may call it, and
the limits that keep one client from exhausting it). conf/serve.yaml is validated against it by Hydra."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fastgen.config import EngineConfig, hydra_schema


@dataclass
class ServeConfig(EngineConfig):
    host: str = "127.0.0.1"                  # loopback only unless told otherwise
    port: int = 8000
    api_key: Optional[str] = None            # set: every endpoint but /health needs "Authorization: Bearer <key>"
    served_model_name: Optional[str] = None  # the `model` clients must send; None: model.source
    max_prompt_tokens: int = 4096            # longest prompt accepted (400 beyond)
    max_tokens_limit: int = 2048             # largest max_tokens accepted (400 beyond)
    max_concurrent_requests: int = 256       # requests in flight at once (429 beyond)
    max_body_bytes: int = 1 << 20            # largest request body (413 beyond)
    request_timeout_s: float = 600.0         # a request still running after this is aborted

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.source

    def validate(self) -> None:
        super().validate()
        limits = {"max_prompt_tokens": self.max_prompt_tokens, "max_tokens_limit": self.max_tokens_limit,
                  "max_concurrent_requests": self.max_concurrent_requests, "max_body_bytes": self.max_body_bytes,
                  "request_timeout_s": self.request_timeout_s}
        for name, value in limits.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")


def register_configs() -> None:
    """Registers the schema with Hydra, so conf/serve.yaml is validated against ServeConfig."""
    from hydra.core.config_store import ConfigStore
    ConfigStore.instance().store(name="serve_schema", node=hydra_schema(ServeConfig))
