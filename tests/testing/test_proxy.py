"""Tests for :class:`resilient_db.testing.FaultProxy` against the real PostgreSQL and MariaDB.

These drive plain SQLAlchemy engines through the proxy; ``test_proxy_resilient.py`` puts
every fault in front of a resilient engine and checks classification, breaker and retry.
"""

from __future__ import annotations

import gc
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import URL, Engine, create_engine, make_url, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from resilient_db.testing import Fault, FaultProxy

LATENCY_S = 0.15


@dataclass(frozen=True)
class Backend:
    """A real database server (from the conftest URL fixtures) the proxy is put in front of."""

    name: str
    server: URL
    connect_args: dict[str, Any] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.server.host or "127.0.0.1"

    @property
    def port(self) -> int:
        return self.server.port or (5432 if self.name == "postgresql" else 3306)

    def url(self, host: str, port: int) -> str:
        return self.server.set(host=host, port=port).render_as_string(hide_password=False)


BACKENDS = [
    pytest.param(
        ("postgresql", "pg_url", {"connect_timeout": 2}),
        id="postgresql",
        marks=pytest.mark.postgres,
    ),
    pytest.param(
        ("mariadb", "mariadb_url", {"connect_timeout": 2, "read_timeout": 2}),
        id="mariadb",
        marks=pytest.mark.mariadb,
    ),
]


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Poll ``predicate`` until true or ``timeout`` elapses; return its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(0.01)
    return True


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """The server behind the proxy: the conftest URL fixture (skips or fails when down)."""
    name, fixture, connect_args = request.param
    return Backend(name, make_url(request.getfixturevalue(fixture)), connect_args)


@pytest.fixture
def proxy(backend: Backend) -> Iterator[FaultProxy]:
    with FaultProxy(backend.host, backend.port) as fault_proxy:
        yield fault_proxy
    assert fault_proxy.errors == ()


@pytest.fixture
def engine(backend: Backend, proxy: FaultProxy) -> Iterator[Engine]:
    eng = create_engine(backend.url(proxy.host, proxy.port), connect_args=backend.connect_args)
    yield eng
    eng.dispose()


@pytest.fixture
def fresh_engine(backend: Backend, proxy: FaultProxy) -> Iterator[Engine]:
    """An engine through the proxy that opens a new connection on every connect()."""
    eng = create_engine(
        backend.url(proxy.host, proxy.port),
        connect_args=backend.connect_args,
        poolclass=NullPool,
    )
    yield eng
    eng.dispose()


@pytest.fixture
def direct(backend: Backend) -> Iterator[Engine]:
    eng = create_engine(backend.url(backend.host, backend.port), poolclass=NullPool)
    yield eng
    eng.dispose()


@pytest.fixture
def scratch_table(direct: Engine) -> Iterator[str]:
    name = f"proxy_t_{uuid.uuid4().hex}"
    with direct.begin() as conn:
        conn.execute(text(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY)"))
    yield name
    with direct.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {name}"))


def count_rows(direct: Engine, table: str) -> int:
    with direct.connect() as conn:
        return int(conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())


def test_passthrough_round_trip(proxy: FaultProxy, engine: Engine) -> None:
    """In passthrough mode a query round-trips unchanged and bytes are counted."""
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    assert proxy.mode is Fault.PASSTHROUGH
    assert proxy.connections_total == 1
    assert proxy.bytes_up > 0
    assert proxy.bytes_down > 0


def test_refuse_fails_fast_then_passthrough_restores(
    proxy: FaultProxy, fresh_engine: Engine
) -> None:
    """refuse() makes connects fail at once; passthrough() reopens the same port."""
    port = proxy.port
    proxy.refuse()
    assert proxy.mode is Fault.REFUSE
    started = time.monotonic()
    with pytest.raises(OperationalError):
        fresh_engine.connect()
    assert time.monotonic() - started < 1.0
    assert proxy.connections_total == 0

    proxy.passthrough()
    assert proxy.port == port
    with fresh_engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    assert proxy.connections_total == 1


def test_blackhole_connect_times_out(proxy: FaultProxy, fresh_engine: Engine) -> None:
    """blackhole() accepts connections but never answers, so connect_timeout fires."""
    proxy.blackhole()
    assert proxy.mode is Fault.BLACKHOLE
    started = time.monotonic()
    with pytest.raises(OperationalError):
        fresh_engine.connect()
    elapsed = time.monotonic() - started
    assert elapsed < 4.0
    assert proxy.connections_total == 1
    assert proxy.bytes_down == 0


def test_reset_all_invalidates_idle_pooled_connection(proxy: FaultProxy, engine: Engine) -> None:
    """reset_all() RSTs an idle pooled connection; its next use is a disconnect error."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert proxy.active_connections == 1

    assert proxy.reset_all() == 1

    with pytest.raises(OperationalError) as excinfo, engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert excinfo.value.connection_invalidated is True
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    assert proxy.connections_total == 2


def test_drop_commit_reply_commits_but_client_fails(
    proxy: FaultProxy, engine: Engine, direct: Engine, scratch_table: str
) -> None:
    """drop_commit_reply(): the COMMIT reaches the server but the client sees a failure."""
    with engine.connect() as conn:
        conn.execute(text(f"INSERT INTO {scratch_table} (id) VALUES (1)"))
        proxy.drop_commit_reply()
        assert proxy.commit_fault_armed is True
        with pytest.raises(OperationalError):
            conn.commit()
    assert count_rows(direct, scratch_table) == 1
    assert proxy.commits_seen == 1
    assert proxy.commit_fault_armed is False
    with engine.connect() as conn:  # one-shot: back to passthrough
        conn.execute(text(f"INSERT INTO {scratch_table} (id) VALUES (2)"))
        conn.commit()
    assert count_rows(direct, scratch_table) == 2


def test_reset_before_commit_does_not_commit(
    proxy: FaultProxy, engine: Engine, direct: Engine, scratch_table: str
) -> None:
    """reset_before_commit(): the COMMIT never reaches the server, so the row is lost."""
    with engine.connect() as conn:
        conn.execute(text(f"INSERT INTO {scratch_table} (id) VALUES (1)"))
        proxy.reset_before_commit()
        with pytest.raises(OperationalError):
            conn.commit()
    assert count_rows(direct, scratch_table) == 0
    assert proxy.commits_seen == 1
    assert proxy.commit_fault_armed is False


def test_latency_adds_delay(proxy: FaultProxy, engine: Engine) -> None:
    """latency() delays every forwarded chunk, so a round trip takes at least that long."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        proxy.latency(LATENCY_S)
        started = time.monotonic()
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
        elapsed = time.monotonic() - started
    assert elapsed >= LATENCY_S


def test_connections_total_counts_accepted_connections(
    proxy: FaultProxy, fresh_engine: Engine
) -> None:
    """connections_total counts each accepted connection; active_connections drains to 0."""
    for _ in range(3):
        with fresh_engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    assert proxy.connections_total == 3
    assert wait_until(lambda: proxy.active_connections == 0)
    proxy.reset_counters()
    assert proxy.connections_total == 0


def test_reset_after_cuts_connections(proxy: FaultProxy, fresh_engine: Engine) -> None:
    """reset_after(n) resets a connection once n bytes went server -> client."""
    proxy.reset_after(10)
    with pytest.raises(OperationalError):
        fresh_engine.connect()
    assert proxy.bytes_down == 10
    proxy.passthrough()
    with fresh_engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1


def test_schedule_applies_modes_in_order(proxy: FaultProxy, fresh_engine: Engine) -> None:
    """schedule() applies faults at their delays inside the proxy loop."""
    done = proxy.schedule([(0.2, "refuse"), (0.0, Fault.LATENCY, 0.01)])
    done.result(timeout=2)
    assert proxy.mode is Fault.REFUSE
    with pytest.raises(OperationalError):
        fresh_engine.connect()
    proxy.schedule([(0.0, "passthrough")]).result(timeout=2)
    with fresh_engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    with pytest.raises(ValueError):
        proxy.schedule([(0.0, "no-such-fault")])


def test_close_is_clean_and_idempotent(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    """close() with a live connection joins the thread, frees the port, logs nothing."""
    caplog.set_level(logging.DEBUG, logger="asyncio")
    proxy = FaultProxy(backend.host, backend.port).start()
    eng = create_engine(backend.url(proxy.host, proxy.port), connect_args=backend.connect_args)
    try:
        with eng.connect() as conn:
            conn.execute(text("SELECT 1"))
            proxy.close()
            proxy.close()
            with pytest.raises(OperationalError) as excinfo:
                conn.execute(text("SELECT 1"))
            assert excinfo.value.connection_invalidated is True
        thread = proxy._thread
        assert thread is not None
        assert thread.is_alive() is False
        assert proxy.running is False
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((proxy.host, proxy.port), timeout=1).close()
        with pytest.raises(RuntimeError):
            proxy.blackhole()
    finally:
        eng.dispose()
        proxy.close()
    gc.collect()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert proxy.errors == ()


def test_fault_arguments_are_validated() -> None:
    """Bad latency, jitter, bandwidth, reset_after and schedule arguments raise at once."""
    with FaultProxy("127.0.0.1", 9) as proxy:  # nothing connects: no upstream needed
        with pytest.raises(ValueError):
            proxy.latency(-0.1)
        with pytest.raises(ValueError):
            proxy.latency(0.1, jitter=-0.1)
        with pytest.raises(ValueError):
            proxy.bandwidth(0)
        with pytest.raises(ValueError):
            proxy.reset_after(-1)
        with pytest.raises(ValueError):
            proxy.schedule([(-1.0, "refuse")])
        with pytest.raises(TypeError):
            proxy.schedule([(0.0, "latency")])
        proxy.latency(0.1, jitter=0.2)
        proxy.bandwidth(1000)
        proxy.latency(0)
        proxy.bandwidth(None)
        assert proxy.mode is Fault.PASSTHROUGH
        assert proxy.errors == ()
