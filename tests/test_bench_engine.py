"""pytest-benchmark: one engine step of the embedded SmolLM2-135M (float32) at the batch shapes the paper's
workloads produce: a lone decode, a 32-wide decode batch, a budget-sized prompt pass, and a splitfuse step that
fuses 32 decodes with a 736-token prompt chunk.

Runs once per shape as a plain test by default (benchmarks disabled); time it with
`python -m pytest tests/test_bench_engine.py --benchmark-enable`, and keep a baseline with `--benchmark-save`
for `--benchmark-compare`. A step here is the whole engine step: scheduling, batch building, the forward pass,
sampling and bookkeeping.
"""
import pytest
import torch

from fastgen.engine import LLMEngine
from fastgen.models import load_model
from fastgen.sampling import SamplingParams
from tiny import compose_engine

BUDGET = 768
SHAPES = {            # name: (running decodes, prompt tokens added each step)
    "decode-1": (1, 0),
    "decode-32": (32, 0),
    "prefill-768": (0, BUDGET),
    "mixed-32+736": (32, BUDGET - 32),
}


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", dtype="float32")


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(100, 40000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine_with_decodes(model, tokenizer, num_decodes: int, context: int = 256) -> LLMEngine:
    """An engine whose running requests are all mid-generation with `context` tokens of KV (zeros: the values do
    not change the cost, and skipping their prefill keeps the setup instant). They generate for longer than any
    benchmark runs, so every step keeps the same shape (contexts grow by one token a step)."""
    eng, scheduler, kv = compose_engine(model, "splitfuse", "blocked", num_blocks=256, block_size=64,
                                        token_budget=BUDGET)
    for i in range(num_decodes):
        eng.add_request(prompt(context, i), SamplingParams(max_new_tokens=4096, ignore_eos=True))
        req = scheduler.waiting[-1]
        scheduler.admit(req)
        kv.allocate(req, context)
        req.num_computed_tokens = context
        req.output_token_ids.append(1)
    eng.stats = []
    eng.add_step_observer(eng.stats.append)
    return eng


@pytest.mark.benchmark(group="engine-step")
@pytest.mark.parametrize("shape", SHAPES)
def test_one_engine_step(benchmark, smollm2, shape):
    num_decodes, prompt_tokens = SHAPES[shape]
    eng = engine_with_decodes(*smollm2, num_decodes)
    seeds = iter(range(1000, 10**6))

    def add_prompt():
        if prompt_tokens:   # a fresh prompt each round that finishes in the step, so its KV is freed again
            eng.add_request(prompt(prompt_tokens, next(seeds)), SamplingParams(max_new_tokens=1, ignore_eos=True))
        return (), {}

    outputs = benchmark.pedantic(eng.step, setup=add_prompt, rounds=5, warmup_rounds=1)
    step = eng.stats[-1]
    assert (step.num_tokens, step.num_seqs) == (num_decodes + prompt_tokens, num_decodes + (1 if prompt_tokens else 0))
    assert len(outputs) == step.num_seqs and eng.snapshot().num_waiting == 0
