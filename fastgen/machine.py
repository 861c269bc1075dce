"""The machine a run measured on, and whether other processes competed with it: on a shared machine the same
wall-clock run can take ten times longer, so each run records the CPU and the load around it, and says when the
load made its timings noise."""
from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Optional

def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The CPU's feature flags (/proc/cpuinfo's `flags`: avx2, avx512f, amx_bf16, ...), space-separated."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ""


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's share), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (runnable processes), or [] where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return []


@dataclass
class Machine:
    cpu_model: str
    cpu_flags: str                               # /proc/cpuinfo's flags, space-separated (empty off Linux)
    cpus: int
    threads: Optional[int] = None                # threads the measured work ran on (None: timed on a virtual clock)
    load_average_start: list[float] = field(default_factory=list)
    load_average_end: list[float] = field(default_factory=list)

    @classmethod
    def at_start(cls) -> "Machine":
        return cls(cpu_model(), cpu_flags(), available_cpus(), load_average_start=load_average())

    def finish(self, threads: Optional[int]) -> "Machine":
        self.threads, self.load_average_end = threads, load_average()
        return self

    def noise_warning(self) -> Optional[str]:
        """A warning when other processes wanted more CPUs than this run left free. The load from others is
        estimated as the 1-minute load average before the run, or after it minus this run's own threads; load
        averages are smoothed, so half a CPU of excess is tolerated."""
        if self.threads is None or not self.load_average_start or not self.load_average_end:
            return None
        start, end = self.load_average_start[0], self.load_average_end[0]
        others = max(start, end - self.threads)
        if others + self.threads <= self.cpus + 0.5:
            return None
        return (f"noisy timings: other processes kept ~{others:.1f} CPUs busy (1-min load average {start:.2f} at "
                f"start, {end:.2f} at end) while this run used {self.threads} threads of {self.cpus} CPUs; rerun on "
                "an idle machine, or compare single-threaded runs in CPU time (timer=cpu hardware.threads=1)")

    def asdict(self) -> dict:
        return {**asdict(self), "noise_warning": self.noise_warning()}
