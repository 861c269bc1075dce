"""Benchmark workloads: which requests are sent (prompt tokens, output budget) and when.

`build_workload(cfg, vocab_size, tokenizer)` turns a flat `WorkloadConfig` into a `Workload`:
a list of `WorkloadRequest`s plus an arrival process (see `arrivals` for the driver protocol).
Everything is deterministic under `seed`; prompt lengths, output lengths, prompt tokens and
arrival times come from independent streams, so e.g. sweeping the rate keeps the requests fixed.

Arrival processes (`WorkloadConfig.arrival`):

- ``closed_loop``: the paper's method, `clients` concurrent clients (1..32), each sending its next
  request when its previous one finished; with `warmup` the first `clients` requests are one
  warm-up per client (``WorkloadRequest.warmup``; exclude them from metrics);
- ``poisson``: open loop at `rate` requests/s;
- ``gamma``: open loop at `rate` requests/s with Gamma gaps of shape `burstiness` (= 1/CV^2);
- ``trace``: replay `trace_path`, at most `num_requests` rows, at the file's arrival offsets times
  `time_scale` (0.5 replays twice as fast);
- ``classes``: each request class has its own arrival process (below): the first `num_requests` arrivals of the
  classes' streams merged by time, times `time_scale`.

Shared prefixes (`workload.prefix`, fastgen.workloads.shared_prefix): a system prompt of `prefix.share` of the
mean prompt length that requests start with (one of `prefix.num_prefixes`), and conversations of `prefix.turns`
requests, each turn resending the earlier ones; the arrival process then times conversations, and a
conversation's next turn follows its previous one's end by `prefix.think_s`.

With `trace_path` and a synthetic arrival process, the file's rows are the requests, in order (warm-ups first),
sent at the process's times; their arrival_time column, if any, is ignored. So a file of length pairs without
times (the arXiv summarization lengths) runs open or closed loop.

Trace files are JSONL (one object per line) or CSV (header row; chosen by the `.csv` suffix):

- ``arrival_time``: seconds from the start of the run (float, >= 0), used as is;
- exactly one prompt column per row:
  ``prompt`` (text, tokenized with ``tokenizer.encode(text, add_special_tokens=False)``),
  ``prompt_token_ids`` (a JSON list of ints; in CSV one space-separated string), or
  ``prompt_tokens`` (an int length; tokens are made by `prompt_source` like synthetic prompts);
- ``output_tokens``: the request's max_new_tokens (int >= 1).

Request classes (`workload.classes`): a list of classes, each with its `share` of the requests, its own prompt and
output length distributions (None: the workload's), `priority` (lower is more urgent), `tenant` (None: the class's
name) and `slo` (ttft_s, tpot_s; None: no target). Each request draws its class by share from its own stream, so
the requests' lengths and times stay those of the classless workload where a class does not set lengths. Class
lengths apply to synthetic prompts; a trace brings its own lengths (its rows then only draw a class).
With arrival=classes each class is its own stream instead, and `share` is unused (the streams' rates decide how
many of the requests are each class's): Gamma arrivals at the class's `rate` with shape `burstiness` (1: Poisson;
0.1: CV^2 = 10, a tenant that floods in bursts), lengths from its own distributions; or the rows of its own
`trace_path` at their real arrival times (two traces recorded over the same hour merge as they happened).

In CSV an empty cell means the column is absent for that row; `.gz` files are read compressed. A `trace_path`
that does not exist relative to the working directory may name a file shipped in `data/`:
`example_trace.jsonl` (a 20-row example) and the real traces `azure_conv.csv.gz`, `azure_code.csv.gz`,
`arxiv_summarization.csv.gz` (conf/workload/azure-conv, azure-code, arxiv; sources and licence in
`data/README.md`). Synthetic prompts are random ids in [random_token_low, vocab_size) or windows of
`data/corpus.txt` (English prose) tokenized by the given tokenizer, or such windows inside an instruction to repeat
them (`quote`: the answer copies the prompt). `max_prompt_len`, when set, truncates every prompt, trace prompts
included.

Requests longer than the model's context (prompt + output > max_model_len, when the caller passes it) follow
`too_long`: ``error`` (the default: say which request and how to fix it), ``clip`` (keep the output length, cut
the prompt to fit; an output alone too long is cut to max_model_len - 1 with a 1-token prompt) or ``skip`` (leave
the trace row out and take the next one; trace files only). `Workload.clipped` / `skipped` count them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from fastgen.request_trace import DEFAULT_TENANT, SLO, check_class
from fastgen.workloads.arrivals import ArrivalProcess, ClosedLoopArrivals, OpenLoopArrivals, gamma_arrivals
from fastgen.workloads.corpus import CorpusPrompts, QuotePrompts, Tokenizer, random_prompt
from fastgen.workloads.lengths import LengthSpec, sample_lengths
from fastgen.workloads.replay import TraceRecord, load_trace
from fastgen.workloads.shared_prefix import ConversationArrivals, SharedPrefixSpec, conversation_prompts

EXAMPLE_TRACE_PATH = Path(__file__).parent / "data" / "example_trace.jsonl"
ARRIVALS = ("closed_loop", "poisson", "gamma", "trace", "classes")
TOO_LONG = ("error", "clip", "skip")
PROMPT_SOURCES = ("random", "corpus", "quote")


@dataclass
class RequestClassSpec:
    """One class of requests (`workload.classes`): its share, lengths, priority, tenant and SLO."""

    name: str = "default"
    share: float = 1.0                   # relative share of the requests (normalised over the classes)
    prompt: Optional[LengthSpec] = None  # None: the workload's prompt lengths
    output: Optional[LengthSpec] = None  # None: the workload's output lengths
    priority: int = 0                    # lower is more urgent
    tenant: Optional[str] = None         # None: the class's name
    slo: SLO = field(default_factory=SLO)
    rate: Optional[float] = None         # arrival=classes: this class's requests/s (Gamma arrivals) ...
    burstiness: float = 1.0              # ... of shape burstiness (1: Poisson, < 1: burstier)
    trace_path: Optional[str] = None     # arrival=classes: ... or the rows of this trace at its arrival times

    @property
    def tenant_name(self) -> str:
        return self.tenant or self.name

    def validate(self, where: str) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"{where}.name must be a non-empty string, got {self.name!r}")
        if not self.share > 0:
            raise ValueError(f"{where}.share must be > 0, got {self.share}")
        if self.prompt is not None:
            self.prompt.validate(f"{where}.prompt")
        if self.output is not None:
            self.output.validate(f"{where}.output")
        self.slo.validate(f"{where}.slo")
        if self.rate is not None and not self.rate > 0 or not self.burstiness > 0:
            raise ValueError(f"{where}.rate and burstiness must be > 0, got {self.rate}, {self.burstiness}")
        if self.trace_path and (self.rate is not None or self.prompt is not None or self.output is not None):
            raise ValueError(f"{where} replays {self.trace_path}, which brings its arrival times and lengths: leave "
                             "its rate, prompt and output unset")
        try:
            check_class(self.priority, self.tenant_name, None)
        except ValueError as e:
            raise ValueError(f"{where}.{e}") from None


@dataclass
class WorkloadConfig:
    """Flat, OmegaConf-compatible description of a workload (defaults: the paper's 1200/60 setup)."""

    name: Optional[str] = None           # the conf/workload option it came from (summaries, figure titles)
    num_requests: int = 512              # measured requests (closed loop adds `clients` warm-ups)
    prompt: LengthSpec = field(default_factory=lambda: LengthSpec(mean=1200.0))
    output: LengthSpec = field(default_factory=lambda: LengthSpec(mean=60.0))
    arrival: str = "closed_loop"         # one of ARRIVALS
    clients: int = 16                    # closed_loop
    warmup: bool = True                  # closed_loop: one warm-up request per client
    jitter_s_per_client: float = 0.01    # closed_loop: start jitter U(0, clients) * this
    rate: float = 1.0                    # poisson/gamma: requests per second
    burstiness: float = 1.0              # gamma: shape = 1/CV^2; 1 == poisson
    trace_path: Optional[str] = None     # trace: replay it; other arrivals: its rows are the requests
    time_scale: float = 1.0              # trace: arrival offsets x this (0.5: twice the trace's rate)
    too_long: str = "error"              # prompt + output > the model's context: error | clip | skip (see above)
    prompt_source: str = "random"        # one of PROMPT_SOURCES
    corpus_path: Optional[str] = None    # corpus text; None = the shipped data/corpus.txt
    random_token_low: int = 0            # random prompts draw ids from [random_token_low, vocab_size)
    max_prompt_len: Optional[int] = None
    prefix: SharedPrefixSpec = field(default_factory=SharedPrefixSpec)   # shared system prompts, multi-turn
    classes: list[RequestClassSpec] = field(default_factory=list)        # request classes (see above)
    seed: int = 0

    def validate(self) -> None:
        """Check the fields only this config knows; arrival/length parameters are checked where used."""
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {ARRIVALS}, got {self.arrival!r}")
        if self.arrival == "trace" and not self.trace_path:
            raise ValueError("arrival='trace' needs trace_path: set trace_path to a .jsonl or .csv file")
        if self.prompt_source not in PROMPT_SOURCES:
            raise ValueError(f"prompt_source must be one of {PROMPT_SOURCES}, got {self.prompt_source!r}")
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0 (arrival offsets are multiplied by it), got {self.time_scale}")
        if self.too_long not in TOO_LONG:
            raise ValueError(f"too_long must be one of {TOO_LONG}, got {self.too_long!r}")
        if self.too_long == "skip" and not self.trace_path and not any(c.trace_path for c in self.classes):
            raise ValueError("too_long='skip' leaves trace rows out; a synthetic workload draws its lengths: use "
                             "too_long='clip' or lower prompt.max / output.max")
        if self.max_prompt_len is not None and self.max_prompt_len < 1:
            raise ValueError(f"max_prompt_len must be >= 1 or None (no cap), got {self.max_prompt_len}")
        if self.arrival == "closed_loop" and self.clients < 1:
            raise ValueError(f"clients must be >= 1 concurrent clients, got {self.clients}")
        if self.jitter_s_per_client < 0:
            raise ValueError(f"jitter_s_per_client must be >= 0 seconds, got {self.jitter_s_per_client}")
        if self.arrival in ("poisson", "gamma") and not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")
        if self.arrival == "gamma" and not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0 (1 = Poisson, <1 burstier), got {self.burstiness}")
        if self.random_token_low < 0:
            raise ValueError(f"random_token_low must be >= 0 (a token id), got {self.random_token_low}")
        if self.corpus_path is not None and not Path(self.corpus_path).is_file():
            raise FileNotFoundError(f"corpus_path {self.corpus_path} is not a file; None uses the shipped corpus")
        self.prompt.validate("prompt")
        self.output.validate("output")
        self.prefix.validate(self.num_requests)
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"workload.classes need distinct names, got {names}")
        for i, c in enumerate(self.classes):
            c.validate(f"workload.classes[{i}]")
            if (self.arrival == "classes") != (c.rate is not None or bool(c.trace_path)):
                raise ValueError(f"workload.classes[{i}] ({c.name}): with arrival=classes every class sets its own "
                                 "rate or trace_path, and only then: set workload.arrival=classes and each class's "
                                 "rate (or trace_path), or neither")
        if self.arrival == "classes" and (not self.classes or self.trace_path or self.prefix.active):
            raise ValueError("arrival=classes needs workload.classes, each with its own arrivals, and no workload "
                             "trace_path or prefix")
            if self.trace_path and (c.prompt is not None or c.output is not None):
                raise ValueError(f"workload.classes[{i}] ({c.name}) sets lengths but a trace brings its own: "
                                 "leave its prompt and output unset")
        if self.prefix.active and self.trace_path:
            raise ValueError("workload.prefix shapes synthetic prompts; a trace brings its own: leave "
                             "workload.prefix at its defaults or trace_path unset")


@dataclass
class WorkloadRequest:
    index: int                       # position in Workload.requests, the id arrival processes use
    prompt_token_ids: list[int]
    max_new_tokens: int
    warmup: bool = False             # closed-loop warm-up: send it, but leave it out of metrics
    request_class: Optional[str] = None   # its class's name (workload.classes), None without classes
    priority: int = 0
    tenant: str = DEFAULT_TENANT
    slo: Optional[SLO] = None


@dataclass
class Workload:
    requests: list[WorkloadRequest]
    arrivals: ArrivalProcess
    clipped: int = 0                 # requests cut to fit the model's context (too_long='clip')
    skipped: int = 0                 # trace rows left out for not fitting it (too_long='skip')

    @property
    def measured(self) -> list[WorkloadRequest]:
        return [r for r in self.requests if not r.warmup]


def build_workload(cfg: WorkloadConfig, vocab_size: int, tokenizer: Optional[Tokenizer] = None,
                   seed: Optional[int] = None, max_model_len: Optional[int] = None) -> Workload:
    """Materialise `cfg` into requests and an arrival process; `seed` overrides `cfg.seed`; `max_model_len` (the
    model's context) applies `cfg.too_long` to requests that do not fit it."""
    cfg.validate()
    sequence = np.random.SeedSequence(cfg.seed if seed is None else seed)
    prompt_rng, output_rng, token_rng, arrival_rng = (np.random.default_rng(s) for s in sequence.spawn(4))
    class_rng = np.random.default_rng(sequence.spawn(1)[0])     # spawned after the others: they stay as they were
    make_prompt = _prompt_source(cfg, vocab_size, tokenizer, token_rng)
    context = _ContextPolicy(max_model_len, cfg.too_long)

    if cfg.arrival == "classes":
        prompts, outputs, times, classes = _class_streams(cfg, make_prompt, tokenizer, context, class_rng)
        arrivals = OpenLoopArrivals(times)
    elif cfg.trace_path:
        records = load_trace(cfg.trace_path, require_arrival_time=cfg.arrival == "trace")
        arrivals = None if cfg.arrival == "trace" else _synthetic_arrivals(cfg, arrival_rng)
        needed = cfg.num_requests if arrivals is None else arrivals.total
        if arrivals is not None and len(records) < needed:
            raise ValueError(f"{cfg.trace_path} has {len(records)} rows but the workload needs {needed} (num_requests "
                             "plus warm-ups); lower workload.num_requests")
        prompts, outputs, times = [], [], []
        for i, record in enumerate(records):
            if len(prompts) == needed:
                break
            fitted = context.fit(_trace_prompt(record, make_prompt, tokenizer)[: cfg.max_prompt_len],
                                 record.output_tokens, f"{cfg.trace_path} row {i + 1}")
            if fitted is not None:
                prompts.append(fitted[0])
                outputs.append(fitted[1])
                times.append(record.arrival_time)
        if arrivals is None:
            arrivals = OpenLoopArrivals([t * cfg.time_scale for t in times])
        elif len(prompts) < needed:
            raise ValueError(f"{cfg.trace_path} has {len(prompts)} rows that fit the model's context but the "
                             f"workload needs {needed} (num_requests plus warm-ups); lower workload.num_requests")
    else:
        if cfg.prefix.active:
            conversations = dataclasses.replace(cfg, num_requests=cfg.num_requests // cfg.prefix.turns)
            arrivals = ConversationArrivals(_synthetic_arrivals(conversations, arrival_rng), cfg.prefix.turns,
                                            cfg.prefix.think_s)
        else:
            arrivals = _synthetic_arrivals(cfg, arrival_rng)
        lengths = sample_lengths(cfg.prompt, arrivals.total, prompt_rng, "prompt")
        outputs = sample_lengths(cfg.output, arrivals.total, output_rng, "output").tolist()
        classes = _draw_classes(cfg.classes, arrivals.total, class_rng)
        for k, c in enumerate(cfg.classes):
            mine = np.flatnonzero(classes == k)
            if c.prompt is not None:
                lengths[mine] = sample_lengths(c.prompt, arrivals.total, class_rng, f"classes[{k}].prompt")[mine]
            if c.output is not None:
                drawn = sample_lengths(c.output, arrivals.total, class_rng, f"classes[{k}].output")
                for i in mine:
                    outputs[i] = int(drawn[i])
        if cfg.prefix.active:
            made = conversation_prompts(cfg.prefix, cfg.prompt, lengths, outputs, make_prompt, prompt_rng)
        else:
            made = (make_prompt(int(length)) for length in lengths)
        pairs = [context.fit(p[: cfg.max_prompt_len], int(output), f"request {i}")
                 for i, (p, output) in enumerate(zip(made, outputs))]
        prompts, outputs = [p for p, _ in pairs], [o for _, o in pairs]

    top = max(max(p) for p in prompts) if prompts else -1
    if top >= vocab_size:
        raise ValueError(f"prompt token id {top} is outside the vocabulary (vocab_size={vocab_size}); "
                         "check the trace's prompt_token_ids or that the tokenizer matches the model")
    if cfg.trace_path:
        classes = _draw_classes(cfg.classes, len(prompts), class_rng)
    requests = [WorkloadRequest(i, p, int(o), warmup=i in arrivals.warmup_indices)
                for i, (p, o) in enumerate(zip(prompts, outputs))]
    if cfg.classes:
        for r, k in zip(requests, classes):
            c = cfg.classes[k]
            r.request_class, r.priority, r.tenant = c.name, c.priority, c.tenant_name
            r.slo = SLO(c.slo.ttft_s, c.slo.tpot_s) if c.slo.active else None
    return Workload(requests=requests, arrivals=arrivals, clipped=context.clipped, skipped=context.skipped)


@dataclass
class _ContextPolicy:
    """What happens to a request whose prompt + output exceed the model's context (`WorkloadConfig.too_long`)."""

    max_model_len: Optional[int]
    policy: str
    clipped: int = 0
    skipped: int = 0

    def fit(self, prompt: list[int], output: int, where: str) -> Optional[tuple[list[int], int]]:
        """(prompt, output) within the context, or None to skip the request."""
        limit = self.max_model_len
        if limit is None or len(prompt) + output <= limit:
            return prompt, output
        if self.policy == "skip":
            self.skipped += 1
            return None
        if self.policy == "clip":
            self.clipped += 1
            output = min(output, limit - 1)
            return prompt[: limit - output], output
        raise ValueError(f"{where}: prompt ({len(prompt)} tokens) + output ({output}) exceeds the model's context "
                         f"({limit}); set workload.too_long=clip or skip, or a model with a longer context")


def _class_streams(cfg: WorkloadConfig, make_prompt: Callable[[int], list[int]], tokenizer: Optional[Tokenizer],
                   context: _ContextPolicy, rng: np.random.Generator):
    """arrival=classes: each class's own stream (Gamma arrivals with its lengths, or its trace's rows), merged by
    time; the first num_requests that fit the context. Returns (prompts, outputs, times, class indices)."""
    n, sources, events = cfg.num_requests, [], []
    for k, c in enumerate(cfg.classes):
        own = np.random.default_rng(rng.integers(2**63))
        if c.trace_path:
            records = load_trace(c.trace_path)
            sources.append([(r, r.output_tokens, f"{c.trace_path} row {i + 1}") for i, r in enumerate(records)])
            events += [(r.arrival_time, k, i) for i, r in enumerate(records)]
            continue
        lengths = sample_lengths(c.prompt or cfg.prompt, n, own, f"classes[{k}].prompt")
        outs = sample_lengths(c.output or cfg.output, n, own, f"classes[{k}].output")
        sources.append([(int(p), int(o), f"class {c.name} request {i}") for i, (p, o) in enumerate(zip(lengths, outs))])
        events += [(t, k, i) for i, t in enumerate(gamma_arrivals(n, c.rate, c.burstiness, own))]
    prompts, outputs, times, classes = [], [], [], []
    for t, k, i in sorted(events):
        if len(prompts) == n:
            break
        source, output, where = sources[k][i]
        prompt = make_prompt(source) if isinstance(source, int) else _trace_prompt(source, make_prompt, tokenizer)
        fitted = context.fit(prompt[: cfg.max_prompt_len], output, where)
        if fitted is not None:
            prompts.append(fitted[0])
            outputs.append(fitted[1])
            times.append(t * cfg.time_scale)
            classes.append(k)
    if len(prompts) < n:
        raise ValueError(f"the classes' streams have {len(prompts)} requests that fit the model's context but the "
                         f"workload needs {n}; lower workload.num_requests")
    return prompts, outputs, times, np.array(classes)


def _draw_classes(classes: list[RequestClassSpec], n: int, rng: np.random.Generator) -> np.ndarray:
    """Each request's class index, drawn by share (all zeros without classes; nothing drawn then)."""
    if not classes:
        return np.zeros(n, dtype=np.int64)
    shares = np.array([c.share for c in classes], dtype=float)
    return rng.choice(len(classes), size=n, p=shares / shares.sum())


def _synthetic_arrivals(cfg: WorkloadConfig, rng: np.random.Generator) -> ArrivalProcess:
    if cfg.arrival == "closed_loop":
        return ClosedLoopArrivals(cfg.num_requests, cfg.clients, rng, cfg.warmup, cfg.jitter_s_per_client)
    burstiness = 1.0 if cfg.arrival == "poisson" else cfg.burstiness
    return OpenLoopArrivals(gamma_arrivals(cfg.num_requests, cfg.rate, burstiness, rng))


def _prompt_source(cfg: WorkloadConfig, vocab_size: int, tokenizer: Optional[Tokenizer],
                   rng: np.random.Generator) -> Callable[[int], list[int]]:
    """A function from prompt length to token ids, following `cfg.prompt_source`."""
    if cfg.prompt_source == "random":
        if not 0 <= cfg.random_token_low < vocab_size:
            raise ValueError(f"random_token_low must satisfy 0 <= random_token_low < vocab_size ({vocab_size}), "
                             f"got {cfg.random_token_low}")
        return lambda length: random_prompt(length, vocab_size, rng, cfg.random_token_low)
    if tokenizer is None:
        raise ValueError(f"prompt_source={cfg.prompt_source!r} needs a tokenizer: pass tokenizer= or use "
                         "prompt_source='random'")
    return (QuotePrompts if cfg.prompt_source == "quote" else CorpusPrompts)(tokenizer, rng, cfg.corpus_path).take


def _trace_prompt(record: TraceRecord, make_prompt: Callable[[int], list[int]],
                  tokenizer: Optional[Tokenizer]) -> list[int]:
    if record.prompt_token_ids is not None:
        return record.prompt_token_ids
    if record.prompt_tokens is not None:
        return make_prompt(record.prompt_tokens)
    if tokenizer is None:
        raise ValueError("the trace has text prompts: pass tokenizer= to build_workload")
    ids = tokenizer.encode(record.prompt, add_special_tokens=False)
    if not ids:
        raise ValueError(f"trace prompt {record.prompt!r} tokenized to no tokens")
    return ids
