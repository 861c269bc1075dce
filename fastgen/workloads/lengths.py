"""Token-length distributions for prompts and generations.

The paper draws both lengths from Normal(mean, 0.3 * mean); `fixed` and `uniform` exist for
controlled sweeps. Lengths are whole tokens, at least 1, clipped to [min, max].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

DISTRIBUTIONS = ("normal", "fixed", "uniform")


@dataclass
class LengthSpec:
    """One length distribution. `mean`/`std_frac` drive normal, `mean` alone fixed, `low`/`high` uniform."""

    dist: str = "normal"
    mean: float = 128.0
    std_frac: float = 0.3            # std = std_frac * mean (the paper's 30%)
    low: int = 1                     # uniform: inclusive bounds
    high: int = 256
    min: int = 1                     # clip bounds applied to every distribution
    max: Optional[int] = None

    def validate(self, name: str) -> None:
        """Raise ValueError naming `name.<field>` and how to fix it; `name` is the config path."""
        if self.dist not in DISTRIBUTIONS:
            raise ValueError(f"{name}.dist must be one of {DISTRIBUTIONS}, got {self.dist!r}")
        if self.min < 1:
            raise ValueError(f"{name}.min must be >= 1 (a length is at least one token), got {self.min}")
        if self.max is not None and self.max < self.min:
            raise ValueError(f"{name}.max ({self.max}) must be >= {name}.min ({self.min}); raise max or lower min")
        if self.dist in ("normal", "fixed") and not self.mean > 0:
            raise ValueError(f"{name}.mean must be > 0 tokens, got {self.mean}")
        if self.dist == "normal" and not self.std_frac >= 0:
            raise ValueError(f"{name}.std_frac must be >= 0 (std = std_frac * mean), got {self.std_frac}")
        if self.dist == "uniform" and not 1 <= self.low <= self.high:
            raise ValueError(f"{name}.low/high must satisfy 1 <= low <= high, got low={self.low} high={self.high}")


def sample_lengths(spec: LengthSpec, n: int, rng: np.random.Generator, name: str = "length") -> np.ndarray:
    """Draw `n` integer lengths (int64) from `spec`; deterministic for a given generator state."""
    spec.validate(name)
    if n < 0:
        raise ValueError(f"cannot draw a negative number of lengths ({n})")
    if spec.dist == "normal":
        raw = np.rint(rng.normal(spec.mean, spec.std_frac * spec.mean, size=n))
    elif spec.dist == "fixed":
        raw = np.full(n, round(spec.mean))
    else:
        raw = rng.integers(spec.low, spec.high + 1, size=n)
    upper = spec.max if spec.max is not None else np.inf
    return np.clip(raw, spec.min, upper).astype(np.int64)
