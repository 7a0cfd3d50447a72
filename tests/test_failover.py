"""Multi-host failover: host lists, role probes, per-host breakers, moving primaries.

The end-to-end tests run two throw-away servers each: a PostgreSQL primary and a
streaming replica made with ``pg_basebackup -R`` (promoted with ``pg_ctl promote``),
and two independent MariaDB servers whose ``read_only`` flag the test flips. They
measure with real time (an end-to-end property) that writes resume on the new
primary within the breaker's reset timeout plus the connect timeout.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import resilient_db
from resilient_db import (
    BreakerPolicy,
    CircuitOpenError,
    ConfigurationError,
    Kind,
    NoPrimaryError,
    Policy,
    PoolPolicy,
    RetryLevel,
    RetryPolicy,
    Timeouts,
    _connect,
    breaker_of,
    classify,
    error_context,
    run_transaction,
)
from resilient_db._state import conn_state
from resilient_db.engine import resilience_of
from resilient_db.failover import Failover, Host, hosts_of, split_url
from resilient_db.testing.proxy import FaultProxy
from tests.servers import (
    APP_PASSWORD,
    APP_USER,
    MariaServer,
    PgServer,
    ServerUnavailable,
    free_port,
    skip_or_fail,
    start_mariadb,
    start_postgres,
)

RESET = 1.0  # breaker reset timeout of the end-to-end engines
CONNECT = 2.0  # their connect timeout (libpq's connect_timeout is at least 2 s)

POLICY = Policy(
    timeouts=Timeouts(connect=CONNECT, checkout=2.0, statement=5.0, call=5.0),
    pool=PoolPolicy(size=2, max_overflow=0),
    retry=RetryPolicy(attempts=2, deadline=5.0),
    breaker=BreakerPolicy(failure_threshold=2, reset_timeout=RESET),
    validate="off",
)


# -- configuration ----------------------------------------------------------------------


def test_libpq_url_hosts_and_target_session_attrs() -> None:
    """``?host=a:5433&host=b&target_session_attrs=read-write`` becomes hosts and role."""
    url = sa.make_url(
        "postgresql+psycopg://u@/db?host=a:5433&host=b&target_session_attrs=read-write&x=1"
    )
    u, hosts, role = split_url(url, None, None)
    assert (("a", 5433), ("b", 5432), "primary") == (
        (hosts[0].host, hosts[0].port) if hosts else None,
        (hosts[1].host, hosts[1].port) if hosts else None,
        role,
    )
    assert ("a", 5433, {"x": "1"}) == (u.host, u.port, dict(u.query))


def test_libpq_comma_lists() -> None:
    """``?host=a,b&port=5433,5434`` pairs hosts and ports in order."""
    url = sa.make_url("postgresql+psycopg://u@/db?host=a,::1&port=5433,5434")
    _, hosts, role = split_url(url, None, "prefer-standby")
    assert ((Host("a", 5433), Host("::1", 5434)), "prefer-standby") == (hosts, role)


def test_hosts_keyword_forms() -> None:
    """Entries may be 'host', 'host:port', (host, port) or '[v6]:port'; the URL gives the port."""
    url = sa.make_url("mysql+pymysql://u@db0:3307/test")
    u, hosts, role = split_url(url, ["a", "b:3310", ("c", 3311), "[::1]:3312"], None)
    expected = (Host("a", 3307), Host("b", 3310), Host("c", 3311), Host("::1", 3312))
    assert (expected, "primary", "a", 3307) == (hosts, role, u.host, u.port)
    assert "[::1]:3312" == str(Host("::1", 3312))


@pytest.mark.parametrize(
    ("url", "kwargs", "field"),
    [
        ("postgresql+psycopg://u@h/db", {"hosts": []}, "hosts"),
        ("postgresql+psycopg://u@h/db", {"hosts": ["a", "a:5432"]}, "hosts"),
        ("postgresql+psycopg://u@h/db", {"hosts": ["a:0"]}, "hosts"),
        ("postgresql+psycopg://u@h/db", {"hosts": ["a:x"]}, "hosts"),
        ("postgresql+psycopg://u@h/db", {"hosts": ["a"], "role": "leader"}, "role"),
        ("postgresql+psycopg://u@h/db", {"role": "any"}, "role"),
        ("sqlite:///x.db", {"hosts": ["a"]}, "hosts"),
        ("postgresql+psycopg://u@/db?host=a&host=b", {"hosts": ["c"]}, "hosts"),
        ("postgresql+psycopg://u@h/db?host=a", {}, "url"),
        ("postgresql+psycopg://u@/db?host=a,b,c&port=1,2", {}, "url"),
        ("postgresql+psycopg://u@/db?host=a&target_session_attrs=standby", {}, "url"),
    ],
)
def test_bad_host_configuration(url: str, kwargs: dict[str, Any], field: str) -> None:
    """Each bad host list or role raises ConfigurationError naming the field."""
    with pytest.raises(ConfigurationError) as info:
        resilient_db.create_engine(url, validate="off", **kwargs)
    assert field == info.value.field.split(" ")[0]


def test_connect_order_prefers_current_then_wanted_role() -> None:
    """Hosts are tried: current, then the wanted role, then unknown, then the wrong role."""
    engine = resilient_db.create_engine(
        "postgresql+psycopg://u@h/db", hosts=["a", "b", "c", "d"], validate="off"
    )
    fo = resilience_of(engine).failover
    assert isinstance(fo, Failover)
    a, b, c, d = fo.hosts
    fo.roles.update({a: "standby", c: "primary"})
    fo.current = d
    assert [d, c, b, a] == fo.order()
    fo.role = "prefer-standby"
    assert [d, a, b, c] == fo.order()


# -- against the shared servers (nothing is reconfigured) --------------------------------


def _port(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        q = "SELECT inet_server_port()" if engine.dialect.name == "postgresql" else "SELECT @@port"
        return int(conn.execute(sa.text(q)).scalar_one())


def test_dead_host_is_skipped(server_url: str) -> None:
    """A refused first host is skipped; its breaker counts it and the live host is current."""
    u = sa.make_url(server_url)
    dead, live = free_port(), u.port or 5432
    policy = Policy(breaker=BreakerPolicy(failure_threshold=1), validate="off")
    engine = resilient_db.create_engine(
        server_url, hosts=[f"127.0.0.1:{dead}", f"{u.host}:{live}"], policy=policy
    )
    fo = resilience_of(engine).failover
    assert fo is not None
    try:
        assert live == _port(engine)
        engine.dispose()
        assert live == _port(engine)  # the current host is tried first: no new failure
        fo.current = None  # forget what was learned: the configured order applies again
        fo.roles.clear()
        engine.dispose()
        assert live == _port(engine)
        first, second = hosts_of(engine)
        assert first.breaker is not None and second.breaker is not None
        assert ("open", 1, 1, False) == (
            first.breaker.state,
            first.breaker.failures,
            first.breaker.rejected,  # the last connect skipped it without I/O
            first.current,
        )
        assert ("primary", True, 0) == (second.role, second.current, second.breaker.failures)
        # an error on that connection names the host it is connected to, not the URL's
        with pytest.raises(sa.exc.ProgrammingError) as info, engine.connect() as conn:
            conn.execute(sa.text("SELECT * FROM no_such_table_fo"))
        ctx = error_context(info.value)
        assert ctx is not None
        assert (dead, live, "application") == (engine.url.port, ctx.port, ctx.kind)
        assert "closed" == breaker_of(engine).state  # one host up: the engine is healthy
    finally:
        engine.dispose()


def test_strict_startup_check_validates_the_chosen_host(server_url: str) -> None:
    """validate="strict" checks the host the engine picks, so a dead first host is no error."""
    live = sa.make_url(server_url).port or 5432
    engine = resilient_db.create_engine(
        server_url, hosts=[f"127.0.0.1:{free_port()}", f"127.0.0.1:{live}"], validate="strict"
    )
    try:
        assert [False, True] == [h.current for h in hosts_of(engine)]
    finally:
        engine.dispose()


async def test_async_engine_with_libpq_url(pg_url: str) -> None:
    """An async engine given ``?host=dead&host=live`` connects to the live host."""
    u = sa.make_url(pg_url)
    live = u.port or 5432
    hosts = (f"127.0.0.1:{free_port()}", f"{u.host or '127.0.0.1'}:{live}")
    url = u._replace(drivername="postgresql+asyncpg", host=None, port=None).set(
        query={"host": hosts}
    )
    engine = resilient_db.create_async_engine(url, validate="off")
    try:
        async with engine.connect() as conn:
            port = (await conn.execute(sa.text("SELECT inet_server_port()"))).scalar_one()
        assert (live, [None, "primary"]) == (port, [h.role for h in hosts_of(engine)])
    finally:
        await engine.dispose()


# -- async engines: the same host lists -------------------------------------------------


@pytest.fixture(params=["asyncpg", "aiomysql"])
def async_server_url(request: pytest.FixtureRequest) -> str:
    """The shared PostgreSQL (asyncpg) and MariaDB (aiomysql) servers, as async URLs."""
    base, driver = ("pg_url", "postgresql+asyncpg")
    if request.param == "aiomysql":
        base, driver = ("mariadb_url", "mysql+aiomysql")
    url = sa.make_url(str(request.getfixturevalue(base)))
    return url.set(drivername=driver).render_as_string(hide_password=False)


def _server_port_sql(url: sa.URL) -> str:
    return (
        "SELECT inet_server_port()" if url.get_backend_name() == "postgresql" else "SELECT @@port"
    )


async def test_async_hosts_keyword_writes_to_the_live_primary(async_server_url: str) -> None:
    """create_async_engine(hosts=[refused, live], role=...): the write lands on the live host."""
    u = sa.make_url(async_server_url)
    dead, live = free_port(), u.port
    table = f"fo_async_{uuid.uuid4().hex[:8]}"
    engine = resilient_db.create_async_engine(
        async_server_url,
        hosts=[f"127.0.0.1:{dead}", f"{u.host}:{live}"],
        role="primary",
        validate="strict",  # checks the host the engine picks: the refused one is no error
    )
    sync_driver = {"postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql"}
    admin = sa.create_engine(
        u.set(drivername=sync_driver[u.get_backend_name()]), poolclass=sa.NullPool
    )
    try:
        async with engine.begin() as conn:
            port = (await conn.execute(sa.text(_server_port_sql(u)))).scalar_one()
            await conn.execute(sa.text(f"CREATE TABLE {table} (note VARCHAR(20))"))
            await conn.execute(sa.text(f"INSERT INTO {table} VALUES ('written')"))
        with admin.connect() as c:  # the live server itself has the row
            rows = c.execute(sa.text(f"SELECT note FROM {table}")).scalars().all()
        first, second = hosts_of(engine)
        assert first.breaker is not None
        assert (live, ["written"], (dead, 1, False), ("primary", True)) == (
            port,
            rows,
            (engine.url.port, first.breaker.failures, first.current),
            (second.role, second.current),
        )
        # an error on that connection names the host it is connected to
        with pytest.raises(sa.exc.DBAPIError) as info:
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT * FROM no_such_table_fo"))
        ctx = error_context(info.value)
        assert ctx is not None
        assert (u.host, live, "application") == (ctx.host, ctx.port, ctx.kind)
    finally:
        await engine.dispose()
        with admin.begin() as c:
            c.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        admin.dispose()


async def test_async_all_hosts_refused_names_the_host_tried(pg_url: str) -> None:
    """asyncpg: when every host refuses, the error context names the last host tried."""
    ports = [free_port(), free_port()]
    url = sa.make_url(pg_url).set(drivername="postgresql+asyncpg")
    engine = resilient_db.create_async_engine(
        url, hosts=[f"127.0.0.1:{p}" for p in ports], policy=POLICY
    )
    try:
        with pytest.raises(sa.exc.OperationalError) as info:
            async with engine.connect():
                pass
        ctx = error_context(info.value)
        assert ctx is not None
        assert ("refused", "127.0.0.1", ports[1], ("refused", "refused")) == (
            ctx.kind,
            ctx.host,
            ctx.port,
            ctx.history,
        )
    finally:
        await engine.dispose()


async def test_wrap_async_reads_hosts_from_a_libpq_url(pg_url: str) -> None:
    """wrap_async() of a SQLAlchemy ``?host=a&host=b`` engine names host a, not localhost."""
    from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

    u = sa.make_url(pg_url)
    dead, live = free_port(), u.port or 5432
    url = u._replace(drivername="postgresql+asyncpg", host=None, port=None).set(
        query={"host": (f"127.0.0.1:{dead}", f"{u.host}:{live}")}
    )
    engine = resilient_db.wrap_async(sa_create_async_engine(url), role="any", policy=POLICY)
    try:
        r = resilience_of(engine)
        async with engine.connect() as conn:
            port = (await conn.execute(sa.text("SELECT inet_server_port()"))).scalar_one()
        assert (
            ("127.0.0.1", dead, f"postgresql:127.0.0.1/{u.database}"),
            live,
            [None, None],  # role "any": no role check
        ) == (
            (engine.url.host, engine.url.port, r.name),
            port,
            [h.role for h in hosts_of(engine)],
        )
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"role": "any"}, "role"),
        ({"hosts": ["a", "a"]}, "hosts"),
        ({"hosts": "a", "role": "x"}, "role"),
    ],
)
def test_async_bad_host_configuration(kwargs: dict[str, Any], field: str) -> None:
    """create_async_engine() rejects a bad host list or role like create_engine() does."""
    with pytest.raises(ConfigurationError) as info:
        resilient_db.create_async_engine("postgresql+asyncpg://u@h/db", validate="off", **kwargs)
    assert field == info.value.field


def test_host_label_is_written_on_the_record_being_connected(pg_url: str) -> None:
    """The chosen host is in the record's state before any pool connect listener runs."""
    live = sa.make_url(pg_url).port or 5432
    engine = resilient_db.create_engine(
        pg_url, hosts=[f"127.0.0.1:{free_port()}", f"127.0.0.1:{live}"], policy=POLICY
    )
    seen: list[object] = []

    def connect_listener(dbapi_connection: Any, record: Any) -> None:
        seen.append(conn_state(record).host)
        if len(seen) == 1:
            raise RuntimeError("a session setting failed")

    sa.event.listen(engine, "connect", connect_listener, insert=True)  # runs first
    try:
        with pytest.raises(RuntimeError):
            engine.connect()  # a later connect listener fails: nothing is left behind
        with pytest.raises(sa.exc.ProgrammingError) as info, engine.connect() as conn:
            conn.execute(sa.text("SELECT * FROM no_such_table_fo"))
        ctx = error_context(info.value)
        assert ctx is not None
        assert ([Host("127.0.0.1", live)] * 2, live) == (seen, ctx.port)
    finally:
        engine.dispose()


def test_role_check_of_a_silent_server_is_bounded(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that goes silent after the handshake fails its role check within the limit."""
    u = sa.make_url(pg_url)
    live = f"{u.host}:{u.port or 5432}"
    policy = Policy(timeouts=Timeouts(connect=0.5), validate="off")
    with FaultProxy(u.host or "127.0.0.1", u.port or 5432) as proxy:
        silent = f"{proxy.host}:{proxy.port}"
        engine = resilient_db.create_engine(pg_url, hosts=[silent, live], policy=policy)
        real_open = _connect.open_connection

        def open_then_go_silent(r: Any, dialect: Any, cargs: Any, cparams: Any) -> Any:
            conn = real_open(r, dialect, cargs, cparams)
            if cparams["port"] == proxy.port:  # handshake done, then the network goes silent
                proxy.blackhole()
            return conn

        monkeypatch.setattr(_connect, "open_connection", open_then_go_silent)
        t0 = time.monotonic()
        port = _port(engine)
        took = time.monotonic() - t0
        first, _ = hosts_of(engine)
        engine.dispose()
    assert first.breaker is not None
    assert (u.port or 5432, 1) == (port, first.breaker.failures)
    assert took < 1.5  # the 0.5 s limit, not libpq's keepalives (minutes)


def test_all_hosts_down_names_the_host_tried(pg_url: str) -> None:
    """When every host refuses, the error context names the last host tried."""
    ports = [free_port(), free_port()]
    engine = resilient_db.create_engine(
        pg_url, hosts=[f"127.0.0.1:{p}" for p in ports], policy=POLICY
    )
    with pytest.raises(sa.exc.OperationalError) as info:
        engine.connect()
    ctx = error_context(info.value)
    assert ctx is not None
    assert ("refused", "127.0.0.1", ports[1], ("refused", "refused")) == (
        ctx.kind,
        ctx.host,
        ctx.port,
        ctx.history,
    )
    assert f"127.0.0.1:{ports[1]}" in ctx.diagnosis


def test_every_host_breaker_open_fails_fast(pg_url: str) -> None:
    """With every host's breaker open, a connect fails at once with CircuitOpenError."""
    live = sa.make_url(pg_url).port or 5432
    engine = resilient_db.create_engine(
        pg_url, hosts=[f"127.0.0.1:{free_port()}", f"127.0.0.1:{live}"], policy=POLICY
    )
    fo = resilience_of(engine).failover
    assert fo is not None
    for breaker in fo.breakers.values():
        assert breaker is not None
        breaker.force_open()
    with pytest.raises(CircuitOpenError) as info:
        engine.connect()
    ctx = error_context(info.value)
    assert ctx is not None
    assert (Kind.CIRCUIT_OPEN.value, "closed") == (ctx.kind, breaker_of(engine).state)


# -- PostgreSQL: a primary and a streaming replica ----------------------------------------


def _replica_of(primary: PgServer) -> PgServer:
    """A streaming replica of ``primary`` on its own port and data directory."""
    hba = primary.datadir / "pg_hba.conf"
    hba.write_text(hba.read_text() + "host replication postgres 127.0.0.1/32 trust\n")
    primary.psql("SELECT pg_reload_conf();")
    root = Path(tempfile.mkdtemp(prefix="rdb-pg-replica-"))
    root.chmod(0o755)
    if primary.os_user is not None:
        shutil.chown(root, primary.os_user, primary.os_user)
    data = root / "data"
    cmd = [
        str(primary.bindir / "pg_basebackup"),
        "-h", primary.host, "-p", str(primary.port), "-U", "postgres",
        "-D", str(data), "-R", "-X", "stream", "-c", "fast",
    ]  # fmt: skip
    if primary.os_user is not None:
        cmd = ["runuser", "-u", primary.os_user, "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, check=False, timeout=60)
    if proc.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"pg_basebackup failed: {proc.stderr}")
    replica = PgServer(
        port=free_port(), datadir=data, root=root, bindir=primary.bindir,
        os_user=primary.os_user, log_file=root / "postgres.log",
    )  # fmt: skip
    auto = data / "postgresql.auto.conf"
    auto.write_text(
        auto.read_text() + f"port = {replica.port}\nunix_socket_directories = '{root}'\n"
    )
    try:
        replica.start()
    except BaseException:
        replica.destroy()
        raise
    return replica


@pytest.fixture
def pg_pair() -> Iterator[tuple[PgServer, PgServer, str]]:
    """A primary, its streaming replica, and a scratch table (owned by ``app``) on both."""
    try:
        primary = start_postgres()
    except ServerUnavailable as exc:
        skip_or_fail(exc)
    replica: PgServer | None = None
    table = f"fo_{uuid.uuid4().hex[:10]}"
    try:
        primary.psql(
            f"CREATE TABLE {table} (id serial PRIMARY KEY, note text);\n"
            f"ALTER TABLE {table} OWNER TO {APP_USER};\n",
            database="app",
        )
        replica = _replica_of(primary)
        yield primary, replica, table
    finally:
        if replica is not None:
            replica.destroy()
        primary.destroy()


def _pg_engine(a: PgServer, b: PgServer, role: str = "primary") -> sa.Engine:
    url = a.url(user=APP_USER, password=APP_PASSWORD, database="app")
    hosts = [f"{a.host}:{a.port}", f"{b.host}:{b.port}"]
    return resilient_db.create_engine(url, hosts=hosts, role=role, policy=POLICY)  # type: ignore[arg-type]


def _writer(engine: sa.Engine, table: str) -> Callable[[str], int]:
    def write(note: str) -> int:
        def unit(conn: sa.Connection) -> int:
            conn.execute(sa.text(f"INSERT INTO {table} (note) VALUES (:n)"), {"n": note})
            return _port_of(conn)

        return run_transaction(engine, unit)  # type: ignore[return-value]

    return write


def _port_of(conn: sa.Connection) -> int:
    q = "SELECT inet_server_port()" if conn.dialect.name == "postgresql" else "SELECT @@port"
    return int(conn.execute(sa.text(q)).scalar_one())


def _until_written(write: Callable[[str], int], note: str, limit: float) -> tuple[int, float]:
    """Write until one succeeds (within ``limit`` s); the port it landed on and when."""
    deadline = time.monotonic() + limit
    while True:
        try:
            port = write(note)
            return port, time.monotonic()
        except sa.exc.SQLAlchemyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _fail_until_open(write: Callable[[str], int], engine: sa.Engine) -> list[type]:
    """Write while no host is writable until the engine's breaker opens; the errors seen."""
    seen: list[type] = []
    for _ in range(10):
        with pytest.raises(sa.exc.SQLAlchemyError) as info:
            write("lost")
        seen.append(type(info.value))
        if isinstance(info.value, NoPrimaryError):
            ctx = error_context(info.value)
            assert ctx is not None and "read_only" == ctx.kind
            assert RetryLevel.CONNECT is classify(info.value, phase="connect").retry
        if breaker_of(engine).state == "open":
            break
    return seen


def test_pg_primary_crash_then_promotion(pg_pair: tuple[PgServer, PgServer, str]) -> None:
    """Primary killed, replica promoted: writes resume there within reset + connect timeout."""
    a, b, table = pg_pair
    engine = _pg_engine(a, b)
    write = _writer(engine, table)
    try:
        assert a.port == write("before")
        a.stop("immediate")
        seen = _fail_until_open(write, engine)
        assert NoPrimaryError in seen  # a refused, b still a standby
        assert "open" == breaker_of(engine).state
        promoted = b._pg_ctl("promote", "-w")
        assert 0 == promoted.returncode, promoted.stderr
        moved = time.monotonic()
        port, resumed = _until_written(write, "after", RESET + CONNECT + 2)
        took = resumed - moved
        print(f"\nPostgreSQL failover after crash: writes resumed {took:.3f}s after promotion")
        assert b.port == port
        assert took <= RESET + CONNECT
        assert "after" in b.psql(f"SELECT note FROM {table} ORDER BY id;", database="app")
        status = {h.port: h for h in hosts_of(engine)}
        assert (True, "primary") == (status[b.port].current, status[b.port].role)
    finally:
        engine.dispose()


def test_pg_read_only_write_moves_to_new_primary(pg_pair: tuple[PgServer, PgServer, str]) -> None:
    """A write refused as read-only (25006) names the old host; the next lands on the new one."""
    a, b, table = pg_pair
    engine = _pg_engine(a, b)
    readers = _pg_engine(a, b, role="prefer-standby")
    anyone = _pg_engine(a, b, role="any")
    try:
        assert (b.port, a.port) == (_port(readers), _port(anyone))
        with engine.begin() as conn:
            conn.execute(sa.text(f"INSERT INTO {table} (note) VALUES ('before')"))
            assert a.port == _port_of(conn)
        # fence the old primary (read-only for every session, pooled ones included),
        # then promote the replica
        a.set_config(default_transaction_read_only="on")
        promoted = b._pg_ctl("promote", "-w")
        assert 0 == promoted.returncode, promoted.stderr
        moved = time.monotonic()
        with pytest.raises(sa.exc.DBAPIError) as info, engine.begin() as conn:
            conn.execute(sa.text(f"INSERT INTO {table} (note) VALUES ('refused')"))
        ctx = error_context(info.value)
        assert ctx is not None
        assert ("read_only", "25006", "transaction", a.port, True) == (
            ctx.kind,
            ctx.code,
            ctx.retry,
            ctx.port,
            info.value.connection_invalidated,
        )
        assert RetryLevel.TRANSACTION is classify(info.value).retry
        assert APP_PASSWORD not in str(info.value) + repr(ctx.to_dict())
        with engine.begin() as conn:
            conn.execute(sa.text(f"INSERT INTO {table} (note) VALUES ('after')"))
            assert b.port == _port_of(conn)
        took = time.monotonic() - moved
        print(f"\nPostgreSQL read-only failover: writes resumed {took:.3f}s after promotion")
        assert took <= RESET + CONNECT
        status = {h.port: h.role for h in hosts_of(engine)}
        assert {a.port: "standby", b.port: "primary"} == status
    finally:
        for e in (engine, readers, anyone):
            e.dispose()


# -- MariaDB: two servers, read_only flipped --------------------------------------------


@pytest.fixture
def maria_pair() -> Iterator[tuple[MariaServer, MariaServer, str]]:
    """Two MariaDB servers, the second read_only, each with the same scratch table."""
    servers: list[MariaServer] = []
    table = f"fo_{uuid.uuid4().hex[:10]}"
    try:
        for _ in range(2):
            try:
                servers.append(start_mariadb())
            except ServerUnavailable as exc:
                skip_or_fail(exc)
        for s in servers:
            s.sql(f"CREATE TABLE test.{table} (id INT AUTO_INCREMENT PRIMARY KEY, note TEXT)")
        servers[1].set_global(read_only=1)
        yield servers[0], servers[1], table
    finally:
        for s in servers:
            s.destroy()


def _maria_engine(a: MariaServer, b: MariaServer) -> sa.Engine:
    # the non-admin app user: read_only does not apply to admins
    url = a.url(user=APP_USER, password=APP_PASSWORD)
    hosts = [f"{a.host}:{a.port}", f"{b.host}:{b.port}"]
    return resilient_db.create_engine(url, hosts=hosts, policy=POLICY)


def _notes(server: MariaServer, table: str) -> list[str]:
    return server.sql(f"SELECT note FROM test.{table} ORDER BY id").split()


def test_mariadb_read_only_flip(maria_pair: tuple[MariaServer, MariaServer, str]) -> None:
    """read_only moves to the other server: run_transaction re-runs the refused write there."""
    a, b, table = maria_pair
    engine = _maria_engine(a, b)
    write = _writer(engine, table)
    try:
        assert a.port == write("before")
        a.set_global(read_only=1)
        b.set_global(read_only=0)
        moved = time.monotonic()
        port = write("after")  # refused by a (1290), re-run on b
        took = time.monotonic() - moved
        print(f"\nMariaDB read_only failover: write done on the new primary in {took:.3f}s")
        assert b.port == port
        assert took <= RESET + CONNECT
        assert (["before"], ["after"]) == (_notes(a, table), _notes(b, table))
        status = {h.port: h.role for h in hosts_of(engine)}
        assert {a.port: "standby", b.port: "primary"} == status
    finally:
        engine.dispose()


def test_mariadb_crash_then_flip(maria_pair: tuple[MariaServer, MariaServer, str]) -> None:
    """Primary killed, the other made writable: writes resume within reset + connect timeout."""
    a, b, table = maria_pair
    engine = _maria_engine(a, b)
    write = _writer(engine, table)
    try:
        assert a.port == write("before")
        a.stop("kill")
        seen = _fail_until_open(write, engine)
        assert NoPrimaryError in seen
        assert "open" == breaker_of(engine).state
        b.set_global(read_only=0)
        moved = time.monotonic()
        port, resumed = _until_written(write, "after", RESET + CONNECT + 2)
        took = resumed - moved
        print(f"\nMariaDB failover after crash: writes resumed {took:.3f}s after the flip")
        assert b.port == port
        assert took <= RESET + CONNECT
        assert ["after"] == _notes(b, table)
    finally:
        engine.dispose()
