"""Every FaultProxy fault against real PostgreSQL and MariaDB through a resilient engine.

One table row per fault: the proxy injects it between a ``resilient_db.create_engine``
engine (short timeouts, two attempts, a breaker that opens after two failures) and the
shared server, and the row says what the caller must see: the error class, its
:class:`~resilient_db.ErrorContext` (kind, retry level, phase, attempt, history, code),
the breaker's failure count and state, and facts about retries and recovery.

The engine runs on a manual clock, so the breaker's reset timeout passes without
sleeping and no pooled connection is ever pinged for being idle. Real time passes only
where a fault injects it: the connect and call deadlines (2 s), latency and bandwidth.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

import resilient_db
from resilient_db import (
    AmbiguousCommitError,
    BreakerPolicy,
    BreakerSnapshot,
    Policy,
    RetryPolicy,
    Timeouts,
)
from resilient_db.engine import resilience_of
from resilient_db.testing import Fault, FaultProxy, ManualClock

RESET_TIMEOUT = 5.0
POLICY = Policy(
    timeouts=Timeouts(connect=2, call=2, checkout=1),
    retry=RetryPolicy(attempts=2),
    # no silence probes: their own connections would race the counts in the table
    # (tests/test_reachability.py covers them)
    breaker=BreakerPolicy(failure_threshold=2, reset_timeout=RESET_TIMEOUT, probe_after=None),
)
LATENCY_S = 0.1
JITTER_BASE_S, JITTER_S, JITTER_SAMPLES = 0.05, 0.1, 8
BANDWIDTH_BPS = 100_000
BIG_ROW = 20_000  # characters in the one-row result bandwidth and reset_after act on
BIG_SQL = f"SELECT REPEAT('x', {BIG_ROW})"  # the same text on PostgreSQL and MariaDB
RESET_AFTER_BYTES = 1000


def raised(fn: Callable[[], object]) -> BaseException:
    """Run ``fn`` and return what it raised (an AssertionError if nothing)."""
    try:
        fn()
    except Exception as e:
        return e
    raise AssertionError("the fault was injected but nothing was raised")


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Poll ``predicate`` (state changed inside the proxy's own thread) until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn`` took (monotonic)."""
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


@dataclass
class Rig:
    """A FaultProxy in front of the shared server and a resilient engine through it."""

    backend: str
    proxy: FaultProxy
    engine: sa.Engine
    direct: sa.Engine
    clock: ManualClock
    cleanups: list[Callable[[], object]] = field(default_factory=list)

    def select(self, sql: str = "SELECT 1") -> Any:
        """Check out a connection and run one query; its single value."""
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql)).scalar_one()

    def warm(self) -> None:
        """Open the engine's pooled connection before the fault (it idles in the pool)."""
        assert 1 == self.select()

    def breaker(self) -> BreakerSnapshot:
        """The engine's breaker now."""
        return resilient_db.breaker_of(self.engine).snapshot()

    def table(self) -> str:
        """A scratch table ``(id integer primary key)``, dropped at teardown."""
        name = f"proxy_rdb_{uuid.uuid4().hex[:16]}"
        with self.direct.begin() as conn:
            conn.execute(sa.text(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY)"))
        self.cleanups.append(lambda: self._drop(name))
        return name

    def _drop(self, name: str) -> None:
        with self.direct.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))

    def ids(self, table: str) -> list[int]:
        """The ids committed in ``table``, read past the proxy."""
        with self.direct.connect() as conn:
            return [int(i) for i in conn.scalars(sa.text(f"SELECT id FROM {table} ORDER BY id"))]


@pytest.fixture
def rig(server_url: str) -> Iterator[Rig]:
    """The proxy, the resilient engine behind it and a direct engine; all closed after."""
    url = sa.make_url(server_url)
    backend = "postgresql" if url.get_backend_name() == "postgresql" else "mariadb"
    upstream = (url.host or "127.0.0.1", url.port or (5432 if backend == "postgresql" else 3306))
    clock = ManualClock()
    direct = sa.create_engine(url, poolclass=NullPool)
    with FaultProxy(*upstream) as proxy:
        engine = resilient_db.create_engine(
            url.set(host=proxy.host, port=proxy.port), validate="off", policy=POLICY, clock=clock
        )
        r = Rig(backend, proxy, engine, direct, clock)
        try:
            yield r
        finally:
            engine.dispose()
            for cleanup in reversed(r.cleanups):
                cleanup()
            direct.dispose()
    assert () == proxy.errors


@dataclass(frozen=True)
class Outcome:
    """What the caller saw: the error and its context, the breaker, and scenario facts."""

    error: str | None
    kind: str | None = None
    retry: str | None = None
    phase: str | None = None
    attempt: int | None = None
    history: tuple[str, ...] | None = None
    code: str | None = None
    failures: int = 0
    state: str = "closed"
    facts: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Seen:
    """A scenario's result: the error (None: the call succeeded), the breaker then, facts."""

    exc: BaseException | None
    breaker: BreakerSnapshot
    facts: dict[str, object]

    def outcome(self) -> Outcome:
        """The outcome to compare with a case's expectation."""
        failures, state = self.breaker.failures, self.breaker.state
        if self.exc is None:
            return Outcome(error=None, failures=failures, state=state, facts=self.facts)
        ctx = resilient_db.error_context(self.exc)
        assert ctx is not None, f"no ErrorContext on {self.exc!r}"
        return Outcome(
            error=type(self.exc).__name__,
            kind=ctx.kind,
            retry=ctx.retry,
            phase=ctx.phase,
            attempt=ctx.attempt,
            # the code is compared on its own: strip it from the history entries
            history=tuple(h.split(":")[0] for h in ctx.history),
            code=ctx.code,
            failures=failures,
            state=state,
            facts=self.facts,
        )


# ----------------------------------------------------------------------------- scenarios


def inject_refuse(rig: Rig) -> Seen:
    """Connects refused: retried once, breaker opens; then fail fast; a probe closes it."""
    rig.proxy.refuse()
    exc = raised(rig.select)
    seen = rig.breaker()
    attempts = resilience_of(rig.engine).connect_attempts
    rejected = raised(rig.select)  # no connect attempt while open
    while_open = resilience_of(rig.engine).connect_attempts - attempts
    rejected_ctx = resilient_db.error_context(rejected)
    assert rejected_ctx is not None
    rig.proxy.passthrough()
    rig.clock.advance(RESET_TIMEOUT)
    probe = rig.select()  # half-open: the probe goes through the healed proxy
    return Seen(
        exc,
        seen,
        {
            "connect_attempts": attempts,
            "then": (type(rejected).__name__, rejected_ctx.kind, rejected_ctx.phase),
            "attempts_while_open": while_open,
            "probe": probe,
            "after_probe": rig.breaker().state,
        },
    )


def inject_blackhole_connect(rig: Rig) -> Seen:
    """Accepts but never answers: an attempt waits out the connect timeout, no retry fits."""
    rig.proxy.blackhole()
    exc = raised(rig.select)
    seen = rig.breaker()
    opened = rig.proxy.connections_total
    rejected = raised(rig.select)
    return Seen(
        exc,
        seen,
        {
            "connections": opened,
            "then": type(rejected).__name__,
            "connections_while_open": rig.proxy.connections_total - opened,
        },
    )


def inject_blackhole_mid_query(rig: Rig) -> Seen:
    """The network goes silent mid-query on a pooled connection: the call deadline ends it."""
    rig.warm()
    sleep = "SELECT pg_sleep(1)" if rig.backend == "postgresql" else "SELECT SLEEP(1)"
    rig.proxy.schedule([(0.3, Fault.BLACKHOLE)])  # while the server sleeps; reply dropped
    exc = raised(lambda: rig.select(sleep))
    seen = rig.breaker()
    assert rig.proxy.mode is Fault.BLACKHOLE
    rig.proxy.passthrough()
    return Seen(
        exc,
        seen,
        {"recovered": rig.select(), "connections": rig.proxy.connections_total},
    )


def inject_latency(rig: Rig) -> Seen:
    """Every chunk delayed: a round trip takes at least two delays, and still succeeds."""
    rig.warm()
    rig.proxy.latency(LATENCY_S)
    elapsed = timed(rig.select)
    assert elapsed >= 2 * LATENCY_S
    return Seen(None, rig.breaker(), {})


def inject_jitter(rig: Rig) -> Seen:
    """latency(base, jitter): every round trip >= 2 * base, and the delays differ."""
    rig.warm()
    delays = []
    with rig.engine.connect() as conn:
        # one round trip per call: no BEGIN (psycopg sends it apart) and a new statement
        # each time (psycopg prepares one run five times, in an extra round trip)
        conn.execution_options(isolation_level="AUTOCOMMIT")
        rig.proxy.latency(JITTER_BASE_S, jitter=JITTER_S)
        for i in range(JITTER_SAMPLES):
            t0 = time.monotonic()
            assert i == conn.execute(sa.text(f"SELECT {i}")).scalar_one()
            delays.append(time.monotonic() - t0)
    assert min(delays) >= 2 * JITTER_BASE_S, delays
    # two uniform [0, 0.1] extras per round trip: 8 of them all within 10 ms of each other
    # has odds below 1e-6; without jitter they are within about a millisecond
    assert max(delays) - min(delays) >= 0.01, delays
    return Seen(None, rig.breaker(), {})


def inject_bandwidth(rig: Rig) -> Seen:
    """A bandwidth cap: a 20 kB row takes at least its size / rate, and still succeeds."""
    rig.warm()
    rig.proxy.bandwidth(BANDWIDTH_BPS)
    down = rig.proxy.bytes_down
    value: list[str] = []
    elapsed = timed(lambda: value.append(rig.select(BIG_SQL)))
    moved = rig.proxy.bytes_down - down
    assert moved >= BIG_ROW
    assert elapsed >= moved / BANDWIDTH_BPS
    return Seen(None, rig.breaker(), {"length": len(value[0])})


def inject_reset_all(rig: Rig) -> Seen:
    """RST of an idle pooled connection: the unit of work is re-run on a fresh one."""
    rig.warm()
    assert 1 == rig.proxy.reset_all()
    failures: list[BaseException] = []

    def unit(conn: sa.Connection) -> Any:
        try:
            return conn.execute(sa.text("SELECT 1")).scalar_one()
        except Exception as e:
            failures.append(e)  # the error the first attempt saw, with its context
            raise

    result = resilient_db.run_transaction(rig.engine, unit)
    return Seen(
        failures[0],
        rig.breaker(),
        {
            "result": result,
            "fn_calls": len(failures) + 1,
            "connections": rig.proxy.connections_total,
        },
    )


def inject_reset_after(rig: Rig) -> Seen:
    """reset_after(n): the connection is reset mid-result, after exactly n bytes."""
    rig.warm()
    rig.proxy.reset_after(RESET_AFTER_BYTES)
    down = rig.proxy.bytes_down
    exc = raised(lambda: rig.select(BIG_SQL))
    seen = rig.breaker()
    moved = rig.proxy.bytes_down - down
    rig.proxy.passthrough()
    return Seen(exc, seen, {"bytes_down": moved, "recovered": rig.select()})


def _commit_fault(rig: Rig, arm: Callable[[], None]) -> Seen:
    """A unit of work inserts a row and arms a commit fault; the runner commits it."""
    table = rig.table()
    calls: list[int] = []

    def unit(conn: sa.Connection) -> None:
        calls.append(1)
        conn.execute(sa.text(f"INSERT INTO {table} (id) VALUES (:id)"), {"id": len(calls)})
        arm()

    exc = raised(lambda: resilient_db.run_transaction(rig.engine, unit))
    assert isinstance(exc, AmbiguousCommitError)
    assert isinstance(exc, sa.exc.OperationalError)  # existing handlers keep working
    return Seen(
        exc,
        rig.breaker(),
        {
            "fn_calls": len(calls),
            "committed": rig.ids(table) == [1],
            "commits_seen": rig.proxy.commits_seen,
            "armed_after": rig.proxy.commit_fault_armed,
        },
    )


def inject_drop_commit_reply(rig: Rig) -> Seen:
    """COMMIT reaches the server, its reply is lost: ambiguous, committed, not re-run."""
    return _commit_fault(rig, rig.proxy.drop_commit_reply)


def inject_reset_before_commit(rig: Rig) -> Seen:
    """COMMIT never reaches the server: the client cannot tell, so ambiguous too."""
    return _commit_fault(rig, rig.proxy.reset_before_commit)


def inject_schedule(rig: Rig) -> Seen:
    """blackhole now, passthrough in 1.5 s: the connect times out, the next call succeeds.

    No second attempt is made within the call: after a 2 s connect timeout, another
    could not end within the checkout bound (1 s).
    """
    done = rig.proxy.schedule([(0, Fault.BLACKHOLE), (1.5, Fault.PASSTHROUGH)])
    wait_until(lambda: rig.proxy.mode is Fault.BLACKHOLE)
    exc = raised(rig.select)  # waits out the 2 s connect timeout
    done.result(timeout=2)
    return Seen(
        exc,
        rig.breaker(),
        {
            "result": rig.select(),
            "connect_attempts": resilience_of(rig.engine).connect_attempts,
            "connections": rig.proxy.connections_total,
        },
    )


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    """One fault: how to inject it, what the caller sees, MariaDB's errno (PostgreSQL: none)."""

    fault: str
    inject: Callable[[Rig], Seen]
    want: Outcome
    mariadb_code: str | None = None

    def expected(self, backend: str) -> Outcome:
        code = self.mariadb_code if backend == "mariadb" else None
        return dataclasses.replace(self.want, code=code)


OK = Outcome(error=None)

CASES = [
    Case(
        "refuse",
        inject_refuse,
        Outcome(
            "OperationalError",
            "refused",
            "connect",
            "connect",
            attempt=2,
            history=("refused", "refused"),
            failures=2,
            state="open",
            facts={
                "connect_attempts": 2,
                "then": ("CircuitOpenError", "circuit_open", "checkout"),
                "attempts_while_open": 0,
                "probe": 1,
                "after_probe": "closed",
            },
        ),
        mariadb_code="2003",
    ),
    Case(
        "blackhole-connect",
        inject_blackhole_connect,
        Outcome(
            "OperationalError",
            "connect_timeout",
            "connect",
            "connect",
            attempt=1,  # a second 2 s attempt could not end within checkout (1 s)
            history=("connect_timeout",),
            failures=1,
            state="closed",
            facts={
                "connections": 1,
                "then": "OperationalError",  # the next caller's attempt: the second failure
                "connections_while_open": 1,
            },
        ),
        mariadb_code="2013",
    ),
    Case(
        "blackhole-mid-query",
        inject_blackhole_mid_query,
        Outcome(
            "OperationalError",
            "read_timeout",
            "transaction",
            "execute",
            attempt=1,
            history=(),
            failures=0,  # a lost session: the reconnect decides
            state="closed",
            facts={"recovered": 1, "connections": 2},
        ),
        # the watchdog cut it, as on PostgreSQL (no driver code: PyMySQL has no read timeout)
    ),
    Case("latency", inject_latency, OK),
    Case("latency-jitter", inject_jitter, OK),
    Case("bandwidth", inject_bandwidth, dataclasses.replace(OK, facts={"length": BIG_ROW})),
    Case(
        "reset_all",
        inject_reset_all,
        Outcome(
            "OperationalError",
            "disconnect",
            "transaction",
            "execute",
            attempt=1,
            history=(),
            failures=0,
            state="closed",
            facts={"result": 1, "fn_calls": 2, "connections": 2},
        ),
        mariadb_code="2006",
    ),
    Case(
        "reset_after",
        inject_reset_after,
        Outcome(
            "OperationalError",
            "disconnect",
            "transaction",
            "execute",
            attempt=1,
            history=(),
            failures=0,
            state="closed",
            facts={"bytes_down": RESET_AFTER_BYTES, "recovered": 1},
        ),
        mariadb_code="2013",
    ),
    Case(
        "drop_commit_reply",
        inject_drop_commit_reply,
        Outcome(
            "AmbiguousCommitError",
            "ambiguous_commit",
            "never",
            "commit",
            attempt=1,
            history=("ambiguous_commit",),
            failures=0,
            state="closed",
            facts={"fn_calls": 1, "committed": True, "commits_seen": 1, "armed_after": False},
        ),
        mariadb_code="2013",
    ),
    Case(
        "reset_before_commit",
        inject_reset_before_commit,
        Outcome(
            "AmbiguousCommitError",
            "ambiguous_commit",
            "never",
            "commit",
            attempt=1,
            history=("ambiguous_commit",),
            failures=0,
            state="closed",
            facts={"fn_calls": 1, "committed": False, "commits_seen": 1, "armed_after": False},
        ),
        mariadb_code="2013",
    ),
    Case(
        "schedule",
        inject_schedule,
        Outcome(
            "OperationalError",
            "connect_timeout",
            "connect",
            "connect",
            attempt=1,
            history=("connect_timeout",),
            failures=1,
            state="closed",
            facts={"result": 1, "connect_attempts": 2, "connections": 2},
        ),
        mariadb_code="2013",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.fault for c in CASES])
def test_fault_through_resilient_engine(case: Case, rig: Rig) -> None:
    """Each proxy fault gives the documented error, context, breaker count and recovery."""
    assert case.expected(rig.backend) == case.inject(rig).outcome()
