"""The figures of a run with request classes (written beside its metrics.json when its requests have more than one
class or tenant): each class's TTFT and TPOT distributions (CDFs, with the class's SLO target), and each tenant's
cumulative weighted service over the run (VTC's cost: fastgen.metrics.W_INPUT per prompt token when the request is
first scheduled, W_OUTPUT per output token), whose vertical gap between two tenants is the service difference VTC
bounds."""
from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fastgen.metrics import W_INPUT, W_OUTPUT, is_completed, service_events, tpot, ttft
from fastgen.request_trace import RequestTrace


def has_classes(traces: Sequence[RequestTrace]) -> bool:
    return len({t.request_class for t in traces}) > 1 or len({t.tenant for t in traces}) > 1


def class_figures(traces: Sequence[RequestTrace], out: Path, title: str = "") -> list[Path]:
    """class_latency_cdf.png and tenant_service.png in `out`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = "\n".join(textwrap.fill(line, 110) for line in title.splitlines())
    groups: dict[str, list[RequestTrace]] = {}
    for t in traces:
        groups.setdefault(t.request_class or t.tenant, []).append(t)
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8))
    for ax, (name, measure, target) in zip(axes, [("TTFT", ttft, "ttft_s"), ("TPOT", tpot, "tpot_s")]):
        for k, (label, group) in enumerate(sorted(groups.items())):
            values = np.sort([v for v in (measure(t) for t in group if is_completed(t)) if v is not None])
            if not len(values):
                continue
            line, = ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post",
                            label=f"{label} ({len(values)})")
            slo = group[0].slo
            if slo is not None and getattr(slo, target) is not None:
                ax.axvline(getattr(slo, target), color=line.get_color(), ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(f"{name} (s; dashed: the class's SLO)")
        ax.set_ylabel("fraction of completed requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    paths = [out / "class_latency_cdf.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    for tenant in sorted({t.tenant for t in traces}):
        events = sorted(e for t in traces if t.tenant == tenant for e in service_events(t, W_INPUT, W_OUTPUT))
        if events:
            times, weights = zip(*events)
            ax.step(times, np.cumsum(weights), where="post", label=tenant)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("cumulative service (weighted tokens)")
    ax.set_title(f"{title}\nservice: {W_INPUT:g} per prompt token, {W_OUTPUT:g} per output token", fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "tenant_service.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
