"""Workload generators: distributions, seeding, arrival processes, trace replay, config validation."""
from __future__ import annotations

import heapq
import json
import math

import numpy as np
import pytest

from fastgen.workloads import (
    CORPUS_PATH,
    EXAMPLE_TRACE_PATH,
    ClosedLoopArrivals,
    CorpusPrompts,
    LengthSpec,
    WorkloadConfig,
    build_workload,
    gamma_arrivals,
    load_trace,
    poisson_arrivals,
    sample_lengths,
)

VOCAB = 32000


class CharTokenizer:
    """One token per character: enough to check slicing and wrapping exactly."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        return [min(ord(c), 255) for c in text]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------- lengths

def test_normal_lengths_match_mean_and_default_30_percent_std():
    x = sample_lengths(LengthSpec(mean=1200), 40_000, rng())
    assert x.dtype == np.int64
    assert x.mean() == pytest.approx(1200, rel=0.01)
    assert x.std() == pytest.approx(360, rel=0.03)


def test_fixed_and_uniform_lengths():
    assert set(sample_lengths(LengthSpec(dist="fixed", mean=64), 100, rng()).tolist()) == {64}
    x = sample_lengths(LengthSpec(dist="uniform", low=10, high=30), 40_000, rng())
    assert x.min() == 10 and x.max() == 30                       # both bounds inclusive
    assert x.mean() == pytest.approx(20, rel=0.01)
    assert x.std() == pytest.approx(math.sqrt((21 ** 2 - 1) / 12), rel=0.03)


def test_clipping_to_min_and_max():
    x = sample_lengths(LengthSpec(mean=100, std_frac=1.0, min=50, max=120), 5_000, rng())
    assert x.min() == 50 and x.max() == 120
    assert (sample_lengths(LengthSpec(mean=2, std_frac=3.0), 5_000, rng()) >= 1).all()


def test_lengths_are_seeded():
    spec = LengthSpec(mean=500)
    assert (sample_lengths(spec, 100, rng(1)) == sample_lengths(spec, 100, rng(1))).all()
    assert (sample_lengths(spec, 100, rng(1)) != sample_lengths(spec, 100, rng(2))).any()


# ---------------------------------------------------------------------------- open-loop arrivals

@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_gaps_have_mean_one_over_rate_and_cv_one_over_sqrt_burstiness(burstiness):
    times = gamma_arrivals(40_000, rate=5.0, burstiness=burstiness, rng=rng())
    gaps = np.diff(times)
    assert times[0] == 0.0 and len(times) == 40_000 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(0.2, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.03)


def test_poisson_is_exponential_gaps_and_seeded():
    gaps = np.diff(poisson_arrivals(40_000, rate=2.0, rng=rng()))
    assert gaps.mean() == pytest.approx(0.5, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.03)
    assert poisson_arrivals(50, 2.0, rng(3)) == poisson_arrivals(50, 2.0, rng(3))
    assert poisson_arrivals(50, 2.0, rng(3)) != poisson_arrivals(50, 2.0, rng(4))


# ---------------------------------------------------------------------------- closed loop

def drive(arrivals: ClosedLoopArrivals, service_rng: np.random.Generator):
    """A tiny discrete-event driver: each request takes a random service time once sent."""
    events = [(t, i, "send") for i, t in arrivals.initial_requests()]
    heapq.heapify(events)
    log, max_outstanding = [], 0
    while events:
        now, index, kind = heapq.heappop(events)
        log.append((now, index, kind, arrivals.outstanding))
        if kind == "send":
            heapq.heappush(events, (now + service_rng.uniform(0.1, 1.0), index, "finish"))
        else:
            for i, t in arrivals.on_finish(index, now):
                assert t >= now
                heapq.heappush(events, (t, i, "send"))
        max_outstanding = max(max_outstanding, arrivals.outstanding)
    return log, max_outstanding


@pytest.mark.parametrize("clients,num_requests", [(1, 10), (4, 50), (8, 5)])
def test_closed_loop_keeps_n_outstanding_and_issues_the_total(clients, num_requests):
    arrivals = ClosedLoopArrivals(num_requests, clients, rng(), warmup=True, jitter_s_per_client=0.01)
    log, max_outstanding = drive(arrivals, rng(1))
    sent = [i for _, i, kind, _ in log if kind == "send"]
    assert sorted(sent) == list(range(num_requests + clients))     # every request exactly once
    assert max_outstanding == clients
    # warm-ups are 0..N-1 and all sent at 0; no measured request leaves before the last warm-up finished
    barrier = max(t for t, i, kind, _ in log if kind == "finish" and i < clients)
    assert all(t == 0.0 for t, i, kind, _ in log if kind == "send" and i < clients)
    first_measured = [t for t, i, kind, _ in log if kind == "send" and clients <= i < 2 * clients]
    assert all(barrier <= t <= barrier + 0.01 * clients for t in first_measured)
    # measured phase: exactly N outstanding (issued, unfinished) until the queue runs dry
    finishes = [(i, outstanding) for _, i, kind, outstanding in log if kind == "finish"]
    total = num_requests + clients
    for done, (i, outstanding) in enumerate(finishes):
        if i >= clients:
            assert outstanding == min(clients, total - done)
    assert list(arrivals.warmup_indices) == list(range(clients))
    assert arrivals.outstanding == 0


def test_closed_loop_without_warmup_starts_jittered_and_replaces_each_finish():
    arrivals = ClosedLoopArrivals(20, 4, rng(), warmup=False, jitter_s_per_client=0.01)
    first = arrivals.initial_requests()
    assert [i for i, _ in first] == [0, 1, 2, 3]
    assert all(0 <= t <= 0.04 for _, t in first)
    assert arrivals.on_finish(2, 5.0) == [(4, 5.0)]
    assert arrivals.outstanding == 4
    with pytest.raises(ValueError, match="not outstanding"):
        arrivals.on_finish(2, 6.0)


def test_closed_loop_steady_state_one_for_one():
    arrivals = ClosedLoopArrivals(6, 2, rng(), warmup=False)
    arrivals.initial_requests()
    issued = [arrivals.on_finish(i, float(i)) for i in range(6)]
    assert issued == [[(2, 0.0)], [(3, 1.0)], [(4, 2.0)], [(5, 3.0)], [], []]


# ---------------------------------------------------------------------------- build_workload

def test_build_closed_loop_workload_marks_warmups_and_is_seeded():
    cfg = WorkloadConfig(num_requests=30, clients=4, prompt=LengthSpec(mean=100), output=LengthSpec(mean=20))
    w = build_workload(cfg, VOCAB)
    assert len(w.requests) == 34 and len(w.measured) == 30
    assert [r.warmup for r in w.requests[:5]] == [True] * 4 + [False]
    assert [r.index for r in w.requests] == list(range(34))
    assert all(0 <= t < VOCAB for r in w.requests for t in r.prompt_token_ids)
    again, other = build_workload(cfg, VOCAB), build_workload(cfg, VOCAB, seed=1)
    assert [r.prompt_token_ids for r in again.requests] == [r.prompt_token_ids for r in w.requests]
    assert [r.max_new_tokens for r in again.requests] == [r.max_new_tokens for r in w.requests]
    assert [r.prompt_token_ids for r in other.requests] != [r.prompt_token_ids for r in w.requests]


def test_rate_sweep_keeps_requests_fixed():
    """Independent streams: changing the arrival process must not change the prompts."""
    slow = build_workload(WorkloadConfig(num_requests=10, arrival="poisson", rate=1.0), VOCAB)
    fast = build_workload(WorkloadConfig(num_requests=10, arrival="gamma", rate=9.0, burstiness=0.5), VOCAB)
    assert [r.prompt_token_ids for r in slow.requests] == [r.prompt_token_ids for r in fast.requests]
    assert slow.arrivals.initial_requests() != fast.arrivals.initial_requests()
    assert slow.arrivals.on_finish(0, 1.0) == []


def test_random_prompt_range_and_prompt_cap():
    cfg = WorkloadConfig(num_requests=50, arrival="poisson", random_token_low=100, max_prompt_len=64,
                         prompt=LengthSpec(dist="uniform", low=1, high=200))
    w = build_workload(cfg, vocab_size=128)
    assert max(len(r.prompt_token_ids) for r in w.requests) == 64
    assert {t for r in w.requests for t in r.prompt_token_ids} <= set(range(100, 128))


def test_corpus_prompts_slide_through_the_token_stream_and_wrap():
    tokenizer = CharTokenizer()
    stream = tokenizer.encode(CORPUS_PATH.read_text(encoding="utf-8"), add_special_tokens=False)
    assert len(stream) > 25_000
    source = CorpusPrompts(tokenizer, rng())
    start = source.offset
    a, b = source.take(100), source.take(len(stream) + 50)        # the second wraps around fully
    assert a == stream[start:start + 100]
    doubled = stream * 3
    assert b == doubled[start + 100:start + 100 + len(stream) + 50]


def test_corpus_workload_needs_a_tokenizer_and_uses_drawn_lengths():
    cfg = WorkloadConfig(num_requests=5, arrival="poisson", prompt_source="corpus",
                         prompt=LengthSpec(dist="fixed", mean=40))
    with pytest.raises(ValueError, match="tokenizer"):
        build_workload(cfg, VOCAB)
    w = build_workload(cfg, VOCAB, tokenizer=CharTokenizer())
    assert [len(r.prompt_token_ids) for r in w.requests] == [40] * 5
    text = "".join(chr(t) for t in w.requests[0].prompt_token_ids)
    assert text in CORPUS_PATH.read_text(encoding="utf-8") + CORPUS_PATH.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------- traces

def test_replay_of_the_shipped_example_trace():
    rows = [json.loads(line) for line in EXAMPLE_TRACE_PATH.read_text().splitlines()]
    assert len(rows) == 20
    cfg = WorkloadConfig(arrival="trace", trace_path=str(EXAMPLE_TRACE_PATH))
    with pytest.raises(ValueError, match="tokenizer"):           # the example has text prompts
        build_workload(cfg, VOCAB)
    tokenizer = CharTokenizer()
    w = build_workload(cfg, VOCAB, tokenizer=tokenizer)
    assert len(w.requests) == 20 and not any(r.warmup for r in w.requests)
    assert w.arrivals.initial_requests() == [(i, row["arrival_time"]) for i, row in enumerate(rows)]
    for row, request in zip(rows, w.requests):
        assert request.max_new_tokens == row["output_tokens"]
        if "prompt_tokens" in row:
            assert len(request.prompt_token_ids) == row["prompt_tokens"]
        elif "prompt_token_ids" in row:
            assert request.prompt_token_ids == row["prompt_token_ids"]
        else:
            assert request.prompt_token_ids == tokenizer.encode(row["prompt"], add_special_tokens=False)
    assert len(build_workload(WorkloadConfig(num_requests=7, arrival="trace", trace_path=str(EXAMPLE_TRACE_PATH)),
                              VOCAB, tokenizer=tokenizer).requests) == 7


def test_replay_of_a_csv_trace(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("arrival_time,prompt,prompt_token_ids,prompt_tokens,output_tokens\n"
                    "0.5,,5 6 7,,3\n"
                    "0.25,hi there,,,4\n"
                    "1.75,,,12,1\n")
    records = load_trace(path)
    assert [r.arrival_time for r in records] == [0.5, 0.25, 1.75]
    assert records[0].prompt_token_ids == [5, 6, 7] and records[1].prompt == "hi there"
    w = build_workload(WorkloadConfig(arrival="trace", trace_path=str(path)), VOCAB, tokenizer=CharTokenizer())
    assert [r.prompt_token_ids for r in w.requests[:2]] == [[5, 6, 7], [ord(c) for c in "hi there"]]
    assert len(w.requests[2].prompt_token_ids) == 12
    assert [r.max_new_tokens for r in w.requests] == [3, 4, 1]
    assert w.arrivals.initial_requests() == [(1, 0.25), (0, 0.5), (2, 1.75)]   # sorted by send time


@pytest.mark.parametrize("line,match", [
    ('{"arrival_time": 0, "output_tokens": 3}', "exactly one of"),
    ('{"arrival_time": 0, "prompt_tokens": 4, "prompt": "x", "output_tokens": 3}', "exactly one of"),
    ('{"prompt_tokens": 4, "output_tokens": 3}', "arrival_time"),
    ('{"arrival_time": -1, "prompt_tokens": 4, "output_tokens": 3}', "arrival_time must be >= 0"),
    ('{"arrival_time": 0, "prompt_tokens": 4, "output_tokens": 0}', "output_tokens must be >= 1"),
    ('{"arrival_time": 0, "prompt_tokens": 2.5, "output_tokens": 3}', "prompt_tokens must be an integer"),
    ('{"arrival_time": 0, "prompt_token_ids": [], "output_tokens": 3}', "exactly one of|non-empty"),
    ('[1, 2]', "must be an object"),
])
def test_bad_trace_rows_name_the_line_and_field(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"arrival_time": 0, "prompt_tokens": 4, "output_tokens": 3}\n' + line + "\n")
    with pytest.raises(ValueError, match=match) as info:
        load_trace(path)
    assert f"{path}:2" in str(info.value)


def test_trace_token_ids_outside_the_vocabulary_are_rejected(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"arrival_time": 0, "prompt_token_ids": [1, 500], "output_tokens": 3}\n')
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_workload(WorkloadConfig(arrival="trace", trace_path=str(path)), vocab_size=100)


# ---------------------------------------------------------------------------- validation

@pytest.mark.parametrize("overrides,match", [
    (dict(num_requests=-1), "num_requests"),
    (dict(clients=-2), "clients"),
    (dict(clients=0), "clients"),
    (dict(arrival="poisson", rate=-1.0), "rate must be > 0"),
    (dict(arrival="gamma", burstiness=0.0), "burstiness must be > 0"),
    (dict(jitter_s_per_client=-0.01), "jitter_s_per_client"),
    (dict(arrival="bogus"), "arrival must be one of"),
    (dict(arrival="trace"), "trace_path"),
    (dict(prompt_source="web"), "prompt_source"),
    (dict(max_prompt_len=0), "max_prompt_len"),
    (dict(random_token_low=VOCAB), "random_token_low"),
    (dict(prompt=LengthSpec(mean=-5)), r"prompt\.mean"),
    (dict(prompt=LengthSpec(std_frac=-0.1)), r"prompt\.std_frac"),
    (dict(output=LengthSpec(min=0)), r"output\.min"),
    (dict(output=LengthSpec(min=10, max=5)), r"output\.max"),
    (dict(output=LengthSpec(dist="uniform", low=9, high=3)), r"output\.low/high"),
    (dict(output=LengthSpec(dist="zipf")), r"output\.dist"),
])
def test_bad_configs_raise_naming_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_workload(WorkloadConfig(**overrides), VOCAB)


def test_config_is_an_omegaconf_structured_config():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.structured(WorkloadConfig)
    cfg.prompt.mean = 2600
    obj = omegaconf.OmegaConf.to_object(cfg)
    assert isinstance(obj, WorkloadConfig) and obj.prompt.mean == 2600 and obj.output.mean == 60
