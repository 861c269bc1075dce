"""Incremental detokenization for streaming: text deltas that concatenate to exactly the non-streamed text.

Decoding token by token is wrong (a character can span several byte-level tokens, and some tokenizers' pieces
depend on their neighbours), and decoding the whole output at every token costs O(n) per token. Like vLLM and TGI,
each push decodes only a window that starts one emission back (so the first new token keeps its left context)
and keeps the part beyond the previously decoded text; a window whose text ends in U+FFFD (an incomplete UTF-8
character) waits for more tokens. On top of that, text that could be the start of a stop string is held back, so
everything streamed is a prefix of the final text, which the engine cuts before the stop string.
"""
from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        """With no tokenizer (a token-ids-only model) all text is empty."""
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.token_ids: list[int] = []
        self.text = ""              # the text of token_ids[:read_offset]
        self.prefix_offset = 0      # the decode window starts here ...
        self.read_offset = 0        # ... and its part up to here is already in self.text
        self.sent = 0               # characters of text already returned

    def push(self, token_ids: Sequence[int], finished: bool = False, final_text: str | None = None) -> str:
        """The new text after `token_ids`. On the last push, everything left: `final_text` when the engine cut the
        output at a stop string, else the rest of the decoded text."""
        self.token_ids.extend(token_ids)
        self._decode(force=finished)
        if finished:
            end_text = self.text if final_text is None else final_text
            return self._emit(end_text, len(end_text))
        return self._emit(self.text, len(self.text) - self._stop_prefix_len())

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

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string. Only unsent text can
        be such a tail: sent text never ends in the start of a stop string."""
        longest = max(map(len, self.stop), default=1) - 1
        for k in range(min(longest, len(self.text) - self.sent), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def _emit(self, text: str, end: int) -> str:
        delta = text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta
