"""Tensor parallelism on torch.distributed (executor=tp): a model split over 2, 3 or 4 CPU ranks (gloo) gives
transformers' greedy tokens, and the single-process executor's, under every scheduler; each rank holds ~1/N of the
weights and of the KV pool; a rank that dies or stalls fails the engine with a clear error instead of hanging,
and no worker process outlives its engine.

Ranks are forked from one forkserver that imports torch once per test session, so each engine here costs a fork
per rank, not an import."""
import functools
import json
import multiprocessing
import os
import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from fastgen.compose import build_engine
from fastgen.conf import compose_config
from fastgen.compose import EngineConfig
from fastgen.engine import LLMEngine
from fastgen.executors import EXECUTORS, make_executor
from fastgen.executors.tensor_parallel import TensorParallelExecutor, rank_memory
from fastgen.executors.workers import WorkerError
from fastgen.kv import KV_MANAGERS, make_kv_manager
from fastgen.model_spec import ModelSpec
from fastgen.distributed import TensorParallel
from fastgen.models import build_model
from fastgen.models.loader import check_tensor_parallel
from fastgen.models.weights import SafetensorsWeights
from fastgen.ragged import SeqChunk
from fastgen.sampling import SamplingParams
from fastgen.schedulers import make_scheduler
from tiny import FAMILIES, MOE_FAMILIES, drain, reference_greedy, scheduler_config, tiny_config, tiny_hf_model

SCHEDULERS = ["splitfuse", "continuous", "orca", "sarathi", "static"]
KNOBS = {"token_budget": 16, "chunk_size": 8, "batch_size": 2, "max_seqs": 3}
PROMPT_LENS, NEW_TOKENS = (5, 40, 17, 23), (8, 5, 10, 6)


# Every tiny family has 4 query heads (and 1, 2 or 4 KV heads) but llama-gqa-tied, whose 6 do not split over 4.
# Mixtures of experts are not split (refused by name below).
CASES = [(size, family) for size in (2, 4) for family in FAMILIES
         if (size, family) != (4, "llama-gqa-tied") and family not in MOE_FAMILIES]


def smollm2_shaped():
    """SmolLM2-135M's head layout (9 query heads, 3 KV heads, tied embeddings) at a tiny size."""
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=211, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=8, max_position_embeddings=256,
                      tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model


def engine_config(size: int, executor: str = "tp", **executor_knobs) -> EngineConfig:
    cfg = EngineConfig(kv=KV_MANAGERS.config("blocked", block_size=16, num_blocks=48),
                       executor=EXECUTORS.config(executor, **executor_knobs))
    cfg.hardware.tensor_parallel = size
    return cfg


@pytest.fixture
def executors():
    """Builds executors and always closes them (their worker processes) after the test."""
    made = []

    def make(model, size: int, executor: str = "tp", **knobs):
        made.append(make_executor(engine_config(size, executor, **knobs), model))
        return made[-1]
    yield make
    for executor in made:
        executor.close()


def prompts_for(vocab: int = 211):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def greedy(executor, scheduler: str, prompts) -> list[list[int]]:
    """The engine's greedy tokens with `scheduler` over `executor` (only the rank-0 side is built anew)."""
    kv = make_kv_manager(KV_MANAGERS.config("blocked", block_size=16, num_blocks=48), executor.num_kv_blocks)
    engine = LLMEngine(executor, make_scheduler(scheduler_config(scheduler, **KNOBS), kv))
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in zip(prompts, NEW_TOKENS)]
    finished = drain(engine)
    return [finished[i].output_token_ids for i in ids]


def logits_of(executor, prompt) -> torch.Tensor:
    return executor.execute([SeqChunk(prompt, 0, list(range(-(-len(prompt) // 16))))]).logits


@functools.lru_cache(maxsize=None)
def family_reference(family: str):
    """The family's tiny transformers model, the prompts and transformers' greedy tokens (shared by TP=2 and 4)."""
    hf = tiny_hf_model(family)
    prompts = prompts_for()
    return hf, prompts, [reference_greedy(hf, p, n) for p, n in zip(prompts, NEW_TOKENS)]


@pytest.mark.parametrize("size,family", CASES)
def test_greedy_equals_single_process_and_transformers_under_every_scheduler(executors, size, family):
    hf, prompts, reference = family_reference(family)
    single, split = executors(hf, 1, "real"), executors(hf, size)
    assert isinstance(split, TensorParallelExecutor) and split.size == size
    torch.testing.assert_close(logits_of(split, prompts[1]), logits_of(single, prompts[1]), rtol=1e-4, atol=1e-4)
    for scheduler in SCHEDULERS:
        got = greedy(split, scheduler, prompts)
        assert got == reference, scheduler
        assert got == greedy(single, scheduler, prompts), scheduler


def test_smollm2_shaped_tp3_replicates_nothing_and_reads_only_its_slices_from_files(executors, tmp_path):
    """9 query heads and 3 KV heads over 3 ranks: 3 query heads and 1 KV head each; the weights come from a
    safetensors directory, which every rank reads its own slices of."""
    hf = smollm2_shaped()
    hf.save_pretrained(tmp_path / "m")
    prompts = prompts_for()
    reference = [reference_greedy(hf, p, n) for p, n in zip(prompts, NEW_TOKENS)]
    split = executors(str(tmp_path / "m"), 3)
    for scheduler in SCHEDULERS:
        assert greedy(split, scheduler, prompts) == reference, scheduler
    spec: ModelSpec = split.spec
    memory = split.run_on_ranks(rank_memory)
    linear = spec.num_layers * spec.layer_params
    for rank in memory:
        assert rank["linear"] * 3 == linear
        assert rank["vocab"] == 71 * spec.hidden            # ceil(211 / 3) rows; the tied LM head shares them
        # 48 pool blocks and the scratch block pad tokens write to (RealExecutor.pad_block)
        assert rank["kv"] * 3 == 2 * spec.num_layers * (48 + 1) * 16 * spec.num_kv_heads * spec.head_dim


def test_a_rank_reads_only_its_slices_of_a_checkpoint(tmp_path):
    """Sharding while loading: rank 1 of 2 reads half of each split tensor from the safetensors file (norms and
    biases added after an all-reduce whole), and what it keeps is the full model's matching half."""
    hf = tiny_hf_model("qwen2")
    hf.save_pretrained(tmp_path)
    reads = []

    class Recorded(SafetensorsWeights):
        def read(self, name, region=None):
            tensor = super().read(name, region)
            reads.append(tensor.numel())
            return tensor
    shard = build_model(hf.config, Recorded(tmp_path), torch.float32, "cpu", "test", TensorParallel(1, 2))
    full = hf.state_dict()
    assert sum(reads) < 0.52 * sum(t.numel() for name, t in full.items() if name != "lm_head.weight")
    attn, mlp = shard.model.layers[1].self_attn, shard.model.layers[1].mlp
    q, k = (full[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qk")
    torch.testing.assert_close(attn.qkv_proj.weight[:32], q[32:])          # heads 2, 3 of 4
    torch.testing.assert_close(attn.qkv_proj.weight[32:48], k[16:])        # KV head 1 of 2
    torch.testing.assert_close(mlp.down_proj.weight, full["model.layers.1.mlp.down_proj.weight"][:, 48:])
    torch.testing.assert_close(shard.model.embed_tokens.weight[:105], full["model.embed_tokens.weight"][106:])
    assert not shard.model.embed_tokens.weight[105:].any()                  # padding past the vocabulary


def test_each_rank_holds_its_share_of_weights_and_kv(executors):
    """Llama (4 query, 2 KV heads) over 2 ranks halves everything; Mistral's single KV head is replicated on both
    ranks (its K/V projection rows and KV pool are whole on each), the rest halves."""
    single_counts = {}
    for family, kv_split in (("llama", 2), ("mistral", 1)):
        hf = tiny_hf_model(family)
        single = executors(hf, 1, "real")
        split = executors(hf, 2)
        spec = single.spec
        memory = split.run_on_ranks(rank_memory)
        kv_rows = 2 * spec.kv_size // kv_split
        per_rank_linear = spec.num_layers * (spec.hidden * (spec.q_size // 2 + kv_rows) + spec.q_size // 2 * spec.hidden
                                             + 3 * spec.hidden * spec.intermediate // 2)
        single_counts[family] = sum(p.numel() for p in single.model.parameters())
        for rank in memory:
            assert rank["linear"] == per_rank_linear
            assert rank["vocab"] == 2 * 106 * spec.hidden      # ceil(211 / 2) rows of the embedding and LM head
            assert rank["kv"] * kv_split == single.cache.k.numel() + single.cache.v.numel()
            assert rank["linear"] + rank["vocab"] + rank["replicated"] < 0.6 * single_counts[family]
        split.close()       # one tensor-parallel group per process at a time


def test_heads_that_do_not_divide_and_unsupported_families_are_refused_before_starting():
    with pytest.raises(ValueError, match=r"num_attention_heads=6 cannot be split over hardware.tensor_parallel=4"):
        TensorParallelExecutor(engine_config(4), tiny_hf_model("llama-gqa-tied"))
    cfg = tiny_config("llama", num_attention_heads=6, hidden_size=48, num_key_value_heads=2)
    with pytest.raises(ValueError, match=r"num_key_value_heads=2 cannot be split .*=3.*multiple"):
        check_tensor_parallel(cfg, 3)
    with pytest.raises(ValueError, match=r"intermediate_size=96 cannot be split over .*=5"):
        check_tensor_parallel(tiny_config("llama", num_attention_heads=5, hidden_size=40,
                                          num_key_value_heads=5), 5)

    with pytest.raises(ValueError, match=r"MixtralForCausalLM \(mixtral\) cannot be split over "
                                         r"hardware.tensor_parallel=2 ranks; families that can: llama, mistral, "
                                         r"qwen2, opt, phi3, falcon, gemma2"):
        check_tensor_parallel(tiny_config("mixtral"), 2)
    with pytest.raises(ValueError, match="executor=tp"):
        make_executor(engine_config(2, "real"), tiny_hf_model("llama"))


def tp_worker_pids() -> set[int]:
    return {p.pid for p in multiprocessing.active_children() if p.name.startswith("fastgen-tp-rank")}


def pids_alive(pids) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


def test_a_dead_or_stalled_rank_fails_the_engine_with_a_clear_error_and_leaves_no_process(executors):
    hf = tiny_hf_model("qwen2")
    prompt = prompts_for()[0]
    split = executors(hf, 2)
    pids = split.workers.pids
    os.kill(pids[0], signal.SIGKILL)
    with pytest.raises(WorkerError, match=r"rank 1 died with exit code -9"):
        logits_of(split, prompt)
    assert pids_alive(pids) == []
    with pytest.raises(WorkerError, match="failed earlier"):
        logits_of(split, prompt)

    stalled = executors(hf, 2, timeout_s=3)
    pids = stalled.workers.pids
    os.kill(pids[0], signal.SIGSTOP)            # alive, but never answers: the collective times out
    start = time.monotonic()
    with pytest.raises(WorkerError, match="tensor-parallel group failed"):
        logits_of(stalled, prompt)
    assert time.monotonic() - start < 30
    assert pids_alive(pids) == []


def test_run_py_pipeline_and_close_through_the_composition_root(tmp_path):
    """executor=tp is composed by Hydra like any executor; closing the engine stops its ranks."""
    hf = tiny_hf_model("opt")
    hf.save_pretrained(tmp_path / "m")
    cfg = compose_config(["executor=tp", "hardware.tensor_parallel=2", "model=local", f"model.source={tmp_path / 'm'}",
                          "kv.num_blocks=32", "kv.block_size=16"])
    before = tp_worker_pids()
    engine = build_engine(cfg)
    try:
        pids = tp_worker_pids() - before
        assert len(pids) == 1
        prompt = prompts_for()[2]
        engine.add_request(prompt, SamplingParams(max_new_tokens=6, ignore_eos=True), request_id="a")
        assert drain(engine)["a"].output_token_ids == reference_greedy(hf, prompt, 6)
    finally:
        engine.close()
    assert pids_alive(pids) == []


def test_the_server_streams_from_a_tensor_parallel_engine():
    """fastgen.serve over an engine whose model is split over 2 ranks (the engine loop's thread drives rank 0):
    the text streamed equals the single-process pipeline's."""
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from fastgen.pipeline import Pipeline
    from fastgen.serve import ServeConfig, create_app
    from tiny import fastgen_from_hf, smollm2_files

    directory, gguf_file = smollm2_files()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer)),
                                          attn_implementation="eager").eval()
    prompt = "The quick brown fox"
    expected = Pipeline(build_engine(engine_config(1, "real"), fastgen_from_hf(hf), tokenizer))(
        prompt, max_new_tokens=7, ignore_eos=True)[0]
    engine = build_engine(engine_config(2), hf, tokenizer)
    try:
        app = create_app(engine, ServeConfig(served_model_name="tiny", request_timeout_s=60.0))
        with TestClient(app, base_url="http://localhost") as client:     # runs the lifespan: the engine thread
            with client.stream("POST", "/v1/completions", json={
                    "model": "tiny", "prompt": prompt, "max_tokens": 7, "temperature": 0, "ignore_eos": True,
                    "stream": True}) as reply:
                assert reply.status_code == 200
                events = [line for line in reply.iter_lines() if line.startswith("data: {")]
        text = "".join(json.loads(e[len("data: "):])["choices"][0]["text"] for e in events)
        assert text == expected.text and len(events) == 7
    finally:
        engine.close()


@pytest.mark.slow
def test_embedded_smollm2_over_3_ranks_equals_transformers():
    """The real SmolLM2-135M (GGUF, de-quantised by transformers in rank 0 and broadcast tensor by tensor) over 3
    ranks: 3 query heads and 1 KV head each."""
    import fastgen
    from tiny import smollm2_files

    directory, gguf_file = smollm2_files()
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32).eval()
    with fastgen.pipeline("smollm2-135m", overrides=["executor=tp", "hardware.tensor_parallel=3",
                                                     "executor.threads_per_rank=1"]) as pipe:
        ids = pipe.engine.tokenizer.encode("The capital of France is")
        out = pipe([ids], max_new_tokens=16, ignore_eos=True)[0]
    assert out.token_ids == reference_greedy(hf, ids, 16)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_over_nccl_equal_transformers(executors):
    hf = tiny_hf_model("qwen2")
    cfg = engine_config(2)
    cfg.hardware.device = "cuda"
    split = make_executor(cfg, hf)
    try:
        prompts = prompts_for()
        assert greedy(split, "splitfuse", prompts) == [reference_greedy(hf, p, n) for p, n in zip(prompts, NEW_TOKENS)]
    finally:
        split.close()
