"""Request classes end to end: a request's priority, tenant and SLO from the workload (workload.classes) through
the driver, the engine API, the pipeline and the server to the request the scheduler sees and its trace."""
import numpy as np
import pytest

from fastgen.conf import compose_config
from fastgen.driver.engine_target import EngineTarget
from fastgen.driver.http import _class_fields
from fastgen.request_trace import SLO
from fastgen.sampling import ParameterError, SamplingParams
from fastgen.workloads import LengthSpec, RequestClassSpec, WorkloadConfig, build_workload
from tiny import compose_engine, drain, fastgen_from_hf, tiny_hf_model

VOCAB = 211


def tiny_model():
    return fastgen_from_hf(tiny_hf_model("llama", seed=0))


def classes():
    return [RequestClassSpec("chat", 0.25, prompt=LengthSpec(dist="fixed", mean=4), priority=0, tenant="a",
                             slo=SLO(0.5, 0.1)),
            RequestClassSpec("batch", 0.75, output=LengthSpec(dist="fixed", mean=9), priority=5)]


def test_workload_classes_draw_by_share_and_carry_priority_tenant_slo():
    cfg = WorkloadConfig(num_requests=400, arrival="poisson", rate=10.0, classes=classes())
    w = build_workload(cfg, VOCAB)
    chat = [r for r in w.requests if r.request_class == "chat"]
    batch = [r for r in w.requests if r.request_class == "batch"]
    assert len(chat) + len(batch) == 400 and 70 <= len(chat) <= 130
    assert all(len(r.prompt_token_ids) == 4 and r.priority == 0 and r.tenant == "a" and r.slo == SLO(0.5, 0.1)
               for r in chat)
    assert all(r.max_new_tokens == 9 and r.priority == 5 and r.tenant == "batch" and r.slo is None for r in batch)
    # classes only add a stream: the arrival times are those of the classless workload
    plain = build_workload(WorkloadConfig(num_requests=400, arrival="poisson", rate=10.0), VOCAB)
    assert plain.arrivals.times == w.arrivals.times
    assert build_workload(cfg, VOCAB).requests == w.requests


@pytest.mark.parametrize("spec,match", [
    (RequestClassSpec("x", share=0), r"classes\[0\]\.share"),
    (RequestClassSpec("x", slo=SLO(ttft_s=-1)), r"classes\[0\]\.slo\.ttft_s"),
    (RequestClassSpec("x", priority=1.5), r"classes\[0\]\.priority"),
    (RequestClassSpec("x", output=LengthSpec(min=0)), r"classes\[0\]\.output\.min"),
])
def test_bad_classes_are_refused_naming_the_field(spec, match):
    with pytest.raises(ValueError, match=match):
        build_workload(WorkloadConfig(num_requests=4, classes=[spec]), VOCAB)


def test_shipped_class_workloads_compose():
    for name, tenants in [("priority-mix", {"chat", "batch"}), ("two-tenant", {"steady", "flood"}),
                          ("azure-two-tenant", {"conv", "code"})]:
        cfg = compose_config([f"workload={name}", "workload.num_requests=64"]).workload
        w = build_workload(cfg, VOCAB, max_model_len=4096)
        assert {r.tenant for r in w.requests} == tenants and all(r.slo is not None for r in w.requests)


def gaps_by_tenant(w):
    times = [t for _, t in sorted(w.arrivals.initial_requests())]
    out = {}
    for r, t in zip(w.requests, times):
        out.setdefault(r.tenant, []).append(t)
    return out


def test_each_class_has_its_own_arrival_process():
    """two-tenant: a steady Poisson tenant and a bursty one (Gamma shape 0.1: CV^2 about 10) that floods;
    azure-two-tenant: each tenant's requests arrive at its own trace's times, merged."""
    from fastgen.workloads.replay import load_trace
    w = build_workload(compose_config(["workload=two-tenant", "workload.num_requests=400"]).workload, VOCAB)
    cv2 = {t: np.var(np.diff(x)) / np.mean(np.diff(x)) ** 2 for t, x in gaps_by_tenant(w).items()}
    assert cv2["steady"] < 2 and cv2["flood"] > 4, cv2
    w = build_workload(compose_config(["workload=azure-two-tenant", "workload.num_requests=100"]).workload, VOCAB,
                       max_model_len=4096)
    times = gaps_by_tenant(w)
    for tenant, path in [("conv", "azure_conv.csv.gz"), ("code", "azure_code.csv.gz")]:
        assert times[tenant] == [r.arrival_time for r in load_trace(path)[:len(times[tenant])]]
    assert max(times["code"] + times["conv"]) <= load_trace("azure_conv.csv.gz")[len(times["conv"])].arrival_time
    with pytest.raises(ValueError, match="arrival=classes"):
        build_workload(WorkloadConfig(arrival="classes", classes=[RequestClassSpec("x")]), VOCAB)


def test_engine_takes_the_class_and_refuses_bad_values():
    eng = compose_engine(tiny_model()).engine
    rid = eng.add_request([1, 2, 3], SamplingParams(max_new_tokens=2), priority=-3, tenant="t1",
                          slo=SLO(ttft_s=1.0), request_class="chat")
    req = drain(eng)[rid]
    assert (req.priority, req.tenant, req.slo, req.request_class) == (-3, "t1", SLO(1.0), "chat")
    assert (req.trace.priority, req.trace.tenant, req.trace.slo, req.trace.request_class) == (-3, "t1", SLO(1.0),
                                                                                              "chat")
    for kwargs, param in [(dict(priority="high"), "priority"), (dict(priority=True), "priority"),
                          (dict(tenant=""), "tenant"), (dict(slo=SLO(tpot_s=0)), "slo.tpot_s"),
                          (dict(slo=0.5), "slo")]:
        with pytest.raises(ParameterError) as e:
            eng.add_request([1, 2], SamplingParams(max_new_tokens=2), **kwargs)
        assert e.value.param == param
    assert not eng.has_unfinished()


def test_engine_target_passes_the_class_through():
    eng = compose_engine(tiny_model()).engine
    target = EngineTarget(eng)
    w = build_workload(WorkloadConfig(num_requests=6, arrival="poisson", rate=100.0, classes=classes(),
                                      prompt=LengthSpec(mean=20), output=LengthSpec(mean=4)), VOCAB)
    for i, r in enumerate(w.requests):
        target.send(i, str(i), r, 0.0)
    done = []
    while target.busy():
        done += target.wait(None)
    assert len(done) == 6
    for i, trace in done:
        r = w.requests[i]
        assert (trace.request_class, trace.tenant, trace.priority, trace.slo) == (r.request_class, r.tenant,
                                                                                  r.priority, r.slo)


def test_http_target_sends_priority_and_user_only_when_set():
    w = build_workload(WorkloadConfig(num_requests=20, classes=classes()), VOCAB)
    chat = next(r for r in w.requests if r.request_class == "chat")
    batch = next(r for r in w.requests if r.request_class == "batch")
    assert _class_fields(chat) == {"user": "a"}
    assert _class_fields(batch) == {"priority": 5, "user": "batch"}
    assert _class_fields(build_workload(WorkloadConfig(num_requests=1), VOCAB).requests[0]) == {}


def test_pipeline_takes_a_class_per_prompt():
    from fastgen.pipeline import Pipeline
    pipe = Pipeline(compose_engine(tiny_model(), "splitfuse").engine)
    seen = []
    add = pipe.engine.add_request
    pipe.engine.add_request = lambda *a, **k: seen.append(k) or add(*a, **k)
    outs = pipe([[1, 2, 3], [4, 5]], max_new_tokens=3, priority=[1, 0], tenant="t", slo=SLO(ttft_s=2.0))
    assert [len(o.token_ids) for o in outs] == [3, 3]
    assert [(k["priority"], k["tenant"], k["slo"]) for k in seen] == [(1, "t", SLO(2.0)), (0, "t", SLO(2.0))]
    with pytest.raises(ValueError, match="priority has 3 entries for 2 prompts"):
        pipe([[1], [2]], priority=[0, 1, 2])


def test_server_takes_vllms_priority_and_openais_user_and_refuses_bad_values():
    from serving import MODEL, served
    with served() as s:
        seen = []
        add = s.engine.add_request
        s.engine.add_request = lambda *a, **k: seen.append(k) or add(*a, **k)
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
        assert s.post("/v1/completions", body | {"priority": -2, "user": "alice"}).status_code == 200
        assert s.post("/v1/completions", body).status_code == 200
        assert [(k["priority"], k["tenant"]) for k in seen] == [(-2, "user:alice"), (0, "addr:127.0.0.1")]
        for bad, param in [({"priority": "high"}, "priority"), ({"priority": 1.5}, "priority"),
                           ({"priority": 2 ** 40}, "priority"), ({"user": 7}, "user")]:
            response = s.post("/v1/completions", body | bad)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == param


def test_server_tenant_header_and_class_metrics():
    """tenant_header names the tenant before `user` (400 on a bad value); /metrics counts each tenant's and
    priority's finished requests, those meeting the server's SLO, their QoE and the fairness over tenants."""
    from serving import MODEL, serve_config, served
    with served(serve_config(tenant_header="X-Tenant", slo=SLO(ttft_s=60.0))) as s:
        seen = []
        add = s.engine.add_request
        s.engine.add_request = lambda *a, **k: seen.append(k) or add(*a, **k)
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
        assert s.post("/v1/completions", body | {"user": "bob"}, headers={"X-Tenant": "acme"}).status_code == 200
        assert s.post("/v1/completions", body | {"user": "bob", "priority": 3}).status_code == 200
        assert [(k["tenant"], k["slo"]) for k in seen] == [("tenant:acme", SLO(60.0)), ("user:bob", SLO(60.0))]
        for bad in ("", "x" * 129):
            response = s.post("/v1/completions", body, headers={"X-Tenant": bad})
            assert response.status_code == 400 and response.json()["error"]["param"] == "X-Tenant", bad
        assert s.idle()
        text = s.get("/metrics").text
    for line in ('fastgen_class_requests_finished_total{priority="0",tenant="tenant:acme"} 1.0',
                 'fastgen_class_requests_slo_met_total{priority="3",tenant="user:bob"} 1.0',
                 'fastgen_class_request_qoe_count{priority="3",tenant="user:bob"} 1.0',
                 'fastgen_tenant_service_tokens_total{tenant="tenant:acme"}'):
        assert line in text, line
    jain = float(next(x for x in text.splitlines() if x.startswith("fastgen_fairness_jain ")).split()[1])
    assert 0.5 < jain <= 1.0


def trace(rid, arrival, scheduled, tokens, *, cls=None, tenant="default", slo=None, reason="length", prompt=4):
    from fastgen.request_trace import RequestTrace
    return RequestTrace(rid, prompt, arrival, list(tokens), scheduled, tokens[-1] if tokens else None, reason,
                        request_class=cls, tenant=tenant, slo=slo)


def test_slo_attainment_and_goodput_overall_and_per_class():
    from fastgen.metrics import summarize
    slo = SLO(ttft_s=1.0, tpot_s=0.5)
    traces = [trace("0", 0.0, 0.1, [0.5, 0.9, 1.3], cls="chat", slo=slo),      # meets both
              trace("1", 0.0, 0.1, [1.5, 1.6], cls="chat", slo=slo),           # TTFT 1.5 > 1.0
              trace("2", 0.0, 0.1, [0.5, 2.5], cls="batch", slo=slo),          # TPOT 2.0 > 0.5
              trace("3", 0.0, 0.1, [0.2], cls="batch", slo=slo, reason="deadline"),   # dropped: a miss
              trace("4", 0.0, 0.1, [0.2, 0.3], cls="free")]                    # no SLO: not counted
    m = summarize(traces)
    window = 2.5
    assert m["slo_attainment"] == 0.25 and m["goodput"] == pytest.approx(1 / window)
    assert m["slo_attainment_chat"] == 0.5 and m["goodput_chat"] == pytest.approx(1 / window)
    assert m["slo_attainment_batch"] == 0.0 and m["goodput_batch"] == 0.0
    assert "slo_attainment_free" not in m and m["num_completed"] == 4
    # Andes' QoE: "0" is early (1), "1" 0.5 s late with a reader at 2 tok/s (areas 1.5 over 2.5), "3" dropped (0)
    assert m["qoe_mean_chat"] == pytest.approx(0.8) and m["qoe_mean_batch"] < 1 and m["qoe_mean_free"] == 1.0
    assert m["fairness_jain"] is None and m["service_gap_max"] is None       # one tenant
    assert summarize(traces[4:])["slo_attainment"] is None


def test_fairness_jain_and_service_gap_over_tenants():
    from fastgen.metrics import summarize
    # a and b both wait from 0 to 1 and from 0 to 2; a is served 4 + 2 x 2 by t=1, b nothing until t=2
    traces = [trace("a0", 0.0, 0.5, [0.6, 0.7], tenant="a"), trace("a1", 0.0, 1.0, [1.5], tenant="a"),
              trace("b0", 0.0, 2.0, [2.1], tenant="b")]
    m = summarize(traces)
    served = {"a": 4 + 4 + 4 + 2, "b": 4 + 2}
    total = sum(served.values())
    assert m["fairness_jain"] == pytest.approx(total ** 2 / (2 * sum(v * v for v in served.values())))
    # both backlogged over (0, 1]: a gets 4 (a0's prompt) + 2 + 2 (its tokens) + 4 (a1's prompt at 1.0)
    assert m["service_gap_max"] == pytest.approx(12.0)
    assert summarize([trace("x", 0, 0.1, [0.2], tenant="a"), trace("y", 0, 0.1, [0.2], tenant="b")])[
        "fairness_jain"] == pytest.approx(1.0)


def test_class_figures_are_drawn_for_classes_and_tenants(tmp_path):
    from fastgen.class_figures import class_figures, has_classes
    slo = SLO(ttft_s=1.0, tpot_s=0.5)
    traces = [trace("0", 0.0, 0.1, [0.5, 0.9], cls="chat", tenant="a", slo=slo),
              trace("1", 0.0, 0.2, [1.5, 1.6, 1.8], cls="batch", tenant="b")]
    assert has_classes(traces) and not has_classes(traces[:1])
    paths = class_figures(traces, tmp_path, "title")
    assert [p.name for p in paths] == ["class_latency_cdf.png", "tenant_service.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
