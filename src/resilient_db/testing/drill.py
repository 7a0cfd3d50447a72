"""``resilient-db drill URL``: a scripted game day against a real server, through a proxy.

A few threads run a steady read+write workload on a scratch table of their own
(``resilient_db_drill_<random>``, created at the start and dropped at the end;
no other table is touched) through a :class:`~resilient_db.testing.DatabaseProxy`
that forwards only to the host and port of the URL given. After a baseline,
each fault of the scenario is applied for ``--phase-seconds``, then removed,
and the drill waits for the workload to recover. For every phase it reports
requests ok / failed / rejected fast by the breaker, p50 / p99 latency, the
time until the breaker opened (detect) and the time from the end of the fault
until requests succeeded again with the breaker closed (recover).

The command line (``add_arguments``, ``run``) is in :mod:`._drill_cli`.
Output: a text table on stdout (``--json`` for JSON), progress on stderr,
``--plot FILE.png`` for throughput and latency over time (needs matplotlib).
Exit status 0 when the workload recovered from every fault, 1 when it did
not, 2 for a bad URL or option.
"""

from __future__ import annotations

import dataclasses
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url

from ..config import BreakerPolicy, Policy, RetryPolicy, Timeouts
from ..errors import CircuitOpenError, ConfigurationError, PoolExhaustedError, error_context
from ._timeline import Panel, Sample, percentile, plot, series
from .dbproxy import DatabaseProxy

__all__ = ["DEFAULT_SCENARIO", "DRILL_POLICY", "FAULTS", "drill", "format_table", "write_plot"]

#: What each fault does to the network (the proxy applies it).
FAULTS: dict[str, str] = {
    "refuse": "the server goes down: open connections are reset, new ones refused",
    "blackhole": "every packet is swallowed, open connections go silent (network partition)",
    "reset": "every connection is reset as soon as the server answers (a flapping load balancer)",
    "latency": "every packet is delayed (a congested or far-away network)",
}
DEFAULT_SCENARIO = ("refuse", "blackhole", "reset", "latency")

#: Short deadlines so a drill finishes in about a minute; ``--policy env`` uses yours.
DRILL_POLICY = Policy(
    timeouts=Timeouts(connect=1.0, checkout=1.0, statement=5.0, call=1.0),
    retry=RetryPolicy(attempts=2, initial=0.05, max_backoff=0.2, deadline=2.0),
    breaker=BreakerPolicy(failure_threshold=3, reset_timeout=1, probe_after=0.3, probe_timeout=0.5),
    application_name="resilient-db-drill",
    validate="off",
)

_THINK = 0.02  # seconds between two requests of one worker
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


class _BreakerLog:
    """Breaker listener: timestamps of state changes."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.events: list[tuple[float, str]] = []
        self.state = "closed"

    def state_change(self, cb: Any, old: Any, new: Any) -> None:
        self.state = str(new)
        self.events.append((self.clock(), self.state))

    def first(self, state: str, after: float) -> float | None:
        return next((t for t, s in list(self.events) if s == state and t >= after), None)


class _Workload:
    """``threads`` workers doing one read+write transaction each, back to back."""

    def __init__(self, engine: Engine, table: sa.Table, threads: int) -> None:
        self.engine = engine
        self.table = table
        self.samples: list[Sample] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._loop, args=(i,), name=f"drill-{i}", daemon=True)
            for i in range(threads)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            if t.ident is not None:  # started
                t.join(max(0.0, deadline - time.monotonic()))

    def _loop(self, worker: int) -> None:
        t = self.table
        read = sa.select(t.c.n).where(t.c.id == worker)
        write = sa.update(t).where(t.c.id == worker).values(n=t.c.n + 1)
        while not self.stop.is_set():
            start = time.monotonic()
            kind: str | None = None
            try:
                with self.engine.begin() as conn:
                    conn.execute(read).scalar()
                    conn.execute(write)
                outcome = "ok"
            except (CircuitOpenError, PoolExhaustedError):
                outcome = "rejected"
            except sa_exc.SQLAlchemyError as e:
                outcome = "failed"
                ctx = error_context(e)
                kind = ctx.kind if ctx is not None else "unknown"
            except Exception:  # a driver error SQLAlchemy did not wrap
                outcome, kind = "failed", "unknown"
            self.samples.append(Sample(start, time.monotonic(), outcome, kind))
            self.stop.wait(_THINK)


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


def _apply(proxy: DatabaseProxy, fault: str, latency: float) -> None:
    if fault == "refuse":  # no byte forwarded between the steps: nothing completes mid-way
        proxy.blackhole()
        proxy.reset_all()
        proxy.refuse()
    elif fault == "blackhole":
        proxy.blackhole()
    elif fault == "reset":
        proxy.reset_after(0)
        proxy.reset_all()
    elif fault == "latency":
        proxy.latency(latency)
    else:  # pragma: no cover - validated in run()
        raise ValueError(fault)


class _Progress:
    def __init__(self, out: TextIO, t0: float, enabled: bool) -> None:
        self.out, self.t0, self.enabled = out, t0, enabled
        self.tty = out.isatty()

    def say(self, text: str) -> None:
        if self.enabled:
            if self.tty:
                self.out.write("\r\x1b[K")
            self.out.write(f"[{time.monotonic() - self.t0:6.1f}s] {text}\n")
            self.out.flush()

    def tick(self, phase: str, samples: Sequence[Sample], since: float, state: str) -> None:
        if not (self.enabled and self.tty):
            return
        recent = [s for s in samples[-2000:] if s.end >= since]
        ok = sum(s.outcome == "ok" for s in recent)
        failed = sum(s.outcome == "failed" for s in recent)
        rejected = sum(s.outcome == "rejected" for s in recent)
        self.out.write(
            f"\r\x1b[K[{time.monotonic() - self.t0:6.1f}s] {phase:<18} ok {ok:5d}  "
            f"failed {failed:4d}  rejected {rejected:5d}  breaker {state}"
        )
        self.out.flush()


def _wait(
    seconds: float, tick: Callable[[], None], until: Callable[[], bool] | None = None
) -> None:
    end = time.monotonic() + seconds
    next_tick = 0.0
    while (now := time.monotonic()) < end:
        if until is not None and until():
            return
        if now >= next_tick:
            tick()
            next_tick = now + 0.5
        time.sleep(min(0.05, max(0.0, end - now)))


def _target(url: URL) -> dict[str, Any]:
    return {
        "dialect": url.get_backend_name(),
        "driver": url.get_driver_name(),
        "host": url.host,
        "port": url.port,
        "database": url.database,
        "user": url.username,
    }


def drill(
    url: str | URL,
    *,
    scenario: Sequence[str] = DEFAULT_SCENARIO,
    phase_seconds: float = 5.0,
    threads: int = 4,
    latency: float = 0.1,
    policy: Policy = DRILL_POLICY,
    progress: TextIO | None = None,
) -> dict[str, Any]:
    """Run a drill against ``url`` and return the report (the ``--json`` document).

    Raises :class:`~resilient_db.ConfigurationError` for a URL the proxy
    cannot sit in front of.
    """
    from ..engine import breaker_of, create_engine

    target = make_url(url)
    for fault in scenario:
        if fault not in FAULTS:
            raise ConfigurationError(
                "scenario", f"has an unknown fault {fault!r}.", f"Use {', '.join(FAULTS)}."
            )
    table_name = f"resilient_db_drill_{secrets.token_hex(4)}"
    table = sa.Table(
        table_name,
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("n", sa.Integer, nullable=False),
    )
    t_begin = time.monotonic()
    say = _Progress(progress or sys.stderr, t_begin, progress is not None)
    phases: list[Phase] = []
    with DatabaseProxy(target) as proxy:
        admin = create_engine(target, name="drill-admin", policy=policy, validate="off")
        engine = create_engine(proxy.url, name="drill", policy=policy, validate="off")
        log = _BreakerLog(time.monotonic)
        breaker_of(engine).listeners.append(log)
        work = _Workload(engine, table, threads)
        created = False
        try:
            say.say(f"creating scratch table {table_name} on {target.host}:{proxy.upstream[1]}")
            table.create(admin)
            created = True
            with admin.begin() as conn:
                conn.execute(table.insert(), [{"id": i, "n": 0} for i in range(threads)])
            t0 = time.monotonic()
            work.start()

            def ticker(name: str, since: float) -> Callable[[], None]:
                return lambda: say.tick(name, work.samples, since, log.state)

            base = Phase("baseline", None, t0)
            say.say(f"baseline: {threads} workers, read+write transactions")
            _wait(phase_seconds, ticker("baseline", t0))
            base.end = time.monotonic()
            phases.append(base)
            for fault in scenario:
                # The fault bites during _apply (reset_all breaks calls at once), so it
                # begins before it, and the previous phase ends at that very instant:
                # every request, counted by completion, falls in exactly one phase.
                start = time.monotonic()
                phases[-1].end = start
                _apply(proxy, fault, latency)
                say.say(f"fault {fault}: {FAULTS[fault]}")
                ph = Phase(fault, fault, start)
                _wait(phase_seconds, ticker(fault, start))
                proxy.passthrough()
                ph.end = time.monotonic()
                phases.append(ph)
                say.say(f"fault {fault} lifted")
                rec = Phase(f"after {fault}", None, ph.end)

                def recovered(since: float = ph.end) -> float | None:
                    if log.state != "closed":
                        return None
                    samples = list(work.samples)
                    ok = [s.end for s in samples if s.start >= since and s.outcome == "ok"]
                    if not ok:
                        return None
                    closed = log.first("closed", since) or since
                    return max(min(ok), closed)

                _wait(
                    max(2.0 * phase_seconds, 5.0),
                    ticker(f"after {fault}", ph.end),
                    until=lambda: recovered() is not None,
                )
                when = recovered()
                ph.recover = None if when is None else when - ph.end
                settle = min(1.0, phase_seconds / 2)
                _wait(settle, ticker(f"after {fault}", ph.end))
                rec.end = time.monotonic()
                phases.append(rec)
                # calls caught by the fault may fail only after it is lifted (a deadline)
                opened = log.first("open", start)
                ph.detect = None if opened is None or opened > rec.end else opened - start
                detected = (
                    f"breaker opened {ph.detect:.2f}s after the fault began"
                    if ph.detect is not None
                    else "breaker stayed closed"
                )
                say.say(
                    f"{detected}; recovered {ph.recover:.2f}s after it was lifted"
                    if ph.recover is not None
                    else f"{detected}; NOT recovered"
                )
        finally:
            work.join(timeout=(policy.timeouts.call or 5.0) + 2.0)
            proxy.passthrough()
            engine.dispose()
            if created:
                _drop(table, admin, say)
            admin.dispose()
            proxy_errors = [repr(e) for e in proxy.errors]
    t_end = time.monotonic()
    samples = list(work.samples)
    origin = phases[0].start if phases else t_begin
    for ph in phases:
        # by completion: a request cut off by a fault counts in the fault's phase
        ph.stats = _counts([s for s in samples if ph.start <= s.end < ph.end])
    opens: list[tuple[float, float]] = []
    opened_at: float | None = None
    for t, state in log.events:
        if state == "open" and opened_at is None:
            opened_at = t
        elif state == "closed" and opened_at is not None:
            opens.append((opened_at - origin, t - origin))
            opened_at = None
    if opened_at is not None:
        opens.append((opened_at - origin, t_end - origin))
    faults = [p for p in phases if p.fault is not None]
    return {
        "version": 1,
        "target": _target(target),
        "scratch_table": table_name,
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
        "breaker": [{"t_s": round(t - origin, 3), "state": s} for t, s in log.events],
        "breaker_open": [[round(a, 3), round(b, 3)] for a, b in opens],
        "series_interval_s": _BUCKET,
        "series": series(samples, t0=origin, t1=t_end, width=_BUCKET),
    }


def _drop(table: sa.Table, admin: Engine, say: _Progress) -> None:
    try:
        table.drop(admin, checkfirst=True)
        say.say(f"dropped scratch table {table.name}")
    except sa_exc.SQLAlchemyError as e:
        ctx = error_context(e)
        why = ctx.diagnosis if ctx is not None else type(e).__name__
        sys.stderr.write(f"resilient-db drill: could not drop scratch table {table.name}: {why}\n")


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
