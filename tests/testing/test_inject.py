"""In-process fault injection: real driver errors, through SQLAlchemy events."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import psycopg
import psycopg2.errors
import pymysql
import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import create_async_engine
from tests.conftest import SENTINEL

import resilient_db
from resilient_db import (
    BreakerPolicy,
    CircuitOpenError,
    Policy,
    RetryPolicy,
    classify,
    error_context,
)
from resilient_db.engine import resilience_of
from resilient_db.testing import FaultInjector, driver_error, error_kinds

DRIVER_URLS = [
    "sqlite:///unused.db",
    "sqlite+aiosqlite:///unused.db",
    "postgresql+psycopg://app@db.example:5433/shop",
    "postgresql+psycopg2://app@db.example/shop",
    "postgresql+asyncpg://app@db.example/shop",
    "mysql+pymysql://app@db.example/shop",
    "mysql+aiomysql://app@db.example/shop",
]


def _engine(url: str) -> sa.Engine:
    if "aio" in url or "asyncpg" in url:
        return create_async_engine(url).sync_engine
    return sa.create_engine(url)


@pytest.mark.parametrize("url", DRIVER_URLS)
def test_every_driver_error_classifies_as_its_kind(url: str) -> None:
    """driver_error(engine, kind) is classified as that kind, for every driver and kind."""
    engine = _engine(url)
    kinds = error_kinds(engine)
    assert len(kinds) >= 4
    for kind in kinds:
        for phase in ("connect", "execute"):
            exc = driver_error(engine, kind)
            expected = kind
            if isinstance(exc, TimeoutError) and phase == "execute":
                expected = "read_timeout"  # asyncpg's bare TimeoutError
            if kind == "read_timeout" and phase == "connect":
                expected = "connect_timeout"  # PyMySQL's 2013 "(timed out)" at the handshake
            assert (kind, phase, expected) == (
                kind,
                phase,
                classify(exc, phase=phase).kind.value,
            )


def test_driver_errors_are_the_drivers_real_classes() -> None:
    """Each driver gets its own DBAPI class with its errno / SQLSTATE."""
    pg = _engine("postgresql+psycopg://app@db.example/shop")
    deadlock = driver_error(pg, "deadlock")
    assert (psycopg.errors.DeadlockDetected, "40P01") == (type(deadlock), deadlock.sqlstate)  # type: ignore[attr-defined]
    refused = driver_error(pg, "refused")
    assert psycopg.OperationalError is type(refused)
    assert 'connection to server at "db.example", port 5432 failed: Connection refused' in str(
        refused
    )

    pg2 = _engine("postgresql+psycopg2://app@db.example/shop")
    ro = driver_error(pg2, "read_only")
    assert (psycopg2.errors.ReadOnlySqlTransaction, "25006") == (type(ro), ro.pgcode)  # type: ignore[attr-defined]

    my = _engine("mysql+pymysql://app@db.example/shop")
    exc = driver_error(my, "refused")
    assert (pymysql.err.OperationalError, 2003) == (type(exc), exc.args[0])
    assert "Can't connect to MySQL server on 'db.example'" in exc.args[1]

    lite = _engine("sqlite:///unused.db")
    locked = driver_error(lite, "lock_timeout")
    assert (sqlite3.OperationalError, "database is locked", "SQLITE_BUSY") == (
        type(locked),
        str(locked),
        locked.sqlite_errorname,  # type: ignore[attr-defined]
    )

    apg = _engine("postgresql+asyncpg://app@db.example/shop")
    assert ConnectionRefusedError is type(driver_error(apg, "refused"))
    wrapped = driver_error(apg, "serialization_failure")
    assert (apg.dialect.loaded_dbapi.Error, "40001") == (type(wrapped), wrapped.sqlstate)  # type: ignore[attr-defined]
    assert "SerializationError" == type(wrapped.__cause__).__name__


def test_unknown_kind_lists_the_available_ones() -> None:
    """Asking SQLite for a network fault names the faults it has."""
    with pytest.raises(ValueError, match="choose one of configuration, disk_full"):
        driver_error(_engine("sqlite:///unused.db"), "refused")


def test_injected_errors_never_contain_the_password() -> None:
    """The URL's password is not part of any injected message."""
    for url in DRIVER_URLS[2:]:
        engine = _engine(url.replace("app@", f"app:{SENTINEL}@"))
        for kind in error_kinds(engine):
            exc = driver_error(engine, kind)
            assert SENTINEL not in f"{exc} {exc.args} {exc.__cause__}"


def test_connect_faults_are_retried_like_real_ones(pg_url: str) -> None:
    """Two injected refusals are absorbed by the connect retries; the third attempt connects."""
    engine = resilient_db.create_engine(pg_url, policy=Policy(retry=RetryPolicy(attempts=3)))
    inject = FaultInjector(engine)
    inject.fail_connects(2, "refused")
    with engine.connect() as conn:
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()
    assert (2, False) == (inject.connects_failed, inject.pending)
    engine.dispose()


def test_connect_faults_that_outlast_retries_carry_a_context(server_url: str) -> None:
    """When every attempt fails, the error is the driver's, classified, with the history."""
    engine = resilient_db.create_engine(server_url, policy=Policy(retry=RetryPolicy(attempts=3)))
    FaultInjector(engine).fail_connects(3, "refused")
    with pytest.raises(sa_exc.OperationalError) as info:
        engine.connect()
    ctx = error_context(info.value)
    assert ctx is not None
    assert ("refused", "connect", 3, ("refused", "refused", "refused")) == (
        ctx.kind,
        ctx.phase,
        ctx.attempt,
        tuple(h.split(":")[0] for h in ctx.history),
    )
    assert 3 == resilient_db.breaker_of(engine).snapshot().failures
    engine.dispose()


def test_connect_fault_on_a_plain_engine(tmp_path: Path) -> None:
    """A plain SQLAlchemy engine gets the fault through a do_connect listener."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'plain.db'}")
    inject = FaultInjector(engine)
    inject.fail_connects(1, "configuration")
    with pytest.raises(sa_exc.OperationalError) as info:
        engine.connect()
    assert "unable to open database file" == str(info.value.orig)
    with engine.connect() as conn:
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()
    assert 1 == inject.connects_failed


def test_execute_faults_match_statements(sqlite_url: str) -> None:
    """match= limits the fault to matching statements; the error is classified."""
    engine = resilient_db.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
    inject = FaultInjector(engine)
    inject.fail_executes(1, "lock_timeout", match="insert")
    with engine.begin() as conn:
        assert 0 == conn.execute(sa.text("SELECT count(*) FROM t")).scalar()
        with pytest.raises(sa_exc.OperationalError) as info:
            conn.execute(sa.text("INSERT INTO t VALUES (1)"))
    ctx = error_context(info.value)
    assert ctx is not None
    assert ("lock_timeout", "execute", "database is locked") == (
        ctx.kind,
        ctx.phase,
        str(info.value.orig),
    )
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO t VALUES (1)"))
    assert (1, False) == (inject.executes_failed, inject.pending)


def test_execute_faults_never_open_the_breaker(sqlite_url: str) -> None:
    """Failed statements on an open connection are no evidence the database is unreachable."""
    policy = Policy(breaker=BreakerPolicy(failure_threshold=3, reset_timeout=60))
    engine = resilient_db.create_engine(sqlite_url, policy=policy)
    inject = FaultInjector(engine)
    inject.fail_executes(None, "disk_full")
    outcomes = []
    for _ in range(5):
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa_exc.SQLAlchemyError as e:
            outcomes.append(type(e).__name__)
    assert (["OperationalError"] * 5, "closed") == (outcomes, resilient_db.breaker_of(engine).state)
    inject.clear()
    with engine.connect() as conn:
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()


def test_connect_faults_open_the_breaker(sqlite_url: str) -> None:
    """Failed connects open the breaker; later calls are rejected without connecting."""
    policy = Policy(
        retry=RetryPolicy(attempts=1), breaker=BreakerPolicy(failure_threshold=3, reset_timeout=60)
    )
    engine = resilient_db.create_engine(sqlite_url, policy=policy)
    inject = FaultInjector(engine)
    inject.fail_connects(None, "disk_full")
    outcomes = []
    for _ in range(5):
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa_exc.SQLAlchemyError as e:
            outcomes.append(type(e).__name__)
    assert ["OperationalError"] * 3 + ["CircuitOpenError"] * 2 == outcomes
    assert 3 == inject.connects_failed
    inject.clear()
    resilient_db.breaker_of(engine).reset()
    with engine.connect() as conn:
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()
    assert issubclass(CircuitOpenError, sa_exc.OperationalError)


def test_disconnect_faults_discard_the_connection(server_url: str) -> None:
    """After an injected disconnect the pool replaces the connection, as after a real one."""
    engine = resilient_db.create_engine(server_url)
    inject = FaultInjector(engine)
    with engine.connect() as conn:
        before = conn.connection.dbapi_connection
        inject.fail_executes(1, "disconnect")
        with pytest.raises(sa_exc.OperationalError) as info:
            conn.execute(sa.text("SELECT 1"))
        assert (True, "disconnect") == (
            info.value.connection_invalidated,
            error_context(info.value).kind,  # type: ignore[union-attr]
        )
    with engine.connect() as conn:
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()
        assert before is not conn.connection.dbapi_connection
    engine.dispose()


async def test_async_engines_get_faults_too(tmp_path: Path) -> None:
    """An AsyncEngine (aiosqlite) takes execute faults through its sync_engine."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    inject = FaultInjector(engine)
    inject.fail_executes(1, "read_only")
    async with engine.connect() as conn:
        with pytest.raises(sa_exc.OperationalError) as info:
            await conn.execute(sa.text("SELECT 1"))
        assert "attempt to write a readonly database" == str(info.value.orig)
        assert 1 == (await conn.execute(sa.text("SELECT 1"))).scalar()
    await engine.dispose()


def test_delay_and_factories(sqlite_url: str) -> None:
    """delay= waits before failing; a callable builds each error."""
    engine = resilient_db.create_engine(sqlite_url)
    inject = FaultInjector(engine)
    inject.fail_executes(1, lambda: sqlite3.OperationalError("disk I/O error"), delay=0.05)
    start = time.monotonic()
    with pytest.raises(sa_exc.OperationalError) as info, engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    assert time.monotonic() - start >= 0.05
    assert "disk I/O error" == str(info.value.orig)


def test_close_removes_everything(sqlite_url: str) -> None:
    """close() disarms faults and removes the hook; the injector then refuses new faults."""
    engine = resilient_db.create_engine(sqlite_url)
    with FaultInjector(engine) as inject:
        inject.fail_executes(3, "disk_full")
        inject.fail_connects(3, "configuration")
        assert 1 == len(resilience_of(engine).connect_faults)
    assert (0, False) == (len(resilience_of(engine).connect_faults), inject.pending)
    with engine.connect() as conn:
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()
    with pytest.raises(RuntimeError, match="closed"):
        inject.fail_executes(1)


def test_bad_arguments_are_rejected(sqlite_url: str) -> None:
    """n must be positive (or None), delay >= 0, error a kind or a callable."""
    inject = FaultInjector(resilient_db.create_engine(sqlite_url))
    with pytest.raises(ValueError, match="n must be"):
        inject.fail_executes(0, "disk_full")
    with pytest.raises(ValueError, match="delay"):
        inject.fail_executes(1, "disk_full", delay=-1)
    with pytest.raises(TypeError, match="error must be"):
        inject.fail_executes(1, 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no injectable fault"):
        inject.fail_connects(1, "refused")
