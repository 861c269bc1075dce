"""A simulated run's metrics kept by its whole config and fastgen's source: sweeps that share points (the paper's
figure scripts share many) compute each once. Real runs are measurements and are never reused."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def source_hash(root: Path = ROOT) -> str:
    """What a simulated point's numbers depend on besides its config: fastgen's code, data and conf/."""
    digest = hashlib.sha256()
    for path in sorted([*(root / "fastgen").rglob("*"), *(root / "conf").rglob("*")]):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def cache_path(cache: Path | None, cfg_or_config: Any) -> Path | None:
    """Where a simulated run's metrics are kept under `cache`, by its whole config (as metrics.json records it) and
    fastgen's source; None for real runs or without a cache."""
    config = cfg_or_config if isinstance(cfg_or_config, dict) else \
        OmegaConf.to_container(OmegaConf.structured(cfg_or_config))
    if not cache or config["executor"]["name"] != "simulated":
        return None
    key = hashlib.sha256((json.dumps(config, sort_keys=True, default=str) + source_hash()).encode()).hexdigest()
    return Path(cache) / f"{key[:32]}.json"


def run_cached(cfg, out: Path, cache: Path | None) -> dict:
    """fastgen.bench.run_benchmark into `out`, quietly (it prints a table per run), unless `cache` holds the metrics
    of this simulated config already; what it computes is kept there."""
    from fastgen.bench import run_benchmark
    cached = cache_path(cache, cfg)
    if cached is not None and cached.exists():
        return json.loads(cached.read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = run_benchmark(cfg, out)
    path = cache_path(cache, metrics["config"])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics))
    return metrics
