"""ServeConfig: the engine config plus what a long-running HTTP server needs (where to listen, who may call it, and
the limits that keep one client from exhausting it). conf/serve.yaml is validated against it by Hydra."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from fastgen.compose import EngineConfig
from fastgen.deployment import DeploymentConfig
from fastgen.request_trace import SLO
from fastgen.routers import ROUTERS, RouterConfig


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "[::1]"]


@dataclass
class ReplicaConfig:
    """One engine replica of a replicated deployment (replicas > 1, fastgen.serve.replicas, on Ray Serve)."""

    num_cpus: float = 1.0                    # Ray resources each replica reserves (its engine uses hardware.threads)
    num_gpus: float = 0.0
    max_ongoing_requests: int = 256          # Ray's back-pressure: requests one replica holds at once
    retries: int = 2                         # a request whose replica dies before its first token goes elsewhere
    ray_address: Optional[str] = None        # None: the running Ray cluster (RAY_ADDRESS) or a new local one;
                                             # "auto" or "ray://host:10001": join that cluster
    ray_num_cpus: Optional[int] = None       # CPUs of a Ray started here; None: replicas x num_cpus
    name: str = "fastgen"                    # the Ray Serve application (and its metrics board): two deployments
                                             # on one Ray cluster need two names
    start_timeout_s: float = 300.0           # start-up (every replica built and healthy) fails after this, naming
                                             # the cause (Ray's OOM kills, missing resources)
    memory_gb: Optional[float] = None        # memory Ray reserves for each replica; None: what Ray's object-store-free
                                             # memory gives each replica. The default KV pool is sized to fit it
    kv_memory_fraction: float = 0.5          # ... of which the default KV pool (kv.memory_gb left at its default)
                                             # takes at most this fraction (weights and activations need the rest)

    def validate(self) -> None:
        if not self.num_cpus >= 0 or not self.num_gpus >= 0:
            raise ValueError(f"replica.num_cpus and replica.num_gpus must be >= 0, got {self.num_cpus}, "
                             f"{self.num_gpus}")
        if not self.name:
            raise ValueError("replica.name (the Ray Serve application's name) must not be empty")
        if not self.start_timeout_s > 0 or not 0 < self.kv_memory_fraction <= 1:
            raise ValueError(f"replica.start_timeout_s must be > 0 and replica.kv_memory_fraction in (0, 1], got "
                             f"{self.start_timeout_s}, {self.kv_memory_fraction}")
        if self.memory_gb is not None and not self.memory_gb > 0:
            raise ValueError(f"replica.memory_gb must be > 0 (or None), got {self.memory_gb}")
        if self.max_ongoing_requests < 1 or self.retries < 0:
            raise ValueError(f"replica.max_ongoing_requests must be >= 1 and replica.retries >= 0, got "
                             f"{self.max_ongoing_requests}, {self.retries}")


@dataclass
class ServeConfig(EngineConfig):
    host: str = "127.0.0.1"                  # loopback only unless told otherwise
    port: int = 8000
    api_key: Optional[str] = None            # set: every endpoint but /health needs "Authorization: Bearer <key>"
    served_model_name: Optional[str] = None  # the `model` clients must send; None: model.source
    max_prompt_tokens: int = 4096            # longest prompt accepted (400 beyond)
    max_tokens_limit: Optional[int] = None   # largest max_tokens accepted (400 beyond); None: the model's context
                                             # length, the max_model_len /v1/models advertises (vLLM's)
    max_concurrent_requests: int = 256       # sequences in flight at once (429 beyond)
    max_queued_tokens: int = 1 << 20         # tokens in flight (each sequence's prompt + max_tokens; 429 beyond)
    tenant_share: float = 0.5                # one tenant (`user`, else client address) may hold at most this share
                                             # of max_concurrent_requests and of max_queued_tokens (429 beyond)
    tenant_header: Optional[str] = None      # e.g. X-Tenant: a request's tenant is this header's value when sent
                                             # (before `user`); 1-128 printable characters (400 otherwise)
    slo: SLO = field(default_factory=SLO)    # the TTFT / TPOT targets requests are judged by in /metrics (SLO
                                             # attainment, goodput; QoE's expectation) and deadline-aware policies
    max_body_bytes: int = 1 << 20            # largest request body (413 beyond)
    max_prompt_chars: int = 131072           # longest text prompt (chat: all messages), checked before tokenizing
    max_sequences_per_request: int = 64      # prompts x best_of (or n) in one request (400 beyond)
    request_timeout_s: float = 600.0         # a request still running after this is aborted
    tokenizer_workers: int = 2               # threads that tokenize and apply chat templates off the event loop
    allowed_hosts: Optional[List[str]] = None    # Host headers served; None: the loopback names when bound to a
                                                 # loopback address (DNS rebinding), else any
    header_timeout_s: float = 10.0           # a connection must send a request's headers within this (then closed)
    body_timeout_s: float = 30.0             # ... and its body within this (408 beyond)
    max_connections: int = 1024              # admitted requests (503 beyond); connections still sending a head or
                                             # a body are bounded apart, by the max_pending_* limits below
    max_pending_connections: int = 256       # connections without a complete request head (new, idle keep-alive,
                                             # mid-head); beyond, the oldest such connection is closed
    max_pending_bodies: int = 128            # requests whose body is still arriving; beyond, the oldest is closed
    max_pending_per_client: int = 32         # ... of each of the two, per client address (its oldest is closed)
    min_data_rate_bytes_s: float = 500.0     # a head or body arriving slower than this on average (after
                                             # min_rate_grace_s) is closed: Apache mod_reqtimeout's MinRate
    min_rate_grace_s: float = 2.0
    health_details: bool = False             # /health without the key says only ok/degraded; True: details for all
    open_metrics: bool = False               # True: /metrics and /ping need no API key (as vLLM serves them)
    shutdown_grace_s: float = 30.0           # on shutdown, requests still running after this end with an error event
    replicas: int = 1                        # engine replicas; > 1: Ray Serve deployment replicas behind `router`
    router: RouterConfig = field(default_factory=lambda: ROUTERS.config("round_robin"))
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)   # colocated | disaggregated pools

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.source

    @property
    def hosts(self) -> list[str]:
        """The Host header values served (TrustedHostMiddleware patterns)."""
        if self.allowed_hosts is not None:
            return list(self.allowed_hosts)
        return LOOPBACK_NAMES if self.host in LOOPBACK_HOSTS else ["*"]

    def validate(self) -> None:
        super().validate()
        limits = {"max_prompt_tokens": self.max_prompt_tokens,
                  "max_tokens_limit": 1 if self.max_tokens_limit is None else self.max_tokens_limit,
                  "max_concurrent_requests": self.max_concurrent_requests, "max_body_bytes": self.max_body_bytes,
                  "max_prompt_chars": self.max_prompt_chars, "request_timeout_s": self.request_timeout_s,
                  "max_sequences_per_request": self.max_sequences_per_request,
                  "tokenizer_workers": self.tokenizer_workers, "header_timeout_s": self.header_timeout_s,
                  "body_timeout_s": self.body_timeout_s, "max_connections": self.max_connections,
                  "shutdown_grace_s": self.shutdown_grace_s, "max_queued_tokens": self.max_queued_tokens,
                  "max_pending_connections": self.max_pending_connections,
                  "max_pending_bodies": self.max_pending_bodies, "max_pending_per_client": self.max_pending_per_client,
                  "min_data_rate_bytes_s": self.min_data_rate_bytes_s, "min_rate_grace_s": self.min_rate_grace_s}
        for name, value in limits.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.slo.validate("slo")
        if self.tenant_header is not None and not (self.tenant_header.strip() and self.tenant_header.isascii()):
            raise ValueError(f"tenant_header must be an HTTP header name, got {self.tenant_header!r}")
        if not 0 < self.tenant_share <= 1:
            raise ValueError(f"tenant_share must be in (0, 1], got {self.tenant_share}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty (FASTGEN_API_KEY set to nothing?): an empty key would let anyone in "
                             "who sends 'Authorization: Bearer'; set a real key or unset FASTGEN_API_KEY")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        self.router.validate()
        self.replica.validate()
        self.deployment.validate()
        if self.deployment.disaggregated and self.replicas > 1:
            raise ValueError("deployment=disaggregated serves its pools behind this process's front, sized by "
                             "deployment.prefill_replicas and deployment.decode_replicas: leave replicas=1")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
