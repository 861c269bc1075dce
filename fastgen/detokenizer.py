"""Incremental detokenization with stop strings: the one output path of the engine, the pipeline and the server.

Decoding token by token is wrong (a character can span several byte-level tokens, and some tokenizers' pieces
depend on their neighbours), and decoding the whole output at every token costs O(n) per token. Like vLLM and TGI,
each push decodes only a window that starts one emission back (so the first new token keeps its left context)
and keeps the part beyond the previously decoded text; a window whose text ends in U+FFFD (an incomplete UTF-8
character) waits for more tokens. Stop strings are searched only in the newly decoded text plus the tail that a
stop string could straddle, so the cost per token does not grow with the output; with the caps of
fastgen.sampling (MAX_STOP_STRINGS x MAX_STOP_STRING_CHARS) it stays bounded per token too. Text that could be the
start of a stop string is held back from the deltas, so everything streamed is a prefix of the final text, which
ends before the stop string (or after it, with `include_stop`, when nothing needs holding back).

The text is kept as one string only from the first character not yet returned (or that a stop string could still
straddle) on, and in pieces before that, so adding a token's text costs what is left to send, not the whole output
(a string grown with `+=` is copied whole each time: O(n) per token, O(n^2) per request).
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence

REPLACEMENT = "\ufffd"
SETTLE_CHARS = 256     # text this far behind what must stay searchable moves out of the string that grows


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: Sequence[str] = (), *, include_stop: bool = False,
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True):
        """With no tokenizer (a token-ids-only model) all text is empty. `include_stop` keeps the stop string found
        at the end of the text; the other two are passed to the tokenizer's decode."""
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.include_stop = include_stop
        self.decode_kwargs = {"skip_special_tokens": skip_special_tokens}
        if not spaces_between_special_tokens:
            self.decode_kwargs["spaces_between_special_tokens"] = False
        self._decode_fn = decoder(tokenizer, self.decode_kwargs)
        self._token_lengths = token_lengths(tokenizer, self.decode_kwargs)
        self.longest_stop = max(map(len, self.stop), default=0)
        self.stops_by_first: dict[str, list[str]] = {}
        for stop_string in self.stop:
            self.stops_by_first.setdefault(stop_string[0], []).append(stop_string)
        self.token_ids: list[int] = []
        self._head: list[str] = []  # text[:_base] (returned already, never searched again), in pieces
        self._base = 0
        self._tail = ""             # text[_base:]: the text of token_ids[:read_offset] is _head + _tail
        self.prefix_offset = 0      # the decode window starts here ...
        self.read_offset = 0        # ... and its part up to here is already in the text
        self.sent = 0               # characters of text already returned as deltas
        self.stop_at: int | None = None   # where the first stop string found begins in text ...
        self.stop_end: int | None = None  # ... and ends

    def push(self, token_ids: Sequence[int], match_stop: bool = True) -> None:
        """Adds tokens. With `match_stop`, the text they add is searched for the stop strings (the engine passes
        False until min_new_tokens are out: a stop string there does not count)."""
        self.token_ids += token_ids
        if self.tokenizer is None:
            return
        before = self._base + len(self._tail)
        self._decode(force=False)
        if self._base + len(self._tail) > before and match_stop and self.stop and self.stop_at is None:
            base, tail, found = self._base, self._tail, None
            start = max(0, before - self.longest_stop + 1) - base      # >= 0: _extend keeps that much
            for stop_string in self.stop:       # the first one in the text (the longest, if several start there)
                at = tail.find(stop_string, start)
                if at >= 0 and (found is None or (at, -len(stop_string)) < found):
                    found = at, -len(stop_string)
            if found is not None:
                self.stop_at, self.stop_end = base + found[0], base + found[0] - found[1]

    @property
    def text(self) -> str:
        """The text of token_ids[:read_offset]."""
        return "".join(self._head) + self._tail if self._head else self._tail

    def delta(self, finished: bool = False) -> str:
        """The text not returned yet: all of it when finished (up to the stop string, if one was found), else
        what cannot turn out to be part of a stop string."""
        if finished:
            self._decode(force=True)
            return self._emit(self._final_end)
        if self.include_stop:      # whatever comes, the text up to here is output: nothing to hold back
            return self._emit(self._final_end)
        end, sent = self._base + len(self._tail) if self.stop_at is None else self.stop_at, self.sent
        if self.stop:
            end -= self._stop_prefix_len(end)
        if end <= sent:
            return ""
        self.sent = end
        return self._tail[sent - self._base:end - self._base]

    @property
    def final_text(self) -> str:
        text = self.text
        return text if self.stop_at is None else text[:self._final_end]

    @property
    def _final_end(self) -> int:
        """Where the final text ends: at the end, or at (after, with include_stop) the stop string found."""
        if self.stop_at is None:
            return self._base + len(self._tail)
        return self.stop_end if self.include_stop else self.stop_at

    def _decode(self, force: bool) -> None:
        ids, start = self.token_ids, self.prefix_offset
        if self.tokenizer is None or self.read_offset == len(ids):
            return
        if self.read_offset - start == 1:     # usually: the window starts at the one token emitted last time
            settled = self._token_lengths.get(ids[start])
            if settled is None:
                settled = self._token_lengths[ids[start]] = len(self._decode_fn(ids[start:start + 1]))
        else:
            settled = len(self._decode_fn(ids[start:self.read_offset]))
        window = self._decode_fn(ids[start:])
        if force or (len(window) > settled and window[-1] != REPLACEMENT):
            self._extend(window[settled:])
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)

    def _extend(self, piece: str) -> None:
        """Appends to the text. What lies more than SETTLE_CHARS before both the first unsent character and the
        stop-string search's start (the old end less longest_stop) moves to _head, so the tail stays short."""
        base, tail = self._base, self._tail
        cut = min(self.sent, base + len(tail) - self.longest_stop) - base
        if cut > SETTLE_CHARS:
            self._head.append(tail[:cut])
            self._base, tail = base + cut, tail[cut:]
        self._tail = tail + piece

    def _stop_prefix_len(self, end: int) -> int:
        """Length of the longest tail of text[:end] that is a proper prefix of a stop string. Only unsent text can
        be such a tail (sent text never ends in the start of a stop string), and only where a stop string's first
        character stands: at most longest_stop - 1 positions, each checked against the stops starting there."""
        tail = self._tail[end - min(self.longest_stop - 1, end - self.sent) - self._base:end - self._base] \
            if end > self.sent else ""
        first = len(tail)        # the earliest position where a stop string could begin
        for char, candidates in self.stops_by_first.items():
            p = tail.find(char)
            while 0 <= p < first:
                if any(s.startswith(tail[p:]) for s in candidates):
                    first = p
                    break
                p = tail.find(char, p + 1)
        return len(tail) - first

    def _emit(self, end: int) -> str:
        """The text from the first unsent character up to `end`, now sent."""
        sent = self.sent
        self.sent = max(sent, end)
        return self._tail[sent - self._base:end - self._base] if end > sent else ""


_TOKEN_LENGTHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_lengths(tokenizer, decode_kwargs: dict) -> dict[int, int]:
    """len(tokenizer.decode([id], **decode_kwargs)) by token id, filled as tokens are met and shared by every
    detokenizer of the tokenizer: the text a window already had is, most tokens, that of one token, so each token
    costs one decode rather than two."""
    try:
        by_kwargs = _TOKEN_LENGTHS.setdefault(tokenizer, {})
    except TypeError:          # None, or a tokenizer that cannot be weakly referenced or hashed: this one's own
        return {}
    return by_kwargs.setdefault(tuple(sorted(decode_kwargs.items())), {})


def decoder(tokenizer, decode_kwargs: dict):
    """`tokenizer.decode(ids, **decode_kwargs)`, or the same call one level down where that gives the same text: a
    transformers fast tokenizer's `decode` converts its arguments and reads its clean-up settings on every call,
    which costs several times the decoding itself (the largest part of an engine step's host work at 256
    sequences). The shortcut is taken only where transformers' own decode would call the backend the same way: its
    `decode` and `_decode` not overridden, no clean-up of spaces, only skip_special_tokens given."""
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    kind = type(tokenizer)
    if isinstance(tokenizer, PreTrainedTokenizerFast) and kind.decode is PreTrainedTokenizerBase.decode and \
            kind._decode is PreTrainedTokenizerFast._decode and not tokenizer.clean_up_tokenization_spaces and \
            set(decode_kwargs) == {"skip_special_tokens"}:
        backend, skip = tokenizer.backend_tokenizer, decode_kwargs["skip_special_tokens"]
        return functools.partial(backend.decode, skip_special_tokens=skip)
    return functools.partial(tokenizer.decode, **decode_kwargs)
