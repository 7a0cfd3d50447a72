"""Every fault of faults.md injected for real: kind, retry level, diagnosis, and no leaks.

One table (``CASES``) drives one test. Each case runs an injector against a real
server and hands back the error; :func:`check` asserts the classification, the
:class:`~resilient_db.ErrorContext`, the breaker accounting, and that the
SENTINEL password / bind parameter reaches neither ``str()``, ``repr()``,
``__notes__``, ``error_context(exc).to_dict()`` nor a log record.

Faults that stop, restart or reconfigure a server run on the throw-away servers
of ``tests/servers.py``; network faults go through :class:`FaultProxy`. On the
throw-away servers the test user's real password *is* the SENTINEL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sqlite3
import subprocess
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine

import resilient_db
from resilient_db import (
    AmbiguousCommitError,
    BreakerPolicy,
    Kind,
    Policy,
    PoolExhaustedError,
    PoolPolicy,
    RetryLevel,
    RetryPolicy,
    Target,
    Timeouts,
    classify,
    error_context,
)
from resilient_db.testing import FaultProxy
from tests.conftest import SENTINEL
from tests.servers import APP_USER, MariaServer, PgServer, free_port

INVALID_HOST = "db.does-not-exist.invalid"
LOOPBACK = "127.0.0.1"
PG, MY, LITE = "pg", "mariadb", "sqlite"

#: Short timeouts, one connect attempt, no idle pings, no silence probes (they would race
#: the call deadline; tests/test_reachability.py covers them): the raw fault reaches the caller.
NO_PROBES = BreakerPolicy(probe_after=None)
FAST = Policy(
    timeouts=Timeouts(connect=2, checkout=1, statement=None, call=3),
    pool=PoolPolicy(size=2, max_overflow=1, max_waiters=None, ping_after_idle=None),
    retry=RetryPolicy(attempts=1),
    breaker=NO_PROBES,
    validate="off",
)


def policy(**timeouts: float | None) -> Policy:
    """FAST with some timeouts changed."""
    t = FAST.timeouts
    merged: dict[str, Any] = {
        "connect": t.connect,
        "checkout": t.checkout,
        "statement": t.statement,
        "call": t.call,
    }
    merged.update(timeouts)
    return Policy(
        timeouts=Timeouts(**merged),
        pool=FAST.pool,
        retry=FAST.retry,
        breaker=NO_PROBES,
        validate="off",
    )


# --------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Want:
    """What the library must say about one fault."""

    kind: Kind
    retry: RetryLevel
    counts: bool
    fragment: str
    phase: str | None = None
    #: what classify() says from the exception alone, when the engine knew better
    #: (e.g. its watchdog fired, so a "server closed the connection" is a read timeout)
    raw: Kind | None = None


W_REFUSED = Want(
    Kind.REFUSED, RetryLevel.CONNECT, True, "Nothing is accepting connections at", "connect"
)
W_DNS = Want(
    Kind.DNS, RetryLevel.NEVER, False, f"Host name '{INVALID_HOST}' does not resolve", "connect"
)
W_BLACKHOLE = Want(
    Kind.CONNECT_TIMEOUT, RetryLevel.CONNECT, True, "sent no database greeting", "connect"
)
W_AUTH = Want(
    Kind.AUTHENTICATION, RetryLevel.NEVER, False, "Authentication failed for user 'app'", "connect"
)
W_NO_DB = Want(
    Kind.UNKNOWN_DATABASE,
    RetryLevel.NEVER,
    False,
    "Database 'no_such_db' does not exist",
    "connect",
)
W_NO_USER_PG = Want(
    Kind.AUTHENTICATION,
    RetryLevel.NEVER,
    False,
    "the password is wrong or the user does not exist",
    "connect",
)
#: MariaDB 10.11 answers 1045 for an unknown user too (faults.md saw 1698)
W_NO_USER_ANY = Want(
    Kind.AUTHENTICATION,
    RetryLevel.NEVER,
    False,
    "Authentication failed for user 'no_such_user'",
    "connect",
)
W_NO_USER = Want(
    Kind.UNKNOWN_USER,
    RetryLevel.NEVER,
    False,
    "Authentication failed for 'no_such_user'",
    "connect",
)
W_TLS = Want(Kind.TLS, RetryLevel.NEVER, False, "TLS mismatch with", "connect")
W_TOO_MANY = Want(
    Kind.TOO_MANY_CONNECTIONS, RetryLevel.CONNECT, True, "connection limit is reached", "connect"
)
W_TERMINATED = Want(
    Kind.ADMIN_TERMINATED, RetryLevel.TRANSACTION, True, "The server ended the session on"
)
W_LOST = Want(Kind.DISCONNECT, RetryLevel.TRANSACTION, True, "was lost", "execute")
W_CANCELLED = Want(
    Kind.QUERY_CANCELED, RetryLevel.TRANSACTION, False, "cancelled by another session", "execute"
)
W_STATEMENT_TIMEOUT = Want(
    Kind.STATEMENT_TIMEOUT, RetryLevel.NEVER, False, "statement timeout", "execute"
)
W_LOCK = Want(Kind.LOCK_TIMEOUT, RetryLevel.TRANSACTION, False, "waiting for a lock", "execute")
#: SQLite's lock covers the whole database, so a busy timeout counts for the breaker
W_SQLITE_LOCK = Want(
    Kind.LOCK_TIMEOUT, RetryLevel.TRANSACTION, True, "waiting for a lock", "execute"
)
W_DEADLOCK = Want(
    Kind.DEADLOCK,
    RetryLevel.TRANSACTION,
    False,
    "Deadlock with a concurrent transaction",
    "execute",
)
W_SERIALIZATION = Want(
    Kind.SERIALIZATION_FAILURE, RetryLevel.TRANSACTION, False, "Serialization conflict", "execute"
)
W_READ_ONLY = Want(Kind.READ_ONLY, RetryLevel.NEVER, False, "is read-only", "execute")
W_SHUTTING_DOWN = Want(
    Kind.SERVER_SHUTDOWN, RetryLevel.CONNECT, True, "shutting down or restarting", "connect"
)
W_DISK_FULL = Want(Kind.DISK_FULL, RetryLevel.NEVER, True, "out of disk space", "execute")
W_IDLE = Want(
    Kind.IDLE_TIMEOUT, RetryLevel.CONNECT, True, "sat idle longer than its timeout", "execute"
)
W_IDLE_IN_TX = Want(
    Kind.IDLE_TIMEOUT, RetryLevel.TRANSACTION, True, "sat idle longer than its timeout", "execute"
)
W_WATCHDOG = Want(
    Kind.READ_TIMEOUT,
    RetryLevel.TRANSACTION,
    True,
    "no reply within the per-call deadline",
    raw=Kind.DISCONNECT,
)
W_POOL = Want(Kind.POOL_EXHAUSTED, RetryLevel.CONNECT, False, "pool exhausted", "checkout")
W_POOL_RAW = Want(Kind.POOL_EXHAUSTED, RetryLevel.CONNECT, False, "local pool connections")
W_AMBIGUOUS = Want(
    Kind.AMBIGUOUS_COMMIT,
    RetryLevel.NEVER,
    True,
    "may or may not have committed",
    "commit",
)
W_SQLITE_OPEN = Want(
    Kind.CONFIGURATION, RetryLevel.NEVER, False, "missing file or directory", "connect"
)


# --------------------------------------------------------------------------- the check


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        orig = getattr(e, "orig", None)
        todo += [orig if isinstance(orig, BaseException) else None, e.__cause__, e.__context__]


def assert_no_secret(exc: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    """The SENTINEL appears nowhere a user, a log or a tracer could see it."""
    ctx = error_context(exc)
    places: dict[str, str] = {
        "traceback": "".join(traceback.format_exception(exc)),
        "context": json.dumps(ctx.to_dict(), default=repr) if ctx is not None else "",
        "logs": caplog.text
        + "\n".join(r.getMessage() for r in caplog.records)
        + "\n".join(repr(r.args) for r in caplog.records),
    }
    for i, e in enumerate(_chain(exc)):
        places[f"str[{i}]"] = str(e)
        places[f"repr[{i}]"] = repr(e)
        places[f"notes[{i}]"] = "\n".join(getattr(e, "__notes__", ()))
    leaked = sorted(where for where, text in places.items() if SENTINEL in text)
    assert [] == leaked


def check(
    exc: BaseException,
    want: Want,
    engine: Engine | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Assert the classification, the attached context and breaker accounting of ``exc``."""
    target = Target.from_url(engine.url) if engine is not None else None
    ctx = error_context(exc)
    resilient = engine is not None and _is_resilient(engine)
    # the breaker counts failed attempts to reach the database: a counted kind counts at
    # connect (SQLite's database-wide lock anywhere), never on an established session
    phase = ctx.phase if resilient and ctx is not None else want.phase
    counts = want.counts and (want is W_SQLITE_LOCK or phase in (None, "connect"))
    if resilient:
        assert ctx is not None, f"no ErrorContext on {exc!r}"
        got = (ctx.kind, ctx.retry, want.fragment in ctx.diagnosis)
        assert (want.kind.value, want.retry.value, True) == got, f"{ctx.diagnosis} <- {exc!r}"
        if want.phase is not None:
            assert want.phase == ctx.phase
        assert target is not None
        assert (target.host, target.port, target.user, target.database) == (
            ctx.host,
            ctx.port,
            ctx.user,
            ctx.database,
        )
        c = classify(exc, phase=ctx.phase, target=target)
        snap = resilient_db.breaker_state(engine)
        assert snap is not None
        assert counts == (snap.failures > 0)
        if want.raw is not None:
            assert want.raw == c.kind
            assert_no_secret(exc, caplog)
            return
        assert ctx.code == c.code
        if c.kind is not Kind.POOL_EXHAUSTED:  # the engine adds pool numbers
            assert ctx.diagnosis == c.diagnosis
    else:
        c = classify(exc, phase=want.phase, target=target)
        assert want.fragment in c.diagnosis, c.diagnosis
    assert (want.kind, want.retry, counts) == (c.kind, c.retry, c.counts_for_breaker), repr(exc)
    assert_no_secret(exc, caplog)


def _is_resilient(engine: Engine) -> bool:
    try:
        resilient_db.policy_of(engine)
    except resilient_db.ConfigurationError:
        return False
    return True


# --------------------------------------------------------------------------- helpers


def raised(fn: Callable[[], object]) -> BaseException:
    """Run ``fn`` and return what it raised (an AssertionError if nothing)."""
    try:
        fn()
    except Exception as e:
        return e
    raise AssertionError("the fault was injected but nothing was raised")


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` (for server-side events no clock can be injected into)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


class Background:
    """Run ``fn`` in a thread and keep what it raised."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except BaseException as e:
            self.error = e

    def join(self, timeout: float = 20.0) -> BaseException | None:
        """Wait for the thread; return its exception or None."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "background call did not finish"
        return self.error


def execute(engine: Engine, sql: str, **params: Any) -> Any:
    """Run one statement in its own transaction; return the result rows."""
    with engine.begin() as c:
        result = c.execute(sa.text(sql), params)
        return result.fetchall() if result.returns_rows else None


def pg_url(
    *,
    host: str = LOOPBACK,
    port: int,
    user: str,
    password: str | None = SENTINEL,
    database: str = "app",
    driver: str = "psycopg",
    **query: str,
) -> URL:
    """A PostgreSQL URL."""
    return URL.create(
        f"postgresql+{driver}", user, password, host, port, database, query=query or {}
    )


def my_url(
    *,
    host: str = LOOPBACK,
    port: int,
    user: str,
    password: str | None = SENTINEL,
    database: str = "test",
    driver: str = "pymysql",
) -> URL:
    """A MariaDB URL."""
    return URL.create(f"mysql+{driver}", user, password, host, port, database)


def table_name() -> str:
    """A unique scratch table name."""
    return f"rdb_fault_{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- servers


@dataclass
class PgBox:
    """The throw-away PostgreSQL with a test role whose password is the SENTINEL."""

    server: PgServer
    user: str
    db: str
    ro_db: str
    #: the driver of the URLs :meth:`url` builds (test_classify_faults_drivers.py)
    driver: str = "psycopg"

    def url(self, **kw: Any) -> URL:
        """URL of the test role (override any part)."""
        args: dict[str, Any] = {
            "port": self.server.port,
            "user": self.user,
            "database": self.db,
            "driver": self.driver,
        }
        args.update(kw)
        return pg_url(**args)

    def admin(self, sql: str, *params: Any, database: str | None = None) -> list[Any]:
        """Run ``sql`` as the trusted superuser on a fresh connection."""
        with psycopg.connect(
            host=self.server.host,
            port=self.server.port,
            user="postgres",
            dbname=database or self.db,
            autocommit=True,
            connect_timeout=5,
        ) as conn:
            cur = conn.execute(sql, params or None)  # type: ignore[call-overload]
            return cur.fetchall() if cur.description else []

    def wait_active(self, pid: int, fragment: str) -> None:
        """Wait until backend ``pid`` is running a statement containing ``fragment``."""
        wait_until(
            lambda: bool(
                self.admin(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active' "
                    "AND wait_event_type IS DISTINCT FROM 'Client' AND query LIKE %s",
                    pid,
                    f"%{fragment}%",
                )
            )
        )


@dataclass
class MariaBox:
    """The throw-away MariaDB with a test user whose password is the SENTINEL."""

    server: MariaServer
    user: str

    def url(self, **kw: Any) -> URL:
        """URL of the test user (override any part)."""
        args: dict[str, Any] = {"port": self.server.port, "user": self.user}
        args.update(kw)
        return my_url(**args)

    def admin(self, sql: str, *params: Any) -> list[Any]:
        """Run ``sql`` as root on a fresh connection."""
        conn = pymysql.connect(
            host=self.server.host,
            port=self.server.port,
            user="root",
            database="test",
            autocommit=True,
            connect_timeout=5,
        )
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params or None)
                return list(cur.fetchall())
        finally:
            conn.close()

    def wait_active(self, cid: int, state_fragment: str) -> None:
        """Wait until connection ``cid`` is executing a statement in the given state."""
        wait_until(
            lambda: bool(
                self.admin(
                    "SELECT 1 FROM information_schema.processlist WHERE id = %s "
                    "AND command = 'Query' AND state LIKE %s",
                    cid,
                    f"%{state_fragment}%",
                )
            )
        )


@pytest.fixture(scope="module")
def pg_box(throwaway_pg: PgServer) -> Iterator[PgBox]:
    """A role (password = SENTINEL), its database and a read-only database."""
    tag = uuid.uuid4().hex[:8]
    user, db, ro = f"rdb_snt_{tag}", f"rdb_snt_{tag}", f"rdb_ro_{tag}"
    throwaway_pg.psql(
        f"CREATE ROLE {user} LOGIN PASSWORD '{SENTINEL}';\n"
        f"CREATE DATABASE {db} OWNER {user};\n"
        f"ALTER DATABASE {db} SET deadlock_timeout = '100ms';\n"
        f"ALTER ROLE {user} SET temp_file_limit = '256kB';\n"
        f"CREATE DATABASE {ro} OWNER {user};\n"
    )
    throwaway_pg.psql(
        f"CREATE TABLE ro_t (id int PRIMARY KEY, v text);\n"
        f"ALTER TABLE ro_t OWNER TO {user};\n"
        f"ALTER DATABASE {ro} SET default_transaction_read_only = on;\n",
        database=ro,
    )
    box = PgBox(throwaway_pg, user, db, ro)
    yield box
    with contextlib.suppress(Exception):
        throwaway_pg.start()
        throwaway_pg.psql(
            f"DROP DATABASE IF EXISTS {db} WITH (FORCE);\n"
            f"DROP DATABASE IF EXISTS {ro} WITH (FORCE);\n"
            f"DROP ROLE IF EXISTS {user};\n"
        )


@pytest.fixture(scope="module")
def maria_box(throwaway_mariadb: MariaServer) -> Iterator[MariaBox]:
    """A user (password = SENTINEL) with ALL on ``test.*`` but no admin privilege."""
    user = f"rdb_snt_{uuid.uuid4().hex[:8]}"
    throwaway_mariadb.sql(
        f"CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{SENTINEL}';"
        f"GRANT ALL ON test.* TO '{user}'@'127.0.0.1';"
    )
    yield MariaBox(throwaway_mariadb, user)
    with contextlib.suppress(Exception):
        throwaway_mariadb.start()
        throwaway_mariadb.sql(f"DROP USER IF EXISTS '{user}'@'127.0.0.1';")


class Env:
    """What an injector may use; every resource is released after the test."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.request = request
        self.tmp_path = tmp_path
        self._cleanups: list[Callable[[], object]] = []
        self.inject_db = ""  # the database of the case being injected
        self.pg_driver = "psycopg"  # the PostgreSQL driver of the case being injected

    @cached_property
    def pg(self) -> PgBox:
        """The throw-away PostgreSQL (its URLs name ``pg_driver``)."""
        box = self.request.getfixturevalue("pg_box")
        assert isinstance(box, PgBox)
        return dataclasses.replace(box, driver=self.pg_driver)

    def pg_settings(self, **settings: object) -> dict[str, Any]:
        """``connect_args`` that set PostgreSQL session settings with the case's driver."""
        if self.pg_driver == "asyncpg":
            return {"server_settings": {k: str(v) for k, v in settings.items()}}
        return {"options": " ".join(f"-c {k}={v}" for k, v in settings.items())}

    @cached_property
    def maria(self) -> MariaBox:
        """The throw-away MariaDB."""
        box = self.request.getfixturevalue("maria_box")
        assert isinstance(box, MariaBox)
        return box

    def defer(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` at teardown (last registered, first run)."""
        self._cleanups.append(fn)

    def engine(self, url: URL | str, policy: Policy = FAST, **kw: Any) -> Engine:
        """A resilient engine, disposed at teardown (an asyncpg engine's ``sync_engine``:
        the injector then runs in a greenlet, see test_classify_faults_drivers.py)."""
        if sa.make_url(url).get_driver_name() == "asyncpg":
            aeng = resilient_db.create_async_engine(url, policy=policy, validate="off", **kw)
            self.defer(aeng.sync_engine.dispose)
            return aeng.sync_engine
        eng = resilient_db.create_engine(url, policy=policy, validate="off", **kw)
        self.defer(eng.dispose)
        return eng

    def plain_engine(self, url: URL | str, **kw: Any) -> Engine:
        """A plain SQLAlchemy engine (parameters hidden), disposed at teardown."""
        eng = sa.create_engine(url, hide_parameters=True, **kw)
        self.defer(eng.dispose)
        return eng

    def proxy(self, host: str, port: int) -> FaultProxy:
        """A started FaultProxy in front of ``host:port``."""
        p = FaultProxy(host, port).start()
        self.defer(p.close)
        return p

    def pg_table(self) -> str:
        """A scratch table ``(id int primary key, v text)`` with rows 1 and 2."""
        name = table_name()
        self.pg.admin(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
        self.pg.admin(f"ALTER TABLE {name} OWNER TO {self.pg.user}")
        self.pg.admin(f"INSERT INTO {name} VALUES (1, 'a'), (2, 'b')")
        self.defer(lambda: self.pg.admin(f"DROP TABLE IF EXISTS {name}"))
        return name

    def maria_table(self) -> str:
        """A scratch InnoDB table ``(id int primary key, v text)`` with rows 1 and 2."""
        name = table_name()
        self.maria.admin(f"CREATE TABLE {name} (id int PRIMARY KEY, v text) ENGINE=InnoDB")
        self.maria.admin(f"INSERT INTO {name} VALUES (1, 'a'), (2, 'b')")
        self.defer(lambda: self.maria.admin(f"DROP TABLE IF EXISTS {name}"))
        return name

    def close(self) -> None:
        """Run the cleanups."""
        errors = []
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception as e:  # keep cleaning up
                errors.append(e)
        self._cleanups.clear()
        assert [] == errors


Hit = tuple[BaseException, Engine | None]


# ================================================================ 1 server down / port closed


def pg_refused(env: Env) -> Hit:
    """Connect to a loopback port with no listener."""
    eng = env.engine(pg_url(port=free_port(), user=APP_USER))
    return raised(eng.connect), eng


def my_refused(env: Env) -> Hit:
    """Connect to a loopback port with no listener."""
    eng = env.engine(my_url(port=free_port(), user=APP_USER))
    return raised(eng.connect), eng


# ================================================================ 2 wrong host (DNS)


def pg_dns(env: Env) -> Hit:
    """Connect to a host name that cannot resolve."""
    eng = env.engine(pg_url(host=INVALID_HOST, port=5432, user=APP_USER))
    return raised(eng.connect), eng


def my_dns(env: Env) -> Hit:
    """Connect to a host name that cannot resolve."""
    eng = env.engine(my_url(host=INVALID_HOST, port=3306, user=APP_USER))
    return raised(eng.connect), eng


# ================================================================ 3 blackhole


def _blackhole(env: Env, make_url: Callable[..., URL]) -> Hit:
    proxy = env.proxy(LOOPBACK, free_port())
    proxy.blackhole()
    # call (the read timeout) far above connect: the handshake must obey connect
    eng = env.engine(make_url(host=proxy.host, port=proxy.port, user=APP_USER), policy(call=30))
    t0 = time.monotonic()
    exc = raised(eng.connect)
    elapsed = time.monotonic() - t0
    assert 1 == proxy.connections_total
    assert elapsed < 2 + 1.5, f"connect took {elapsed:.2f}s with connect timeout 2s"
    return exc, eng


def pg_blackhole(env: Env) -> Hit:
    """A listener that accepts and never answers: fail within the connect timeout."""
    return _blackhole(env, pg_url)


def my_blackhole(env: Env) -> Hit:
    """A listener that accepts and never answers: fail within the connect timeout."""
    return _blackhole(env, my_url)


# ================================================================ 4 wrong password


def pg_bad_password(env: Env) -> Hit:
    """The app user with the SENTINEL as a wrong password."""
    eng = env.engine(pg_url(port=env.pg.server.port, user=APP_USER))
    return raised(eng.connect), eng


def my_bad_password(env: Env) -> Hit:
    """The app user with the SENTINEL as a wrong password."""
    eng = env.engine(my_url(port=env.maria.server.port, user=APP_USER))
    return raised(eng.connect), eng


# ================================================================ 5 unknown database


def pg_no_db(env: Env) -> Hit:
    """A database that does not exist (the role authenticates fine)."""
    eng = env.engine(env.pg.url(database="no_such_db"))
    return raised(eng.connect), eng


def my_no_db_limited(env: Env) -> Hit:
    """A database that does not exist, as a user without global privileges (1044)."""
    eng = env.engine(env.maria.url(database="no_such_db"))
    return raised(eng.connect), eng


def my_no_db_admin(env: Env) -> Hit:
    """A database that does not exist, as root (1049)."""
    eng = env.engine(env.maria.url(user="root", password=None, database="no_such_db"))
    return raised(eng.connect), eng


def sqlite_no_dir(env: Env) -> Hit:
    """A SQLite file in a directory that does not exist."""
    eng = env.engine(f"sqlite:///{env.tmp_path / 'missing' / 'x.db'}")
    return raised(eng.connect), eng


# ================================================================ 6 unknown user


def pg_no_user(env: Env) -> Hit:
    """A user that does not exist (password auth): the same as a wrong password."""
    eng = env.engine(env.pg.url(user="no_such_user"))
    return raised(eng.connect), eng


def pg_no_role(env: Env) -> Hit:
    """A role that does not exist where no password is asked (trust, the shared server)."""
    url = sa.make_url(env.request.getfixturevalue("pg_url")).set(username="no_such_user")
    eng = env.engine(url.set(password=SENTINEL))
    return raised(eng.connect), eng


def my_no_user(env: Env) -> Hit:
    """A user that does not exist (1698 on MariaDB, not 1045)."""
    eng = env.engine(env.maria.url(user="no_such_user"))
    return raised(eng.connect), eng


# ================================================================ 7 TLS mismatch


def pg_tls_required(env: Env) -> Hit:
    """The client requires TLS (sslmode=require); the server has none."""
    eng = env.engine(env.pg.url(sslmode="require"))
    return raised(eng.connect), eng


def pg_tls_rejected(env: Env) -> Hit:
    """The server requires TLS (hostnossl ... reject); the client does not use it."""
    hba = env.pg.server.datadir / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text(f"hostnossl {env.pg.db} {env.pg.user} 127.0.0.1/32 reject\n{original}")

    def restore() -> None:
        hba.write_text(original)
        env.pg.admin("SELECT pg_reload_conf()")

    env.defer(restore)
    env.pg.admin("SELECT pg_reload_conf()")
    eng = env.engine(env.pg.url(sslmode="disable"))
    return raised(eng.connect), eng


def my_tls_required(env: Env) -> Hit:
    """The client requires TLS (ssl_verify_cert); the server has none (2026)."""
    assert [("have_ssl", "DISABLED")] == [
        tuple(r) for r in env.maria.admin("SHOW GLOBAL VARIABLES LIKE 'have_ssl'")
    ]
    eng = env.engine(env.maria.url(), connect_args={"ssl_verify_cert": True})
    return raised(eng.connect), eng


# ================================================================ 8 too many connections


def pg_role_limit(env: Env) -> Hit:
    """A role at its CONNECTION LIMIT: 'too many connections for role'."""
    box = env.pg
    box.admin(f"ALTER ROLE {box.user} CONNECTION LIMIT 1")
    env.defer(lambda: box.admin(f"ALTER ROLE {box.user} CONNECTION LIMIT -1"))
    eng = env.engine(box.url())
    with env.engine(box.url()).connect():  # takes the only slot
        return raised(eng.connect), eng


def my_user_limit(env: Env) -> Hit:
    """A user at MAX_USER_CONNECTIONS (1226)."""
    box = env.maria
    box.admin(f"ALTER USER '{box.user}'@'127.0.0.1' WITH MAX_USER_CONNECTIONS 1")
    env.defer(lambda: box.admin(f"ALTER USER '{box.user}'@'127.0.0.1' WITH MAX_USER_CONNECTIONS 0"))
    eng = env.engine(box.url())
    with env.engine(box.url()).connect():
        return raised(eng.connect), eng


def my_server_limit(env: Env) -> Hit:
    """The server at max_connections (1040); MariaDB clamps it to at least 10."""
    box = env.maria
    before = int(box.admin("SELECT @@global.max_connections")[0][0])
    box.server.set_global(max_connections=10)
    env.defer(lambda: box.server.set_global(max_connections=before))
    holders = []
    env.defer(lambda: [h.close() for h in holders])
    eng = env.engine(box.url())
    for _ in range(12):
        try:
            holders.append(
                pymysql.connect(
                    host=LOOPBACK,
                    port=box.server.port,
                    user=box.user,
                    password=SENTINEL,
                    database="test",
                )
            )
        except pymysql.err.OperationalError:
            break
    return raised(eng.connect), eng


# ================================================================ 9 restart, pool holds connections


def pg_restart(env: Env) -> Hit:
    """Warm a pool, restart the server (fast): the next use fails once, then works."""
    box = env.pg
    eng = env.engine(box.url())
    pinging = env.engine(box.url(), policy=_pinging())
    for e in (eng, pinging):
        assert [(1,)] == execute(e, "SELECT 1")
    box.server.restart("fast")
    exc = raised(lambda: execute(eng, "SELECT :s", s=SENTINEL))
    assert [(1,)] == execute(eng, "SELECT 1")  # the pool was refreshed
    assert [(1,)] == execute(pinging, "SELECT 1")  # a ping on checkout hides it
    return exc, eng


def my_restart(env: Env) -> Hit:
    """Warm a pool, restart the server (SIGTERM): the next use fails once, then works."""
    box = env.maria
    eng = env.engine(box.url())
    pinging = env.engine(box.url(), policy=_pinging())
    for e in (eng, pinging):
        assert [(1,)] == execute(e, "SELECT 1")
    box.server.restart("term")
    exc = raised(lambda: execute(eng, "SELECT :s", s=SENTINEL))
    assert [(1,)] == execute(eng, "SELECT 1")
    assert [(1,)] == execute(pinging, "SELECT 1")
    return exc, eng


def _pinging() -> Policy:
    return Policy(
        timeouts=FAST.timeouts,
        pool=PoolPolicy(size=2, max_overflow=0, ping_after_idle=0),
        retry=FAST.retry,
        breaker=NO_PROBES,
        validate="off",
    )


# ================================================================ 10 session killed


def pg_terminated(env: Env) -> Hit:
    """pg_terminate_backend while idle in a transaction: 57P01, the insert is rolled back."""
    t = env.pg_table()
    eng = env.engine(env.pg.url())
    with eng.connect() as c:
        pid = c.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        c.execute(sa.text(f"INSERT INTO {t} VALUES (3, :s)"), {"s": SENTINEL})
        env.pg.admin("SELECT pg_terminate_backend(%s)", pid)
        exc = raised(lambda: c.execute(sa.text("SELECT :s"), {"s": SENTINEL}))
        pending = raised(lambda: c.execute(sa.text("SELECT 1")))
        assert isinstance(pending, sa_exc.PendingRollbackError)
        c.rollback()
    assert [(2,)] == execute(eng, f"SELECT count(*) FROM {t}")
    return exc, eng


def pg_cancelled(env: Env) -> Hit:
    """pg_cancel_backend during a query: 57014 'user request', the transaction is aborted."""
    eng = env.engine(env.pg.url())
    with eng.connect() as c:
        pid = c.execute(sa.text("SELECT pg_backend_pid()")).scalar()

        def cancel() -> None:
            env.pg.wait_active(pid, "pg_sleep")
            env.pg.admin("SELECT pg_cancel_backend(%s)", pid)

        bg = Background(cancel)
        exc = raised(lambda: c.execute(sa.text("SELECT pg_sleep(10), :s"), {"s": SENTINEL}))
        assert bg.join() is None
    return exc, eng


def my_killed(env: Env) -> Hit:
    """KILL while idle in a transaction: 2013 (nothing says 'killed')."""
    t = env.maria_table()
    eng = env.engine(env.maria.url())
    with eng.connect() as c:
        cid = c.execute(sa.text("SELECT CONNECTION_ID()")).scalar()
        c.execute(sa.text(f"INSERT INTO {t} VALUES (3, :s)"), {"s": SENTINEL})
        env.maria.admin(f"KILL {int(cid)}")
        exc = raised(lambda: c.execute(sa.text("SELECT :s"), {"s": SENTINEL}))
        c.rollback()
    assert [(2,)] == execute(eng, f"SELECT count(*) FROM {t}")
    return exc, eng


def my_kill_query(env: Env) -> Hit:
    """KILL QUERY while a statement waits for a lock: 1317."""
    t = env.maria_table()
    eng = env.engine(env.maria.url())
    with eng.connect() as holder, eng.connect() as c:
        holder.execute(sa.text(f"UPDATE {t} SET v = 'h' WHERE id = 1"))
        cid = int(c.execute(sa.text("SELECT CONNECTION_ID()")).scalar())  # type: ignore[arg-type]

        def kill() -> None:
            env.maria.wait_active(cid, "")
            env.maria.admin(f"KILL QUERY {cid}")

        bg = Background(kill)
        exc = raised(
            lambda: c.execute(sa.text(f"UPDATE {t} SET v = :s WHERE id = 1"), {"s": SENTINEL})
        )
        assert bg.join() is None
        holder.rollback()
    return exc, eng


# ================================================================ 11 statement timeout


def pg_statement_timeout(env: Env) -> Hit:
    """Timeouts(statement=0.3) becomes statement_timeout; a 10 s sleep is cancelled (57014)."""
    eng = env.engine(env.pg.url(), policy(statement=0.3))
    return raised(lambda: execute(eng, "SELECT pg_sleep(10), :s", s=SENTINEL)), eng


def my_statement_timeout(env: Env) -> Hit:
    """max_statement_time exceeded (1969); the transaction survives on MariaDB."""
    eng = env.engine(env.maria.url())
    with eng.connect() as c:
        c.execute(sa.text("SET SESSION max_statement_time = 0.3"))
        exc = raised(lambda: c.execute(sa.text("SELECT SLEEP(10), :s"), {"s": SENTINEL}))
    return exc, eng


# ================================================================ 12 lock wait timeout


def pg_lock_timeout(env: Env) -> Hit:
    """lock_timeout while another transaction holds the row (55P03)."""
    t = env.pg_table()
    eng = env.engine(env.pg.url())
    with eng.connect() as holder, eng.connect() as c:
        holder.execute(sa.text(f"UPDATE {t} SET v = 'h' WHERE id = 1"))
        c.execute(sa.text("SET lock_timeout = '200ms'"))
        exc = raised(
            lambda: c.execute(sa.text(f"UPDATE {t} SET v = :s WHERE id = 1"), {"s": SENTINEL})
        )
        holder.rollback()
    return exc, eng


def my_lock_timeout(env: Env) -> Hit:
    """innodb_lock_wait_timeout while another transaction holds the row (1205)."""
    t = env.maria_table()
    eng = env.engine(env.maria.url())
    with eng.connect() as holder, eng.connect() as c:
        holder.execute(sa.text(f"UPDATE {t} SET v = 'h' WHERE id = 1"))
        c.execute(sa.text("SET SESSION innodb_lock_wait_timeout = 1"))
        exc = raised(
            lambda: c.execute(sa.text(f"UPDATE {t} SET v = :s WHERE id = 1"), {"s": SENTINEL})
        )
        holder.rollback()
    return exc, eng


def sqlite_locked(env: Env) -> Hit:
    """Another connection holds the write lock beyond the busy timeout: 'database is locked'."""
    path = env.tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    holder.execute("BEGIN IMMEDIATE")
    env.defer(holder.close)
    eng = env.engine(f"sqlite:///{path}", policy(statement=0.1))
    exc = raised(lambda: execute(eng, "INSERT INTO t (v) VALUES (:s)", s=SENTINEL))
    return exc, eng


# ================================================================ 13 deadlock


def _deadlock(env: Env, url: URL, t: str) -> Hit:
    eng = env.engine(url)
    barrier = threading.Barrier(2, timeout=10)

    def worker(first: int, second: int) -> None:
        with eng.begin() as c:
            c.execute(sa.text(f"UPDATE {t} SET v = :s WHERE id = :i"), {"s": SENTINEL, "i": first})
            barrier.wait()
            c.execute(sa.text(f"UPDATE {t} SET v = :s WHERE id = :i"), {"s": SENTINEL, "i": second})

    a, b = Background(lambda: worker(1, 2)), Background(lambda: worker(2, 1))
    errors = [e for e in (a.join(), b.join()) if e is not None]
    assert 1 == len(errors), errors  # one victim; the other commits
    return errors[0], eng


def pg_deadlock(env: Env) -> Hit:
    """Two transactions lock rows 1,2 and 2,1 (40P01 after deadlock_timeout=100ms)."""
    return _deadlock(env, env.pg.url(), env.pg_table())


def my_deadlock(env: Env) -> Hit:
    """Two transactions lock rows 1,2 and 2,1 (1213 at once)."""
    return _deadlock(env, env.maria.url(), env.maria_table())


# ================================================================ 14 serialization failure


def pg_serialization(env: Env) -> Hit:
    """REPEATABLE READ: a row changed since the snapshot cannot be updated (40001)."""
    t = env.pg_table()
    eng = env.engine(env.pg.url())
    with eng.connect() as c:
        c.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        c.execute(sa.text(f"SELECT v FROM {t} WHERE id = 1"))  # takes the snapshot
        execute(eng, f"UPDATE {t} SET v = 'other' WHERE id = 1")
        exc = raised(
            lambda: c.execute(sa.text(f"UPDATE {t} SET v = :s WHERE id = 1"), {"s": SENTINEL})
        )
        c.rollback()
    return exc, eng


# ================================================================ 15 read-only


def pg_read_only(env: Env) -> Hit:
    """A database with default_transaction_read_only=on (25006, as on a hot standby)."""
    eng = env.engine(env.pg.url(database=env.pg.ro_db))
    exc = raised(lambda: execute(eng, "INSERT INTO ro_t VALUES (1, :s)", s=SENTINEL))
    if env.pg_driver != "asyncpg":  # asyncpg: a generic DBAPIError
        assert isinstance(exc, sa_exc.InternalError)  # not OperationalError: the class is no signal
    return exc, eng


def my_read_only(env: Env) -> Hit:
    """read_only=1 and a user without admin rights (1290); root still writes."""
    t = env.maria_table()
    env.maria.server.set_global(read_only=1)
    env.defer(lambda: env.maria.server.set_global(read_only=0))
    eng = env.engine(env.maria.url())
    exc = raised(lambda: execute(eng, f"INSERT INTO {t} VALUES (3, :s)", s=SENTINEL))
    env.maria.admin(f"INSERT INTO {t} VALUES (4, 'root bypasses read_only')")
    return exc, eng


def sqlite_read_only(env: Env) -> Hit:
    """A SQLite file opened read-only: 'attempt to write a readonly database'."""
    path = env.tmp_path / "ro.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (v TEXT)")
    conn.close()
    eng = env.engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    return raised(lambda: execute(eng, "INSERT INTO t VALUES (:s)", s=SENTINEL)), eng


# ================================================================ 16 shutdown during a query


def pg_shutdown_in_query(env: Env) -> Hit:
    """pg_ctl stop -m fast during pg_sleep: 57P01; then connecting is refused."""
    box = env.pg
    eng = env.engine(box.url())
    env.defer(box.server.start)
    with eng.connect() as c:
        pid = c.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        bg = Background(lambda: (box.wait_active(pid, "pg_sleep"), box.server.stop("fast")))
        exc = raised(lambda: c.execute(sa.text("SELECT pg_sleep(10), :s"), {"s": SENTINEL}))
        assert bg.join() is None
    refused = raised(env.engine(box.url()).connect)
    assert "refused" == error_context(refused).kind  # type: ignore[union-attr]
    box.server.start()
    return exc, eng


def pg_shutting_down(env: Env) -> Hit:
    """New connections during a smart shutdown: 'the database system is shutting down'."""
    box = env.pg
    env.defer(box.server.start)
    holder = psycopg.connect(str(box.url().set(drivername="postgresql").render_as_string(False)))
    stopper = Background(lambda: box.server.stop("smart"))
    probe = env.engine(box.url(), poolclass=sa.pool.NullPool)

    def shutting_down() -> bool:
        try:
            probe.connect().close()
        except sa_exc.DBAPIError as e:  # asyncpg: a generic DBAPIError
            return "shutting down" in str(e)
        return False

    wait_until(shutting_down)
    exc = raised(probe.connect)
    holder.close()
    assert stopper.join() is None
    box.server.start()
    return exc, probe


def my_shutdown_in_query(env: Env) -> Hit:
    """SIGTERM during SLEEP: 2013; then connecting is refused (2003)."""
    box = env.maria
    eng = env.engine(box.url())
    env.defer(box.server.start)
    with eng.connect() as c:
        cid = int(c.execute(sa.text("SELECT CONNECTION_ID()")).scalar())  # type: ignore[arg-type]
        bg = Background(lambda: (box.wait_active(cid, "sleep"), box.server.stop("term")))
        exc = raised(lambda: c.execute(sa.text("SELECT SLEEP(10), :s"), {"s": SENTINEL}))
        assert bg.join() is None
    refused = raised(env.engine(box.url()).connect)
    assert "refused" == error_context(refused).kind  # type: ignore[union-attr]
    box.server.start()
    return exc, eng


# ================================================================ 17 connection dropped by a proxy


def _reset_mid_query(env: Env, url: URL, sleep_sql: str) -> Hit:
    proxy = env.proxy(LOOPBACK, url.port or 0)
    eng = env.engine(url.set(port=proxy.port))
    with eng.connect() as c:
        c.execute(sa.text("SELECT 1"))
        proxy.schedule([(0.3, "reset_all")])
        exc = raised(lambda: c.execute(sa.text(sleep_sql), {"s": SENTINEL}))
    return exc, eng


def _reset_idle(env: Env, url: URL) -> Hit:
    proxy = env.proxy(LOOPBACK, url.port or 0)
    eng = env.engine(url.set(port=proxy.port))
    assert [(1,)] == execute(eng, "SELECT 1")  # the connection now idles in the pool
    assert 1 == proxy.reset_all()
    return raised(lambda: execute(eng, "SELECT :s", s=SENTINEL)), eng


def _blackhole_mid_query(env: Env, url: URL) -> Hit:
    proxy = env.proxy(LOOPBACK, url.port or 0)
    # call=1.4: PyMySQL's read_timeout (whole seconds: 1) fires well before the watchdog;
    # with call=1 both fired at the same moment and either could win
    eng = env.engine(url.set(port=proxy.port), policy(call=1.4))
    with eng.connect() as c:
        c.execute(sa.text("SELECT 1"))
        proxy.blackhole()
        t0 = time.monotonic()
        exc = raised(lambda: c.execute(sa.text("SELECT :s"), {"s": SENTINEL}))
        assert time.monotonic() - t0 < 1 + 1.5
    return exc, eng


def pg_reset_mid_query(env: Env) -> Hit:
    """The proxy RSTs the connection during pg_sleep."""
    return _reset_mid_query(env, env.pg.url(), "SELECT pg_sleep(5), :s")


def pg_reset_idle(env: Env) -> Hit:
    """The proxy RSTs a connection idling in the pool."""
    return _reset_idle(env, env.pg.url())


def pg_blackhole_mid_query(env: Env) -> Hit:
    """The network goes silent mid-transaction: the call deadline (watchdog) ends the wait."""
    return _blackhole_mid_query(env, env.pg.url())


def my_reset_mid_query(env: Env) -> Hit:
    """The proxy RSTs the connection during SLEEP (2013 'Connection reset by peer')."""
    return _reset_mid_query(env, env.maria.url(), "SELECT SLEEP(5), :s")


def my_reset_idle(env: Env) -> Hit:
    """The proxy RSTs a connection idling in the pool (2006 'gone away')."""
    return _reset_idle(env, env.maria.url())


def my_blackhole_mid_query(env: Env) -> Hit:
    """The network goes silent mid-transaction: the watchdog ends the wait, as on PostgreSQL."""
    return _blackhole_mid_query(env, env.maria.url())


# ================================================================ 18 disk full / resource limits


def pg_temp_file_limit(env: Env) -> Hit:
    """A sort spilling past temp_file_limit (256kB for the role): 53400."""
    eng = env.engine(env.pg.url())
    with eng.connect() as c:
        c.execute(sa.text("SET work_mem = '64kB'"))
        exc = raised(
            lambda: c.execute(
                sa.text("SELECT g || :s FROM generate_series(1, 100000) g ORDER BY 1 DESC"),
                {"s": SENTINEL},
            )
        )
    return exc, eng


def my_tmp_disk_table_size(env: Env) -> Hit:
    """An on-disk temporary table over tmp_disk_table_size: 1114 "The table ... is full"."""
    eng = env.engine(env.maria.url())
    with eng.connect() as c:
        c.execute(
            sa.text(
                "SET SESSION tmp_disk_table_size = 65536, tmp_memory_table_size = 16384, "
                "max_heap_table_size = 16384"
            )
        )
        exc = raised(
            lambda: c.execute(
                sa.text("SELECT CONCAT(seq, :s) AS x, COUNT(*) FROM seq_1_to_50000 GROUP BY x"),
                {"s": SENTINEL},
            )
        )
    return exc, eng


@contextlib.contextmanager
def tiny_tmpfs(path: Path, owner: str | None = None) -> Iterator[Path]:
    """Mount a 1 MiB tmpfs at ``path`` (root only; skips where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0777", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        if owner is not None:
            subprocess.run(["chown", owner, str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def pg_disk_full(env: Env) -> Hit:
    """A table in a tablespace on a full 1 MiB tmpfs: 53100 'No space left on device'."""
    box = env.pg
    root = box.server.root or box.server.datadir
    space = f"rdb_full_{uuid.uuid4().hex[:8]}"
    stack = contextlib.ExitStack()
    env.defer(stack.close)
    where = stack.enter_context(tiny_tmpfs(root / space, owner=box.server.os_user))
    box.admin(f"CREATE TABLESPACE {space} LOCATION '{where}'")
    env.defer(lambda: box.admin(f"DROP TABLESPACE IF EXISTS {space}"))
    t = table_name()
    box.admin(f"CREATE TABLE {t} (v text) TABLESPACE {space}")
    box.admin(f"ALTER TABLE {t} OWNER TO {box.user}")
    env.defer(lambda: box.admin(f"DROP TABLE IF EXISTS {t}"))
    eng = env.engine(box.url())
    exc = raised(
        lambda: execute(
            eng,
            f"INSERT INTO {t} SELECT :s || repeat(md5(g::text), 20) "
            "FROM generate_series(1, 5000) g",
            s=SENTINEL,
        )
    )
    return exc, eng


# MariaDB's real ENOSPC (an InnoDB DATA DIRECTORY on a full tmpfs) is not injected:
# MariaDB 10.11.19 dies on an assertion in ha_rollback_trans instead of raising 1114.
# The temp-space limit above produces the same 1114 "The table ... is full".


def sqlite_full(env: Env) -> Hit:
    """A SQLite database at max_page_count: 'database or disk is full'."""
    eng = env.engine(f"sqlite:///{env.tmp_path / 'full.db'}")
    with eng.connect() as c:
        c.execute(sa.text("CREATE TABLE t (v BLOB)"))
        c.commit()
        c.execute(sa.text("PRAGMA max_page_count = 8"))
        exc = raised(
            lambda: c.execute(
                sa.text("INSERT INTO t VALUES (:s || randomblob(100000))"), {"s": SENTINEL}
            )
        )
    return exc, eng


# ================================================================ 19 server idle timeout


def pg_idle_session(env: Env) -> Hit:
    """idle_session_timeout shorter than the pool's idle time: 57P05."""
    eng = env.engine(env.pg.url(), connect_args=env.pg_settings(idle_session_timeout=200))
    assert [(1,)] == execute(eng, "SELECT 1")
    time.sleep(0.5)  # a server-side timer: no clock to inject
    return raised(lambda: execute(eng, "SELECT :s", s=SENTINEL)), eng


def pg_idle_in_transaction(env: Env) -> Hit:
    """idle_in_transaction_session_timeout inside a transaction: 25P03, the transaction is lost."""
    eng = env.engine(
        env.pg.url(), connect_args=env.pg_settings(idle_in_transaction_session_timeout=200)
    )
    with eng.connect() as c:
        c.execute(sa.text("SELECT 1"))
        time.sleep(0.5)  # a server-side timer: no clock to inject
        exc = raised(lambda: c.execute(sa.text("SELECT :s"), {"s": SENTINEL}))
    # psycopg: InternalError 25P03; asyncpg: a generic DBAPIError; psycopg2: a bare
    # OperationalError "server closed the connection unexpectedly"
    if env.pg_driver == "psycopg":
        assert isinstance(exc, sa_exc.InternalError)
    return exc, eng


def my_wait_timeout(env: Env) -> Hit:
    """wait_timeout=1 shorter than the pool's idle time: 2006 'gone away'."""
    eng = env.engine(env.maria.url())
    with eng.connect() as c:
        c.execute(sa.text("SET SESSION wait_timeout = 1"))
        c.commit()
    time.sleep(1.6)  # a server-side timer: no clock to inject
    return raised(lambda: execute(eng, "SELECT :s", s=SENTINEL)), eng


# ================================================================ 20 pool exhausted


def _pool_exhausted(env: Env, url: URL | str) -> Hit:
    pol = Policy(
        timeouts=Timeouts(connect=2, checkout=0.2, statement=None, call=3),
        pool=PoolPolicy(size=1, max_overflow=0, max_waiters=None, ping_after_idle=None),
        retry=FAST.retry,
        breaker=NO_PROBES,
        validate="off",
    )
    eng = env.engine(url, pol)
    with eng.connect():
        t0 = time.monotonic()
        exc = raised(eng.connect)
        assert 0.2 <= time.monotonic() - t0 < 1.5
    assert isinstance(exc, PoolExhaustedError)
    assert isinstance(exc, sa_exc.TimeoutError)  # existing handlers keep working
    return exc, eng


def _pool_exhausted_raw(env: Env, url: URL | str) -> Hit:
    eng = env.plain_engine(url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    with eng.connect():
        exc = raised(eng.connect)
    assert type(exc) is sa_exc.TimeoutError
    return exc, eng


def pg_pool(env: Env) -> Hit:
    """pool_size=1, max_overflow=0, the connection held: PoolExhaustedError."""
    return _pool_exhausted(env, env.pg.url())


def pg_pool_raw(env: Env) -> Hit:
    """The same on a plain SQLAlchemy engine: sqlalchemy.exc.TimeoutError, classified."""
    return _pool_exhausted_raw(env, env.pg.url())


def my_pool(env: Env) -> Hit:
    """pool_size=1, max_overflow=0, the connection held: PoolExhaustedError."""
    return _pool_exhausted(env, env.maria.url())


def my_pool_raw(env: Env) -> Hit:
    """The same on a plain SQLAlchemy engine: sqlalchemy.exc.TimeoutError, classified."""
    return _pool_exhausted_raw(env, env.maria.url())


def sqlite_pool(env: Env) -> Hit:
    """A SQLite file engine (QueuePool) with its only connection held."""
    return _pool_exhausted(env, f"sqlite:///{env.tmp_path / 'pool.db'}")


# ================================================================ 21 ambiguous commit


def _commit_fault(env: Env, arm: str, committed: bool) -> Hit:
    """Insert a row through a proxy, arm a commit fault, commit; check where the row is."""
    pg = env.inject_db == PG
    t = env.pg_table() if pg else env.maria_table()
    url = env.pg.url() if pg else env.maria.url()
    proxy = env.proxy(LOOPBACK, url.port or 0)
    eng = env.engine(url.set(port=proxy.port))
    with eng.connect() as c:
        c.execute(sa.text(f"INSERT INTO {t} VALUES (3, :s)"), {"s": SENTINEL})
        getattr(proxy, arm)()
        exc = raised(c.commit)
    admin = env.pg.admin if pg else env.maria.admin
    assert committed == (3 == admin(f"SELECT count(*) FROM {t}")[0][0])
    # the client cannot tell the two apart, so both are ambiguous
    assert isinstance(exc, AmbiguousCommitError)
    assert isinstance(exc, sa_exc.OperationalError)  # existing handlers keep working
    return exc, eng


def pg_ambiguous(env: Env) -> Hit:
    """COMMIT reaches the server, its reply is lost: AmbiguousCommitError, row committed."""
    return _commit_fault(env, "drop_commit_reply", committed=True)


def pg_reset_before_commit(env: Env) -> Hit:
    """Control: COMMIT never reaches the server (row not committed); still ambiguous."""
    return _commit_fault(env, "reset_before_commit", committed=False)


def my_ambiguous(env: Env) -> Hit:
    """COMMIT reaches the server, its reply is lost: AmbiguousCommitError, row committed."""
    return _commit_fault(env, "drop_commit_reply", committed=True)


def my_reset_before_commit(env: Env) -> Hit:
    """Control: COMMIT never reaches the server (row not committed); still ambiguous."""
    return _commit_fault(env, "reset_before_commit", committed=False)


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    """One fault on one database."""

    fault: str
    db: str
    inject: Callable[[Env], Hit]
    want: Want
    #: the SQLSTATE / errno in the context; None where the driver gives none
    #: (libpq at connect time, pool errors, SQLite)
    code: str | None

    @property
    def id(self) -> str:
        return f"{self.fault}-{self.db}-{self.inject.__name__.split('_', 1)[1]}"


CASES = [
    Case("01", PG, pg_refused, W_REFUSED, None),
    Case("01", MY, my_refused, W_REFUSED, "2003"),
    Case("02", PG, pg_dns, W_DNS, None),
    Case("02", MY, my_dns, W_DNS, "2003"),
    Case("03", PG, pg_blackhole, W_BLACKHOLE, None),
    Case("03", MY, my_blackhole, W_BLACKHOLE, "2013"),
    Case("04", PG, pg_bad_password, W_AUTH, None),
    Case("04", MY, my_bad_password, W_AUTH, "1045"),
    Case("05", PG, pg_no_db, W_NO_DB, None),
    Case("05", MY, my_no_db_limited, W_NO_DB, "1044"),
    Case("05", MY, my_no_db_admin, W_NO_DB, "1049"),
    Case("05", LITE, sqlite_no_dir, W_SQLITE_OPEN, None),
    Case("06", PG, pg_no_user, W_NO_USER_PG, None),
    Case("06", PG, pg_no_role, W_NO_USER, None),
    Case("06", MY, my_no_user, W_NO_USER_ANY, "1045"),
    Case("07", PG, pg_tls_required, W_TLS, None),
    Case("07", PG, pg_tls_rejected, W_TLS, None),
    Case("07", MY, my_tls_required, W_TLS, "2026"),
    Case("08", PG, pg_role_limit, W_TOO_MANY, None),
    Case("08", MY, my_user_limit, W_TOO_MANY, "1226"),
    Case("08", MY, my_server_limit, W_TOO_MANY, "1040"),
    Case("09", PG, pg_restart, W_TERMINATED, "57P01"),
    Case("09", MY, my_restart, W_LOST, "2013"),
    Case("10", PG, pg_terminated, W_TERMINATED, "57P01"),
    Case("10", PG, pg_cancelled, W_CANCELLED, "57014"),
    Case("10", MY, my_killed, W_LOST, "2013"),
    Case("10", MY, my_kill_query, W_CANCELLED, "1317"),
    Case("11", PG, pg_statement_timeout, W_STATEMENT_TIMEOUT, "57014"),
    Case("11", MY, my_statement_timeout, W_STATEMENT_TIMEOUT, "1969"),
    Case("12", PG, pg_lock_timeout, W_LOCK, "55P03"),
    Case("12", MY, my_lock_timeout, W_LOCK, "1205"),
    Case("12", LITE, sqlite_locked, W_SQLITE_LOCK, None),
    Case("13", PG, pg_deadlock, W_DEADLOCK, "40P01"),
    Case("13", MY, my_deadlock, W_DEADLOCK, "1213"),
    Case("14", PG, pg_serialization, W_SERIALIZATION, "40001"),
    Case("15", PG, pg_read_only, W_READ_ONLY, "25006"),
    Case("15", MY, my_read_only, W_READ_ONLY, "1290"),
    Case("15", LITE, sqlite_read_only, W_READ_ONLY, None),
    Case("16", PG, pg_shutdown_in_query, W_TERMINATED, "57P01"),
    Case("16", PG, pg_shutting_down, W_SHUTTING_DOWN, None),
    Case("16", MY, my_shutdown_in_query, W_LOST, "2013"),
    Case("17", PG, pg_reset_mid_query, W_LOST, None),
    Case("17", PG, pg_reset_idle, W_LOST, None),
    Case("17", PG, pg_blackhole_mid_query, W_WATCHDOG, None),
    Case("17", MY, my_reset_mid_query, W_LOST, "2013"),
    Case("17", MY, my_reset_idle, W_LOST, "2006"),
    Case("17", MY, my_blackhole_mid_query, W_WATCHDOG, None),
    Case("18", PG, pg_temp_file_limit, W_DISK_FULL, "53400"),
    Case("18", PG, pg_disk_full, W_DISK_FULL, "53100"),
    Case("18", MY, my_tmp_disk_table_size, W_DISK_FULL, "1114"),
    Case("18", LITE, sqlite_full, W_DISK_FULL, None),
    Case("19", PG, pg_idle_session, W_IDLE, "57P05"),
    Case("19", PG, pg_idle_in_transaction, W_IDLE_IN_TX, "25P03"),
    Case("19", MY, my_wait_timeout, W_LOST, "2006"),
    Case("20", PG, pg_pool, W_POOL, None),
    Case("20", PG, pg_pool_raw, W_POOL_RAW, None),
    Case("20", MY, my_pool, W_POOL, None),
    Case("20", MY, my_pool_raw, W_POOL_RAW, None),
    Case("20", LITE, sqlite_pool, W_POOL, None),
    Case("21", PG, pg_ambiguous, W_AMBIGUOUS, None),
    Case("21", PG, pg_reset_before_commit, W_AMBIGUOUS, None),
    Case("21", MY, my_ambiguous, W_AMBIGUOUS, "2013"),
    Case("21", MY, my_reset_before_commit, W_AMBIGUOUS, "2013"),
]


@pytest.fixture
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    """Resources for one injection, released afterwards."""
    e = Env(request, tmp_path)
    yield e
    e.close()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(case: Case, env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """Inject the fault for real; kind, retry level, diagnosis and breaker accounting match."""
    caplog.set_level(logging.DEBUG)
    env.inject_db = case.db
    exc, engine = case.inject(env)
    ctx = error_context(exc)
    assert case.code == (ctx.code if ctx is not None else classify(exc).code)
    check(exc, case.want, engine, caplog)


# --------------------------------------------------------------------------- retry levels at work


@pytest.mark.parametrize(
    ("make_url", "want_history"),
    [
        (lambda p: pg_url(port=p, user=APP_USER), ("refused",) * 3),
        (lambda p: my_url(port=p, user=APP_USER), ("refused:2003",) * 3),
    ],
    ids=[PG, MY],
)
def test_refused_is_retried_at_connect(
    make_url: Callable[[int], URL], want_history: tuple[str, ...], env: Env
) -> None:
    """A CONNECT-level fault is retried up to attempts, and every attempt counts for the breaker."""
    retrying = Policy(
        timeouts=FAST.timeouts, pool=FAST.pool, retry=RetryPolicy(attempts=3), validate="off"
    )
    eng = env.engine(make_url(free_port()), retrying)
    ctx = error_context(raised(eng.connect))
    assert ctx is not None
    assert (want_history, 3) == (ctx.history, ctx.attempt)
    assert 3 == resilient_db.breaker_state(eng).failures  # type: ignore[union-attr]


@pytest.mark.parametrize("db", [PG, MY])
def test_authentication_is_not_retried(db: str, env: Env) -> None:
    """A NEVER-level fault (wrong password) fails on the first attempt and is not counted."""
    retrying = Policy(
        timeouts=FAST.timeouts, pool=FAST.pool, retry=RetryPolicy(attempts=3), validate="off"
    )
    port = env.pg.server.port if db == PG else env.maria.server.port
    url = (pg_url if db == PG else my_url)(port=port, user=APP_USER)
    eng = env.engine(url, retrying)
    ctx = error_context(raised(eng.connect))
    assert ctx is not None
    assert ("authentication", 1) == (ctx.kind, ctx.attempt)
    assert 0 == resilient_db.breaker_state(eng).failures  # type: ignore[union-attr]


def test_leak_check_catches_a_leak(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """assert_no_secret fails when bind parameters are shown (hide_parameters=False)."""
    eng = sa.create_engine(f"sqlite:///{env.tmp_path / 'leak.db'}", hide_parameters=False)
    env.defer(eng.dispose)
    exc = raised(lambda: execute(eng, "SELECT * FROM no_such_table WHERE v = :s", s=SENTINEL))
    with pytest.raises(AssertionError, match="str"):
        assert_no_secret(exc, caplog)
