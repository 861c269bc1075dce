"""A server as a peer: started as a process, waited for until its /health answers, stopped."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], url: str, log_path: Path | None, timeout_s: float = 600,
                 env: dict | None = None, cwd: Path | None = None) -> tuple[subprocess.Popen, float]:
    """Starts `cmd` (its output to `log_path`) and waits for `url`/health; (the process, seconds to ready)."""
    import httpx
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or os.environ, stdout=out, stderr=subprocess.STDOUT)
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready; its log: {log_path}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(proc)
    raise RuntimeError(f"server not healthy after {timeout_s:.0f} s; its log: {log_path}")


def stop(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
