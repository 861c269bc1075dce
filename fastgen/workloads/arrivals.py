"""When requests are sent: open-loop arrival times or the paper's closed-loop clients.

Every process speaks the same small protocol, so one driver loop serves them all:

- ``initial_requests()`` once at run time 0 -> ``[(request_index, send_time), ...]``;
- ``on_finish(request_index, now)`` whenever a request has fully finished -> more pairs;
- ``total`` requests are sent over the run, ``warmup_indices`` of them are warm-ups (not measured).

A driver sends request ``i`` when its clock reaches ``send_time`` (send times may lie in the future).
Open-loop processes return everything up front and nothing on finish; closed-loop clients only
release work when earlier work finishes, which is why the driver must report finishes.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

Send = tuple[int, float]


class ArrivalProcess(Protocol):
    total: int

    @property
    def warmup_indices(self) -> range: ...

    def initial_requests(self) -> list[Send]: ...

    def on_finish(self, request_index: int, now: float) -> list[Send]: ...


def gamma_arrivals(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """`n` absolute arrival offsets (first at 0) with Gamma inter-arrival gaps.

    Shape = burstiness = 1/CV^2 and mean gap = 1/rate, so burstiness 1 is a Poisson process,
    < 1 is burstier, > 1 is more regular.
    """
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0 (1 = Poisson, <1 burstier), got {burstiness}")
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(n - 1, 0))
    return [0.0, *np.cumsum(gaps).tolist()][:n]


def poisson_arrivals(n: int, rate: float, rng: np.random.Generator) -> list[float]:
    """`n` absolute arrival offsets (first at 0) of a Poisson process with `rate` requests/s."""
    return gamma_arrivals(n, rate, 1.0, rng)


class OpenLoopArrivals:
    """Requests arrive at fixed offsets regardless of how fast the server answers."""

    def __init__(self, times: Sequence[float]):
        if any(t < 0 for t in times):
            raise ValueError("arrival times must be >= 0 seconds")
        self.times = [float(t) for t in times]
        self.total = len(self.times)

    @property
    def warmup_indices(self) -> range:
        return range(0)

    def initial_requests(self) -> list[Send]:
        return sorted(enumerate(self.times), key=lambda send: send[1])

    def on_finish(self, request_index: int, now: float) -> list[Send]:
        return []


class ClosedLoopArrivals:
    """N clients share one queue; each sends its next request only when its previous one finished.

    Mirrors the DeepSpeed-FastGen benchmark client: with `warmup`, requests 0..N-1 are one warm-up
    per client, sent together at time 0; when all of them have finished (the benchmark's barrier)
    each client waits a jitter drawn from U(0, N) * `jitter_s_per_client` and then starts on the
    measured requests N..N+num_requests-1. Without `warmup` the jittered start happens at time 0.
    """

    def __init__(self, num_requests: int, clients: int, rng: np.random.Generator,
                 warmup: bool = True, jitter_s_per_client: float = 0.01):
        if clients < 1:
            raise ValueError(f"clients must be >= 1 concurrent clients, got {clients}")
        if num_requests < 0:
            raise ValueError(f"num_requests must be >= 0, got {num_requests}")
        if jitter_s_per_client < 0:
            raise ValueError(f"jitter_s_per_client must be >= 0 seconds, got {jitter_s_per_client}")
        self.clients = clients
        self.num_warmup = clients if warmup else 0
        self.total = self.num_warmup + num_requests
        self.jitter = (rng.uniform(0, clients, size=clients) * jitter_s_per_client).tolist()
        self._next = self.num_warmup
        self._warmups_left = self.num_warmup
        self._outstanding: set[int] = set()

    @property
    def warmup_indices(self) -> range:
        """Indices of the warm-up requests, to be excluded from metrics."""
        return range(self.num_warmup)

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    def initial_requests(self) -> list[Send]:
        if self.num_warmup:
            return self._issue([(i, 0.0) for i in self.warmup_indices])
        return self._start_measured(0.0)

    def on_finish(self, request_index: int, now: float) -> list[Send]:
        if request_index not in self._outstanding:
            raise ValueError(f"request {request_index} finished but was not outstanding")
        self._outstanding.remove(request_index)
        if request_index < self.num_warmup:
            self._warmups_left -= 1
            return self._start_measured(now) if self._warmups_left == 0 else []
        return self._issue(self._take([now]))

    def _start_measured(self, now: float) -> list[Send]:
        return self._issue(self._take([now + j for j in self.jitter]))

    def _take(self, send_times: list[float]) -> list[Send]:
        """Pair queued request indices with send times, as many as the queue still holds."""
        count = min(len(send_times), self.total - self._next)
        sends = [(self._next + k, send_times[k]) for k in range(count)]
        self._next += count
        return sends

    def _issue(self, sends: list[Send]) -> list[Send]:
        self._outstanding.update(index for index, _ in sends)
        return sends
