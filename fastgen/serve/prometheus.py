"""Prometheus metrics of one server. Each app gets its own CollectorRegistry, so several apps in one process (tests,
notebooks) never collide on metric names. The engine thread writes them (prometheus-client is thread-safe); the
/metrics endpoint reads them.

Request classes, by `tenant` and `priority` label, counted when a request finishes (fastgen.metrics' definitions):
finished requests and those meeting the server's SLO (serve `slo`; SLO attainment = met / finished, goodput =
rate(met)), Andes' QoE (a summary: its _sum / _count is qoe_mean), each tenant's VTC-weighted service (w_input=1
per prompt token, w_output=2 per output token) and Jain's index of those services (fairness_jain). VTC's
service_gap_max needs every tenant's backlog over time and is an offline metric (metrics.json) only."""
from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Summary,
                               generate_latest)

from fastgen.engine import RequestOutput
from fastgen.metrics import W_INPUT, W_OUTPUT, jain, meets_slo, request_qoe
from fastgen.request_trace import RequestTrace
from fastgen.step_stats import EngineSnapshot, StepStats

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("fastgen_requests_running", "Requests the scheduler is running", registry=r)
        self.waiting = Gauge("fastgen_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_used = Gauge("fastgen_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_free = Gauge("fastgen_kv_blocks_free", "KV cache blocks free", registry=r)
        self.requests = Counter("fastgen_requests", "Engine requests accepted (one per prompt; n choices fork inside it)",
                                registry=r)
        self.prompt_tokens = Counter("fastgen_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("fastgen_generation_tokens", "Generated tokens", registry=r)
        self.failed = Counter("fastgen_request_failures", "Accepted requests that ended with an error", registry=r)
        self.ttft = Histogram("fastgen_time_to_first_token_seconds", "Arrival to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("fastgen_inter_token_latency_seconds", "Gap between consecutive tokens of a request",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("fastgen_e2e_request_latency_seconds", "Arrival to last token of finished requests",
                             buckets=E2E_BUCKETS, registry=r)
        self.queue_time = Histogram("fastgen_request_queue_time_seconds", "Arrival to first scheduled step",
                                    buckets=TTFT_BUCKETS, registry=r)
        self.step_time = Histogram("fastgen_step_duration_seconds", "Duration of one engine step",
                                   buckets=ITL_BUCKETS, registry=r)
        self.kv_cached = Gauge("fastgen_kv_blocks_cached", "KV blocks kept only as prefix cache (evictable, "
                               "counted as free)", registry=r)
        self.prefix_hit_rate = Gauge("fastgen_prefix_cache_hit_rate", "Share of admitted requests' tokens found "
                                     "in the prefix cache, since the start", ["unit"], registry=r)
        self.kv_evictions = Counter("fastgen_kv_evictions", "Cached KV blocks evicted", registry=r)
        self._prefix = {"tokens": [0, 0], "blocks": [0, 0]}     # unit -> [hits, queries]
        by_class = ["tenant", "priority"]
        self.finished = Counter("fastgen_class_requests_finished", "Requests finished (not aborted)", by_class,
                                registry=r)
        self.slo_met = Counter("fastgen_class_requests_slo_met", "Finished requests that met the server's SLO "
                               "(serve slo): attainment = this / finished, goodput = rate(this)", by_class, registry=r)
        self.qoe = Summary("fastgen_class_request_qoe", "Andes' QoE of finished requests (fastgen.qoe; the "
                           "expectation is serve slo, else its defaults)", by_class, registry=r)
        self.service = Counter("fastgen_tenant_service_tokens", "Weighted tokens served per tenant (VTC: 1 per "
                               "prompt token, 2 per output token)", ["tenant"], registry=r)
        self.fairness = Gauge("fastgen_fairness_jain", "Jain's index of the tenants' weighted services",
                              registry=r)
        self._served: dict[str, float] = {}

    def observe_engine(self, snapshot: EngineSnapshot) -> None:
        """Sets the gauges from the engine's state."""
        self.running.set(snapshot.num_running)
        self.waiting.set(snapshot.num_waiting)
        self.kv_free.set(snapshot.kv_blocks_free)
        self.kv_used.set(snapshot.kv_blocks_total - snapshot.kv_blocks_free)

    def observe_step(self, stats: StepStats) -> None:
        """An engine step observer: the forward-pass histogram and the prefix cache."""
        self.step_time.observe(stats.duration_s)
        self.kv_cached.set(stats.kv_cached_blocks)
        self.kv_evictions.inc(stats.kv_evictions)
        for unit, hits, queries in (("tokens", stats.prefix_hit_tokens, stats.prefix_query_tokens),
                                    ("blocks", stats.prefix_hit_blocks, stats.prefix_query_blocks)):
            total = self._prefix[unit]
            total[0] += hits
            total[1] += queries
            if total[1]:
                self.prefix_hit_rate.labels(unit).set(total[0] / total[1])

    def observe_outputs(self, outputs: Sequence[RequestOutput]) -> None:
        """Counts a step's tokens and their latencies."""
        for out in outputs:
            times, new = out.trace.token_times, len(out.new_token_ids)
            if out.error is not None:
                self.failed.inc()
            if not new:
                continue
            self.generation_tokens.inc(new)
            trace = out.trace
            if len(times) == new:
                self.ttft.observe(times[0] - trace.arrival_time)
                if trace.first_scheduled_time is not None:
                    self.queue_time.observe(trace.first_scheduled_time - trace.arrival_time)
            if out.finished and out.error is None and trace.finish_time is not None:
                self.e2e.observe(trace.finish_time - trace.arrival_time)
            for i in range(max(len(times) - new, 1), len(times)):
                self.itl.observe(times[i] - times[i - 1])
        for out in outputs:
            if out.finished and out.finish_reason != "abort":
                self.observe_class(out.trace)

    def observe_class(self, trace: RequestTrace) -> None:
        """A finished request's class metrics."""
        labels = trace.tenant, str(trace.priority)
        self.finished.labels(*labels).inc()
        if trace.slo is not None and meets_slo(trace):
            self.slo_met.labels(*labels).inc()
        self.qoe.labels(*labels).observe(request_qoe(trace))
        served = W_INPUT * trace.prompt_tokens + W_OUTPUT * trace.output_tokens
        self.service.labels(trace.tenant).inc(served)
        self._served[trace.tenant] = self._served.get(trace.tenant, 0.0) + served
        fairness = jain(list(self._served.values()))
        if fairness is not None:
            self.fairness.set(fairness)

    def render(self) -> bytes:
        return generate_latest(self.registry)
