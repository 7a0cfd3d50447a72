"""``resilient-db demo``: a small web service loses its SQLite database, twice.

No server needed. The same simulated service runs twice against a fresh SQLite
file in a temporary directory: once on a plain SQLAlchemy engine, once on a
resilient_db engine. Worker threads serve a steady stream of requests; half of
them read and write the database, half (a health check, a static page) do not.
Clients give up on a request after a few seconds.

The outage is real: a maintenance job opens its own connection and holds an
exclusive lock on the database file (``BEGIN EXCLUSIVE``) for several seconds,
as a long migration, ``VACUUM`` or backup would. Every statement of the
service then waits for SQLite's busy timeout and fails with "database is
locked". Plain SQLAlchemy waits 5 s per request (pysqlite's default) with a
pool as large as the worker count, so the workers all block and every request
queues behind them, the ones that never touch the database included.
resilient_db, with its default policy, lets at most 12 threads into the
database layer (10 connections, 2 waiters: the rest are refused at once),
waits at most 1 s for the lock, opens the breaker after 5 failures and answers
database requests at once with an error while the rest of the service
carries on.

Every number printed comes from the run; the timeline is built from the
requests' timestamps and the breaker's state changes.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from .config import Policy
from .errors import CircuitOpenError, PoolExhaustedError, error_context
from .testing._timeline import Panel, Sample, percentile, series

__all__ = ["DEMO_POLICY", "Settings", "add_arguments", "run", "simulate"]

#: The resilient_db policy of the demo service: the default policy (SQLite's busy
#: timeout 1 s, pool 5 + 5 with 2 waiters, a breaker that opens after 5 failures and
#: probes every 5 s); only the startup check is off.
DEMO_POLICY = Policy(validate="off")

_ORDERS = sa.Table(
    "orders",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("customer", sa.Integer, nullable=False),
    sa.Column("qty", sa.Integer, nullable=False),
)


@dataclass(frozen=True)
class Settings:
    """How the simulated service runs."""

    workers: int = 16
    rate: float = 50.0
    client_timeout: float = 2.0
    before: float = 1.5
    outage: float = 6.0
    after: float = 3.0

    @classmethod
    def quick(cls) -> Settings:
        """Shorter phases for CI (``after`` leaves room for the breaker's 5 s reset)."""
        return cls(before=0.5, outage=3.0, after=4.0)


@dataclass
class Variant:
    """One run of the service and what happened in it."""

    name: str
    engine_note: str
    samples: list[Sample] = field(default_factory=list)
    queue_sizes: list[tuple[float, int]] = field(default_factory=list)
    breaker: list[tuple[float, str, str]] = field(default_factory=list)
    t0: float = 0.0
    outage_start: float = 0.0
    outage_end: float = 0.0
    t_end: float = 0.0


class _BreakerLog:
    def __init__(self, out: list[tuple[float, str, str]]) -> None:
        self.out = out

    def state_change(self, cb: Any, old: Any, new: Any) -> None:
        self.out.append((time.monotonic(), str(old), str(new)))


def _seed(path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{path}")
    _ORDERS.create(engine)
    with engine.begin() as conn:
        conn.execute(_ORDERS.insert(), [{"customer": i % 50, "qty": 1} for i in range(500)])
    engine.dispose()


def _maintenance_job(path: Path, start: float, hold: float, v: Variant) -> None:
    """Hold an exclusive lock on the database file from ``start`` for ``hold`` seconds."""
    time.sleep(max(0.0, start - time.monotonic()))
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        v.outage_start = time.monotonic()
        time.sleep(hold)
        conn.execute("ROLLBACK")
        v.outage_end = time.monotonic()
    finally:
        conn.close()


def _serve(engine: Engine, v: Variant, s: Settings, *, jobs: queue.Queue[Any]) -> None:
    read = sa.select(sa.func.count()).select_from(_ORDERS).where(_ORDERS.c.customer == 7)
    while True:
        job = jobs.get()
        if job is None:
            return
        arrival, uses_db = job
        kind: str | None = None
        outcome = "ok"
        if uses_db:
            try:
                with engine.begin() as conn:
                    conn.execute(read).scalar()
                    conn.execute(_ORDERS.insert().values(customer=7, qty=1))
            except CircuitOpenError:
                outcome, kind = "rejected", "circuit_open"
            except PoolExhaustedError:  # the bulkhead: no thread queues into the lock
                outcome, kind = "rejected", "pool_exhausted"
            except sa_exc.SQLAlchemyError as e:
                ctx = error_context(e)
                outcome = "failed"
                kind = ctx.kind if ctx is not None else _plain_kind(e)
        else:
            time.sleep(0.002)  # render a page that needs no database
        end = time.monotonic()
        if end - arrival > s.client_timeout:
            outcome = "timeout"  # the client gave up; the answer went nowhere
        v.samples.append(Sample(arrival, end, outcome, kind, uses_db))


def _plain_kind(e: BaseException) -> str:
    return "lock_timeout" if "locked" in str(e) else "error"


def _run_variant(v: Variant, engine: Engine, path: Path, s: Settings) -> None:
    jobs: queue.Queue[Any] = queue.Queue()
    workers = [
        threading.Thread(target=_serve, args=(engine, v, s), kwargs={"jobs": jobs}, daemon=True)
        for _ in range(s.workers)
    ]
    for w in workers:
        w.start()
    v.t0 = time.monotonic()
    job = threading.Thread(
        target=_maintenance_job, args=(path, v.t0 + s.before, s.outage, v), daemon=True
    )
    job.start()
    n = int((s.before + s.outage + s.after) * s.rate)
    for i in range(n):
        due = v.t0 + i / s.rate
        time.sleep(max(0.0, due - time.monotonic()))
        jobs.put((time.monotonic(), i % 2 == 0))
        if i % 5 == 0:
            v.queue_sizes.append((time.monotonic(), jobs.qsize()))
    job.join()
    for _ in workers:
        jobs.put(None)
    for w in workers:
        w.join(30.0)
    v.t_end = time.monotonic()


def _policy_note(url: str) -> str:
    from ._driver_args import driver_defaults

    busy = driver_defaults(sa.make_url(url), DEMO_POLICY)["timeout"]
    p, b = DEMO_POLICY.pool, DEMO_POLICY.breaker
    return (
        f"resilient_db.create_engine(), default policy: {busy:g} s busy timeout, at most "
        f"{p.size + p.max_overflow} connections + {p.max_waiters} waiters, breaker opens "
        f"after {b.failure_threshold} failures, probes every {b.reset_timeout:g} s"
    )


def simulate(settings: Settings, *, progress: Callable[[str], None] | None = None) -> list[Variant]:
    """Run the service without, then with resilient_db, through the same outage."""
    from .engine import breaker_of, create_engine

    say = progress or (lambda text: None)
    variants: list[Variant] = []
    with tempfile.TemporaryDirectory(prefix="resilient-db-demo-") as tmp:
        for resilient in (False, True):
            path = Path(tmp) / ("resilient.db" if resilient else "plain.db")
            _seed(path)
            url = f"sqlite:///{path}"
            if resilient:
                v = Variant("with resilient_db", _policy_note(url))
                engine = create_engine(url, name="demo", policy=DEMO_POLICY)
                breaker_of(engine).listeners.append(_BreakerLog(v.breaker))
            else:
                v = Variant(
                    "without resilient_db",
                    "sqlalchemy.create_engine(): pysqlite's 5 s busy timeout, no breaker",
                )
                engine = sa.create_engine(url)
            total = settings.before + settings.outage + settings.after
            say(f"running the service {v.name} ({total:g} s)...")
            try:
                _run_variant(v, engine, path, settings)
            finally:
                engine.dispose()
            variants.append(v)
    return variants


# -- analysis ---------------------------------------------------------------------------


def _first(values: list[float]) -> float | None:
    return min(values) if values else None


def summarize(v: Variant, s: Settings) -> dict[str, Any]:
    """The numbers of one variant (seconds relative to the start of the outage)."""
    o0, o1 = v.outage_start, v.outage_end
    db = [x for x in v.samples if x.db]
    non_db = [x for x in v.samples if not x.db]
    # an error that reached no client (it gave up first) still shows in the service's logs
    errors = sorted((x.end, x.kind) for x in db if x.kind is not None and x.end >= o0)
    first_error = errors[0][0] if errors else None
    recovered = _first([x.end for x in db if x.start >= o1 and x.outcome == "ok"])
    gave_up = _first([x.start + s.client_timeout for x in v.samples if x.outcome == "timeout"])
    backlog = max((n for t, n in v.queue_sizes if o0 <= t), default=0)
    piling = _first([t for t, n in v.queue_sizes if t >= o0 and n > s.rate / 2])
    opened = _first([t for t, _old, new in v.breaker if new == "open" and t >= o0])
    closed = _first([t for t, _old, new in v.breaker if new == "closed" and t >= o1])
    probes = sum(1 for t, old, new in v.breaker if old == "half-open" and new == "open")
    p99 = percentile([x.latency for x in non_db], 99)
    p99_db = percentile([x.latency for x in db], 99)

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - o0, 3)

    return {
        "name": v.name,
        "engine": v.engine_note,
        "requests": len(v.samples),
        "ok": sum(x.outcome == "ok" for x in v.samples),
        "failed_fast": sum(x.outcome in ("failed", "rejected") for x in v.samples),
        "rejected_by_breaker": sum(x.outcome == "rejected" for x in v.samples),
        "timed_out": sum(x.outcome == "timeout" for x in v.samples),
        "p99_non_db_s": None if p99 is None else round(p99, 3),
        "p99_db_s": None if p99_db is None else round(p99_db, 3),
        "outage_s": round(o1 - o0, 3),
        "detect_s": rel(first_error),
        "recover_s": None if recovered is None else round(recovered - o1, 3),
        "peak_queue": backlog,
        "events": {
            "first_error": rel(first_error),
            "first_error_kind": errors[0][1] if errors else None,
            "clients_give_up": rel(gave_up),
            "queue_piles_up": rel(piling),
            "breaker_open": rel(opened),
            "failed_probes": probes,
            "breaker_closed": rel(closed),
            "recovered": rel(recovered),
        },
    }


_KIND_TEXT = {
    "lock_timeout": "database is locked",
    "circuit_open": "circuit breaker open",
    "pool_exhausted": "pool full: the request is refused at once, no thread waits",
}


def timeline(summary: dict[str, Any], s: Settings) -> list[tuple[float, str]]:
    """Incident-report lines ``(seconds after the outage started, text)``."""
    e = summary["events"]
    lines: list[tuple[float, str]] = [
        (0.0, "outage starts: a maintenance job holds an exclusive lock on the database"),
    ]
    if e["queue_piles_up"] is not None:
        lines.append(
            (
                e["queue_piles_up"],
                f"all workers stuck waiting for the lock: requests pile up (peak queue "
                f"{summary['peak_queue']}), health checks included",
            )
        )
    if e["first_error"] is not None:
        what = _KIND_TEXT.get(e["first_error_kind"], f"[{e['first_error_kind']}]")
        lines.append((e["first_error"], f"first database error: {what}"))
    if e["breaker_open"] is not None:
        lines.append((e["breaker_open"], "breaker open: database requests fail fast"))
    if e["failed_probes"]:
        probes = "probe" if e["failed_probes"] == 1 else "probes"
        lines.append(
            (
                e["breaker_open"] or 0.0,
                f"(the breaker let {e['failed_probes']} {probes} through while the lock was "
                f"held; each failed and re-opened it)",
            )
        )
    if e["clients_give_up"] is not None:
        lines.append(
            (
                e["clients_give_up"],
                f"clients start giving up: no answer within {s.client_timeout:g} s",
            )
        )
    lines.append((summary["outage_s"], "database back: the maintenance job releases the lock"))
    if e["breaker_closed"] is not None:
        lines.append((e["breaker_closed"], "breaker closed after a successful probe"))
    if e["recovered"] is not None:
        lines.append((e["recovered"], "recovered: database requests served normally again"))
    else:
        lines.append((summary["outage_s"], "NOT recovered before the end of the run"))
    lines.sort(key=lambda item: item[0])
    return lines


def _secs(value: float | None, none: str = "never") -> str:
    return none if value is None else f"{value:.2f} s"


def report(summaries: list[dict[str, Any]], s: Settings) -> str:
    """The text printed by ``resilient-db demo``."""
    out = [
        f"resilient-db demo: a web service on SQLite loses its database for {s.outage:g} s",
        f"  {s.workers} worker threads, {s.rate:g} requests/s (half need the database), "
        f"clients give up after {s.client_timeout:g} s",
        "",
    ]
    for summ in summaries:
        out.append(f"{summ['name']}  [{summ['engine']}]")
        for t, text in timeline(summ, s):
            out.append(f"  {t:+6.2f} s  {text}")
        out.append("")
    a, b = summaries[0], summaries[1]
    rows = [
        ("requests", str(a["requests"]), str(b["requests"])),
        ("  served ok", str(a["ok"]), str(b["ok"])),
        ("  failed fast (error page)", str(a["failed_fast"]), str(b["failed_fast"])),
        ("  timed out (client gave up)", str(a["timed_out"]), str(b["timed_out"])),
        ("p99 latency, non-DB requests", _secs(a["p99_non_db_s"]), _secs(b["p99_non_db_s"])),
        ("p99 latency, DB requests", _secs(a["p99_db_s"]), _secs(b["p99_db_s"])),
        ("time to detect (first error)", _secs(a["detect_s"]), _secs(b["detect_s"])),
        ("time to recover (after db back)", _secs(a["recover_s"]), _secs(b["recover_s"])),
        ("peak request queue", str(a["peak_queue"]), str(b["peak_queue"])),
    ]
    out.append(f"{'':34}{'without':>14}{'with resilient_db':>20}")
    out += [f"{label:34}{x:>14}{y:>20}" for label, x, y in rows]
    return "\n".join(out)


def write_plot(variants: list[Variant], path: str) -> None:
    """Throughput and latency of both runs side by side (needs matplotlib)."""
    from .testing._timeline import plot

    panels = []
    for v in variants:
        o0 = v.outage_start
        opens: list[tuple[float, float]] = []
        opened: float | None = None
        for t, _old, new in v.breaker:
            if new == "open" and opened is None:
                opened = t
            elif new == "closed" and opened is not None:
                opens.append((opened - o0, t - o0))
                opened = None
        width = 0.25
        data = series(v.samples, t0=v.t0, t1=v.t_end, width=width)
        shift = v.t0 - o0
        for bucket in data:
            bucket["t"] = round(bucket["t"] + shift, 3)
        panels.append(
            Panel(
                title=v.name,
                series=data,
                width=width,
                faults=[(0.0, v.outage_end - o0, "database locked")],
                breaker_open=opens,
            )
        )
    plot(path, panels, title="resilient-db demo: SQLite outage (t = 0: outage starts)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``resilient-db demo``."""
    parser.add_argument(
        "--quick", action="store_true", help="a 3 s outage instead of 6 s (for CI, < 20 s)"
    )
    parser.add_argument("--plot", metavar="FILE.png", help="write a PNG plot (needs matplotlib)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``resilient-db demo``."""
    settings = Settings.quick() if args.quick else Settings()
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                "resilient-db demo: --plot needs matplotlib: pip install 'resilient-db[plot]'",
                file=sys.stderr,
            )
            return 2
    logger = logging.getLogger("resilient_db")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the timeline tells the story; no warnings in between
    try:
        variants = simulate(settings, progress=lambda text: print(text, file=sys.stderr))
    finally:
        logger.setLevel(level)
    summaries = [summarize(v, settings) for v in variants]
    if args.json:
        print(json.dumps({"settings": settings.__dict__, "variants": summaries}, indent=2))
    else:
        print(report(summaries, settings))
    if args.plot:
        write_plot(variants, args.plot)
        if not args.json:
            print(f"\nplot written to {args.plot}")
    return 0
