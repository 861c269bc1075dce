"""Prefix caching and KV sharing: exact outputs with caching on and off for every scheduler (prefixes ending
mid-block, at a block boundary, equal to the whole prompt; eviction and preemption in a tiny pool), forks (n,
best_of) with copy-on-write, the pool's invariants under random traffic, what the simulator charges, the
shared-prefix workload and the metrics."""
import contextlib
import functools
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgen.compose import build_engine
from fastgen.conf import compose_config
from fastgen.compose import EngineConfig
from fastgen.engine import LLMEngine
from fastgen.executors import make_executor
from fastgen.executors.real import RealExecutor
from fastgen.kv import KV_MANAGERS, make_kv_manager
from fastgen.kv.allocator import BlockAllocator
from fastgen.metrics import summarize
from fastgen.request import Request, fork_seed
from fastgen.sampling import SamplingParams
from fastgen.schedulers import SchedulerOutput, make_scheduler
from fastgen.step_stats import StepStats
from fastgen.workloads import ClosedLoopArrivals, ConversationArrivals, WorkloadConfig, build_workload
from tiny import Built, drain, fastgen_from_hf, scheduler_config, tiny_hf_model

SCHEDULER_NAMES = ["splitfuse", "continuous", "orca", "sarathi", "static", "vllm-0.2"]
BLOCK = 8


@functools.lru_cache(maxsize=None)
def tiny(family="llama"):
    hf = tiny_hf_model(family, seed=0)
    return hf, fastgen_from_hf(hf)


@functools.lru_cache(maxsize=None)
def reference(family: str, prompt: tuple, n: int) -> list[int]:
    from tiny import reference_greedy
    return reference_greedy(tiny(family)[0], list(prompt), n)


def compose(scheduler="splitfuse", caching=True, num_blocks=64, block_size=BLOCK, family="llama", kv="blocked",
            **knobs) -> Built:
    knobs = {"token_budget": 32, "chunk_size": 16, "batch_size": 3, **knobs}
    kv_knobs = {"prefix_caching": caching} if kv == "blocked" else {}
    cfg = EngineConfig(scheduler=scheduler_config(scheduler, **knobs),
                       kv=KV_MANAGERS.config(kv, block_size=block_size, num_blocks=num_blocks, **kv_knobs))
    executor = make_executor(cfg, tiny(family)[1])
    manager = make_kv_manager(cfg.kv, executor.num_kv_blocks)
    policy = make_scheduler(cfg.scheduler, manager)
    return Built(LLMEngine(executor, policy), policy, manager)


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(0, 211, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(n):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def run_waves(built: Built, waves, steps: list | None = None) -> dict[str, Request]:
    """Adds each wave of (prompt, max_new_tokens) after the previous one has drained; the finished requests."""
    if steps is not None:
        built.engine.add_step_observer(steps.append)
    finished, ids = {}, []
    for wave in waves:
        ids += [built.engine.add_request(p, greedy(n)) for p, n in wave]
        finished.update(drain(built.engine))
    return [finished[i] for i in ids]


def assert_pool_drained(kv):
    assert not kv.tables and kv.num_free_blocks == kv.num_blocks
    if hasattr(kv, "allocator"):
        assert kv.allocator.num_used == 0 and not any(kv.allocator.refs)


# Prefixes shared with the first wave's prompt A = P[:37] + 5 tokens (block size 8): B shares 37 tokens (ends
# mid-block: 4 blocks reusable), C shares 32 (ends at a block boundary), D is A itself (whole prompt cached but for
# its partial last block), E is P[:32], a whole prompt of 4 full blocks all cached (its last token is recomputed
# into a copy of its last block).
P = tokens(1, 40)
A = P[:37] + tokens(2, 5)
WAVES = [[(A, 6)], [(P[:37] + tokens(3, 9), 7), (P[:32] + tokens(4, 3), 5), (A, 6), (P[:32], 8)]]


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_greedy_with_prefix_caching_equals_caching_off_and_transformers(scheduler):
    want = [reference("llama", tuple(p), n) for wave in WAVES for p, n in wave]
    runs = {}
    for caching in (False, True):
        steps = []
        built = compose(scheduler, caching)
        reqs = run_waves(built, WAVES, steps)
        assert [r.output_token_ids for r in reqs] == want
        assert_pool_drained(built.kv)
        runs[caching] = steps
    hits = sum(s.prefix_hit_tokens for s in runs[True])
    assert hits == 32 + 32 + 40 + 31          # B, C, D, E (E: all but its last token)
    assert sum(s.prefix_hit_tokens for s in runs[False]) == 0
    # every policy spends its budget only on what is not cached
    assert sum(s.num_tokens for s in runs[True]) == sum(s.num_tokens for s in runs[False]) - hits
    assert sum(s.num_block_copies for s in runs[True]) == 1    # E's last block
    assert sum(s.prefix_query_tokens for s in runs[True]) == sum(len(p) for w in WAVES for p, _ in w)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "opt"])
def test_prefix_caching_exact_for_other_families(family):
    """Sliding windows (mistral), biases (qwen2), learned positions (opt) read cached blocks the same way."""
    want = [reference(family, tuple(p), n) for wave in WAVES for p, n in wave]
    built = compose("splitfuse", True, family=family)
    steps = []
    assert [r.output_token_ids for r in run_waves(built, WAVES, steps)] == want
    assert sum(s.prefix_hit_tokens for s in steps) > 0


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_eviction_and_preemption_in_a_tiny_pool_stay_exact(scheduler):
    """8 blocks of 8 slots for requests that share a 20-token prefix and need 3-5 blocks each: cached blocks are
    evicted to make room, running requests are preempted and come back to what is left of their prefix."""
    prompts = [P[:20] + tokens(10 + i, 3 + 2 * i) for i in range(6)]
    news = [12, 14, 10, 16, 11, 9]
    waves = [[(prompts[0], news[0])], list(zip(prompts[1:], news[1:])), [(prompts[2], 5)]]
    want = [reference("llama", tuple(p), n) for wave in waves for p, n in wave]
    built = compose(scheduler, True, num_blocks=8, batch_size=5, token_budget=64)
    steps = []
    reqs = run_waves(built, waves, steps)
    assert [r.output_token_ids for r in reqs] == want
    assert sum(s.kv_evictions for s in steps) > 0
    assert sum(s.prefix_hit_tokens for s in steps) > 0
    if scheduler != "static":     # static admits only what fits whole: it never preempts
        assert sum(r.num_preemptions for r in reqs) > 0
    assert_pool_drained(built.kv)


def test_a_preempted_request_comes_back_to_its_own_cached_blocks():
    built = compose("splitfuse", True)
    sched, kv = built.scheduler, built.kv
    built.engine.add_request(tokens(5, 29), greedy(4), "r")
    built.engine.step()                  # 29 prompt tokens (budget 32): 3 full blocks computed and registered
    (running,) = sched.running
    before = list(kv.block_table(running))
    sched.preempt(running, SchedulerOutput())
    assert running.num_computed_tokens == 24 and kv.allocator.num_cached == 3
    steps = []
    built.engine.add_step_observer(steps.append)
    built.engine.step()
    assert kv.block_table(running)[:3] == before[:3] and steps[0].prefix_hit_tokens == 24
    assert steps[0].num_tokens == 29 + 1 - 24           # the rest of the prompt and its first token


def test_eviction_is_least_recently_released_and_only_when_no_empty_block_is_left():
    pool = BlockAllocator(4)
    a, b = pool.allocate(2)
    assert pool.register(a, "ka") and pool.register(b, "kb") and not pool.register(b, "kc")
    pool.free([b, a])                                        # b released first: evicted first
    assert (pool.num_free, pool.num_cached, pool.num_used) == (4, 2, 0)
    assert pool.allocate(2) and pool.num_evictions == 0      # the two empty blocks go first
    assert pool.allocate(1) == [b] and pool.lookup("kb") is None and pool.num_evictions == 1
    pool.acquire(pool.lookup("ka"))                          # a cache hit takes the block back
    assert pool.num_free == 0 and pool.refs[a] == 1
    with pytest.raises(MemoryError):
        pool.allocate(1)
    pool.free([a])
    with pytest.raises(ValueError, match="nobody references"):
        pool.free([a])


def test_partial_blocks_are_never_shared_and_caching_off_finds_nothing():
    on, off = compose(caching=True), compose(caching=False)
    for built in (on, off):
        run_waves(built, [[(P[:20], 1)]])         # 20 tokens: 2 full blocks, a partial one
    probe = Request("p", P[:20] + [1, 2, 3], greedy(1), 0.0)
    assert on.kv.cached_prefix(probe) == 16 and off.kv.cached_prefix(probe) == 0
    assert on.kv.allocator.num_cached == 2 and off.kv.allocator.num_cached == 0


# -- forks ----------------------------------------------------------------------------------------------------
def run_outputs(built: Built, prompt, **sampling):
    built.engine.add_request(prompt, SamplingParams(max_new_tokens=10, ignore_eos=True, **sampling))
    outputs, steps = [], []
    built.engine.add_step_observer(steps.append)
    while built.engine.has_unfinished():
        outputs += built.engine.step()
    assert_pool_drained(built.kv)
    return outputs, steps


def sequences(outputs):
    return {o.index: o.request for o in outputs if o.finished}


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("caching", [False, True])
def test_greedy_forks_share_the_prompt_and_copy_only_the_last_partial_block(scheduler, caching):
    prompt = P[:19]                                   # 2 full blocks and 3 tokens of a third
    outputs, steps = run_outputs(compose(scheduler, caching), prompt, n=4)
    seqs = sequences(outputs)
    assert sorted(seqs) == [0, 1, 2, 3]
    assert all(s.output_token_ids == reference("llama", tuple(prompt), 10) for s in seqs.values())
    assert sum(s.num_tokens for s in steps) == 19 + 4 * 9              # the prompt ran once
    assert sum(s.num_block_copies for s in steps) == 3                 # the last holder writes in place
    streamed = [o for o in outputs if o.index == 2]
    assert [t for o in streamed for t in o.new_token_ids] == seqs[2].output_token_ids


def test_forks_of_a_block_aligned_prompt_copy_nothing():
    _, steps = run_outputs(compose(), P[:16], n=3)
    assert sum(s.num_block_copies for s in steps) == 0


@pytest.mark.parametrize("scheduler", ["splitfuse", "orca"])
def test_sampled_forks_are_independent_reproducible_and_each_a_request_of_its_own_seed(scheduler):
    """Choice k of a request seeded s samples exactly what a lone request seeded fork_seed(s, k) does: its
    noise is its own, and the KV it shares (and copies) is the KV it would have computed."""
    prompt = P[:21]
    first, _ = run_outputs(compose(scheduler), prompt, n=4, temperature=1.0, seed=7)
    again, _ = run_outputs(compose(scheduler), prompt, n=4, temperature=1.0, seed=7)
    seqs = {k: r.output_token_ids for k, r in sequences(first).items()}
    assert seqs == {k: r.output_token_ids for k, r in sequences(again).items()}
    assert len({tuple(s) for s in seqs.values()}) == 4
    for k in range(4):
        alone, _ = run_outputs(compose(scheduler), prompt, temperature=1.0, seed=fork_seed(7, k))
        assert sequences(alone)[0].output_token_ids == seqs[k]


def test_the_servers_n_forks_in_the_engine_and_computes_the_prompt_once():
    """An OpenAI request with n=4 is one engine request whose choices fork at the first token: the 37-token prompt
    runs through the model once (not 4 times), then each choice decodes on its own."""
    from starlette.testclient import TestClient

    from fastgen.serve import ServeConfig, create_app
    built = compose()
    steps = []
    built.engine.add_step_observer(steps.append)
    prompt = list(range(5, 42))
    app = create_app(built.engine, ServeConfig(served_model_name="tiny"))
    with TestClient(app, base_url="http://localhost") as client:
        reply = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 3, "n": 4,
                                                     "temperature": 1.0, "seed": 3, "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    choices = reply.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]        # (a tokenizer-less model: no text)
    assert sum(s.num_tokens for s in steps) == len(prompt) + 4 * 2
    assert sum(s.num_block_copies for s in steps) == 3        # the partly filled last block, once per other fork
    assert_pool_drained(built.kv)


def test_prompt_logprobs_are_computed_even_where_the_prefix_is_cached():
    """A cached prefix gives no logits: a request asking for prompt logprobs skips only what it has scored, so its
    prompt logprobs are whole and equal to those of an engine without caching."""
    prompt = list(range(3, 3 + 2 * BLOCK + 5))
    results = {}
    for caching in (False, True):
        built = compose(caching=caching)
        built.engine.add_request(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True))
        drain(built.engine)                        # the prompt's full blocks are now cached (caching=True)
        rid = built.engine.add_request(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=1))
        results[caching] = drain(built.engine)[rid].prompt_logprobs
    assert len(results[True]) == len(prompt) - 1
    assert [e.token_id for e in results[True]] == prompt[1:]
    np.testing.assert_allclose([e.logprob for e in results[True]], [e.logprob for e in results[False]], atol=1e-5)


def transformers_logprob(prompt, output):
    hf, _ = tiny("llama")
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + output])).logits[0, len(prompt) - 1:-1].float()
    return float(logits.log_softmax(-1).gather(-1, torch.tensor(output)[:, None]).sum())


@pytest.mark.parametrize("caching", [False, True])
def test_best_of_keeps_the_n_most_likely_and_their_logprobs_match_transformers(caching):
    """Four sampled sequences share a partly filled block; the cumulative logprob of each returned sequence is the
    model's (teacher-forced by transformers): a copy-on-write that let one fork overwrite another's KV would
    change them."""
    prompt = P[:21]
    outputs, _ = run_outputs(compose("splitfuse", caching), prompt, n=2, best_of=4, temperature=1.0, seed=3)
    assert [o.index for o in outputs] == [0, 1] and all(o.finished and len(o.new_token_ids) == 10 for o in outputs)
    every = {}
    for k in range(4):
        alone, _ = run_outputs(compose("splitfuse", caching), prompt, temperature=1.0, seed=fork_seed(3, k))
        out = sequences(alone)[0].output_token_ids
        every[tuple(out)] = transformers_logprob(prompt, out)
    best = sorted(every, key=every.get, reverse=True)[:2]
    assert [tuple(o.new_token_ids) for o in outputs] == best
    for o in outputs:
        assert o.request.cumulative_logprob == pytest.approx(every[tuple(o.new_token_ids)], abs=1e-3)


@pytest.mark.parametrize("scheduler", ["splitfuse", "continuous"])
def test_forks_preempted_in_a_tiny_pool_stay_exact(scheduler):
    """Two requests of three sequences each in 6 blocks: sequences are preempted and come back (to what is
    cached of their prefix) until all finish, each with the reference tokens."""
    built = compose(scheduler, True, num_blocks=6, batch_size=5, token_budget=64)
    prompts = {built.engine.add_request(p, SamplingParams(max_new_tokens=14, ignore_eos=True, n=3)): p
               for p in (P[:13], P[:13] + tokens(20, 6))}
    outputs = []
    while built.engine.has_unfinished():
        outputs += built.engine.step()
    done = [o.request for o in outputs if o.finished]
    assert sorted((r.request_id, r.index) for r in done) == sorted((i, k) for i in prompts for k in range(3))
    assert all(r.output_token_ids == reference("llama", tuple(prompts[r.request_id]), 14) for r in done)
    assert sum(r.num_preemptions for r in done) > 0
    assert_pool_drained(built.kv)


def test_forks_without_kv_sharing_recompute_and_stay_exact():
    """kv=contiguous cannot share blocks: the other sequences wait and compute the prompt again."""
    outputs, steps = run_outputs(compose("orca", kv="contiguous", num_blocks=16), P[:19], n=2)
    seqs = sequences(outputs)
    assert [seqs[k].output_token_ids for k in (0, 1)] == [reference("llama", tuple(P[:19]), 10)] * 2
    assert sum(s.num_tokens for s in steps) > 19 + 2 * 9


def test_abort_releases_every_fork_and_n_is_validated():
    built = compose()
    rid = built.engine.add_request(P[:19], SamplingParams(max_new_tokens=10, ignore_eos=True, n=3))
    built.engine.step()
    built.engine.step()
    assert len(built.kv.tables) == 3
    assert built.engine.abort(rid).finish_reason == "abort" and not built.engine.has_unfinished()
    assert_pool_drained(built.kv)
    with pytest.raises(ValueError, match=r"invalid best_of: must be >= n=3"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match=r"invalid n: must be in \[1, inf\], got 0"):
        SamplingParams(n=0)
    from fastgen.pipeline import Pipeline
    with pytest.raises(ValueError, match="one output per prompt"):
        Pipeline(built.engine)([[1, 2, 3]], max_new_tokens=2, n=2)


# -- invariants under random traffic ----------------------------------------------------------------------------
class WriteChecker:
    """Wraps the real executor's execute: at every step, the blocks each chunk writes are its own alone (one
    reference, not findable in the cache), no two chunks write the same block, and copies go into blocks that
    nobody else holds."""

    def __init__(self, kv):
        self.kv, self.steps = kv, 0

    @contextlib.contextmanager
    def installed(self):
        inner = RealExecutor.execute
        checker = self

        def execute(executor, chunks, copies=()):
            checker.check(chunks, copies)
            return inner(executor, chunks, copies)
        with mock.patch.object(RealExecutor, "execute", execute):
            yield self

    def check(self, chunks, copies):
        self.steps += 1
        a, size = self.kv.allocator, self.kv.block_size
        written = [b for c in chunks for b in c.block_table[c.start // size:(c.start + len(c.token_ids) - 1) // size + 1]]
        assert len(written) == len(set(written)), "two sequences write the same KV block"
        for b in written:
            assert a.refs[b] == 1 and not a.is_registered(b), f"block {b} is written while shared or cached"
        assert {dst for _, dst in copies} <= set(written)


def check_pool(kv):
    """free + cached + used == size; a block's references are exactly the live tables holding it."""
    a = kv.allocator
    held = np.zeros(a.num_blocks, dtype=int)
    for table in kv.tables.values():
        np.add.at(held, table, 1)
    assert held.tolist() == a.refs, "a block's reference count differs from the tables holding it"
    empty, cached = set(a._empty), set(a._cached)
    assert len(empty) + len(cached) + int((held > 0).sum()) == a.num_blocks
    assert not (empty | cached) & set(np.flatnonzero(held).tolist()), "a referenced block is free"
    assert all(a.is_registered(b) for b in cached) and not any(a.is_registered(b) for b in empty)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(data=st.data(), scheduler=st.sampled_from(SCHEDULER_NAMES), block_size=st.sampled_from([4, 8]))
def test_property_references_and_pool_stay_consistent(data, scheduler, block_size):
    prefixes = [P[:k] for k in data.draw(st.lists(st.integers(0, 24), min_size=1, max_size=3), label="prefixes")]
    specs = data.draw(st.lists(st.tuples(st.integers(0, len(prefixes) - 1), st.integers(0, 9), st.integers(1, 8),
                                         st.sampled_from([1, 1, 2, 3])), min_size=1, max_size=7), label="requests")
    prompts = [(prefixes[i] + tokens(100 + j, s))[:40] or [5] for j, (i, s, _, _) in enumerate(specs)]
    need = max(-(-(len(p) + n - 1) // block_size) for p, (_, _, n, _) in zip(prompts, specs))
    num_blocks = data.draw(st.integers(need + 1, need + 10), label="num_blocks")
    built = compose(scheduler, True, num_blocks=num_blocks, block_size=block_size,
                    token_budget=data.draw(st.integers(4, 48), label="budget"), batch_size=data.draw(st.integers(1, 4)))
    pending = list(zip(prompts, specs))
    live, steps = {}, []
    built.engine.add_step_observer(steps.append)
    with WriteChecker(built.kv).installed() as checker:
        while pending or built.engine.has_unfinished():
            if pending and (not built.engine.has_unfinished() or data.draw(st.booleans())):
                prompt, (_, _, new, n) = pending.pop(0)
                live[built.engine.add_request(prompt, SamplingParams(max_new_tokens=new, ignore_eos=True, n=n))] = n
            if live and data.draw(st.integers(0, 7)) == 0:
                built.engine.abort(data.draw(st.sampled_from(sorted(live))))
            if built.engine.has_unfinished():
                built.engine.step()
            check_pool(built.kv)
    assert checker.steps == len(steps)
    assert_pool_drained(built.kv)


# -- the simulator, the workload, metrics and config ---------------------------------------------------------------
def test_the_simulator_charges_only_uncached_tokens():
    cfg = compose_config(["executor=simulated", "hardware=a100-80gb", "model.source=llama-2-7b", "kv.num_blocks=400",
                          "kv.block_size=16"])
    second = {}
    for caching in (False, True):
        cfg.kv.prefix_caching = caching
        engine = build_engine(cfg)
        shared = list(range(1000, 3000))
        engine.add_request(shared + [1], greedy(1))
        drain(engine)
        steps = []
        engine.add_step_observer(steps.append)
        engine.add_request(shared + [2, 3], greedy(1))
        drain(engine)
        second[caching] = steps
    assert [s.num_tokens for s in second[True]] == [2] and sum(s.num_tokens for s in second[False]) == 2002
    assert sum(s.forward_s for s in second[True]) < sum(s.forward_s for s in second[False]) / 10


def test_benchmark_of_the_shared_prefix_workload_writes_hit_rates(tmp_path):
    """run.py's path: workload=shared-prefix with caching on, simulated; metrics.json and steps.jsonl say what
    the cache found."""
    import json
    from fastgen.bench import run_benchmark
    overrides = ["executor=simulated", "hardware=a100-80gb", "model.source=llama-2-7b", "workload=shared-prefix",
                 "workload.num_requests=8", "workload.clients=2", "progress=false"]
    metrics = {on: run_benchmark(compose_config([*overrides, f"kv.prefix_caching={on}"]), tmp_path / str(on))
               for on in (False, True)}
    assert metrics[False]["prefix_hit_rate_tokens"] == 0 and 0.5 < metrics[True]["prefix_hit_rate_tokens"] < 0.8
    assert metrics[True]["ttft_s_p50"] < metrics[False]["ttft_s_p50"]
    saved = json.loads((tmp_path / "True" / "metrics.json").read_text())
    assert saved["prefix_hit_tokens"] == metrics[True]["prefix_hit_tokens"] > 0
    rows = [json.loads(line) for line in open(tmp_path / "True" / "steps.jsonl")]
    assert sum(r["prefix_hit_tokens"] for r in rows) == saved["prefix_hit_tokens"]


def test_shared_prefix_workload_shares_system_prompts_and_resends_history():
    cfg = WorkloadConfig(num_requests=12, arrival="closed_loop", clients=2)
    cfg.prompt.mean, cfg.output.mean = 100, 10
    cfg.prefix.share, cfg.prefix.turns, cfg.prefix.num_prefixes, cfg.prefix.think_s = 0.5, 3, 2, 0.25
    w = build_workload(cfg, 500)
    assert len(w.requests) == 18 and list(w.arrivals.warmup_indices) == list(range(6))   # 2 warm-up conversations
    prompts = [r.prompt_token_ids for r in w.requests]
    systems = {tuple(p[:50]) for p in prompts}
    assert 1 <= len(systems) <= 2
    for c in range(6):
        first, second, third = prompts[3 * c:3 * c + 3]
        assert second[:len(first)] == first and third[:len(second)] == second
        assert len(second) >= len(first) + w.requests[3 * c].max_new_tokens + 1
    # turn 2 follows turn 1's end (plus think time); a conversation's end lets its client start the next one
    arrivals = w.arrivals
    assert arrivals.initial_requests() == [(0, 0.0), (3, 0.0)]
    assert arrivals.on_finish(0, 1.0) == [(1, 1.25)]
    assert arrivals.on_finish(1, 2.0) == [(2, 2.25)] and arrivals.on_finish(2, 3.0) == []


def test_shared_prefix_config_is_checked():
    for knobs, match in [({"share": 1.0}, "share must be in"), ({"turns": 5}, "multiple of workload.prefix.turns"),
                         ({"think_s": -1.0}, "think_s")]:
        cfg = WorkloadConfig(num_requests=12)
        for k, v in knobs.items():
            setattr(cfg.prefix, k, v)
        with pytest.raises(ValueError, match=match):
            cfg.validate()
    cfg = compose_config(["workload=shared-prefix", "kv.prefix_caching=true"])
    assert cfg.kv.prefix_caching and cfg.workload.prefix.share == 0.75
    with pytest.raises(Exception, match="prefix_caching"):
        compose_config(["kv=contiguous", "kv.prefix_caching=true"])
    conv = ConversationArrivals(ClosedLoopArrivals(2, 1, np.random.default_rng(0), warmup=False), turns=2)
    assert conv.total == 4 and list(conv.warmup_indices) == []


def test_hit_rates_in_metrics_and_server_gauges():
    from fastgen.serve.prometheus import ServerMetrics
    base = dict(index=0, start=0.0, duration_s=0.1, schedule_s=0.0, prepare_s=0.0, forward_s=0.1, sample_s=0.0,
                num_tokens=10, num_seqs=1, num_prefill_tokens=10, num_preempted=0, num_running=1, num_waiting=0,
                kv_used_tokens=10, kv_reserved_tokens=16, kv_capacity_tokens=64)
    steps = [StepStats(**base, prefix_query_tokens=100, prefix_hit_tokens=75, prefix_query_blocks=12,
                       prefix_hit_blocks=9, kv_evictions=2, kv_cached_blocks=3, num_block_copies=1),
             StepStats(**base, prefix_query_tokens=100, prefix_hit_tokens=25, prefix_query_blocks=12,
                       prefix_hit_blocks=3)]
    m = summarize([], steps)
    assert m["prefix_hit_rate_tokens"] == 0.5 and m["prefix_hit_rate_blocks"] == 0.5
    assert m["kv_evictions"] == 2 and m["kv_block_copies"] == 1 and m["prefix_hit_tokens"] == 100
    assert summarize([], [base])["prefix_hit_rate_tokens"] is None
    server = ServerMetrics()
    for s in steps:
        server.observe_step(s)
    text = server.render().decode()
    assert 'fastgen_prefix_cache_hit_rate{unit="tokens"} 0.5' in text
    assert "fastgen_kv_evictions_total 2.0" in text and "fastgen_kv_blocks_cached 0.0" in text
