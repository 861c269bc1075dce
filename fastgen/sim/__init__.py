"""Simulated execution: the real engine, schedulers and KV managers, with each step's time predicted by a cost
model calibrated on measured step times (executor=simulated; python -m fastgen.sim.calibrate) or fitted to published
GPU operator times (python -m fastgen.sim.measured)."""
from fastgen.sim.clocks import CPUClock, VirtualClock
from fastgen.sim.cost_model import BatchShape, CostModel, Profile, StepWork
from fastgen.sim.executor import SimulatedRunner, build_simulated_engine, kv_pool_blocks
from fastgen.sim.shapes import PAPER_MODELS, ModelShape, model_shape

__all__ = ["PAPER_MODELS", "BatchShape", "CPUClock", "CostModel", "ModelShape", "Profile", "SimulatedRunner",
           "StepWork", "VirtualClock", "build_simulated_engine", "kv_pool_blocks", "model_shape"]
