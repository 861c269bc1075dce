"""How the OpenMP threads of torch, MKL and oneDNN wait at the end of a parallel region: they sleep
(OMP_WAIT_POLICY=PASSIVE) instead of spinning first (GNU OpenMP's default spins for some 300,000 rounds).

Why: a decode step runs hundreds of parallel regions. When another process also wants the cores, a thread spinning
at a region's end holds a core that the thread still at work (or the neighbour) needs, and the next region waits
until the spinner is descheduled. On the embedded model on 2 cores with two busy neighbour processes, spinning ran
8x slower than alone and sleeping 2x, its fair half of the CPU (experiments/results/cpu_contention/).

The runtime reads the variable once, when it loads, i.e. when torch is first imported: fastgen's __init__ imports
and calls it before anything that imports torch. A wait policy or GNU spin count already in the environment wins
(OMP_WAIT_POLICY=ACTIVE restores spinning); if torch was imported before fastgen, nothing changes.
"""
from __future__ import annotations

import os
import sys

WAIT_POLICY = "PASSIVE"
KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def set_wait_policy(environ=os.environ, modules=sys.modules) -> str | None:
    """Sets OMP_WAIT_POLICY for the OpenMP runtime about to load; returns the policy the runtime will use (None:
    its own default, or unknown because torch was loaded first)."""
    if any(k in environ for k in KNOBS):
        return environ.get("OMP_WAIT_POLICY")
    if "torch" in modules:
        return None
    environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    return WAIT_POLICY

