"""Simulated execution: the real engine, schedulers and KV managers, with each step's time predicted by a cost
model calibrated on measured step times (executor=simulated, fastgen/executors/simulated.py;
python -m fastgen.calibration.calibrate) or fitted to published GPU operator times (python -m fastgen.calibration.measured)."""
from fastgen.sim.clocks import CPUClock, VirtualClock
from fastgen.sim.cost_model import BatchShape, CostModel, DeviceSheet, Profile, StepWork
from fastgen.sim.shapes import NAMED_MODELS, PAPER_MODELS, model_spec

__all__ = ["NAMED_MODELS", "PAPER_MODELS", "BatchShape", "CPUClock", "CostModel", "DeviceSheet", "Profile", "StepWork",
           "VirtualClock", "model_spec"]
