"""Replicated serving (fastgen.serve.replicas): two engine replicas on Ray Serve behind the server's own HTTP app,
compared with the single-process server over the same tiny random model (saved to a directory, so each replica
builds its engine with build_engine(cfg) like `python -m fastgen.serve replicas=2` does). One local Ray instance
(2 CPUs) and one deployment serve the whole module; Ray is shut down at the end and must leave no process behind."""
import asyncio
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
from fastgen.routers import ROUTERS, make_router
from fastgen.serve.replicas import ReplicaSet, rank_replicas
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


def config(model_dir, **knobs):
    return serve_config(model=ModelConfig(source=model_dir), scheduler=ENGINE_CFG.scheduler, kv=ENGINE_CFG.kv,
                        hardware=HardwareConfig(threads=1), **knobs)


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
            r = await client.completions.create(model=MODEL, prompt=f"Request {i}", max_tokens=24, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
            tokens = 0
            async for chunk in r:
                tokens += len(chunk.choices)
            return "ok" if tokens == 24 else f"short {tokens}"
        except openai.APIError as e:
            return f"{getattr(e, 'status_code', 'stream')}: {e.message}"

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
