"""Routers across replicas (fastgen.routers) and the simulator's replica cluster (fastgen.driver.cluster)."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastgen.bench import run_benchmark
from fastgen.compose import build_engine
from fastgen.conf import compose_config
from fastgen.driver import EngineTarget, run_workload
from fastgen.routers import ROUTERS, make_router
from fastgen.driver.cluster import ReplicaCluster
from fastgen.workloads import build_workload

SIM = ["executor=simulated", "progress=false", "model.source=llama-2-7b", "hardware=a100-80gb",
       "workload.num_requests=40", "workload.prompt.mean=600", "workload.output.mean=20", "workload.output.max=40"]


def router(name, n, **knobs):
    return make_router(ROUTERS.config(name, **knobs), n)


@given(st.lists(st.lists(st.integers(0, 9), min_size=3, max_size=3), min_size=1, max_size=30))
def test_round_robin_cycles_exactly_whatever_the_load(loads):
    rr = router("round_robin", 3)
    assert [rr.choose(load) for load in loads] == [i % 3 for i in range(len(loads))]


@given(st.lists(st.integers(0, 20), min_size=1, max_size=8))
def test_least_outstanding_never_picks_a_busier_replica_than_an_idler_one(load):
    chosen = router("least_outstanding", len(load)).choose(load)
    assert load[chosen] == min(load) and chosen == load.index(min(load))


def test_random_is_seeded_and_spreads_evenly():
    picks = [router("random", 4, seed=7).choose([0] * 4) for _ in range(3)]
    assert len(set(picks)) == 1                                # the same seed, the same first pick
    r = router("random", 4, seed=1)
    counts = [0] * 4
    for _ in range(4000):
        counts[r.choose([0] * 4)] += 1
    assert all(900 < c < 1100 for c in counts)
    with pytest.raises(ValueError, match="unknown router 'nope'; available: least_outstanding, power_of_two, random, round_robin"):
        ROUTERS.config("nope")


@given(st.lists(st.integers(0, 20), min_size=2, max_size=8), st.integers(0, 1000))
def test_power_of_two_picks_the_less_loaded_of_two_distinct_draws(load, seed):
    p2c = router("power_of_two", len(load), seed=seed)
    draws = router("power_of_two", len(load), seed=seed)._rng.choice(len(load), size=2, replace=False)
    chosen = p2c.choose(load)
    assert chosen in draws and load[chosen] == min(load[d] for d in draws)


def test_power_of_two_never_picks_the_most_loaded_of_three():
    p2c = router("power_of_two", 3, seed=3)
    picks = [p2c.choose([5, 0, 9]) for _ in range(300)]
    assert 2 not in picks and {0, 1} <= set(picks)


def cluster(replicas, name, *overrides):
    cfg = compose_config([*SIM, f"replicas={replicas}", f"router={name}", *overrides])
    engines = [build_engine(cfg) for _ in range(replicas)]
    return ReplicaCluster(engines, make_router(cfg.router, replicas)), build_workload(cfg.workload,
                                                                                     engines[0].vocab_size)


def test_one_replica_cluster_is_the_engine_itself():
    cfg = compose_config([*SIM, "workload.arrival=poisson", "workload.rate=4"])
    engine = build_engine(cfg)
    alone = run_workload(EngineTarget(engine), build_workload(cfg.workload, engine.vocab_size), progress=False)
    clustered = run_workload(*cluster(1, "round_robin", "workload.arrival=poisson", "workload.rate=4"),
                             progress=False)
    assert [t.token_times for t in clustered.traces] == [t.token_times for t in alone.traces]
    assert clustered.end_time == alone.end_time and len(clustered.steps) == len(alone.steps)


def test_cluster_routes_as_the_router_says_and_scales(tmp_path):
    """Round-robin spreads 40 requests + 8 warm-ups over 4 replicas exactly; least-outstanding keeps every replica
    within one request of the others at each arrival; four replicas with four times the clients serve about four
    times the requests per second of one."""
    rr, workload = cluster(4, "round_robin", "workload.clients=8")
    result = run_workload(rr, workload, progress=False)
    assert rr.routed == [12, 12, 12, 12] and rr.outstanding == [0] * 4
    assert len(result.traces) == 40 and all(t.finish_time is not None for t in result.traces)
    lor, workload = cluster(4, "least_outstanding", "workload.clients=8")
    seen, choose = [], lor.router.choose
    lor.router.choose = lambda load: seen.append(list(load)) or choose(load)
    run_workload(lor, workload, progress=False)
    assert len(seen) == 48 and all(max(load) - min(load) <= 1 for load in seen)
    one = run_benchmark(compose_config([*SIM, "workload.clients=2"]), tmp_path / "one")
    four = run_benchmark(compose_config([*SIM, "workload.clients=8", "replicas=4"]), tmp_path / "four")
    assert four["request_throughput"] == pytest.approx(4 * one["request_throughput"], rel=0.25)


def test_replicas_need_the_simulator():
    with pytest.raises(ValueError, match="replicas=2 runs simulated replicas"):
        compose_config(["replicas=2"]).validate()
