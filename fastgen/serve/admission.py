"""Admission shared between tenants: no tenant holds more than its share of the server's admission slots
(`max_concurrent_requests`, counted in sequences) or of its queued tokens (`max_queued_tokens`, counted as each
sequence's prompt + max_tokens), so one client's burst leaves room for everyone else's requests.

The tenant is the value of the server's `tenant_header` (e.g. X-Tenant) if configured and sent, else the request's
OpenAI `user` field if it sends one, else its client address (all holders of the one API key are one tenant only
per address). A tenant with nothing in flight is always admitted while the server as a
whole has room (a single request larger than the share is not refused forever); beyond its share it gets a 429
naming `tenant_share`.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from fastgen.serve.config import ServeConfig
from fastgen.serve.protocol import APIError

MAX_TENANT_CHARS = 128       # a `user` longer than this is cut (the ledger's keys stay small)


@dataclass
class Ticket:
    """What one admitted request holds until it is released (released once, however often release is called)."""

    tenant: str
    sequences: int
    tokens: int
    released: bool = False


class TenantLedger:
    """Sequences and queued tokens in flight, in all and per tenant."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg          # read at each admission: the limits may be changed while serving
        self.sequences: dict[str, int] = defaultdict(int)
        self.tokens: dict[str, int] = defaultdict(int)
        self.total_tokens = 0

    @staticmethod
    def tenant_of(user: str | None, client_host: str | None, header: tuple[str, str | None] = ("", None)) -> str:
        """`header`: (the tenant header's name, its value in the request, None if not sent)."""
        name, value = header
        if value is not None:
            if not value.strip() or len(value) > MAX_TENANT_CHARS or not value.isprintable():
                raise APIError(400, f"the {name} header names the request's tenant: 1 to {MAX_TENANT_CHARS} "
                                    f"printable characters, got {value[:MAX_TENANT_CHARS + 8]!r}", param=name)
            return "tenant:" + value.strip()
        if user:
            return "user:" + user[:MAX_TENANT_CHARS]
        return "addr:" + (client_host or "unknown")

    def admit(self, tenant: str, sequences: int, tokens: int, active: int) -> Ticket:
        """A ticket for the request, or a 429 (the server's limit, or the tenant's share). `active`: sequences in
        flight on the backend (what max_concurrent_requests bounds)."""
        cfg = self.cfg
        self.max_sequences, self.max_tokens, self.share = cfg.max_concurrent_requests, cfg.max_queued_tokens, \
            cfg.tenant_share
        self.tenant_sequences = max(1, math.ceil(cfg.tenant_share * cfg.max_concurrent_requests))
        self.tenant_tokens = max(1, math.ceil(cfg.tenant_share * cfg.max_queued_tokens))
        if active + sequences > self.max_sequences:
            raise APIError(429, f"the server is at its limit max_concurrent_requests={self.max_sequences}; retry "
                                "later", type="rate_limit_error", code="too_many_requests")
        if self.total_tokens + tokens > self.max_tokens and self.total_tokens:
            raise APIError(429, f"the server is at its limit max_queued_tokens={self.max_tokens}; retry later",
                           type="rate_limit_error", code="too_many_requests")
        held_sequences, held_tokens = self.sequences.get(tenant, 0), self.tokens.get(tenant, 0)
        if held_sequences and (held_sequences + sequences > self.tenant_sequences
                               or held_tokens + tokens > self.tenant_tokens):
            raise APIError(429, f"this client already holds {held_sequences} sequences and {held_tokens} queued "
                                f"tokens, its share tenant_share={self.share:g} of the server's limits "
                                f"({self.tenant_sequences} sequences, {self.tenant_tokens} tokens); retry later",
                           type="rate_limit_error", code="tenant_limit")
        self.sequences[tenant] += sequences
        self.tokens[tenant] += tokens
        self.total_tokens += tokens
        return Ticket(tenant, sequences, tokens)

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self.total_tokens -= ticket.tokens
        self.sequences[ticket.tenant] -= ticket.sequences
        self.tokens[ticket.tenant] -= ticket.tokens
        if self.sequences[ticket.tenant] <= 0:
            del self.sequences[ticket.tenant]
            self.tokens.pop(ticket.tenant, None)

    def held(self, tenant: str) -> tuple[int, int]:
        return self.sequences.get(tenant, 0), self.tokens.get(tenant, 0)
