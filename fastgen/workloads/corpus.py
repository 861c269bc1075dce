"""Where prompt tokens come from: uniform random ids, a window sliding through a shipped text corpus, or such a
window inside an instruction to repeat it (prompts the answer quotes).

Random ids are cheap and tokenizer-free; corpus prompts are real text, which matters when the
model's behaviour (for example early stop tokens) or a prefix cache should see natural input.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol

import numpy as np

CORPUS_PATH = Path(__file__).parent / "data" / "corpus.txt"


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def random_prompt(length: int, vocab_size: int, rng: np.random.Generator, low: int = 0) -> list[int]:
    """`length` token ids drawn uniformly from [low, vocab_size)."""
    return rng.integers(low, vocab_size, size=length).tolist()


class CorpusPrompts:
    """Cuts consecutive prompts out of the tokenized corpus, wrapping around when it runs out.

    Starts at a random offset and moves on by each prompt's length, so prompts are distinct
    (no accidental shared prefixes) yet deterministic under the generator's seed.
    """

    def __init__(self, tokenizer: Tokenizer, rng: np.random.Generator, path: Optional[str | Path] = None):
        text = Path(path or CORPUS_PATH).read_text(encoding="utf-8")
        self.tokens = np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
        if self.tokens.size == 0:
            raise ValueError(f"corpus {path or CORPUS_PATH} tokenized to nothing")
        self.offset = int(rng.integers(self.tokens.size))

    def take(self, length: int) -> list[int]:
        index = (self.offset + np.arange(length)) % self.tokens.size
        self.offset = (self.offset + length) % self.tokens.size
        return self.tokens[index].tolist()


QUOTE_INSTRUCTION = ("Repeat the following text exactly.\n\nText: ", "\n\nRepeated text: ")


class QuotePrompts(CorpusPrompts):
    """Prompts whose answer quotes them, as summaries, code edits and retrieval-augmented answers copy spans of
    their input: a corpus passage inside an instruction to repeat it (QUOTE_INSTRUCTION), `length` tokens in all
    (at least the instruction and one passage token). Where prompt-lookup speculation pays."""

    def __init__(self, tokenizer: Tokenizer, rng: np.random.Generator, path: Optional[str | Path] = None):
        super().__init__(tokenizer, rng, path)
        self.head, self.tail = (tokenizer.encode(text, add_special_tokens=False) for text in QUOTE_INSTRUCTION)

    def take(self, length: int) -> list[int]:
        return self.head + super().take(max(1, length - len(self.head) - len(self.tail))) + self.tail
