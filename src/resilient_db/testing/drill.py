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

import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url

from ..config import BreakerPolicy, Policy, RetryPolicy, Timeouts
from ..errors import CircuitOpenError, ConfigurationError, PoolExhaustedError, error_context
from ._drill_report import Phase, build_report
from ._drill_report import format_table as format_table
from ._drill_report import write_plot as write_plot
from ._timeline import Sample
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


@dataclass
class _Scenario:
    """The drill's phases, one after the other, against the running workload."""

    proxy: DatabaseProxy
    work: _Workload
    log: _BreakerLog
    say: _Progress
    phase_seconds: float
    latency: float

    def ticker(self, name: str, since: float) -> Callable[[], None]:
        return lambda: self.say.tick(name, self.work.samples, since, self.log.state)

    def baseline(self, threads: int) -> Phase:
        """Start the workload and let it run one phase undisturbed."""
        t0 = time.monotonic()
        self.work.start()
        base = Phase("baseline", None, t0)
        self.say.say(f"baseline: {threads} workers, read+write transactions")
        _wait(self.phase_seconds, self.ticker("baseline", t0))
        base.end = time.monotonic()
        return base

    def recovered(self, since: float) -> float | None:
        """When requests began to succeed with the breaker closed after ``since``, if yet."""
        if self.log.state != "closed":
            return None
        samples = list(self.work.samples)
        ok = [s.end for s in samples if s.start >= since and s.outcome == "ok"]
        if not ok:
            return None
        closed = self.log.first("closed", since) or since
        return max(min(ok), closed)

    def fault(self, fault: str, previous: Phase) -> list[Phase]:
        """Apply ``fault`` for one phase, lift it, wait for recovery: the two phases."""
        # The fault bites during _apply (reset_all breaks calls at once), so it
        # begins before it, and the previous phase ends at that very instant:
        # every request, counted by completion, falls in exactly one phase.
        start = time.monotonic()
        previous.end = start
        _apply(self.proxy, fault, self.latency)
        self.say.say(f"fault {fault}: {FAULTS[fault]}")
        ph = Phase(fault, fault, start)
        _wait(self.phase_seconds, self.ticker(fault, start))
        self.proxy.passthrough()
        ph.end = time.monotonic()
        self.say.say(f"fault {fault} lifted")
        rec = Phase(f"after {fault}", None, ph.end)
        _wait(
            max(2.0 * self.phase_seconds, 5.0),
            self.ticker(f"after {fault}", ph.end),
            until=lambda: self.recovered(ph.end) is not None,
        )
        when = self.recovered(ph.end)
        ph.recover = None if when is None else when - ph.end
        settle = min(1.0, self.phase_seconds / 2)
        _wait(settle, self.ticker(f"after {fault}", ph.end))
        rec.end = time.monotonic()
        # calls caught by the fault may fail only after it is lifted (a deadline)
        opened = self.log.first("open", start)
        ph.detect = None if opened is None or opened > rec.end else opened - start
        detected = (
            f"breaker opened {ph.detect:.2f}s after the fault began"
            if ph.detect is not None
            else "breaker stayed closed"
        )
        self.say.say(
            f"{detected}; recovered {ph.recover:.2f}s after it was lifted"
            if ph.recover is not None
            else f"{detected}; NOT recovered"
        )
        return [ph, rec]


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
            run = _Scenario(proxy, work, log, say, phase_seconds, latency)
            phases.append(run.baseline(threads))
            for fault in scenario:
                phases += run.fault(fault, phases[-1])
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
    return build_report(
        target,
        scratch_table=table_name,
        threads=threads,
        phase_seconds=phase_seconds,
        latency=latency,
        policy=policy,
        span=(t_begin, t_end),
        phases=phases,
        samples=samples,
        events=log.events,
        proxy_errors=proxy_errors,
    )


def _drop(table: sa.Table, admin: Engine, say: _Progress) -> None:
    try:
        table.drop(admin, checkfirst=True)
        say.say(f"dropped scratch table {table.name}")
    except sa_exc.SQLAlchemyError as e:
        ctx = error_context(e)
        why = ctx.diagnosis if ctx is not None else type(e).__name__
        sys.stderr.write(f"resilient-db drill: could not drop scratch table {table.name}: {why}\n")
