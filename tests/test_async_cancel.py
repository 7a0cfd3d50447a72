"""Cancellation is never a failure: not counted, not retried, no leaked or broken connection."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

import resilient_db
from resilient_db import PoolPolicy, breaker_of
from resilient_db.breaker import CLOSED, HALF_OPEN
from resilient_db.engine import resilience_of
from resilient_db.testing import ManualClock
from resilient_db.testing.proxy import FaultProxy
from tests.test_async import is_pg, policy, select_one, sleep_sql, to_async, via


@pytest.fixture(params=["asyncpg", "psycopg", "aiomysql"])
def async_server_url(request: pytest.FixtureRequest) -> str:
    """The PostgreSQL (asyncpg, psycopg async) and MariaDB (aiomysql) test servers."""
    driver = request.param
    base = "mariadb_url" if driver == "aiomysql" else "pg_url"
    return to_async(str(request.getfixturevalue(base)), driver)


@pytest.fixture
def proxy(async_server_url: str) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the server ``async_server_url`` names."""
    u = sa.make_url(async_server_url)
    with FaultProxy(u.host or "127.0.0.1", u.port or 5432) as p:
        yield p


@pytest.fixture
async def admin(async_server_url: str) -> AsyncIterator[AsyncEngine]:
    """A plain SQLAlchemy async engine on the same server, for looking at sessions."""
    engine = sa_create_async_engine(async_server_url)
    yield engine
    await engine.dispose()


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> bool:
    """Poll ``check`` until it is true or ``timeout`` s have passed; return whether it was."""
    end = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.01)
    return True


def queries_running(
    admin: AsyncEngine, url: str, tag: str, n: int = 1
) -> Callable[[], Awaitable[bool]]:
    """A check: at least ``n`` statements containing ``tag`` are executing on the server."""
    sql = (
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
        "AND pid <> pg_backend_pid() AND query LIKE :tag"
        if is_pg(url)
        else "SELECT count(*) FROM information_schema.processlist WHERE command = 'Query' "
        "AND id <> CONNECTION_ID() AND info LIKE :tag"
    )

    async def check() -> bool:
        async with admin.connect() as a:  # a new transaction: a fresh pg_stat_activity
            return int((await a.execute(sa.text(sql), {"tag": f"%{tag}%"})).scalar_one()) >= n

    return check


def connect_in_flight(proxy: FaultProxy) -> Callable[[], Awaitable[bool]]:
    """A check: the proxy has accepted a new connection (the client awaits the greeting)."""
    before = proxy.connections_total

    async def check() -> bool:
        return proxy.connections_total > before

    return check


async def cancel_while_running(coro: Any, running: Callable[[], Awaitable[bool]]) -> None:
    """Start ``coro`` as a task, cancel it once ``running`` says so, check it ends cancelled."""
    task = asyncio.ensure_future(coro)
    started = await wait_for(running)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert started, "the call never got under way"


async def test_cancelled_query_is_not_a_failure(async_server_url: str, admin: AsyncEngine) -> None:
    """A query cancelled mid-flight leaves a threshold-1 breaker closed and the pool healthy."""
    engine = resilient_db.create_async_engine(async_server_url, policy=policy(threshold=1, call=5))
    r = resilience_of(engine)
    tag = f"rdb_cancel_{uuid.uuid4().hex[:10]}"

    async def slow() -> None:
        async with engine.connect() as c:
            await c.execute(sa.text(f"{sleep_sql(async_server_url, 3)} /* {tag} */"))

    await cancel_while_running(slow(), queries_running(admin, async_server_url, tag))
    snap = breaker_of(engine).snapshot()
    assert (CLOSED, 0, None) == (snap.state, snap.failures, r.last_error)
    assert 0 == engine.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
    assert 1 == await select_one(engine)
    await engine.dispose()


async def test_cancelled_connect_is_not_counted_or_retried(
    async_server_url: str, proxy: FaultProxy
) -> None:
    """A connect cancelled while the server is silent is neither retried nor counted."""
    engine = resilient_db.create_async_engine(
        via(async_server_url, proxy), policy=policy(threshold=1, attempts=3, connect=5)
    )
    r = resilience_of(engine)
    proxy.blackhole()
    await cancel_while_running(select_one(engine), connect_in_flight(proxy))
    assert (1, 0, CLOSED) == (r.connect_attempts, breaker_of(engine).failures, r.breaker.state)  # type: ignore[union-attr]
    pool = engine.sync_engine.pool
    assert (0, -pool.size()) == (pool.checkedout(), pool.overflow())  # type: ignore[attr-defined]
    if sa.make_url(async_server_url).get_driver_name() != "psycopg":
        # psycopg's half-made connection is left to the garbage collector, as with a raw
        # create_async_engine (docs/async.md); the other drivers close it at once
        for _ in range(100):
            if proxy.active_connections == 0:
                break
            await asyncio.sleep(0.02)
        assert 0 == proxy.active_connections
    proxy.passthrough()
    assert 1 == await select_one(engine)
    await engine.dispose()


async def test_cancelled_half_open_probe_frees_its_slot(
    async_server_url: str, proxy: FaultProxy
) -> None:
    """Cancelling the one half-open probe lets the next caller probe instead of wedging."""
    clock = ManualClock()
    engine = resilient_db.create_async_engine(
        via(async_server_url, proxy), policy=policy(connect=5), clock=clock
    )
    b = breaker_of(engine)
    proxy.refuse()
    for _ in range(2):
        with pytest.raises(sa.exc.OperationalError):
            await select_one(engine)
    clock.advance(5.0)
    proxy.blackhole()
    await cancel_while_running(select_one(engine), connect_in_flight(proxy))
    assert (HALF_OPEN, 0, 0) == (b.state, b.snapshot().probes_in_flight, b.rejected)
    proxy.passthrough()
    assert 1 == await select_one(engine)  # admitted as the probe, and it closes the breaker
    assert CLOSED == b.state
    await engine.dispose()


async def test_cancelling_100_tasks_mid_query_leaks_nothing(
    async_server_url: str, admin: AsyncEngine
) -> None:
    """100 tasks cancelled mid-query (10 running, 90 waiting): pool empty, next 100 succeed."""
    pool = PoolPolicy(size=10, max_overflow=0, max_waiters=100, ping_after_idle=None)
    engine = resilient_db.create_async_engine(
        async_server_url, policy=policy(pool=pool, checkout=10, call=10, threshold=1)
    )
    sync_pool = engine.sync_engine.pool
    r = resilience_of(engine)
    pg = is_pg(async_server_url)
    sessions: set[int] = set()
    tag = f"rdb_cancel100_{uuid.uuid4().hex[:10]}"

    @event.listens_for(engine.sync_engine, "connect")
    def remember(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT pg_backend_pid()" if pg else "SELECT CONNECTION_ID()")
        sessions.add(int(cursor.fetchone()[0]))
        cursor.close()

    async def sleeper() -> None:
        async with engine.connect() as c:
            await c.execute(sa.text(f"{sleep_sql(async_server_url, 1)} /* {tag} */"))

    tasks = [asyncio.create_task(sleeper()) for _ in range(100)]
    for _ in range(500):  # until 10 are in the database and 90 wait for the pool
        if (sync_pool.checkedout(), r.waiting) == (10, 90):  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.01)
    assert (10, 90) == (sync_pool.checkedout(), r.waiting)  # type: ignore[attr-defined]
    # the 10 queries are executing on the server
    assert await wait_for(queries_running(admin, async_server_url, tag, n=10))
    for t in tasks:
        t.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert [asyncio.CancelledError] * 100 == [type(o) for o in outcomes]
    assert (0, 0, 0) == (sync_pool.checkedout(), r.waiting, breaker_of(engine).failures)  # type: ignore[attr-defined]

    async def echo(i: int) -> Any:
        async with engine.connect() as c:
            return (await c.execute(sa.text("SELECT CAST(:i AS INTEGER)"), {"i": i})).scalar()

    assert list(range(100)) == await asyncio.gather(*(echo(i) for i in range(100)))
    assert 0 == sync_pool.checkedout()  # type: ignore[attr-defined]
    await engine.dispose()
    assert 10 <= len(sessions)
    ids = ", ".join(str(s) for s in sessions)
    count = (
        f"SELECT count(*) FROM pg_stat_activity WHERE pid IN ({ids})"
        if pg
        else f"SELECT count(*) FROM information_schema.PROCESSLIST WHERE ID IN ({ids})"
    )
    left = -1
    for _ in range(60):  # a cancelled pg_sleep(1) ends within a second, then its session
        async with admin.connect() as a:
            left = (await a.execute(sa.text(count))).scalar_one()
        if left == 0:
            break
        await asyncio.sleep(0.1)
    assert 0 == left  # every server session the engine opened is gone after dispose()
