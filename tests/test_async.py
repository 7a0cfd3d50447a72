"""create_async_engine / wrap_async: the sync resilience on asyncpg, psycopg, aiomysql, aiosqlite.

Network faults go through :class:`resilient_db.testing.FaultProxy`; breaker time
comes from an injected clock. Cancellation has its own file, test_async_cancel.py.
"""

from __future__ import annotations

import asyncio
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import resilient_db
from resilient_db import (
    BreakerPolicy,
    CircuitOpenError,
    Policy,
    PoolExhaustedError,
    PoolPolicy,
    RetryPolicy,
    Timeouts,
    _backoff,
    breaker_of,
    error_context,
)
from resilient_db.breaker import CLOSED, HALF_OPEN, OPEN
from resilient_db.engine import driver_defaults, resilience_of
from resilient_db.testing import ManualClock
from resilient_db.testing.proxy import FaultProxy
from tests.bounded import abounded
from tests.conftest import SENTINEL

ASYNC_DRIVERS = {
    "asyncpg": "postgresql+asyncpg",
    "psycopg": "postgresql+psycopg",  # create_async_engine picks psycopg's async variant
    "aiomysql": "mysql+aiomysql",
    "aiosqlite": "sqlite+aiosqlite",
}


MY_URL = "mysql+aiomysql://app@127.0.0.1:1/shop"  # never connected to


def policy(
    *,
    threshold: int = 2,
    attempts: int = 1,
    connect: float = 0.5,
    call: float = 0.5,
    statement: float | None = 30.0,
    checkout: float = 1.0,
    pool: PoolPolicy | None = None,
    half_open: int = 1,
    application_name: str | None = "resilient-db",
    probe_after: float | None = 1.0,
) -> Policy:
    """A test policy: short deadlines, small thresholds, no idle ping."""
    return Policy(
        timeouts=Timeouts(connect=connect, checkout=checkout, statement=statement, call=call),
        pool=pool or PoolPolicy(ping_after_idle=None),
        retry=RetryPolicy(attempts=attempts, deadline=5.0),
        breaker=BreakerPolicy(
            failure_threshold=threshold,
            reset_timeout=5.0,
            half_open_max_calls=half_open,
            probe_after=probe_after,
        ),
        application_name=application_name,
        validate="off",
    )


def to_async(url: str, driver: str) -> str:
    """``url`` with the async ``driver`` (asyncpg, psycopg, aiomysql or aiosqlite)."""
    return (
        sa.make_url(url).set(drivername=ASYNC_DRIVERS[driver]).render_as_string(hide_password=False)
    )


def via(url: str, p: FaultProxy) -> str:
    """``url`` rewritten to connect through the proxy."""
    return sa.make_url(url).set(host=p.host, port=p.port).render_as_string(hide_password=False)


def is_pg(url: str) -> bool:
    """True for a PostgreSQL URL."""
    return url.startswith("postgresql")


def sleep_sql(url: str, seconds: float) -> str:
    """A statement that sleeps ``seconds`` on the server."""
    return f"SELECT pg_sleep({seconds})" if is_pg(url) else f"SELECT SLEEP({seconds})"


async def select_one(engine: AsyncEngine) -> Any:
    """One round trip on a pooled connection."""
    async with engine.connect() as c:
        return (await c.execute(sa.text("SELECT 1"))).scalar()


@pytest.fixture(params=["asyncpg", "psycopg", "aiomysql"])
def async_server_url(request: pytest.FixtureRequest) -> str:
    """The PostgreSQL (asyncpg, psycopg async) and MariaDB (aiomysql) test servers."""
    driver = request.param
    base = "mariadb_url" if driver == "aiomysql" else "pg_url"
    return to_async(str(request.getfixturevalue(base)), driver)


@pytest.fixture(params=["aiosqlite", "asyncpg", "psycopg", "aiomysql"])
def async_url(request: pytest.FixtureRequest) -> str:
    """Every async driver in turn, SQLite first."""
    driver = request.param
    base = {"aiosqlite": "sqlite_url", "aiomysql": "mariadb_url"}.get(driver, "pg_url")
    return to_async(str(request.getfixturevalue(base)), driver)


@pytest.fixture
def proxy(async_server_url: str) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the server ``async_server_url`` names."""
    u = sa.make_url(async_server_url)
    with FaultProxy(u.host or "127.0.0.1", u.port or 5432) as p:
        yield p


@pytest.fixture
async def admin(async_server_url: str) -> AsyncIterator[AsyncEngine]:
    """A plain SQLAlchemy async engine on the same server, for the other session."""
    engine = sa_create_async_engine(async_server_url)
    yield engine
    await engine.dispose()


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "rdb_async_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))


# -- the API ---------------------------------------------------------------------------


async def test_create_async_engine_returns_a_real_async_engine(sqlite_url: str) -> None:
    """The object handed back is a sqlalchemy AsyncEngine, not a proxy, with our pool."""
    pol = policy(pool=PoolPolicy(size=3, max_overflow=1, ping_after_idle=None))
    engine = resilient_db.create_async_engine(to_async(sqlite_url, "aiosqlite"), policy=pol)
    assert type(engine) is AsyncEngine
    assert "ResilientAsyncAdaptedQueuePool" == type(engine.sync_engine.pool).__name__
    assert (3, pol) == (engine.sync_engine.pool.size(), resilient_db.policy_of(engine))  # type: ignore[attr-defined]
    assert 1 == await select_one(engine)
    await engine.dispose()  # the resilient pool survives dispose()
    assert "ResilientAsyncAdaptedQueuePool" == type(engine.sync_engine.pool).__name__
    assert 1 == await select_one(engine)
    await engine.dispose()


async def test_core_and_orm_round_trips(async_url: str) -> None:
    """Core and AsyncSession round-trips work unchanged on every async driver."""
    engine = resilient_db.create_async_engine(async_url, policy=policy())
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            await conn.run_sync(Base.metadata.create_all)
        async with AsyncSession(engine) as session, session.begin():
            session.add_all([Item(id=1, name="a"), Item(id=2, name="b")])
        async with AsyncSession(engine) as session:
            names = (await session.scalars(sa.select(Item.name).order_by(Item.id))).all()
        assert ["a", "b"] == names
        assert 0 == engine.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
        await engine.dispose()


async def test_wrap_async_returns_the_same_engine(sqlite_url: str) -> None:
    """wrap_async() attaches resilience to the AsyncEngine it is given and returns it."""
    raw = sa_create_async_engine(to_async(sqlite_url, "aiosqlite"))
    assert raw is resilient_db.wrap_async(raw, name="orders")
    assert ("orders", True) == (resilience_of(raw).name, resilience_of(raw).is_async)
    assert 1 == await select_one(raw)
    with pytest.raises(resilient_db.ConfigurationError) as twice:
        resilient_db.wrap_async(raw)
    assert "engine" == twice.value.field
    await raw.dispose()


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda url: resilient_db.wrap_async(sa.create_engine(url)), "engine"),  # sync engine
        (
            lambda url: resilient_db.wrap(sa_create_async_engine(to_async(url, "aiosqlite"))),
            "engine",
        ),
        (lambda url: resilient_db.create_async_engine(url, validate="off"), "url"),  # pysqlite
        (
            lambda url: resilient_db.create_async_engine(to_async(url, "aiosqlite"), pool_sizee=1),
            "create_async_engine",
        ),
        (lambda url: resilient_db.wrap_async(sa_create_async_engine(MY_URL), name=5), "name"),
    ],
)
def test_misuse_raises_configuration_error(sqlite_url: str, make: Any, field: str) -> None:
    """A sync engine, a sync-only driver or a bad argument raise ConfigurationError naming it."""
    with pytest.raises(resilient_db.ConfigurationError) as info:
        make(sqlite_url)
    assert field == info.value.field
    assert info.value.fix


def test_failed_wrap_async_leaves_no_listener() -> None:
    """A wrap_async() that raises takes its aiomysql connect listener off again."""
    raw = sa_create_async_engine(MY_URL)
    with pytest.raises(resilient_db.ConfigurationError):
        resilient_db.wrap_async(raw, name=5)  # type: ignore[arg-type]
    assert 0 == len(raw.sync_engine.dialect.dispatch.do_connect)


async def test_postgres_defaults_applied(pg_url: str) -> None:
    """asyncpg and psycopg async sessions get statement_timeout and application_name."""
    for driver in ("asyncpg", "psycopg"):
        engine = resilient_db.create_async_engine(
            to_async(pg_url, driver), policy=policy(statement=12)
        )
        async with engine.connect() as c:
            shown = [
                (await c.execute(sa.text(f"SHOW {name}"))).scalar()
                for name in ("statement_timeout", "application_name")
            ]
        assert ["12s", "resilient-db"] == shown, driver
        await engine.dispose()


def test_aiomysql_and_aiosqlite_defaults() -> None:
    """aiomysql gets a connect timeout and program_name; aiosqlite SQLite's busy timeout."""
    my = driver_defaults(sa.make_url("mysql+aiomysql://app@db/shop"), resilient_db.DEFAULT_POLICY)
    lite = driver_defaults(sa.make_url("sqlite+aiosqlite:///x.db"), resilient_db.DEFAULT_POLICY)
    assert ({"connect_timeout": 2, "program_name": "resilient-db"}, {"timeout": 1.0}) == (my, lite)


async def test_mariadb_statement_timeout_from_policy(mariadb_url: str) -> None:
    """aiomysql sessions get max_statement_time; a slower query fails and does not count."""
    engine = resilient_db.create_async_engine(
        to_async(mariadb_url, "aiomysql"), policy=policy(statement=0.3, threshold=1)
    )
    async with engine.connect() as c:
        current = (await c.execute(sa.text("SELECT @@max_statement_time"))).scalar()
        with pytest.raises(sa.exc.OperationalError) as e:
            await c.execute(sa.text("SELECT SLEEP(2)"))
        assert 1 == (await c.execute(sa.text("SELECT 1"))).scalar()
    assert 0.3 == pytest.approx(current)
    assert ("statement_timeout", CLOSED) == (error_context(e.value).kind, breaker_of(engine).state)
    await engine.dispose()


async def test_startup_validation_runs_for_async_urls(pg_url: str) -> None:
    """validate='strict' checks an async URL from inside a running loop; a dead port raises."""
    engine = resilient_db.create_async_engine(
        to_async(pg_url, "asyncpg"), policy=policy(), validate="strict"
    )
    assert 1 == await select_one(engine)
    await engine.dispose()
    dead = sa.make_url(to_async(pg_url, "asyncpg")).set(port=1)
    with pytest.raises(resilient_db.ConfigurationError) as info:
        resilient_db.create_async_engine(dead, policy=policy(), validate="strict")
    assert "RDB2" in str(info.value)  # the network layer is the root cause


# -- connect faults ----------------------------------------------------------------------


async def test_refused_is_operational_error_with_context(async_server_url: str) -> None:
    """A refused connect (asyncpg: a bare ConnectionRefusedError) is an OperationalError."""
    url = sa.make_url(async_server_url).set(port=1)
    engine = resilient_db.create_async_engine(
        url, name="shop", policy=policy(attempts=3, threshold=5)
    )
    with pytest.raises(sa.exc.OperationalError) as info:
        await select_one(engine)
    ctx = error_context(info.value)
    assert ("shop", "connect", "refused", 3) == (ctx.engine, ctx.phase, ctx.kind, ctx.attempt)
    assert any("Nothing is accepting connections" in n for n in info.value.__notes__)
    await engine.dispose()


@pytest.mark.parametrize("driver", ["asyncpg", "aiomysql"])
async def test_unknown_host_is_a_dns_error(driver: str) -> None:
    """An unknown host (asyncpg: a bare socket.gaierror) is an OperationalError, not retried."""
    base = "postgresql://app@db.does-not-exist.invalid/shop"
    engine = resilient_db.create_async_engine(to_async(base, driver), policy=policy(attempts=3))
    with pytest.raises(sa.exc.OperationalError) as info:
        await select_one(engine)
    ctx = error_context(info.value)
    assert ("dns", 1, 0) == (ctx.kind, ctx.attempt, breaker_of(engine).failures)
    await engine.dispose()


async def test_silent_server_connect_times_out(async_server_url: str, proxy: FaultProxy) -> None:
    """A server that accepts and never greets fails the connect within the connect timeout."""
    engine = resilient_db.create_async_engine(via(async_server_url, proxy), policy=policy())
    proxy.blackhole()
    t0 = time.monotonic()
    with pytest.raises(sa.exc.OperationalError) as info:
        await abounded(select_one(engine), deadline="Timeouts.connect", unblock=proxy.reset_all)
    took = time.monotonic() - t0
    assert ("connect_timeout", "connect") == (
        error_context(info.value).kind,
        error_context(info.value).phase,
    )
    assert took < 3.5  # libpq rounds connect_timeout up to 2 s
    await engine.dispose()


async def test_backoff_sleeps_await_and_let_the_loop_run(
    async_server_url: str, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connect retries pause with asyncio.sleep (other tasks run), never time.sleep."""
    resilient_db.set_testing(False)
    slept: list[float] = []
    real_async_sleep = _backoff.async_sleep

    async def recording_sleep(seconds: float) -> None:
        slept.append(seconds)
        await real_async_sleep(seconds)

    monkeypatch.setattr(_backoff, "async_sleep", recording_sleep)
    monkeypatch.setattr(_backoff, "sleep", lambda s: pytest.fail("blocking sleep on the loop"))
    pol = policy(attempts=3, threshold=10)
    pol = Policy(
        timeouts=pol.timeouts,
        pool=pol.pool,
        retry=RetryPolicy(attempts=3, initial=0.05, max_backoff=0.05, deadline=5.0),
        breaker=pol.breaker,
        validate="off",
    )
    engine = resilient_db.create_async_engine(via(async_server_url, proxy), policy=pol)
    proxy.refuse()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    task = asyncio.create_task(ticker())
    with pytest.raises(sa.exc.OperationalError) as info:
        await select_one(engine)
    task.cancel()
    assert (3, ("refused",) * 3) == (
        error_context(info.value).attempt,
        tuple(h.split(":")[0] for h in error_context(info.value).history),
    )
    assert (2, True) == (len(slept), ticks > 0)
    await engine.dispose()


# -- faults on established connections ---------------------------------------------------


async def test_blackhole_mid_query_is_a_read_timeout(
    async_server_url: str, proxy: FaultProxy
) -> None:
    """A query into a silent network fails within Timeouts.call and its connection is dropped.

    A lost session does not count for the breaker (probes, which would judge the
    silence, are off here: tests/test_reachability.py covers them).
    """
    engine = resilient_db.create_async_engine(
        via(async_server_url, proxy), policy=policy(threshold=5, probe_after=None)
    )
    async with engine.connect() as c:
        await c.execute(sa.text("SELECT 1"))
        proxy.blackhole()
        t0 = time.monotonic()
        with pytest.raises(sa.exc.OperationalError) as info:
            await abounded(
                c.execute(sa.text("SELECT 2")),
                deadline="Timeouts.call (execute)",
                unblock=proxy.reset_all,
            )
        took = time.monotonic() - t0
    err = info.value
    assert ("read_timeout", "execute", True) == (
        error_context(err).kind,
        error_context(err).phase,
        err.connection_invalidated,
    )
    assert took < 0.5 + 1.0
    assert (0, 0) == (engine.sync_engine.pool.checkedout(), breaker_of(engine).failures)  # type: ignore[attr-defined]
    proxy.passthrough()
    before = proxy.connections_total
    assert 1 == await select_one(engine)
    assert before + 1 == proxy.connections_total  # a new connection, not the broken one
    await engine.dispose()


async def test_idle_ping_into_silence_fails_within_deadline(
    async_server_url: str, proxy: FaultProxy
) -> None:
    """The idle ping into silence gives up within its deadline; the reconnect then decides."""
    pool = PoolPolicy(ping_after_idle=0.0)
    engine = resilient_db.create_async_engine(
        via(async_server_url, proxy), policy=policy(threshold=1, pool=pool, probe_after=None)
    )
    assert 1 == await select_one(engine)
    proxy.blackhole()
    t0 = time.monotonic()
    with pytest.raises(sa.exc.OperationalError) as info:
        await abounded(
            select_one(engine), deadline="Timeouts.call (idle ping)", unblock=proxy.reset_all
        )
    took = time.monotonic() - t0
    assert "connect" == error_context(info.value).phase
    assert (0, 1) == (engine.sync_engine.pool.checkedout(), breaker_of(engine).failures)  # type: ignore[attr-defined]
    assert took < 0.5 + 2.0 + 0.5  # the ping, then one connect attempt (libpq: 2 s at least)
    await engine.dispose()


async def test_reset_mid_query_is_a_disconnect(async_server_url: str, proxy: FaultProxy) -> None:
    """A connection reset under a running query is a disconnect, not counted; the next works."""
    engine = resilient_db.create_async_engine(
        via(async_server_url, proxy), policy=policy(threshold=5)
    )
    async with engine.connect() as c:
        await c.execute(sa.text("SELECT 1"))
        asyncio.get_running_loop().call_later(0.2, proxy.reset_all)
        with pytest.raises(sa.exc.DBAPIError) as info:
            await c.execute(sa.text(sleep_sql(async_server_url, 2)))
    assert ("disconnect", True) == (
        error_context(info.value).kind,
        info.value.connection_invalidated,
    )
    assert 0 == breaker_of(engine).failures
    assert 1 == await select_one(engine)
    await engine.dispose()


async def test_killed_session_is_lost_and_replaced(
    async_server_url: str, admin: AsyncEngine
) -> None:
    """pg_terminate_backend / KILL of the session: a loss, not counted; the pool replaces it."""
    engine = resilient_db.create_async_engine(async_server_url, policy=policy(threshold=5))
    pg = is_pg(async_server_url)
    async with engine.connect() as c:
        pid = (
            await c.execute(sa.text("SELECT pg_backend_pid()" if pg else "SELECT CONNECTION_ID()"))
        ).scalar()
        async with admin.connect() as a:
            kill = f"SELECT pg_terminate_backend({pid})" if pg else f"KILL {pid}"
            await a.execute(sa.text(kill))
        await asyncio.sleep(0.1)  # let the server close the socket
        with pytest.raises(sa.exc.DBAPIError) as info:
            await c.execute(sa.text("SELECT 1"))
    # asyncpg reads the server's 57P01 notice before the query and reports "connection is closed"
    expected = {"asyncpg": "disconnect", "psycopg": "admin_terminated", "aiomysql": "disconnect"}
    driver = sa.make_url(async_server_url).get_driver_name()
    assert expected[driver] == error_context(info.value).kind
    assert (True, 0) == (info.value.connection_invalidated, breaker_of(engine).failures)
    assert 1 == await select_one(engine)
    await engine.dispose()


async def _two_rows(engine: AsyncEngine) -> str:
    table = f"rdb_async_{uuid.uuid4().hex[:10]}"
    async with engine.begin() as c:
        await c.execute(sa.text(f"CREATE TABLE {table} (id INT PRIMARY KEY, v INT)"))
        await c.execute(sa.text(f"INSERT INTO {table} VALUES (1, 0), (2, 0)"))
    return table


async def _drop(engine: AsyncEngine, table: str) -> None:
    async with engine.begin() as c:
        await c.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))


async def test_deadlock_is_classified_and_not_counted(async_server_url: str) -> None:
    """Two transactions locking rows in opposite order: one gets a deadlock, not counted."""
    engine = resilient_db.create_async_engine(
        async_server_url,
        policy=policy(threshold=1, call=5.0),  # PostgreSQL waits 1 s first
    )
    table = await _two_rows(engine)
    try:
        a, b = await engine.connect(), await engine.connect()
        await a.begin()
        await b.begin()
        await a.execute(sa.text(f"UPDATE {table} SET v = 1 WHERE id = 1"))
        await b.execute(sa.text(f"UPDATE {table} SET v = 1 WHERE id = 2"))

        async def cross(conn: AsyncConnection, row: int) -> None:
            await conn.execute(sa.text(f"UPDATE {table} SET v = 2 WHERE id = {row}"))

        results = await asyncio.gather(cross(a, 2), cross(b, 1), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for conn in (a, b):
            await conn.rollback()
            await conn.close()
        assert 1 == len(errors)
        assert "deadlock" == error_context(errors[0]).kind
        assert isinstance(errors[0], sa.exc.DBAPIError)
        assert (CLOSED, 0) == (breaker_of(engine).state, breaker_of(engine).failures)
    finally:
        await _drop(engine, table)
        await engine.dispose()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_serialization_failure_is_classified(pg_url: str, driver: str) -> None:
    """A REPEATABLE READ write conflict is a serialization_failure, retryable, not counted."""
    engine = resilient_db.create_async_engine(to_async(pg_url, driver), policy=policy(threshold=1))
    table = await _two_rows(engine)
    try:
        rr = await engine.connect()
        await rr.execution_options(isolation_level="REPEATABLE READ")
        await rr.begin()
        await rr.execute(sa.text(f"SELECT v FROM {table} WHERE id = 1"))
        async with engine.begin() as other:
            await other.execute(sa.text(f"UPDATE {table} SET v = 5 WHERE id = 1"))
        with pytest.raises(sa.exc.DBAPIError) as info:
            await rr.execute(sa.text(f"UPDATE {table} SET v = 6 WHERE id = 1"))
        await rr.rollback()
        await rr.close()
        ctx = error_context(info.value)
        assert ("serialization_failure", "transaction", "40001") == (ctx.kind, ctx.retry, ctx.code)
        assert CLOSED == breaker_of(engine).state
    finally:
        await _drop(engine, table)
        await engine.dispose()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_postgres_statement_timeout_is_classified(pg_url: str, driver: str) -> None:
    """A query over Timeouts.statement is cancelled by the server: statement_timeout, uncounted."""
    engine = resilient_db.create_async_engine(
        to_async(pg_url, driver), policy=policy(statement=0.3, call=5.0, threshold=1)
    )
    async with engine.connect() as c:
        with pytest.raises(sa.exc.DBAPIError) as info:
            await c.execute(sa.text("SELECT pg_sleep(2)"))
        await c.rollback()
        assert 1 == (await c.execute(sa.text("SELECT 1"))).scalar()
    ctx = error_context(info.value)
    assert ("statement_timeout", "57014", CLOSED) == (ctx.kind, ctx.code, breaker_of(engine).state)
    await engine.dispose()


async def test_sqlite_locked_is_a_lock_timeout(sqlite_url: str) -> None:
    """aiosqlite waits Timeouts.statement for a write lock, then raises lock_timeout."""
    engine = resilient_db.create_async_engine(
        to_async(sqlite_url, "aiosqlite"), policy=policy(statement=0.2, threshold=1)
    )
    async with engine.begin() as c:
        await c.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
    async with engine.connect() as holder, engine.connect() as other:
        await holder.exec_driver_sql("BEGIN IMMEDIATE")
        await holder.execute(sa.text("INSERT INTO t VALUES (1)"))
        with pytest.raises(sa.exc.OperationalError) as info:
            await other.execute(sa.text("INSERT INTO t VALUES (2)"))
        await holder.rollback()
    assert ("lock_timeout", "transaction") == (
        error_context(info.value).kind,
        error_context(info.value).retry,
    )
    await engine.dispose()


# -- the bounded pool --------------------------------------------------------------------


@pytest.fixture(params=["aiosqlite", "asyncpg", "psycopg", "aiomysql"])
def pool_url(request: pytest.FixtureRequest) -> str:
    """Every async driver, for the pool tests."""
    if request.param == "aiosqlite":
        return to_async(str(request.getfixturevalue("sqlite_url")), "aiosqlite")
    if request.param == "aiomysql":
        return to_async(str(request.getfixturevalue("mariadb_url")), "aiomysql")
    return to_async(str(request.getfixturevalue("pg_url")), request.param)


async def test_bulkhead_rejects_beyond_max_waiters_at_once(pool_url: str) -> None:
    """One connection held, one task waiting: the next caller is rejected at once."""
    pool = PoolPolicy(size=1, max_overflow=0, max_waiters=1, ping_after_idle=None)
    engine = resilient_db.create_async_engine(pool_url, policy=policy(pool=pool, checkout=5.0))
    r = resilience_of(engine)
    held = await engine.connect()
    waiter = asyncio.create_task(select_one(engine))
    while r.waiting != 1:
        await asyncio.sleep(0.005)
    with pytest.raises(PoolExhaustedError) as info:
        await engine.connect()
    assert isinstance(info.value, sa.exc.TimeoutError)
    assert "too many callers waiting" in str(info.value)
    await held.close()
    assert 1 == await waiter
    assert (0, 0, 0) == (
        r.waiting,
        engine.sync_engine.pool.checkedout(),
        breaker_of(engine).failures,
    )  # type: ignore[attr-defined]
    await engine.dispose()


async def test_checkout_timeout_is_pool_exhausted(pool_url: str) -> None:
    """Waiting longer than Timeouts.checkout raises PoolExhaustedError, not counted."""
    pool = PoolPolicy(size=1, max_overflow=0, max_waiters=4, ping_after_idle=None)
    engine = resilient_db.create_async_engine(pool_url, policy=policy(pool=pool, checkout=0.2))
    async with engine.connect():
        with pytest.raises(PoolExhaustedError) as info:
            await engine.connect()
    assert "checkout timed out" in str(info.value)
    assert ("pool_exhausted", 0) == (error_context(info.value).kind, breaker_of(engine).failures)
    assert 1 == await select_one(engine)
    await engine.dispose()


# -- the breaker -------------------------------------------------------------------------


async def test_breaker_trips_rejects_probes_and_closes(
    async_server_url: str, proxy: FaultProxy
) -> None:
    """Refused connects open it; open rejects without I/O; a good probe closes it."""
    clock = ManualClock()
    engine = resilient_db.create_async_engine(
        via(async_server_url, proxy), policy=policy(half_open=1), clock=clock
    )
    b = breaker_of(engine)
    proxy.refuse()
    for _ in range(2):
        with pytest.raises(sa.exc.OperationalError):
            await select_one(engine)
    assert OPEN == b.state
    clock.advance(1.5)
    total = proxy.connections_total
    for _ in range(20):
        with pytest.raises(CircuitOpenError) as rejected:
            await select_one(engine)
    ctx = error_context(rejected.value)
    assert ("circuit_open", 3.5, total) == (ctx.kind, ctx.retry_in, proxy.connections_total)
    assert "Nothing is accepting connections" in ctx.diagnosis
    proxy.passthrough()
    clock.advance(5.0)
    probe = await engine.connect()
    with pytest.raises(CircuitOpenError):  # one probe at a time
        await engine.connect()
    assert HALF_OPEN == b.state
    assert 1 == (await probe.execute(sa.text("SELECT 1"))).scalar()
    await probe.close()
    assert CLOSED == b.state
    assert 1 == await select_one(engine)
    await engine.dispose()


async def test_failed_probe_reopens(async_server_url: str, proxy: FaultProxy) -> None:
    """A half-open probe that fails opens the breaker again for a full reset timeout."""
    clock = ManualClock()
    engine = resilient_db.create_async_engine(
        via(async_server_url, proxy), policy=policy(), clock=clock
    )
    b = breaker_of(engine)
    proxy.refuse()
    for _ in range(2):
        with pytest.raises(sa.exc.OperationalError):
            await select_one(engine)
    clock.advance(5.0)
    with pytest.raises(sa.exc.OperationalError) as probe:
        await select_one(engine)
    assert ("refused", OPEN) == (error_context(probe.value).kind, b.state)
    with pytest.raises(CircuitOpenError) as rejected:
        await select_one(engine)
    assert 5.0 == error_context(rejected.value).retry_in
    await engine.dispose()


# -- health_async ------------------------------------------------------------------------


async def test_concurrent_health_pings_share_one_checkout(sqlite_url: str) -> None:
    """Concurrent health_async(ping=True) calls await one ping: one checkout, one verdict."""
    engine = resilient_db.create_async_engine(to_async(sqlite_url, "aiosqlite"), policy=policy())
    checkouts: list[int] = []
    sa.event.listen(engine.sync_engine, "checkout", lambda *_: checkouts.append(1))
    try:
        snaps = await asyncio.gather(
            *(resilient_db.health_async(engine, ping=True, timeout=5.0) for _ in range(3))
        )
        shared = len(checkouts)
        await resilient_db.health_async(engine, ping=True, timeout=5.0)  # after: a new ping
        assert ([True, True, True], 1, 2) == ([s.ping_ok for s in snaps], shared, len(checkouts))
    finally:
        await engine.dispose()


async def test_health_ping_joined_while_silent_makes_one_connect(pg_url: str) -> None:
    """Against a silent server a second caller joins the ping in flight: one connect attempt."""
    u = sa.make_url(to_async(pg_url, "asyncpg"))
    with FaultProxy(u.host or "127.0.0.1", u.port or 5432) as p:
        p.blackhole()
        engine = resilient_db.create_async_engine(via(str(u), p), policy=policy(connect=2.0))
        try:
            first, second = await asyncio.gather(
                resilient_db.health_async(engine, ping=True, timeout=0.2),
                resilient_db.health_async(engine, ping=True, timeout=1.0),
            )
            attempts = resilience_of(engine).connect_attempts
        finally:
            await engine.dispose()
    expected = ("ping failed: no answer within 0.2s",)
    assert ((False, expected), (False, expected), 1) == (
        (first.ping_ok, first.reasons),
        (second.ping_ok, second.reasons),
        attempts,
    )


# -- secrets -----------------------------------------------------------------------------


async def test_no_password_or_bind_value_in_errors(pg_url: str) -> None:
    """Neither the URL's password nor a bind parameter appears in errors or their context."""
    dead = sa.make_url(to_async(pg_url, "asyncpg")).set(port=1, password=SENTINEL)
    engine = resilient_db.create_async_engine(dead, policy=policy())
    with pytest.raises(sa.exc.OperationalError) as refused:
        await select_one(engine)
    await engine.dispose()
    engine = resilient_db.create_async_engine(to_async(pg_url, "asyncpg"), policy=policy())
    async with engine.connect() as c:
        with pytest.raises(sa.exc.DBAPIError) as bad:
            await c.execute(sa.text("SELECT CAST(:v AS integer)"), {"v": SENTINEL})
    await engine.dispose()
    for err in (refused.value, bad.value):
        text = " ".join(
            [
                "".join(traceback.format_exception(err)),
                repr(err),
                *getattr(err, "__notes__", ()),
                str(error_context(err).to_dict()),
            ]
        )
        assert SENTINEL not in text
