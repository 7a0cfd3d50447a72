"""Shared fixtures: real servers by URL, skipped locally when absent, failed on CI."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import resilient_db
from tests.servers import skip_or_fail, throwaway_mariadb, throwaway_pg  # noqa: F401

PG_URL = os.environ.get("RDB_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("RDB_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
REDIS_URL = os.environ.get("RDB_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

#: A password that must never appear in any output; tests grep for it.
SENTINEL = "S3ntinel-pa55word-DO-NOT-LEAK"


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require(host: str, port: int, what: str) -> None:
    """Skip (locally) or fail (CI=true) when a shared server is not reachable."""
    if not reachable(host, port):
        msg = f"{what} is not reachable at {host}:{port}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{msg} (required on CI)")
        pytest.skip(msg)


@pytest.fixture(autouse=True)
def _no_backoff_sleeps() -> Iterator[None]:
    """Tests never sleep between retries unless they turn sleeps back on."""
    resilient_db.set_testing(True)
    yield
    resilient_db.set_testing(False)


@pytest.fixture
def pg_url() -> str:
    """URL of the shared PostgreSQL test database."""
    u = sa.make_url(PG_URL)
    require(u.host or "127.0.0.1", u.port or 5432, "PostgreSQL")
    return PG_URL


@pytest.fixture
def mariadb_url() -> str:
    """URL of the shared MariaDB test database."""
    u = sa.make_url(MARIADB_URL)
    require(u.host or "127.0.0.1", u.port or 3306, "MariaDB")
    return MARIADB_URL


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a fresh SQLite file."""
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each of the three databases in turn."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return str(request.getfixturevalue("mariadb_url"))


@pytest.fixture(params=["postgresql", "mariadb"])
def server_url(request: pytest.FixtureRequest) -> str:
    """PostgreSQL and MariaDB in turn."""
    name = "pg_url" if request.param == "postgresql" else "mariadb_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def redis_url() -> str:
    """URL of the shared Redis."""
    u = sa.make_url(REDIS_URL)
    require(u.host or "127.0.0.1", u.port or 6379, "Redis")
    return REDIS_URL
