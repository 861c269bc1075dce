"""Random (Vidur's): each request goes to a replica drawn uniformly, from a seeded generator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fastgen.routers.base import Router, RouterConfig, register_router


@dataclass
class RandomConfig(RouterConfig):
    name: str = "random"
    seed: int = 0


@register_router("random", config=RandomConfig)
class RandomRouter(Router):
    def __init__(self, config: RandomConfig, num_replicas: int):
        super().__init__(config, num_replicas)
        self._rng = np.random.default_rng(config.seed)

    def choose(self, outstanding: Sequence[int]) -> int:
        return int(self._rng.integers(self.num_replicas))
