"""The machine a run measured on, and whether other processes competed with it: on a shared machine the same
wall-clock run can take ten times longer, so each run records the CPU, the load around it and how long its own
threads waited for a CPU, and says when that made its timings noise."""
from __future__ import annotations

import glob
import os
import platform
import subprocess
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


def uptime() -> str:
    """`uptime`'s line (time up, users, load averages), as the experiments' results quote it before and after."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def scheduler_seconds() -> Optional[tuple[float, float]]:
    """(seconds this process's threads ran on a CPU, seconds they waited runnable for one), summed over its threads
    (Linux /proc/self/task/*/schedstat; None elsewhere)."""
    ran = waited = 0
    try:
        for path in glob.glob("/proc/self/task/*/schedstat"):
            fields = open(path).read().split()
            ran, waited = ran + int(fields[0]), waited + int(fields[1])
    except (OSError, ValueError, IndexError):
        return None
    return (ran / 1e9, waited / 1e9) if ran else None


WAIT_WARNING = 0.10     # threads waiting for a CPU more than this share of the time they wanted one: noise


@dataclass
class Machine:
    cpu_model: str
    cpu_flags: str                               # /proc/cpuinfo's flags, space-separated (empty off Linux)
    cpus: int
    threads: Optional[int] = None                # threads the measured work ran on (None: timed on a virtual clock)
    ranks: Optional[int] = None                  # executor=tp on CPU: processes, threads // ranks threads each
    load_average_start: list[float] = field(default_factory=list)
    load_average_end: list[float] = field(default_factory=list)
    cpu_wait_frac: Optional[float] = None        # share of its runnable time this process waited for a CPU
    _scheduler_start: Optional[tuple[float, float]] = field(default=None, repr=False)

    @classmethod
    def at_start(cls) -> "Machine":
        return cls(cpu_model(), cpu_flags(), available_cpus(), load_average_start=load_average(),
                   _scheduler_start=scheduler_seconds())

    def finish(self, threads: Optional[int], ranks: Optional[int] = None) -> "Machine":
        self.threads, self.ranks, self.load_average_end = threads, ranks, load_average()
        end = scheduler_seconds()
        if self._scheduler_start and end:
            ran, waited = end[0] - self._scheduler_start[0], end[1] - self._scheduler_start[1]
            self.cpu_wait_frac = waited / (ran + waited) if ran + waited > 0 else None
        return self

    def noise_warning(self) -> Optional[str]:
        """A warning when other processes competed for the CPUs: this process's threads waited for a CPU more than
        WAIT_WARNING of the time they were ready to run (where the OS says so), else when the load average at the
        end, less this run's threads, exceeded the CPUs they left free (load averages are smoothed: half a CPU of
        excess is tolerated). None for runs timed on a virtual clock."""
        if self.threads is None or not self.load_average_end:
            return None
        start, end = (self.load_average_start or [float("nan")])[0], self.load_average_end[0]
        load = f"1-min load average {start:.2f} at start, {end:.2f} at end, on {self.cpus} CPUs"
        if self.cpu_wait_frac is not None:
            if self.cpu_wait_frac <= WAIT_WARNING:
                return None
            why = f"this run's threads waited for a CPU {self.cpu_wait_frac:.0%} of the time they were ready ({load})"
        elif end - self.threads <= max(0, self.cpus - self.threads) + 0.5:
            return None
        else:
            why = f"other processes kept ~{end - self.threads:.1f} CPUs busy ({load})"
        return (f"noisy timings: {why}; rerun on an idle machine, or compare single-threaded runs in CPU time "
                "(timer=cpu hardware.threads=1)")

    def asdict(self) -> dict:
        fields = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        return fields | {"noise_warning": self.noise_warning()}


def machine_record(machine: Machine) -> dict:
    """The machine's record (CPU, flags, load, CPU wait, noise warning) as of now, with the library versions: what
    a results file needs to say where its timings came from."""
    import torch
    import transformers
    return machine.finish(torch.get_num_threads()).asdict() | {
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def machine_line(m: dict) -> str:
    """A results page's line about the machine record: CPU, the SIMD/matrix flags that pick kernels, load, noise."""
    flags = " ".join(f for f in m["cpu_flags"].split() if f.startswith(("avx", "amx", "fma", "f16c")))
    return (f"Machine: {m['cpu_model']}, {m['cpus']} CPUs, flags {flags}; torch {m['torch']} ({m['threads']} "
            f"threads), transformers {m['transformers']}; load average at start {m['load_average_start']}, at end "
            f"{m['load_average_end']}" + (f"; **{m['noise_warning']}**" if m["noise_warning"] else "") + ".")
