"""Disaggregated prefill and decode: exact outputs through the KV hand-off (against the co-located engine and
transformers), prefix caching on the prefill side, no leaked KV and no lost or doubled request under aborts and a
dying decode engine, the simulated transfer's charge and the link fit against Vidur's measured send/recv rows."""
import functools
import math
import os
import signal
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgen.bench import run_benchmark
from fastgen.compose import EngineConfig
from fastgen.calibration.measured import link_of, send_recv_series
from fastgen.conf import compose_config
from fastgen.deployment import DeploymentConfig, build_deployment, simulated_link
from fastgen.disaggregated import DisaggregatedEngine
from fastgen.engine_process import EngineProcess
from fastgen.kv.connector import CopyConnector, Link, ProcessConnector
from fastgen.kv import KV_MANAGERS
from fastgen.routers import ROUTERS, make_router
from fastgen.sampling import SamplingParams
from fastgen.sim.cost_model import Profile
from tiny import (compose_engine, drain, drive_with_aborts, fastgen_from_hf, reference_greedy, scheduler_config,
                  tiny_hf_model)


@functools.lru_cache(maxsize=None)
def tiny(family):
    hf = tiny_hf_model(family, seed=0)
    return hf, fastgen_from_hf(hf)


@functools.lru_cache(maxsize=None)
def workload(family, lens=(5, 40, 17, 3, 33), news=(8, 5, 10, 12, 4)):
    hf, _ = tiny(family)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 211, (n,), generator=g).tolist() for n in lens]
    return prompts, news, [reference_greedy(hf, p, n) for p, n in zip(prompts, news)]


KNOBS = {"token_budget": 32, "chunk_size": 16, "batch_size": 3}


def pools(model, prefill="splitfuse", decode="splitfuse", p=1, d=2, num_blocks=64, block_size=16,
          router="round_robin", prefix_caching=False):
    """A disaggregated deployment of in-process real engines, and its engines' KV managers."""
    pre = [compose_engine(model, prefill, num_blocks=num_blocks, block_size=block_size, **KNOBS) for _ in range(p)]
    for b in pre:
        b.kv.config.prefix_caching = prefix_caching
    dec = [compose_engine(model, decode, num_blocks=num_blocks, block_size=block_size, **KNOBS) for _ in range(d)]
    routers = [make_router(ROUTERS.config(router), n) for n in (p, d)]
    return DisaggregatedEngine([b.engine for b in pre], [b.engine for b in dec], CopyConnector(), *routers), \
        [b.kv for b in pre], [b.kv for b in dec]


def run_all(eng, prompts, news):
    ids = [eng.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in zip(prompts, news)]
    finished = drain(eng)
    return [finished[i].output_token_ids for i in ids], [finished[i] for i in ids]


@pytest.mark.parametrize("family,prefill,decode", [("llama", "splitfuse", "continuous"),
                                                   ("qwen2", "sarathi", "splitfuse")])
def test_greedy_through_the_handoff_equals_colocated_and_transformers(family, prefill, decode):
    _, model = tiny(family)
    prompts, news, ref = workload(family)
    colocated, _ = run_all(compose_engine(model, prefill, num_blocks=64, block_size=16, **KNOBS).engine,
                           prompts, news)
    deployment, pre_kv, dec_kv = pools(model, prefill, decode, p=2, d=2)
    got, reqs = run_all(deployment, prompts, news)
    assert got == ref == colocated
    assert all(r.trace.kv_transfer_bytes > 0 and len(r.trace.token_times) == n for r, n in zip(reqs, news))
    assert all(kv.num_free_blocks == kv.num_blocks for kv in pre_kv + dec_kv)
    assert all(outstanding == 0 for pool in deployment.outstanding for outstanding in pool)


def test_seeded_sampling_and_text_carry_across_the_handoff():
    """The generator's state moves with the request: a seeded sampled request draws the same tokens as on one
    engine; the detokenized text is the co-located text."""
    _, model = tiny("llama")
    prompts, news, _ = workload("llama")
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, temperature=0.9, top_p=0.9, seed=7 + i, logprobs=2)
              for i, n in enumerate(news)]

    def run(eng):
        ids = [eng.add_request(p, s) for p, s in zip(prompts, params)]
        finished = drain(eng)
        return [(finished[i].output_token_ids, [lp.token_id for lp in finished[i].logprobs]) for i in ids]
    colocated = run(compose_engine(model, "splitfuse", num_blocks=64, block_size=16, **KNOBS).engine)
    assert run(pools(model)[0]) == colocated


def test_prefix_caching_on_the_prefill_side_still_hits():
    _, model = tiny("llama")
    hf, _ = tiny("llama")
    shared = list(range(3, 51))                       # 48 tokens: 3 full blocks of 16
    prompts = [shared + [60 + i, 70 + i, 80 + i] for i in range(3)]
    deployment, pre_kv, _ = pools(model, p=1, d=1, prefix_caching=True)
    steps = []
    deployment.add_step_observer(steps.append)
    outs = []
    for p in prompts:                                  # one after the other: the later ones find the prefix cached
        outs += run_all(deployment, [p], [6])[0]
    assert outs == [reference_greedy(hf, p, 6) for p in prompts]
    prefill_hits = sum(s.prefix_hit_tokens for s in steps if s.pool == "prefill")
    assert prefill_hits == 2 * 48
    assert pre_kv[0].allocator.num_used == 0 and pre_kv[0].allocator.num_cached > 0


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example, HealthCheck.data_too_large])
@given(data=st.data())
def test_property_aborts_leak_no_kv_on_either_side_and_every_request_ends_once(data):
    _, model = tiny("llama")
    lens = data.draw(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=8))
    need = max(-(-(p + n - 1) // 8) for p, n in lens)
    p, d = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    deployment, pre_kv, dec_kv = pools(model, data.draw(st.sampled_from(["splitfuse", "sarathi", "continuous"])),
                                       data.draw(st.sampled_from(["splitfuse", "continuous"])), p=p, d=d,
                                       num_blocks=data.draw(st.integers(need, need + 8)), block_size=8,
                                       router=data.draw(st.sampled_from(["round_robin", "least_outstanding"])))
    ids, aborted, finished = drive_with_aborts(deployment, dec_kv[0], lens, data)
    for i, (_, n) in enumerate(lens):
        if ids[i] not in aborted:
            assert len(finished[ids[i]].output_token_ids) == n
    assert all(kv.num_free_blocks == kv.num_blocks and not kv.tables for kv in pre_kv + dec_kv)
    assert not deployment.transfers and not deployment.has_unfinished()


def exported(deployment, count=1):
    """Steps the prefill pool until `count` requests are on their way to a decode engine."""
    while len(deployment.transfers) < count:
        deployment.step()
    return deployment.transfers


def test_a_decode_engine_that_dies_before_the_import_hands_its_requests_to_another():
    _, model = tiny("llama")
    prompts, news, ref = workload("llama")
    deployment, pre_kv, dec_kv = pools(model, p=1, d=2)
    ids = [deployment.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True))
           for p, n in zip(prompts, news)]
    (transfer,) = exported(deployment)
    assert transfer.target == 0
    assert deployment.fail_decode(0) == []             # nothing was decoding there yet
    assert transfer.target == 1
    events, finished = [], {}
    while deployment.has_unfinished():
        for out in deployment.step():
            if out.finished:
                events.append(out.request_id)
                finished[out.request_id] = out.request
    assert sorted(events) == sorted(ids)
    assert [finished[i].output_token_ids for i in ids] == ref
    assert all(kv.num_free_blocks == kv.num_blocks for kv in pre_kv + dec_kv)


def test_with_no_decode_engine_left_a_request_fails_alone_with_a_clear_error():
    _, model = tiny("llama")
    prompts, news, ref = workload("llama")
    deployment, pre_kv, dec_kv = pools(model, p=1, d=1)
    first = deployment.add_request(prompts[0], SamplingParams(max_new_tokens=news[0], ignore_eos=True))
    exported(deployment)
    (failed,) = deployment.fail_decode(0, "out of memory")
    assert failed.request_id == first and failed.finish_reason == "error"
    assert "no decode instance is alive" in failed.error and "out of memory" in failed.error
    assert not deployment.has_unfinished() and pre_kv[0].num_free_blocks == pre_kv[0].num_blocks
    assert deployment.abort(first) is None             # gone once, not twice


def test_a_request_decoding_on_a_dying_engine_fails_alone_the_others_finish():
    _, model = tiny("llama")
    prompts, news, ref = workload("llama")
    deployment, _, dec_kv = pools(model, p=1, d=2)
    ids = [deployment.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True))
           for p, n in zip(prompts[:2], news[:2])]
    while deployment.transfers or not deployment.decode[0].has_unfinished():
        deployment.step()
    (failed,) = deployment.fail_decode(0)
    assert failed.request_id == ids[0] and "decode instance 0 failed" in failed.error
    rest = drain(deployment)
    assert list(rest) == [ids[1]] and rest[ids[1]].output_token_ids == ref[1]
    assert dec_kv[0].num_free_blocks == dec_kv[0].num_blocks


@pytest.mark.slow
def test_process_connector_moves_requests_and_their_kv_to_a_decode_engine_in_another_process():
    """The decode engine runs in a spawned process; the handoffs and their KV reach it through shared memory."""
    import torch.multiprocessing as tmp
    from decode_process import decode_in_this_process
    _, model = tiny("llama")
    prompts, news, ref = workload("llama")
    context = tmp.get_context("spawn")
    connector, results = ProcessConnector(context), context.Queue()
    child = context.Process(target=decode_in_this_process, args=(connector, results, "llama", 2, KNOBS))
    child.start()
    try:
        prefill = compose_engine(model, "splitfuse", num_blocks=64, block_size=16, **KNOBS).engine
        for i in (0, 2):
            prefill.add_request(prompts[i], SamplingParams(max_new_tokens=news[i], ignore_eos=True), str(i))
        while prefill.has_unfinished():
            for out in prefill.step():
                connector.send(prefill.export_request(out.request_id), prefill.read_kv(out.request_id))
                prefill.release(out.request_id)
        decoded = results.get(timeout=600)
    finally:
        child.join(timeout=60)
    assert child.exitcode == 0
    assert decoded == {"0": ref[0], "2": ref[2]}


def process_pools(model, d=2):
    """A disaggregated deployment whose 1 prefill and d decode engines each run in a spawned process."""
    cfg = EngineConfig(scheduler=scheduler_config("splitfuse", **KNOBS),
                       kv=KV_MANAGERS.config("blocked", block_size=16, num_blocks=64))
    deployment = build_deployment(cfg, DeploymentConfig(name="disaggregated", decode_replicas=d), model=model)
    assert all(isinstance(e, EngineProcess) and e.process.pid != os.getpid()
               for e in deployment.prefill + deployment.decode)
    return deployment


def pools_idle(engine: DisaggregatedEngine) -> bool:
    """No request and no KV block held on either pool (its live engines), nothing moving between them."""
    shots = [e.snapshot() for e in engine.prefill + [e for e, alive in zip(engine.decode, engine.alive) if alive]]
    return not engine.transfers and all(s.num_running == s.num_waiting == 0 and s.kv_blocks_free == s.kv_blocks_total
                                        for s in shots)


def test_engines_in_processes_of_their_own_decode_exactly_survive_a_killed_decode_engine_and_exit_at_close():
    """placement=process (the default for real engines): greedy outputs equal the co-located engine's and
    transformers', with the workers' timestamps on this process's clock. Then a decode process is killed while it
    decodes a request and another is bound for it: the first fails alone, the second finishes on the other decode
    engine, every request ends once and no KV block is left held. close() reaps the workers."""
    _, model = tiny("llama")
    prompts, news, ref = workload("llama")
    colocated, _ = run_all(compose_engine(model, "splitfuse", num_blocks=64, block_size=16, **KNOBS).engine,
                           prompts, news)
    deployment = process_pools(model)
    engines = deployment.prefill + deployment.decode
    try:
        assert deployment.concurrent
        start = time.perf_counter()
        got, reqs = run_all(deployment, prompts, news)
        end = time.perf_counter()
        assert got == ref == colocated
        assert all(e.snapshot().num_steps > 0 for e in engines) and pools_idle(deployment)
        for r in reqs:
            times = [r.arrival_time, *r.trace.token_times, r.trace.finish_time]
            assert start <= times[0] and times == sorted(times) and times[-1] <= end
            assert r.trace.kv_transfer_bytes > 0 and r.trace.kv_transfer_s > 0

        ids = [deployment.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True))
               for p, n in zip(prompts, news)]
        outputs = []
        while not (deployment.decode[0].has_unfinished() and any(t.target == 0 for t in deployment.transfers)):
            assert deployment.has_unfinished(), "never had a request decoding on engine 0 and one bound for it"
            outputs += deployment.step()
        decoding = {r for r, where in deployment._where.items() if where == (1, 0)} - \
            {t.handoff.request_id for t in deployment.transfers}
        bound = {t.handoff.request_id for t in deployment.transfers if t.target == 0}
        os.kill(deployment.decode[0].process.pid, signal.SIGKILL)
        deployment.decode[0].process.join(30)
        while deployment.has_unfinished():
            outputs += deployment.step()
        ends = [o for o in outputs if o.finished]
        assert sorted(o.request_id for o in ends) == sorted(ids)              # each request ends once
        failed = {o.request_id: o.error for o in ends if o.finish_reason == "error"}
        assert failed and set(failed) == decoding
        assert all("decode instance 0 failed" in e and "exited with code -9" in e for e in failed.values())
        assert all(o.request.output_token_ids == ref[ids.index(o.request_id)] for o in ends
                   if o.request_id not in failed)
        assert bound and not bound & set(failed)                            # rerouted to the live decode engine
        assert not deployment.has_unfinished() and pools_idle(deployment)
    finally:
        deployment.close()
    assert [e.process.exitcode for e in engines] == [0, -signal.SIGKILL, 0]


def test_placement_is_checked():
    with pytest.raises(ValueError, match="placement must be process .* or inline"):
        DeploymentConfig(name="disaggregated", placement="ray").validate()
    cfg = compose_config(["deployment=disaggregated"])
    assert cfg.deployment.placement == "process"
    with pytest.raises(ValueError, match="use deployment.placement=inline"):
        build_deployment(cfg, cfg.deployment, model=tiny("llama")[1], clock=time.process_time)


def test_pipeline_runs_the_disaggregated_deployment():
    import fastgen
    hf, _ = tiny("llama")
    prompts, news, ref = workload("llama")
    with fastgen.pipeline(hf, hardware="cpu", overrides=[       # inline: the processes are tested above
            "deployment=disaggregated", "deployment.placement=inline", "deployment.decode_replicas=2",
            "+deployment.prefill_scheduler.token_budget=16", "+deployment.decode_scheduler.max_seqs=4",
            "kv.num_blocks=64", "kv.block_size=16"]) as pipe:
        assert isinstance(pipe.engine, DisaggregatedEngine)
        assert pipe.engine.prefill[0]._scheduler.config.token_budget == 16
        assert pipe.engine.decode[1]._scheduler.config.max_seqs == 4
        outs = pipe(prompts[:3], max_new_tokens=list(news[:3]), ignore_eos=True)
    assert [o.token_ids for o in outs] == ref[:3]


def test_a_pool_knob_the_scheduler_lacks_is_refused_naming_it():
    cfg = compose_config(["deployment=disaggregated", "executor=simulated", "hardware=a100-80gb",
                          "model.source=llama-2-7b", "+deployment.prefill_scheduler.chunk_size=8"])
    with pytest.raises(ValueError, match=r"prefill_scheduler sets \['chunk_size'\].*token_budget"):
        build_deployment(cfg, cfg.deployment)


def test_simulated_ttft_of_a_lone_request_is_its_prefill_plus_the_link_time():
    """One request on idle simulated pools: TTFT is the co-located first step plus latency + bytes / bandwidth of
    its KV over the fitted link (tensor-parallel shards in parallel); its decode steps follow."""
    base = ["executor=simulated", "hardware=a100-80gb", "model.source=llama-2-13b", "hardware.tensor_parallel=2",
            "workload.num_requests=1", "workload.prompt.mean=1000", "workload.prompt.std_frac=0",
            "workload.output.mean=8", "workload.output.std_frac=0", "progress=false"]
    ttft = {}
    for name in ("colocated", "disaggregated"):
        cfg = compose_config(base + [f"deployment={name}"])
        m = run_benchmark(cfg, f"/tmp/fastgen-test-disagg-{name}")
        ttft[name] = m["ttft_s_mean"]
    link = simulated_link(cfg, "nvlink")
    assert link == link_of(Profile.load("a100-80gb"))
    nbytes = m["kv_transfer_bytes"]
    assert nbytes == 2 * 40 * 5120 * 2 * 1024         # K and V, 40 layers, hidden 5120, fp16, 16 blocks of 64
    assert m["kv_transfer_s"] == pytest.approx(link.seconds(nbytes, 2))
    assert ttft["disaggregated"] == pytest.approx(ttft["colocated"] + link.seconds(nbytes, 2), rel=1e-9)


@pytest.mark.parametrize("gpu,median,worst", [("a100-80gb", 0.15, 0.4), ("h100-80gb", 0.05, 0.35)])
def test_link_fit_predicts_held_out_send_recv_rows(gpu, median, worst):
    """latency + bytes / bandwidth, fitted to every second in-node send/recv size, against the others."""
    link = link_of(Profile.load(gpu))
    errors = [abs(link.seconds(r.nbytes) / (r.ms * 1e-3) - 1)
              for series, test in send_recv_series(gpu) for r, t in zip(series, test) if t]
    assert len(errors) == 496
    assert np.median(errors) < median and max(errors) < worst


def test_link_model():
    link = Link(1e-5, 100.0)
    assert link.seconds(1e9) == pytest.approx(1e-5 + 0.01)
    assert link.seconds(1e9, parallel=4) == pytest.approx(1e-5 + 0.0025)
    with pytest.raises(ValueError, match="bandwidth > 0"):
        Link(0.0, 0.0)
    assert math.isfinite(DeploymentConfig().num_engines)


# -- behind the server: one front, streaming across the hand-off ---------------------------------------------------
@pytest.fixture(scope="module")
def served_pools():
    import serving
    engine = build_deployment(serving.ENGINE_CFG, DeploymentConfig(name="disaggregated", decode_replicas=2,
                                                                   placement="inline"),
                              model=serving.tiny_model(), tokenizer=serving.tokenizer())
    with serving.served(engine=engine, reference=True) as s:
        yield s


def test_server_over_pools_streams_the_colocated_greedy_outputs(served_pools):
    from serving import MODEL, stream_text, tokenizer
    client, engine = served_pools.client(), served_pools.engine
    decode_steps = [e.snapshot().num_steps for e in engine.decode]
    prompts = ["The quick brown fox", "Once upon a time", [5, 900, 17, 3000, 42]]
    for prompt in prompts:
        expected = served_pools.reference(prompt, max_new_tokens=12, ignore_eos=True)[0]
        args = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        assert client.completions.create(**args).choices[0].text == expected.text
        text, choices, _ = stream_text(client.completions.create(**args, stream=True), chat=False)
        assert text == expected.text
        assert len(choices) == 12 and choices[-1].finish_reason == "length"   # one chunk a token: no gap, no repeat
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    template = tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = served_pools.reference(tokenizer().encode(template, add_special_tokens=False), max_new_tokens=10,
                                      ignore_eos=True)[0]
    args = dict(model=MODEL, messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    assert client.chat.completions.create(**args).choices[0].message.content == expected.text
    text, choices, _ = stream_text(client.chat.completions.create(**args, stream=True), chat=True)
    assert text == expected.text and choices[-1].finish_reason == "length"
    assert all(e.snapshot().num_steps > n for e, n in zip(engine.decode, decode_steps))  # both decode engines ran
    assert pools_idle(engine)


def test_server_over_pools_frees_kv_on_both_sides_when_a_client_disconnects(served_pools):
    import httpx
    from serving import AUTH
    engine = served_pools.engine
    body = {"model": "tiny-smollm2", "prompt": [7] * 300, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{served_pools.url}/v1/completions", headers=AUTH, timeout=60, json=body) as response:
        events = (line for line in response.iter_lines() if line)
        assert next(events).startswith("data: {")          # the first token: the request has moved to decode ...
        assert next(events).startswith("data: {")          # ... and decodes there
        assert any(e.snapshot().kv_blocks_free < e.snapshot().kv_blocks_total for e in engine.decode)
    served_pools.idle()
    assert pools_idle(engine), "the aborted request still holds KV on a pool"
    assert served_pools.post("/v1/completions", {"model": "tiny-smollm2", "prompt": "Hi", "max_tokens": 2}
                             ).status_code == 200


def test_serve_config_composes_a_disaggregated_deployment():
    from fastgen.serve import ServeConfig
    cfg = compose_config(["deployment=disaggregated", "deployment.decode_replicas=2"], config_name="serve")
    assert isinstance(cfg, ServeConfig) and cfg.deployment.disaggregated and cfg.deployment.decode_replicas == 2
    cfg.validate()
    with pytest.raises(ValueError, match="leave replicas=1"):
        compose_config(["deployment=disaggregated", "replicas=2"], config_name="serve").validate()
