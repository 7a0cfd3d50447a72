"""The server-side faults of faults.md on psycopg2 and asyncpg, injected for real.

The injectors and the check are those of ``test_classify_faults.py`` (psycopg and
PyMySQL); here they run with the other PostgreSQL drivers. An asyncpg engine is an
``AsyncEngine``: the injector drives its ``sync_engine`` inside a greenlet
(:func:`sqlalchemy.util.greenlet_spawn`), exactly as SQLAlchemy's own
``run_sync`` does, so the same code injects the same fault.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.util import greenlet_spawn

from resilient_db import Kind, RetryLevel, classify, error_context
from tests.test_classify_faults import (
    W_CANCELLED,
    W_DEADLOCK,
    W_DISK_FULL,
    W_IDLE,
    W_IDLE_IN_TX,
    W_LOCK,
    W_READ_ONLY,
    W_SERIALIZATION,
    W_SHUTTING_DOWN,
    W_STATEMENT_TIMEOUT,
    W_TERMINATED,
    Env,
    Hit,
    Want,
    check,
    pg_box,
    pg_cancelled,
    pg_deadlock,
    pg_disk_full,
    pg_idle_in_transaction,
    pg_idle_session,
    pg_lock_timeout,
    pg_read_only,
    pg_restart,
    pg_serialization,
    pg_shutdown_in_query,
    pg_shutting_down,
    pg_statement_timeout,
    pg_temp_file_limit,
    pg_terminated,
)

PG2, APG = "psycopg2", "asyncpg"
__all__ = ["pg_box"]  # the throw-away server's fixture, shared with test_classify_faults.py

#: psycopg2 reports a session the server ended (terminated, shut down, idle timeout) as a
#: bare lost connection: "server closed the connection unexpectedly", no SQLSTATE
W_LOST_ANY = Want(Kind.DISCONNECT, RetryLevel.TRANSACTION, True, "the session was killed")


@dataclass(frozen=True)
class DriverCase:
    """One server-side fault through one PostgreSQL driver."""

    fault: str
    driver: str
    inject: Callable[[Env], Hit]
    want: Want
    code: str | None

    @property
    def id(self) -> str:
        return f"{self.fault}-{self.driver}-{self.inject.__name__.split('_', 1)[1]}"


CASES = [
    # 9 restart while the pool holds connections; 10 session killed / cancelled
    DriverCase("09", PG2, pg_restart, W_LOST_ANY, None),
    DriverCase("09", APG, pg_restart, W_TERMINATED, "57P01"),
    DriverCase("10", PG2, pg_terminated, W_LOST_ANY, None),
    DriverCase("10", APG, pg_terminated, W_TERMINATED, "57P01"),
    DriverCase("10", PG2, pg_cancelled, W_CANCELLED, "57014"),
    DriverCase("10", APG, pg_cancelled, W_CANCELLED, "57014"),
    # 11 statement timeout, 12 lock timeout, 13 deadlock, 14 serialization, 15 read-only
    DriverCase("11", PG2, pg_statement_timeout, W_STATEMENT_TIMEOUT, "57014"),
    DriverCase("11", APG, pg_statement_timeout, W_STATEMENT_TIMEOUT, "57014"),
    DriverCase("12", PG2, pg_lock_timeout, W_LOCK, "55P03"),
    DriverCase("12", APG, pg_lock_timeout, W_LOCK, "55P03"),
    DriverCase("13", PG2, pg_deadlock, W_DEADLOCK, "40P01"),
    DriverCase("14", PG2, pg_serialization, W_SERIALIZATION, "40001"),
    DriverCase("14", APG, pg_serialization, W_SERIALIZATION, "40001"),
    DriverCase("15", PG2, pg_read_only, W_READ_ONLY, "25006"),
    DriverCase("15", APG, pg_read_only, W_READ_ONLY, "25006"),
    # 16 shutdown during a query / while connecting
    DriverCase("16", PG2, pg_shutdown_in_query, W_LOST_ANY, None),
    DriverCase("16", APG, pg_shutdown_in_query, W_TERMINATED, "57P01"),
    DriverCase("16", PG2, pg_shutting_down, W_SHUTTING_DOWN, None),
    DriverCase("16", APG, pg_shutting_down, W_SHUTTING_DOWN, "57P03"),
    # 18 disk full and temp-space limits
    DriverCase("18", PG2, pg_temp_file_limit, W_DISK_FULL, "53400"),
    DriverCase("18", APG, pg_temp_file_limit, W_DISK_FULL, "53400"),
    DriverCase("18", PG2, pg_disk_full, W_DISK_FULL, "53100"),
    DriverCase("18", APG, pg_disk_full, W_DISK_FULL, "53100"),
    # 19 server idle timeouts
    # psycopg2 sees only "server closed the connection unexpectedly" for both
    DriverCase("19", PG2, pg_idle_session, W_LOST_ANY, None),
    DriverCase("19", APG, pg_idle_session, W_IDLE, "57P05"),
    DriverCase("19", PG2, pg_idle_in_transaction, W_LOST_ANY, None),
    DriverCase("19", APG, pg_idle_in_transaction, W_IDLE_IN_TX, "25P03"),
]
# not here: a deadlock on asyncpg (its injector runs two transactions in threads, and an
# asyncpg engine only runs in its event loop); faults 1-8 on these drivers are in
# test_classify_drivers.py, and faults 17, 20, 21 are client-side (the same code paths)


@pytest.fixture
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Env:
    """Resources for one injection (released by the test, inside its greenlet)."""
    return Env(request, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_fault_on_driver(
    case: DriverCase, env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """Inject the fault for real on psycopg2 / asyncpg; classification and context match."""
    caplog.set_level(logging.DEBUG)
    env.inject_db, env.pg_driver = "pg", case.driver
    try:
        if case.driver == APG:
            exc, engine = await greenlet_spawn(case.inject, env)
        else:
            exc, engine = case.inject(env)
        ctx = error_context(exc)
        assert case.code == (ctx.code if ctx is not None else classify(exc).code)
        check(exc, case.want, engine, caplog)
    finally:
        await greenlet_spawn(env.close)
