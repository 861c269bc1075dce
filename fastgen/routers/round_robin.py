"""Round-robin, DeepSpeed-MII's load balancer: requests go to replicas 0, 1, ..., N-1, 0, ... whatever their load."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from fastgen.routers.base import Router, RouterConfig, register_router


@dataclass
class RoundRobinConfig(RouterConfig):
    name: str = "round_robin"


@register_router("round_robin", config=RoundRobinConfig)
class RoundRobinRouter(Router):
    def __init__(self, config: RoundRobinConfig, num_replicas: int):
        super().__init__(config, num_replicas)
        self._next = 0

    def choose(self, outstanding: Sequence[int]) -> int:
        replica, self._next = self._next, (self._next + 1) % self.num_replicas
        return replica
