"""Cascade: does a sick database take the whole service down with it?

A pool of 16 worker threads serves a fixed-rate stream of requests; half run
``SELECT 1`` through a :class:`~resilient_db.testing.FaultProxy`, half are pure
CPU work. Midway the database falls sick for a while, then recovers. Three
scenarios (``--scenarios``):

- ``blackhole``: the proxy blackholes the database (connections stay open, no
  byte comes back): a partition, a cloud failover;
- ``brownout``: every reply is late: ``FaultProxy.latency(0.5)`` delays each
  chunk by 0.5 s in each direction, so each round trip takes about 1 s;
- ``refusing``: the server is down: ``refuse()`` (new connects get
  ECONNREFUSED) and ``reset_all()`` (the open connections are reset).

Four set-ups run in each by default, each with a fresh proxy, engine and worker pool:

- ``raw``: ``sqlalchemy.create_engine(url)`` with its defaults;
- ``timeouts+pybreaker``: what most teams write - connect and pool timeouts,
  ``pool_pre_ping`` and a ``pybreaker`` decorator around the database call;
- ``resilient_db``: ``resilient_db.create_engine(url, validate="off")``, the
  **default policy** (``validate="off"`` keeps the startup check out of the run);
- ``tuned``: ``resilient_db.create_engine(url, policy=tuned_policy(db))``.

Two more run when named in ``--setups``, to compare ways of shedding load:

- ``small-bulkhead``: the default policy with ``PoolPolicy(size=2,
  max_overflow=0, max_waiters=0)``, a fixed small bulkhead;
- ``adaptive``: the default policy with ``PoolPolicy(adaptive=True)``, the
  adaptive concurrency limit.

Reported per scenario and set-up: non-DB throughput and p99 latency (from the
scheduled arrival, so queueing counts) before / during / after the outage, DB
requests failed (and hung) and served, time from outage start to breaker open,
time from the database's return to full service, the latency of calls the
open breaker rejected (measured around ``engine.connect()``) and the slowest
DB answer; then the acceptance targets of issue 13 as ok / MISS lines. Workers
still stuck when a run ends are abandoned (daemon threads) and reported as
hung; closing the proxy then releases them.

    python -m benchmarks.cascade [--db pg|mariadb|all] [--scenarios ...] [--setups ...]
                                 [--smoke] [--json] [--repeat N]
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

from ._cascade_report import print_targets, render, render_medians, write_doc
from ._util import MARIADB_URL, PG_URL, reachable

WORKERS = 16
SELECT_1 = sa.text("SELECT 1")


def tuned_policy(db: str) -> Policy:
    """The tuned resilient_db policy of the ``tuned`` row (PyMySQL's read timeout has 1 s steps)."""
    return Policy(
        timeouts=Timeouts(
            connect=2.0, checkout=0.5, statement=2.0, call=0.5 if db == "pg" else 1.0
        ),
        pool=PoolPolicy(size=4, max_overflow=2, max_waiters=2, ping_after_idle=1.0),
        retry=RetryPolicy(attempts=2, initial=0.05, max_backoff=0.2, deadline=1.0),
        breaker=BreakerPolicy(failure_threshold=3, reset_timeout=2.0),
        validate="off",
    )


@dataclass
class Phases:
    """Seconds of each phase; ``grace`` is how long stragglers may finish after the run."""

    before: float
    outage: float
    after: float
    grace: float
    rate: float  # requests per second, half of them DB


@dataclass(frozen=True)
class Scenario:
    """How the database falls sick (``start``) and recovers (``stop``), on the proxy."""

    name: str
    start: Callable[[FaultProxy], object]
    stop: Callable[[FaultProxy], object]
    what: str


def _refuse(proxy: FaultProxy) -> None:
    proxy.refuse()  # new connects: ECONNREFUSED
    proxy.reset_all()  # the server's sessions die with it


#: brownout: 0.5 s per chunk in each direction, about 1 s per round trip
BROWNOUT_DELAY = 0.5

SCENARIOS: dict[str, Scenario] = {
    "blackhole": Scenario(
        "blackhole", FaultProxy.blackhole, FaultProxy.passthrough, "silent (blackhole)"
    ),
    "brownout": Scenario(
        "brownout",
        lambda p: p.latency(BROWNOUT_DELAY),
        lambda p: p.latency(0),
        f"every reply late (latency({BROWNOUT_DELAY:g}) per chunk and direction, ~1 s/round trip)",
    ),
    "refusing": Scenario(
        "refusing", _refuse, FaultProxy.passthrough, "down (refuse() + reset_all())"
    ),
}


@dataclass
class Setup:
    """One engine set-up: the DB call a request makes, and breaker bookkeeping."""

    name: str
    engine: sa.Engine
    call: Callable[[], None]
    transitions: list[tuple[float, str, str]] = field(default_factory=list)  # monotonic
    rejections: list[float] = field(default_factory=list)  # seconds per rejected call
    reset_timeout: float | None = None
    resilient: bool = False
    warm: int = 4  # connections opened before the run (at most the pool's capacity)


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
    setup = Setup("timeouts+pybreaker", engine, lambda: None, reset_timeout=2.0)

    class Opened(pybreaker.CircuitBreakerListener):
        def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
            new = getattr(new_state, "name", "?")
            setup.transitions.append((time.monotonic(), getattr(old_state, "name", "?"), new))

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


def _resilient(name: str, engine: sa.Engine, warm: int = 4) -> Setup:
    breaker = resilient_db.breaker_of(engine)
    setup = Setup(
        name,
        engine,
        lambda: None,
        reset_timeout=breaker.policy.reset_timeout,
        resilient=True,
        warm=warm,
    )

    class Transitions:
        def state_change(self, cb: Any, old: str, new: str) -> None:
            setup.transitions.append((time.monotonic(), str(old), str(new)))

    breaker.listeners.append(Transitions())

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


def default_setup(url: str, db: str) -> Setup:
    """resilient_db.create_engine with the default policy (startup check off)."""
    return _resilient("resilient_db", resilient_db.create_engine(url, validate="off"))


def tuned_setup(url: str, db: str) -> Setup:
    """resilient_db.create_engine with the tuned policy."""
    engine = resilient_db.create_engine(url, name=f"cascade-{db}", policy=tuned_policy(db))
    return _resilient("tuned", engine)


def small_bulkhead_setup(url: str, db: str) -> Setup:
    """The default policy with a fixed small bulkhead: 2 connections, nobody waits."""
    pool = PoolPolicy(size=2, max_overflow=0, max_waiters=0)
    engine = resilient_db.create_engine(url, policy=Policy(pool=pool, validate="off"))
    return _resilient("small-bulkhead", engine, warm=2)


def adaptive_setup(url: str, db: str) -> Setup:
    """The default policy with the adaptive concurrency limit on."""
    pool = PoolPolicy(adaptive=True)
    engine = resilient_db.create_engine(url, policy=Policy(pool=pool, validate="off"))
    return _resilient("adaptive", engine)


SETUPS: dict[str, Callable[[str, str], Setup]] = {
    "raw": raw_setup,
    "timeouts+pybreaker": teams_setup,
    "resilient_db": default_setup,
    "tuned": tuned_setup,
    "small-bulkhead": small_bulkhead_setup,
    "adaptive": adaptive_setup,
}
#: run when --setups is not given (the last two: the adaptive limit against a small bulkhead)
DEFAULT_SETUPS = ("raw", "timeouts+pybreaker", "resilient_db", "tuned")


def _cpu_work() -> int:
    return sum(i * i for i in range(6000))  # about 0.3 ms


@dataclass
class Trace:
    """Per request: arrival, start, end (monotonic) and the error's type name."""

    is_db: list[bool]
    sched: list[float]
    start: list[float]
    end: list[float]
    error: list[str | None]


def run(setup_name: str, db: str, url: str, phases: Phases, scenario: str) -> dict[str, Any]:
    """One set-up through before / outage / after; returns its measurements."""
    u = sa.make_url(url)
    proxy = FaultProxy(u.host or "127.0.0.1", u.port or (5432 if db == "pg" else 3306)).start()
    proxied = u.set(host=proxy.host, port=proxy.port).render_as_string(hide_password=False)
    setup = SETUPS[setup_name](proxied, db)
    warm = [setup.engine.connect() for _ in range(setup.warm)]  # warmed by earlier load
    for conn in warm:
        conn.execute(SELECT_1)
    for conn in warm:
        conn.close()
    tr, switched, stop_at, unfinished = _drive(setup, proxy, phases, SCENARIOS[scenario])
    burst = _rejection_burst(setup) if setup.resilient else []
    proxy.close()  # releases workers blocked on silent sockets
    closer = threading.Thread(target=setup.engine.dispose, daemon=True)
    closer.start()
    closer.join(2.0)
    out = _measure(setup, tr, switched["outage"], switched["restore"], stop_at)
    out.update(setup=setup_name, db=db, scenario=scenario, unfinished=unfinished)
    out["burst_rejection_p50_us"] = _pct(burst, 50) * 1e6 if burst else None
    out["burst_rejection_p99_us"] = _pct(burst, 99) * 1e6 if burst else None
    return out


def _drive(
    setup: Setup, proxy: FaultProxy, phases: Phases, sc: Scenario
) -> tuple[Trace, dict[str, float], float, int]:
    """Serve the request stream while the scenario plays out on the proxy."""
    total = int((phases.before + phases.outage + phases.after) * phases.rate)
    nan = math.nan
    tr = Trace([i % 2 == 0 for i in range(total)], [0.0] * total, [nan] * total, [nan] * total,
               [None] * total)  # fmt: skip
    work: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    stopped = threading.Event()

    def worker() -> None:
        while (i := work.get()) is not None:
            if stopped.is_set():  # the run is over: drop what is left
                continue
            tr.start[i] = time.monotonic()
            try:
                setup.call() if tr.is_db[i] else _cpu_work()
            except Exception as e:
                tr.error[i] = type(e).__name__
            tr.end[i] = time.monotonic()

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
        sc.start(proxy)
        switched["outage"] = time.monotonic()  # in effect from here
        _sleep_until(t0 + phases.before + phases.outage)
        sc.stop(proxy)
        switched["restore"] = time.monotonic()

    controller = threading.Thread(target=control, name="cascade-control", daemon=True)
    controller.start()
    for i in range(total):
        at = t0 + i / phases.rate
        _sleep_until(at)
        tr.sched[i] = at
        work.put(i)
    _sleep_until(stop_at)
    controller.join()
    give_up = stop_at + phases.grace
    while time.monotonic() < give_up and any(math.isnan(x) for x in tr.end):
        time.sleep(0.05)
    stopped.set()
    # results as of now; stragglers count as hung
    tr = Trace(tr.is_db, tr.sched, list(tr.start), list(tr.end), list(tr.error))
    unfinished = sum(1 for x in tr.end if math.isnan(x))
    for _ in threads:
        work.put(None)
    return tr, switched, stop_at, unfinished


def _measure(
    setup: Setup, tr: Trace, outage_at: float, restore_at: float, stop_at: float
) -> dict[str, Any]:
    t0 = min(tr.sched)
    windows = {
        "before": (t0, outage_at),
        "during": (outage_at, restore_at),
        "after": (restore_at, stop_at),
    }
    total = len(tr.sched)
    out: dict[str, Any] = {}
    for phase, (a, b) in windows.items():
        done = [e for i, e in enumerate(tr.end) if not tr.is_db[i] and a <= e < b]
        lat = [
            (tr.end[i] - tr.sched[i]) if not math.isnan(tr.end[i]) else math.inf
            for i in range(total)
            if not tr.is_db[i] and a <= tr.sched[i] < b
        ]
        out[f"cpu_rps_{phase}"] = len(done) / (b - a)
        out[f"cpu_p99_ms_{phase}"] = _pct(lat, 99) * 1e3
        out[f"cpu_p50_ms_{phase}"] = _pct(lat, 50) * 1e3
        out[f"cpu_max_ms_{phase}"] = max(lat, default=math.nan) * 1e3
    db_idx = [i for i in range(total) if tr.is_db[i]]
    hung = [i for i in db_idx if math.isnan(tr.end[i])]
    failed = [i for i in db_idx if tr.error[i] is not None or math.isnan(tr.end[i])]
    kinds: dict[str, int] = {}
    for i in failed:
        k = tr.error[i] or "hung"
        kinds[k] = kinds.get(k, 0) + 1
    lat = {i: tr.end[i] - tr.sched[i] if not math.isnan(tr.end[i]) else math.inf for i in db_idx}
    during = [i for i in db_idx if outage_at <= tr.sched[i] < restore_at]
    late = [i for i in during if tr.sched[i] >= outage_at + 1.0]
    out.update(
        db_requests=len(db_idx),
        db_failed=len(failed),
        db_hung=len(hung),
        db_failures_by_type=kinds,
        db_ok_during=sum(1 for i in during if tr.error[i] is None and lat[i] < math.inf),
        db_during=len(during),
        fast_fail_share=(
            sum(1 for i in late if tr.error[i] is not None and lat[i] < 0.005) / len(late)
            if late
            else math.nan
        ),
        db_max_s=max(lat.values()),
        reset_timeout_s=setup.reset_timeout,
        resilient=setup.resilient,
    )
    opened = [t for t, _, new in setup.transitions if new == "open" and outage_at <= t < stop_at]
    out["open_after_s"] = (opened[0] - outage_at) if opened else None
    out["transitions"] = [
        (round(t - outage_at, 3), a, b) for t, a, b in setup.transitions if t < stop_at
    ]
    out["restore_after_s"] = restore_at - outage_at
    out["full_service_s"] = _full_service(db_idx, tr, restore_at)
    rej = list(setup.rejections)
    out["rejections"] = len(rej)
    out["rejection_p50_us"] = _pct(rej, 50) * 1e6 if rej else None
    out["rejection_p99_us"] = _pct(rej, 99) * 1e6 if rej else None
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


def _full_service(db_idx: list[int], tr: Trace, back: float) -> float | None:
    """Seconds from the database's return until DB requests stopped failing for good."""
    end, error, sched = tr.end, tr.error, tr.sched
    bad_after = [
        i for i in db_idx if (math.isnan(end[i]) or end[i] >= back) and error[i] is not None
    ]
    bad_after += [i for i in db_idx if math.isnan(end[i])]
    last_bad = max((sched[i] for i in bad_after), default=-math.inf)
    for i in db_idx:
        if sched[i] > last_bad and error[i] is None and not math.isnan(end[i]) and end[i] >= back:
            return max(0.0, end[i] - back)
    return None


def _phases(smoke: bool) -> Phases:
    if smoke:  # the outage outlasts a probe's verdict (about 2.8 s); "after" leaves room
        # for the default reset_timeout (5 s) + 0.5 s
        return Phases(before=1.5, outage=3.5, after=6.0, grace=0.3, rate=120)
    return Phases(before=5.0, outage=8.0, after=6.0, grace=1.0, rate=200)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cascade benchmark; 1 with --strict if a resilient_db target was missed."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cascade", description=__doc__)
    ap.add_argument("--db", default=None, choices=["pg", "mariadb", "all"])
    ap.add_argument("--smoke", action="store_true", help="short phases, fewer runs, for CI")
    ap.add_argument("--setups", default=None, help="comma-separated set-ups")
    ap.add_argument("--scenarios", default=None, help="comma-separated scenarios")
    ap.add_argument("--repeat", type=int, default=1, help="rounds (set-ups interleaved)")
    ap.add_argument("--json", action="store_true", help="print JSON results")
    ap.add_argument("--write-docs", action="store_true", help="update docs/resilience.md")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    # smoke (CI): the default policy in every scenario on PostgreSQL, about a minute
    db_arg = args.db or ("pg" if args.smoke else "all")
    default_setups = "resilient_db" if args.smoke else ",".join(DEFAULT_SETUPS)
    setups = (args.setups or default_setups).split(",")
    scenarios = (args.scenarios or ",".join(SCENARIOS)).split(",")
    for name in setups:
        if name not in SETUPS:
            ap.error(f"unknown set-up {name!r}")
    for name in scenarios:
        if name not in SCENARIOS:
            ap.error(f"unknown scenario {name!r}")
    # the library logs every failed connect; keep the benchmark's output to the table
    logging.getLogger("resilient_db").addHandler(logging.NullHandler())
    logging.getLogger("resilient_db").propagate = False
    phases = _phases(args.smoke)
    dbs = ["pg", "mariadb"] if db_arg == "all" else [db_arg]
    urls = {"pg": PG_URL, "mariadb": MARIADB_URL}
    results: list[dict[str, Any]] = []
    for rnd in range(args.repeat):
        for db in dbs:
            u = sa.make_url(urls[db])
            if not reachable(u.host or "127.0.0.1", u.port or (5432 if db == "pg" else 3306)):
                print(f"cascade: {db} not reachable, skipped", file=sys.stderr)
                continue
            for sc in scenarios:
                order = setups if rnd % 2 == 0 else list(reversed(setups))
                for name in order:
                    results.append(run(name, db, urls[db], phases, sc) | {"round": rnd})
                    time.sleep(0.3)
    p = dataclasses.asdict(phases)
    if args.json:
        print(json.dumps({"phases": p, "results": results}, indent=2, default=str))
    else:
        print(
            f"Cascade: {WORKERS} workers, {p['rate']:.0f} req/s (half DB), "
            f"{p['before']:g} s before, {p['outage']:g} s outage, {p['after']:g} s after"
        )
        for sc in scenarios:
            print(f"\n{sc}: the database is {SCENARIOS[sc].what}")
            print(render([r for r in results if r["scenario"] == sc]))
    if args.repeat > 1 and not args.json:
        print(f"\nMedians over {args.repeat} rounds")
        print(render_medians(results))
    missed = print_targets(results)
    if args.write_docs:
        write_doc(render_medians(results))
    return 1 if (args.strict and missed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
