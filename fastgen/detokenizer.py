"""Incremental detokenization with stop strings: the one output path of the engine, the pipeline and the server.

Decoding token by token is wrong (a character can span several byte-level tokens, and some tokenizers' pieces
depend on their neighbours), and decoding the whole output at every token costs O(n) per token. Like vLLM and TGI,
each push decodes only a window that starts one emission back (so the first new token keeps its left context)
and keeps the part beyond the previously decoded text; a window whose text ends in U+FFFD (an incomplete UTF-8
character) waits for more tokens. Stop strings are searched only in the newly decoded text plus the tail that a
stop string could straddle, so the cost per token does not grow with the output. Text that could be the start of a
stop string is held back from the deltas, so everything streamed is a prefix of the final text, which ends before
the stop string.
"""
from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        """With no tokenizer (a token-ids-only model) all text is empty."""
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.longest_stop = max(map(len, self.stop), default=0)
        self.token_ids: list[int] = []
        self.text = ""              # the text of token_ids[:read_offset]
        self.prefix_offset = 0      # the decode window starts here ...
        self.read_offset = 0        # ... and its part up to here is already in self.text
        self.sent = 0               # characters of text already returned as deltas
        self.stop_at: int | None = None   # where the first stop string found begins in text

    def push(self, token_ids: Sequence[int], match_stop: bool = True) -> None:
        """Adds tokens. With `match_stop`, the text they add is searched for the stop strings (the engine passes
        False until min_new_tokens are out: a stop string there does not count)."""
        self.token_ids.extend(token_ids)
        before = len(self.text)
        self._decode(force=False)
        if match_stop and self.stop and self.stop_at is None and len(self.text) > before:
            start = max(0, before - self.longest_stop + 1)
            found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if found:
                self.stop_at = min(found)

    def delta(self, finished: bool = False) -> str:
        """The text not returned yet: all of it when finished (up to the stop string, if one was found), else
        what cannot turn out to be part of a stop string."""
        if finished:
            self._decode(force=True)
            return self._emit(self.final_text)
        end = len(self.text) if self.stop_at is None else self.stop_at
        return self._emit(self.text[:end][:max(self.sent, end - self._stop_prefix_len(end))])

    @property
    def final_text(self) -> str:
        return self.text if self.stop_at is None else self.text[:self.stop_at]

    def _decode(self, force: bool) -> None:
        if self.tokenizer is None or self.read_offset == len(self.token_ids):
            return
        settled = self._decode_ids(self.token_ids[self.prefix_offset:self.read_offset])
        window = self._decode_ids(self.token_ids[self.prefix_offset:])
        if force or (len(window) > len(settled) and not window.endswith(REPLACEMENT)):
            self.text += window[len(settled):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)

    def _decode_ids(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _stop_prefix_len(self, end: int) -> int:
        """Length of the longest tail of text[:end] that is a proper prefix of a stop string. Only unsent text can
        be such a tail: sent text never ends in the start of a stop string."""
        for k in range(min(self.longest_stop - 1, end - self.sent), 0, -1):
            tail = self.text[end - k:end]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def _emit(self, text: str) -> str:
        delta = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return delta
