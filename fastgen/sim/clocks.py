"""Clocks the engine can run on besides the wall clock (LLMEngine(clock=...)). Each has the `sleep` the driver
uses while the engine is idle, so waiting advances the same clock."""
from __future__ import annotations

import time


class VirtualClock:
    """Simulated seconds: the simulated executor's steps and the driver's sleeps advance it; nothing else does."""

    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


class CPUClock:
    """This process's CPU seconds, plus the idle time the driver skipped. On a shared machine a single-threaded
    run measured this way is not slowed by other processes, which makes real-vs-simulated comparisons steady."""

    def __init__(self):
        self.skipped = 0.0

    def __call__(self) -> float:
        return time.process_time() + self.skipped

    def sleep(self, seconds: float) -> None:
        self.skipped += max(0.0, seconds)
