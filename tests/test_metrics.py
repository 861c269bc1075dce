"""Metrics on hand-built timestamps; expected values are worked out by hand in the comments."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgen.metrics import (
    SLAConfig,
    ewm_mean,
    format_table,
    g_suffix,
    meets_cumulative_sla,
    meets_ema_sla,
    meets_ttft_sla,
    sla_fractions,
    summarize,
    token_latency_percentiles,
)
from fastgen.request_trace import RequestTrace

TINY = 2.0 ** -20       # exactly representable nudge past a boundary


def req(arrival: float, times: list[float], prompt: int = 512, scheduled: float | None = None,
        finish: float | None = None, reason: str = "length") -> RequestTrace:
    """A finished request; it finishes with its last token unless `finish` says otherwise."""
    return RequestTrace("r", prompt, arrival, list(times), scheduled, times[-1] if finish is None else finish, reason)


# Four requests (times are exact binary fractions):
#   A: arrival 0, tokens 1.0 1.5 2.5            ttft 1.0  tpot 0.75   gaps .5 1.0
#   B: arrival 1, tokens 3.0 3.25               ttft 2.0  tpot 0.25   gap .25
#   C: arrival 2, token  2.5                    ttft 0.5  (single token)
#   D: arrival 3, tokens 4 4.125 4.25 4.375     ttft 1.0  tpot 0.125  gaps .125 x3
FOUR = [
    req(0.0, [1.0, 1.5, 2.5], prompt=100, scheduled=0.5),
    req(1.0, [3.0, 3.25], prompt=200, scheduled=1.25),
    req(2.0, [2.5], prompt=300, scheduled=2.0),
    req(3.0, [4.0, 4.125, 4.25, 4.375], prompt=400, scheduled=3.5),
]


def test_latency_percentiles_by_hand():
    m = summarize(FOUR)
    # TTFT sorted [0.5, 1, 1, 2]: p50 = 1; p90 at rank 2.7 -> 1 + 0.7 = 1.7; p95 -> 1.85; p99 -> 1.97
    assert m["ttft_s_mean"] == pytest.approx(1.125)
    assert (m["ttft_s_p50"], m["ttft_s_p90"], m["ttft_s_p95"], m["ttft_s_p99"]) == pytest.approx((1.0, 1.7, 1.85, 1.97))
    # TPOT sorted [.125, .25, .75] (C has none): p50 .25; p95 at rank 1.9 -> .25 + .9 * .5 = .7
    assert (m["tpot_s_mean"], m["tpot_s_p50"], m["tpot_s_p95"]) == pytest.approx((0.375, 0.25, 0.7))
    # ITL pooled sorted [.125 .125 .125 .25 .5 1]: mean 2.125/6; p50 rank 2.5 -> .1875;
    # p95 rank 4.75 -> .5 + .75 * .5 = .875; p99 rank 4.95 -> .975
    assert m["itl_s_mean"] == pytest.approx(2.125 / 6)
    assert (m["itl_s_p50"], m["itl_s_p95"], m["itl_s_p99"]) == pytest.approx((0.1875, 0.875, 0.975))
    # E2E [2.5, 2.25, 0.5, 1.375] sorted [.5 1.375 2.25 2.5]: p50 1.8125
    assert (m["e2e_s_mean"], m["e2e_s_p50"]) == pytest.approx((6.625 / 4, 1.8125))
    # queue [.5 .25 0 .5]
    assert (m["queue_s_mean"], m["queue_s_p50"]) == pytest.approx((0.3125, 0.375))


def test_throughput_window_is_last_finish_minus_first_arrival():
    m = summarize(FOUR, start_time=-1.0, end_time=5.0)
    # window 4.375 - 0 ; output tokens 3+2+1+4 = 10 ; prompt tokens 1000
    assert m["window_s"] == 4.375 and m["duration_s"] == 6.0
    assert m["request_throughput"] == pytest.approx(4 / 4.375)
    assert m["output_token_throughput"] == pytest.approx(10 / 4.375)
    assert m["total_token_throughput"] == pytest.approx(1010 / 4.375)
    assert (m["num_requests"], m["num_completed"], m["num_output_tokens"]) == (4, 4, 10)


def test_incomplete_and_aborted_requests_are_not_completed():
    extra = [RequestTrace("unfinished", 10, 0.0, [9.0]), req(0.0, [0.5], reason="abort"),
             RequestTrace("no tokens", 10, 0.0, [], finish_time=9.0, finish_reason="stop")]
    m = summarize(FOUR + extra)
    assert (m["num_requests"], m["num_completed"]) == (7, 4)
    assert m["request_throughput"] == pytest.approx(4 / 4.375)


def test_empty_run_is_json_serialisable_with_nones():
    m = summarize([], [])
    json.dumps(m, allow_nan=False)
    assert m["num_completed"] == 0 and m["request_throughput"] is None
    assert m["effective_throughput_g4"] is None and m["ttft_s_p50"] is None and m["sla_frac_g2"] is None
    assert "-" in format_table(m)


def test_required_keys_and_plain_types():
    steps = [dict(time=0.1 * i, duration_s=0.05, num_tokens=10, num_seqs=2) for i in range(4)]
    m = summarize(FOUR, steps)
    required = ["request_throughput", "output_token_throughput", "total_token_throughput",
                "effective_throughput_g2", "effective_throughput_g4", "effective_throughput_g6",
                "ttft_s_p50", "ttft_s_p95", "ttft_s_p99", "tpot_s_p50", "tpot_s_p95", "itl_s_p50",
                "itl_s_p95", "itl_s_p99", "e2e_s_p50", "e2e_s_p95", "num_requests", "num_completed",
                "duration_s", "ttft_s_mean", "queue_s_p50", "sla_frac_g4", "effective_cumulative_throughput_g4"]
    assert set(required) <= set(m)
    assert all(v is None or type(v) in (int, float) for v in m.values())
    json.dumps(m, allow_nan=False)
    custom = summarize(FOUR, sla=SLAConfig(gen_tokens_per_s=[2.5, 8.0]))
    assert {"effective_throughput_g2p5", "effective_throughput_g8", "sla_cumulative_frac_g2p5"} <= set(custom)
    assert "effective_throughput_g4" not in custom


# ---------------------------------------------------------------------------- SLA

def test_ttft_exactly_at_the_limit_passes():
    # 256 prompt tokens at 512 tok/s -> 0.5 s allowed
    assert meets_ttft_sla(req(0.0, [0.5], prompt=256), 512.0)
    assert not meets_ttft_sla(req(0.0, [0.5 + TINY], prompt=256), 512.0)


def test_ema_boundary_is_strict():
    # constant 0.25 s gaps: the EMA is exactly 0.25 = 1/4, which is not *below* 1/4
    on_the_line = req(0.0, [0.25 * i for i in range(1, 12)])
    assert not meets_ema_sla(on_the_line, 4.0, 16)
    assert meets_ema_sla(on_the_line, 4.0 - TINY, 16)


def test_single_token_outputs_meet_the_generation_part():
    one = req(0.0, [0.25], prompt=256)
    for g in (1.0, 2.0, 100.0):
        assert meets_ema_sla(one, g, 16) and meets_cumulative_sla(one, g)
    fractions = sla_fractions([one, req(0.0, [0.75], prompt=256)], SLAConfig())
    assert fractions["sla_ttft_frac"] == fractions["sla_frac_g6"] == fractions["sla_cumulative_frac_g6"] == 0.5


def one_late_token() -> RequestTrace:
    """20 gaps of 0.1 s, one of 3.0 s, 20 more of 0.1 s: mean gap 7/41 = 0.171 s, well under 0.25."""
    gaps = [0.1] * 20 + [3.0] + [0.1] * 20
    times = [1.0]
    for gap in gaps:
        times.append(times[-1] + gap)
    return req(0.0, times, prompt=1024)


def test_one_late_token_breaks_the_ema_but_not_the_mean_or_the_cumulative_check():
    trace = one_late_token()
    assert (trace.token_times[-1] - trace.token_times[0]) / 41 == pytest.approx(7 / 41)
    # EMA right after the late gap, span 16 -> decay d = 1 - 2/17 = 15/17, adjust=True weights d^k:
    # (3.0 + 0.1 * sum_{k=1..20} d^k) / sum_{k=0..20} d^k ; d^21 = 0.0722, sum = 0.9278/0.1176 = 7.886
    # -> (3.0 + 0.6886) / 7.886 = 0.4677
    d = 15 / 17
    geometric = (1 - d ** 21) / (1 - d)
    ema_after_late = (3.0 + 0.1 * (geometric - 1)) / geometric
    assert ema_after_late == pytest.approx(0.4677, abs=1e-3) and ema_after_late > 0.25
    assert ewm_mean([0.1] * 20 + [3.0], 16)[-1] == pytest.approx(ema_after_late)
    assert not meets_ema_sla(trace, 4.0, 16)
    assert meets_ema_sla(trace, 2.0, 16)                 # 0.468 < 0.5
    # cumulative: token 21 arrives 2.0 + 3.0 = 5.0 s after the first, allowed 21/4 = 5.25 s
    assert meets_cumulative_sla(trace, 4.0)


def test_cumulative_boundary_is_inclusive_and_early_lateness_fails():
    assert meets_cumulative_sla(req(0.0, [0.25 * i for i in range(1, 12)]), 4.0)   # token i at exactly i/4
    late_one = [0.25 * i for i in range(1, 12)]
    late_one[5] += TINY
    assert not meets_cumulative_sla(req(0.0, late_one), 4.0)
    # a slow second token is not excused by fast ones later
    assert not meets_cumulative_sla(req(0.0, [0.0, 0.5, 0.5625, 0.625, 0.6875]), 4.0)


def test_effective_throughput_arithmetic():
    # arrivals 0,1,2,3; last finish 8.0 -> 4 requests / 8 s = 0.5 req/s.
    # prompt 512 tokens -> 1 s TTFT allowed; R3 takes 2 s so it fails every SLA.
    # R1 gaps 0.2 (<1/4), R2 gaps 0.3 (fails g4 and g6, passes g2), R4 single token.
    traces = [
        req(0.0, [1.0, 1.2, 1.4, 1.6]),
        req(1.0, [2.0, 2.3, 2.6]),
        req(2.0, [4.0, 4.1]),
        req(3.0, [3.5], finish=8.0),
    ]
    m = summarize(traces)
    assert m["request_throughput"] == pytest.approx(0.5)
    assert m["sla_ttft_frac"] == 0.75
    assert (m["sla_frac_g2"], m["sla_frac_g4"], m["sla_frac_g6"]) == (0.75, 0.5, 0.25)
    assert (m["effective_throughput_g2"], m["effective_throughput_g4"], m["effective_throughput_g6"]) == \
        pytest.approx((0.375, 0.25, 0.125))
    # cumulative g6: R1 token 1 at 0.2 s > 1/6 fails; R4 passes -> 0.25
    assert m["effective_cumulative_throughput_g6"] == pytest.approx(0.125)


def test_paper_token_latency_method_drops_edge_requests_first_token_and_last_gap():
    traces = [
        req(3.0, [4.0, 14.0, 24.0]),                      # last by start time: dropped
        req(1.0, [2.0, 2.1, 2.3, 3.2]),                  # gaps .1 .2 (.9 dropped)
        req(0.0, [9.0, 19.0, 29.0]),                      # first by start time: dropped
        req(2.0, [3.0, 3.3, 3.7, 8.7]),                  # gaps .3 .4 (5.0 dropped)
    ]
    m = token_latency_percentiles(traces)
    # pooled [.1 .2 .3 .4]: p50 .25; p90 rank 2.7 -> .37; p95 rank 2.85 -> .385
    assert (m["token_latency_s_p50"], m["token_latency_s_p90"], m["token_latency_s_p95"]) == \
        pytest.approx((0.25, 0.37, 0.385))


def test_ewm_mean_matches_pandas_on_examples():
    pd = pytest.importorskip("pandas")
    for values, span in [([0.1] * 20 + [3.0] + [0.1] * 5, 16), ([1.0, 2.0, 4.0, 0.5], 1), ([0.3], 16)]:
        assert ewm_mean(values, span) == pd.Series(values).ewm(span=span).mean().tolist()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(0.0, 5.0), min_size=1, max_size=60), st.integers(1, 40))
def test_ewm_mean_matches_pandas_bit_for_bit(values, span):
    pd = pytest.importorskip("pandas")
    assert ewm_mean(values, span) == pd.Series(values, dtype=float).ewm(span=span, adjust=True).mean().tolist()


# ---------------------------------------------------------------------------- steps

def test_step_and_kv_metrics():
    steps = [
        dict(time=0.0, duration_s=0.1, num_tokens=100, num_seqs=1, kv_used_tokens=50, kv_reserved_tokens=100,
             kv_capacity_tokens=1000),
        dict(time=0.1, duration_s=0.2, num_tokens=200, num_seqs=2, kv_used_tokens=150, kv_reserved_tokens=200,
             kv_capacity_tokens=1000),
        dict(time=0.3, duration_s=0.3, num_tokens=300, num_seqs=3, kv_used_tokens=300, kv_reserved_tokens=0,
             kv_capacity_tokens=1000),
        dict(time=0.6, duration_s=0.4, num_tokens=400, num_seqs=4),
    ]
    m = summarize(FOUR, steps, start_time=0.0, end_time=4.0)
    # tokens [100..400]: mean 250, p50 250, p95 rank 2.85 -> 385
    assert (m["step_tokens_mean"], m["step_tokens_p50"], m["step_tokens_p95"]) == pytest.approx((250, 250, 385))
    assert (m["step_time_s_mean"], m["step_time_s_p95"]) == pytest.approx((0.25, 0.385))
    assert m["step_seqs_mean"] == 2.5 and m["num_steps"] == 4
    # used/reserved only where reserved > 0: (.5 + .75)/2 ; used/capacity over three steps
    assert m["kv_used_frac_of_reserved_mean"] == pytest.approx(0.625)
    assert (m["kv_used_frac_of_capacity_mean"], m["kv_used_frac_of_capacity_max"]) == pytest.approx((500 / 3000, 0.3))
    assert m["busy_frac"] == pytest.approx(1.0 / 4.0)


def test_format_table_renders_the_main_numbers():
    text = format_table(summarize(FOUR, sla=SLAConfig(gen_tokens_per_s=[2.5])))
    assert "0.9143 req/s" in text and "ttft" in text and "2.5" in text


def test_sla_config_is_omegaconf_compatible_and_validated():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.structured(SLAConfig)
    assert list(cfg.gen_tokens_per_s) == [2.0, 4.0, 6.0] and cfg.ema_span == 16
    with pytest.raises(ValueError, match="gen_tokens_per_s"):
        summarize(FOUR, sla=SLAConfig(gen_tokens_per_s=[4.0, -1.0]))
    with pytest.raises(ValueError, match="prompt_tokens_per_s"):
        summarize(FOUR, sla=SLAConfig(prompt_tokens_per_s=0.0))


# ---------------------------------------------------------------------------- property

gap_lists = st.lists(st.floats(0.0, 2.0), min_size=0, max_size=30)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 3.0), gap_lists, st.integers(1, 4096)), min_size=1, max_size=8),
       st.lists(st.integers(1, 200).map(lambda tenths: tenths / 10), min_size=2, max_size=5, unique=True))
def test_fraction_meeting_sla_is_monotone_non_increasing_in_g(requests, rates):
    traces = []
    for ttft_s, gaps, prompt in requests:
        times = [ttft_s]
        for gap in gaps:
            times.append(times[-1] + gap)
        traces.append(req(0.0, times, prompt=prompt))
    rates = sorted(rates)
    fractions = sla_fractions(traces, SLAConfig(gen_tokens_per_s=rates))
    for kind in ("", "cumulative_"):
        series = [fractions[f"sla_{kind}frac_{g_suffix(g)}"] for g in rates]
        assert all(a >= b for a, b in zip(series, series[1:])), (kind, series)
