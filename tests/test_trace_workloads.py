"""The shipped real traces as workloads (workload=azure-conv, azure-code, arxiv): the built requests are the file's
rows (arrival times, prompt and output lengths), replayed at the trace's own rate or scaled, or paired with an
arrival process; requests longer than the model's context follow workload.too_long."""
import csv
import gzip

import numpy as np
import pytest

from fastgen.bench import run_benchmark
from fastgen.conf import compose_config
from fastgen.workloads import build_workload, load_trace
from fastgen.workloads.replay import DATA_DIR, resolve_trace_path

VOCAB = 32000
FILES = {"azure-conv": "azure_conv.csv.gz", "azure-code": "azure_code.csv.gz", "arxiv": "arxiv_summarization.csv.gz"}


def rows(name: str) -> list[dict]:
    """The shipped file read independently of fastgen's loader."""
    with gzip.open(DATA_DIR / FILES[name], "rt", newline="") as f:
        return list(csv.DictReader(f))


def workload_config(name: str, *overrides: str):
    return compose_config([f"workload={name}", *overrides]).workload


@pytest.mark.parametrize("name", ["azure-conv", "azure-code"])
def test_azure_traces_replay_the_first_rows_at_their_times_or_scaled(name):
    file = rows(name)[:300]
    built = build_workload(workload_config(name, "workload.num_requests=300"), VOCAB)
    assert [t for _, t in sorted(built.arrivals.initial_requests())] == [float(r["arrival_time"]) for r in file]
    assert [len(r.prompt_token_ids) for r in built.requests] == [int(r["prompt_tokens"]) for r in file]
    assert [r.max_new_tokens for r in built.requests] == [int(r["output_tokens"]) for r in file]
    assert not any(r.warmup for r in built.requests) and built.clipped == built.skipped == 0
    faster = build_workload(workload_config(name, "workload.num_requests=300", "workload.time_scale=0.25"), VOCAB)
    assert [t for _, t in sorted(faster.arrivals.initial_requests())] == \
        pytest.approx([0.25 * float(r["arrival_time"]) for r in file])
    assert [r.prompt_token_ids for r in faster.requests] == [r.prompt_token_ids for r in built.requests]


def test_requests_longer_than_the_context_are_clipped_or_skipped_and_counted():
    file = [(int(r["prompt_tokens"]), int(r["output_tokens"])) for r in rows("azure-code")]
    limit, n = 4096, 400
    too_long = [p + o > limit for p, o in file]
    clipped = build_workload(workload_config("azure-code", f"workload.num_requests={n}"), VOCAB, max_model_len=limit)
    assert clipped.clipped == sum(too_long[:n]) > 0 and clipped.skipped == 0
    for (p, o), over, request in zip(file, too_long, clipped.requests):
        assert request.max_new_tokens == o
        assert len(request.prompt_token_ids) == (limit - o if over else p)

    skipped = build_workload(workload_config("azure-code", f"workload.num_requests={n}", "workload.too_long=skip"),
                             VOCAB, max_model_len=limit)
    kept = [i for i, over in enumerate(too_long) if not over][:n]
    assert skipped.skipped == sum(too_long[:kept[-1]]) and skipped.clipped == 0
    assert [len(r.prompt_token_ids) for r in skipped.requests] == [file[i][0] for i in kept]
    times = [float(r["arrival_time"]) for r in rows("azure-code")]
    assert [t for _, t in sorted(skipped.arrivals.initial_requests())] == [times[i] for i in kept]

    with pytest.raises(ValueError, match=r"row \d+: prompt \(\d+ tokens\).*too_long=clip or skip"):
        build_workload(workload_config("azure-code", f"workload.num_requests={n}", "workload.too_long=error"),
                       VOCAB, max_model_len=limit)
    with pytest.raises(ValueError, match="synthetic"):
        build_workload(workload_config("paper", "workload.too_long=skip"), VOCAB, max_model_len=limit)


def test_arxiv_lengths_are_paired_with_an_arrival_process():
    file = rows("arxiv")
    poisson = build_workload(workload_config("arxiv", "workload.num_requests=200", "workload.rate=4"), VOCAB,
                             max_model_len=4096)
    assert [(len(r.prompt_token_ids), r.max_new_tokens) for r in poisson.requests] == \
        [(int(r["prompt_tokens"]), int(r["output_tokens"])) for r in file[:200]]
    times = [t for _, t in sorted(poisson.arrivals.initial_requests())]
    assert times[0] == 0 and np.all(np.diff(times) >= 0) and 199 / times[-1] == pytest.approx(4, rel=0.25)
    closed = build_workload(workload_config("arxiv", "workload.arrival=closed_loop", "workload.clients=4",
                                            "workload.num_requests=10"), VOCAB)
    assert [r.warmup for r in closed.requests] == [True] * 4 + [False] * 10
    assert [r.max_new_tokens for r in closed.requests] == [int(r["output_tokens"]) for r in file[:14]]
    with pytest.raises(ValueError, match="28257 rows but the workload needs 30000"):
        build_workload(workload_config("arxiv", "workload.num_requests=30000"), VOCAB)
    with pytest.raises(ValueError, match="arrival_time.*arrival process"):
        build_workload(workload_config("arxiv", "workload.arrival=trace"), VOCAB)


def test_shipped_traces_are_found_by_name_and_unknown_names_list_them(tmp_path):
    assert resolve_trace_path("azure_conv.csv.gz") == DATA_DIR / "azure_conv.csv.gz"
    assert len(load_trace("azure_code.csv.gz")) == 8819
    with pytest.raises(FileNotFoundError, match="azure_conv.csv.gz"):
        resolve_trace_path("no-such-trace.csv")


def test_simulated_run_of_a_real_trace_reports_clipped_requests(tmp_path):
    cfg = compose_config(["executor=simulated", "progress=false", "model.source=llama-2-7b", "hardware=a100-80gb",
                          "workload=azure-code", "workload.num_requests=24"])
    metrics = run_benchmark(cfg, tmp_path)
    over = sum(int(r["prompt_tokens"]) + int(r["output_tokens"]) > 4096 for r in rows("azure-code")[:24])
    assert metrics["num_completed"] == 24 and metrics["workload_clipped"] == over > 0
