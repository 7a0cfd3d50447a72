"""resilient_db.health(): readiness snapshots on real databases."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import resilient_db
from resilient_db.config import BreakerPolicy, Policy, PoolPolicy, RetryPolicy, Timeouts
from resilient_db.engine import resilience_of
from resilient_db.health import _INFLIGHT as PINGS_IN_FLIGHT
from resilient_db.testing import FaultInjector
from tests.conftest import SENTINEL


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each database in turn."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'health.db'}"
    fixture = "pg_url" if request.param == "postgresql" else "mariadb_url"
    return str(request.getfixturevalue(fixture))


Track = Callable[[sa.Engine], sa.Engine]


@pytest.fixture
def track() -> Iterator[Track]:
    """Register an engine; it is disposed when the test ends, passed or failed."""
    engines: list[sa.Engine] = []

    def add(engine: sa.Engine) -> sa.Engine:
        engines.append(engine)
        return engine

    yield add
    for engine in engines:
        engine.dispose()


def refused() -> BaseException:
    """The error a closed port gives."""
    return ConnectionRefusedError(111, "Connection refused")


TRIP = Policy(
    breaker=BreakerPolicy(failure_threshold=1, reset_timeout=1000.0),
    retry=RetryPolicy(attempts=1),
)


def test_fresh_engine_is_ok(url: str, track: Track) -> None:
    """A new engine: ok, closed breaker, an empty pool, no error, nothing pinged."""
    engine = track(resilient_db.create_engine(url, name="fresh", validate="off"))
    snap = resilient_db.health(engine)
    assert ("ok", (), None, None) == (snap.status, snap.reasons, snap.last_error, snap.ping_ok)
    assert snap.breaker is not None
    assert ("fresh", "closed") == (snap.breaker.name, snap.breaker.state)
    assert (5, 0, 0, 10, 0) == (
        snap.pool.size,
        snap.pool.checked_out,
        snap.pool.overflow,
        snap.pool.max,
        snap.pool.waiting,
    )


def test_ping_ok_records_last_success(url: str, track: Track) -> None:
    """ping=True: the database answers; last_success is set; the connection is returned."""
    engine = track(resilient_db.create_engine(url, validate="off"))
    before = time.time()
    snap = resilient_db.health(engine, ping=True, timeout=5.0)
    assert ("ok", True) == (snap.status, snap.ping_ok)
    assert snap.ping_seconds is not None and 0 < snap.ping_seconds < 5.0
    assert snap.last_success is not None and snap.last_success >= before
    assert (0, 1) == (snap.pool.checked_out, snap.pool.checked_in)


def test_to_dict_is_json(url: str, track: Track) -> None:
    """to_dict() round-trips through JSON with every field."""
    engine = track(resilient_db.create_engine(url, validate="off"))
    data = json.loads(json.dumps(resilient_db.health(engine, ping=True, timeout=5.0).to_dict()))
    assert {
        "status",
        "engine",
        "checked_at",
        "reasons",
        "breaker",
        "pool",
        "last_error",
        "diagnosis",
        "last_success",
        "last_success_age",
        "ping_ok",
        "ping_seconds",
    } == set(data)
    assert "ok" == data["status"]
    assert data["last_success_age"] >= 0


def test_snapshot_is_frozen(sqlite_url: str, track: Track) -> None:
    """The snapshot cannot be changed after the fact."""
    snap = resilient_db.health(track(resilient_db.create_engine(sqlite_url, validate="off")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.status = "down"  # type: ignore[misc]


def test_breaker_open_is_down_without_io(pg_url: str, track: Track) -> None:
    """An open breaker: down, with the last failure's diagnosis; the ping is skipped."""
    down = sa.make_url(pg_url).set(host="127.0.0.1", port=1, password=SENTINEL)
    engine = track(
        resilient_db.create_engine(
            down.render_as_string(hide_password=False), policy=TRIP, validate="off"
        )
    )
    with pytest.raises(sa.exc.OperationalError):
        engine.connect()
    r = resilience_of(engine)
    attempts = r.connect_attempts
    snap = resilient_db.health(engine, ping=True)
    assert ("down", None) == (snap.status, snap.ping_ok)
    assert attempts == r.connect_attempts
    assert snap.reasons[0].startswith("circuit breaker open: Nothing is accepting connections")
    assert "ping skipped: circuit breaker open" == snap.reasons[1]
    assert snap.last_error is not None
    assert ("refused", "connect") == (snap.last_error.kind, snap.last_error.phase)
    assert snap.diagnosis == snap.last_error.diagnosis
    assert SENTINEL not in json.dumps(snap.to_dict())


def test_forced_open_is_down(sqlite_url: str, track: Track) -> None:
    """An operator's force_open(): down, and said so."""
    engine = track(resilient_db.create_engine(sqlite_url, validate="off"))
    resilient_db.breaker_of(engine).force_open()
    snap = resilient_db.health(engine, ping=True)
    assert ("down", "circuit breaker open: forced open by an operator") == (
        snap.status,
        snap.reasons[0],
    )


def test_ping_is_the_probe_once_reset_timeout_passed(sqlite_url: str, track: Track) -> None:
    """After reset_timeout the ping is the half-open probe: success closes the breaker."""
    engine = track(resilient_db.create_engine(sqlite_url, policy=TRIP, validate="off"))
    r = resilience_of(engine)
    assert r.breaker is not None
    now = [1000.0]
    r.clock = r.breaker.clock = lambda: now[0]
    FaultInjector(engine).fail_connects(1, refused)
    with pytest.raises(sa.exc.OperationalError):
        engine.connect()
    assert "down" == resilient_db.health(engine, ping=True).status
    now[0] += 1000.0
    snap = resilient_db.health(engine, ping=True)
    assert ("ok", True, "closed") == (
        snap.status,
        snap.ping_ok,
        snap.breaker and snap.breaker.state,
    )


def test_counted_failures_are_degraded(sqlite_url: str, track: Track) -> None:
    """Failures counted by a closed breaker: degraded, not down."""
    policy = Policy(breaker=BreakerPolicy(failure_threshold=5), retry=RetryPolicy(attempts=2))
    engine = track(resilient_db.create_engine(sqlite_url, policy=policy, validate="off"))
    FaultInjector(engine).fail_connects(2, refused)
    with pytest.raises(sa.exc.OperationalError):
        engine.connect()
    snap = resilient_db.health(engine)
    assert ("degraded", ("2 consecutive failure(s) counted by the breaker",)) == (
        snap.status,
        snap.reasons,
    )


def test_ping_failure_is_down_and_classified(pg_url: str, track: Track) -> None:
    """Breaker disabled, server refusing: the ping fails and says why."""
    down = sa.make_url(pg_url).set(host="127.0.0.1", port=1)
    policy = Policy(breaker=BreakerPolicy(enabled=False), retry=RetryPolicy(attempts=1))
    engine = track(resilient_db.create_engine(down, policy=policy, validate="off"))
    snap = resilient_db.health(engine, ping=True)
    assert ("down", False, None) == (snap.status, snap.ping_ok, snap.breaker)
    assert snap.reasons[0].startswith("ping failed (refused): Nothing is accepting connections")


def test_saturated_pool_is_degraded_and_not_pinged(url: str, track: Track) -> None:
    """Every connection in use: degraded, and the probe does not queue for one."""
    policy = Policy(pool=PoolPolicy(size=1, max_overflow=0), timeouts=Timeouts(checkout=30.0))
    engine = track(resilient_db.create_engine(url, policy=policy, validate="off"))
    with engine.connect():
        t0 = time.monotonic()
        snap = resilient_db.health(engine, ping=True, timeout=5.0)
        assert time.monotonic() - t0 < 1.0
    assert ("degraded", None) == (snap.status, snap.ping_ok)
    assert (
        "ping skipped: no free pooled connection",
        "pool saturated: 1 of 1 connections in use, 0 caller(s) waiting",
    ) == snap.reasons


class SilentServer:
    """A loopback port that accepts TCP connections and never answers, until closed."""

    def __init__(self) -> None:
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(8)
        self.srv.settimeout(0.1)
        self.port: int = self.srv.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                self.accepted.append(self.srv.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        """Stop accepting and close every accepted connection (clients see EOF)."""
        self.stop.set()
        self.thread.join(2)
        for s in self.accepted:
            s.close()
        self.srv.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    """A port that accepts TCP connections and never answers."""
    server = SilentServer()
    yield server
    server.close()


def test_ping_deadline_holds(pg_url: str, silent: SilentServer, track: Track) -> None:
    """A server that never answers: down after ``timeout``; one ping in flight at a time."""
    url = sa.make_url(pg_url).set(host="127.0.0.1", port=silent.port)
    policy = Policy(timeouts=Timeouts(connect=2.0), retry=RetryPolicy(attempts=1))
    engine = track(resilient_db.create_engine(url, policy=policy, validate="off"))
    t0 = time.monotonic()
    snap = resilient_db.health(engine, ping=True, timeout=0.2)
    assert time.monotonic() - t0 < 1.5  # bounded by the 0.2 s timeout, not the 2 s connect
    assert ("down", False, ("ping failed: no answer within 0.2s",)) == (
        snap.status,
        snap.ping_ok,
        snap.reasons,
    )
    again = resilient_db.health(engine, ping=True, timeout=0.2)
    assert ("ping failed: the previous ping is still running",) == again.reasons
    # the abandoned ping thread ends once the server goes away: nothing is left running
    pinger = PINGS_IN_FLIGHT[resilience_of(engine)]
    silent.close()
    pinger.join(5)
    assert not pinger.is_alive()


def test_async_engine(tmp_path: Path) -> None:
    """health_async() pings an AsyncEngine; health() reads it without I/O."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    resilient_db.wrap(engine.sync_engine, name="async")

    async def main() -> tuple[str, bool | None, str]:
        snap = await resilient_db.health_async(engine, ping=True, timeout=5.0)
        plain = resilient_db.health(engine)
        await engine.dispose()
        return snap.status, snap.ping_ok, plain.status

    assert ("ok", True, "ok") == asyncio.run(main())
    with pytest.raises(resilient_db.ConfigurationError):
        resilient_db.health(engine, ping=True)


def test_async_ping_timeout(pg_url: str, silent: SilentServer) -> None:
    """health_async() keeps its deadline against a silent server."""
    u = sa.make_url(pg_url).set(drivername="postgresql+asyncpg", host="127.0.0.1", port=silent.port)
    engine = create_async_engine(u, connect_args={"timeout": 3})
    resilient_db.wrap(engine.sync_engine, policy=Policy(retry=RetryPolicy(attempts=1)))

    async def main() -> tuple[str, tuple[str, ...], float]:
        t0 = time.monotonic()
        snap = await resilient_db.health_async(engine, ping=True, timeout=0.2)
        took = time.monotonic() - t0
        await engine.dispose()
        return snap.status, snap.reasons, took

    status, reasons, took = asyncio.run(main())
    assert ("down", ("ping failed: no answer within 0.2s",)) == (status, reasons)
    assert took < 1.0
