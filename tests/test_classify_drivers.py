"""classify() on real exceptions from psycopg2, asyncpg and aiomysql (connect-time faults).

The resilient engine is sync-only so far, so these drivers run under plain (async)
SQLAlchemy engines, and classify() gets exactly what SQLAlchemy raises: for asyncpg
that includes the bare socket errors SQLAlchemy does not wrap.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from resilient_db import Kind, RetryLevel, Target, classify
from tests.conftest import SENTINEL
from tests.servers import APP_PASSWORD, APP_USER, MariaServer, PgServer, free_port
from tests.test_classify_faults import INVALID_HOST, LOOPBACK, assert_no_secret


@dataclass(frozen=True)
class Servers:
    """Ports of the throw-away servers (0 when the case needs none)."""

    pg: int
    maria: int


@dataclass(frozen=True)
class DriverCase:
    """One connect-time fault through one driver."""

    id: str
    url: Callable[[Servers], URL]
    kind: Kind
    retry: RetryLevel
    code: str | None
    needs: str = ""  # "pg" / "maria": the throw-away server the URL points at
    connect_args: tuple[tuple[str, Any], ...] = ()


def _pg(driver: str, **kw: Any) -> Callable[[Servers], URL]:
    def make(s: Servers) -> URL:
        args: dict[str, Any] = {
            "username": APP_USER,
            "password": SENTINEL,
            "host": LOOPBACK,
            "port": s.pg,
            "database": "app",
        }
        args.update(kw)
        if callable(args["port"]):
            args["port"] = args["port"]()
        return URL.create(f"postgresql+{driver}", **args)

    return make


def _my(driver: str, **kw: Any) -> Callable[[Servers], URL]:
    def make(s: Servers) -> URL:
        args: dict[str, Any] = {
            "username": APP_USER,
            "password": SENTINEL,
            "host": LOOPBACK,
            "port": s.maria,
            "database": "test",
        }
        args.update(kw)
        if callable(args["port"]):
            args["port"] = args["port"]()
        return URL.create(f"mysql+{driver}", **args)

    return make


N, C = RetryLevel.NEVER, RetryLevel.CONNECT
SYNC_CASES = [
    DriverCase("psycopg2-refused", _pg("psycopg2", port=free_port), Kind.REFUSED, C, None),
    DriverCase("psycopg2-dns", _pg("psycopg2", host=INVALID_HOST, port=5432), Kind.DNS, N, None),
    DriverCase("psycopg2-password", _pg("psycopg2"), Kind.AUTHENTICATION, N, None, "pg"),
    DriverCase(
        "psycopg2-no-db",
        _pg("psycopg2", username="postgres", database="no_such_db"),
        Kind.UNKNOWN_DATABASE,
        N,
        None,
        "pg",
    ),
    DriverCase(
        "psycopg2-tls",
        _pg("psycopg2", query={"sslmode": "require"}),
        Kind.TLS,
        N,
        None,
        "pg",
    ),
]
ASYNC_CASES = [
    DriverCase("asyncpg-refused", _pg("asyncpg", port=free_port), Kind.REFUSED, C, None),
    DriverCase("asyncpg-dns", _pg("asyncpg", host=INVALID_HOST, port=5432), Kind.DNS, N, None),
    DriverCase("asyncpg-password", _pg("asyncpg"), Kind.AUTHENTICATION, N, "28P01", "pg"),
    DriverCase(
        "asyncpg-no-db",
        _pg("asyncpg", username="postgres", database="no_such_db"),
        Kind.UNKNOWN_DATABASE,
        N,
        "3D000",
        "pg",
    ),
    DriverCase(
        "asyncpg-tls",
        _pg("asyncpg"),
        Kind.TLS,
        N,
        None,
        "pg",
        (("ssl", "require"),),
    ),
    DriverCase("aiomysql-refused", _my("aiomysql", port=free_port), Kind.REFUSED, C, "2003"),
    DriverCase("aiomysql-dns", _my("aiomysql", host=INVALID_HOST, port=3306), Kind.DNS, N, "2003"),
    DriverCase("aiomysql-password", _my("aiomysql"), Kind.AUTHENTICATION, N, "1045", "maria"),
    DriverCase(
        "aiomysql-no-db",
        _my("aiomysql", password=APP_PASSWORD, database="no_such_db"),
        Kind.UNKNOWN_DATABASE,
        N,
        "1044",
        "maria",
    ),
]


def _servers(case: DriverCase, request: pytest.FixtureRequest) -> Servers:
    pg = maria = 0
    if case.needs == "pg":
        server = request.getfixturevalue("throwaway_pg")
        assert isinstance(server, PgServer)
        pg = server.port
    if case.needs == "maria":
        server = request.getfixturevalue("throwaway_mariadb")
        assert isinstance(server, MariaServer)
        maria = server.port
    return Servers(pg, maria)


def _check(case: DriverCase, exc: BaseException, url: URL, caplog: Any) -> None:
    c = classify(exc, phase="connect", target=Target.from_url(url))
    assert (case.kind, case.retry, case.code) == (c.kind, c.retry, c.code), repr(exc)
    assert_no_secret(exc, caplog)


@pytest.fixture(autouse=True)
def _debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield


@pytest.mark.parametrize("case", SYNC_CASES, ids=[c.id for c in SYNC_CASES])
def test_sync_driver_fault(
    case: DriverCase, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    """psycopg2 connect-time faults are classified from their message text (no SQLSTATE)."""
    url = case.url(_servers(case, request))
    eng = sa.create_engine(
        url,
        poolclass=NullPool,
        hide_parameters=True,
        connect_args={"connect_timeout": 2, **dict(case.connect_args)},
    )
    try:
        with pytest.raises(Exception) as info:
            eng.connect()
    finally:
        eng.dispose()
    _check(case, info.value, url, caplog)


@pytest.mark.parametrize("case", ASYNC_CASES, ids=[c.id for c in ASYNC_CASES])
async def test_async_driver_fault(
    case: DriverCase, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    """asyncpg / aiomysql connect-time faults, bare socket errors included, are classified."""
    url = case.url(_servers(case, request))
    timeout = {"timeout": 2} if url.get_driver_name() == "asyncpg" else {"connect_timeout": 2}
    eng = create_async_engine(
        url,
        poolclass=NullPool,
        hide_parameters=True,
        connect_args={**timeout, **dict(case.connect_args)},
    )
    try:
        with pytest.raises(Exception) as info:
            async with eng.connect():
                pass
    finally:
        await eng.dispose()
    _check(case, info.value, url, caplog)


async def test_asyncpg_blackhole_is_a_bare_timeout(caplog: pytest.LogCaptureFixture) -> None:
    """asyncpg against a listener that never answers raises a bare TimeoutError: CONNECT_TIMEOUT."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)  # the kernel completes the handshake; nobody ever answers
        port = listener.getsockname()[1]
        url = _pg("asyncpg", port=port)(Servers(0, 0))
        eng = create_async_engine(url, poolclass=NullPool, connect_args={"timeout": 0.3})
        try:
            with pytest.raises(TimeoutError) as info:
                async with eng.connect():
                    pass
        finally:
            await eng.dispose()
    c = classify(info.value, phase="connect", target=Target.from_url(url))
    assert (Kind.CONNECT_TIMEOUT, RetryLevel.CONNECT, True) == (
        c.kind,
        c.retry,
        c.counts_for_breaker,
    )
    assert_no_secret(info.value, caplog)


def test_asyncpg_raw_connect_refused() -> None:
    """asyncpg.connect() itself (no SQLAlchemy) to a closed port: classified REFUSED."""

    async def connect() -> None:
        await asyncpg.connect(host=LOOPBACK, port=free_port(), user="x", password=SENTINEL)

    with pytest.raises(OSError) as info:
        asyncio.run(connect())
    c = classify(info.value, phase="connect")
    assert (Kind.REFUSED, RetryLevel.CONNECT, True) == (c.kind, c.retry, c.counts_for_breaker)
