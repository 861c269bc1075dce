"""Benchmark workloads: which requests are sent (prompt tokens, output budget) and when; the configs, arrival
processes, lengths, prompts and trace replay are described in fastgen.workloads.workload."""
from fastgen.workloads.arrivals import (ArrivalProcess, ClosedLoopArrivals, OpenLoopArrivals, gamma_arrivals,
                                       poisson_arrivals)
from fastgen.workloads.corpus import CORPUS_PATH, CorpusPrompts, random_prompt
from fastgen.workloads.lengths import LengthSpec, sample_lengths
from fastgen.workloads.replay import TraceRecord, load_trace
from fastgen.workloads.shared_prefix import ConversationArrivals, SharedPrefixSpec
from fastgen.workloads.workload import (ARRIVALS, EXAMPLE_TRACE_PATH, PROMPT_SOURCES, RequestClassSpec, Workload,
                                        WorkloadConfig, WorkloadRequest, build_workload)

__all__ = [
    "ARRIVALS", "CORPUS_PATH", "EXAMPLE_TRACE_PATH", "PROMPT_SOURCES", "ArrivalProcess",
    "ClosedLoopArrivals", "ConversationArrivals", "CorpusPrompts", "LengthSpec", "OpenLoopArrivals",
    "RequestClassSpec", "SharedPrefixSpec", "TraceRecord",
    "Workload", "WorkloadConfig", "WorkloadRequest", "build_workload", "gamma_arrivals",
    "load_trace", "poisson_arrivals", "random_prompt", "sample_lengths",
]
