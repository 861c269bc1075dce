"""Per-request acceptance rates of speculative decoding measured on the real engine, stored beside the simulator's
profiles (fastgen/sim/profiles/acceptance/<name>.json) for the synthetic proposer to draw from
(`speculative=synthetic speculative.acceptance=measured:<name or path>`). A request's rate is the chance that one
proposal is accepted given the ones before it were: accepted / (accepted + verifies that ended at a rejection),
the estimate of the synthetic proposer's own per-proposal rate. Made by `python -m fastgen.calibration.acceptance`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fastgen.sim.cost_model import PROFILES_DIR, read_named_json

ACCEPTANCE_DIR = PROFILES_DIR / "acceptance"


@dataclass
class MeasuredAcceptance:
    rates: list[float]                        # one per request that verified at least one proposal
    meta: dict = field(default_factory=dict)  # how it was measured: model, proposer, workload, command

    def __post_init__(self):
        if not self.rates or not all(0.0 <= r <= 1.0 for r in self.rates):
            raise ValueError("a measured acceptance distribution needs >= 1 rate, each in [0, 1]")

    @property
    def mean(self) -> float:
        return float(np.mean(self.rates))

    @staticmethod
    def rate(accepted: int, rejected: int) -> float:
        return accepted / (accepted + rejected)

    @classmethod
    def load(cls, name_or_path: str) -> "MeasuredAcceptance":
        return cls(**read_named_json(name_or_path, ACCEPTANCE_DIR, "measured acceptance",
                                     "python -m fastgen.calibration.acceptance"))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path
