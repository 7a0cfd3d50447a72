"""PyMySQL connections share one "preferred TLS" context instead of building one each."""

from __future__ import annotations

import time

import pymysql.connections
import pytest
import sqlalchemy as sa

import resilient_db
from resilient_db import Policy
from resilient_db._pymysql import Connection

PREFERRED = hasattr(pymysql.connections.Connection, "_create_ssl_ctx")


def _driver_connection(conn: sa.Connection) -> object:
    return conn.connection.dbapi_connection


def test_the_seam_exists() -> None:
    """The PyMySQL method overridden is still there (fails loudly if PyMySQL renames it)."""
    assert PREFERRED
    assert issubclass(Connection, pymysql.connections.Connection)


def test_engine_connections_share_one_context_and_stay_pymysql(mariadb_url: str) -> None:
    """Two new connections: real PyMySQL connections, one shared "preferred" context."""
    engine = resilient_db.create_engine(mariadb_url, policy=Policy(validate="off"))
    with engine.connect() as a, engine.connect() as b:
        one, two = _driver_connection(a), _driver_connection(b)
        assert 1 == a.execute(sa.text("SELECT 1")).scalar()
        assert 1 == b.execute(sa.text("SELECT 1")).scalar()
    engine.dispose()
    assert one is not two
    assert isinstance(one, pymysql.connections.Connection)
    if getattr(one, "ctx", None) is None:
        pytest.skip("this PyMySQL has no preferred-TLS mode")
    assert one.ctx is two.ctx  # type: ignore[attr-defined]


def test_a_new_connection_costs_no_ca_bundle(mariadb_url: str) -> None:
    """The CPU a new connection costs: far below PyMySQL's own (which loads the CA bundle)."""
    u = sa.make_url(mariadb_url)
    args = {"host": u.host, "port": u.port or 3306, "user": u.username, "database": u.database}

    def cpu(cls: type) -> float:
        t0 = time.thread_time()
        cls(**args).close()
        return time.thread_time() - t0

    cpu(Connection)  # builds the shared context once
    theirs = min(cpu(pymysql.connections.Connection) for _ in range(3))
    ours = min(cpu(Connection) for _ in range(3))
    if theirs < 0.005:
        pytest.skip(f"PyMySQL's own connect is cheap here ({theirs * 1e3:.1f} ms)")
    assert ours < theirs / 3, (ours, theirs)


def test_explicit_tls_options_are_pymysqls_own() -> None:
    """ssl= given: PyMySQL builds that context itself, required TLS, nothing shared."""
    preferred = Connection(host="127.0.0.1", defer_connect=True)
    explicit = Connection(host="127.0.0.1", ssl={"ca": None}, defer_connect=True)
    assert explicit._ssl_required is True
    if getattr(preferred, "ctx", None) is not None:
        assert explicit.ctx is not preferred.ctx
        assert preferred.ctx is Connection(host="127.0.0.1", defer_connect=True).ctx
