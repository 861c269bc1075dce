"""Capacity search (fastgen.capacity): bisection of the arrival rate against an SLO, on the simulated CPU profile."""
import json

import pytest

from fastgen.capacity import at_rate, capacity_table, replay_rate, search, write
from fastgen.conf import compose_config

SMALL = ["executor=simulated", "progress=false", "workload=poisson", "workload.num_requests=24",
         "workload.prompt.mean=128", "workload.output.mean=12", "workload.output.max=24"]


def capacity_config(*overrides):
    return compose_config([*SMALL, *overrides], config_name="capacity")


@pytest.mark.parametrize("scheduler", ["splitfuse", "vllm-0.2"])
def test_capacity_search_brackets_the_rate_within_its_tolerance(scheduler, tmp_path):
    """On the CPU profile (SmolLM2-135M simulated): the search ends with a rate that meets P99 TTFT <= 1 s and
    P99 TBT <= 0.15 s and a rate that misses them, within 10% of each other; each probe's verdict is its figures'."""
    cfg = capacity_config(f"scheduler={scheduler}", "capacity.slo.ttft_p99_s=1.0", "capacity.slo.tbt_p99_s=0.15",
                          "capacity.tolerance=0.1", "capacity.rate=2")
    result = search(cfg, tmp_path)
    assert result.bracketed and result.capacity < result.failing <= 1.1 * result.capacity
    for probe in result.probes:
        m = probe.metrics
        assert probe.met == (m["ttft_s_p99"] <= 1.0 and m["itl_s_p99"] <= 0.15)
    by_rate = {p.rate: p for p in result.probes}
    assert by_rate[result.capacity].met and not by_rate[result.failing].met
    assert all(not p.met for p in result.probes if p.rate > result.failing)   # what failed stays failed above
    saved = json.loads(write(result, cfg, tmp_path).read_text())
    assert saved["capacity"] == result.capacity and len(saved["probes"]) == len(result.probes)
    table = capacity_table([tmp_path / "capacity.json"])
    assert f"| {scheduler} | smollm2-135m | poisson |" in table and f"{result.capacity:.3g}" in table


def test_capacity_scales_a_trace_by_its_time_scale_and_refuses_closed_loop():
    cfg = capacity_config("workload=azure-conv", "workload.num_requests=100", "model.source=llama-2-7b",
                          "hardware=a100-80gb", "capacity.slo.sla_frac=0.9")
    base = replay_rate(cfg)
    assert 1 < base < 20                                    # the conversation trace runs at ~5.5 requests/s
    assert at_rate(cfg, 2 * base, base).workload.time_scale == pytest.approx(0.5)
    with pytest.raises(ValueError, match="workload.arrival must be one of"):
        capacity_config("workload.arrival=closed_loop", "capacity.slo.tbt_p99_s=1").validate()
    with pytest.raises(ValueError, match="needs an SLO"):
        capacity_config().validate()


def test_capacity_of_request_classes_scales_every_class_stream_and_judges_requests_by_their_slo(tmp_path):
    """two-tenant (each class its own arrivals, arrival=classes), Llama-2-7B simulated on an A100: each probe
    compresses both streams by one time scale, base rate / probed rate, and meets the SLO iff >= 90% of requests
    meet their own class's SLO (slo_attainment); the search brackets the rate."""
    cfg = capacity_config("workload=two-tenant", "workload.num_requests=64", "model.source=llama-2-7b",
                          "hardware=a100-80gb", "capacity.slo.attainment=0.9", "capacity.tolerance=0.2",
                          "capacity.rate=64")
    base = replay_rate(cfg)
    assert 1 < base < 50            # the first 64 of the merged streams (1 + 2 req/s on average; the flood bursts)
    probed = at_rate(cfg, 2 * base, base)
    assert probed.workload.time_scale == pytest.approx(0.5) and probed.workload.classes == cfg.workload.classes
    result = search(cfg, tmp_path)
    assert result.bracketed and result.capacity < result.failing <= 1.2 * result.capacity
    for probe in result.probes:
        assert probe.met == (probe.metrics["slo_attainment"] >= 0.9)
        assert probe.metrics["num_requests"] == 64 and {"slo_attainment_small", "slo_attainment_large"} <= set(
            probe.metrics)
    with pytest.raises(ValueError, match="capacity.slo.attainment must be in"):
        capacity_config("capacity.slo.attainment=1.5").validate()


def test_the_capacity_config_extends_run_pys_and_judges_by_the_papers_sla():
    """conf/capacity.yaml is conf/config.yaml with the capacity schema, Poisson arrivals and the paper's SLA (so
    capacity.slo.sla_g=4 is one of its rates on any hardware); sla=hardware picks the machine's."""
    from fastgen.capacity import CapacityRunConfig
    from fastgen.cli import _defaults
    from fastgen.metrics import SLAConfig
    run, cfg = compose_config([]), compose_config([], config_name="capacity")
    assert isinstance(cfg, CapacityRunConfig) and cfg.workload.arrival == "poisson" and cfg.sla == SLAConfig()
    assert (cfg.model, cfg.scheduler, cfg.kv, cfg.hardware, cfg.executor) == \
        (run.model, run.scheduler, run.kv, run.hardware, run.executor)
    assert compose_config(["sla=hardware"], config_name="capacity").sla == run.sla
    assert _defaults("capacity") == {**_defaults("config"), "schema": "capacity", "workload": "poisson",
                                     "sla": "paper"}
