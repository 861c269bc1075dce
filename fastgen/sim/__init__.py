"""Simulated execution: the real engine, schedulers and KV managers, with each step's time predicted by a cost
model calibrated on measured step times (executor=simulated, fastgen/executors/simulated.py; python -m
fastgen.calibration.calibrate) or fitted to published GPU operator times (python -m fastgen.calibration.measured).
This package is a leaf the executors use: the work of a step, its cost, model shapes and clocks."""
from fastgen.sim.clocks import CPUClock, VirtualClock
from fastgen.sim.cost_model import CostModel, DeviceSheet, Profile
from fastgen.sim.shapes import NAMED_MODELS, PAPER_MODELS, model_spec
from fastgen.sim.work import BatchShape, StepWork, WorkModel

__all__ = ["NAMED_MODELS", "PAPER_MODELS", "BatchShape", "CPUClock", "CostModel", "DeviceSheet", "Profile", "StepWork",
           "VirtualClock", "WorkModel", "model_spec"]
