"""The output path (incremental detokenization + stop strings): its per-token cost does not grow with the output.

The deterministic check counts what each token makes the tokenizer decode and the stop search scan; the
pytest-benchmark suite (`pytest tests/test_bench_output.py --benchmark-enable`) times 100 tokens pushed after 0,
1000 and 1900 tokens of a 2,000-token generation whose stop string never matches."""
import pytest

from fastgen.detokenizer import IncrementalDetokenizer
from fastgen.workloads.corpus import CORPUS_PATH
from tiny import smollm2_files

NEVER = ["<|never-matches|>", "zzzz qqqq"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    directory, gguf_file = smollm2_files()
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)


@pytest.fixture(scope="module")
def generation(tokenizer) -> list[int]:
    ids = tokenizer.encode(CORPUS_PATH.read_text(), add_special_tokens=False)
    while len(ids) < 2100:
        ids = ids + ids
    return ids[:2100]


class Counting:
    """A tokenizer that counts the token ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kwargs)


def pushed(tokenizer, ids: list[int]) -> IncrementalDetokenizer:
    detok = IncrementalDetokenizer(tokenizer, NEVER)
    for t in ids:
        detok.push([t])
        detok.delta()
    return detok


def test_work_per_token_does_not_grow_with_the_output(tokenizer, generation):
    counting = Counting(tokenizer)
    detok = pushed(counting, [])
    work = []
    for i, t in enumerate(generation[:2000]):
        before = counting.decoded
        detok.push([t])
        detok.delta()
        work.append(counting.decoded - before)
    early, late = max(work[:100]), max(work[1900:2000])
    assert late <= early <= 16        # a window of a few tokens, at token 10 as at token 1,950
    assert detok.stop_at is None and detok.delta(finished=True) + "" == detok.text[detok.sent:]
    assert tokenizer.decode(generation[:2000], skip_special_tokens=True) == detok.text


@pytest.mark.benchmark(group="stop-strings-per-100-tokens")
@pytest.mark.parametrize("position", [0, 1000, 1900])
def test_per_token_cost_with_a_stop_string(benchmark, tokenizer, generation, position):
    window = generation[position:position + 100]

    def setup():
        return (pushed(tokenizer, generation[:position]),), {}

    def push_window(detok):
        for t in window:
            detok.push([t])
            detok.delta()
        return detok

    detok = benchmark.pedantic(push_window, setup=setup, rounds=5)
    assert detok.stop_at is None and len(detok.token_ids) == position + 100


@pytest.mark.parametrize("skip", [True, False])
def test_the_backend_shortcut_decodes_as_the_tokenizer(tokenizer, generation, skip):
    """fastgen.detokenizer.decoder calls the fast tokenizer's backend directly: the same text as its decode, special
    tokens and pieces of a multi-byte character included."""
    from fastgen.detokenizer import decoder
    special = tokenizer.all_special_ids[:3]
    ids = generation[:300] + special + generation[300:310] + tokenizer.encode("é😀 ü", add_special_tokens=False)
    fast = decoder(tokenizer, {"skip_special_tokens": skip})
    assert fast.func == tokenizer.backend_tokenizer.decode          # the shortcut is the one taken
    for lo, hi in [(0, len(ids)), (295, 306), (len(ids) - 5, len(ids) - 1), (3, 4)]:
        assert fast(ids[lo:hi]) == tokenizer.decode(ids[lo:hi], skip_special_tokens=skip)
