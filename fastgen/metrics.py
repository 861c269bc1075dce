"""Serving metrics from request timing traces, including DeepSpeed-FastGen's effective throughput.

Definitions follow the paper's published benchmark scripts (DeepSpeedExamples, benchmarks/inference/mii):

- A request is *completed* when it has a finish time, at least one token and was not aborted;
  every latency statistic and SLA fraction is over completed requests.
- Throughput window = last finish - first arrival (the scripts' `calc_throughput`); request,
  output-token and total-token throughput all divide by it.
- Chat SLA for a generation rate g (tokens/s):
  prompt part: TTFT <= prompt_tokens / prompt_tokens_per_s (the scripts fail a request only when
  the limit is *strictly* below its TTFT, so the exact limit passes);
  EMA part: the pandas ``ewm(span, adjust=True).mean()`` of the inter-token gaps of tokens 2..n is
  strictly ``< 1/g`` at every token (the paper's "below", and the scripts' ``<``);
  cumulative variant: token i after the first arrives ``<= i/g`` s after the first token.
  A single-token output meets the generation part trivially.
  Effective throughput = request throughput x fraction of completed requests meeting the SLA
  (i.e. SLA-meeting requests per second of the window).
- Percentiles use numpy's default linear interpolation, as the scripts do.

Request classes (requests with a priority, tenant and SLO; `class_metrics`): a request *meets its SLO* when it
completed with TTFT <= slo.ttft_s and TPOT <= slo.tpot_s (each where set; a single token meets any TPOT); one
that failed, was aborted or dropped as late misses it. `slo_attainment` is the fraction of the requests that have
an SLO meeting it, `goodput` those per second of the throughput window, and `_<class>` each per workload class.
Fairness over tenants uses VTC's service (Sheng et al., arXiv 2401.00588): w_input (1) per prompt token when the
request is first scheduled and w_output (2) per output token when it arrives. `fairness_jain` is Jain's index of
the tenants' services over the run; `service_gap_max` is the largest difference between two tenants' services
over any interval in which both are backlogged (have a request waiting to be scheduled), VTC's fairness measure.
`qoe_mean` (and `qoe_mean_<class>`) is the mean of Andes' QoE (fastgen.qoe: the area under the tokens read on the
expected timeline over the area under that timeline, from the per-token times; the expectation is each request's
SLO, else fastgen.qoe's defaults) over the requests that were not aborted; one dropped as late or failed scores 0.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from fastgen.qoe import Expectation, qoe
from fastgen.request_trace import RequestTrace

LATENCY_STATS = ("mean", "p50", "p90", "p95", "p99")
STEP_STATS = ("mean", "p50", "p95")
TOKEN_LATENCY_PERCENTILES = (50, 90, 95)

Metrics = dict[str, Optional[float]]
W_INPUT, W_OUTPUT = 1.0, 2.0        # VTC's cost of a prompt token and of an output token (its defaults)


@dataclass
class SLAConfig:
    """The chat SLA of the paper (the defaults), or one scaled to other hardware (the `sla` of a conf/hardware file,
    which run.py's `sla` follows unless sla=paper); OmegaConf-compatible (lists via default_factory)."""

    name: str = "paper"                  # where the values come from: paper, or the hardware they were derived for
    prompt_tokens_per_s: float = 512.0
    gen_tokens_per_s: list[float] = field(default_factory=lambda: [2.0, 4.0, 6.0])
    ema_span: int = 16
    # The measurements a derived SLA was computed from (fastgen.calibration.sla), so it can be recomputed; empty: the paper's
    derived_from: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        """One line naming the SLA and its limits, for summaries and figure captions."""
        gens = ", ".join(f"{g:g}" for g in self.gen_tokens_per_s)
        return (f"SLA {self.name}: TTFT <= prompt tokens / {self.prompt_tokens_per_s:g} tok/s; EMA (span "
                f"{self.ema_span}) of token gaps < 1/g s, g = {gens} tok/s")

    def validate(self) -> None:
        if not self.prompt_tokens_per_s > 0:
            raise ValueError(f"prompt_tokens_per_s must be > 0, got {self.prompt_tokens_per_s}")
        if not self.gen_tokens_per_s or not all(g > 0 for g in self.gen_tokens_per_s):
            raise ValueError(f"gen_tokens_per_s must be a non-empty list of rates > 0, got {self.gen_tokens_per_s}")
        if self.ema_span < 1:
            raise ValueError(f"ema_span must be >= 1, got {self.ema_span}")


def g_suffix(g: float) -> str:
    """Key suffix for a generation rate: 4.0 -> 'g4', 2.5 -> 'g2p5' (no dots, safe for loggers)."""
    return "g" + f"{g:g}".replace(".", "p")


def is_completed(trace: RequestTrace) -> bool:
    """Finished with its tokens: not failed, aborted or dropped (finish_reason "deadline")."""
    return trace.finish_time is not None and bool(trace.token_times) and trace.finish_reason not in ("abort",
                                                                                                  "deadline")


# ---------------------------------------------------------------------------- per-request quantities

def ttft(trace: RequestTrace) -> float:
    return trace.token_times[0] - trace.arrival_time


def tpot(trace: RequestTrace) -> Optional[float]:
    """Mean time per output token after the first; undefined for a single token."""
    n = len(trace.token_times)
    return (trace.token_times[-1] - trace.token_times[0]) / (n - 1) if n > 1 else None


def inter_token_gaps(trace: RequestTrace) -> list[float]:
    """Gaps between consecutive output tokens (tokens 2..n)."""
    times = trace.token_times
    return [b - a for a, b in zip(times, times[1:])]


def ewm_mean(values: Sequence[float], span: int) -> list[float]:
    """pandas ``Series(values).ewm(span=span).mean()`` (adjust=True), step for step, for NaN-free input.

    Reimplemented so the SLA check does not need pandas; the recurrence (including pandas' guard
    that keeps a constant series exactly constant) matches pandas' `ewma` kernel bit for bit.
    """
    decay = 1.0 - 1.0 / (1.0 + (span - 1) / 2.0)     # pandas: alpha = 1 / (1 + com), com = (span - 1) / 2
    out: list[float] = []
    weight = 1.0
    for x in values:
        if not out:
            average = x
        else:
            weight *= decay
            if average != x:
                average = (weight * average + x) / (weight + 1.0)
            weight += 1.0
        out.append(average)
    return out


def meets_ttft_sla(trace: RequestTrace, prompt_tokens_per_s: float) -> bool:
    return ttft(trace) <= trace.prompt_tokens / prompt_tokens_per_s


def meets_ema_sla(trace: RequestTrace, gen_tokens_per_s: float, span: int) -> bool:
    limit = 1.0 / gen_tokens_per_s
    return all(average < limit for average in ewm_mean(inter_token_gaps(trace), span))


def meets_cumulative_sla(trace: RequestTrace, gen_tokens_per_s: float) -> bool:
    first = trace.token_times[0]
    return all(t - first <= i / gen_tokens_per_s for i, t in enumerate(trace.token_times[1:], start=1))


# The generation part of the SLA, by key infix: "" is the paper's EMA check, "cumulative_" the variant.
GENERATION_CHECKS = {
    "": lambda trace, g, sla: meets_ema_sla(trace, g, sla.ema_span),
    "cumulative_": lambda trace, g, sla: meets_cumulative_sla(trace, g),
}


def sla_fractions(traces: Sequence[RequestTrace], sla: SLAConfig) -> Metrics:
    """Fractions of `traces` (assumed completed) meeting the TTFT part alone (``sla_ttft_frac``) and
    each full SLA (``sla_frac_g4``, ``sla_cumulative_frac_g4``, ...); None for no traces."""
    ttft_ok = [meets_ttft_sla(t, sla.prompt_tokens_per_s) for t in traces]
    out: Metrics = {"sla_ttft_frac": float(np.mean(ttft_ok)) if traces else None}
    for g in sla.gen_tokens_per_s:
        for kind, check in GENERATION_CHECKS.items():
            met = [ok and check(t, g, sla) for t, ok in zip(traces, ttft_ok)]
            out[f"sla_{kind}frac_{g_suffix(g)}"] = float(np.mean(met)) if traces else None
    return out


# ---------------------------------------------------------------------------- aggregates

def stats(name: str, values: Iterable[float], which: Sequence[str] = LATENCY_STATS) -> Metrics:
    """``{name}_{stat}`` for stat in `which` ('mean', 'max' or 'pNN'); None for every stat when empty."""
    data = np.asarray(list(values), dtype=np.float64)
    out: Metrics = {}
    for stat in which:
        if data.size == 0:
            value = None
        elif stat == "mean":
            value = float(data.mean())
        elif stat == "max":
            value = float(data.max())
        else:
            value = float(np.percentile(data, float(stat[1:])))
        out[f"{name}_{stat}"] = value
    return out


def token_latency_percentiles(traces: Sequence[RequestTrace],
                              percentiles: Sequence[int] = TOKEN_LATENCY_PERCENTILES) -> Metrics:
    """The paper's token-latency percentiles (keys ``token_latency_s_pNN``).

    As in the published scripts: sort requests by start time, drop the first and the last, pool
    each request's inter-token gaps (the first token's latency excluded) without its last gap.
    """
    ordered = sorted(traces, key=lambda t: t.arrival_time)[1:-1]
    pooled = [gap for t in ordered for gap in inter_token_gaps(t)[:-1]]
    return stats("token_latency_s", pooled, [f"p{p}" for p in percentiles])


def step_rows(steps: Sequence[Any]) -> list[Mapping[str, Any]]:
    """Steps as mappings: the engine's StepStats records, or rows read back from steps.jsonl."""
    return [s if isinstance(s, Mapping) else vars(s) for s in steps]      # flat records: no deep copy


def step_metrics(steps: Sequence[Mapping[str, Any]]) -> Metrics:
    """Per-step size and time, and KV utilisation for steps that report it."""
    out: Metrics = {"num_steps": len(steps)}
    out |= stats("step_tokens", (s["num_tokens"] for s in steps), STEP_STATS)
    out |= stats("step_seqs", (s["num_seqs"] for s in steps), ("mean",))
    out |= stats("step_time_s", (s["duration_s"] for s in steps), STEP_STATS)
    out |= stats("kv_used_frac_of_reserved", _ratios(steps, "kv_reserved_tokens"), ("mean",))
    out |= stats("kv_used_frac_of_capacity", _ratios(steps, "kv_capacity_tokens"), ("mean", "max"))
    return out | prefix_cache_metrics(steps) | speculative_metrics(steps)


def _summed(steps: Sequence[Mapping[str, Any]]) -> Callable[[str], float]:
    """key -> its sum over the steps (a step without it counts 0)."""
    return lambda key: sum(s.get(key) or 0 for s in steps)


def prefix_cache_metrics(steps: Sequence[Mapping[str, Any]]) -> Metrics:
    """Prefix caching over the run: the share of admitted requests' tokens (and full blocks) found cached, the
    tokens that saved, cached blocks evicted and copy-on-write block copies (None: the KV manager reports none)."""
    total = _summed(steps)
    queried, blocks = total("prefix_query_tokens"), total("prefix_query_blocks")
    return {"prefix_hit_rate_tokens": total("prefix_hit_tokens") / queried if queried else None,
            "prefix_hit_rate_blocks": total("prefix_hit_blocks") / blocks if blocks else None,
            "prefix_hit_tokens": total("prefix_hit_tokens"), "kv_evictions": total("kv_evictions"),
            "kv_block_copies": total("num_block_copies")}


def speculative_metrics(steps: Sequence[Mapping[str, Any]]) -> Metrics:
    """Speculative decoding over the run: the share of proposals the target accepted, accepted proposals per
    verify (each verify also yields one token of the target's own), the share of computed tokens that were
    proposals, and the proposer's time (None: nothing was proposed)."""
    total = _summed(steps)
    proposed, verifies = total("num_proposed_tokens"), total("num_verifies")
    accepted, tokens = total("num_accepted_tokens"), total("num_tokens")
    return {"spec_verifies": verifies, "spec_proposed_tokens": proposed,
            "spec_acceptance_rate": accepted / proposed if proposed else None,
            "spec_accepted_per_verify": accepted / verifies if verifies else None,
            "spec_token_share": proposed / tokens if proposed and tokens else None,
            "spec_draft_s": total("draft_s") if proposed else None}


def _ratios(steps: Sequence[Mapping[str, Any]], denominator: str) -> list[float]:
    return [s["kv_used_tokens"] / s[denominator] for s in steps
            if s.get("kv_used_tokens") is not None and s.get(denominator)]


def summarize(traces: Sequence[RequestTrace], steps: Sequence[Any] = (),
              sla: Optional[SLAConfig] = None, *, start_time: Optional[float] = None,
              end_time: Optional[float] = None) -> Metrics:
    """All run metrics as one flat, JSON-serialisable dict (None where undefined, never NaN).

    `traces` should hold only measured requests (drop closed-loop warm-ups first). `start_time` and
    `end_time` bound the whole run for `duration_s` and `busy_frac`; without them the throughput
    window is used.
    """
    sla = sla or SLAConfig()
    sla.validate()
    steps = step_rows(steps)
    done = [t for t in traces if is_completed(t)]
    window = (max(t.finish_time for t in done) - min(t.arrival_time for t in traces)) if done else None
    per_s = (lambda count: count / window) if window else (lambda count: None)
    duration = end_time - start_time if start_time is not None and end_time is not None else window
    prompt_tokens = sum(t.prompt_tokens for t in done)
    output_tokens = sum(t.output_tokens for t in done)

    out: Metrics = {
        "num_requests": len(traces), "num_completed": len(done),
        "num_prompt_tokens": prompt_tokens, "num_output_tokens": output_tokens,
        "duration_s": duration, "window_s": window,
        "request_throughput": per_s(len(done)),
        "output_token_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(prompt_tokens + output_tokens),
    }
    out |= stats("ttft_s", map(ttft, done))
    out |= stats("tpot_s", (v for v in map(tpot, done) if v is not None))
    out |= stats("itl_s", (gap for t in done for gap in inter_token_gaps(t)))
    out |= stats("e2e_s", (t.finish_time - t.arrival_time for t in done))
    out |= stats("queue_s", (t.first_scheduled_time - t.arrival_time for t in done
                             if t.first_scheduled_time is not None))
    out |= token_latency_percentiles(done)
    out |= sla_fractions(done, sla)
    throughput = out["request_throughput"]
    for g in sla.gen_tokens_per_s:
        for kind in GENERATION_CHECKS:
            fraction = out[f"sla_{kind}frac_{g_suffix(g)}"]
            out[f"effective_{kind}throughput_{g_suffix(g)}"] = (
                None if throughput is None or fraction is None else throughput * fraction)
    out |= class_metrics(traces, window)
    out |= step_metrics(steps)
    busy = sum(s["duration_s"] for s in steps)
    out["busy_frac"] = busy / duration if steps and duration else None
    return out | disaggregation_metrics(done, steps, duration)


def disaggregation_metrics(done: Sequence[RequestTrace], steps: Sequence[Mapping[str, Any]],
                           duration: Optional[float]) -> Metrics:
    """Disaggregated prefill and decode (fastgen.disaggregated), over completed requests whose KV moved: the bytes
    moved in all, the move's time (mean, P99), the wait at the decode engine for room; per pool (the steps'
    `pool`), its steps' summed time over the run's duration (up to its number of engines, as busy_frac) and its
    mean batch. None / absent for a colocated run."""
    moved = [t for t in done if t.kv_transfer_bytes is not None]
    if not moved:
        return {"kv_transfer_bytes": None, "kv_transfer_s": None, "kv_transfer_s_p99": None}
    seconds = stats("kv_transfer_s", (t.kv_transfer_s for t in moved), ("mean", "p99"))
    out: Metrics = {"kv_transfer_bytes": sum(t.kv_transfer_bytes for t in moved),
                    "kv_transfer_s": seconds["kv_transfer_s_mean"], "kv_transfer_s_p99": seconds["kv_transfer_s_p99"]}
    out |= stats("decode_wait_s", (t.decode_wait_s for t in moved), ("mean", "p99"))
    for pool in ("prefill", "decode"):
        mine = [s for s in steps if s.get("pool") == pool]
        out[f"busy_frac_{pool}"] = sum(s["duration_s"] for s in mine) / duration if mine and duration else None
        out |= {f"{k}_{pool}": v for k, v in stats("step_seqs", (s["num_seqs"] for s in mine), ("mean",)).items()}
    return out


# ---------------------------------------------------------------------------- request classes

def meets_slo(trace: RequestTrace) -> bool:
    slo = trace.slo
    if not is_completed(trace):
        return False
    if slo.ttft_s is not None and ttft(trace) > slo.ttft_s:
        return False
    per_token = tpot(trace)
    return slo.tpot_s is None or per_token is None or per_token <= slo.tpot_s


def _key_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name)


def by_class(traces: Sequence[RequestTrace]) -> dict[str, list[RequestTrace]]:
    """The traces under key suffix "" (all) and "_<class>" (each workload class's)."""
    groups = {"": list(traces)}
    for t in traces:
        if t.request_class is not None:
            groups.setdefault("_" + _key_name(t.request_class), []).append(t)
    return groups


def jain(values: Sequence[float]) -> Optional[float]:
    """Jain's fairness index (sum x)^2 / (n sum x^2): 1 when all are equal, 1/n when one has everything; None for
    fewer than two values or none served."""
    v = np.asarray(values, dtype=float)
    return float(v.sum() ** 2 / (len(v) * (v ** 2).sum())) if len(v) > 1 and v.sum() > 0 else None


def class_metrics(traces: Sequence[RequestTrace], window: Optional[float], w_input: float = W_INPUT,
                  w_output: float = W_OUTPUT) -> Metrics:
    """SLO attainment and goodput, overall and per class, and fairness over tenants (see the module's doc)."""
    out: Metrics = {}
    for suffix, group in by_class([t for t in traces if t.slo is not None and t.slo.active]).items():
        met = sum(map(meets_slo, group))
        out[f"slo_attainment{suffix}"] = met / len(group) if group else None
        out[f"goodput{suffix}"] = met / window if window and group else None
    judged = [t for t in traces if t.finish_time is not None and t.finish_reason != "abort"]
    for suffix, group in by_class(judged).items():
        out[f"qoe_mean{suffix}"] = float(np.mean([request_qoe(t) for t in group])) if group else None
    tenants = sorted({t.tenant for t in traces})
    served = {tenant: sum(w for t in traces if t.tenant == tenant for _, w in service_events(t, w_input, w_output))
              for tenant in tenants}
    out["fairness_jain"] = jain(list(served.values()))
    out["service_gap_max"] = service_gap_max(traces, w_input, w_output) if len(tenants) > 1 else None
    return out


def request_qoe(trace: RequestTrace) -> float:
    """Andes' QoE of a finished request against its SLO's expectation (0 if it ended without its tokens)."""
    if not is_completed(trace):
        return 0.0
    return qoe(trace.arrival_time, trace.token_times, Expectation.of(trace.slo))


def service_events(trace: RequestTrace, w_input: float = W_INPUT,
                   w_output: float = W_OUTPUT) -> list[tuple[float, float]]:
    """(time, weighted tokens) of what the request was served: its prompt when first scheduled, each output token
    when it arrived."""
    events = []
    start = trace.first_scheduled_time if trace.first_scheduled_time is not None else (
        trace.token_times[0] if trace.token_times else None)
    if start is not None:
        events.append((start, w_input * trace.prompt_tokens))
    return events + [(t, w_output) for t in trace.token_times]


def _backlogged(traces: Sequence[RequestTrace]) -> list[tuple[float, float]]:
    """The union of the intervals in which the requests wait to be scheduled (arrival to first scheduling)."""
    spans = []
    for t in traces:
        start = t.first_scheduled_time if t.first_scheduled_time is not None else (
            t.token_times[0] if t.token_times else t.finish_time)
        if start is not None and start > t.arrival_time:
            spans.append((t.arrival_time, start))
    merged: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def service_gap_max(traces: Sequence[RequestTrace], w_input: float = W_INPUT,
                    w_output: float = W_OUTPUT) -> Optional[float]:
    """The largest |W_f(t1, t2) - W_g(t1, t2)| over tenant pairs f, g and intervals [t1, t2] in which both are
    backlogged (W: weighted service in the interval); None if no two tenants are ever backlogged together."""
    tenants = sorted({t.tenant for t in traces})
    backlog = {x: _backlogged([t for t in traces if t.tenant == x]) for x in tenants}
    events = {x: sorted(e for t in traces if t.tenant == x for e in service_events(t, w_input, w_output))
              for x in tenants}
    best = None
    for i, f in enumerate(tenants):
        for g in tenants[i + 1:]:
            merged = sorted([(t, w) for t, w in events[f]] + [(t, -w) for t, w in events[g]])
            for a1, b1 in backlog[f]:
                for a2, b2 in backlog[g]:
                    lo, hi = max(a1, a2), min(b1, b2)
                    if lo >= hi:
                        continue
                    gap, low, high = 0.0, 0.0, 0.0
                    for t, w in merged:
                        if lo < t <= hi:
                            gap += w
                            low, high = min(low, gap), max(high, gap)
                    best = max(best or 0.0, high - low)
    return best


# ---------------------------------------------------------------------------- rendering

def format_table(metrics: Mapping[str, Any]) -> str:
    """A compact plain-text summary of a `summarize` result, for logs and terminals."""
    def num(key: str, unit: str = "") -> str:
        value = metrics.get(key)
        return "-" if value is None else f"{value:.4g}{unit}"

    lines = [
        f"requests     {metrics.get('num_completed')}/{metrics.get('num_requests')} completed"
        f" in {num('duration_s', ' s')} (window {num('window_s', ' s')})",
        f"throughput   {num('request_throughput', ' req/s')}  {num('output_token_throughput', ' out tok/s')}"
        f"  {num('total_token_throughput', ' tok/s prompt+output')}",
        "",
        f"{'latency (s)':<14}" + "".join(f"{s:>10}" for s in LATENCY_STATS),
    ]
    for name in ("ttft", "tpot", "itl", "e2e", "queue"):
        lines.append(f"  {name:<12}" + "".join(f"{num(f'{name}_s_{s}'):>10}" for s in LATENCY_STATS))
    lines.append("token latency (paper method)  "
                 + "  ".join(f"P{p} {num(f'token_latency_s_p{p}', ' s')}" for p in TOKEN_LATENCY_PERCENTILES))
    lines += ["", f"SLA          TTFT met {num('sla_ttft_frac')}",
              f"  {'g (tok/s)':<10}{'ema frac':>10}{'effective':>11}{'cum frac':>10}{'cum eff':>10}"
              "   (effective: SLA-meeting requests/s)"]
    for key in (k for k in metrics if k.startswith("sla_frac_g")):
        g = key[len("sla_frac_"):]
        lines.append(f"  {g[1:].replace('p', '.'):<10}{num(key):>10}{num(f'effective_throughput_{g}'):>11}"
                     f"{num(f'sla_cumulative_frac_{g}'):>10}{num(f'effective_cumulative_throughput_{g}'):>10}")
    lines += ["", f"steps        {metrics.get('num_steps', 0)}  tokens/step mean {num('step_tokens_mean')}"
                  f" p50 {num('step_tokens_p50')} p95 {num('step_tokens_p95')}",
              f"step time    mean {num('step_time_s_mean', ' s')} p50 {num('step_time_s_p50', ' s')}"
              f" p95 {num('step_time_s_p95', ' s')}  busy {num('busy_frac')}",
              f"KV used      of reserved {num('kv_used_frac_of_reserved_mean')}"
              f"  of capacity mean {num('kv_used_frac_of_capacity_mean')} max {num('kv_used_frac_of_capacity_max')}",
              f"classes      SLO met {num('slo_attainment')}  goodput {num('goodput', ' req/s')}"
              f"  QoE mean {num('qoe_mean')}  fairness Jain {num('fairness_jain')}"
              f"  service gap max {num('service_gap_max')}",
              f"prefix cache hit rate tokens {num('prefix_hit_rate_tokens')} blocks {num('prefix_hit_rate_blocks')}"
              f"  evictions {metrics.get('kv_evictions', 0)}  block copies {metrics.get('kv_block_copies', 0)}"]
    return "\n".join(lines)
