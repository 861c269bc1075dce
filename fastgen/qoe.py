"""Quality of experience of a streamed response, as Andes defines it (Liu et al., "Andes: Defining and Enhancing
Quality-of-Experience in LLM-Based Text Streaming Services", arXiv 2404.16283).

A user expects the first token `ttft_s` after sending the request and then reads at a token delivery speed `tds`
(tokens/s): the expected timeline delivers token i at e_i = arrival + ttft_s + i / tds. Tokens that arrive early
wait in the client's buffer (a reader cannot read faster than tds), tokens that arrive late stall the reader:
the reader reaches token i at d_i = max(a_i, d_{i-1} + 1/tds), a_i its arrival. The actual timeline counts the
tokens read by time t, capped by the expected one (being ahead of it gives nothing); QoE is the ratio of the areas
under the actual and the expected timelines up to the time T the reader finishes the last token:

    QoE = S_actual / S_expected = sum_i (T - max(d_i, e_i)) / sum_i (T - e_i),   T = max(d_n, e_n) + 1/tds

(both timelines are counts of sorted times, so the area under min(actual, expected) is the sum over tokens of the
time after both have delivered token i). QoE is 1 when every token is read on schedule, and falls towards 0 as
the response lags its expected timeline. The expectation is the request's SLO where it has one (ttft_s; tds =
1 / tpot_s), else the defaults below: a reader's pace of about 5 tokens/s (some 200-250 words a minute) after a
first token within a second.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from fastgen.request_trace import SLO

EXPECTED_TTFT_S = 1.0
EXPECTED_TDS = 5.0


@dataclass(frozen=True)
class Expectation:
    """A user's expected timeline: first token after `ttft_s`, then `tds` tokens/s."""

    ttft_s: float = EXPECTED_TTFT_S
    tds: float = EXPECTED_TDS

    @classmethod
    def of(cls, slo: Optional[SLO], default: "Expectation | None" = None) -> "Expectation":
        """The request's own targets where its SLO sets them, else `default`'s (or the module's defaults)."""
        default = default or cls()
        if slo is None:
            return default
        return cls(slo.ttft_s if slo.ttft_s is not None else default.ttft_s,
                   1.0 / slo.tpot_s if slo.tpot_s is not None else default.tds)

    def expected_time(self, arrival: float, i: int) -> float:
        """When token i (0-based) is expected."""
        return arrival + self.ttft_s + i / self.tds

    def expected_tokens(self, arrival: float, t: float, limit: int) -> int:
        """Tokens the expected timeline has delivered by time t (at most `limit`)."""
        elapsed = t - arrival - self.ttft_s
        return 0 if elapsed < 0 else min(limit, int(elapsed * self.tds) + 1)

    def expected_area(self, num_tokens: int) -> float:
        """S_expected of a response of num_tokens read on schedule: sum of (T - e_i) = sum of (n - i) / tds."""
        return num_tokens * (num_tokens + 1) / (2 * self.tds)


def qoe(arrival: float, token_times: Sequence[float], expect: Expectation) -> Optional[float]:
    """Andes' QoE of one response (see the module's doc); None for a response without tokens."""
    if not token_times:
        return None
    pace = 1.0 / expect.tds
    read, starts = [], []
    for i, a in enumerate(token_times):
        d = a if not read else max(a, read[-1] + pace)
        read.append(d)
        starts.append(max(d, expect.expected_time(arrival, i)))
    end = max(read[-1], expect.expected_time(arrival, len(token_times) - 1)) + pace
    expected = sum(end - expect.expected_time(arrival, i) for i in range(len(token_times)))
    return sum(end - s for s in starts) / expected
