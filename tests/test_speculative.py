"""Speculative decoding: exact for greedy requests whatever the policy, the family, prefix caching or preemption;
rollbacks leak no KV block; rejection sampling leaves sampled tokens distributed as the target's."""
import dataclasses
import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from fastgen.bench import run_benchmark
from fastgen.compose import build_engine
from fastgen.conf import compose_config
from fastgen.sampling import Sampler, SamplingParams, SamplingRow
from fastgen.request import Request
from fastgen.sim.acceptance import MeasuredAcceptance
from fastgen.sim.shapes import model_spec
from fastgen.sim.work import BatchShape
from fastgen.speculative import PROPOSERS, make_proposer
from fastgen.speculative.ngram import lookup
from tiny import compose_engine, drain, drive_with_aborts, fastgen_from_hf, reference_greedy, tiny_hf_model

SCHEDULERS = ["splitfuse", "sarathi", "continuous", "orca", "static", "vllm-0.2", "priority", "edf", "vtc"]
NGRAM = PROPOSERS.config("ngram", num_speculative_tokens=4, min_n=1, max_n=3)


@functools.lru_cache(maxsize=None)
def tiny(family):
    hf = tiny_hf_model(family, seed=0)
    return hf, fastgen_from_hf(hf)


@functools.lru_cache(maxsize=None)
def workload(family, news=(24, 9, 30, 16, 20)):
    """Prompts that repeat themselves (so lookups find matches) and random ones, and transformers' outputs."""
    hf, _ = tiny(family)
    g = torch.Generator().manual_seed(2)        # a draw without near-ties (float32 agrees)
    phrase = torch.randint(0, 211, (12,), generator=g).tolist()
    prompts = [phrase * 3, torch.randint(0, 211, (40,), generator=g).tolist(), phrase[:7] * 2 + phrase,
               torch.randint(0, 211, (70,), generator=g).tolist(), phrase * 2]
    return prompts, news, [reference_greedy(hf, p, n) for p, n in zip(prompts, news)]


def run(built, prompts, news, **sampling):
    stats = []
    built.engine.add_step_observer(stats.append)
    ids = [built.engine.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True, **sampling))
           for p, n in zip(prompts, news)]
    finished = drain(built.engine)
    return [finished[i].output_token_ids for i in ids], stats


def engine(family, scheduler="splitfuse", speculative=NGRAM, **knobs):
    knobs = {"token_budget": 48, "chunk_size": 16, "batch_size": 3, **knobs}
    return compose_engine(tiny(family)[1], scheduler, speculative=speculative, **knobs)


FAST = ["splitfuse", "sarathi", "orca", "static", "vllm-0.2", "priority"]      # the others: -m slow


@pytest.mark.parametrize("family,scheduler", [("llama", s) for s in FAST] + [("qwen2", "splitfuse")] + [
    pytest.param(f, s, marks=pytest.mark.slow) for f in ("llama", "qwen2") for s in SCHEDULERS
    if (f, s) not in [("llama", s) for s in FAST] + [("qwen2", "splitfuse")]])
def test_greedy_with_speculation_equals_transformers_for_every_scheduler(family, scheduler):
    prompts, news, ref = workload(family)
    built = engine(family, scheduler)
    got, stats = run(built, prompts, news)
    assert got == ref
    assert sum(s.num_accepted_tokens for s in stats) > 0, "some proposals were verified and accepted"
    assert built.kv.num_free_blocks == built.kv.num_blocks


def test_greedy_with_speculation_and_prefix_caching_and_preemption_stays_exact():
    """A small pool forces preemptions (recompute) between verifies; prefix caching reuses full blocks of accepted
    tokens, never of rejected ones."""
    prompts, news, ref = workload("llama")
    prompts, news, ref = prompts * 2, news * 2, ref * 2
    built = engine("llama", num_blocks=24, block_size=4, prefix_caching=True, adaptive_speculation=False)
    got, stats = run(built, prompts, news)
    assert got == ref
    assert sum(s.num_preempted for s in stats) > 0 and sum(s.prefix_hit_tokens for s in stats) > 0
    assert 0 < sum(s.num_accepted_tokens for s in stats) < sum(s.num_proposed_tokens for s in stats)
    assert built.kv.num_free_blocks == built.kv.num_blocks


def test_vtc_charges_every_token_of_an_accepted_run():
    """VTC's counter is the tenant's weighted service: with speculation a verify yields several output tokens, and
    each is charged w_output (schedule() charges the step's one, the commit the accepted proposals)."""
    prompts, news, ref = workload("llama")
    built = engine("llama", "vtc")
    got, stats = run(built, prompts, news)
    assert got == ref and sum(s.num_accepted_tokens for s in stats) > 0
    cfg = built.scheduler.config
    want = cfg.w_input * sum(map(len, prompts)) + cfg.w_output * sum(news)
    assert built.scheduler.counters["default"] == pytest.approx(want)


def test_stop_tokens_and_max_tokens_end_an_accepted_run():
    prompts, news, ref = workload("llama")
    stop = ref[0][10]                      # a token the first request emits inside a run of accepted proposals
    built = engine("llama")
    ids = [built.engine.add_request(prompts[0], SamplingParams(max_new_tokens=24, stop_token_ids=[stop])),
           built.engine.add_request(prompts[4], SamplingParams(max_new_tokens=7, ignore_eos=True, logprobs=2))]
    finished = drain(built.engine)
    first, second = finished[ids[0]], finished[ids[1]]
    assert first.output_token_ids == ref[0][:ref[0].index(stop) + 1] and first.finish_reason == "stop"
    assert second.output_token_ids == ref[4][:7] and second.finish_reason == "length"
    plain = engine("llama", speculative=None)
    rid = plain.engine.add_request(prompts[4], SamplingParams(max_new_tokens=7, ignore_eos=True, logprobs=2))
    expected = drain(plain.engine)[rid].logprobs
    assert [lp.token_id for lp in second.logprobs] == [lp.token_id for lp in expected]
    for got, want in zip(second.logprobs, expected):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [t for t, _ in got.top] == [t for t, _ in want.top]


def test_adaptive_speculation_switches_off_where_proposals_fail():
    """A request whose proposals are always rejected stops getting proposal slots (but for rare probes)."""
    built = engine("llama", speculative=PROPOSERS.config("synthetic", num_speculative_tokens=4, alpha=0.01,
                                                         beta=100.0), probe_every=8)
    _, stats = run(built, [[5, 6, 7]], [60])
    assert sum(s.num_accepted_tokens for s in stats) == 0
    assert 3 <= sum(s.num_verifies for s in stats) <= 3 + 60 // 8


def test_speculative_budget_cap_and_order():
    """SplitFuse grants proposal slots from what prompts leave, at most max_speculative_tokens per step."""
    built = engine("llama", speculative=PROPOSERS.config("synthetic", num_speculative_tokens=4, alpha=100.0,
                                                         beta=0.01), token_budget=64, max_speculative_tokens=6)
    _, stats = run(built, [[5, 6, 7]] * 4 + [list(range(100))], [20] * 4 + [5])
    assert max(s.num_proposed_tokens for s in stats) == 6
    assert all(s.num_tokens <= 64 for s in stats)


def test_ngram_lookup_proposes_what_followed_the_latest_longest_match():
    tokens = np.array([1, 2, 3, 9, 1, 2, 3, 4, 5, 6, 7, 2, 3])
    assert lookup(tokens, 3, 1, 3) == [4, 5, 6]            # "2 3" last matched before "4"
    assert lookup(tokens, 2, 3, 3) == []                   # "7 2 3" never occurred before
    assert lookup(np.array([4, 4, 4]), 5, 1, 2) == [4]     # at most what follows the match


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example,
                                                                  HealthCheck.data_too_large])
@given(data=st.data(), lens=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 20)), min_size=1, max_size=5),
       caching=st.booleans(), scheduler=st.sampled_from(["splitfuse", "sarathi", "orca"]))
def test_property_rollbacks_leak_no_block(data, lens, caching, scheduler):
    """Random arrivals, aborts, preemptions (a small pool) and proposals half of which are rejected: after every
    step no block has two live owners, and once all are done every block is back in the pool."""
    built = engine("llama", scheduler, num_blocks=24, block_size=4, prefix_caching=caching,
                   speculative=PROPOSERS.config("synthetic", num_speculative_tokens=5, alpha=1.0, beta=1.0))
    drive_with_aborts(built.engine, built.kv, lens, data)
    assert built.kv.num_free_blocks == built.kv.num_blocks
    assert not built.kv.tables and not built.kv.tokens


def test_rejection_sampling_leaves_the_target_distribution_unchanged():
    """Sampler.verify against the tiny model's own next-token distributions (with logit bias, a repetition
    penalty, temperature, top-k and top-p): the first token of a verified run, and the second given the first
    proposal was accepted, follow the target's distribution (chi-square, 4000 seeded draws each)."""
    hf, model = tiny("llama")
    prompt = [3, 17, 42, 99, 5, 17, 42]
    params = SamplingParams(temperature=0.8, top_k=12, top_p=0.95, repetition_penalty=1.3, logit_bias={7: 2.0},
                            max_new_tokens=8)
    sampler = Sampler(0)

    def target(ahead: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's logits after prompt + ahead, and the distribution a request samples from there."""
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + ahead])).logits[0, -1:].float()
        row = SamplingRow(params, None, prompt, ahead)
        return logits, sampler._probabilities(sampler.process(logits, [row]), [params])[0]

    logits0, first = target([])
    draft = [int(first.argsort(descending=True)[1]), 5]         # the target's second choice, then a guess
    logits1, second = target(draft[:1])
    logits2, _ = target(draft)
    logits = torch.cat([logits0, logits1, logits2])
    assert 0.05 < float(first[draft[0]]) < 0.6, "both branches (accept, reject) are exercised"
    draws = 4000
    rows = [SamplingRow(params, torch.Generator().manual_seed(seed), prompt, draft[:j])
            for seed in range(draws) for j in range(3)]
    runs = sampler.verify(logits.repeat(draws, 1), rows, [draft] * draws)
    firsts = [tokens[0] for tokens, _ in runs]
    seconds = [tokens[1] for tokens, _ in runs if tokens[0] == draft[0]]
    for sample, p in ((firsts, first), (seconds, second)):
        support = torch.nonzero(p > 0)[:, 0].tolist()
        counts = np.bincount(sample, minlength=p.shape[0])
        assert counts.sum() == counts[support].sum(), "no token outside the target's support"
        expected = p[support].double().numpy()
        assert chisquare(counts[support], expected / expected.sum() * len(sample)).pvalue > 1e-3


def test_composed_from_conf_and_refused_with_the_fix_named():
    cfg = compose_config(["speculative=ngram", "speculative.num_speculative_tokens=3"])
    assert cfg.speculative.name == "ngram" and cfg.speculative.num_speculative_tokens == 3
    assert compose_config([]).speculative.name == "none"
    with pytest.raises(ValueError, match="min_n"):
        build_engine(compose_config(["speculative=ngram", "speculative.min_n=0"]))


def test_simulated_speculation_charges_verify_chunks_and_draws_acceptance(tmp_path):
    """executor=simulated with speculative=synthetic: proposals accepted at the configured rate; at one client a
    70B model's decode is memory-bound, so verify chunks of k + 1 tokens cost about a decode and TPOT drops."""
    base = ["executor=simulated", "progress=false", "hardware=a100-80gb", "hardware.tensor_parallel=4",
            "model.source=llama-2-70b", "workload.num_requests=6", "workload.clients=1", "workload.prompt.mean=300",
            "workload.output.mean=64", "workload.output.dist=fixed"]
    off = run_benchmark(compose_config(base), tmp_path / "off")
    on = run_benchmark(compose_config([*base, "speculative=synthetic", "speculative.alpha=8", "speculative.beta=2"]),
                       tmp_path / "on")
    assert off["spec_acceptance_rate"] is None and on["num_output_tokens"] == off["num_output_tokens"]
    assert 0.5 < on["spec_acceptance_rate"] < 0.95 and on["spec_accepted_per_verify"] > 1
    assert on["tpot_s_p50"] < 0.7 * off["tpot_s_p50"]


def test_simulated_draft_model_costs_its_decode_steps():
    """speculative.draft_model: every step with proposals takes longer than the same step without a draft model by
    the draft model's k decode steps of the granted sequences (step j: those granted more than j proposals, each
    reading its tokens so far and j proposed ones) on the target's device, as the cost model predicts them, and
    reports them as its draft time."""
    base = ["executor=simulated", "hardware=a100-80gb", "hardware.tensor_parallel=4", "model.source=llama-2-70b",
            "speculative=synthetic"]
    engines = [build_engine(compose_config([*base, *extra])) for extra in ([], ["speculative.draft_model=llama-2-7b"])]
    steps, granted = ([], []), []
    proposer = engines[1]._proposer
    propose = proposer.propose
    proposer.propose = lambda reqs, ks: granted.append(([r.num_tokens for r in reqs], list(ks))) or propose(reqs, ks)
    for eng, stats in zip(engines, steps):
        eng.add_step_observer(stats.append)
        for i, n in enumerate((100, 150, 200)):
            eng.add_request(list(range(1, n + 1)), SamplingParams(max_new_tokens=24, ignore_eos=True),
                            request_id=f"r{i}")
        drain(eng)
    draft = engines[0]._executor.cost.of_model(model_spec("llama-2-7b"))
    verifying = [(off, on) for off, on in zip(*steps) if on.num_verifies]
    assert [s.num_tokens for s in steps[0]] == [s.num_tokens for s in steps[1]] and len(verifying) == len(granted) > 3
    for (off, on), (contexts, ks) in zip(verifying, granted):
        expected = sum(draft.step_time(BatchShape.of([1] * sum(k > j for k in ks),
                                                     [c + j for c, k in zip(contexts, ks) if k > j]))
                       for j in range(max(ks)))
        assert off.draft_s == 0 and on.draft_s == pytest.approx(expected)
        assert on.duration_s - off.duration_s == pytest.approx(expected)
        assert expected > 0.1 * off.duration_s        # a 7B draft is not free beside a 70B target


def test_synthetic_acceptance_drawn_from_a_measured_distribution(tmp_path):
    """speculative.acceptance=measured:<file>: each request's rate is one of the measured rates, so over many
    requests the share of first proposals accepted is the measured mean."""
    rates = [0.1, 0.3, 0.6, 0.8, 0.95, 1.0]
    path = MeasuredAcceptance(rates, meta={"made": "by hand"}).save(tmp_path / "rates.json")
    config = compose_config(["speculative=synthetic", f"speculative.acceptance=measured:{path}"]).speculative
    proposer = make_proposer(config)
    reqs = [Request(f"r{i}", [1], SamplingParams(), 0.0) for i in range(4000)]
    first = np.array([d[0] for d in proposer.propose(reqs, [1] * len(reqs))])
    assert np.mean(first == 0) == pytest.approx(np.mean(rates), abs=0.03)
    shipped = MeasuredAcceptance.load("smollm2-ngram-quote")
    assert shipped.meta["proposer"] == "ngram" and 0 < shipped.mean <= 1
    with pytest.raises(ValueError, match="measured:"):
        build_engine(compose_config(["executor=simulated", "speculative=synthetic", "speculative.acceptance=x"]))


@pytest.mark.slow      # a server and two engines over a 49k vocabulary: ~1 min on the shared 2-core machine
def test_server_streams_speculative_runs_as_ordinary_tokens():
    """Greedy text over HTTP equals the non-speculative pipeline's; a step's accepted run arrives as one chunk."""
    from serving import ENGINE_CFG, MODEL, served, stream_text, tiny_model, tokenizer
    cfg = dataclasses.replace(ENGINE_CFG, speculative=PROPOSERS.config("ngram", min_n=1))
    with served(engine=build_engine(cfg, tiny_model(), tokenizer()), reference=True) as s:
        prompt = "one two three four five " * 6
        expected = s.reference(prompt, max_new_tokens=24, ignore_eos=True)[0]
        text, choices, usage = stream_text(s.client().completions.create(
            model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}), chat=False)
        assert text == expected.text and usage.completion_tokens == 24
        assert len(choices) < 24, "several tokens per chunk"
        assert s.idle()


@pytest.mark.parametrize("draft_family,same", [pytest.param("llama", True, marks=pytest.mark.slow), ("qwen2", False)])
def test_draft_model_proposals_keep_greedy_exact_and_its_kv_in_step(draft_family, same, tmp_path):
    """A draft model of the target's vocabulary, loaded from a directory (`speculative=draft speculative.model=`):
    the target itself (every proposal accepted) or another family's random model (most rejected, so its KV rolls
    back); outputs equal transformers', and the draft's pool is empty once all have finished."""
    prompts, news, ref = workload("llama")
    draft_hf = tiny("llama")[0] if same else tiny_hf_model(draft_family, seed=3)
    draft_hf.save_pretrained(tmp_path)
    config = compose_config(["speculative=draft", f"speculative.model={tmp_path}"]).speculative
    built = engine("llama", speculative=config, adaptive_speculation=False)
    got, stats = run(built, prompts, news)
    assert got == ref
    proposed, accepted = (sum(getattr(s, k) for s in stats) for k in ("num_proposed_tokens", "num_accepted_tokens"))
    assert proposed > 0 and (accepted == proposed if same else accepted < proposed)
    draft = built.engine._proposer
    assert draft.allocator.num_free == draft.allocator.num_blocks and not draft.fed


def test_a_request_whose_verification_fails_ends_alone():
    """Sampling parameters broken after acceptance (as in test_sampling's fault test) fail only their request; the
    speculating neighbours keep transformers' tokens and every block comes back."""
    prompts, news, ref = workload("llama")
    built = engine("llama", adaptive_speculation=False)
    eng, stats = built.engine, []
    eng.add_step_observer(stats.append)
    good = [eng.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in zip(prompts, news)]
    bad_params = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=5, ignore_eos=True)
    bad = eng.add_request(prompts[0], bad_params)
    outputs = eng.step() + eng.step()
    bad_params.top_k = 2**63                           # injected fault
    while eng.has_unfinished():
        outputs += eng.step()
    failed = [o for o in outputs if o.finish_reason == "error"]
    assert [o.request_id for o in failed] == [bad] and "sampling failed" in failed[0].error
    done = {o.request_id: o.request for o in outputs if o.finished}
    assert [done[i].output_token_ids for i in good] == ref and sum(s.num_verifies for s in stats) > 0
    assert built.kv.num_free_blocks == built.kv.num_blocks
