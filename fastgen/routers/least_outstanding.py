"""Least outstanding requests (Vidur's "lor"): each request goes to the replica with the fewest requests sent and
not yet finished; ties go to the lowest index."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from fastgen.routers.base import Router, RouterConfig, register_router


@dataclass
class LeastOutstandingConfig(RouterConfig):
    name: str = "least_outstanding"


@register_router("least_outstanding", config=LeastOutstandingConfig)
class LeastOutstandingRouter(Router):
    def choose(self, outstanding: Sequence[int]) -> int:
        return min(range(self.num_replicas), key=outstanding.__getitem__)
