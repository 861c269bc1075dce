"""Power of two choices (Mitzenmacher; Ray Serve's default router): each request draws two distinct replicas at
random, from a seeded generator, and goes to the one with fewer outstanding requests (the first drawn on a tie)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fastgen.routers.base import Router, RouterConfig, register_router


@dataclass
class PowerOfTwoConfig(RouterConfig):
    name: str = "power_of_two"
    seed: int = 0


@register_router("power_of_two", config=PowerOfTwoConfig)
class PowerOfTwoRouter(Router):
    def __init__(self, config: PowerOfTwoConfig, num_replicas: int):
        super().__init__(config, num_replicas)
        self._rng = np.random.default_rng(config.seed)

    def choose(self, outstanding: Sequence[int]) -> int:
        if self.num_replicas == 1:
            return 0
        a, b = self._rng.choice(self.num_replicas, size=2, replace=False)
        return int(b) if outstanding[b] < outstanding[a] else int(a)
