"""The report of ``resilient-db drill``: its phases, the ``--json`` document built
from them, the text table and the plot (see :mod:`.drill`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import URL

from ..config import Policy
from ._timeline import Panel, Sample, percentile, plot, series

_BUCKET = 0.5


@dataclass
class Phase:
    """One window of the drill and what happened in it."""

    name: str
    fault: str | None
    start: float
    end: float = 0.0
    detect: float | None = None
    recover: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def _counts(samples: Sequence[Sample]) -> dict[str, Any]:
    lat = [s.latency for s in samples]
    errors: dict[str, int] = {}
    for s in samples:
        if s.outcome == "failed":
            errors[s.kind or "unknown"] = errors.get(s.kind or "unknown", 0) + 1
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    return {
        "requests": len(samples),
        "ok": sum(s.outcome == "ok" for s in samples),
        "failed": sum(s.outcome == "failed" for s in samples),
        "rejected": sum(s.outcome == "rejected" for s in samples),
        "p50_ms": None if p50 is None else round(p50 * 1000, 1),
        "p99_ms": None if p99 is None else round(p99 * 1000, 1),
        "max_ms": round(max(lat) * 1000, 1) if lat else None,
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])),
    }


def _target(url: URL) -> dict[str, Any]:
    return {
        "dialect": url.get_backend_name(),
        "driver": url.get_driver_name(),
        "host": url.host,
        "port": url.port,
        "database": url.database,
        "user": url.username,
    }


def _open_windows(
    events: Sequence[tuple[float, str]], origin: float, t_end: float
) -> list[tuple[float, float]]:
    """When the breaker was open, relative to ``origin`` (still open: until ``t_end``)."""
    opens: list[tuple[float, float]] = []
    opened_at: float | None = None
    for t, state in events:
        if state == "open" and opened_at is None:
            opened_at = t
        elif state == "closed" and opened_at is not None:
            opens.append((opened_at - origin, t - origin))
            opened_at = None
    if opened_at is not None:
        opens.append((opened_at - origin, t_end - origin))
    return opens


def build_report(
    target: URL,
    *,
    scratch_table: str,
    threads: int,
    phase_seconds: float,
    latency: float,
    policy: Policy,
    span: tuple[float, float],
    phases: Sequence[Phase],
    samples: Sequence[Sample],
    events: Sequence[tuple[float, str]],
    proxy_errors: list[str],
) -> dict[str, Any]:
    """The ``--json`` document of a drill that ran from ``span[0]`` to ``span[1]``."""
    t_begin, t_end = span
    origin = phases[0].start if phases else t_begin
    for ph in phases:
        # by completion: a request cut off by a fault counts in the fault's phase
        ph.stats = _counts([s for s in samples if ph.start <= s.end < ph.end])
    opens = _open_windows(events, origin, t_end)
    faults = [p for p in phases if p.fault is not None]
    return {
        "version": 1,
        "target": _target(target),
        "scratch_table": scratch_table,
        "threads": threads,
        "phase_seconds": phase_seconds,
        "latency_s": latency,
        "policy": dataclasses.asdict(policy),
        "duration_s": round(t_end - t_begin, 2),
        "recovered": all(p.recover is not None for p in faults),
        "proxy_errors": proxy_errors,
        "phases": [
            {
                "name": p.name,
                "fault": p.fault,
                "start_s": round(p.start - origin, 3),
                "end_s": round(p.end - origin, 3),
                **p.stats,
                "detect_s": None if p.detect is None else round(p.detect, 3),
                "recover_s": None if p.recover is None else round(p.recover, 3),
            }
            for p in phases
        ],
        "breaker": [{"t_s": round(t - origin, 3), "state": s} for t, s in events],
        "breaker_open": [[round(a, 3), round(b, 3)] for a, b in opens],
        "series_interval_s": _BUCKET,
        "series": series(samples, t0=origin, t1=t_end, width=_BUCKET),
    }


def _fmt(value: float | None, unit: str = "", digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def format_table(report: dict[str, Any]) -> str:
    """The report as a text table, one row per phase."""
    t = report["target"]
    lines = [
        f"resilient-db drill: {t['dialect']}+{t['driver']} at {t['host']}:{t['port']}"
        f"/{t['database']}, {report['threads']} workers, {report['phase_seconds']:g}s per fault, "
        f"{report['duration_s']:.1f}s in all",
        "",
    ]
    head = (
        f"{'phase':<18}{'secs':>6}{'ok':>7}{'failed':>8}{'rejected':>10}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'max ms':>9}{'detect':>9}{'recover':>9}  errors"
    )
    lines += [head, "-" * len(head)]
    for p in report["phases"]:
        errors = ", ".join(f"{k} {v}" for k, v in p["errors"].items())
        recover = p["recover_s"]
        rec = "never" if p["fault"] and recover is None else _fmt(recover, "s")
        lines.append(
            f"{p['name']:<18}{p['end_s'] - p['start_s']:>6.1f}{p['ok']:>7}{p['failed']:>8}"
            f"{p['rejected']:>10}{_fmt(p['p50_ms'], digits=1):>9}{_fmt(p['p99_ms'], digits=1):>9}"
            f"{_fmt(p['max_ms'], digits=1):>9}"
            f"{_fmt(p['detect_s'], 's'):>9}{rec:>9}  {errors}"
        )
    lines += [
        "",
        "detect: fault start -> breaker open. recover: fault lifted -> requests succeed with "
        "the breaker closed.",
        "rejected: failed fast by the open breaker or the bulkhead, without touching the network.",
        "All requests (ok or not) count in the latency percentiles.",
    ]
    if not report["recovered"]:
        lines.append("DRILL FAILED: the workload did not recover from every fault.")
    return "\n".join(lines)


def write_plot(report: dict[str, Any], path: str) -> None:
    """Throughput and latency over time with the fault windows shaded (needs matplotlib)."""
    faults = [(p["start_s"], p["end_s"], p["fault"]) for p in report["phases"] if p["fault"]]
    t = report["target"]
    panel = Panel(
        title=f"drill: {t['dialect']} at {t['host']}:{t['port']}, {report['threads']} workers",
        series=report["series"],
        width=report["series_interval_s"],
        faults=faults,
        breaker_open=[(a, b) for a, b in report["breaker_open"]],
    )
    plot(path, [panel], title="resilient-db drill")
