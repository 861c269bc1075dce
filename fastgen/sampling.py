"""SamplingParams (per request, validated here for the engine, the pipeline and the server alike) and the Sampler,
which turns a step's logits into tokens (and their log-probabilities) in one batched pass.

Order of the logits processors, as in vLLM: logit_bias, the stop-token ban before min_new_tokens, then the
repetition penalty (prompt and output tokens), the frequency and presence penalties (output tokens), then
temperature, top-k and top-p. Log-probabilities are those of the model's own distribution: the log-softmax of the
float32 logits the sampler received, before any processor or temperature (vLLM's default, `raw_logprobs`), so a
greedy request's logprobs are the model's and a client can rescore any text with them.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Sequence

import numpy as np
import torch

from fastgen.structured import ConstraintError, StructuredOutput, apply_masks

GREEDY_BELOW = 1e-5          # temperatures below this are greedy (vLLM's _SAMPLING_EPS): their float32 logits / T
                             # would overflow or underflow and give NaN probabilities
MAX_LOGPROBS = 20            # top alternatives per token (OpenAI's top_logprobs limit)
MAX_STOP_STRINGS = 16        # stop strings per request; matching costs O(#stops x longest) characters per token
MAX_STOP_STRING_CHARS = 128
PENALTY_RANGE = 2.0          # frequency and presence penalties lie in [-2, 2] (OpenAI, vLLM)
LOGIT_BIAS_RANGE = 100.0     # logit_bias values lie in [-100, 100] (OpenAI)


class ParameterError(ValueError):
    """A request parameter with a bad value: `param` names it (SamplingParams' field name, or `prompt`), `reason`
    says why."""

    def __init__(self, param: str, reason: str):
        super().__init__(f"invalid {param}: {reason}")
        self.param, self.reason = param, reason

    def __reduce__(self):       # pickled whole, so a replica's refusal reaches the HTTP front (fastgen.serve.replicas)
        return type(self), (self.param, self.reason)


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    min_new_tokens: int = 0           # stop tokens and stop strings do not count before this many tokens
    temperature: float = 0.0          # 0 (or below GREEDY_BELOW) means greedy
    top_k: int = 0                    # 0 (or -1) means no top-k filter; at most the vocabulary (checked by the engine)
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)   # in addition to EOS unless ignore_eos
    stop: list[str] = field(default_factory=list)             # stop strings (need a tokenizer)
    ignore_eos: bool = False
    detokenize: bool = True           # produce text (and match stop strings); False: token ids only
    repetition_penalty: float = 1.0   # > 0; divides positive (multiplies negative) logits of prompt + output tokens
    frequency_penalty: float = 0.0    # subtracted once per occurrence of a token in the output
    presence_penalty: float = 0.0     # subtracted once if a token occurs in the output
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit
    logprobs: int | None = None       # per sampled token: its logprob and the top `logprobs` alternatives
    prompt_logprobs: int | None = None   # per prompt token (after the first): the same
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True   # passed to the tokenizer's decode (slow tokenizers use it)
    n: int = 1                        # sequences to return; they share the prompt's KV and fork at the first token
    best_of: int | None = None        # sequences to generate (>= n; None: n); the n of highest cumulative logprob
    structured: StructuredOutput | None = None   # a grammar the output must match (fastgen.structured; a dict of
                                                 # vLLM's shape is converted): ends when the grammar completes

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.max_new_tokens = _int("max_new_tokens", self.max_new_tokens, low=1)
        self.min_new_tokens = _int("min_new_tokens", self.min_new_tokens, low=0)
        if self.min_new_tokens > self.max_new_tokens:
            raise ParameterError("min_new_tokens", f"{self.min_new_tokens} exceeds max_new_tokens="
                                                   f"{self.max_new_tokens}")
        self.temperature = _float("temperature", self.temperature, low=0.0)
        self.top_k = _int("top_k", self.top_k, low=-1)
        self.top_k = max(self.top_k, 0)
        self.top_p = _float("top_p", self.top_p, high=1.0)
        if not self.top_p > 0:
            raise ParameterError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            self.seed = _int("seed", self.seed, low=0, high=2**63 - 1)
        self.stop_token_ids = [_int("stop_token_ids", t, low=0) for t in _list("stop_token_ids", self.stop_token_ids)]
        self.stop = _list("stop", self.stop)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ParameterError("stop", f"{len(self.stop)} stop strings; at most MAX_STOP_STRINGS="
                                         f"{MAX_STOP_STRINGS} are allowed")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ParameterError("stop", "stop strings must be non-empty strings")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ParameterError("stop", f"a stop string of {len(s)} characters; at most MAX_STOP_STRING_CHARS="
                                             f"{MAX_STOP_STRING_CHARS} are allowed")
        self.repetition_penalty = _float("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0:
            raise ParameterError("repetition_penalty", f"must be > 0 (1 = none), got {self.repetition_penalty}")
        self.frequency_penalty = _float("frequency_penalty", self.frequency_penalty, -PENALTY_RANGE, PENALTY_RANGE)
        self.presence_penalty = _float("presence_penalty", self.presence_penalty, -PENALTY_RANGE, PENALTY_RANGE)
        if not isinstance(self.logit_bias, dict):
            raise ParameterError("logit_bias", "must map token ids to numbers")
        self.logit_bias = {_int("logit_bias", decimal_int("logit_bias", k) if isinstance(k, str) else k, low=0):
                           _float("logit_bias", v, -LOGIT_BIAS_RANGE, LOGIT_BIAS_RANGE)
                           for k, v in self.logit_bias.items()}
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, _int(name, getattr(self, name), low=0, high=MAX_LOGPROBS))
        self.n = _int("n", self.n, low=1)
        if self.best_of is not None:
            self.best_of = _int("best_of", self.best_of, low=1)
            if self.best_of < self.n:
                raise ParameterError("best_of", f"must be >= n={self.n} (or None, meaning n), got {self.best_of}")
        if self.structured is not None:
            try:
                self.structured = StructuredOutput.of(self.structured)
            except ConstraintError as e:
                raise ParameterError("structured", str(e)) from None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to apply to its logits or to report but the token (no logit_bias, penalties, logprobs
        or structured output): once no stop token is banned (min_new_tokens), its token is the raw logits' argmax,
        which the engine takes for all such rows at once, with no SamplingRow each."""
        return self.greedy and self.logprobs is None and not self.logit_bias and \
            self.structured is None and self.repetition_penalty == 1 and self.frequency_penalty == 0 and \
            self.presence_penalty == 0

    @property
    def num_sequences(self) -> int:
        """How many sequences the request generates."""
        return self.best_of or self.n

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0

    def check_vocab(self, vocab_size: int) -> None:
        """The checks that need the model's vocabulary (the engine runs them before it accepts a request)."""
        if self.top_k > vocab_size:
            raise ParameterError("top_k", f"{self.top_k} exceeds the vocabulary size {vocab_size}")
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", self.logit_bias)):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ParameterError(name, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")


MAX_DECIMAL_DIGITS = 18       # a decimal integer sent as a string (a logit_bias key, ...) has at most this many digits
_ASCII_DECIMAL = re.compile(r"[0-9]+", re.ASCII)


def decimal_int(name: str, text: str, max_digits: int = MAX_DECIMAL_DIGITS) -> int:
    """An integer written as a string, by an explicit rule: ASCII digits 0-9 only (no sign, space, underscore, or
    Unicode digit such as '²', '③', Arabic-Indic or fullwidth ones, which str.isdigit() and int() accept), at most
    `max_digits` of them (int() of 4,301+ digits raises). ParameterError naming `name` otherwise."""
    if not isinstance(text, str) or not _ASCII_DECIMAL.fullmatch(text):
        raise ParameterError(name, f"must be a token id written in ASCII decimal digits (0-9), got {_short(text)}")
    if len(text) > max_digits:
        raise ParameterError(name, f"a number of {len(text)} digits; at most {max_digits} are allowed")
    return int(text)


def _int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ParameterError(name, f"must be an integer, got {_short(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ParameterError(name, f"must be in [{low if low is not None else '-inf'}, "
                                   f"{high if high is not None else 'inf'}], got {_short(value)}")
    return value


def _float(name: str, value, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ParameterError(name, f"must be a number, got {_short(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ParameterError(name, f"must be finite, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ParameterError(name, f"must be in [{low if low is not None else '-inf'}, "
                                   f"{high if high is not None else 'inf'}], got {value:g}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _list(name: str, value) -> list:
    if not isinstance(value, (list, tuple)):
        raise ParameterError(name, f"must be a list, got {type(value).__name__}")
    return list(value)


@dataclass
class TokenLogprob:
    """One position's log-probabilities: the chosen token's and the `k` most likely tokens' (best first). None for
    a position that has none (an echoed prompt's first token)."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass
class SamplingRow:
    """What the sampler reads of one sequence about to get a token."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    banned: Sequence[int] = ()         # tokens it may not take now (its stop tokens before min_new_tokens)
    grammar: object = None             # its xgrammar matcher (a structured output): only the tokens it allows


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]    # for the rows whose params ask for logprobs
    mask_s: float = 0.0                    # seconds spent filling and applying grammar masks


def token_logprobs(logits: torch.Tensor, targets: Sequence[int], ks: Sequence[int]) -> list[TokenLogprob]:
    """Each row's log-softmax at its target and its top-k, for all rows in one pass (float32)."""
    if not len(targets):
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.as_tensor(targets, dtype=torch.int64)[:, None])[:, 0].tolist()
    k = max(ks)
    top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    return [TokenLogprob(int(t), c, list(zip(ids[:n], lps[:n])))
            for t, c, ids, lps, n in zip(targets, chosen, top_ids, top_lp, ks)]


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first largest entry, as torch.argmax. On the CPU through numpy's SIMD argmax: torch's CPU argmax is
    scalar code, 7x slower at 256 rows of a 49k vocabulary and worse with few rows (its threads' start-up)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(np.argmax(logits.numpy(), axis=-1))
    return logits.argmax(-1)


class Sampler:
    """Processes every row's logits together (biases, bans, penalties), then greedy rows take the argmax and the
    others are filtered (temperature, top-k, top-p) together and drawn with the exponential-race trick, so a
    seeded request only needs its own noise, not its own pass."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        logits = logits.float()
        raw_ptr = logits.data_ptr()
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw = logits[want] if want else None                   # a copy: processing below does not change it
        logits = self.process(logits, rows)
        constrained = [i for i, r in enumerate(rows) if r.grammar is not None]
        mask_s = 0.0
        if constrained:
            logits = logits.clone() if logits.data_ptr() == raw_ptr else logits
            mask_s = apply_masks(logits, [rows[i].grammar for i in constrained], constrained)
        tokens = argmax(logits)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            tokens[sampled] = self._sample(logits[sampled], [rows[i].params for i in sampled],
                                           [rows[i].generator for i in sampled])
        token_ids = tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        if want:
            found = token_logprobs(raw, [token_ids[i] for i in want], [rows[i].params.logprobs for i in want])
            for i, lp in zip(want, found):
                logprobs[i] = lp
        return SamplerOutput(token_ids, logprobs, mask_s)

    def process(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """The logits after logit_bias, bans and penalties (a new tensor where anything applies)."""
        biased = [(i, t, b) for i, r in enumerate(rows) for t, b in r.params.logit_bias.items()]
        banned = [(i, t) for i, r in enumerate(rows) for t in r.banned]
        penalized = [i for i, r in enumerate(rows) if r.params.penalized]
        if not (biased or banned or penalized):
            return logits
        logits = logits.clone()
        if biased:
            at, ids, bias = zip(*biased)
            logits.index_put_((torch.tensor(at), torch.tensor(ids)), torch.tensor(bias, dtype=logits.dtype),
                              accumulate=True)
        if banned:
            at, ids = zip(*banned)
            logits[torch.tensor(at), torch.tensor(ids)] = float("-inf")
        if penalized:
            logits[penalized] = self._penalize(logits[penalized], [rows[i] for i in penalized])
        return logits

    @staticmethod
    def _penalize(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Repetition penalty over prompt + output tokens, then frequency and presence over output tokens."""
        n, vocab = logits.shape

        def occurrences(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
            counts = torch.zeros(n, vocab, dtype=logits.dtype)
            lens = torch.tensor([len(s) for s in seqs])
            ids = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.int64)
            counts.index_put_((torch.repeat_interleave(torch.arange(n), lens), ids), torch.ones(len(ids)),
                              accumulate=True)
            return counts

        output = occurrences([r.output_ids for r in rows])
        seen = output > 0
        repetition = torch.tensor([r.params.repetition_penalty for r in rows], dtype=logits.dtype)[:, None]
        if (repetition != 1).any():
            seen_any = seen | (occurrences([r.prompt_ids for r in rows]) > 0)
            penalized = torch.where(logits < 0, logits * repetition, logits / repetition)
            logits = torch.where(seen_any, penalized, logits)
        frequency = torch.tensor([r.params.frequency_penalty for r in rows], dtype=logits.dtype)[:, None]
        presence = torch.tensor([r.params.presence_penalty for r in rows], dtype=logits.dtype)[:, None]
        return logits - frequency * output - presence * seen

    def verify(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
               drafts: Sequence[Sequence[int]]) -> list[tuple[list[int], list[TokenLogprob | None]]]:
        """Speculative decoding's check of proposed tokens (Leviathan et al. 2023; Chen et al. 2023). `rows` (and
        the logits) hold len(draft) + 1 positions per sequence, position j seeing draft[:j] as output (so its
        penalties count the proposals before it). Each sequence keeps the longest prefix of its draft the target
        accepts and one token more: the target's own at the first rejection, or a bonus token after the last
        proposal. A greedy row accepts a proposal equal to the argmax of its processed logits, so its tokens are
        those of decoding without speculation. A sampled row accepts proposal d with probability p(d) under its final
        distribution p (after bias, bans, penalties, temperature, top-k and top-p, as vLLM; proposals are one-hot,
        so min(1, p/q) is p(d)), and on rejection draws from p without d, renormalised: its tokens are distributed as
        p's. Per sequence: its tokens and their logprobs (as __call__'s)."""
        logits = logits.float()
        processed = self.process(logits, rows)
        argmax = processed.argmax(-1).tolist()
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        probs = dict(zip(sampled, self._probabilities(processed[sampled], [rows[i].params for i in sampled]))) \
            if sampled else {}
        runs, at = [], 0
        for draft in drafts:
            tokens = []
            for j in range(len(draft) + 1):
                row, proposed = rows[at + j], (draft[j] if j < len(draft) else None)
                token = argmax[at + j]
                if not row.params.greedy:
                    generator, p = row.generator or self.generator, probs[at + j]
                    if proposed is not None and float(torch.rand((), generator=generator)) < float(p[proposed]):
                        token = proposed
                    else:
                        if proposed is not None:
                            p = p.clone()
                            p[proposed] = 0.0
                        token = int(self._draw(p[None], [generator])[0])
                tokens.append(token)
                if token != proposed:
                    break
            runs.append((at, tokens))
            at += len(draft) + 1
        want = [(at + j, t) for at, tokens in runs if rows[at].params.logprobs is not None
                for j, t in enumerate(tokens)]
        found = iter(token_logprobs(logits[[i for i, _ in want]], [t for _, t in want],
                                    [rows[i].params.logprobs for i, _ in want]) if want else [])
        return [(tokens, [next(found) if rows[at].params.logprobs is not None else None for _ in tokens])
                for at, tokens in runs]

    def _sample(self, logits, params, generators) -> torch.Tensor:
        return self._draw(self._probabilities(logits, params), generators)

    @staticmethod
    def _probabilities(logits, params) -> torch.Tensor:
        """Each row's distribution after temperature, top-k and top-p."""
        temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)[:, None]
        logits = logits / temps
        top_k = torch.tensor([p.top_k or logits.shape[-1] for p in params])
        top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[-1])[None, :]
        drop = ranks >= top_k[:, None]
        probs = sorted_logits.softmax(-1)
        drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]      # keep the smallest prefix reaching top_p ...
        drop[:, 0] = False                                         # ... and always the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(-1, order, sorted_logits.softmax(-1))

    def _draw(self, probs, generators) -> torch.Tensor:
        """One token per row from (unnormalised) probabilities: the exponential race, each row with its own noise."""
        noise = torch.empty_like(probs)
        for i, g in enumerate(generators):
            noise[i].exponential_(generator=g or self.generator)
        return (probs / noise).argmax(-1)
