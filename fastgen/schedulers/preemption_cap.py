"""A cap on preemptions made for a more urgent request, against thrashing in a tight KV pool: on average at most
`cap` per request received so far (Andes' preemption-frequency cap P). Without it a policy whose order changes as
time passes (deadlines, QoE) keeps taking the KV of requests that soon take it back, and recomputes without end."""
from __future__ import annotations

from fastgen.request import Request


class PreemptionCap:
    def __init__(self, cap: float):
        self.cap = cap
        self.received = self.preempted = 0

    def receive(self, req: Request) -> None:
        """Counts a request added for the first time (not one coming back from a preemption)."""
        self.received += req.num_preemptions == 0

    def allows(self) -> bool:
        return self.preempted < self.cap * self.received

    def count(self, victim: Request | None) -> Request | None:
        self.preempted += victim is not None
        return victim
