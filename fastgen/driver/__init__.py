"""The load driver and its targets: a workload's arrivals played against the in-process engine (EngineTarget),
N simulated replicas behind a router (ReplicaCluster) or an OpenAI-compatible server over HTTP (HttpTarget)."""
from fastgen.driver.cluster import ReplicaCluster
from fastgen.driver.engine_target import EngineTarget
from fastgen.driver.http import HttpTarget
from fastgen.driver.run import RunResult, Target, request_ids, run_workload

__all__ = ["EngineTarget", "HttpTarget", "ReplicaCluster", "RunResult", "Target", "request_ids", "run_workload"]
