"""pytest-benchmark: one scheduling decision with 256 running and 1,000 waiting requests.

Runs as a plain test by default (benchmarks disabled); time it with
`python -m pytest tests/test_bench_scheduler.py --benchmark-enable`, compare with `--benchmark-compare`."""
import pytest

from fastgen.kv import KV_MANAGERS, make_kv_manager
from fastgen.request import Request
from fastgen.sampling import SamplingParams
from fastgen.schedulers import make_scheduler
from tiny import scheduler_config


def busy_scheduler(name: str):
    """256 requests mid-decode (prompt 500, 20 tokens out) and 1,000 prompts waiting."""
    kv = make_kv_manager(KV_MANAGERS.config("blocked", block_size=64), num_blocks=8192)
    sched = make_scheduler(scheduler_config(name, token_budget=768, max_seqs=512, batch_size=256), kv)
    for i in range(256):
        req = Request(f"r{i}", list(range(500)), SamplingParams(max_new_tokens=200), arrival_time=float(i))
        sched.add_request(req)
        sched.admit(req)
        req.output_token_ids = list(range(20))
        kv.allocate(req, 519)
        req.num_computed_tokens = 519
    for i in range(1000):
        sched.add_request(Request(f"w{i}", list(range(1200)), SamplingParams(max_new_tokens=60),
                                  arrival_time=1000.0 + i))
    return sched


@pytest.mark.parametrize("name", ["splitfuse", "continuous", "orca", "sarathi"])
def test_one_scheduling_decision(benchmark, name):
    plan = benchmark.pedantic(lambda s: s.schedule(), setup=lambda: ((busy_scheduler(name),), {}), rounds=20)
    assert plan.num_tokens >= 256 or name == "continuous"
    if name == "splitfuse":
        assert plan.num_tokens == 768 and sum(1 for c in plan.chunks if c.request.is_decode) == 256
