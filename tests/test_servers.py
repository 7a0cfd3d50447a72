"""Tests for the throw-away server helpers in tests/servers.py."""

from __future__ import annotations

import socket

import psycopg
import pymysql
import pytest

from tests import servers
from tests.servers import APP_PASSWORD, APP_USER, MariaServer, PgServer, free_port, start_postgres

# the test harness's own servers, not SQLAlchemy's business: skipped by the SQLAlchemy
# 2.0 pass (.ci/run), like the other tests marked slow
pytestmark = pytest.mark.slow

# Make the session fixtures visible here even without tests/conftest.py re-exporting them
# (plain assignments, so ruff's F811 does not fire on the same-named test arguments).
throwaway_pg = servers.throwaway_pg
throwaway_mariadb = servers.throwaway_mariadb


def _pg_connect(server: PgServer, password: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        host=server.host,
        port=server.port,
        user=APP_USER,
        password=password,
        dbname="app",
        connect_timeout=10,
    )


def _maria_connect(server: MariaServer, password: str) -> pymysql.connections.Connection:
    return pymysql.connect(
        host=server.host,
        port=server.port,
        user=APP_USER,
        password=password,
        database="test",
        connect_timeout=10,
    )


def test_free_port_is_bindable() -> None:
    """free_port returns a port that can be bound on 127.0.0.1."""
    port = free_port()
    assert port not in (3306, 5432)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# ------------------------------------------------------------------------ PostgreSQL


@pytest.mark.postgres
def test_pg_is_throwaway(throwaway_pg: PgServer) -> None:
    """The throw-away PostgreSQL never uses the shared port 5432."""
    assert throwaway_pg.port != 5432
    assert (
        throwaway_pg.url()
        == f"postgresql+psycopg://postgres@127.0.0.1:{throwaway_pg.port}/postgres"
    )
    assert throwaway_pg.psql("SELECT 1").strip() == "1"


@pytest.mark.postgres
def test_pg_accepts_app_password(throwaway_pg: PgServer) -> None:
    """PostgreSQL lets app/app-secret log in to database app."""
    with _pg_connect(throwaway_pg, APP_PASSWORD) as conn:
        row = conn.execute("SELECT current_user, current_database()").fetchone()
    assert row == ("app", "app")


@pytest.mark.postgres
def test_pg_rejects_wrong_password(throwaway_pg: PgServer) -> None:
    """PostgreSQL rejects app with a wrong password."""
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _pg_connect(throwaway_pg, "wrong")


@pytest.mark.postgres
def test_pg_restart(throwaway_pg: PgServer) -> None:
    """PostgreSQL stop/start/restart work and the app account survives."""
    try:
        throwaway_pg.stop()
        assert not throwaway_pg.is_running()
        with pytest.raises(psycopg.OperationalError):
            _pg_connect(throwaway_pg, APP_PASSWORD)
    finally:
        throwaway_pg.start()
    throwaway_pg.restart()
    with _pg_connect(throwaway_pg, APP_PASSWORD) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.postgres
def test_pg_set_config_reload_and_restart(throwaway_pg: PgServer) -> None:
    """set_config applies reloadable settings at once and restart-only ones after restart."""
    try:
        throwaway_pg.set_config(statement_timeout="1234ms", max_connections="40")
        assert throwaway_pg.psql("SHOW statement_timeout").strip() == "1234ms"
        throwaway_pg.restart()
        assert throwaway_pg.psql("SHOW max_connections").strip() == "40"
    finally:
        throwaway_pg.psql("ALTER SYSTEM RESET ALL;")
        throwaway_pg.restart()


@pytest.mark.postgres
def test_pg_low_max_connections() -> None:
    """A throw-away PostgreSQL can run with max_connections=6 (3 slots for non-superusers)."""
    try:
        server = start_postgres(max_connections="6")
    except servers.ServerUnavailable as exc:
        servers.skip_or_fail(exc)
    conns: list[psycopg.Connection[tuple[object, ...]]] = []
    try:
        assert server.psql("SHOW max_connections").strip() == "6"
        conns.extend(_pg_connect(server, APP_PASSWORD) for _ in range(3))
        with pytest.raises(psycopg.OperationalError, match="reserved"):
            _pg_connect(server, APP_PASSWORD)
    finally:
        for conn in conns:
            conn.close()
        server.destroy()


# --------------------------------------------------------------------------- MariaDB


@pytest.mark.mariadb
def test_mariadb_is_throwaway(throwaway_mariadb: MariaServer) -> None:
    """The throw-away MariaDB never uses the shared port 3306."""
    assert throwaway_mariadb.port != 3306
    assert (
        throwaway_mariadb.url() == f"mysql+pymysql://root@127.0.0.1:{throwaway_mariadb.port}/test"
    )
    assert throwaway_mariadb.sql("SELECT 1").strip() == "1"


@pytest.mark.mariadb
def test_mariadb_accepts_app_password(throwaway_mariadb: MariaServer) -> None:
    """MariaDB lets app/app-secret log in to database test."""
    conn = _maria_connect(throwaway_mariadb, APP_PASSWORD)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT CURRENT_USER(), DATABASE()")
            assert cur.fetchone() == ("app@127.0.0.1", "test")
    finally:
        conn.close()


@pytest.mark.mariadb
def test_mariadb_rejects_wrong_password(throwaway_mariadb: MariaServer) -> None:
    """MariaDB rejects app with a wrong password (error 1045)."""
    with pytest.raises(pymysql.err.OperationalError) as info:
        _maria_connect(throwaway_mariadb, "wrong")
    assert info.value.args[0] == 1045


@pytest.mark.mariadb
@pytest.mark.parametrize("mode", ["term", "kill"])
def test_mariadb_restart(throwaway_mariadb: MariaServer, mode: str) -> None:
    """MariaDB stop/start/restart work (clean and after SIGKILL) and app survives."""
    try:
        throwaway_mariadb.stop(mode)
        assert not throwaway_mariadb.is_running()
        with pytest.raises(pymysql.err.OperationalError):
            _maria_connect(throwaway_mariadb, APP_PASSWORD)
    finally:
        throwaway_mariadb.start()
    throwaway_mariadb.restart(mode)
    conn = _maria_connect(throwaway_mariadb, APP_PASSWORD)
    conn.close()


@pytest.mark.mariadb
def test_mariadb_set_global(throwaway_mariadb: MariaServer) -> None:
    """set_global changes global variables (numbers unquoted, strings quoted)."""
    old = throwaway_mariadb.sql("SELECT @@wait_timeout, @@sql_mode").strip().split("\t")
    try:
        throwaway_mariadb.set_global(wait_timeout=77, sql_mode="STRICT_ALL_TABLES")
        got = throwaway_mariadb.sql("SELECT @@wait_timeout, @@sql_mode").strip().split("\t")
        assert got == ["77", "STRICT_ALL_TABLES"]
    finally:
        throwaway_mariadb.set_global(wait_timeout=old[0], sql_mode=old[1])
