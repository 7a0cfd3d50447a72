"""Request samples, percentiles, per-interval series and the plot shared by drill and demo."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["OUTCOMES", "Panel", "Sample", "figure", "percentile", "plot", "series"]

#: Request outcomes: answered, failed with an error, rejected at once by the
#: open breaker (or the bulkhead), or given up on by the client.
OUTCOMES = ("ok", "failed", "rejected", "timeout")


@dataclass(frozen=True, slots=True)
class Sample:
    """One request: monotonic start and end, outcome, error kind, whether it used the database."""

    start: float
    end: float
    outcome: str
    kind: str | None = None
    db: bool = True

    @property
    def latency(self) -> float:
        """Seconds from arrival to answer."""
        return self.end - self.start


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (0-100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def series(
    samples: Iterable[Sample], *, t0: float, t1: float, width: float = 0.5
) -> list[dict[str, Any]]:
    """Per-interval counts (by completion time) and latency percentiles.

    Each entry: ``t`` (interval start, seconds after ``t0``), a count per
    outcome, and ``p50_ms`` / ``p99_ms`` of the requests completed in it.
    """
    n = max(1, math.ceil((t1 - t0) / width))
    buckets: list[dict[str, Any]] = [
        {"t": round(i * width, 3), **dict.fromkeys(OUTCOMES, 0)} for i in range(n)
    ]
    latencies: list[list[float]] = [[] for _ in range(n)]
    for s in samples:
        i = int((s.end - t0) // width)
        if 0 <= i < n:
            buckets[i][s.outcome] = buckets[i].get(s.outcome, 0) + 1
            latencies[i].append(s.latency)
    for b, lat in zip(buckets, latencies, strict=True):
        b["p50_ms"] = _ms(percentile(lat, 50))
        b["p99_ms"] = _ms(percentile(lat, 99))
    return buckets


@dataclass
class Panel:
    """One column of the plot: a run's series, its fault windows and breaker-open spans."""

    title: str
    series: list[dict[str, Any]]
    width: float
    faults: list[tuple[float, float, str]] = field(default_factory=list)
    breaker_open: list[tuple[float, float]] = field(default_factory=list)


def plot(path: str, panels: Sequence[Panel], *, title: str) -> None:
    """Write throughput and latency over time, fault windows shaded, to ``path`` (PNG).

    Needs matplotlib (``pip install 'resilient-db[plot]'``); raises ImportError
    without it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(panels, title=title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _steps(panel: Panel, ys: list[float]) -> tuple[list[float], list[float]]:
    """Bin edges and values for ``drawstyle="steps-post"``: each bin flat over its interval.

    A count is drawn from its interval's start to its end, so nothing appears to
    rise before the interval (a fault window) it belongs to.
    """
    ts = [b["t"] for b in panel.series]
    if not ts:
        return [], []
    return [*ts, ts[-1] + panel.width], [*ys, ys[-1]]


def figure(panels: Sequence[Panel], *, title: str) -> Any:
    """The matplotlib Figure :func:`plot` saves (needs matplotlib with a backend set)."""
    import matplotlib.pyplot as plt

    cols = len(panels)
    fig, axes = plt.subplots(
        2, cols, figsize=(max(9.0, 6.5 * cols), 6.5), sharex="col", sharey="row", squeeze=False
    )
    colors = {"ok": "#2a9d4b", "failed": "#d1495b", "rejected": "#edae49", "timeout": "#7b3294"}
    labels = {
        "ok": "ok",
        "failed": "failed",
        "rejected": "rejected fast",
        "timeout": "client gave up",
    }
    for col, panel in enumerate(panels):
        top, bottom = axes[0][col], axes[1][col]
        for outcome in OUTCOMES:
            ys = [b[outcome] / panel.width for b in panel.series]
            if any(ys):
                top.plot(
                    *_steps(panel, ys),
                    color=colors[outcome],
                    label=labels[outcome],
                    lw=1.6,
                    drawstyle="steps-post",
                )
        for key, style in (("p50_ms", "-"), ("p99_ms", "--")):
            # NaN where nothing completed: a gap in the line, not a slope across it
            ys = [math.nan if b[key] is None else max(b[key], 0.01) for b in panel.series]
            if any(not math.isnan(y) for y in ys):
                bottom.plot(
                    *_steps(panel, ys),
                    style,
                    color="#1d3557",
                    label=key.replace("_ms", ""),
                    lw=1.4,
                    drawstyle="steps-post",
                )
        bottom.set_yscale("log")
        for ax in (top, bottom):
            for a, b, _label in panel.faults:
                ax.axvspan(a, b, color="#d1495b", alpha=0.12, lw=0)
            for a, b in panel.breaker_open:
                ax.axvspan(a, b, ymin=0.0, ymax=0.03, color="#edae49", alpha=0.9, lw=0)
            ax.grid(True, alpha=0.3)
        for a, b, label in panel.faults:
            top.annotate(
                label,
                xy=((a + b) / 2, 1.0),
                xycoords=("data", "axes fraction"),
                ha="center",
                va="bottom",
                fontsize=8,
                color="#9b2226",
            )
        top.set_title(panel.title, pad=14)
        bottom.set_xlabel("seconds")
        if col == 0:
            top.set_ylabel("requests / s")
            bottom.set_ylabel("latency, ms (log)")
    for row in axes:  # one legend per row, right of the last panel: it never covers data
        entries: dict[str, Any] = {}
        for ax in row:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                entries.setdefault(label, handle)
        if entries:
            row[-1].legend(
                list(entries.values()),
                list(entries),
                loc="upper left",
                bbox_to_anchor=(1.01, 1.0),
                borderaxespad=0.0,
                fontsize=8,
            )
    fig.suptitle(title + "   (red: fault window; orange bar: breaker open)", fontsize=10)
    fig.tight_layout()
    return fig
