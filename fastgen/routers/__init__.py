"""Routers across replicas behind one interface and a registry (round_robin: DeepSpeed-MII's load balancer;
least_outstanding and random: Vidur's global schedulers;
power_of_two: Ray Serve's default)."""
from fastgen.routers.base import ROUTERS, Router, RouterConfig, make_router, register_router

__all__ = ["ROUTERS", "Router", "RouterConfig", "make_router", "register_router"]
