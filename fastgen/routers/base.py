"""Router: the global scheduler in front of N replicas, choosing the replica each new request goes to.

A router is pure policy over what the caller tells it: the number of requests outstanding (sent, not finished) at
each replica when a request arrives. The same classes serve the simulator's replica cluster (fastgen.driver.cluster)
and a deployment of real replicas. A new router is one file here (or anywhere, named by `router.module`) with a
`@register_router("name", config=MyConfig)` subclass of Router, plus conf/router/name.yaml.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Sequence

from fastgen.config import PartConfig
from fastgen.registry import Registry


@dataclass
class RouterConfig(PartConfig):
    """Which replica gets a request; a router's own config subclasses this beside it (fastgen/routers/)."""


ROUTERS: Registry["Router"] = Registry("router", "fastgen.routers", RouterConfig)
register_router = ROUTERS.register      # @register_router("name", config=MyConfig) on a Router subclass


class Router(ABC):
    name: ClassVar[str]
    Config: ClassVar[type[RouterConfig]] = RouterConfig

    def __init__(self, config: RouterConfig, num_replicas: int):
        if num_replicas < 1:
            raise ValueError(f"a router needs at least one replica, got {num_replicas}")
        self.config, self.num_replicas = config, num_replicas

    @abstractmethod
    def choose(self, outstanding: Sequence[int]) -> int:
        """The replica (an index) the next request goes to, given each replica's outstanding requests."""


def make_router(config: RouterConfig, num_replicas: int) -> Router:
    return ROUTERS.resolve(config)(config, num_replicas)
