"""Replicated serving (fastgen.serve.replicas): two engine replicas on Ray Serve behind the server's own HTTP app,
compared with the single-process server over the same tiny random model (saved to a directory, so each replica
builds its engine with build_engine(cfg) like `python -m fastgen.serve replicas=2` does). One local Ray instance
(2 CPUs) serves the whole module: one deployment for most tests, a second beside it (`queued`) where requests wait
in their replica; Ray is shut down at the end and must leave no process behind."""
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import psutil
import pytest
import ray
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from fastgen.compose import build_engine
from fastgen.config import HardwareConfig, ModelConfig
from fastgen.routers import ROUTERS, Router, make_router
from fastgen.schedulers import SCHEDULERS
from fastgen.serve.config import ReplicaConfig
from fastgen.serve.replicas import FastgenRequestRouter, ReplicaSet, rank_replicas
from serving import API_KEY, ENGINE_CFG, MODEL, numbered_stream, serve_config, served, tokenizer
from test_serve import FAULTS
from tiny import tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=len(tokenizer()), max_position_embeddings=512)
    AutoModelForCausalLM.from_config(config, attn_implementation="eager").save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    return str(directory)


BLOCKER_TOKENS = 400       # a request that keeps a `queued` replica busy for a while (prompt + this <= 512)


def config(model_dir, **knobs):
    return serve_config(**{"model": ModelConfig(source=model_dir), "scheduler": ENGINE_CFG.scheduler,
                           "kv": ENGINE_CFG.kv, "hardware": HardwareConfig(threads=1)} | knobs)


@pytest.fixture(scope="module")
def single(model_dir):
    cfg = config(model_dir)
    with served(cfg, build_engine(cfg)) as s:
        yield s


def ray_pids() -> set[int]:
    """The processes of the Ray instance this process started (GCS, raylet, workers, ...)."""
    node = ray._private.worker._global_node
    pids = {p.process.pid for infos in node.all_processes.values() for p in infos}
    raylet = psutil.Process(next(p.process.pid for p in node.all_processes["raylet"]))
    return pids | {c.pid for c in raylet.children(recursive=True)}


@pytest.fixture(scope="module")
def replicated(model_dir):
    assert not ray.is_initialized()
    cfg = config(model_dir, replicas=2, router=ROUTERS.config("round_robin"))
    backend = ReplicaSet(cfg)
    pids = ray_pids()
    with served(cfg, backend) as s:
        yield s
    assert not ray.is_initialized()
    gone = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=15)[1]
    assert not gone, f"Ray left processes behind: {[p.cmdline()[:2] for p in gone]}"


@pytest.fixture(scope="module")
def queued(model_dir, replicated):
    """A second deployment on `replicated`'s Ray (its own application and board, no CPU reserved) whose engines
    run one sequence a step (scheduler.max_seqs=1): a request sent to a busy replica waits there, accepted and
    without a token, while the one before it runs. least_outstanding routes it unless a test says otherwise."""
    cfg = config(model_dir, replicas=2, max_tokens_limit=BLOCKER_TOKENS, router=ROUTERS.config("least_outstanding"),
                 scheduler=SCHEDULERS.config("splitfuse", token_budget=256, max_seqs=1),
                 replica=ReplicaConfig(num_cpus=0, name="fastgen-queued"))
    with served(cfg, ReplicaSet(cfg)) as s:
        assert wait_for(lambda: idle_replicas(s)), s.get("/health").json()     # both report
        yield s


def per_replica(s, name: str) -> dict[str, float]:
    """Each replica's value of a metric family (counters without _total), from the front's /metrics."""
    text = s.get("/metrics").text
    family = next(f for f in text_string_to_metric_families(text) if f.name == name)
    return {x.labels["replica"]: x.value for x in family.samples if x.name in (name, name + "_total")}


def wait_for(predicate, timeout_s=20.0, every_s=0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    return predicate()


def idle_replicas(s) -> dict | None:
    """/health once every replica reports no request and its whole KV pool free."""
    body = s.get("/health").json()
    reps = [r for r in body["replicas"].values() if r["status"] == "ok"]
    if body["status"] == "ok" and all(r["running"] == r["waiting"] == 0 and r["kv_blocks_free"] ==
                                      r["kv_blocks_total"] for r in reps):
        return body
    return None


def ray_router(s) -> FastgenRequestRouter:
    """The front's request router, as Ray built it from the deployment's RequestRouterConfig (Ray has no public way
    to it: through the handle's router wrapper)."""
    return s.engine.handle._router._asyncio_router.request_router


def outstanding(s) -> tuple[list[str], list[int]]:
    """The replicas in the fastgen router's order and Ray's outstanding requests at each: what the router is given."""
    router = ray_router(s)
    replicas, counts = router.ordered(list(router.curr_replicas.values()))
    return [r.replica_id.unique_id for r in replicas], counts


def route_with(s, name: str) -> tuple[list[str], Router]:
    """Has the front's request router decide with a new `name` router (Ray's own initialize_state call) once both
    replicas serve and nothing is outstanding; returns the replicas in its order and a twin of the router: given
    the same counts, the twin picks what it picks."""
    ready = wait_for(lambda: (o := outstanding(s)) and len(o[0]) == 2 and o[1] == [0, 0]
                     and set(o[0]) <= set(per_replica(s, "fastgen_requests")) and o[0], timeout_s=60)
    assert ready, (outstanding(s), s.get("/health").json())
    ray_router(s).initialize_state(router={"name": name})
    return ready, make_router(ROUTERS.config(name), 2)


async def streamed(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> openai.AsyncStream:
    """A greedy completion stream of exactly max_tokens tokens, once its replica's engine has accepted it."""
    return await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})


async def ended(stream: openai.AsyncStream) -> tuple[str, list[str]]:
    """How a completion stream ended ("ok", or "<status>: <message>") and the tokens' texts it carried."""
    texts = []
    try:
        async for chunk in stream:
            texts += [c.text for c in chunk.choices]
        return "ok", texts
    except openai.APIError as e:
        return f"{getattr(e, 'status_code', 'stream')}: {e.message}", texts


def greedy(s, prompt: str, max_tokens: int) -> str:
    with s.client() as client:
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text


def test_router_adapter_ranks_the_routers_choice_first():
    """What FastgenRequestRouter.choose_replicas returns to Ray: the fastgen router's pick, then the others."""
    rr = make_router(ROUTERS.config("round_robin"), 3)
    assert [rank_replicas(rr, "abc", [0, 0, 0]) for _ in range(4)] == [[0, 1, 2], [1, 0, 2], [2, 0, 1], [0, 1, 2]]
    lor = make_router(ROUTERS.config("least_outstanding"), 3)
    assert rank_replicas(lor, "abc", [4, 1, 2]) == [1, 0, 2]


def test_two_replicas_both_serve_round_robin(replicated):
    before = wait_for(lambda: (r := per_replica(replicated, "fastgen_requests")) and len(r) == 2 and r)
    assert len(before) == 2
    with replicated.client() as client:
        for i in range(8):
            client.completions.create(model=MODEL, prompt=f"Hello {i}", max_tokens=3, temperature=0)

    def spread():
        now = per_replica(replicated, "fastgen_requests")
        delta = sorted(now[r] - before[r] for r in before)
        return delta if sum(delta) == 8 else None
    assert wait_for(spread) == [4, 4]          # round-robin: exactly half each


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_outputs_equal_the_single_process_server(replicated, single, stream):
    def run(s):
        out = []
        with s.client() as client:
            for prompt in ["The quick brown fox", [5, 900, 17, 3000, 42], "Once upon a time", "1, 2, 3,"]:
                r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                              logprobs=2, stream=stream, extra_body={"ignore_eos": True})
                chunks = list(r) if stream else [r]
                out.append([(c.text, c.logprobs.tokens, c.finish_reason) for ch in chunks for c in ch.choices])
            chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi there"}],
                                                  max_tokens=8, temperature=0, n=2, seed=3)
            out.append([(c.message.content, c.finish_reason) for c in chat.choices])
        return out
    assert run(replicated) == run(single)


def test_32_concurrent_streams_complete_and_free_every_replicas_kv(replicated):
    async def main():
        async with openai.AsyncOpenAI(base_url=f"{replicated.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(numbered_stream(client, i) for i in range(32)))

    before = per_replica(replicated, "fastgen_requests")
    results = asyncio.run(main())
    assert all((chunks, finish, used) == (n, "length", n) for n, chunks, finish, used in results)
    health = wait_for(lambda: idle_replicas(replicated))
    assert health and len(health["replicas"]) == 2, replicated.get("/health").json()
    after = per_replica(replicated, "fastgen_requests")
    assert sum(after.values()) - sum(before.values()) == 32 and all(after[r] > before[r] for r in before)


@pytest.mark.parametrize("path,body,status,words", FAULTS, ids=[f"{i}-{f[3]}" for i, f in enumerate(FAULTS)])
def test_bad_input_gets_the_single_process_servers_4xx(replicated, single, path, body, status, words):
    def ask(s):
        r = s.post(path, content=body) if isinstance(body, bytes) else s.post(path, body)
        return r.status_code, r.json()
    assert ask(replicated) == ask(single) and ask(replicated)[0] == status


def test_health_and_metrics_report_each_replica(replicated):
    health = replicated.get("/health").json()
    assert health["status"] == "ok" and len(health["replicas"]) == 2
    assert all(r["status"] == "ok" and r["kv_blocks_total"] == 512 for r in health["replicas"].values())
    for name in ("fastgen_requests_running", "fastgen_requests_waiting", "fastgen_kv_blocks_used",
                 "fastgen_generation_tokens", "fastgen_requests"):
        assert set(per_replica(replicated, name)) == set(health["replicas"]), name


def test_a_killed_replica_is_restarted_and_the_deployment_keeps_answering(replicated):
    """SIGKILL one replica's process while requests stream: every request either succeeds (if it had no token
    yet it is sent to the live replica) or ends with a 503 naming the dead replica; Ray starts a new replica and
    both serve again."""
    health = wait_for(lambda: idle_replicas(replicated))
    victim, pid = next((rid, r["pid"]) for rid, r in health["replicas"].items())
    timeline = []
    t0 = time.monotonic()

    async def one(client, i):
        try:
            result, texts = await ended(await streamed(client, f"Request {i}", 24))
        except openai.APIError as e:        # refused before its stream began
            return f"{e.status_code}: {e.message}"
        return f"short {len(texts)}" if result == "ok" and len(texts) != 24 else result

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{replicated.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=60) as client:
            first = [asyncio.ensure_future(one(client, i)) for i in range(8)]
            await asyncio.sleep(0.3)
            os.kill(pid, signal.SIGKILL)
            timeline.append((time.monotonic() - t0, f"SIGKILL replica {victim} (pid {pid})"))
            during = [asyncio.ensure_future(one(client, 100 + i)) for i in range(8)]
            return await asyncio.gather(*first, *during)

    results = asyncio.run(main())
    timeline.append((time.monotonic() - t0, f"16 requests done: {dict((r, results.count(r)) for r in set(results))}"))
    assert all(r == "ok" or ("503" in r or "replica" in r) and "replica" in r for r in results), results
    assert results.count("ok") >= 8          # at least the ones sent to the live replica or retried

    def restarted():
        body = replicated.get("/health").json()
        ok = [rid for rid, r in body["replicas"].items() if r["status"] == "ok"]
        return ok if len(ok) == 2 and victim not in ok else None
    new = wait_for(restarted, timeout_s=60, every_s=0.25)
    timeline.append((time.monotonic() - t0, f"/health: 2 replicas ok again: {new}"))
    assert new, replicated.get("/health").json()
    before = per_replica(replicated, "fastgen_requests")

    def both_serve():
        with replicated.client() as client:
            assert client.completions.create(model=MODEL, prompt="After", max_tokens=2).choices[0].text
        now = per_replica(replicated, "fastgen_requests")
        return all(now.get(r, 0) > before.get(r, 0) for r in new)
    assert wait_for(both_serve, timeout_s=30)       # the handle routes to the new replica too
    timeline.append((time.monotonic() - t0, "both replicas answered requests"))
    print("\nfailover timeline:\n" + "\n".join(f"  t={t:6.2f}s  {what}" for t, what in timeline))


@pytest.mark.parametrize("name", ["least_outstanding", "power_of_two", "random"])
def test_each_router_decides_where_ray_sends_requests(queued, single, name):
    """Through Ray's request-router hook, with Ray's outstanding counts: while a long request keeps one replica
    busy, each of 4 requests sent one after another goes where the router, given those counts, says (its twin
    tells), so least_outstanding and power_of_two (both replicas drawn) never pick the busy one (random may: that
    request waits for the long one to end); the answers are the single-process server's."""
    ids, twin = route_with(queued, name)
    before = per_replica(queued, "fastgen_requests")
    busy = twin.choose([0, 0])
    picks, texts = [busy], []

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{queued.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=60) as client:
            blocker = await streamed(client, "Busy", BLOCKER_TOKENS)
            for i in range(4):      # each once the one before is done
                load = [int(k == busy and busy not in picks[1:]) for k in range(2)]
                assert wait_for(lambda: outstanding(queued)[1] == load, timeout_s=10), (outstanding(queued), load)
                picks.append(twin.choose(load))
                _, chunks = await ended(await streamed(client, f"Routed {i}", 6))
                texts.append("".join(chunks))
            await blocker.close()
    asyncio.run(main())
    if name != "random":
        assert busy not in picks[1:]
    expected = {rid: picks.count(k) for k, rid in enumerate(ids)}

    def sent():
        now = per_replica(queued, "fastgen_requests")
        return {rid: now[rid] - before[rid] for rid in ids}
    assert wait_for(lambda: sent() == expected, timeout_s=10), (sent(), expected, picks)
    assert texts == [greedy(single, f"Routed {i}", 6) for i in range(4)]


@pytest.mark.parametrize("retries", [2, 0])
def test_a_request_whose_replica_dies_before_its_first_token_is_sent_again(queued, single, caplog, retries):
    """A request waits in its replica behind a running one (max_seqs=1) when that replica is SIGKILLed: with
    replica.retries=2 it is sent again, to the other replica, and answers in full what the single-process server
    does (the front logs the resend); with replica.retries=0 it ends with the 503. The running one, already
    streaming, ends with the 503 either way."""
    ids, _ = route_with(queued, "least_outstanding")
    victim_pid = queued.get("/health").json()["replicas"][ids[0]]["pid"]
    front = queued.engine.cfg.replica       # the front reads replica.retries when a request loses its replica
    configured, front.retries = front.retries, retries

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{queued.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=60) as client:
            running = await streamed(client, "Busy 0", BLOCKER_TOKENS)     # [0, 0]: replica 0, running
            other = await streamed(client, "Busy 1", BLOCKER_TOKENS)       # [1, 0]: replica 1
            waiting = await streamed(client, "Sent again", 8)              # [1, 1]: replica 0, behind `running`
            load = outstanding(queued)[1]
            os.kill(victim_pid, signal.SIGKILL)
            return load, await asyncio.gather(ended(running), ended(other), ended(waiting))
    try:
        with caplog.at_level(logging.WARNING, logger="fastgen.serve.replicas"):
            load, ((running, _), (other, other_texts), (waiting, texts)) = asyncio.run(main())
    finally:
        front.retries = configured
    resent = [r.getMessage() for r in caplog.records if "sending it again" in r.getMessage()]
    assert load == [2, 1]
    assert "after its first token" in running, running
    assert (other, len(other_texts)) == ("ok", BLOCKER_TOKENS)
    if retries:
        assert waiting == "ok" and "".join(texts) == greedy(single, "Sent again", 8), (waiting, texts)
        assert len(resent) == 1 and "died before its first token" in resent[0], resent
    else:
        assert "tried 1 replicas" in waiting and not texts, waiting
        assert not resent, resent


@pytest.mark.slow
def test_cli_serves_replicas_and_sigterm_ends_streams_and_ray(model_dir):
    """`python -m fastgen.serve replicas=2 router=power_of_two`: both replicas serve; SIGTERM ends a running stream
    with the server_shutdown event and [DONE] after shutdown_grace_s, and no process of the server's is left."""
    port = 18000 + os.getpid() % 1000
    server = subprocess.Popen([sys.executable, "-m", "fastgen.serve", "replicas=2", "router=power_of_two",
                               f"model.source={model_dir}", "hardware.threads=1", f"port={port}",
                               "shutdown_grace_s=2"], env=os.environ | {"FASTGEN_API_KEY": API_KEY})
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: server.poll() is None and _ok(f"{url}/health"), timeout_s=300, every_s=1)
        children = psutil.Process(server.pid).children(recursive=True)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        body = {"model": model_dir, "prompt": "Hi", "max_tokens": 400, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            server.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data:")]
        assert "server_shutdown" in rest[-2] and rest[-1] == "data: [DONE]"
        server.wait(60)
        gone = psutil.wait_procs([c for c in children if c.is_running()], timeout=15)[1]
        assert not gone, [p.cmdline()[:2] for p in gone]
    finally:
        if server.poll() is None:
            server.kill()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
