"""The class-aware policies (priority, edf, vtc): exact against transformers whatever order they choose, every
request finishing once with no KV leak under preemption, VTC's fairness bound, priority preemption, edf's late
requests."""
import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgen.kv import KV_MANAGERS, make_kv_manager
from fastgen.request import Request
from fastgen.request_trace import SLO
from fastgen.sampling import SamplingParams
from fastgen.schedulers import make_scheduler
from tiny import (compose_engine, drain, drive_with_aborts, fastgen_from_hf, reference_greedy, scheduler_config,
                  tiny_hf_model)

POLICIES = [("priority", {}), ("edf", {}), ("edf", {"late": "drop"}), ("vtc", {}), ("andes", {"max_preemptions": 1})]
TENANTS = ["a", "b", "c"]


@functools.lru_cache(maxsize=None)
def tiny(family):
    hf = tiny_hf_model(family, seed=0)
    return hf, fastgen_from_hf(hf)


@functools.lru_cache(maxsize=None)
def workload(family, lens=(5, 40, 17, 90, 3, 60, 1), news=(12, 7, 20, 5, 30, 9, 6)):
    hf, _ = tiny(family)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in lens]
    return prompts, news, [reference_greedy(hf, p, n) for p, n in zip(prompts, news)]


def add_classed(eng, prompts, news):
    """Requests of mixed classes: priorities 2, 1, 0, ..., three tenants, loose SLOs on some (never late)."""
    return [eng.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True), priority=(2 - i) % 3,
                            tenant=TENANTS[i % 3], slo=SLO(ttft_s=1000.0 + i, tpot_s=100.0) if i % 2 else None)
            for i, (p, n) in enumerate(zip(prompts, news))]


@pytest.mark.parametrize("policy, num_blocks, mode", [
    *((p, n, "recompute") for p in ("priority", "edf", "vtc", "andes") for n in (64, 9)),
    ("priority", 9, "swap"), ("andes", 9, "swap")])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_equals_transformers_for_each_class_policy(family, policy, num_blocks, mode):
    """Order (and, with 9 blocks of 16, preemption, by recompute or by swapping KV to host memory and back)
    changes; outputs do not."""
    prompts, news, ref = workload(family)
    eng, _, manager = compose_engine(tiny(family)[1], policy, "blocked", num_blocks, 16, token_budget=32,
                                     preemption_mode=mode, swap_blocks=12)
    steps = []
    eng.add_step_observer(steps.append)
    ids = add_classed(eng, prompts, news)
    finished = drain(eng)
    assert [finished[i].output_token_ids for i in ids] == ref
    assert eng.snapshot().kv_blocks_free == num_blocks and manager.num_free_host_blocks == 12
    # the host pool always has room here: in swap mode every preemption swaps (and is swapped back in)
    assert all(bool(s.num_swapped_blocks) == (mode == "swap") for s in steps if s.num_preempted)
    if policy == "priority" and num_blocks == 9:
        assert any(s.num_preempted for s in steps)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example, HealthCheck.data_too_large])
@given(data=st.data(), policy=st.sampled_from(POLICIES + [("splitfuse", {})]),
       mode=st.sampled_from(["recompute", "swap"]))
def test_property_every_request_finishes_once_with_its_tokens_and_kv_drains(data, policy, mode):
    """Recompute and swap preemption (a host pool of 0 to 8 blocks: when it is full, preemption recomputes)."""
    name, knobs = policy
    _, model = tiny("llama")
    block_size = data.draw(st.sampled_from([4, 8, 16]))
    lens = data.draw(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=8))
    need = max(-(-(p + n - 1) // block_size) for p, n in lens)
    num_blocks = data.draw(st.integers(need, need + 6))
    budget = data.draw(st.integers(1, 64))
    host = data.draw(st.integers(0, 8))
    eng, _, manager = compose_engine(model, name, "blocked", num_blocks, block_size, token_budget=budget,
                                     preemption_mode=mode, swap_blocks=host, **knobs)

    def request_class():
        slo = data.draw(st.sampled_from([None, SLO(ttft_s=1e-4), SLO(ttft_s=100.0, tpot_s=1e-4),
                                         SLO(ttft_s=100.0, tpot_s=100.0)]))
        return {"slo": slo, "priority": data.draw(st.integers(-2, 2)), "tenant": data.draw(st.sampled_from(TENANTS))}
    ids, aborted, finished = drive_with_aborts(eng, manager, lens, data, request_kwargs=request_class)
    for i, (p, n) in enumerate(lens):
        if ids[i] not in aborted:
            req = finished[ids[i]]
            if req.finish_reason == "deadline":
                assert knobs.get("late") == "drop" and len(req.output_token_ids) < n
            else:
                assert len(req.output_token_ids) == n and req.finish_reason == "length"
    assert eng.snapshot().kv_blocks_free == num_blocks and not manager.tables
    assert manager.num_free_host_blocks == host and not manager.swapped


# -- policy shapes, on the scheduler alone (each step's sampled token is faked: no model) ------------------------------
def bare(policy, num_blocks=64, block_size=16, host_blocks=0, **knobs):
    sched = make_scheduler(scheduler_config(policy, **knobs),
                           make_kv_manager(KV_MANAGERS.config("blocked", block_size=block_size, num_blocks=num_blocks),
                                           num_blocks, host_blocks))
    now = [0.0]
    sched.attach(4096, lambda: now[0])
    return sched, now


def request(rid, prompt, new, t=0.0, **cls):
    return Request(str(rid), [1] * prompt, SamplingParams(max_new_tokens=new, ignore_eos=True), t, **cls)


def step(sched):
    """One step as the engine takes it: the chunks that reach their request's end sample a token; requests that
    have all their tokens finish. Returns the plan."""
    out = sched.plan_step()
    ended, out.sampled = [], []
    for c in out.chunks:
        req = c.request
        if c.num_tokens == req.num_pending_tokens:
            out.sampled.append(req)
            req.output_token_ids.append(1)
            req.trace.token_times.append(sched.clock())
            if len(req.output_token_ids) >= req.sampling.max_new_tokens:
                ended.append(req)
    sched.update_from_output(out, (), ended)
    return out


def test_priority_an_urgent_arrival_into_a_full_engine_preempts_the_least_urgent_running_one():
    sched, _ = bare("priority", num_blocks=8, block_size=16, token_budget=256)
    low = [request(i, 30, 50, t=i, priority=5 + (i == 1)) for i in range(4)]      # each takes 2 of the 8 blocks
    for r in low:
        sched.add_request(r)
    step(sched)
    assert len(sched.running) == 4 and sched.kv.num_free_blocks == 0
    urgent = request("u", 20, 5, t=10, priority=0)
    sched.add_request(urgent)
    out = step(sched)
    assert out.preempted == [low[1]]            # priority 6: the least urgent (the others are 5)
    assert out.chunks[0].request is urgent and urgent in sched.running
    assert low[1] in sched.waiting and low[1].num_preemptions == 1


def test_swap_preemption_moves_the_victims_blocks_to_the_host_pool_and_recomputes_when_it_is_full():
    sched, _ = bare("priority", num_blocks=8, block_size=16, host_blocks=3, token_budget=256, preemption_mode="swap")
    low = [request(i, 30, 50, t=i, priority=5) for i in range(4)]                 # each takes 2 of the 8 blocks
    for r in low:
        sched.add_request(r)
    step(sched)
    held = list(sched.kv.tables[low[3].seq_id])
    sched.add_request(request("u1", 20, 5, t=10, priority=0))
    out = step(sched)
    assert out.preempted == [low[3]] and [s.device for s in out.swap_out] == held and not out.swap_in
    assert sched.kv.is_swapped(low[3]) and low[3].num_computed_tokens == 30      # its KV kept, on the host
    sched.add_request(request("u2", 20, 5, t=11, priority=0))
    out = step(sched)                             # the host pool has 1 block left: low[2] is recomputed
    assert out.preempted == [low[2]] and not out.swap_out and low[2].num_computed_tokens == 0
    while low[3] not in sched.running:
        out = step(sched)
    assert [s.host for s in out.swap_in] == [0, 1] and low[3].num_computed_tokens == 31
    assert sched.kv.num_free_host_blocks == 3     # once the step that read them is planned


def test_priority_order_is_priority_then_arrival():
    sched, _ = bare("priority", token_budget=8)
    reqs = [request(0, 8, 2, t=0, priority=1), request(1, 8, 2, t=1, priority=0), request(2, 8, 2, t=2, priority=0)]
    for r in reqs:
        sched.add_request(r)
    assert [c.request for c in step(sched).chunks] == [reqs[1]]
    assert [c.request for c in step(sched).chunks] == [reqs[1], reqs[2]]


def test_edf_serves_the_earliest_deadline_first_and_drops_late_requests():
    sched, now = bare("edf", token_budget=9, late="drop")
    loose = request("loose", 8, 3, t=0.0, slo=SLO(ttft_s=5.0))
    tight = request("tight", 8, 3, t=0.5, slo=SLO(ttft_s=1.0))
    none = request("none", 8, 3, t=0.0)
    for r in (none, loose, tight):
        sched.add_request(r)
    now[0] = 0.6
    assert [c.request for c in step(sched).chunks][0] is tight
    now[0] = 6.0                                 # loose's first token can no longer come by 5.0
    out = step(sched)
    assert out.dropped == [(loose, "deadline")] and loose not in sched.waiting
    assert {c.request.request_id for c in out.chunks} == {"tight", "none"}   # no TPOT target: by arrival


def test_edf_serve_last_runs_late_requests_after_those_on_time():
    sched, now = bare("edf", token_budget=8)
    late = request("late", 8, 2, t=0.0, slo=SLO(ttft_s=1.0))
    ontime = request("ontime", 8, 2, t=0.0, slo=SLO(ttft_s=50.0))
    for r in (late, ontime):
        sched.add_request(r)
    now[0] = 2.0
    assert [c.request for c in step(sched).chunks] == [ontime]


def test_vtc_lifts_a_newly_backlogged_tenant_to_the_smallest_backlogged_counter():
    sched, _ = bare("vtc", token_budget=40)
    sched.add_request(request(0, 40, 4, tenant="a"))
    sched.add_request(request(1, 40, 4, tenant="a"))
    step(sched)                                   # a's first prompt: 40 x 1 + its first token x 2
    assert sched.counters["a"] == 42
    sched.add_request(request(2, 8, 4, tenant="b"))
    assert sched.counters["b"] == 42             # lifted to a's (a still has a waiting request)
    step(sched)                 # a's decode (+2); a and b tie at 42, a first by name: its second prompt (+40)
    assert sched.counters == {"a": 84, "b": 42} and [r.tenant for r in sched.waiting] == ["b"]
    step(sched)                                   # b, the smallest counter, leaves the queue last (+8, +2)
    assert not sched.waiting and sched.counters["b"] == 52
    sched.add_request(request(3, 8, 4, tenant="c"))
    assert sched.counters["c"] == 52             # queue empty: lifted to the tenant that left it last


def test_vtc_bound_holds_for_two_continuously_backlogged_tenants():
    """Tenant a sends short requests, b long ones; both always have requests waiting. Over any interval of the
    run their weighted services (w_input per prompt token at admission, w_output per output token) differ by at
    most 2 x max(w_input x L_input, w_output x M), the paper's bound (M: tokens the KV pool holds)."""
    num_blocks, block_size, w_in, w_out = 32, 16, 1.0, 2.0
    shapes = {"a": (16, 8), "b": (120, 40)}
    sched, _ = bare("vtc", num_blocks=num_blocks, block_size=block_size, token_budget=64, w_input=w_in,
                    w_output=w_out)
    fcfs, _ = bare("splitfuse", num_blocks=num_blocks, block_size=block_size, token_budget=64)
    bound = 2 * max(w_in * max(p for p, _ in shapes.values()), w_out * num_blocks * block_size)
    for policy in (sched, fcfs):
        count = {"a": 0, "b": 0}

        def refill():
            for t, (p, n) in shapes.items():
                while sum(r.tenant == t for r in policy.waiting) < 3:
                    policy.add_request(request(f"{t}{count[t]}", p, n, tenant=t))
                    count[t] += 1
        served, gaps, admitted = {"a": 0.0, "b": 0.0}, [], set()
        for _ in range(1500):
            refill()
            out = step(policy)
            for req in (c.request for c in out.chunks if c.request.seq_id not in admitted):
                admitted.add(req.seq_id)
                served[req.tenant] += w_in * len(req.prompt_token_ids)
            for req in out.sampled:
                served[req.tenant] += w_out
            gaps.append(served["a"] - served["b"])
        spread = max(gaps) - min(gaps)
        if policy is sched:
            assert spread <= bound, (spread, bound)
            assert min(served.values()) > 5 * bound         # a long run: the bound is not met by running little
        else:
            assert spread > bound                           # FCFS splits by request, not by service


def test_andes_serves_a_request_whose_first_token_is_due_before_one_ahead_of_its_timeline():
    sched, now = bare("andes", token_budget=8, horizon_s=1.0, expected_ttft_s=1.0, expected_tds=5.0)
    ahead = request("ahead", 4, 50, t=0.0)
    sched.add_request(ahead)
    for _ in range(3):
        step(sched)                              # at t=0 it has 3 tokens: its reader expects none before 1 s
    due = request("due", 8, 4, t=0.0)
    sched.add_request(due)
    assert [c.request for c in step(sched).chunks] == [due]        # the whole budget: ahead pauses, loses nothing
    assert [c.request for c in step(sched).chunks] == [ahead, due]  # both on schedule: by arrival


def test_andes_preempts_only_for_a_request_that_would_lose_qoe_and_at_most_max_preemptions_a_step():
    sched, now = bare("andes", num_blocks=8, block_size=16, token_budget=256, max_preemptions=1)
    running = [request(i, 30, 50, t=0.0) for i in range(4)]          # each takes 2 of the 8 blocks
    for r in running:
        sched.add_request(r)
    step(sched)
    assert sched.kv.num_free_blocks == 0
    late = request("late", 20, 4, t=0.0, slo=SLO(ttft_s=5.0))
    sched.add_request(late)
    assert not step(sched).preempted and late in sched.waiting    # first token due at 5 s: waiting costs nothing
    now[0] = 4.5            # due within the horizon: a short response loses more QoE per token than the long ones
    out = step(sched)
    assert out.preempted == [running[-1]] and late in sched.running    # the least dense: the newest of equals


def test_qoe_is_the_area_ratio_of_the_read_timeline_to_the_expected_one():
    from fastgen.qoe import Expectation, qoe
    expect = Expectation.of(SLO(ttft_s=1.0, tpot_s=1.0))
    assert qoe(0.0, [1.0, 2.0, 3.0], expect) == pytest.approx(1.0)        # on schedule
    assert qoe(0.0, [0.5, 0.6, 0.7], expect) == pytest.approx(1.0)        # early: buffered, read at 1 tok/s
    assert qoe(0.0, [2.0, 3.0, 4.0], expect) == pytest.approx(6 / 9)      # 1 s late: areas 3+2+1 over 4+3+2
    assert qoe(0.0, [1.0, 4.0, 4.0], expect) == pytest.approx(4 / 6)      # a 2 s stall mid-stream: 3+1+0 over 3+2+1


def drive(sched, now, reqs, dt=0.02, max_steps=2000) -> int:
    """Steps `sched` on a clock advancing dt a step, adding reqs as they arrive, until all finish; the preemptions."""
    pending, preempted = sorted(reqs, key=lambda r: r.arrival_time), 0
    for _ in range(max_steps):
        if not pending and not sched.has_unfinished():
            return preempted
        while pending and pending[0].arrival_time <= now[0]:
            sched.add_request(pending.pop(0))
        preempted += len(step(sched).preempted)
        now[0] += dt
    raise AssertionError(f"not finished in {max_steps} steps")


@pytest.mark.parametrize("cap", [1.0, 1e9])
def test_edf_does_not_thrash_in_a_tight_pool_with_its_preemption_cap(cap):
    """12 requests with tight deadlines in a 10-block pool: deadlines move as requests wait, so uncapped EDF preempts
    over and over (about 16 a request); at the default cap (1 a request received) preemptions stay bounded."""
    sched, now = bare("edf", num_blocks=10, block_size=16, token_budget=64, preemption_cap=cap)
    reqs = [request(i, 24 + 5 * (i % 3), 30, t=0.1 * i, slo=SLO(ttft_s=0.5 + 0.2 * (i % 4), tpot_s=0.05 * (1 + i % 2)))
            for i in range(12)]
    preempted = drive(sched, now, reqs)
    assert all(len(r.output_token_ids) == 30 for r in reqs) and sched.kv.num_free_blocks == 10
    assert preempted <= 2 * len(reqs) if cap == 1.0 else preempted > 8 * len(reqs)
