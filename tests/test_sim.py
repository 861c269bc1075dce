"""The simulator: cost-model sanity (roofline), KV pool sizing, simulated runs of every scheduler and KV manager,
calibration (fit and a real-vs-simulated fidelity check), and the benchmark with executor=simulated."""
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from fastgen.bench import run_benchmark
from fastgen.conf import compose_config
from fastgen.driver import EngineTarget, run_workload
from fastgen.executors.simulated import SimulatedExecutor, kv_pool_blocks
from fastgen.kv.manager import KV_MANAGERS, make_kv_manager
from fastgen.engine import LLMEngine
from fastgen.ragged import BlockSwap, SeqChunk
from fastgen.schedulers import SCHEDULERS, make_scheduler
from fastgen.sim import BatchShape, CostModel, CPUClock, Profile, model_spec
from fastgen.calibration.calibrate import fit, grid
from fastgen.calibration.calibrate import main as calibrate
from fastgen.workloads import build_workload

ROOT = Path(__file__).resolve().parent.parent
SIM = ["executor=simulated", "progress=false"]
SMALL = ["workload.num_requests=12", "workload.clients=4", "workload.prompt.mean=900", "workload.output.mean=24",
         "workload.output.max=64"]


def cost(model="llama-2-7b", hardware="a100-80gb", tp=1, profile=None, *overrides) -> CostModel:
    cfg = compose_config([f"hardware={hardware}", f"hardware.tensor_parallel={tp}", "executor=simulated", *overrides])
    return CostModel(model_spec(model), cfg.hardware.sim, cfg.hardware.dtype, tp, profile)


def decodes(n: int, context: int) -> BatchShape:
    return BatchShape.of([1] * n, [context] * n)


def test_paper_model_shapes():
    billions = {name: model_spec(name).num_params / 1e9 for name in ("llama-2-7b", "llama-2-13b", "llama-2-70b",
                                                                     "mistral-7b")}
    assert billions == pytest.approx({"llama-2-7b": 6.74, "llama-2-13b": 13.0, "llama-2-70b": 69.0,
                                      "mistral-7b": 7.24}, rel=0.01)
    assert set(model_spec("mistral-7b").windows) == {4096} and model_spec("llama-2-70b").num_kv_heads == 8


def test_roofline_decode_is_bandwidth_bound_and_large_prefill_compute_bound():
    model = cost()
    decode = model.breakdown(decodes(8, 1024))
    prefill = model.breakdown(BatchShape.of([4096], [4096]))
    assert decode["linear_memory_s"] > 1.5 * decode["linear_compute_s"]
    assert prefill["linear_compute_s"] > 5 * prefill["linear_memory_s"]
    weights_s = 6.5e9 * 2 / 2039e9                        # 7B fp16 weights streamed once at A100 bandwidth
    assert weights_s < model.step_time(decodes(1, 128)) < 3 * weights_s


def test_step_time_grows_with_tokens_context_and_sequences():
    model = cost()
    by_tokens = [model.step_time(BatchShape.of([t], [t])) for t in (1, 16, 128, 768, 2048, 4096)]
    by_context = [model.step_time(decodes(32, c)) for c in (128, 1024, 4096)]
    by_seqs = [model.step_time(decodes(n, 1024)) for n in (1, 8, 64, 256)]
    for series in (by_tokens, by_context, by_seqs):
        assert all(a < b for a, b in zip(series, series[1:]))
    # flat while bandwidth-bound, then linear in tokens once compute-bound (the premise of Dynamic SplitFuse)
    assert by_tokens[1] < 1.2 * by_tokens[0] and by_tokens[5] == pytest.approx(2 * by_tokens[4], rel=0.15)


def test_tensor_parallel_splits_work_and_adds_all_reduces():
    one, four = cost("llama-2-70b", tp=1), cost("llama-2-70b", tp=4)
    batch = BatchShape.of([1] * 16 + [752], [2000] * 16 + [1500])
    assert one.breakdown(batch)["allreduce_s"] == 0 < four.breakdown(batch)["allreduce_s"]
    assert four.step_time(batch) < one.step_time(batch) / 2.5
    pcie = cost("llama-2-70b", "a100-80gb", 4, None, "hardware.sim.link_bandwidth_gbs=25")
    assert pcie.breakdown(batch)["allreduce_s"] > 5 * four.breakdown(batch)["allreduce_s"]


def test_kv_pool_is_memory_left_by_weights_and_activations():
    cfg = compose_config(["hardware=a100-80gb", "hardware.tensor_parallel=4", "model.source=llama-2-70b", *SIM])
    shape = model_spec("llama-2-70b")
    blocks = kv_pool_blocks(shape, cfg)
    per_block = 64 * 2 * 80 * 2 * 128 * 2                  # 64 tokens, K+V, 80 layers, 8/4 KV heads, 128, fp16
    free = 80 * 2**30 * 0.9 - shape.num_params * 2 / 4
    assert blocks * per_block < free and blocks * per_block > free - 3 * 2**30
    cfg.hardware.tensor_parallel = 8
    assert kv_pool_blocks(shape, cfg) > 1.9 * blocks       # half the weights and half the KV heads per GPU
    cfg.kv.num_blocks = 123
    assert kv_pool_blocks(shape, cfg) == 123
    cfg.kv.num_blocks, cfg.hardware.tensor_parallel = None, 1
    with pytest.raises(ValueError, match="tensor_parallel"):
        kv_pool_blocks(shape, cfg)                         # 138 GB of weights do not fit one 80 GB GPU


@pytest.mark.parametrize("scheduler,kv", [(s, "blocked") for s in SCHEDULERS.names()] + [("orca", "contiguous")])
def test_simulated_run_of_every_scheduler_completes_with_workload_lengths(scheduler, kv):
    cfg = compose_config(["model.source=llama-2-7b", "hardware=a100-80gb", f"scheduler={scheduler}", f"kv={kv}",
                          "kv.num_blocks=120", *SIM, *SMALL])       # a tight pool: preemption happens
    executor = SimulatedExecutor(cfg)
    manager = make_kv_manager(cfg.kv, executor.num_kv_blocks)
    policy = make_scheduler(cfg.scheduler, manager)
    assert type(policy) is SCHEDULERS.get(scheduler) and type(manager) is KV_MANAGERS.get(kv)
    engine = LLMEngine(executor, policy)
    workload = build_workload(cfg.workload, engine.vocab_size)
    result = run_workload(EngineTarget(engine), workload, progress=False)
    wanted = [r.max_new_tokens for r in workload.requests if not r.warmup]
    assert [t.output_tokens for t in result.traces] == wanted
    assert [t.request_id for t in result.traces] == [str(i) for i in range(len(wanted))]
    assert all(t.finish_reason == "length" for t in result.traces)
    busy = sum(s.duration_s for s in result.steps)
    assert 0 < busy <= result.end_time - result.start_time + 1e-9
    assert engine.snapshot().kv_blocks_free == 120


def simulated_executor(*overrides) -> SimulatedExecutor:
    """Llama-2-7B on a simulated A100."""
    return SimulatedExecutor(compose_config(["model.source=llama-2-7b", "hardware=a100-80gb", "kv.num_blocks=4096",
                                             *SIM, *overrides]))


def charged(executor: SimulatedExecutor, chunks) -> float:
    """Seconds the executor's clock advances for one step of these SeqChunks."""
    before = executor.clock()
    executor.execute(chunks)
    return executor.clock() - before


def test_pad_tokens_are_charged_like_tokens():
    """vLLM 0.2's padded prefill: 300 + 100 tokens padded to 2 x 300 cost what two 300-token prompts cost."""
    executor = simulated_executor()
    padded = charged(executor, [SeqChunk([1] * 300, 0, [0] * 5), SeqChunk([1] * 100, 0, [0] * 2, num_pad=200)])
    assert padded == pytest.approx(charged(executor, [SeqChunk([1] * 300, 0, [0] * 5)] * 2))
    assert padded > 1.2 * charged(executor, [SeqChunk([1] * 300, 0, [0] * 5), SeqChunk([1] * 100, 0, [0] * 2)])


def test_cuda_graphs_pad_decode_batches_and_skip_host_launches():
    """executor.cuda_graphs (vLLM 0.2.7): a decode step of 5 runs as the captured batch of 8 (3 pad rows reading a
    1-token context), launched once; prompts run eagerly. With host launches slower than the device
    (launch_s_per_layer), eager steps wait for them and graph steps do not."""
    eager, graphs = simulated_executor(), simulated_executor("executor.cuda_graphs=true")
    decodes = [SeqChunk([1], 500, [0] * 8) for _ in range(5)]
    as_captured = BatchShape.of([1] * 8, [501] * 5 + [1] * 3, cuda_graph=True)
    assert charged(graphs, decodes) == pytest.approx(graphs.cost.step_time(as_captured))
    assert charged(graphs, decodes) > charged(eager, decodes)           # the padding costs; launches were hidden
    prompt = [SeqChunk([1] * 9, 0, [0])]
    assert charged(graphs, prompt) == pytest.approx(charged(eager, prompt), rel=1e-12)
    model = eager.cost
    slow_host = Profile(**{**vars(model.profile), "launch_s_per_layer": 1e-3})
    eager_step = model.breakdown(BatchShape.of([1] * 8, [501] * 8), slow_host)
    graph_step = model.breakdown(BatchShape.of([1] * 8, [501] * 8, cuda_graph=True), slow_host)
    assert eager_step["launch_wait_s"] > 0 and eager_step["total"] >= 32 * 1e-3
    assert graph_step["launch_wait_s"] == 0 and graph_step["total"] < 0.6 * eager_step["total"]


def test_profile_files_load_and_unknown_names_say_what_exists(tmp_path):
    shipped = Profile.load("cpu")
    assert shipped.meta["points"] and shipped.meta["model"] == "smollm2-135m"
    path = Profile(matmul_efficiency=0.5, meta={"x": 1}).save(tmp_path / "p.json")
    assert Profile.load(str(path)).matmul_efficiency == 0.5
    with pytest.raises(FileNotFoundError, match="cpu"):
        Profile.load("no-such-profile")


def test_fit_recovers_the_profile_that_made_the_times():
    model = cost("llama-2-7b", "cpu")
    truth = Profile(matmul_efficiency=0.45, matmul_half_tokens=40, bandwidth_efficiency=0.6,
                    prefill_attention_efficiency=0.3, decode_attention_efficiency=0.2, layer_overhead_s=2e-4,
                    chunk_overhead_s=5e-5, step_overhead_s=3e-3, seq_overhead_s=1e-4)
    points = grid(768, 2048, 32)
    times = [model.breakdown(b, truth)["total"] for b in points]
    fitted = fit(model, points, times)
    predicted = [model.breakdown(b, fitted)["total"] for b in points]
    assert np.allclose(predicted, times, rtol=0.02)


def test_benchmark_simulated_70b_writes_the_metrics_files(tmp_path):
    """What `python run.py executor=simulated hardware=a100-80gb model.source=llama-2-70b ...` runs."""
    cfg = compose_config([*SIM, "hardware=a100-80gb", "model.source=llama-2-70b", "hardware.tensor_parallel=4",
                          "workload=paper", "workload.num_requests=24", "workload.prompt.max=3800"])
    metrics = run_benchmark(cfg, tmp_path)
    assert metrics["num_completed"] == 24 and metrics["config"]["executor"]["name"] == "simulated"
    assert 0.1 < metrics["request_throughput"] < 10
    assert all((tmp_path / f).stat().st_size > 0 for f in ("metrics.json", "requests.jsonl", "steps.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["splitfuse", "continuous"])
def test_paper_scale_70b_512_requests_under_30_cpu_seconds(scheduler, tmp_path):
    cfg = compose_config([*SIM, "hardware=a100-80gb", "hardware.tensor_parallel=4", "model.source=llama-2-70b",
                          "workload=paper", "workload.prompt.max=3840", "workload.output.max=120",
                          f"scheduler={scheduler}"])
    start = time.process_time()
    metrics = run_benchmark(cfg, tmp_path)
    assert time.process_time() - start < 30 and metrics["num_completed"] == 512


def test_fidelity_real_vs_simulated_on_a_small_case(tmp_path):
    """Calibrate on a small random-weight Llama over the step sizes the workload makes, then run the same
    benchmark for real and simulated: request throughput, P50 TTFT and P50 inter-token latency agree. The machine
    is shared (CI, other jobs), so both calibration and the real run are single-threaded and timed in process CPU
    seconds (CPUClock): what is tested is the cost model and the engine replay, not the neighbours' load.

    The bound is 20%, not the 15% that experiments/sim_fidelity.py shows for SmolLM2 (its table is in
    experiments/results/sim_fidelity/): this model's decode steps take ~16 ms, and a single real run of them
    varies by up to ~20% from run to run here (measured: P50 ITL 16.4 vs 19.8 ms), which a 15% bound turns into
    a flaky test. A broken cost model or replay misses by far more.

    Inside a full test run it failed the other way (P50 ITL 16 ms real vs 24 ms simulated; 15 vs 23 ms in 1 of 5
    full runs on 2026-12-07, never alone: the calibration had measured slow). Two guards against that, neither a
    looser bound: calibration takes its default median of 7 runs per point, and the case runs in a fresh
    interpreter, so nothing the earlier tests left in this one (objects the garbage collector scans, threads, torch
    state) is billed to its timed steps."""
    script = ("import sys, pathlib; sys.path.insert(0, sys.argv[1]); import test_sim; "
              "test_sim._fidelity_case(pathlib.Path(sys.argv[2]))")
    proc = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _fidelity_case(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    common = ["model=local", f"model.source={tmp_path / 'model'}", "hardware.threads=1", "progress=false"]
    calibrate([*common, "--profile", str(tmp_path / "p.json"), "--max-tokens", "512", "--max-context", "512",
               "--max-seqs", "2", "--timer", "cpu"])
    case = [*common, "workload.num_requests=8", "workload.clients=2", "workload.prompt.mean=192",
            "workload.prompt.max=400", "workload.output.mean=16", "workload.output.max=40", "kv.num_blocks=64"]
    real = run_benchmark(compose_config(case), tmp_path / "real", clock=CPUClock())
    sim = run_benchmark(compose_config([*case, "executor=simulated", f"hardware.sim.profile={tmp_path / 'p.json'}"]),
                        tmp_path / "sim")
    for key in ("request_throughput", "ttft_s_p50", "itl_s_p50"):
        assert sim[key] == pytest.approx(real[key], rel=0.2), key


def test_simulated_swap_preemption_completes_and_is_charged_by_the_host_link():
    """priority-mix in a tight pool with preemption_mode=swap: urgent requests preempt batch ones by swapping their
    KV to the host pool; every request completes, and a swap costs its bytes over hardware.sim's host link."""
    cfg = compose_config(["model.source=llama-2-7b", "hardware=a100-80gb", "scheduler=priority",
                          "workload=priority-mix", "scheduler.preemption_mode=swap", "kv.num_blocks=40",
                          "kv.swap_space_gb=4",
                          "workload.num_requests=24", "workload.rate=50", *SIM])
    executor = SimulatedExecutor(cfg)
    manager = make_kv_manager(cfg.kv, executor.num_kv_blocks, executor.num_host_kv_blocks)
    engine = LLMEngine(executor, make_scheduler(cfg.scheduler, manager))
    result = run_workload(EngineTarget(engine), build_workload(cfg.workload, engine.vocab_size), progress=False)
    assert all(t.finish_reason == "length" for t in result.traces) and len(result.traces) == 24
    assert sum(s.num_swapped_blocks for s in result.steps) > 0
    assert manager.num_free_host_blocks == executor.num_host_kv_blocks > 0
    chunk = [SeqChunk([1], 10, [0])]
    plain = executor.execute(chunk).forward_s
    swapped = executor.execute(chunk, (), [BlockSwap(1, 1)] * 8).forward_s
    block_bytes = 64 * executor.spec.kv_bytes_per_token(2)
    assert swapped - plain == pytest.approx(8 * block_bytes / 25e9)
