"""Breaker, connect retries, bulkhead and per-call deadline on real PostgreSQL and MariaDB.

Network faults go through :class:`resilient_db.testing.FaultProxy`; time in the
breaker comes from an injected clock, so no test waits for a reset timeout.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
import types
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import resilient_db
from resilient_db import (
    BreakerPolicy,
    CircuitOpenError,
    ErrorContext,
    Policy,
    PoolExhaustedError,
    PoolPolicy,
    RetryPolicy,
    Timeouts,
    _backoff,
    _connect,
    _watchdog,
    breaker_of,
    error_context,
)
from resilient_db._deadline import slot_of
from resilient_db._watchdog import Slot, Watchdog, _shutdown, socket_fileno
from resilient_db.breaker import CLOSED, HALF_OPEN, OPEN
from resilient_db.engine import resilience_of
from resilient_db.testing import ManualClock
from resilient_db.testing.proxy import FaultProxy
from tests.bounded import bounded
from tests.servers import (
    APP_PASSWORD,
    APP_USER,
    PgServer,
    ServerUnavailable,
    skip_or_fail,
    start_postgres,
)


def ctx_of(exc: BaseException) -> ErrorContext:
    """The error context resilient_db attached to ``exc`` (which must have one)."""
    ctx = error_context(exc)
    assert ctx is not None
    return ctx


def policy(
    *,
    threshold: int = 2,
    attempts: int = 1,
    call: float = 1.0,
    reset_timeout: float = 5.0,
    half_open: int = 1,
    pool: PoolPolicy | None = None,
    statement: float | None = 30.0,
    slow_call: float | None = None,
    probe_after: float | None = 1.0,
) -> Policy:
    """A test policy: small thresholds, no idle ping unless a test asks for one."""
    return Policy(
        timeouts=Timeouts(connect=2.0, checkout=1.0, statement=statement, call=call),
        pool=pool or PoolPolicy(ping_after_idle=None),
        retry=RetryPolicy(attempts=attempts, deadline=5.0),
        breaker=BreakerPolicy(
            failure_threshold=threshold,
            reset_timeout=reset_timeout,
            half_open_max_calls=half_open,
            slow_call=slow_call,
            probe_after=probe_after,
        ),
        validate="off",
    )


@pytest.fixture
def proxy(server_url: str) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the PostgreSQL or MariaDB test server."""
    u = sa.make_url(server_url)
    with FaultProxy(u.host or "127.0.0.1", u.port or 5432) as p:
        yield p


def via(url: str, p: FaultProxy) -> str:
    """``url`` rewritten to connect through the proxy."""
    return sa.make_url(url).set(host=p.host, port=p.port).render_as_string(hide_password=False)


def is_pg(url: str) -> bool:
    """True for the PostgreSQL URL."""
    return url.startswith("postgresql")


def deadline(url: str) -> float:
    """The per-call deadline used against ``url`` (PyMySQL's read_timeout has 1 s steps)."""
    return 0.5 if is_pg(url) else 1.0


def select_one(engine: sa.Engine) -> Any:
    """One round trip on a pooled connection."""
    with engine.connect() as c:
        return c.execute(sa.text("SELECT 1")).scalar()


def warm(engine: sa.Engine, n: int) -> None:
    """Open ``n`` pooled connections and check them back in."""
    conns = [engine.connect() for _ in range(n)]
    for c in conns:
        c.execute(sa.text("SELECT 1"))
    for c in conns:
        c.close()


# -- the breaker trips on each kind of outage ------------------------------------------


def test_trips_on_refused_and_rejects_without_io(server_url: str, proxy: FaultProxy) -> None:
    """Refused connects open it after `threshold`; then connect() fails at once, no I/O."""
    clock = ManualClock()
    engine = resilient_db.create_engine(via(server_url, proxy), policy=policy(), clock=clock)
    r, b = resilience_of(engine), breaker_of(engine)
    proxy.refuse()
    with pytest.raises(sa.exc.OperationalError) as first:
        engine.connect()
    assert ("refused", CLOSED) == (ctx_of(first.value).kind, b.state)
    with pytest.raises(sa.exc.OperationalError):
        engine.connect()
    assert OPEN == b.state
    clock.advance(1.5)
    attempts = r.connect_attempts
    for _ in range(50):
        with pytest.raises(CircuitOpenError) as rejected:
            engine.connect()
    assert (attempts, 50) == (r.connect_attempts, b.rejected)
    err = rejected.value
    ctx = ctx_of(err)
    assert isinstance(err, sa.exc.OperationalError)
    assert ("circuit_open", "checkout", 3.5) == (ctx.kind, ctx.phase, ctx.retry_in)
    assert "Nothing is accepting connections" in ctx.diagnosis  # the last real failure
    engine.dispose()


def test_trips_on_blackhole_within_call_deadline(server_url: str, proxy: FaultProxy) -> None:
    """Queries into a silent network fail within Timeouts.call; the probe then opens it."""
    call = deadline(server_url)
    engine = resilient_db.create_engine(via(server_url, proxy), policy=policy(call=call))
    warm(engine, 2)
    proxy.blackhole()
    kinds, took = [], []
    for _ in range(2):
        t0 = time.monotonic()
        with pytest.raises(sa.exc.OperationalError) as e:
            bounded(
                lambda: select_one(engine),
                deadline="Timeouts.call (execute)",
                unblock=proxy.reset_all,
            )
        took.append(time.monotonic() - t0)
        kinds.append(ctx_of(e.value).kind)
    assert ["read_timeout", "read_timeout"] == kinds
    assert max(took) < call + 0.5
    b = breaker_of(engine)
    budget = b.policy.probe_timeout + 0.5  # the deadline started a probe; it finds silence
    t0 = time.monotonic()
    while b.state != OPEN and time.monotonic() - t0 < budget:
        time.sleep(0.02)
    assert OPEN == b.state
    assert "stopped answering" in (b.last_failure or "")
    total = proxy.connections_total
    with pytest.raises(CircuitOpenError):
        engine.connect()
    assert total == proxy.connections_total
    engine.dispose()


def test_broken_connection_is_discarded_after_deadline(server_url: str, proxy: FaultProxy) -> None:
    """A call that hit the deadline discards its connection: the next one is a new connection."""
    call = deadline(server_url)
    # no silence probe: its own connections would race the count asserted here
    engine = resilient_db.create_engine(
        via(server_url, proxy), policy=policy(call=call, probe_after=None)
    )
    warm(engine, 1)
    proxy.blackhole()
    with pytest.raises(sa.exc.OperationalError) as e:
        bounded(
            lambda: select_one(engine), deadline="Timeouts.call (execute)", unblock=proxy.reset_all
        )
    assert e.value.connection_invalidated
    proxy.passthrough()
    before = proxy.connections_total
    assert 1 == select_one(engine)
    assert before + 1 == proxy.connections_total
    engine.dispose()


def test_idle_ping_into_silence_fails_within_deadline(server_url: str, proxy: FaultProxy) -> None:
    """The idle ping into silence gives up within its deadline; the reconnect then decides."""
    call = deadline(server_url)
    pool = PoolPolicy(ping_after_idle=0.0)
    engine = resilient_db.create_engine(
        via(server_url, proxy),
        policy=policy(threshold=1, call=call, pool=pool, probe_after=None),  # no probe here
    )
    warm(engine, 1)
    proxy.blackhole()
    t0 = time.monotonic()
    with pytest.raises(sa.exc.OperationalError) as e:
        bounded(engine.connect, deadline="Timeouts.call (idle ping)", unblock=proxy.reset_all)
    # the ping (at most the call deadline), then one connect attempt (2 s) into silence
    assert time.monotonic() - t0 < call + 2.0 + 1.0
    assert ("connect", OPEN) == (ctx_of(e.value).phase, breaker_of(engine).state)
    queue: Any = engine.pool
    assert 0 == queue.checkedout()
    engine.dispose()


def test_trips_on_connection_resets(server_url: str, proxy: FaultProxy) -> None:
    """Connections reset under running sessions are lost sessions: they never open it."""
    engine = resilient_db.create_engine(via(server_url, proxy), policy=policy())
    kinds = []
    for _ in range(2):
        with engine.connect() as c:
            c.execute(sa.text("SELECT 1"))
            proxy.reset_all()
            with pytest.raises(sa.exc.OperationalError) as e:
                c.execute(sa.text("SELECT 1"))
            kinds.append(ctx_of(e.value).kind)
    assert ["disconnect", "disconnect"] == kinds
    snap = breaker_of(engine).snapshot()
    assert (CLOSED, 0) == (snap.state, snap.failures)
    total = proxy.connections_total
    assert 1 == select_one(engine)  # the pool reconnects
    assert total + 1 == proxy.connections_total
    engine.dispose()


def test_trips_on_too_many_connections() -> None:
    """PostgreSQL refusing for max_connections opens the breaker after `threshold` connects."""
    try:
        server = start_postgres(max_connections="6")
    except ServerUnavailable as exc:
        skip_or_fail(exc)
    held: list[psycopg.Connection[Any]] = []
    try:
        url = server.url(user=APP_USER, password=APP_PASSWORD, database="app")
        engine = resilient_db.create_engine(url, policy=policy())
        with pytest.raises(psycopg.OperationalError):  # 6 minus 3 reserved for superusers
            for _ in range(6):
                held.append(
                    psycopg.connect(
                        host=server.host,
                        port=server.port,
                        user=APP_USER,
                        password=APP_PASSWORD,
                        dbname="app",
                    )
                )
        kinds = []
        for _ in range(2):
            with pytest.raises(sa.exc.OperationalError) as e:
                engine.connect()
            kinds.append(ctx_of(e.value).kind)
        assert ["too_many_connections"] * 2 == kinds
        b = breaker_of(engine)
        assert OPEN == b.state
        with pytest.raises(CircuitOpenError) as rejected:
            engine.connect()
        assert "connection limit is reached" in ctx_of(rejected.value).diagnosis
        engine.dispose()
    finally:
        for c in held:
            c.close()
        server.destroy()


# -- half-open probes and recovery -----------------------------------------------------


def test_half_open_lets_exactly_the_configured_probes_through(
    server_url: str, proxy: FaultProxy
) -> None:
    """Half-open admits half_open_max_calls new connections; the next caller is rejected."""
    clock = ManualClock()
    engine = resilient_db.create_engine(
        via(server_url, proxy), policy=policy(half_open=2), clock=clock
    )
    b = breaker_of(engine)
    proxy.refuse()
    for _ in range(2):
        with pytest.raises(sa.exc.OperationalError):
            engine.connect()
    assert OPEN == b.state
    proxy.passthrough()
    clock.advance(5.0)
    before = proxy.connections_total
    first, second = engine.connect(), engine.connect()
    with pytest.raises(CircuitOpenError) as rejected:
        engine.connect()
    assert (HALF_OPEN, 2) == (b.state, proxy.connections_total - before)
    assert 0.0 == ctx_of(rejected.value).retry_in
    assert 1 == first.execute(sa.text("SELECT 1")).scalar()
    first.close()
    assert CLOSED == b.state
    second.close()
    assert 1 == select_one(engine)
    engine.dispose()


def test_probe_that_reconnects_a_pooled_record_closes(server_url: str, proxy: FaultProxy) -> None:
    """A probe handed a pooled record whose connection was discarded still closes the breaker."""
    clock = ManualClock()
    engine = resilient_db.create_engine(
        via(server_url, proxy), policy=policy(threshold=1), clock=clock
    )
    b = breaker_of(engine)
    with engine.connect() as c:
        c.execute(sa.text("SELECT 1"))
        proxy.reset_all()
        with pytest.raises(sa.exc.OperationalError):
            c.execute(sa.text("SELECT 1"))
    b.record_failure("simulated outage")  # the lost session itself does not count
    pool: Any = engine.pool
    assert (OPEN, 1) == (b.state, pool.checkedin())  # the record waits, unconnected
    clock.advance(5.0)
    with engine.connect() as c:
        assert 1 == c.execute(sa.text("SELECT 1")).scalar()
    snap = b.snapshot()
    assert (CLOSED, 0) == (snap.state, snap.probes_in_flight)
    engine.dispose()


def test_probe_pings_a_pooled_connection(server_url: str, proxy: FaultProxy) -> None:
    """A probe given a pooled connection into a still-silent network fails fast and reopens."""
    clock = ManualClock()
    call = deadline(server_url)
    engine = resilient_db.create_engine(
        via(server_url, proxy), policy=policy(threshold=1, call=call), clock=clock
    )
    b = breaker_of(engine)
    warm(engine, 1)
    b.record_failure("simulated outage")
    proxy.blackhole()
    clock.advance(5.0)
    t0 = time.monotonic()
    with pytest.raises(CircuitOpenError):
        bounded(engine.connect, deadline="Timeouts.call (probe's ping)", unblock=proxy.reset_all)
    assert time.monotonic() - t0 < call + 0.5
    snap = b.snapshot()
    assert (OPEN, 0, 2) == (snap.state, snap.probes_in_flight, snap.failures)
    engine.dispose()


def test_failed_probe_reopens(server_url: str, proxy: FaultProxy) -> None:
    """A probe into a still-refusing server reopens it for another reset_timeout."""
    clock = ManualClock()
    engine = resilient_db.create_engine(via(server_url, proxy), policy=policy(), clock=clock)
    b = breaker_of(engine)
    proxy.refuse()
    for _ in range(2):
        with pytest.raises(sa.exc.OperationalError):
            engine.connect()
    clock.advance(5.0)
    with pytest.raises(sa.exc.OperationalError) as probe:
        engine.connect()
    assert not isinstance(probe.value, CircuitOpenError)
    snap = b.snapshot()
    assert (OPEN, 5.0, 0) == (snap.state, snap.retry_in, snap.probes_in_flight)
    engine.dispose()


def test_probe_survives_a_reconnect_on_checkout(sqlite_url: str) -> None:
    """A probe whose record SQLAlchemy reconnects (checkout listener disconnect) still closes."""
    clock = ManualClock()
    engine = resilient_db.create_engine(sqlite_url, policy=policy(threshold=1), clock=clock)
    b = breaker_of(engine)
    warm(engine, 1)
    b.record_failure("simulated outage")
    clock.advance(5.0)
    refusals = [sa.exc.DisconnectionError("stale connection")]

    @sa.event.listens_for(engine, "checkout")
    def checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if refusals:  # SQLAlchemy invalidates the record and reconnects it (clearing its info)
            raise refusals.pop()

    with engine.connect() as c:
        assert 1 == c.execute(sa.text("SELECT 1")).scalar()
    snap = b.snapshot()
    assert ([], CLOSED, 0) == (refusals, snap.state, snap.probes_in_flight)
    engine.dispose()


def test_server_restart_with_idle_pool_does_not_open(throwaway_pg: PgServer) -> None:
    """After a restart, the failed idle pings of 6 stale connections do not open a threshold-3
    breaker: the pool is invalidated and reconnecting decides."""
    clock = ManualClock()
    url = throwaway_pg.url(user=APP_USER, password=APP_PASSWORD, database="app")
    pool = PoolPolicy(size=6, ping_after_idle=1.0)
    engine = resilient_db.create_engine(url, policy=policy(threshold=3, pool=pool), clock=clock)
    try:
        warm(engine, 6)
        throwaway_pg.restart()
        clock.advance(2.0)
        conns = [engine.connect() for _ in range(6)]  # a busy application, all at once
        answers = [c.execute(sa.text("SELECT 1")).scalar() for c in conns]
        for c in conns:
            c.close()
        snap = breaker_of(engine).snapshot()
        assert ([1] * 6, CLOSED, 0) == (answers, snap.state, snap.failures)
    finally:
        engine.dispose()


# -- what never counts -----------------------------------------------------------------


def test_application_errors_do_not_count(server_url: str, proxy: FaultProxy) -> None:
    """Unique violations and syntax errors neither count nor reset the failure count."""
    engine = resilient_db.create_engine(via(server_url, proxy), policy=policy(threshold=2))
    table = f"rdb_app_{uuid.uuid4().hex[:10]}"
    with engine.begin() as c:
        c.execute(sa.text(f"CREATE TABLE {table} (id INT PRIMARY KEY)"))
        c.execute(sa.text(f"INSERT INTO {table} VALUES (1)"))
    try:
        breaker_of(engine).record_failure("simulated")  # one counted failure first
        for _ in range(3):
            with pytest.raises(sa.exc.IntegrityError), engine.begin() as c:
                c.execute(sa.text(f"INSERT INTO {table} VALUES (1)"))
            with pytest.raises(sa.exc.ProgrammingError), engine.connect() as c:
                c.execute(sa.text("SELEC nonsense"))
        snap = breaker_of(engine).snapshot()
        assert (CLOSED, 1, 1) == (snap.state, snap.failures, snap.consecutive_failures)
    finally:
        with engine.begin() as c:
            c.execute(sa.text(f"DROP TABLE {table}"))
        engine.dispose()


def test_errors_raised_inside_an_except_block_are_classified(
    server_url: str, proxy: FaultProxy
) -> None:
    """An error raised while handling another gets its own context (a lost session: no count)."""
    engine = resilient_db.create_engine(via(server_url, proxy), policy=policy(threshold=2))
    table = f"rdb_ctx_{uuid.uuid4().hex[:10]}"
    with engine.begin() as c:
        c.execute(sa.text(f"CREATE TABLE {table} (id INT PRIMARY KEY)"))
        c.execute(sa.text(f"INSERT INTO {table} VALUES (1)"))
    try:
        with engine.connect() as c:
            try:
                c.execute(sa.text(f"INSERT INTO {table} VALUES (1)"))
            except sa.exc.IntegrityError:
                c.rollback()
                with pytest.raises(sa.exc.ProgrammingError) as missing:
                    c.execute(sa.text(f"SELECT * FROM {table}_missing"))
                c.rollback()
                proxy.reset_all()
                with pytest.raises(sa.exc.OperationalError) as lost:
                    c.execute(sa.text("SELECT 1"))
        code = "42P01" if is_pg(server_url) else "1146"
        assert (code, "disconnect", 0) == (
            ctx_of(missing.value).code,
            ctx_of(lost.value).kind,
            breaker_of(engine).failures,
        )
    finally:
        with engine.begin() as c:
            c.execute(sa.text(f"DROP TABLE {table}"))
        engine.dispose()


def test_error_context_does_not_follow_implicit_chaining() -> None:
    """error_context() follows ``orig`` and ``__cause__``, not the error being handled."""
    handled = sa.exc.IntegrityError("INSERT", None, Exception("dup"))
    resilient_db.errors.attach(handled, ErrorContext(engine="e", kind="application"))
    cause = ValueError("cause")
    resilient_db.errors.attach(cause, ErrorContext(engine="e", kind="disconnect"))
    try:
        raise handled
    except sa.exc.IntegrityError:
        implicit = RuntimeError("raised while handling")
        try:
            raise implicit
        except RuntimeError:
            pass
        explicit = sa.exc.OperationalError("SELECT 1", None, cause)
    assert (None, "disconnect") == (error_context(implicit), ctx_of(explicit).kind)


def wait_pg_active(url: str, tag: str, timeout: float = 10.0) -> bool:
    """Poll pg_stat_activity until a statement containing ``tag`` is running (or time is up)."""
    admin = sa.create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    end = time.monotonic() + timeout
    try:
        with admin.connect() as c:
            while time.monotonic() < end:
                if c.execute(
                    sa.text(
                        "SELECT 1 FROM pg_stat_activity WHERE state = 'active' "
                        "AND pid <> pg_backend_pid() AND query LIKE :tag"
                    ),
                    {"tag": f"%{tag}%"},
                ).first():
                    return True
                time.sleep(0.01)
    finally:
        admin.dispose()
    return False


def test_keyboard_interrupt_does_not_count(pg_url: str) -> None:
    """Ctrl-C during a running query (a real SIGINT) leaves a threshold-1 breaker closed."""
    engine = resilient_db.create_engine(pg_url, policy=policy(threshold=1, call=30.0))
    select_one(engine)
    tag = f"rdb_ki_{uuid.uuid4().hex[:10]}"
    armed = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        # raises only inside the `with` block below: a late signal is ignored
        if armed.is_set():
            raise KeyboardInterrupt

    main = threading.get_ident()
    active: list[bool] = []

    def interrupt_when_running() -> None:
        active.append(wait_pg_active(pg_url, tag))
        if active[0] and armed.is_set():
            signal.pthread_kill(main, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, on_sigint)
    sender = threading.Thread(target=interrupt_when_running)
    try:
        armed.set()
        sender.start()
        with pytest.raises(KeyboardInterrupt), engine.connect() as c:
            c.execute(sa.text(f"SELECT pg_sleep(10) /* {tag} */"))
    finally:
        armed.clear()
        sender.join()
        signal.signal(signal.SIGINT, previous)
    try:
        snap = breaker_of(engine).snapshot()
        assert ([True], CLOSED, 0) == (active, snap.state, snap.failures)
        assert 1 == select_one(engine)
    finally:
        engine.dispose()


async def test_cancellation_does_not_count(pg_url: str) -> None:
    """asyncio cancellation of a running query leaves a threshold-1 breaker closed."""
    url = sa.make_url(pg_url).set(drivername="postgresql+asyncpg")
    ae = create_async_engine(url)
    resilient_db.wrap(ae.sync_engine, policy=policy(threshold=1, call=30.0))
    tag = f"rdb_cancel_{uuid.uuid4().hex[:10]}"

    async def slow() -> None:
        async with ae.connect() as c:
            await c.execute(sa.text(f"SELECT pg_sleep(10) /* {tag} */"))

    try:
        task = asyncio.create_task(slow())
        running = await asyncio.to_thread(wait_pg_active, pg_url, tag)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        snap = breaker_of(ae).snapshot()
        assert (True, CLOSED, 0) == (running, snap.state, snap.failures)
    finally:
        await ae.dispose()


# -- no lock around database calls -----------------------------------------------------


def test_no_lock_held_during_database_calls(server_url: str) -> None:
    """8 threads sleeping 0.2 s in the database at once finish in about 0.2 s, not 1.6 s."""
    engine = resilient_db.create_engine(server_url, policy=policy())
    sleep = "SELECT pg_sleep(0.2)" if is_pg(server_url) else "SELECT SLEEP(0.2)"
    warm(engine, 8)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def work() -> None:
        barrier.wait()
        try:
            with engine.connect() as c:
                c.execute(sa.text(sleep))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    assert [] == errors
    assert elapsed < 0.2 * 8 / 2
    engine.dispose()


def test_slow_calls_count_as_failures(pg_url: str) -> None:
    """Calls slower than BreakerPolicy.slow_call are failures even though they succeed."""
    engine = resilient_db.create_engine(pg_url, policy=policy(threshold=2, slow_call=0.05))
    for _ in range(2):
        with engine.connect() as c:
            c.execute(sa.text("SELECT pg_sleep(0.1)"))
    b = breaker_of(engine)
    assert (OPEN, 2, 0) == (b.state, b.failures, b.successes)
    assert "slow-call threshold" in (b.last_failure or "")
    engine.dispose()


# -- the watchdog ------------------------------------------------------------------------


def test_watchdog_spares_a_call_that_ends_before_the_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call that returns while the watchdog gets ready to shut its socket is not shot."""
    mine, peer = socket.socketpair()
    clock = ManualClock()
    dog = Watchdog(clock=clock)
    slot = Slot(mine.fileno)
    dog._slots.add(slot)  # registered without starting the scanning thread
    slot.deadline = clock.now - 1.0
    real_dup = os.dup

    def dup(fd: int) -> int:
        slot.deadline = 0.0  # the guarded call returns just now
        return real_dup(fd)

    monkeypatch.setattr(_watchdog, "os", types.SimpleNamespace(dup=dup, close=os.close))
    try:
        fired = dog.scan()
        try:
            mine.sendall(b"x")
            echoed = peer.recv(1)
        except OSError:
            echoed = b""
        assert (0, False, b"x") == (fired, slot.fired, echoed)
    finally:
        mine.close()
        peer.close()


class _Silence:
    """A slot's engine, as the watchdog sees it: a silence threshold and a callback."""

    def __init__(self, probe_after: float) -> None:
        self.probe_after = probe_after
        self.suspected: list[float] = []

    def suspect(self, now: float) -> None:
        self.suspected.append(now)


def test_watchdog_sleeps_until_the_soonest_deadline_or_silence() -> None:
    """The scan notes when the next deadline or silence threshold falls, nothing sooner."""
    clock = ManualClock()
    dog = Watchdog(clock=clock)
    quiet, slow = _Silence(1.0), _Silence(1.0)
    a, b, idle = Slot(lambda: None, quiet), Slot(lambda: None, slow), Slot(lambda: None)
    for s in (a, b, idle):
        dog._slots.add(s)
    a.armed_at, a.deadline = clock.now, clock.now + 30.0  # silent at +1.0
    b.armed_at, b.deadline = clock.now - 2.0, clock.now + 28.0  # silent for 2 s already
    dog.scan()
    assert ([], [clock.now], clock.now + dog.tick) == (
        quiet.suspected,
        slow.suspected,
        dog._soonest,
    )
    b.deadline = 0.0  # that call ended
    dog.scan()
    assert clock.now + 1.0 == dog._soonest
    a.deadline = clock.now + 0.5  # a shorter deadline than the silence threshold
    dog.scan()
    assert clock.now + 0.5 == dog._soonest


def test_a_deadline_sooner_than_the_next_scan_wakes_the_watchdog() -> None:
    """The thread sleeps long while calls are healthy; a short deadline still fires on time."""
    mine, peer = socket.socketpair()
    dog = Watchdog(idle=30.0)
    slot = dog.slot(mine.fileno)
    try:
        t0 = time.monotonic()
        slot.arm(0.05)
        mine.settimeout(10.0)
        try:
            got = mine.recv(1)  # returns b"" once the watchdog shuts the socket down
        except OSError:
            got = b""
        took = time.monotonic() - t0
        assert (b"", True) == (got, slot.fired)
        assert took < 5.0, took  # not the 30 s sleep
    finally:
        mine.close()
        peer.close()


def _backend_pid(conn: sa.Connection) -> int:
    return int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def _shoot(conn: sa.Connection) -> None:
    """What the watchdog's shot does: shut the connection's socket down."""
    fd = socket_fileno(conn.connection.driver_connection)
    assert fd is not None
    assert _shutdown(fd, lambda: True)


def test_fire_landing_as_a_call_returns_fails_only_the_next_call_of_that_connection(
    pg_url: str,
) -> None:
    """The shot lands just after the reply: the call succeeds, its connection is dead.

    Its next call fails as read_timeout (phase execute: nothing was sent), only that
    connection is replaced, and the other pooled connection is kept (no pool invalidation).
    """
    engine = resilient_db.create_engine(pg_url, policy=policy())
    with engine.connect() as a, engine.connect() as b:
        pids = {_backend_pid(a), _backend_pid(b)}
    with engine.connect() as c:
        shot_pid = _backend_pid(c)
        slot = slot_of(c)
        assert slot is not None
        slot.fired = True  # the watchdog fired while this call was returning...
        assert 1 == c.execute(sa.text("SELECT 1")).scalar()
        _shoot(c)  # ...and shut the socket down
        with pytest.raises(sa.exc.OperationalError) as info:
            c.execute(sa.text("SELECT 2"))
    ctx = ctx_of(info.value)
    with engine.connect() as a, engine.connect() as b:
        after = {_backend_pid(a), _backend_pid(b)}
    assert ("read_timeout", "execute", True, False) == (ctx.kind, ctx.phase, slot.shot, slot.fired)
    assert (pids - {shot_pid}, 1) == (after & pids, len(after - pids))
    engine.dispose()


def test_shot_connection_returned_to_the_pool_is_never_handed_out_again(pg_url: str) -> None:
    """A connection shot as its last call returned is reconnected at its next checkout."""
    engine = resilient_db.create_engine(
        pg_url, policy=policy(pool=PoolPolicy(size=1, max_overflow=0, ping_after_idle=None))
    )
    with engine.connect() as c:
        before = _backend_pid(c)
        fired = slot_of(c)
        assert fired is not None
        fired.fired = True  # the watchdog fired as the call returned
        c.execute(sa.text("SELECT 1"))
        _shoot(c)
    with engine.connect() as c:
        after = _backend_pid(c)
        slot = slot_of(c)
    assert slot is not None
    assert (True, False) == (before != after, slot.shot)
    engine.dispose()


# -- connect retries -------------------------------------------------------------------


def test_connect_retries_count_each_attempt(server_url: str, proxy: FaultProxy) -> None:
    """A refused connect is retried `attempts` times; each attempt is one breaker failure."""
    engine = resilient_db.create_engine(
        via(server_url, proxy), policy=policy(threshold=10, attempts=3)
    )
    proxy.refuse()
    with pytest.raises(sa.exc.OperationalError) as e:
        engine.connect()
    ctx = ctx_of(e.value)
    assert not isinstance(e.value, CircuitOpenError)
    kinds = tuple(h.split(":")[0] for h in ctx.history)  # kind[:code]
    assert (3, ("refused",) * 3, 3) == (ctx.attempt, kinds, breaker_of(engine).failures)
    engine.dispose()


def test_connect_retries_stop_when_the_breaker_opens(server_url: str, proxy: FaultProxy) -> None:
    """With attempts=5 and threshold=2 the second failure opens it and ends the retries."""
    engine = resilient_db.create_engine(
        via(server_url, proxy), policy=policy(threshold=2, attempts=5)
    )
    proxy.refuse()
    with pytest.raises(sa.exc.OperationalError) as e:
        engine.connect()
    ctx = ctx_of(e.value)
    assert (2, "refused", OPEN) == (ctx.attempt, ctx.kind, ctx.breaker_state)
    assert 2 == resilience_of(engine).connect_attempts
    engine.dispose()


def test_connect_succeeds_after_a_retry(server_url: str, proxy: FaultProxy) -> None:
    """Refused first, then accepted: connect() returns a working connection on attempt 2."""
    engine = resilient_db.create_engine(
        via(server_url, proxy), policy=policy(threshold=10, attempts=3)
    )
    proxy.refuse()
    r = resilience_of(engine)

    def heal() -> None:  # runs before attempt 2
        if r.connect_attempts == 2:
            proxy.passthrough()

    r.connect_faults.append(heal)
    assert 1 == select_one(engine)
    assert (2, 1) == (r.connect_attempts, breaker_of(engine).failures)
    engine.dispose()


def test_non_retryable_connect_errors_are_not_retried(server_url: str) -> None:
    """An unknown database fails on the first attempt and does not count for the breaker."""
    url = sa.make_url(server_url).set(database=f"no_such_db_{uuid.uuid4().hex[:8]}")
    engine = resilient_db.create_engine(url, policy=policy(threshold=1, attempts=5))
    with pytest.raises(sa.exc.OperationalError) as e:
        engine.connect()
    ctx = ctx_of(e.value)
    assert ("unknown_database", 1, CLOSED) == (ctx.kind, ctx.attempt, breaker_of(engine).state)
    engine.dispose()


def test_retry_deadline_accounts_for_the_next_sleep(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No retry starts when elapsed + the next pause would pass RetryPolicy.deadline."""
    ticks = iter(float(t) for t in range(0, 1000, 4))  # each clock read: 4 s later
    retry = RetryPolicy(attempts=10, initial=1.0, max_backoff=5.0, deadline=10.0)
    pol = Policy(
        timeouts=Timeouts(checkout=30.0),  # the connect bound is not the one tested here
        retry=retry,
        breaker=BreakerPolicy(enabled=False),
        validate="off",
    )
    engine = resilient_db.create_engine(
        "postgresql+psycopg://u@127.0.0.1:1/db", policy=pol, clock=lambda: next(ticks)
    )
    monkeypatch.setattr(_backoff, "backoff", lambda p, attempt: 3.0)
    with pytest.raises(sa.exc.OperationalError) as e:
        engine.connect()
    # attempt 1 ends at 4 s (4 + 3 < 10: retry), attempt 2 at 8 s (8 + 3 >= 10: stop)
    assert (2, 8.0) == (ctx_of(e.value).attempt, ctx_of(e.value).elapsed)


def test_happy_path_builds_no_retry_machinery(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connect that succeeds at once never enters the retry loop."""

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("retry loop entered")

    monkeypatch.setattr(_connect, "_connect_retrying", boom)
    engine = resilient_db.create_engine(sqlite_url, policy=policy())
    assert 1 == select_one(engine)
    engine.dispose()


def test_backoff_is_full_jitter_capped() -> None:
    """The n-th pause is uniform in [0, min(max_backoff, initial * 2**(n-1))]."""
    p = RetryPolicy(initial=0.1, max_backoff=0.5)
    highs = [_backoff.backoff(p, n, rand=lambda: 1.0) for n in (1, 2, 3, 4)]
    assert [0.1, 0.2, 0.4, 0.5] == pytest.approx(highs)
    assert 0.0 == _backoff.backoff(p, 3, rand=lambda: 0.0)


# -- bulkhead and statement timeouts ---------------------------------------------------


def test_bulkhead_rejects_beyond_max_waiters_at_once(sqlite_url: str) -> None:
    """With one connection held and one caller waiting, the next caller is rejected at once."""
    pool = PoolPolicy(size=1, max_overflow=0, max_waiters=1)
    pol = Policy(timeouts=Timeouts(checkout=5.0), pool=pool, validate="off")
    engine = resilient_db.create_engine(sqlite_url, policy=pol)
    r = resilience_of(engine)
    held = engine.connect()
    waiter_done = threading.Event()

    def waiter() -> None:
        with engine.connect() as c:
            c.execute(sa.text("SELECT 1"))
        waiter_done.set()

    t = threading.Thread(target=waiter)
    t.start()
    for _ in range(500):  # until the waiter is parked in the pool
        if r.waiting == 1:
            break
        time.sleep(0.01)
    t0 = time.monotonic()
    with pytest.raises(PoolExhaustedError) as e:
        engine.connect()
    assert time.monotonic() - t0 < 1.0  # not the 5 s checkout timeout
    err = e.value
    assert isinstance(err, sa.exc.TimeoutError)
    assert (
        "pool exhausted: 1 in use, 1 waiting \u2014 a leak or a slow database, "
        "not a network problem"
    ) in str(err)
    extra = dict(ctx_of(err).extra)
    assert (1, 1, 1, 1) == (
        extra["in_use"],
        extra["waiting"],
        extra["max_waiters"],
        extra["pool_size"],
    )
    held.close()
    t.join(5)
    assert waiter_done.is_set()
    assert 0 == breaker_of(engine).failures
    engine.dispose()


def test_checkout_timeout_is_pool_exhausted(sqlite_url: str) -> None:
    """Waiting longer than Timeouts.checkout raises PoolExhaustedError, not counted."""
    pool = PoolPolicy(size=1, max_overflow=0, max_waiters=4)
    pol = Policy(timeouts=Timeouts(checkout=0.2), pool=pool, validate="off")
    engine = resilient_db.create_engine(sqlite_url, policy=pol)
    with engine.connect(), pytest.raises(PoolExhaustedError) as e:
        engine.connect()
    assert "checkout timed out" in str(e.value)
    assert ("pool_exhausted", 0) == (ctx_of(e.value).kind, breaker_of(engine).failures)
    engine.dispose()


def test_postgres_statement_timeout_from_policy(pg_url: str) -> None:
    """PostgreSQL sessions get statement_timeout = Timeouts.statement."""
    engine = resilient_db.create_engine(pg_url, policy=policy(statement=1.5))
    with engine.connect() as c:
        assert "1500ms" == c.execute(sa.text("SHOW statement_timeout")).scalar()
    engine.dispose()


def test_mariadb_max_statement_time_from_policy(mariadb_url: str) -> None:
    """MariaDB sessions get max_statement_time; a slower query fails and does not count."""
    engine = resilient_db.create_engine(mariadb_url, policy=policy(statement=0.3, threshold=1))
    with engine.connect() as c:
        assert 0.3 == pytest.approx(c.execute(sa.text("SELECT @@max_statement_time")).scalar())
        with pytest.raises(sa.exc.OperationalError) as e:
            c.execute(sa.text("SELECT SLEEP(2)"))
        assert 1 == c.execute(sa.text("SELECT 1")).scalar()
    assert "statement_timeout" == ctx_of(e.value).kind
    assert CLOSED == breaker_of(engine).state
    engine.dispose()


def test_sqlite_busy_timeout(sqlite_url: str) -> None:
    """SQLite connections wait for locks up to the statement timeout (below the cap)."""
    engine = resilient_db.create_engine(sqlite_url, policy=policy(statement=0.5))
    with engine.connect() as c:
        assert 500 == c.execute(sa.text("PRAGMA busy_timeout")).scalar()
    engine.dispose()


@pytest.mark.parametrize("statement", [None, 2.0])
def test_sqlite_busy_timeout_capped_at_one_second(sqlite_url: str, statement: float | None) -> None:
    """The default policy (statement 25 s) and a longer statement timeout wait 1 s for a lock."""
    pol = Policy(validate="off") if statement is None else policy(statement=statement)
    engine = resilient_db.create_engine(sqlite_url, policy=pol)
    with engine.connect() as c:
        assert 1000 == c.execute(sa.text("PRAGMA busy_timeout")).scalar()
    engine.dispose()


# -- manual control --------------------------------------------------------------------


def test_manual_control(sqlite_url: str) -> None:
    """force_open rejects with no retry_in; force_close and reset restore service."""
    engine = resilient_db.create_engine(sqlite_url, policy=policy())
    b = breaker_of(engine)
    b.force_open()
    with pytest.raises(CircuitOpenError) as e:
        engine.connect()
    ctx = ctx_of(e.value)
    assert (None, True) == (ctx.retry_in, b.snapshot().forced)
    assert "forced open by an operator" in ctx.diagnosis
    b.force_close()
    assert 1 == select_one(engine)
    b.force_open()
    b.reset()
    snap = b.snapshot()
    assert (CLOSED, 0, False) == (snap.state, snap.rejected, snap.forced)
    assert 1 == select_one(engine)
    engine.dispose()


def test_connect_retries_stop_at_the_checkout_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Getting a connection is bounded by Timeouts.checkout: no attempt starts after it."""
    ticks = iter(float(t) for t in range(0, 1000, 1))  # each clock read: 1 s later
    retry = RetryPolicy(attempts=10, initial=0.1, max_backoff=0.1, deadline=60.0)
    pol = Policy(
        timeouts=Timeouts(checkout=3.0),
        retry=retry,
        breaker=BreakerPolicy(enabled=False),
        validate="off",
    )
    engine = resilient_db.create_engine(
        "postgresql+psycopg://u@127.0.0.1:1/db", policy=pol, clock=lambda: next(ticks)
    )
    monkeypatch.setattr(_backoff, "backoff", lambda p, attempt: 0.5)
    with pytest.raises(sa.exc.OperationalError) as e:
        engine.connect()
    # attempts end at 1 s and 2 s (+0.5 < 3: retry), the third at 3 s (3.5 >= 3: stop)
    assert (3, 3.0) == (ctx_of(e.value).attempt, ctx_of(e.value).elapsed)


def test_no_retry_after_a_connect_timeout_that_leaves_no_room(server_url: str) -> None:
    """A connect into silence is not tried again when a second could not end within checkout."""
    u = sa.make_url(server_url)
    with FaultProxy(u.host or "127.0.0.1", u.port or 5432) as p:
        p.blackhole()
        pol = Policy(
            timeouts=Timeouts(connect=2.0, checkout=3.0),
            retry=RetryPolicy(attempts=3),
            breaker=BreakerPolicy(enabled=False, probe_after=None),
            validate="off",
        )
        engine = resilient_db.create_engine(via(server_url, p), policy=pol)
        t0 = time.monotonic()
        with pytest.raises(sa.exc.OperationalError) as e:
            engine.connect()
        took = time.monotonic() - t0
        engine.dispose()
    # one 2 s attempt: 2 s + a second 2 s attempt would pass the 3 s bound
    assert ("connect_timeout", 1) == (ctx_of(e.value).kind, ctx_of(e.value).attempt)
    assert took < 3.0
