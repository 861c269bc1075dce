"""The timing record of one request: what the engine (or an HTTP client) saw, and all the metrics need; and the
request's class (priority, tenant, SLO), which the schedulers read from the request and the metrics from here."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

DEFAULT_TENANT = "default"


@dataclass
class SLO:
    """A request's service-level objective: its time to first token and its mean time per output token after the
    first (seconds; None: no target)."""

    ttft_s: Optional[float] = None
    tpot_s: Optional[float] = None

    def validate(self, name: str = "slo") -> None:
        for key in ("ttft_s", "tpot_s"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ValueError(f"{name}.{key} must be a number of seconds > 0 or None (no target), got {value!r}")

    @property
    def active(self) -> bool:
        return self.ttft_s is not None or self.tpot_s is not None


def check_class(priority: object, tenant: object, slo: object) -> None:
    """Refuses (ValueError naming the field) a request class that is not an int priority, a non-empty tenant
    string and an SLO or None."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority must be an int (lower is more urgent), got {priority!r}")
    if not isinstance(tenant, str) or not tenant:
        raise ValueError(f"tenant must be a non-empty string, got {tenant!r}")
    if slo is not None:
        if not isinstance(slo, SLO):
            raise ValueError(f"slo must be an SLO(ttft_s=, tpot_s=) or None, got {slo!r}")
        slo.validate()


@dataclass
class RequestTrace:
    request_id: str
    prompt_tokens: int
    arrival_time: float                      # when the request reached the engine (seconds, one clock per run)
    token_times: list[float] = field(default_factory=list)  # when each output token became available
    first_scheduled_time: float | None = None  # first step that ran any of its tokens (queueing delay ends)
    finish_time: float | None = None
    finish_reason: str | None = None         # "length", "stop", "abort", "deadline" (dropped as late), ...
    request_class: str | None = None         # the workload class it came from (metrics per class)
    tenant: str = DEFAULT_TENANT
    priority: int = 0                        # lower is more urgent (vLLM's convention)
    slo: SLO | None = None
    # disaggregated prefill and decode (fastgen.disaggregated): the request's KV moved between engines
    kv_transfer_bytes: int | None = None     # its KV contents
    kv_transfer_s: float | None = None       # the move (the link's time, simulated; the copy's, real)
    decode_wait_s: float | None = None       # landed at the decode engine until it had room to take it in

    @property
    def output_tokens(self) -> int:
        return len(self.token_times)
