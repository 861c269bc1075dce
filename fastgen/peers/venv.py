"""A peer's own virtual environment (never fastgen's): the programs in it, and making it once with the peer's one
command when it is missing."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Callable


def venv_bin(venv: str, program: str = "python") -> Path:
    return Path(venv) / "bin" / program


def ensure_peer_venv(venv: str, command: str, peer: str, log: Callable[[str], Any] = print) -> None:
    """Runs `command` (which makes `venv`) unless the venv's python is there already."""
    if venv_bin(venv).exists():
        return
    log(f"{peer} venv {venv} is missing; creating it: {command}")
    if subprocess.run(command, shell=True).returncode != 0:
        raise RuntimeError(f"creating the {peer} venv failed; run by hand: {command}")
