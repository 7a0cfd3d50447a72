"""Cascade: does a silent database take the whole service down with it?

A pool of 16 worker threads serves a fixed-rate stream of requests; half run
``SELECT 1`` through a :class:`~resilient_db.testing.FaultProxy`, half are pure
CPU work. Midway the proxy blackholes the database (connections stay open, no
byte comes back), later it lets traffic through again. Three set-ups run in
one go, each with a fresh proxy, engine and worker pool:

- ``raw``: ``sqlalchemy.create_engine(url)`` with its defaults;
- ``timeouts+pybreaker``: what most teams write - connect and pool timeouts,
  ``pool_pre_ping`` and a ``pybreaker`` decorator around the database call;
- ``resilient_db``: ``resilient_db.create_engine(url, policy=POLICY)``.

Reported per set-up: non-DB throughput and p99 latency (from the scheduled
arrival, so queueing counts) before / during / after the outage, DB requests
failed (and hung), time from outage start to breaker open, time from the
database's return to full service, the latency of calls the open breaker
rejected (measured around ``engine.connect()``) and the slowest DB answer.
Workers still stuck when a run ends are abandoned (daemon threads) and
reported as hung; closing the proxy then releases them.

    python -m benchmarks.cascade [--db pg|mariadb|all] [--smoke] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pybreaker
import sqlalchemy as sa

import resilient_db
from resilient_db import (
    BreakerPolicy,
    CircuitOpenError,
    Policy,
    PoolPolicy,
    RetryPolicy,
    Timeouts,
)
from resilient_db.testing.proxy import FaultProxy

from ._util import MARIADB_URL, PG_URL, reachable

WORKERS = 16
SELECT_1 = sa.text("SELECT 1")


def policy_for(db: str) -> Policy:
    """The resilient_db policy under test (PyMySQL's read timeout has 1 s steps)."""
    return Policy(
        timeouts=Timeouts(
            connect=2.0, checkout=0.5, statement=2.0, call=0.5 if db == "pg" else 1.0
        ),
        pool=PoolPolicy(size=4, max_overflow=2, max_waiters=2, ping_after_idle=1.0),
        retry=RetryPolicy(attempts=2, initial=0.05, max_backoff=0.2, deadline=1.0),
        breaker=BreakerPolicy(failure_threshold=3, reset_timeout=2.0),
        validate="off",
    )


def policy_deadline(p: Policy) -> float:
    """The longest a DB request may take under ``p``: checkout wait, idle ping,
    connect attempts (no new one after the retry deadline; the last may take
    its connect timeout) and the call itself."""
    t = p.timeouts
    call = t.call or 0.0
    return t.checkout + call + p.retry.deadline + (t.connect or 0.0) + call


@dataclass
class Phases:
    """Seconds of each phase; ``grace`` is how long stragglers may finish after the run."""

    before: float
    outage: float
    after: float
    grace: float
    rate: float  # requests per second, half of them DB


@dataclass
class Setup:
    """One engine set-up: the DB call a request makes, and breaker bookkeeping."""

    name: str
    engine: sa.Engine
    call: Callable[[], None]
    opened: list[float] = field(default_factory=list)  # monotonic times the breaker opened
    rejections: list[float] = field(default_factory=list)  # seconds per rejected call
    deadline: float | None = None


def _select(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        conn.execute(SELECT_1).scalar()


def raw_setup(url: str, db: str) -> Setup:
    """SQLAlchemy with its defaults."""
    engine = sa.create_engine(url)
    return Setup("raw", engine, lambda: _select(engine))


def teams_setup(url: str, db: str) -> Setup:
    """Connect and pool timeouts, pre-ping, and a pybreaker decorator."""
    engine = sa.create_engine(
        url,
        pool_size=5,
        max_overflow=5,
        pool_timeout=2,
        pool_pre_ping=True,
        connect_args={"connect_timeout": 2},
    )
    setup = Setup("timeouts+pybreaker", engine, lambda: None)

    class Opened(pybreaker.CircuitBreakerListener):
        def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
            if getattr(new_state, "name", None) == pybreaker.STATE_OPEN:
                setup.opened.append(time.monotonic())

    breaker = pybreaker.CircuitBreaker(fail_max=3, reset_timeout=2, listeners=[Opened()])
    guarded = breaker(lambda: _select(engine))

    def call() -> None:
        t0 = time.perf_counter()
        try:
            guarded()
        except pybreaker.CircuitBreakerError:
            setup.rejections.append(time.perf_counter() - t0)
            raise

    setup.call = call
    return setup


def resilient_setup(url: str, db: str) -> Setup:
    """resilient_db.create_engine with the benchmark policy."""
    pol = policy_for(db)
    engine = resilient_db.create_engine(url, name=f"cascade-{db}", policy=pol)
    setup = Setup("resilient_db", engine, lambda: None, deadline=policy_deadline(pol))

    class Opened:
        def state_change(self, cb: Any, old: str, new: str) -> None:
            if new == "open":
                setup.opened.append(time.monotonic())

    resilient_db.breaker_of(engine).listeners.append(Opened())

    breaker = resilient_db.breaker_of(engine)

    def call() -> None:
        was_open = breaker.state != "closed"
        t0 = time.perf_counter()
        try:
            conn = engine.connect()
        except CircuitOpenError:
            if was_open:  # not a caller that queued for a connection before it opened
                setup.rejections.append(time.perf_counter() - t0)
            raise
        with conn:
            conn.execute(SELECT_1).scalar()

    setup.call = call
    return setup


SETUPS: dict[str, Callable[[str, str], Setup]] = {
    "raw": raw_setup,
    "timeouts+pybreaker": teams_setup,
    "resilient_db": resilient_setup,
}


def _cpu_work() -> int:
    return sum(i * i for i in range(6000))  # about 0.3 ms


def run(setup_name: str, db: str, url: str, phases: Phases) -> dict[str, Any]:
    """One set-up through before / outage / after; returns its measurements."""
    u = sa.make_url(url)
    proxy = FaultProxy(u.host or "127.0.0.1", u.port or (5432 if db == "pg" else 3306)).start()
    proxied = u.set(host=proxy.host, port=proxy.port).render_as_string(hide_password=False)
    setup = SETUPS[setup_name](proxied, db)
    warm = [setup.engine.connect() for _ in range(4)]  # a pool warmed by earlier load
    for conn in warm:
        conn.execute(SELECT_1)
    for conn in warm:
        conn.close()

    total = int((phases.before + phases.outage + phases.after) * phases.rate)
    is_db = [i % 2 == 0 for i in range(total)]
    sched = [0.0] * total
    end = [math.nan] * total
    start = [math.nan] * total
    error: list[str | None] = [None] * total
    work: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    stopped = threading.Event()

    def worker() -> None:
        while True:
            i = work.get()
            if i is None:
                return
            if stopped.is_set():  # the run is over: drop what is left
                continue
            start[i] = time.monotonic()
            try:
                if is_db[i]:
                    setup.call()
                else:
                    _cpu_work()
            except Exception as e:
                error[i] = type(e).__name__
            end[i] = time.monotonic()

    threads = [
        threading.Thread(target=worker, name=f"cascade-{i}", daemon=True) for i in range(WORKERS)
    ]
    for t in threads:
        t.start()

    t0 = time.monotonic() + 0.05
    stop_at = t0 + phases.before + phases.outage + phases.after
    switched: dict[str, float] = {}

    def control() -> None:  # not in the scheduler: a slow proxy call must not delay arrivals
        _sleep_until(t0 + phases.before)
        proxy.blackhole()
        switched["outage"] = time.monotonic()  # in effect from here
        _sleep_until(t0 + phases.before + phases.outage)
        proxy.passthrough()
        switched["restore"] = time.monotonic()

    controller = threading.Thread(target=control, name="cascade-control", daemon=True)
    controller.start()
    for i in range(total):
        at = t0 + i / phases.rate
        _sleep_until(at)
        sched[i] = at
        work.put(i)
    _sleep_until(stop_at)
    controller.join()
    outage_at, restore_at = switched["outage"], switched["restore"]
    give_up = stop_at + phases.grace
    while time.monotonic() < give_up and any(math.isnan(x) for x in end):
        time.sleep(0.05)
    stopped.set()
    # results as of now; stragglers count as hung
    end, error, opened_at = list(end), list(error), list(setup.opened)
    rej = list(setup.rejections)
    busy = sum(1 for x in end if math.isnan(x))
    for _ in threads:
        work.put(None)
    burst = _rejection_burst(setup) if setup.name == "resilient_db" else []
    proxy.close()  # releases workers blocked on silent sockets
    closer = threading.Thread(target=setup.engine.dispose, daemon=True)
    closer.start()
    closer.join(2.0)

    windows = {
        "before": (t0, outage_at),
        "during": (outage_at, restore_at),
        "after": (restore_at, stop_at),
    }
    out: dict[str, Any] = {"setup": setup_name, "db": db}
    for phase, (a, b) in windows.items():
        done = [e for i, e in enumerate(end) if not is_db[i] and a <= e < b]
        lat = [
            (end[i] - sched[i]) if not math.isnan(end[i]) else math.inf
            for i in range(total)
            if not is_db[i] and a <= sched[i] < b
        ]
        out[f"cpu_rps_{phase}"] = len(done) / (b - a)
        out[f"cpu_p99_ms_{phase}"] = _pct(lat, 99) * 1e3
        out[f"cpu_p50_ms_{phase}"] = _pct(lat, 50) * 1e3
        out[f"cpu_max_ms_{phase}"] = max(lat, default=math.nan) * 1e3
        waits = [start[i] - sched[i] for i in range(total) if not is_db[i] and a <= sched[i] < b]
        out[f"cpu_wait_p99_ms_{phase}"] = _pct(waits, 99) * 1e3
    db_idx = [i for i in range(total) if is_db[i]]
    hung = [i for i in db_idx if math.isnan(end[i])]
    failed = [i for i in db_idx if error[i] is not None or math.isnan(end[i])]
    kinds: dict[str, int] = {}
    for i in failed:
        k = error[i] or "hung"
        kinds[k] = kinds.get(k, 0) + 1
    out["db_requests"] = len(db_idx)
    out["db_failed"] = len(failed)
    out["db_hung"] = len(hung)
    out["db_failures_by_type"] = kinds
    out["unfinished"] = busy
    lats = [end[i] - sched[i] if not math.isnan(end[i]) else math.inf for i in db_idx]
    out["db_max_s"] = max(lats)
    out["deadline_s"] = setup.deadline
    opened = [t for t in opened_at if t >= outage_at]
    out["open_after_s"] = (opened[0] - outage_at) if opened else None
    out["full_service_s"] = _full_service(db_idx, sched, end, error, restore_at)
    out["rejections"] = len(rej)
    out["rejection_p50_us"] = _pct(rej, 50) * 1e6 if rej else None
    out["rejection_p99_us"] = _pct(rej, 99) * 1e6 if rej else None
    out["burst_rejection_p50_us"] = _pct(burst, 50) * 1e6 if burst else None
    out["burst_rejection_p99_us"] = _pct(burst, 99) * 1e6 if burst else None
    out["reset_timeout_s"] = 2.0 if setup_name != "raw" else None
    return out


def _rejection_burst(setup: Setup, threads: int = 1, calls: int = 5000) -> list[float]:
    """Seconds per engine.connect() rejected by an open breaker, back to back.

    The stream rejects one call every ~10 ms, each on cold CPU caches and
    competing for the GIL with 16 workers; this measures the code path itself,
    hot, as in a busy service.
    """
    b = resilient_db.breaker_of(setup.engine)
    for _ in range(b.policy.failure_threshold):
        b.record_failure("benchmark: breaker tripped for the rejection burst")
    samples: list[float] = []

    def burst() -> None:
        mine = []
        for _ in range(calls):
            t0 = time.perf_counter()
            try:
                setup.engine.connect().close()
            except CircuitOpenError:
                mine.append(time.perf_counter() - t0)
        samples.extend(mine[calls // 10 :])  # skip the warm-up

    ts = [threading.Thread(target=burst) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    b.reset()
    return samples


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _pct(xs: Sequence[float], p: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def _full_service(
    db_idx: list[int], sched: list[float], end: list[float], error: list[str | None], back: float
) -> float | None:
    """Seconds from the database's return until DB requests stopped failing for good."""
    bad_after = [
        i for i in db_idx if (math.isnan(end[i]) or end[i] >= back) and error[i] is not None
    ]
    bad_after += [i for i in db_idx if math.isnan(end[i])]
    last_bad = max((sched[i] for i in bad_after), default=-math.inf)
    for i in db_idx:
        if sched[i] > last_bad and error[i] is None and not math.isnan(end[i]) and end[i] >= back:
            return max(0.0, end[i] - back)
    return None


def targets(r: dict[str, Any]) -> list[tuple[str, bool]]:
    """The resilient_db targets and whether this run met them."""
    before, during = r["cpu_rps_before"], r["cpu_rps_during"]
    p99_before, p99_during = r["cpu_p99_ms_before"], r["cpu_p99_ms_during"]
    rej = r["burst_rejection_p99_us"]
    full = r["full_service_s"]
    return [
        ("non-DB throughput during outage >= 95% of before", during >= 0.95 * before),
        ("non-DB p99 during outage <= 2x before", p99_during <= 2 * p99_before),
        ("every DB request answered within the policy deadline", r["db_max_s"] <= r["deadline_s"]),
        ("open-breaker rejection p99 < 50 us (hot path, burst)", rej is not None and rej < 50),
        (
            "full service within reset_timeout + 0.5 s of the DB's return",
            full is not None and full <= r["reset_timeout_s"] + 0.5,
        ),
    ]


def _fmt(x: float | None, spec: str = ".2f", unit: str = "") -> str:
    if x is None:
        return "never"
    if math.isinf(x):
        return "hung"
    if math.isnan(x):
        return "-"
    return f"{x:{spec}}{unit}"


def _us(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 1e3:
        return f"{x:.0f} µs"
    return f"{x / 1e3:.1f} ms" if x < 1e6 else f"{x / 1e6:.1f} s"


def render(results: list[dict[str, Any]]) -> str:
    """A Markdown table of the results (one row per database and set-up)."""
    headers = [
        "db",
        "set-up",
        "non-DB req/s before / during / after",
        "non-DB p99 ms before / during / after",
        "DB failed (hung)",
        "outage → open",
        "return → full service",
        "rejection p99 stream / burst",
        "slowest DB answer",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in results:
        rps = " / ".join(f"{r[f'cpu_rps_{p}']:.0f}" for p in ("before", "during", "after"))
        p99 = " / ".join(_fmt(r[f"cpu_p99_ms_{p}"], ".1f") for p in ("before", "during", "after"))
        opened = "no breaker" if r["setup"] == "raw" else _fmt(r["open_after_s"], ".2f", " s")
        rej = _us(r["rejection_p99_us"]) if r["rejections"] else "-"
        if r.get("burst_rejection_p99_us") is not None:
            rej += " / " + _us(r["burst_rejection_p99_us"])
        cells = [
            r["db"],
            r["setup"],
            rps,
            p99,
            f"{r['db_failed']}/{r['db_requests']} ({r['db_hung']})",
            opened,
            _fmt(r["full_service_s"], ".2f", " s"),
            rej,
            _fmt(r["db_max_s"], ".2f", " s"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


DOC = Path(__file__).resolve().parent.parent / "docs" / "resilience.md"
BEGIN, END = "<!-- cascade:begin -->", "<!-- cascade:end -->"


def write_doc(text: str, path: Path = DOC) -> None:
    """Replace the generated block of docs/resilience.md with ``text``."""
    doc = path.read_text()
    a, b = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    path.write_text(doc[:a] + "\n" + text + "\n" + doc[b:])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cascade benchmark; 1 with --strict if a resilient_db target was missed."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cascade", description=__doc__)
    ap.add_argument("--db", default="all", choices=["pg", "mariadb", "all"])
    ap.add_argument("--smoke", action="store_true", help="short phases, for CI (< 60 s)")
    ap.add_argument("--setups", default=",".join(SETUPS), help="comma-separated set-ups")
    ap.add_argument("--json", action="store_true", help="print JSON results")
    ap.add_argument("--write-docs", action="store_true", help="update docs/resilience.md")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    # the library logs every failed connect; keep the benchmark's output to the table
    logging.getLogger("resilient_db").addHandler(logging.NullHandler())
    logging.getLogger("resilient_db").propagate = False
    if args.smoke:
        phases = Phases(before=1.5, outage=2.5, after=3.0, grace=0.3, rate=120)
    else:
        phases = Phases(before=5.0, outage=8.0, after=6.0, grace=1.0, rate=200)
    dbs = ["pg", "mariadb"] if args.db == "all" else [args.db]
    urls = {"pg": PG_URL, "mariadb": MARIADB_URL}
    results: list[dict[str, Any]] = []
    for db in dbs:
        u = sa.make_url(urls[db])
        if not reachable(u.host or "127.0.0.1", u.port or (5432 if db == "pg" else 3306)):
            print(f"cascade: {db} not reachable, skipped", file=sys.stderr)
            continue
        for name in args.setups.split(","):
            if name not in SETUPS:
                ap.error(f"unknown set-up {name!r}")
            results.append(run(name, db, urls[db], phases))
            time.sleep(0.3)
    missed = 0
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        p = dataclasses.asdict(phases)
        print(
            f"Cascade: {WORKERS} workers, {p['rate']:.0f} req/s (half DB), "
            f"{p['before']:g} s before, {p['outage']:g} s blackhole, {p['after']:g} s after"
        )
        print(render(results))
    for r in results:
        if r["setup"] != "resilient_db":
            continue
        for what, ok in targets(r):
            missed += not ok
            print(f"  [{r['db']}] {'ok  ' if ok else 'MISS'} {what}")
    if args.write_docs:
        write_doc(render(results))
    return 1 if (args.strict and missed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
