"""Unit-of-work retry (resilient_db.retry): real faults on real PostgreSQL, MariaDB, SQLite."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
import tenacity
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

import resilient_db
from resilient_db import (
    ALREADY_COMMITTED,
    AmbiguousCommitError,
    CircuitOpenError,
    ConfigurationError,
    Kind,
    Policy,
    RetryPolicy,
    classify,
    error_context,
    run_transaction,
    run_transaction_async,
    transactional,
    transactional_async,
)
from resilient_db.engine import resilience_of
from resilient_db.errors import attach
from resilient_db.testing import FaultProxy
from tests.conftest import SENTINEL
from tests.servers import free_port

FAST = Policy(retry=RetryPolicy(attempts=4, initial=0.01, max_backoff=0.05, deadline=20))


def make_engine(url: str, **kw: Any) -> Engine:
    """A resilient engine with a pool big enough for two threads and a killer."""
    kw.setdefault("policy", FAST)
    return resilient_db.create_engine(url, validate="off", **kw)


def is_pg(url: str) -> bool:
    """True for a PostgreSQL URL."""
    return sa.make_url(url).get_backend_name() == "postgresql"


@pytest.fixture
def direct(any_url: str) -> Iterator[Engine]:
    """A plain autocommit engine on the database under test, for setup and checks."""
    e = sa.create_engine(any_url, isolation_level="AUTOCOMMIT")
    yield e
    e.dispose()


@pytest.fixture
def server_direct(server_url: str) -> Iterator[Engine]:
    """A plain autocommit engine on the PostgreSQL/MariaDB server under test."""
    e = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    yield e
    e.dispose()


def _scratch(e: Engine) -> Iterator[str]:
    name = f"rdb_tx_{uuid.uuid4().hex[:10]}"
    with e.connect() as c:
        c.execute(
            sa.text(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, k VARCHAR(64), v INTEGER)")
        )
    yield name
    with e.connect() as c:
        c.execute(sa.text(f"DROP TABLE {name}"))


@pytest.fixture
def table(direct: Engine) -> Iterator[str]:
    """A uniquely named scratch table (id primary key, k, v), dropped afterwards."""
    yield from _scratch(direct)


@pytest.fixture
def server_table(server_direct: Engine) -> Iterator[str]:
    """A scratch table on the PostgreSQL/MariaDB server under test."""
    yield from _scratch(server_direct)


@pytest.fixture
def keys(server_direct: Engine) -> Iterator[Callable[[], str]]:
    """Unique idempotency keys; the key table exists, and our keys are deleted afterwards."""
    resilient_db.ensure_idempotency_table(server_direct)
    prefix = f"test-{uuid.uuid4().hex[:10]}-"
    n = iter(range(1_000_000))
    yield lambda: f"{prefix}{next(n)}"
    t = resilient_db.idempotency_table
    with server_direct.connect() as c:
        c.execute(t.delete().where(t.c.idempotency_key.like(prefix + "%")))


@pytest.fixture
def proxy(server_url: str) -> Iterator[FaultProxy]:
    """A fault proxy in front of the server under test."""
    u = sa.make_url(server_url)
    with FaultProxy(u.host or "127.0.0.1", u.port or (5432 if is_pg(server_url) else 3306)) as p:
        yield p


@pytest.fixture
def proxied(server_url: str, proxy: FaultProxy) -> Iterator[Engine]:
    """A resilient engine that reaches the server through the proxy."""
    url = sa.make_url(server_url).set(host=proxy.host, port=proxy.port)
    e = make_engine(url.render_as_string(hide_password=False))
    yield e
    e.dispose()


def count(e: Engine, table: str, k: str | None = None) -> int:
    """Rows in ``table`` (with ``k`` when given)."""
    where = "" if k is None else " WHERE k = :k"
    with e.connect() as c:
        return int(c.scalar(sa.text(f"SELECT count(*) FROM {table}{where}"), {"k": k}) or 0)


def backend_id(conn: Connection) -> int:
    """The server-side id of the connection's session."""
    sql = (
        "SELECT pg_backend_pid()" if conn.dialect.name == "postgresql" else "SELECT CONNECTION_ID()"
    )
    return int(conn.scalar(sa.text(sql)) or 0)


def kill(admin: Engine, ident: int) -> None:
    """Terminate a session from another connection and wait until it is gone."""
    with admin.connect() as c:
        if admin.dialect.name == "postgresql":
            c.execute(sa.text("SELECT pg_terminate_backend(:p, 5000)"), {"p": ident})
            return
        c.exec_driver_sql(f"KILL {int(ident)}")
        for _ in range(100):
            alive = c.scalar(
                sa.text("SELECT count(*) FROM information_schema.processlist WHERE id = :i"),
                {"i": ident},
            )
            if not alive:
                return
            time.sleep(0.01)


def run_threads(*targets: Callable[[], None]) -> list[BaseException]:
    """Run the targets in threads; return what they raised."""
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:
                errors.append(e)

        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    return errors


# -- happy path and what is never retried ------------------------------------------------


def test_returns_result_and_commits(any_url: str, direct: Engine, table: str) -> None:
    """The unit runs once in a transaction that is committed; its result is returned."""
    e = make_engine(any_url)
    calls = []

    def unit(conn: Connection) -> str:
        calls.append(1)
        conn.execute(sa.text(f"INSERT INTO {table} (id, k, v) VALUES (1, 'a', 1)"))
        return "done"

    assert ("done", 1, 1) == (run_transaction(e, unit), len(calls), count(direct, table))


def test_happy_path_builds_no_tenacity(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first attempt runs without constructing tenacity's Retrying."""

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("Retrying built on the happy path")

    monkeypatch.setattr(tenacity, "Retrying", boom)
    e = make_engine(sqlite_url)
    assert 42 == run_transaction(e, lambda c: c.scalar(sa.text("SELECT 42")))


def test_integrity_error_is_raised_at_once(any_url: str, table: str) -> None:
    """A constraint violation is an application error: raised after one call, not retried."""
    e = make_engine(any_url)
    calls = []

    def unit(conn: Connection) -> None:
        calls.append(1)
        conn.execute(sa.text(f"INSERT INTO {table} (id, k, v) VALUES (1, 'a', 1), (1, 'b', 2)"))

    with pytest.raises(sa_exc.IntegrityError) as info:
        run_transaction(e, unit)
    assert (1, Kind.APPLICATION) == (len(calls), classify(info.value).kind)


def test_application_exception_is_raised_untouched(sqlite_url: str) -> None:
    """A Python error from the unit is raised once, with no context or note added."""
    e = make_engine(sqlite_url)
    calls = []

    def unit(conn: Connection) -> None:
        calls.append(1)
        raise ValueError("bad input")

    with pytest.raises(ValueError) as info:
        run_transaction(e, unit)
    assert (1, None, []) == (
        len(calls),
        error_context(info.value),
        getattr(info.value, "__notes__", []),
    )


def test_os_error_from_application_code_is_not_retried(sqlite_url: str) -> None:
    """A ConnectionError raised by the application (say an HTTP call) is not a database fault."""
    e = make_engine(sqlite_url)
    calls = []

    def unit(conn: Connection) -> None:
        calls.append(1)
        raise ConnectionResetError("peer reset the HTTP connection")

    with pytest.raises(ConnectionResetError):
        run_transaction(e, unit)
    assert 1 == len(calls)


def test_keyboard_interrupt_is_not_retried(sqlite_url: str) -> None:
    """Cancellation (KeyboardInterrupt) propagates after one call."""
    e = make_engine(sqlite_url)
    calls = []

    def unit(conn: Connection) -> None:
        calls.append(1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_transaction(e, unit)
    assert 1 == len(calls)


def test_open_circuit_fails_fast(sqlite_url: str) -> None:
    """With the breaker open the unit is never called and CircuitOpenError is raised."""
    e = make_engine(sqlite_url)
    resilient_db.breaker_of(e).force_open()
    calls = []
    with pytest.raises(CircuitOpenError):
        run_transaction(e, lambda c: calls.append(1))
    assert [] == calls


def test_statement_timeout_is_not_retried(server_url: str) -> None:
    """A statement timeout is raised at once: a replay would time out again."""
    e = make_engine(server_url)
    calls = []

    def unit(conn: Connection) -> None:
        calls.append(1)
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET LOCAL statement_timeout = 50")
            conn.exec_driver_sql("SELECT pg_sleep(1)")
        else:
            conn.exec_driver_sql("SET STATEMENT max_statement_time=0.05 FOR SELECT SLEEP(1)")

    with pytest.raises(sa_exc.OperationalError) as info:
        run_transaction(e, unit)
    assert (1, Kind.STATEMENT_TIMEOUT) == (len(calls), classify(info.value).kind)


def test_bad_arguments_are_configuration_errors(sqlite_url: str) -> None:
    """Wrong binds, keys and isolation levels fail before any I/O, naming the argument."""
    e = make_engine(sqlite_url)
    fields = []
    for call in (
        lambda: run_transaction(e.connect(), lambda c: None),  # type: ignore[call-overload]
        lambda: run_transaction(e, lambda c: None, idempotency_key=""),
        lambda: run_transaction(e, lambda c: None, isolation_level="AUTOCOMMIT"),
        lambda: run_transaction(e, lambda c: None, policy=3),  # type: ignore[call-overload]
    ):
        with pytest.raises(ConfigurationError) as info:
            call()
        fields.append(info.value.field)
    assert ["bind", "idempotency_key", "isolation_level", "policy"] == fields


# -- transaction-level faults: re-run the whole unit -------------------------------------


def test_deadlock_is_retried_and_matches_serial_execution(
    server_url: str, server_direct: Engine, server_table: str
) -> None:
    """Two threads deadlock; the victim is re-run and the result equals a serial run."""
    e = make_engine(server_url)
    with server_direct.connect() as c:
        c.execute(sa.text(f"INSERT INTO {server_table} (id, k, v) VALUES (1, 'a', 0), (2, 'b', 0)"))
    barrier = threading.Barrier(2, timeout=15)
    calls = {"A": 0, "B": 0}

    def transfer(name: str, first: int, second: int, amount: int) -> Callable[[], None]:
        def unit(conn: Connection) -> None:
            calls[name] += 1
            upd = sa.text(f"UPDATE {server_table} SET v = v + :a WHERE id = :i")
            conn.execute(upd, {"a": amount, "i": first})
            if calls[name] == 1:
                barrier.wait()
            conn.execute(upd, {"a": amount, "i": second})

        return lambda: run_transaction(e, unit)

    errors = run_threads(transfer("A", 1, 2, 10), transfer("B", 2, 1, 100))
    with server_direct.connect() as c:
        rows: dict[int, int] = dict(c.execute(sa.text(f"SELECT id, v FROM {server_table}")).all())
    assert ([], {1: 110, 2: 110}, [1, 2]) == (errors, rows, sorted(calls.values()))


def test_serialization_failure_is_retried_and_matches_serial_execution(
    server_url: str, server_direct: Engine, server_table: str
) -> None:
    """Two read-modify-write units conflict (PG 40001 / MariaDB SERIALIZABLE deadlock).

    The loser is re-run and the counter ends at 2, as if they had run one after another.
    """
    e = make_engine(server_url)
    iso = "REPEATABLE READ" if is_pg(server_url) else "SERIALIZABLE"
    with server_direct.connect() as c:
        c.execute(sa.text(f"INSERT INTO {server_table} (id, k, v) VALUES (1, 'n', 0)"))
    barrier = threading.Barrier(2, timeout=15)
    calls = {"A": 0, "B": 0}

    def increment(name: str) -> Callable[[], None]:
        def unit(conn: Connection) -> None:
            calls[name] += 1
            v = conn.scalar(sa.text(f"SELECT v FROM {server_table} WHERE id = 1"))
            if calls[name] == 1:
                barrier.wait()
            conn.execute(sa.text(f"UPDATE {server_table} SET v = :v WHERE id = 1"), {"v": v + 1})

        return lambda: run_transaction(e, unit, isolation_level=iso)

    errors = run_threads(increment("A"), increment("B"))
    with server_direct.connect() as c:
        final = c.scalar(sa.text(f"SELECT v FROM {server_table} WHERE id = 1"))
    assert ([], 2, [1, 2]) == (errors, final, sorted(calls.values()))


def test_killed_session_before_commit_is_rerun_once(
    server_url: str, server_direct: Engine, server_table: str
) -> None:
    """pg_terminate_backend / KILL mid-transaction: the unit is re-run; the row exists once."""
    e = make_engine(server_url)
    calls = []

    def unit(conn: Connection) -> str:
        calls.append(1)
        conn.execute(
            sa.text(f"INSERT INTO {server_table} (id, k, v) VALUES (:i, 'x', 1)"), {"i": len(calls)}
        )
        if len(calls) == 1:
            kill(server_direct, backend_id(conn))
            conn.execute(sa.text("SELECT 1"))
        return "ok"

    assert ("ok", 2, 1) == (
        run_transaction(e, unit),
        len(calls),
        count(server_direct, server_table, "x"),
    )


def test_session_gets_a_fresh_session_per_attempt(
    server_url: str, server_direct: Engine, server_table: str
) -> None:
    """With a sessionmaker every attempt gets a new Session (no PendingRollbackError loop)."""
    factory = sessionmaker(make_engine(server_url))
    sessions: list[Session] = []

    def unit(session: Session) -> int:
        sessions.append(session)
        session.execute(
            sa.text(f"INSERT INTO {server_table} (id, k, v) VALUES (:i, 's', 1)"),
            {"i": len(sessions)},
        )
        if len(sessions) == 1:
            kill(server_direct, backend_id(session.connection()))
            session.execute(sa.text("SELECT 1"))
        return len(sessions)

    result = run_transaction(factory, unit)
    assert (2, 2, 1) == (
        result,
        len({id(s) for s in sessions}),
        count(server_direct, server_table, "s"),
    )


def test_final_error_is_the_real_one_with_history(server_url: str, server_direct: Engine) -> None:
    """When every attempt fails, the last real error is raised with attempt and history."""
    e = make_engine(server_url, policy=Policy(retry=RetryPolicy(attempts=3, deadline=20)))
    calls = []

    def unit(conn: Connection) -> None:
        calls.append(1)
        kill(server_direct, backend_id(conn))
        conn.execute(sa.text("SELECT 1"))

    with pytest.raises(sa_exc.OperationalError) as info:
        run_transaction(e, unit)
    ctx = error_context(info.value)
    assert ctx is not None
    kind = "admin_terminated:57P01" if is_pg(server_url) else "disconnect:2013"
    assert (3, 3, (kind,) * 3, False) == (
        len(calls),
        ctx.attempt,
        ctx.history,
        isinstance(info.value, tenacity.RetryError),
    )


def test_deadline_stops_retries(server_url: str, server_direct: Engine) -> None:
    """A deadline shorter than one attempt allows no replay, whatever ``attempts`` says."""
    e = make_engine(server_url)
    calls = []

    def unit(conn: Connection) -> None:
        calls.append(1)
        kill(server_direct, backend_id(conn))
        conn.execute(sa.text("SELECT 1"))

    with pytest.raises(sa_exc.OperationalError):
        run_transaction(e, unit, policy=RetryPolicy(attempts=10, deadline=0.001))
    assert 1 == len(calls)


def test_retries_are_driven_by_tenacity_and_logged_without_secrets(
    server_url: str,
    server_direct: Engine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After a failure, tenacity drives attempts 2..n; each replay is logged at INFO."""
    built = []

    class Counting(tenacity.Retrying):
        def __init__(self, *a: Any, **k: Any) -> None:
            built.append(k)
            super().__init__(*a, **k)

    monkeypatch.setattr(tenacity, "Retrying", Counting)
    e = make_engine(server_url)
    calls = []

    def unit(conn: Connection) -> None:
        calls.append(1)
        conn.execute(sa.text("SELECT :s"), {"s": SENTINEL})
        if len(calls) < 3:
            kill(server_direct, backend_id(conn))
            conn.execute(sa.text("SELECT 1"))

    with caplog.at_level(logging.INFO, logger="resilient_db"):
        run_transaction(e, unit)
    replays = [
        r for r in caplog.records if getattr(r, "resilient_db", {}).get("event") == "unit_retry"
    ]
    assert (3, 1, True, 2, False) == (
        len(calls),
        len(built),
        built[0]["reraise"],
        len(replays),
        SENTINEL in caplog.text,
    )


def test_errors_never_show_the_password(free_url_with_sentinel: str) -> None:
    """A unit that cannot connect fails with a context and notes free of the password."""
    e = make_engine(free_url_with_sentinel)
    with pytest.raises(sa_exc.OperationalError) as info:
        run_transaction(e, lambda c: None, policy=RetryPolicy(attempts=2))
    ctx = error_context(info.value)
    assert ctx is not None
    shown = " ".join([str(info.value), *getattr(info.value, "__notes__", []), str(ctx.to_dict())])
    # the engine's own connect attempts (FAST: 4) used up the unit's 2
    assert (False, 4, "refused") == (SENTINEL in shown, ctx.attempt, ctx.kind)


@pytest.fixture
def free_url_with_sentinel() -> str:
    """A PostgreSQL URL with the sentinel password, on a port where nothing listens."""
    return f"postgresql+psycopg://app:{SENTINEL}@127.0.0.1:{free_port()}/test"


# -- read-only units ---------------------------------------------------------------------


def test_read_only_transaction_rejects_writes(server_url: str, server_table: str) -> None:
    """read_only=True makes the transaction read-only on the server; a write fails once."""
    e = make_engine(server_url)
    calls = []

    def unit(conn: Connection) -> None:
        calls.append(1)
        conn.execute(sa.text(f"INSERT INTO {server_table} (id, k, v) VALUES (1, 'r', 1)"))

    with pytest.raises(sa_exc.DBAPIError) as info:
        run_transaction(e, unit, read_only=True)
    assert (1, Kind.READ_ONLY) == (len(calls), classify(info.value).kind)


def test_read_only_unit_is_rerun_after_ambiguous_commit(proxy: FaultProxy, proxied: Engine) -> None:
    """A read-only unit is re-run after its COMMIT reply was lost: nothing was written."""
    calls = []

    def unit(conn: Connection) -> int:
        calls.append(1)
        value = int(conn.scalar(sa.text("SELECT 7")) or 0)
        if len(calls) == 1:
            proxy.drop_commit_reply()
        return value

    assert (7, 2) == (run_transaction(proxied, unit, read_only=True), len(calls))


def test_isolation_level_is_applied(server_url: str) -> None:
    """isolation_level sets the level of every attempt's transaction."""
    e = make_engine(server_url)
    sql = "SHOW transaction_isolation" if is_pg(server_url) else "SELECT @@tx_isolation"
    level = run_transaction(e, lambda c: c.scalar(sa.text(sql)), isolation_level="SERIALIZABLE")
    assert "SERIALIZABLE" == str(level).upper()


# -- ambiguous commits -------------------------------------------------------------------


def insert_unit(
    table: str, k: str, calls: list[int], arm: Callable[[], None] | None
) -> Callable[[Any], str]:
    """A unit that inserts one row with ``k`` and arms a commit fault on its first call."""

    def unit(conn: Any) -> str:
        calls.append(1)
        conn.execute(
            sa.text(f"INSERT INTO {table} (id, k, v) VALUES (:i, :k, 1)"), {"i": len(calls), "k": k}
        )
        if arm is not None and len(calls) == 1:
            arm()
        return f"result-{len(calls)}"

    return unit


def test_ambiguous_commit_raises_and_is_not_rerun(
    proxy: FaultProxy, proxied: Engine, server_direct: Engine, server_table: str
) -> None:
    """COMMIT reply lost, no key: AmbiguousCommitError after one call (the row did commit)."""
    calls: list[int] = []
    with pytest.raises(AmbiguousCommitError) as info:
        run_transaction(proxied, insert_unit(server_table, "amb", calls, proxy.drop_commit_reply))
    ctx = error_context(info.value)
    assert ctx is not None
    assert (1, 1, "ambiguous_commit", 1) == (
        len(calls),
        count(server_direct, server_table, "amb"),
        ctx.kind,
        ctx.attempt,
    )


def test_commit_into_a_blackhole_is_ambiguous_not_a_hang(
    server_url: str, proxy: FaultProxy, server_table: str
) -> None:
    """A COMMIT whose reply never comes fails within Timeouts.call (psycopg has no read timeout)."""
    url = sa.make_url(server_url).set(host=proxy.host, port=proxy.port)
    policy = Policy(timeouts=resilient_db.Timeouts(connect=1, call=1))
    e = make_engine(url.render_as_string(hide_password=False), policy=policy)
    calls: list[int] = []
    raised: list[BaseException] = []

    def run() -> None:
        try:
            run_transaction(e, insert_unit(server_table, "bh", calls, proxy.blackhole))
        except BaseException as exc:
            raised.append(exc)

    t0 = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(15)
    elapsed = time.monotonic() - t0
    proxy.passthrough()
    assert (False, 1, [AmbiguousCommitError], True) == (
        worker.is_alive(),
        len(calls),
        [type(x) for x in raised],
        elapsed < 5,
    )


def test_plain_engine_ambiguous_commit_is_detected_by_the_runner(
    server_url: str, proxy: FaultProxy, server_direct: Engine, server_table: str
) -> None:
    """Without resilient_db's hooks, the runner itself knows it was committing."""
    url = sa.make_url(server_url).set(host=proxy.host, port=proxy.port)
    plain = sa.create_engine(url)
    calls: list[int] = []
    with pytest.raises(AmbiguousCommitError) as info:
        run_transaction(plain, insert_unit(server_table, "plain", calls, proxy.drop_commit_reply))
    plain.dispose()
    assert (1, "ambiguous_commit", True) == (
        len(calls),
        classify(info.value).kind.value,
        isinstance(info.value, sa_exc.OperationalError),
    )


def test_idempotency_key_detects_the_earlier_commit(
    proxy: FaultProxy,
    proxied: Engine,
    server_direct: Engine,
    server_table: str,
    keys: Callable[[], str],
) -> None:
    """COMMIT reply lost with a key: the retry finds the key, does not re-run, row once."""
    calls: list[int] = []
    result = run_transaction(
        proxied,
        insert_unit(server_table, "key", calls, proxy.drop_commit_reply),
        idempotency_key=keys(),
    )
    assert ("result-1", 1, 1) == (result, len(calls), count(server_direct, server_table, "key"))


def test_idempotency_key_reruns_when_the_commit_was_lost(
    proxy: FaultProxy,
    proxied: Engine,
    server_direct: Engine,
    server_table: str,
    keys: Callable[[], str],
) -> None:
    """COMMIT never reached the server: the retry can record the key, so it re-runs once."""
    calls: list[int] = []
    result = run_transaction(
        proxied,
        insert_unit(server_table, "lost", calls, proxy.reset_before_commit),
        idempotency_key=keys(),
    )
    assert ("result-2", 2, 1) == (result, len(calls), count(server_direct, server_table, "lost"))


def test_idempotency_key_of_an_earlier_call_returns_already_committed(
    server_url: str, server_direct: Engine, server_table: str, keys: Callable[[], str]
) -> None:
    """A second call with a committed key returns ALREADY_COMMITTED without running."""
    e = make_engine(server_url)
    calls: list[int] = []
    key = keys()
    first = run_transaction(e, insert_unit(server_table, "twice", calls, None), idempotency_key=key)
    second = run_transaction(
        e, insert_unit(server_table, "twice", calls, None), idempotency_key=key
    )
    assert ("result-1", ALREADY_COMMITTED, 1, 1) == (
        first,
        second,
        len(calls),
        count(server_direct, server_table, "twice"),
    )


def test_verify_true_settles_an_ambiguous_commit(
    proxy: FaultProxy, proxied: Engine, server_direct: Engine, server_table: str
) -> None:
    """verify() on a fresh connection says the commit landed: done, not re-run."""
    calls: list[int] = []
    checks: list[int] = []

    def verify(conn: Connection) -> bool:
        checks.append(1)
        return bool(conn.scalar(sa.text(f"SELECT count(*) FROM {server_table} WHERE k = 'v1'")))

    result = run_transaction(
        proxied, insert_unit(server_table, "v1", calls, proxy.drop_commit_reply), verify=verify
    )
    assert ("result-1", 1, 1, 1) == (
        result,
        len(calls),
        len(checks),
        count(server_direct, server_table, "v1"),
    )


def test_verify_false_reruns_the_unit(
    proxy: FaultProxy, proxied: Engine, server_direct: Engine, server_table: str
) -> None:
    """verify() says the commit did not land: the unit is re-run once."""
    calls: list[int] = []

    def verify(conn: Connection) -> bool:
        return bool(conn.scalar(sa.text(f"SELECT count(*) FROM {server_table} WHERE k = 'v2'")))

    result = run_transaction(
        proxied, insert_unit(server_table, "v2", calls, proxy.reset_before_commit), verify=verify
    )
    assert ("result-2", 2, 1) == (result, len(calls), count(server_direct, server_table, "v2"))


def test_missing_key_table_is_a_configuration_error(sqlite_url: str) -> None:
    """Using a key before ensure_idempotency_table() names the fix."""
    e = make_engine(sqlite_url)
    with pytest.raises(ConfigurationError) as info:
        run_transaction(e, lambda c: None, idempotency_key="k-1")
    assert "ensure_idempotency_table" in str(info.value)


def test_purge_deletes_old_keys_only(sqlite_url: str) -> None:
    """purge_idempotency_keys() deletes keys older than the given age."""
    import datetime

    e = make_engine(sqlite_url)
    resilient_db.ensure_idempotency_table(e)
    resilient_db.ensure_idempotency_table(e)  # idempotent
    run_transaction(e, lambda c: None, idempotency_key="k-new")
    t = resilient_db.idempotency_table
    with e.begin() as c:
        c.execute(
            t.insert().values(idempotency_key="k-old", created_at=datetime.datetime(2000, 1, 1))
        )
    deleted = resilient_db.purge_idempotency_keys(e, datetime.timedelta(days=1))
    with e.connect() as c:
        left = c.scalars(sa.select(t.c.idempotency_key)).all()
    assert (1, ["k-new"]) == (deleted, left)


# -- never re-run work that may be committed ---------------------------------------------


class Fault:
    """Makes the next statement on a connection fail with a retryable error, for real.

    PostgreSQL/MariaDB: the session is terminated (admin_terminated / disconnect).
    SQLite: another connection holds an exclusive lock, so the next write gives up
    after the engine's busy timeout (lock_timeout). Arm it before the unit's next write.
    """

    def __init__(self, url: str, admin: Engine) -> None:
        self.url = sa.make_url(url)
        self.admin = admin
        self.blocker: sqlite3.Connection | None = None

    def arm(self, conn: Connection) -> None:
        """Make ``conn``'s next write fail."""
        if self.url.get_backend_name() != "sqlite":
            kill(self.admin, backend_id(conn))
            return
        self.blocker = sqlite3.connect(str(self.url.database), isolation_level=None)
        self.blocker.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        """Let SQLite writers in again."""
        if self.blocker is not None:
            self.blocker.rollback()
            self.blocker.close()
            self.blocker = None


@pytest.fixture
def fault(any_url: str, direct: Engine) -> Iterator[Fault]:
    """A real retryable fault on the database under test."""
    f = Fault(any_url, direct)
    yield f
    f.release()


def fault_engine(url: str, **kw: Any) -> Engine:
    """A resilient engine whose SQLite busy timeout is short (a locked write fails fast)."""
    if sa.make_url(url).get_backend_name() == "sqlite":
        kw["connect_args"] = {"timeout": 0.05}
    return make_engine(url, **kw)


def test_retryable_fault_in_a_unit_of_work_is_rerun(
    any_url: str, direct: Engine, table: str, fault: Fault
) -> None:
    """Control for the tests below: the same fault before anything committed is re-run."""
    e = fault_engine(any_url)
    calls: list[int] = []

    def unit(conn: Connection) -> None:
        calls.append(1)
        if len(calls) == 1:
            conn.execute(sa.text("SELECT 1"))
            fault.arm(conn)
        else:
            fault.release()
        conn.execute(sa.text(f"INSERT INTO {table} (id, k, v) VALUES (:i, 'r', 1)"), {"i": 1})

    run_transaction(e, unit)
    assert (2, 1) == (len(calls), count(direct, table, "r"))


@pytest.mark.parametrize("via", ["engine", "session"])
def test_unit_that_committed_itself_is_not_rerun(
    any_url: str, direct: Engine, table: str, fault: Fault, via: str
) -> None:
    """fn commits, then a retryable fault: raised (not re-run); only the committed row exists.

    Before the fix the committed insert was replayed on every retry.
    """
    e = fault_engine(any_url)
    calls: list[int] = []

    def unit(conn: Any) -> None:
        calls.append(1)
        insert = sa.text(f"INSERT INTO {table} (id, k, v) VALUES (:i, 'c', 1)")
        conn.execute(insert, {"i": len(calls) * 10})
        conn.commit()
        fault.arm(conn.connection() if via == "session" else conn)
        conn.execute(insert, {"i": len(calls) * 10 + 1})

    bind: Any = e if via == "engine" else sessionmaker(e)
    with pytest.raises(sa_exc.OperationalError) as info:
        run_transaction(bind, unit)
    fault.release()
    ctx = error_context(info.value)
    assert ctx is not None
    assert (1, 1, "never", True) == (
        len(calls),
        count(direct, table, "c"),
        ctx.retry,
        "committed or rolled back the runner's transaction" in ctx.diagnosis,
    )


@pytest.mark.parametrize("via", ["engine", "session"])
def test_unit_that_committed_itself_keeps_its_later_work(
    sqlite_url: str, via: str, caplog: pytest.LogCaptureFixture
) -> None:
    """fn commits halfway and returns: the runner commits the rest too, and warns."""
    e = make_engine(sqlite_url)
    with e.begin() as c:
        c.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))

    def unit(conn: Any) -> str:
        conn.execute(sa.text("INSERT INTO t (id) VALUES (1)"))
        conn.commit()
        conn.execute(sa.text("INSERT INTO t (id) VALUES (2)"))
        return "ok"

    bind: Any = e if via == "engine" else sessionmaker(e)
    with caplog.at_level(logging.WARNING, logger="resilient_db"):
        result = run_transaction(bind, unit)
    with e.connect() as c:
        rows = c.scalars(sa.text("SELECT id FROM t ORDER BY id")).all()
    events = [getattr(r, "resilient_db", {}).get("event") for r in caplog.records]
    assert ("ok", [1, 2], ["unit_ended_transaction"]) == (result, rows, events)


@pytest.mark.parametrize("how", ["create_engine", "execution_options", "session_connection"])
def test_autocommit_bind_is_refused(
    any_url: str, direct: Engine, table: str, how: str, fault: Fault
) -> None:
    """AUTOCOMMIT commits every statement: the runner refuses it before calling fn.

    Before the fix an insert followed by a retryable fault was committed once per attempt.
    """
    held: list[Connection] = []
    if how == "create_engine":
        bind: Any = fault_engine(any_url, isolation_level="AUTOCOMMIT")
    elif how == "execution_options":
        bind = fault_engine(any_url).execution_options(isolation_level="AUTOCOMMIT")
    else:
        held.append(fault_engine(any_url).connect().execution_options(isolation_level="AUTOCOMMIT"))
        bind = sessionmaker(bind=held[0])
    calls: list[int] = []

    def unit(conn: Any) -> None:
        calls.append(1)
        conn.execute(
            sa.text(f"INSERT INTO {table} (id, k, v) VALUES (:i, 'ac', 1)"), {"i": len(calls)}
        )
        fault.arm(conn if isinstance(conn, Connection) else conn.connection())
        conn.execute(sa.text("SELECT 1"))

    with pytest.raises(ConfigurationError) as info:
        run_transaction(bind, unit)
    for c in held:
        c.close()
    assert ("isolation_level", True, 0, 0) == (
        info.value.field,
        "read_only=True" in info.value.fix,
        len(calls),
        count(direct, table, "ac"),
    )


def test_autocommit_engine_runs_read_only_units_and_explicit_levels(
    any_url: str, direct: Engine, table: str
) -> None:
    """read_only=True, or an explicit isolation_level, still run on an AUTOCOMMIT engine."""
    e = fault_engine(any_url, isolation_level="AUTOCOMMIT")
    insert = sa.text(f"INSERT INTO {table} (id, k, v) VALUES (1, 'lvl', 1)")
    read = run_transaction(e, lambda c: c.scalar(sa.text("SELECT 5")), read_only=True)
    run_transaction(e, lambda c: c.execute(insert), isolation_level="SERIALIZABLE")
    assert (5, 1) == (read, count(direct, table, "lvl"))


def test_refused_connect_is_tried_attempts_times_not_squared() -> None:
    """The engine retries a refused connect; the unit counts those attempts as its own."""
    policy = Policy(retry=RetryPolicy(attempts=3, initial=0.01, deadline=20))
    e = resilient_db.create_engine(
        "postgresql+psycopg://app:x@127.0.0.1:1/test", policy=policy, validate="off"
    )
    calls: list[int] = []
    with pytest.raises(sa_exc.OperationalError) as info:
        run_transaction(e, lambda c: calls.append(1))
    ctx = error_context(info.value)
    assert ctx is not None
    assert (3, 0, 3, ("refused",) * 3) == (
        resilience_of(e).connect_attempts,
        len(calls),
        ctx.attempt,
        tuple(h.partition(":")[0] for h in ctx.history),
    )


def test_bulkhead_rejection_is_not_rerun(sqlite_url: str) -> None:
    """PoolExhaustedError (here the bulkhead: no waiters allowed) is raised after one checkout."""
    pool = resilient_db.PoolPolicy(size=1, max_overflow=0, max_waiters=0)
    e = make_engine(sqlite_url, policy=Policy(retry=FAST.retry, pool=pool))
    calls: list[int] = []
    with e.connect() as held:
        held.execute(sa.text("SELECT 1"))
        with pytest.raises(resilient_db.PoolExhaustedError):
            run_transaction(e, lambda c: calls.append(1))
    assert (1, 0) == (resilience_of(e).pool_timeouts, len(calls))


def test_engine_recorded_retry_level_wins_over_classify(sqlite_url: str) -> None:
    """A context the engine attached decides the retry (as a multi-host engine re-routing does)."""
    e = make_engine(sqlite_url)
    with e.begin() as c:
        c.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        c.execute(sa.text("INSERT INTO t (id) VALUES (1)"))
    calls: list[int] = []

    def unit(conn: Connection) -> int:
        calls.append(1)
        try:
            conn.execute(sa.text("INSERT INTO t (id) VALUES (:i)"), {"i": len(calls)})
        except sa_exc.IntegrityError as err:  # classify(): application, never retried
            ctx = error_context(err)
            assert ctx is not None
            attach(err, dataclasses.replace(ctx, retry="transaction"))
            raise
        return len(calls)

    assert (2, 2) == (run_transaction(e, unit), len(calls))


# -- decorator ----------------------------------------------------------------------------


def test_transactional_decorator_passes_arguments_and_keys(sqlite_url: str) -> None:
    """@transactional injects the connection; the key is computed from the call's arguments."""
    e = make_engine(sqlite_url)
    resilient_db.ensure_idempotency_table(e)
    with e.begin() as c:
        c.execute(sa.text("CREATE TABLE ledger (ref VARCHAR(20), amount INTEGER)"))
    calls: list[str] = []

    @transactional(e, idempotency_key=lambda ref, amount: f"ledger-{ref}")
    def book(conn: Connection, ref: str, amount: int) -> int:
        calls.append(ref)
        conn.execute(sa.text("INSERT INTO ledger VALUES (:r, :a)"), {"r": ref, "a": amount})
        return amount

    results = [book("r1", 5), book("r1", 5), book("r2", 7)]
    assert ([5, ALREADY_COMMITTED, 7], ["r1", "r2"], "book") == (results, calls, book.__name__)


def test_transactional_refuses_a_coroutine_function(sqlite_url: str) -> None:
    """The sync decorator on an async function is a configuration error, not a silent no-op."""
    e = make_engine(sqlite_url)

    async def unit(conn: Any) -> None:
        return None

    with pytest.raises(ConfigurationError):
        transactional(e)(unit)


# -- async ---------------------------------------------------------------------------------


@pytest.fixture
async def aiosqlite_engine(sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    """A plain aiosqlite AsyncEngine with a table t(id primary key)."""
    e = create_async_engine(sqlite_url.replace("sqlite://", "sqlite+aiosqlite://"))
    async with e.begin() as c:
        await c.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
    yield e
    await e.dispose()


async def test_async_engine_and_session_run_and_commit(aiosqlite_engine: AsyncEngine) -> None:
    """run_transaction_async commits with an AsyncEngine and an async_sessionmaker."""

    async def add(conn: Any) -> int:
        await conn.execute(sa.text("INSERT INTO t (id) VALUES (1)"))
        return 1

    async def add_in_session(session: Any) -> int:
        await session.execute(sa.text("INSERT INTO t (id) VALUES (2)"))
        return 2

    a = await run_transaction_async(aiosqlite_engine, add)
    b = await run_transaction_async(async_sessionmaker(aiosqlite_engine), add_in_session)
    async with aiosqlite_engine.connect() as c:
        n = await c.scalar(sa.text("SELECT count(*) FROM t"))
    assert (1, 2, 2) == (a, b, n)


async def test_async_application_error_and_cancellation_are_not_retried(
    aiosqlite_engine: AsyncEngine,
) -> None:
    """A constraint violation and a CancelledError each propagate after one call."""
    calls: list[str] = []

    async def dup(conn: Any) -> None:
        calls.append("dup")
        await conn.execute(sa.text("INSERT INTO t (id) VALUES (1), (1)"))

    async def cancelled(conn: Any) -> None:
        calls.append("cancel")
        raise asyncio.CancelledError

    with pytest.raises(sa_exc.IntegrityError):
        await run_transaction_async(aiosqlite_engine, dup)
    with pytest.raises(asyncio.CancelledError):
        await run_transaction_async(aiosqlite_engine, cancelled)
    assert ["dup", "cancel"] == calls


async def test_transactional_async_decorator(aiosqlite_engine: AsyncEngine) -> None:
    """@transactional_async injects the AsyncConnection and passes the arguments."""

    @transactional_async(aiosqlite_engine)
    async def add(conn: Any, ident: int) -> int:
        await conn.execute(sa.text("INSERT INTO t (id) VALUES (:i)"), {"i": ident})
        return ident * 10

    assert [10, 20] == [await add(1), await add(2)]


def test_transactional_async_refuses_a_sync_function(aiosqlite_engine: AsyncEngine) -> None:
    """The async decorator on a plain function fails at decoration time, naming itself."""

    def unit(conn: Any) -> None:
        return None

    with pytest.raises(ConfigurationError) as info:
        transactional_async(aiosqlite_engine)(unit)  # type: ignore[arg-type]
    assert "transactional_async" == info.value.field


async def test_async_autocommit_engine_is_refused(sqlite_url: str) -> None:
    """An AsyncEngine in AUTOCOMMIT isolation is refused before fn runs."""
    e = create_async_engine(
        sqlite_url.replace("sqlite://", "sqlite+aiosqlite://"), isolation_level="AUTOCOMMIT"
    )
    calls: list[int] = []

    async def unit(conn: Any) -> None:
        calls.append(1)

    with pytest.raises(ConfigurationError) as info:
        await run_transaction_async(async_sessionmaker(e), unit)
    await e.dispose()
    assert ("isolation_level", []) == (info.value.field, calls)


@pytest.mark.parametrize("via", ["engine", "session"])
async def test_async_unit_that_committed_itself_keeps_its_later_work(
    aiosqlite_engine: AsyncEngine, via: str
) -> None:
    """Async twin: fn commits halfway and returns; the runner commits the rest."""

    async def unit(conn: Any) -> str:
        await conn.execute(sa.text("INSERT INTO t (id) VALUES (1)"))
        await conn.commit()
        await conn.execute(sa.text("INSERT INTO t (id) VALUES (2)"))
        return "ok"

    bind: Any = aiosqlite_engine if via == "engine" else async_sessionmaker(aiosqlite_engine)
    result = await run_transaction_async(bind, unit)
    async with aiosqlite_engine.connect() as c:
        rows = (await c.scalars(sa.text("SELECT id FROM t ORDER BY id"))).all()
    assert ("ok", [1, 2]) == (result, rows)


@pytest.fixture
def asyncpg_url(pg_url: str) -> str:
    """The shared PostgreSQL through asyncpg."""
    return sa.make_url(pg_url).set(drivername="postgresql+asyncpg").render_as_string(False)


@pytest.fixture
def pg_admin(pg_url: str) -> Iterator[Engine]:
    """A plain autocommit psycopg engine for setup and killing sessions."""
    e = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    yield e
    e.dispose()


@pytest.fixture
def pg_table(pg_admin: Engine) -> Iterator[str]:
    """A scratch table on PostgreSQL."""
    yield from _scratch(pg_admin)


async def test_asyncpg_killed_session_is_rerun_once(
    asyncpg_url: str, pg_admin: Engine, pg_table: str
) -> None:
    """asyncpg, plain AsyncEngine: a session killed before COMMIT is re-run; row once."""
    e = create_async_engine(asyncpg_url)
    calls: list[int] = []

    async def unit(conn: Any) -> str:
        calls.append(1)
        await conn.execute(
            sa.text(f"INSERT INTO {pg_table} (id, k, v) VALUES (:i, 'a', 1)"), {"i": len(calls)}
        )
        if len(calls) == 1:
            pid = await conn.scalar(sa.text("SELECT pg_backend_pid()"))
            await asyncio.to_thread(kill, pg_admin, pid)
            await conn.execute(sa.text("SELECT 1"))
        return "ok"

    result = await run_transaction_async(e, unit, policy=FAST)
    await e.dispose()
    assert ("ok", 2, 1) == (result, len(calls), count(pg_admin, pg_table, "a"))


async def test_asyncpg_ambiguous_commit_with_and_without_key(
    asyncpg_url: str, pg_admin: Engine, pg_table: str
) -> None:
    """asyncpg through the proxy: no key -> AmbiguousCommitError; a key -> written once."""
    resilient_db.ensure_idempotency_table(pg_admin)
    key = f"test-{uuid.uuid4().hex}"
    with FaultProxy("127.0.0.1", 5432) as proxy:
        url = sa.make_url(asyncpg_url).set(host=proxy.host, port=proxy.port)
        e = create_async_engine(url)
        calls: list[str] = []

        def unit(k: str) -> Callable[[Any], Any]:
            async def run(conn: Any) -> str:
                calls.append(k)
                n = len(calls)
                await conn.execute(
                    sa.text(f"INSERT INTO {pg_table} (id, k, v) VALUES (:i, :k, 1)"),
                    {"i": n, "k": k},
                )
                if calls.count(k) == 1:
                    await asyncio.to_thread(proxy.drop_commit_reply)
                return k

            return run

        with pytest.raises(AmbiguousCommitError):
            await run_transaction_async(e, unit("nokey"), policy=FAST)
        result = await run_transaction_async(e, unit("key"), policy=FAST, idempotency_key=key)
        await e.dispose()
    t = resilient_db.idempotency_table
    with pg_admin.connect() as c:
        c.execute(t.delete().where(t.c.idempotency_key == key))
    assert (["nokey", "key"], "key", 1, 1) == (
        calls,
        result,
        count(pg_admin, pg_table, "nokey"),
        count(pg_admin, pg_table, "key"),
    )


# -- async: the transaction-level faults of the sync runner, on every async driver ---------

ASYNC_DRIVERS = {
    "asyncpg": ("pg_url", "postgresql+asyncpg"),
    "psycopg_async": ("pg_url", "postgresql+psycopg_async"),
    "aiomysql": ("mariadb_url", "mysql+aiomysql"),
}


@pytest.fixture(params=list(ASYNC_DRIVERS))
def async_server(request: pytest.FixtureRequest) -> Iterator[tuple[str, Engine, str]]:
    """(async URL, plain sync autocommit engine, scratch table) for each async driver."""
    fixture, drivername = ASYNC_DRIVERS[request.param]
    url = sa.make_url(request.getfixturevalue(fixture))
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    scratch = _scratch(admin)
    table = next(scratch)
    yield url.set(drivername=drivername).render_as_string(False), admin, table
    next(scratch, None)
    admin.dispose()


async def test_async_deadlock_is_retried_and_matches_serial_execution(
    async_server: tuple[str, Engine, str],
) -> None:
    """Two tasks deadlock; the victim is re-run and the result equals a serial run."""
    url, admin, table = async_server
    e = resilient_db.create_async_engine(url, policy=FAST, validate="off")
    with admin.connect() as c:
        c.execute(sa.text(f"INSERT INTO {table} (id, k, v) VALUES (1, 'a', 0), (2, 'b', 0)"))
    barrier = asyncio.Barrier(2)
    calls = {"A": 0, "B": 0}
    failures: list[str | None] = []

    async def transfer(name: str, first: int, second: int, amount: int) -> None:
        async def unit(conn: Any) -> None:
            calls[name] += 1
            upd = sa.text(f"UPDATE {table} SET v = v + :a WHERE id = :i")
            try:
                await conn.execute(upd, {"a": amount, "i": first})
                if calls[name] == 1:
                    await asyncio.wait_for(barrier.wait(), 15)
                await conn.execute(upd, {"a": amount, "i": second})
            except Exception as exc:
                ctx = error_context(exc)
                failures.append(ctx.kind if ctx else repr(exc))
                raise

        await run_transaction_async(e, unit)

    results = await asyncio.gather(
        transfer("A", 1, 2, 10), transfer("B", 2, 1, 100), return_exceptions=True
    )
    await e.dispose()
    with admin.connect() as c:
        rows: dict[int, int] = dict(c.execute(sa.text(f"SELECT id, v FROM {table}")).all())
    assert ([None, None], ["deadlock"], {1: 110, 2: 110}, [1, 2]) == (
        results,
        failures,
        rows,
        sorted(calls.values()),
    )


async def test_async_serialization_failure_is_retried_and_matches_serial_execution(
    async_server: tuple[str, Engine, str],
) -> None:
    """Two read-modify-write units conflict; the loser is re-run and the counter ends at 2."""
    url, admin, table = async_server
    e = resilient_db.create_async_engine(url, policy=FAST, validate="off")
    iso = "REPEATABLE READ" if is_pg(url) else "SERIALIZABLE"
    with admin.connect() as c:
        c.execute(sa.text(f"INSERT INTO {table} (id, k, v) VALUES (1, 'n', 0)"))
    barrier = asyncio.Barrier(2)
    calls = {"A": 0, "B": 0}
    failures: list[str | None] = []

    async def increment(name: str) -> None:
        async def unit(conn: Any) -> None:
            calls[name] += 1
            try:
                v = await conn.scalar(sa.text(f"SELECT v FROM {table} WHERE id = 1"))
                if calls[name] == 1:
                    await asyncio.wait_for(barrier.wait(), 15)
                await conn.execute(sa.text(f"UPDATE {table} SET v = :v WHERE id = 1"), {"v": v + 1})
            except Exception as exc:
                ctx = error_context(exc)
                failures.append(ctx.kind if ctx else repr(exc))
                raise

        await run_transaction_async(e, unit, isolation_level=iso)

    results = await asyncio.gather(increment("A"), increment("B"), return_exceptions=True)
    await e.dispose()
    with admin.connect() as c:
        final = c.scalar(sa.text(f"SELECT v FROM {table} WHERE id = 1"))
    # PostgreSQL reports the lost update as 40001; MariaDB's SERIALIZABLE as a deadlock
    expected = "serialization_failure" if is_pg(url) else "deadlock"
    assert ([None, None], [expected], 2, [1, 2]) == (
        results,
        failures,
        final,
        sorted(calls.values()),
    )
