"""One bad request harms only itself, measured: a neighbour's worst inter-token gap at the client, with and without
four 1 MB prompts and two maximal-stop-list requests arriving while it streams (issue 18's target: within 2x).

    python experiments/serve_neighbour_gap.py                      # SmolLM2-135M on this CPU, 5 rounds
    python experiments/serve_neighbour_gap.py --rounds 3 --tokens 48

The server is `python -m fastgen.serve` (default limits) in its own process on a loopback port. Each round streams
the neighbour (greedy, ignore_eos) three times: alone; with two ordinary requests arriving a few tokens in (the
same prompt and length as the stop-list ones, no stop strings: what two more sequences in the batch cost anyway);
and attacked: four ~1 MB prompts (refused by the character limit, after the body is read and parsed) and two
requests with MAX_STOP_STRINGS stop strings of MAX_STOP_STRING_CHARS characters (accepted: they generate beside the
neighbour, matching their stops at every token). The phases alternate, so machine load drifts into all alike; the
figures are ratios of the medians of the rounds' worst gaps. Results go to --out (results.json, results.md).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from peers import ROOT, start_server

from fastgen.peers.servers import free_port, stop
from fastgen.sampling import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

KEY = "neighbour-gap"
PHASES = ("alone", "ordinary", "attacked")


def start(model: str) -> tuple[subprocess.Popen, str]:
    url = f"http://127.0.0.1:{free_port()}"
    server, _ = start_server([sys.executable, "-m", "fastgen.serve", f"model.source={model}",
                              f"port={url.rsplit(':', 1)[1]}"], url, None,
                             env={**os.environ, "FASTGEN_API_KEY": KEY, "PYTHONPATH": str(ROOT)})
    return server, url


async def neighbour(client: httpx.AsyncClient, model: str, tokens: int, started: asyncio.Event) -> list[float]:
    """The neighbour's token arrival times."""
    body = {"model": model, "prompt": "The history of the printing press", "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    times = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                times.append(time.perf_counter())
                if len(times) == 4:
                    started.set()
    return times


async def others(client: httpx.AsyncClient, model: str, phase: str) -> list[int]:
    """What arrives while the neighbour streams: two ordinary requests, or the attack."""
    stops = [f"{i:02d}" + "~" * (MAX_STOP_STRING_CHARS - 2) for i in range(MAX_STOP_STRINGS)]
    ordinary = {"model": model, "prompt": "Tell me a story", "max_tokens": 32, "ignore_eos": True}
    if phase == "ordinary":
        answers = await asyncio.gather(*(client.post("/v1/completions", json=ordinary) for _ in range(2)))
    else:
        big = json.dumps({"model": model, "prompt": "x " * 500_000, "max_tokens": 8}).encode()   # ~1 MB of JSON
        answers = await asyncio.gather(*(client.post("/v1/completions", content=big) for _ in range(4)),
                                       *(client.post("/v1/completions", json=ordinary | {"stop": stops})
                                         for _ in range(2)))
    return [a.status_code for a in answers]


async def one_round(url: str, model: str, tokens: int, phase: str) -> dict:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers) as client:
        started = asyncio.Event()
        stream = asyncio.ensure_future(neighbour(client, model, tokens, started))
        statuses = None
        if phase != "alone":
            await started.wait()
            statuses = await others(client, model, phase)
        times = await stream
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"worst_gap_s": max(gaps), "median_gap_s": statistics.median(gaps), "tokens": len(times),
            "attack_statuses": statuses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments/results/serve_neighbour_gap")
    args = parser.parse_args()
    load_before = os.getloadavg()
    server, url = start(args.model)
    try:
        asyncio.run(one_round(url, args.model, 8, "ordinary"))        # warm-up
        rounds = {phase: [] for phase in PHASES}
        for _ in range(args.rounds):
            for phase in PHASES:
                rounds[phase].append(asyncio.run(one_round(url, args.model, args.tokens, phase)))
    finally:
        stop(server, 60)
    worst = {p: statistics.median(r["worst_gap_s"] for r in rs) for p, rs in rounds.items()}
    median = {p: statistics.median(r["median_gap_s"] for r in rs) for p, rs in rounds.items()}
    result = {"model": args.model, "rounds": rounds, "median_worst_gap_s": worst, "median_gap_s": median,
              "ratio_worst_gap": worst["attacked"] / worst["alone"],
              "ratio_worst_gap_vs_ordinary": worst["attacked"] / worst["ordinary"], "load_before": load_before,
              "load_after": os.getloadavg(), "cpu_count": os.cpu_count()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    lines = ["| neighbour | median of worst gap (ms) | median gap (ms) |", "| --- | --- | --- |"]
    lines += [f"| {p} | {worst[p] * 1e3:.1f} | {median[p] * 1e3:.1f} |" for p in rounds]
    lines += ["", f"worst-gap ratio attacked / alone: {result['ratio_worst_gap']:.2f} (target <= 2); attacked / "
                  f"ordinary: {result['ratio_worst_gap_vs_ordinary']:.2f}; attack answers "
                  f"{rounds['attacked'][0]['attack_statuses']}; {args.rounds} rounds, {args.tokens} tokens, "
                  f"{args.model}; load average before {load_before[0]:.1f}, after {result['load_after'][0]:.1f} "
                  f"on {os.cpu_count()} cores"]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
