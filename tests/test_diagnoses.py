"""Diagnoses that stay right: lock waits, a fast restart, a killed session (issue 15).

Lock waits end before the statement timeout by default (PostgreSQL ``lock_timeout``,
InnoDB ``innodb_lock_wait_timeout``: half of ``Timeouts.statement``), are classified
``lock_timeout`` and replayed by a unit of work; a statement timeout that struck
while the statement waited for a lock is diagnosed as a lock wait too. A pooled
connection that died in a fast restart, and a session killed by another, are
explained as such, without advice that does not fit.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine
from sqlalchemy.ext.asyncio import create_async_engine

import resilient_db
from resilient_db import (
    Kind,
    Policy,
    PoolPolicy,
    RetryLevel,
    RetryPolicy,
    Target,
    Timeouts,
    classify,
    error_context,
    run_transaction,
)
from tests.servers import PgServer

#: statement timeout 2 s: the default lock wait is then 1 s
POLICY = Policy(
    timeouts=Timeouts(connect=3, checkout=2, statement=2, call=10),
    pool=PoolPolicy(size=2, max_overflow=2, ping_after_idle=None),
    retry=RetryPolicy(attempts=1),
    validate="off",
)


def _raised(fn: Callable[[], object]) -> BaseException:
    try:
        fn()
    except Exception as e:
        return e
    raise AssertionError("nothing was raised")


@pytest.fixture
def pg_table(pg_url: str) -> Iterator[str]:
    """A scratch table ``(id int primary key, v text)`` with row 1 on the shared PostgreSQL."""
    name = f"rdb_lock_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(pg_url)
    with admin.begin() as c:
        c.execute(sa.text(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)"))
        c.execute(sa.text(f"INSERT INTO {name} VALUES (1, 'a')"))
    yield name
    with admin.begin() as c:
        c.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
    admin.dispose()


@pytest.fixture
def my_table(mariadb_url: str) -> Iterator[str]:
    """A scratch InnoDB table ``(id int primary key, v text)`` with row 1 on the shared MariaDB."""
    name = f"rdb_lock_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(mariadb_url)
    with admin.begin() as c:
        c.execute(sa.text(f"CREATE TABLE {name} (id int PRIMARY KEY, v text) ENGINE=InnoDB"))
        c.execute(sa.text(f"INSERT INTO {name} VALUES (1, 'a')"))
    yield name
    with admin.begin() as c:
        c.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
    admin.dispose()


def _url(base: str, driver: str) -> URL:
    return sa.make_url(base).set(drivername=driver)


def _blocked_update(engine: Engine, table: str) -> tuple[BaseException, float]:
    """Update row 1 while another transaction holds it; return the error and the wait."""
    with engine.connect() as holder, engine.connect() as waiter:
        holder.execute(sa.text(f"UPDATE {table} SET v = 'held' WHERE id = 1"))
        t0 = time.monotonic()
        exc = _raised(lambda: waiter.execute(sa.text(f"UPDATE {table} SET v = 'x' WHERE id = 1")))
        waited = time.monotonic() - t0
        holder.rollback()
    return exc, waited


@pytest.mark.parametrize(
    ("driver", "setting", "shown"),
    [
        ("postgresql+psycopg", "SHOW lock_timeout", "1s"),
        ("postgresql+psycopg2", "SHOW lock_timeout", "1s"),
        ("mysql+pymysql", "SELECT @@innodb_lock_wait_timeout", 1),
    ],
)
def test_lock_wait_ends_before_the_statement_timeout(
    driver: str, setting: str, shown: object, request: pytest.FixtureRequest
) -> None:
    """By default a lock wait ends after half the statement timeout, as a retryable lock_timeout."""
    pg = driver.startswith("postgresql")
    base = request.getfixturevalue("pg_url" if pg else "mariadb_url")
    table = request.getfixturevalue("pg_table" if pg else "my_table")
    engine = resilient_db.create_engine(_url(base, driver), policy=POLICY)
    try:
        with engine.connect() as c:
            assert shown == c.execute(sa.text(setting)).scalar()
        exc, waited = _blocked_update(engine, table)
    finally:
        engine.dispose()
    ctx = error_context(exc)
    assert ctx is not None
    assert ("lock_timeout", "transaction") == (ctx.kind, ctx.retry)
    assert "waiting for a lock" in ctx.diagnosis
    assert ("pg_blocking_pids" if pg else "innodb_trx") in ctx.diagnosis
    assert 0.9 <= waited < 1.9, f"the lock wait took {waited:.2f}s"


async def test_asyncpg_lock_wait_ends_before_the_statement_timeout(
    pg_url: str, pg_table: str
) -> None:
    """asyncpg sessions get lock_timeout too (server_settings)."""
    engine = resilient_db.create_async_engine(_url(pg_url, "postgresql+asyncpg"), policy=POLICY)
    try:
        async with engine.connect() as holder, engine.connect() as waiter:
            assert "1s" == (await waiter.execute(sa.text("SHOW lock_timeout"))).scalar()
            await holder.execute(sa.text(f"UPDATE {pg_table} SET v = 'held' WHERE id = 1"))
            with pytest.raises(sa.exc.DBAPIError) as info:
                await waiter.execute(sa.text(f"UPDATE {pg_table} SET v = 'x' WHERE id = 1"))
            await holder.rollback()
    finally:
        await engine.dispose()
    ctx = error_context(info.value)
    assert ctx is not None
    assert ("lock_timeout", "55P03") == (ctx.kind, ctx.code)


def test_unit_of_work_replays_a_lock_wait(pg_url: str, pg_table: str) -> None:
    """A unit of work whose lock wait timed out is replayed and succeeds once the lock is free."""
    engine = resilient_db.create_engine(pg_url, policy=POLICY)
    attempts: list[int] = []
    admin = sa.create_engine(pg_url)
    holder = admin.connect()
    holder.execute(sa.text(f"UPDATE {pg_table} SET v = 'held' WHERE id = 1"))

    def release() -> None:
        time.sleep(1.3)  # a server-side timer decides the first attempt: no clock to inject
        holder.rollback()

    def unit(conn: sa.Connection) -> None:
        attempts.append(1)
        conn.execute(sa.text(f"UPDATE {pg_table} SET v = 'done' WHERE id = 1"))

    releaser = threading.Thread(target=release)
    releaser.start()
    try:
        run_transaction(engine, unit, policy=RetryPolicy(attempts=3))
    finally:
        releaser.join()
        holder.close()
        admin.dispose()
        engine.dispose()
    check = sa.create_engine(pg_url)
    with check.connect() as c:
        value = c.execute(sa.text(f"SELECT v FROM {pg_table} WHERE id = 1")).scalar()
    check.dispose()
    assert (2, "done") == (len(attempts), value)


def test_caller_lock_settings_win(pg_url: str, mariadb_url: str) -> None:
    """A lock_timeout in the caller's options, or in the caller's init_command, wins."""
    pg = resilient_db.create_engine(
        pg_url, policy=POLICY, connect_args={"options": "-c lock_timeout=7000"}
    )
    my = resilient_db.create_engine(
        mariadb_url,
        policy=POLICY,
        connect_args={"init_command": "SET SESSION innodb_lock_wait_timeout = 7"},
    )
    try:
        with pg.connect() as a, my.connect() as b:
            got = (
                a.execute(sa.text("SHOW lock_timeout")).scalar(),
                b.execute(sa.text("SELECT @@innodb_lock_wait_timeout")).scalar(),
            )
    finally:
        pg.dispose()
        my.dispose()
    assert ("7s", 7) == got


@pytest.mark.parametrize("driver", ["postgresql+psycopg", "postgresql+psycopg2"])
def test_statement_timeout_in_a_lock_wait_is_a_lock_wait(
    driver: str, pg_url: str, pg_table: str
) -> None:
    """With lock_timeout off, the statement timeout ending a lock wait is diagnosed as one."""
    engine = resilient_db.create_engine(
        _url(pg_url, driver), policy=POLICY, connect_args={"options": "-c lock_timeout=0"}
    )
    try:
        exc, _ = _blocked_update(engine, pg_table)
    finally:
        engine.dispose()
    ctx = error_context(exc)
    assert ctx is not None
    assert ("lock_timeout", "transaction", "57014") == (ctx.kind, ctx.retry, ctx.code)
    assert (
        "The statement timeout cancelled the statement while it waited for a lock "
        f'on a row of "{pg_table}"' in ctx.diagnosis
    )


async def test_asyncpg_statement_timeout_in_a_lock_wait_is_a_lock_wait(
    pg_url: str, pg_table: str
) -> None:
    """asyncpg keeps the CONTEXT line in an attribute: it is read there."""
    engine = create_async_engine(_url(pg_url, "postgresql+asyncpg"))
    try:
        async with engine.connect() as holder, engine.connect() as waiter:
            await waiter.execute(sa.text("SET statement_timeout = 300"))
            await holder.execute(sa.text(f"UPDATE {pg_table} SET v = 'held' WHERE id = 1"))
            with pytest.raises(sa.exc.DBAPIError) as info:
                await waiter.execute(sa.text(f"UPDATE {pg_table} SET v = 'x' WHERE id = 1"))
            await holder.rollback()
    finally:
        await engine.dispose()
    c = classify(info.value, target=Target(dialect="postgresql"))
    assert (Kind.LOCK_TIMEOUT, RetryLevel.TRANSACTION) == (c.kind, c.retry)
    assert f'a lock on a row of "{pg_table}"' in c.diagnosis


def test_a_plain_statement_timeout_stays_one(pg_url: str) -> None:
    """A slow statement that waited on no lock is still a statement timeout."""
    engine = resilient_db.create_engine(
        pg_url, policy=POLICY, connect_args={"options": "-c statement_timeout=200"}
    )
    try:
        exc = _raised(lambda: engine.connect().execute(sa.text("SELECT pg_sleep(5)")))
    finally:
        engine.dispose()
    ctx = error_context(exc)
    assert ctx is not None
    assert ("statement_timeout", "never") == (ctx.kind, ctx.retry)


# --------------------------------------------------------------------------- restart, kill


def test_fast_restart_says_the_pooled_connection_died(throwaway_pg: PgServer) -> None:
    """The first statement on a pooled connection after a fast restart: the restart and the
    refreshed pool are named, and the next call works."""
    url = URL.create(
        "postgresql+psycopg", "postgres", None, throwaway_pg.host, throwaway_pg.port, "postgres"
    )
    no_pings = Policy(
        timeouts=POLICY.timeouts,
        pool=PoolPolicy(size=1, max_overflow=0, ping_after_idle=60),
        retry=RetryPolicy(attempts=1),
        validate="off",
    )
    engine = resilient_db.create_engine(url, policy=no_pings)
    try:
        with engine.connect() as c:
            c.execute(sa.text("SELECT 1"))
        throwaway_pg.restart("fast")
        with engine.connect() as c:
            exc = _raised(lambda: c.execute(sa.text("SELECT 1")))
        with engine.connect() as c:
            after = c.execute(sa.text("SELECT 1")).scalar()
    finally:
        engine.dispose()
    ctx = error_context(exc)
    assert ctx is not None
    assert ("admin_terminated", "57P01", 1) == (ctx.kind, ctx.code, after)
    assert "a pooled connection that died in a fast restart" in ctx.diagnosis
    assert "the pool was refreshed" in ctx.diagnosis


def _kill_pg(engine: Engine, admin_url: str) -> BaseException:
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as c:
            pid = c.execute(sa.text("SELECT pg_backend_pid()")).scalar()
            with admin.connect() as a:
                a.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            return _raised(lambda: c.execute(sa.text("SELECT 1")))
    finally:
        admin.dispose()


def _kill_my(engine: Engine, admin_url: str) -> BaseException:
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as c:
            cid = int(c.execute(sa.text("SELECT CONNECTION_ID()")).scalar())  # type: ignore[arg-type]
            with admin.connect() as a:
                a.execute(sa.text(f"KILL {cid}"))
            return _raised(lambda: c.execute(sa.text("SELECT 1")))
    finally:
        admin.dispose()


@pytest.mark.parametrize(
    ("driver", "kill", "fixture"),
    [
        ("postgresql+psycopg2", _kill_pg, "pg_url"),
        ("mysql+pymysql", _kill_my, "mariadb_url"),
    ],
)
def test_killed_session_names_the_kill(
    driver: str, kill: Callable[[Engine, str], BaseException], fixture: str, request: Any
) -> None:
    """KILL / pg_terminate_backend (seen as a bare lost connection) lists the kill among the
    causes and gives no pool_pre_ping advice."""
    base = request.getfixturevalue(fixture)
    engine = resilient_db.create_engine(_url(base, driver), policy=POLICY)
    try:
        exc = kill(engine, base)
    finally:
        engine.dispose()
    ctx = error_context(exc)
    assert ctx is not None
    assert ("disconnect", "transaction") == (ctx.kind, ctx.retry)
    assert "the session was killed (KILL / pg_terminate_backend)" in ctx.diagnosis
    assert "pool_pre_ping" not in ctx.diagnosis


# --------------------------------------------------------------------------- breaker, logs


def test_forced_open_breaker_does_not_claim_repeated_failures(sqlite_url: str) -> None:
    """A breaker an operator forced open rejects calls without blaming failures that never were."""
    engine = resilient_db.create_engine(sqlite_url, validate="off")
    try:
        resilient_db.breaker_of(engine).force_open()
        exc = _raised(engine.connect)
    finally:
        engine.dispose()
    assert isinstance(exc, resilient_db.CircuitOpenError)
    ctx = error_context(exc)
    assert ctx is not None
    assert "repeated failures" not in ctx.diagnosis
    assert "was forced open by an operator" in ctx.diagnosis


class _SteppingClock:
    """A clock that moves 2.5 s each time it is read: a connect that takes time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 2.5
        return self.now


def test_a_slow_single_connect_attempt_is_not_logged_as_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A connect that failed on its only attempt after a wait logs the real time it took."""
    from tests.servers import free_port

    caplog.set_level(logging.WARNING, logger="resilient_db")
    url = URL.create("postgresql+psycopg", "app", None, "127.0.0.1", free_port(), "app")
    engine = resilient_db.create_engine(url, policy=POLICY, clock=_SteppingClock())
    try:
        exc = _raised(engine.connect)
    finally:
        engine.dispose()
    ctx = error_context(exc)
    assert ctx is not None and ctx.elapsed >= 2.5
    (record,) = [r for r in caplog.records if r.getMessage().startswith("Could not connect")]
    message = record.getMessage()
    assert "at once" not in message
    assert f"after 1 attempt in {ctx.elapsed:.2f}s" in message


# --------------------------------------------------------------------------- the caller's own


def test_caller_init_command_statement_time_wins(mariadb_url: str) -> None:
    """max_statement_time set by the caller's init_command is not overwritten by the policy's."""
    engine = resilient_db.create_engine(
        mariadb_url,
        policy=POLICY,
        connect_args={"init_command": "SET SESSION max_statement_time=1"},
    )
    try:
        with engine.connect() as c:
            got = c.execute(sa.text("SELECT @@session.max_statement_time")).scalar()
    finally:
        engine.dispose()
    assert 1 == got


@pytest.mark.parametrize(
    ("driver", "fixture", "attribute"),
    [
        ("postgresql+psycopg", "pg_url", "sqlstate"),
        ("postgresql+psycopg2", "pg_url", "pgcode"),
        ("mysql+pymysql", "mariadb_url", "args"),
    ],
)
def test_ambiguous_commit_orig_is_the_driver_error(
    driver: str, fixture: str, attribute: str, request: pytest.FixtureRequest
) -> None:
    """AmbiguousCommitError.orig is the driver's own error, as on any DBAPIError."""
    from resilient_db.testing import FaultProxy

    base = sa.make_url(request.getfixturevalue(fixture)).set(drivername=driver)
    table = f"rdb_amb_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base)
    with admin.begin() as c:
        c.execute(sa.text(f"CREATE TABLE {table} (id int PRIMARY KEY)"))
    try:
        with FaultProxy(base.host or "127.0.0.1", base.port or 0) as proxy:
            engine = resilient_db.create_engine(base.set(port=proxy.port), policy=POLICY)
            try:
                with engine.connect() as c:
                    c.execute(sa.text(f"INSERT INTO {table} VALUES (1)"))
                    proxy.drop_commit_reply()
                    exc = _raised(c.commit)
            finally:
                engine.dispose()
    finally:
        with admin.begin() as c:
            c.execute(sa.text(f"DROP TABLE {table}"))
        admin.dispose()
    assert isinstance(exc, resilient_db.AmbiguousCommitError)
    module = driver.split("+")[1]
    assert (module, True, True) == (
        type(exc.orig).__module__.split(".")[0],
        hasattr(exc.orig, attribute),
        exc.connection_invalidated,
    )


def test_caller_init_command_keeps_the_lock_wait_default(mariadb_url: str) -> None:
    """An init_command that sets something else leaves both session defaults in place."""
    engine = resilient_db.create_engine(
        mariadb_url, policy=POLICY, connect_args={"init_command": "SET SESSION sql_mode = ''"}
    )
    try:
        with engine.connect() as c:
            got = c.execute(
                sa.text("SELECT @@innodb_lock_wait_timeout, @@session.max_statement_time")
            ).one()
    finally:
        engine.dispose()
    assert (1, 2.0) == tuple(got)
