"""Timeouts.call on every watched driver: server-side cursor fetches, asyncpg, connection set-up.

A :class:`~resilient_db.testing.FaultProxy` in front of the real PostgreSQL and
MariaDB goes silent (blackhole) in the middle of a call; the watchdog must end
the call within the deadline, classify it ``read_timeout`` and discard the
connection, and the engine must work again once the network is back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

import resilient_db
from resilient_db import (
    BreakerPolicy,
    Policy,
    PoolPolicy,
    RetryPolicy,
    Timeouts,
    error_context,
)
from resilient_db._deadline import slot_of
from resilient_db.engine import driver_defaults
from resilient_db.testing.proxy import FaultProxy
from tests.bounded import abounded, bounded

CALL = 0.5  # the per-call deadline of these tests
BOUND = 3.0  # a failing call must end well before this (the watchdog ticks every 50 ms)

ASYNC = {
    "asyncpg": "postgresql+asyncpg",
    "psycopg": "postgresql+psycopg",
    "aiomysql": "mysql+aiomysql",
}
SYNC = {"psycopg": "postgresql+psycopg", "psycopg2": "postgresql+psycopg2"}

# PostgreSQL server-side cursors send rows only when fetched; MariaDB streams the whole
# result, so its rows are wide enough that the socket buffers cannot hold what is asked for
ROWS = {
    "postgresql": "SELECT g FROM generate_series(1, 1000000) g",
    "mysql": "SELECT REPEAT('x', 1000) FROM seq_1_to_1000000",
}


def policy(call: float = CALL) -> Policy:
    """Short deadlines, one connect attempt, a breaker that stays closed, no idle ping."""
    return Policy(
        timeouts=Timeouts(connect=2.0, checkout=1.0, statement=30.0, call=call),
        pool=PoolPolicy(ping_after_idle=None),
        retry=RetryPolicy(attempts=1, deadline=5.0),
        # no silence probes: their extra connections would race the counts asserted here
        breaker=BreakerPolicy(failure_threshold=10, probe_after=None),
        validate="off",
    )


def url_for(base: str, drivername: str, p: FaultProxy) -> str:
    """``base`` with ``drivername``, connecting through the proxy."""
    u = sa.make_url(base).set(drivername=drivername, host=p.host, port=p.port)
    return u.render_as_string(hide_password=False)


def server_of(request: pytest.FixtureRequest, driver: str) -> str:
    """The test server's URL for ``driver``."""
    return str(request.getfixturevalue("mariadb_url" if driver == "aiomysql" else "pg_url"))


@pytest.fixture
def proxy(request: pytest.FixtureRequest) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the server of the test's ``driver`` parameter."""
    u = sa.make_url(server_of(request, request.node.callspec.params["driver"]))
    with FaultProxy(u.host or "127.0.0.1", u.port or 5432) as p:
        yield p


async def select_one(engine: AsyncEngine) -> Any:
    """One round trip on a pooled connection."""
    async with engine.connect() as c:
        return (await c.execute(sa.text("SELECT 1"))).scalar()


async def recovers(engine: AsyncEngine, p: FaultProxy) -> tuple[int, Any, int]:
    """Checked-out count after a failure; then, network back: a query's result, new sockets."""
    checked_out = engine.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
    p.passthrough()
    before = p.connections_total
    return checked_out, await select_one(engine), p.connections_total - before


# -- server-side cursor fetches ------------------------------------------------------------


@pytest.mark.parametrize("driver", list(ASYNC))
async def test_stream_fetch_into_silence_is_a_read_timeout(
    request: pytest.FixtureRequest, driver: str, proxy: FaultProxy
) -> None:
    """A stream() fetch into a silent network fails within Timeouts.call; the pool recovers."""
    url = url_for(server_of(request, driver), ASYNC[driver], proxy)
    engine = resilient_db.create_async_engine(url, policy=policy())
    async with engine.connect() as c:
        rows = await c.stream(
            sa.text(ROWS[engine.dialect.name]), execution_options={"yield_per": 10}
        )
        assert 10 == len(await rows.fetchmany(10))
        proxy.blackhole()
        t0 = time.monotonic()
        with pytest.raises(sa.exc.OperationalError) as info:
            await abounded(
                rows.fetchmany(200_000),
                deadline="Timeouts.call (stream fetch)",
                unblock=proxy.reset_all,
            )
        took = time.monotonic() - t0
    assert ("read_timeout", True) == (
        error_context(info.value).kind,
        info.value.connection_invalidated,
    )
    assert took < BOUND
    assert (0, 1, 1) == await recovers(engine, proxy)
    await engine.dispose()


@pytest.mark.parametrize("driver", list(SYNC))
def test_stream_results_fetch_into_silence_is_a_read_timeout(
    pg_url: str, driver: str, proxy: FaultProxy
) -> None:
    """A stream_results fetch of a sync engine into silence fails within the deadline."""
    engine = resilient_db.create_engine(url_for(pg_url, SYNC[driver], proxy), policy=policy())
    with engine.connect() as c:
        rows = c.execution_options(stream_results=True, max_row_buffer=10).execute(
            sa.text(ROWS["postgresql"])
        )
        assert 10 == len(rows.fetchmany(10))
        proxy.blackhole()
        t0 = time.monotonic()
        with pytest.raises(sa.exc.OperationalError) as info:
            bounded(
                lambda: rows.fetchmany(200_000),
                deadline="Timeouts.call (stream_results fetch)",
                unblock=proxy.reset_all,
            )
        took = time.monotonic() - t0
    assert ("read_timeout", True) == (
        error_context(info.value).kind,
        info.value.connection_invalidated,
    )
    assert took < BOUND
    queue: Any = engine.pool
    checked_out = queue.checkedout()
    proxy.passthrough()
    with engine.connect() as c:
        assert (0, 1) == (checked_out, c.execute(sa.text("SELECT 1")).scalar())
    engine.dispose()


async def test_stream_fetches_that_finish_leave_no_deadline_armed(pg_url: str) -> None:
    """A stream() read to its end leaves the slot disarmed and the connection pooled."""
    engine = resilient_db.create_async_engine(
        sa.make_url(pg_url).set(drivername=ASYNC["asyncpg"]), policy=policy()
    )
    async with engine.connect() as c:
        rows = await c.stream(
            sa.text("SELECT g FROM generate_series(1, 25) g"), execution_options={"yield_per": 10}
        )
        got = [r[0] async for r in rows]
        slot = slot_of(c.sync_connection)
    assert slot is not None
    assert (list(range(1, 26)), 0.0, False) == (got, slot.deadline, slot.fired)
    assert 1 == await select_one(engine)
    await engine.dispose()


# -- asyncpg: the watchdog instead of command_timeout ---------------------------------------


def test_asyncpg_gets_no_command_timeout_by_default() -> None:
    """driver_defaults() leaves command_timeout out: Timeouts.call is the watchdog's."""
    args = driver_defaults(sa.make_url("postgresql+asyncpg://app@db/shop"), policy())
    assert (2.0, False) == (args["timeout"], "command_timeout" in args)


@pytest.mark.parametrize("driver", ["asyncpg"])
async def test_asyncpg_execute_into_silence_is_cut_by_the_watchdog(
    pg_url: str, driver: str, proxy: FaultProxy
) -> None:
    """The watchdog ends the call; its connection goes at once, no 2 s "graceful" close."""
    engine = resilient_db.create_async_engine(
        url_for(pg_url, ASYNC[driver], proxy), policy=policy()
    )
    async with engine.connect() as c:
        await c.execute(sa.text("SELECT 1"))
        raw = await c.get_raw_connection()
        command_timeout = raw.driver_connection._config.command_timeout  # type: ignore[union-attr]
        proxy.blackhole()
        t0 = time.monotonic()
        with pytest.raises(sa.exc.OperationalError) as info:
            await abounded(
                c.execute(sa.text("SELECT 2")),
                deadline="Timeouts.call (asyncpg execute)",
                unblock=proxy.reset_all,
            )
    took = time.monotonic() - t0  # the failed call and the close of its connection
    assert (None, "read_timeout", "execute") == (
        command_timeout,
        error_context(info.value).kind,
        error_context(info.value).phase,
    )
    assert took < CALL + 1.0
    assert (0, 1, 1) == await recovers(engine, proxy)
    await engine.dispose()


@pytest.mark.parametrize("driver", ["asyncpg"])
async def test_asyncpg_command_timeout_given_by_the_caller_wins(
    pg_url: str, driver: str, proxy: FaultProxy
) -> None:
    """With connect_args command_timeout, asyncpg bounds calls by it, not by Timeouts.call."""
    engine = resilient_db.create_async_engine(
        url_for(pg_url, ASYNC[driver], proxy),
        policy=policy(call=0.2),
        connect_args={"command_timeout": 1.5},
    )
    async with engine.connect() as c:
        await c.execute(sa.text("SELECT 1"))
        watched = slot_of(c.sync_connection) is not None
        proxy.blackhole()
        t0 = time.monotonic()
        with pytest.raises(sa.exc.OperationalError) as info:
            await abounded(
                c.execute(sa.text("SELECT 2")),
                deadline="asyncpg command_timeout",
                unblock=proxy.reset_all,
            )
    took = time.monotonic() - t0  # the failed call and the close of its connection
    assert (False, "read_timeout") == (watched, error_context(info.value).kind)
    assert 1.4 < took < 1.5 + 1.0
    assert (0, 1, 1) == await recovers(engine, proxy)
    await engine.dispose()


# -- the connection's set-up --------------------------------------------------------------


@pytest.mark.parametrize("driver", list(ASYNC))
async def test_connection_setup_into_silence_is_bounded(
    request: pytest.FixtureRequest, driver: str, proxy: FaultProxy
) -> None:
    """Silence right after login: the set-up queries fail within the deadline, nothing leaks."""
    url = url_for(server_of(request, driver), ASYNC[driver], proxy)
    engine = resilient_db.create_async_engine(url, policy=policy())

    def go_silent(dbapi_connection: Any, record: Any) -> None:
        proxy.blackhole()

    # before SQLAlchemy's own listeners: its first-connect initialize() and the codecs
    event.listen(engine.sync_engine, "connect", go_silent, insert=True)
    t0 = time.monotonic()
    with pytest.raises(sa.exc.OperationalError) as info:
        await abounded(
            select_one(engine),
            deadline="Timeouts.call (connection set-up)",
            unblock=proxy.reset_all,
        )
    took = time.monotonic() - t0
    event.remove(engine.sync_engine, "connect", go_silent)
    ctx = error_context(info.value)
    assert ("read_timeout", "connect") == (ctx.kind, ctx.phase)
    assert took < BOUND
    assert (0, 1, 1) == await recovers(engine, proxy)
    await engine.dispose()


def test_failed_setup_disarms_its_deadline(pg_url: str) -> None:
    """A connect listener that fails during set-up: the set-up deadline and context end."""
    from resilient_db._deadline import SETTING_UP as _SETTING_UP

    engine = resilient_db.create_engine(pg_url, policy=policy())
    slots: list[Any] = []

    def boom(dbapi_connection: Any, record: Any) -> None:
        if not slots:
            slots.append(slot_of(record))
            dbapi_connection.cursor().execute("SELECT 1/0")  # a DBAPI error in the set-up

    event.listen(engine, "connect", boom, insert=True)  # before resilient_db's last listener
    with pytest.raises(sa.exc.DataError):
        engine.connect()
    (slot,) = slots
    armed_after_failure = (slot.deadline, _SETTING_UP.get())
    with engine.connect() as c:
        answer = c.execute(sa.text("SELECT 1")).scalar()
    assert ((0.0, None), 1) == (armed_after_failure, answer)
    engine.dispose()
