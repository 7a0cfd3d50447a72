"""Drop-in: an engine passed through wrap() behaves as SQLAlchemy's own, bar the resilience.

SQLAlchemy's own test suite is not shipped in its wheel (``sqlalchemy.testing`` is,
the tests are not), so these tests mirror the behaviours a wrapped engine must keep:
the application's ``do_connect`` listeners, ``creator=``, the exception types, the
pool and connection events, ``Connection.info`` and the settings wrap() leaves alone.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.ext.asyncio import create_async_engine

import resilient_db
from resilient_db import BreakerPolicy, Policy, RetryPolicy, _compat, error_context
from resilient_db._deadline import slot_of
from resilient_db._state import resilience_of
from resilient_db.breaker import CLOSED
from resilient_db.testing.proxy import FaultProxy

POLICY = Policy(
    retry=RetryPolicy(attempts=3, deadline=30),
    breaker=BreakerPolicy(failure_threshold=10),
)


@pytest.fixture
def engines() -> Iterator[Callable[[sa.Engine], sa.Engine]]:
    """Register an engine; it is disposed when the test ends."""
    made: list[sa.Engine] = []

    def track(engine: sa.Engine) -> sa.Engine:
        made.append(engine)
        return engine

    yield track
    for engine in made:
        engine.dispose()


@pytest.fixture
def pg_proxy(pg_url: str) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the PostgreSQL test server."""
    u = sa.make_url(pg_url)
    with FaultProxy(u.host or "127.0.0.1", u.port or 5432) as p:
        yield p


def _dead_port(pg_url: str) -> str:
    """``pg_url`` on a port nobody listens on: only a listener's cparams can fix it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return sa.make_url(pg_url).set(host="127.0.0.1", port=port).render_as_string(False)


def _application_name(engine: sa.Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(sa.text("SELECT current_setting('application_name')")).scalar())


# -- the application's do_connect listeners ----------------------------------------------


@pytest.mark.parametrize("when", ["before wrap", "after wrap", "after wrap, insert=True"])
def test_user_do_connect_listener_runs_and_sets_cparams(
    pg_url: str, when: str, engines: Callable[[sa.Engine], sa.Engine]
) -> None:
    """A do_connect listener (an IAM token's usual place) runs whenever it was registered."""
    engine = engines(sa.create_engine(pg_url))

    def token(dialect: Any, rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        cparams["application_name"] = "iam-token-app"

    if when == "before wrap":
        sa.event.listen(engine, "do_connect", token)
    resilient_db.wrap(engine, policy=POLICY)
    if when != "before wrap":
        sa.event.listen(engine, "do_connect", token, insert=when.endswith("insert=True"))
    assert "iam-token-app" == _application_name(engine)


def test_user_do_connect_listener_with_create_engine(
    pg_url: str, engines: Callable[[sa.Engine], sa.Engine]
) -> None:
    """create_engine's driver defaults are in cparams; the application's listener wins."""
    engine = engines(resilient_db.create_engine(pg_url, policy=POLICY, validate="off"))
    seen: list[str] = []

    @sa.event.listens_for(engine, "do_connect")
    def token(dialect: Any, rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        seen.append(str(cparams.get("connect_timeout")))
        cparams["application_name"] = "iam-token-app"

    want = [f"{POLICY.timeouts.connect:g}"]  # the policy's connect timeout, set by create_engine
    assert ("iam-token-app", want) == (_application_name(engine), seen)


def test_connect_retries_apply_to_the_listeners_cparams(
    pg_url: str, pg_proxy: FaultProxy, engines: Callable[[sa.Engine], sa.Engine]
) -> None:
    """The listener points at the server; its refused first attempt is retried and counted."""
    engine = engines(resilient_db.wrap(sa.create_engine(_dead_port(pg_url)), policy=POLICY))
    calls: list[int] = []

    @sa.event.listens_for(engine, "do_connect")
    def route(dialect: Any, rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        calls.append(1)
        cparams.update(host=pg_proxy.host, port=pg_proxy.port)

    r = resilience_of(engine)
    pg_proxy.refuse()

    def heal() -> None:  # runs before attempt 2
        if r.connect_attempts == 2:
            pg_proxy.passthrough()

    r.connect_faults.append(heal)
    with engine.connect() as conn:
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()
    assert (2, 2, 1) == (r.connect_attempts, len(calls), r.breaker.failures)  # type: ignore[union-attr]


def test_connect_failures_through_a_listener_are_classified(
    pg_url: str, pg_proxy: FaultProxy, engines: Callable[[sa.Engine], sa.Engine]
) -> None:
    """Every attempt refused: the final error is an OperationalError with its context."""
    engine = engines(resilient_db.wrap(sa.create_engine(_dead_port(pg_url)), policy=POLICY))

    @sa.event.listens_for(engine, "do_connect")
    def route(dialect: Any, rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        cparams.update(host=pg_proxy.host, port=pg_proxy.port)

    pg_proxy.refuse()
    with pytest.raises(sa.exc.OperationalError) as info:
        engine.connect()
    ctx = error_context(info.value)
    assert ctx is not None
    assert ("refused", 3) == (ctx.kind, ctx.attempt)


def test_user_listener_returning_a_connection_is_used_and_retried(
    pg_url: str, engines: Callable[[sa.Engine], sa.Engine]
) -> None:
    """A listener that connects by itself makes the connection, under the retry loop."""
    engine = engines(resilient_db.wrap(sa.create_engine(pg_url), policy=POLICY))
    attempts: list[int] = []

    @sa.event.listens_for(engine, "do_connect")
    def own(dialect: Any, rec: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        attempts.append(1)
        if len(attempts) == 1:
            raise psycopg.OperationalError("connection failed: Connection refused")
        return dialect.connect(*cargs, **{**cparams, "application_name": "own-connect"})

    assert ("own-connect", 2) == (_application_name(engine), len(attempts))


# -- errors that are not the database's ----------------------------------------------------


class TokenServiceDown(Exception):
    """An application's own error, raised in its do_connect listener."""


def test_type_error_from_connect_args_passes_through(
    sqlite_url: str, engines: Callable[[sa.Engine], sa.Engine]
) -> None:
    """A bad connect_args key raises the same TypeError as plain SQLAlchemy: not retried."""
    plain = engines(sa.create_engine(sqlite_url, connect_args={"no_such_option": 1}))
    with pytest.raises(TypeError) as expected:
        plain.connect()
    engine = engines(
        resilient_db.wrap(
            sa.create_engine(sqlite_url, connect_args={"no_such_option": 1}), policy=POLICY
        )
    )
    with pytest.raises(TypeError) as info:
        engine.connect()
    r = resilience_of(engine)
    assert (str(expected.value), 1, 0, None) == (
        str(info.value),
        r.connect_attempts,
        r.breaker.failures,  # type: ignore[union-attr]
        error_context(info.value),
    )


def test_application_error_in_a_listener_passes_through(
    pg_url: str, engines: Callable[[sa.Engine], sa.Engine]
) -> None:
    """The application's own exception reaches it unchanged and does not count."""
    engine = engines(resilient_db.wrap(sa.create_engine(pg_url), policy=POLICY))

    @sa.event.listens_for(engine, "do_connect")
    def token(dialect: Any, rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        raise TokenServiceDown("the token service is down")

    with pytest.raises(TokenServiceDown):
        engine.connect()
    r = resilience_of(engine)
    assert (1, 0, CLOSED) == (r.connect_attempts, r.breaker.failures, r.breaker.state)  # type: ignore[union-attr]


# -- creator= --------------------------------------------------------------------------------


def test_creator_keeps_connect_retries_and_classification(
    pg_url: str, pg_proxy: FaultProxy, engines: Callable[[sa.Engine], sa.Engine]
) -> None:
    """creator= connections are retried, counted and explained like the engine's own."""
    u = sa.make_url(pg_url)

    def creator() -> Any:
        return psycopg.connect(
            host=pg_proxy.host, port=pg_proxy.port, user=u.username, dbname=u.database
        )

    engine = engines(
        resilient_db.wrap(sa.create_engine("postgresql+psycopg://", creator=creator), policy=POLICY)
    )
    r = resilience_of(engine)
    pg_proxy.refuse()
    with pytest.raises(sa.exc.OperationalError) as info:
        engine.connect()
    ctx = error_context(info.value)
    assert ctx is not None
    assert ("refused", 3, 3) == (ctx.kind, ctx.attempt, r.connect_attempts)

    engine.dispose()  # the new pool connects through the same sequence
    r.connect_attempts = 0

    def heal() -> None:
        if r.connect_attempts == 2:
            pg_proxy.passthrough()

    r.connect_faults.append(heal)
    with engine.connect() as conn:
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()
        watched = slot_of(conn) is not None  # the connect-phase and call deadline
    assert (2, True) == (r.connect_attempts, watched)


def test_create_engine_with_creator(pg_url: str, engines: Callable[[sa.Engine], sa.Engine]) -> None:
    """resilient_db.create_engine(creator=...) goes through the connect sequence too."""
    u = sa.make_url(pg_url)
    calls: list[int] = []

    def creator(record: Any) -> Any:  # SQLAlchemy passes the pool record to a 1-arg creator
        calls.append(1)
        return psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database)

    engine = engines(
        resilient_db.create_engine(pg_url, creator=creator, policy=POLICY, validate="off")
    )
    with engine.connect() as conn:
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()
    assert (1, 1) == (len(calls), resilience_of(engine).connect_attempts)


# -- dialects without a driver attribute -----------------------------------------------------


class NoDriverDialect(SQLiteDialect_pysqlite):
    """A third-party dialect that sets no ``driver``."""

    supports_statement_cache = True

    @property
    def driver(self) -> str:  # type: ignore[override]
        raise AttributeError("driver")


registry.register("sqlite.rdbnodriver", __name__, "NoDriverDialect")


def test_dialect_without_driver_attribute(
    tmp_path: Any, engines: Callable[[sa.Engine], sa.Engine]
) -> None:
    """wrap() and create_engine() work on a dialect that has no driver attribute."""
    url = f"sqlite+rdbnodriver:///{tmp_path / 'nodriver.db'}"
    engine = engines(resilient_db.wrap(sa.create_engine(url), policy=POLICY))
    assert not hasattr(engine.dialect, "driver")
    with engine.connect() as conn:
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()
    made = engines(resilient_db.create_engine(url, policy=POLICY, validate="off"))
    with made.connect() as conn:
        assert 2 == conn.execute(sa.text("SELECT 2")).scalar()


# -- wrap() sets the server-side statement timeout on both servers alike ---------------------


def test_wrap_sets_the_statement_timeout_alike_on_postgresql_and_mariadb(
    pg_url: str, mariadb_url: str, engines: Callable[[sa.Engine], sa.Engine]
) -> None:
    """wrap() applies Timeouts.statement to PostgreSQL and MariaDB sessions, as documented."""
    pg = engines(resilient_db.wrap(sa.create_engine(pg_url), policy=POLICY))
    my = engines(resilient_db.wrap(sa.create_engine(mariadb_url), policy=POLICY))
    with pg.connect() as a, my.connect() as b:
        got = (
            a.execute(sa.text("SELECT current_setting('statement_timeout')")).scalar(),
            float(b.execute(sa.text("SELECT @@max_statement_time")).scalar()),  # type: ignore[arg-type]
        )
    statement = POLICY.timeouts.statement
    assert (f"{statement:g}s", statement) == got


# -- Connection.info is the application's ----------------------------------------------------


def test_connection_info_shows_nothing_of_resilient_db(
    server_url: str, engines: Callable[[sa.Engine], sa.Engine]
) -> None:
    """After calls, a failed statement and a check-in, info holds only what the app put."""
    engine = engines(resilient_db.create_engine(server_url, policy=POLICY, validate="off"))
    with engine.connect() as conn:
        conn.info["mine"] = 1
        conn.execute(sa.text("SELECT 1"))
        with pytest.raises(sa.exc.ProgrammingError):
            conn.execute(sa.text("SELECT * FROM rdb_no_such_table"))
        conn.rollback()
        assert {"mine": 1} == conn.info
        # the bookkeeping is still there, elsewhere
        assert _compat.record_state(_compat.record_of(conn)) is not None
    with engine.connect() as conn:
        assert {"mine": 1} == dict(conn.info)


async def test_async_connection_info_shows_nothing_of_resilient_db(pg_url: str) -> None:
    """An asyncpg AsyncConnection's info is empty after a query."""
    url = sa.make_url(pg_url).set(drivername="postgresql+asyncpg")
    engine = resilient_db.create_async_engine(url, policy=POLICY, validate="off")
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
            assert {} == conn.info
    finally:
        await engine.dispose()


# -- asyncpg: a closed connection is an OperationalError --------------------------------------


async def test_asyncpg_connection_closed_by_the_server_is_operational_error(pg_url: str) -> None:
    """A pooled asyncpg connection the server terminated fails as OperationalError, explained."""
    url = sa.make_url(pg_url).set(drivername="postgresql+asyncpg")
    plain = create_async_engine(url, pool_size=1, max_overflow=0)
    resilient_db.wrap_async(plain, policy=POLICY)
    killer = sa.create_engine(pg_url)
    try:
        async with plain.connect() as conn:
            pid = (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar()
        with killer.connect() as k:
            k.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        for _ in range(50):  # until asyncpg has seen the socket close
            await asyncio.sleep(0.02)
            async with plain.connect() as conn:
                raw = await conn.get_raw_connection()
                if raw.driver_connection.is_closed():  # type: ignore[union-attr]
                    break
        with pytest.raises(sa.exc.OperationalError) as info:
            async with plain.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        ctx = error_context(info.value)
        assert ctx is not None
        assert ("disconnect", True) == (ctx.kind, info.value.connection_invalidated)
        async with plain.connect() as conn:  # the pool replaced it
            assert 1 == (await conn.execute(sa.text("SELECT 1"))).scalar()
    finally:
        killer.dispose()
        await plain.dispose()


# -- SQLAlchemy behaviours a wrapped engine keeps ---------------------------------------------


def _pair(url: str, engines: Callable[[sa.Engine], sa.Engine]) -> list[sa.Engine]:
    """A plain engine and a wrapped one on the same URL."""
    return [
        engines(sa.create_engine(url)),
        engines(resilient_db.wrap(sa.create_engine(url), policy=POLICY)),
    ]


def test_pool_and_connection_events_fire_as_unwrapped(
    any_url: str, engines: Callable[[sa.Engine], sa.Engine]
) -> None:
    """connect / checkout / checkin / begin / commit events: same sequence with wrap()."""
    seqs = []
    for engine in _pair(any_url, engines):
        seq: list[str] = []
        names = ("connect", "first_connect", "checkout", "checkin", "reset")
        for name in (*names, "begin", "commit", "rollback"):
            sa.event.listen(engine, name, lambda *a, _n=name, _s=seq: _s.append(_n))
        for _ in range(2):
            with engine.begin() as conn:
                conn.execute(sa.text("SELECT 1"))
        seqs.append(seq)
    assert seqs[0] == seqs[1]


def test_exception_types_match_unwrapped(
    any_url: str, engines: Callable[[sa.Engine], sa.Engine]
) -> None:
    """Bad SQL, a constraint violation and a bad parameter raise the same exception types."""
    table = f"rdb_dropin_{uuid.uuid4().hex[:8]}"
    got = []
    for engine in _pair(any_url, engines):
        kinds = []
        with engine.begin() as conn:
            conn.execute(sa.text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY)"))
            conn.execute(sa.text(f"INSERT INTO {table} VALUES (1)"))
        for sql, params in (
            ("SELECT * FROM rdb_no_such_table_x", {}),
            (f"INSERT INTO {table} VALUES (1)", {}),
            (f"SELECT * FROM {table} WHERE id = :missing", {}),
        ):
            try:
                with engine.begin() as conn:
                    conn.execute(sa.text(sql), params)
            except Exception as e:
                kinds.append(type(e))
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE {table}"))
        got.append(kinds)
    assert got[0] == got[1]
    assert 3 == len(got[1])


def test_user_handle_error_listener_still_replaces_errors(
    sqlite_url: str, engines: Callable[[sa.Engine], sa.Engine]
) -> None:
    """An application's handle_error listener sees the error and may replace it."""
    engine = engines(resilient_db.wrap(sa.create_engine(sqlite_url), policy=POLICY))

    class Mine(Exception):
        pass

    @sa.event.listens_for(engine, "handle_error")
    def replace(ctx: Any) -> BaseException:
        return Mine(type(ctx.original_exception).__name__)

    with pytest.raises(Mine) as info, engine.connect() as conn:
        conn.execute(sa.text("SELECT * FROM rdb_no_such_table"))
    assert "OperationalError" == str(info.value)


def test_execution_options_copies_share_resilience(
    sqlite_url: str, engines: Callable[[sa.Engine], sa.Engine]
) -> None:
    """Engine.execution_options() copies run with the same state and keep their options."""
    engine = engines(resilient_db.wrap(sa.create_engine(sqlite_url), policy=POLICY))
    copy = engine.execution_options(isolation_level="AUTOCOMMIT")
    with copy.connect() as conn:
        level = conn.get_execution_options()["isolation_level"]
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()
    assert (resilience_of(engine), "AUTOCOMMIT") == (resilience_of(copy), level)


def test_invalidate_and_dispose_reconnect(
    any_url: str, engines: Callable[[sa.Engine], sa.Engine]
) -> None:
    """Connection.invalidate() and Engine.dispose() reconnect as SQLAlchemy does."""
    engine = engines(resilient_db.wrap(sa.create_engine(any_url), policy=POLICY))
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        conn.invalidate()
        assert conn.invalidated
        conn.rollback()
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()  # reconnects
    engine.dispose()
    with engine.connect() as conn:
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()
    assert 0 == resilience_of(engine).breaker.failures  # type: ignore[union-attr]


def test_raw_connection_and_pre_ping(
    any_url: str, engines: Callable[[sa.Engine], sa.Engine]
) -> None:
    """Engine.raw_connection() and pool_pre_ping=True work on a wrapped engine."""
    engine = engines(
        resilient_db.wrap(sa.create_engine(any_url, pool_pre_ping=True), policy=POLICY)
    )
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute("SELECT 1")
        assert 1 == cur.fetchone()[0]
        cur.close()
    finally:
        raw.close()
    with engine.connect() as conn:
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()


def test_sqlite_creator_engine_is_unchanged(engines: Callable[[sa.Engine], sa.Engine]) -> None:
    """A creator= SQLite engine (the memory-database idiom) connects once per record."""
    made: list[int] = []

    def creator() -> sqlite3.Connection:
        made.append(1)
        return sqlite3.connect(":memory:", check_same_thread=False)

    engine = engines(
        resilient_db.wrap(
            sa.create_engine("sqlite://", creator=creator, poolclass=sa.pool.StaticPool),
            policy=POLICY,
        )
    )
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
    with engine.connect() as conn:
        assert 0 == conn.execute(sa.text("SELECT count(*) FROM t")).scalar()
    assert [1] == made
