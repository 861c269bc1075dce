"""OpenVINO GenAI's ContinuousBatchingPipeline on given token ids: the peer side of fastgen.peers.openvino.

Runs inside OpenVINO's own virtual environment (never imports fastgen):

    /work/venvs/openvino/bin/python fastgen/peers/openvino_worker.py job.json result.json

job.json: {"model": OpenVINO IR dir, "scheduler": {SchedulerConfig fields}, "properties": {CPU plugin properties},
           "runs": {name: {"warmup": [[ids, max_new], ...], "requests": [[ids, max_new], ...]}, ...}}
result.json: {"openvino_genai": version, "startup_s", "scheduler", "properties",
              "runs": {name: {"wall_s", "outputs": [[ids], ...]}}}

The pipeline is built once (its start-up and compilation are timed apart) and runs each workload in turn: its warm-up
requests, then every request submitted at once (offline throughput), greedy, EOS ignored.
"""
from __future__ import annotations

import json
import sys
import time


def main(job_path: str, result_path: str) -> None:
    job = json.loads(open(job_path).read())
    start = time.perf_counter()
    import numpy as np
    import openvino as ov
    import openvino_genai as genai

    scheduler = genai.SchedulerConfig()
    for key, value in job["scheduler"].items():
        setattr(scheduler, key, value)
    pipe = genai.ContinuousBatchingPipeline(job["model"], scheduler, "CPU", job["properties"])
    startup = time.perf_counter() - start

    def generate(reqs):
        prompts = [ov.Tensor(np.array([ids], dtype=np.int64)) for ids, _ in reqs]
        configs = []
        for _, n in reqs:
            config = genai.GenerationConfig()
            config.max_new_tokens, config.min_new_tokens, config.ignore_eos, config.do_sample = n, n, True, False
            configs.append(config)
        return [list(r.m_generation_ids[0]) for r in pipe.generate(prompts, configs)]

    runs = {}
    for name, run in job["runs"].items():
        generate(run["warmup"])
        start = time.perf_counter()
        outputs = generate(run["requests"])
        runs[name] = {"wall_s": time.perf_counter() - start, "outputs": outputs}
    result = {"openvino_genai": genai.__version__, "startup_s": startup, "scheduler": job["scheduler"],
              "properties": job["properties"], "runs": runs}
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: openvino_worker.py job.json result.json")
    main(sys.argv[1], sys.argv[2])
