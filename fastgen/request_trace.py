"""The timing record of one request: what the engine (or an HTTP client) saw, and all the metrics need."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestTrace:
    request_id: str
    prompt_tokens: int
    arrival_time: float                      # when the request reached the engine (seconds, one clock per run)
    token_times: list[float] = field(default_factory=list)  # when each output token became available
    first_scheduled_time: float | None = None  # first step that ran any of its tokens (queueing delay ends)
    finish_time: float | None = None
    finish_reason: str | None = None         # "length", "stop", "abort", ...

    @property
    def output_tokens(self) -> int:
        return len(self.token_times)
