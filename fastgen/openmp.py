"""How long the OpenMP threads of torch, MKL and oneDNN spin at the end of a parallel region before they sleep:
GOMP_SPINCOUNT=20000 rounds instead of GNU OpenMP's default 300,000.

Why: a decode step runs hundreds of parallel regions. When another process also wants the cores, a thread spinning
at a region's end holds a core that the thread still at work (or the neighbour) needs, and the next region waits
until the spinner is descheduled. Measured on the embedded model on 2 cores (experiments/results/cpu_contention/):
with two busy neighbour processes the default spin kept 21% of fastgen's throughput alone, 20,000 rounds 40% (as
much as OpenVINO GenAI kept, 38%); alone, 20,000 rounds ran as fast as the default, where sleeping at once
(OMP_WAIT_POLICY=PASSIVE) cost 8-13% of throughput.

The runtime reads its settings once, when it loads, i.e. when torch is first imported: fastgen's __init__ calls
`set_spin_count` before anything imports torch. A spin count or wait policy already in the environment wins
(OMP_WAIT_POLICY=ACTIVE spins without end, GOMP_SPINCOUNT=300000 restores the default); if torch was imported
before fastgen, nothing changes. Intel's OpenMP runtime, which this torch build does not use, ignores it.
"""
from __future__ import annotations

import os
import sys

SPIN_COUNT = "20000"
KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def set_spin_count(environ=os.environ, modules=sys.modules) -> str | None:
    """Sets GOMP_SPINCOUNT for the OpenMP runtime about to load; returns the spin count it will use (None: its
    own default, a wait policy of the user's, or unknown because torch was loaded first)."""
    if any(k in environ for k in KNOBS):
        return environ.get("GOMP_SPINCOUNT")
    if "torch" in modules:
        return None
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return SPIN_COUNT
