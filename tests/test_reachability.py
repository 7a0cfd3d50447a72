"""The breaker judges reachability: blips do not count, a silent database is probed and cut.

Every engine here runs with the default policy (validation off, to keep the
startup check out of the timings), against the real servers, through the
fault proxy where the network has to misbehave.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

import resilient_db
from resilient_db import CircuitOpenError, Policy, PoolExhaustedError
from resilient_db._probe import answers
from resilient_db.classify import Target
from resilient_db.engine import breaker_of, resilience_of
from resilient_db.testing import FaultProxy

DEFAULT = Policy(validate="off")  # the default policy, without the startup check


def _proxied(url: str, proxy: FaultProxy) -> str:
    u = sa.make_url(url)
    return u.set(host=proxy.host, port=proxy.port).render_as_string(hide_password=False)


@pytest.fixture(params=["pg", "mariadb"])
def server(request: pytest.FixtureRequest) -> str:
    """The URL of each shared server."""
    name = "pg_url" if request.param == "pg" else "mariadb_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def proxied(server: str) -> Iterator[tuple[sa.Engine, FaultProxy]]:
    """A default-policy engine behind a fault proxy in front of the server."""
    u = sa.make_url(server)
    with FaultProxy(u.host or "127.0.0.1", u.port) as proxy:
        engine = resilient_db.create_engine(_proxied(server, proxy), policy=DEFAULT)
        try:
            yield engine, proxy
        finally:
            proxy.passthrough()
            engine.dispose()


def _sleep_sql(engine: sa.Engine, seconds: float) -> sa.TextClause:
    if engine.dialect.name == "postgresql":
        return sa.text(f"SELECT pg_sleep({seconds})")
    return sa.text(f"SELECT SLEEP({seconds})")


def _one(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT 1")).scalar_one())


def _raised(fn: Callable[[], object]) -> tuple[BaseException, float]:
    t0 = time.monotonic()
    try:
        fn()
    except Exception as e:
        return e, time.monotonic() - t0
    raise AssertionError("nothing was raised")


def test_killed_sessions_do_not_open_the_breaker(pg_url: str) -> None:
    """Six sessions killed at once are lost connections, not an unreachable database."""
    engine = resilient_db.create_engine(pg_url, policy=DEFAULT)
    conns = [engine.connect() for _ in range(6)]
    pids = [c.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() for c in conns]
    with engine.connect() as admin:
        for pid in pids:
            admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    errors = 0
    for c in conns:
        try:
            c.execute(sa.text("SELECT 1"))
        except sa.exc.OperationalError:
            errors += 1
        c.close()
    snap = breaker_of(engine).snapshot()
    assert (6, "closed", 0) == (errors, snap.state, snap.consecutive_failures)
    assert 1 == _one(engine)  # the pool reconnects
    engine.dispose()


def test_refused_connects_open_the_breaker(pg_url: str) -> None:
    """Fresh connections that are refused are evidence: the breaker opens, then fails fast."""
    u = sa.make_url(pg_url)
    with FaultProxy(u.host or "127.0.0.1", u.port) as proxy:
        proxy.refuse()
        engine = resilient_db.create_engine(_proxied(pg_url, proxy), policy=DEFAULT)
        for _ in range(3):
            with pytest.raises(sa.exc.OperationalError):
                _one(engine)
        assert "open" == breaker_of(engine).state
        error, took = _raised(lambda: _one(engine))
        engine.dispose()
    assert isinstance(error, CircuitOpenError)
    assert took < 0.05


def test_silent_database_is_probed_and_calls_cut(proxied: tuple[sa.Engine, FaultProxy]) -> None:
    """A call into silence is cut within probe_after + probe_timeout, explained, breaker open."""
    engine, proxy = proxied
    assert 1 == _one(engine)
    conn = engine.connect()
    conn.execute(sa.text("SELECT 1"))
    proxy.blackhole()
    error, took = _raised(lambda: conn.execute(sa.text("SELECT 2")))
    conn.close()
    policy = resilient_db.policy_of(engine).breaker
    ctx = resilient_db.error_context(error)
    assert ctx is not None
    assert ("read_timeout", "open") == (ctx.kind, breaker_of(engine).state)
    assert "stopped answering" in ctx.diagnosis
    assert took < policy.probe_after + policy.probe_timeout + 0.5, took  # not the 28 s deadline
    rejected, fast = _raised(lambda: _one(engine))
    assert isinstance(rejected, CircuitOpenError)
    assert fast < 0.05


def test_probe_reset_by_a_blip_is_confirmed_not_counted(
    proxied: tuple[sa.Engine, FaultProxy],
) -> None:
    """A probe whose connection a blip resets asks again: the database answers, no trip."""
    engine, proxy = proxied
    assert 1 == _one(engine)
    monitor = resilience_of(engine).monitor
    proxy.latency(0.5)  # the probe's reply is on its way...
    monitor.suspect(time.monotonic())
    time.sleep(0.15)
    proxy.latency(0)
    proxy.reset_all()  # ...when a proxy or load balancer resets every flow
    deadline = time.monotonic() + 3
    while monitor.probing and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (False, 1, 0, "closed") == (
        monitor.probing,
        monitor.probes,
        monitor.failed,
        breaker_of(engine).state,
    )


@pytest.mark.slow  # several seconds: skipped by the SQLAlchemy 2.0 pass
def test_long_queries_on_a_healthy_database_run_to_success(server: str) -> None:
    """Three concurrent slow queries outlive probe_after; the probes answer, nothing is cut."""
    engine = resilient_db.create_engine(server, policy=DEFAULT)

    def slow() -> object:
        with engine.connect() as conn:
            return conn.execute(_sleep_sql(engine, 4)).scalar_one()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(slow) for _ in range(3)]
        t0 = time.monotonic()
        quick = _one(engine)
        quick_s = time.monotonic() - t0
        results = [f.result(timeout=30) for f in futures]
    monitor = resilience_of(engine).monitor
    assert (3, 1, "closed") == (len(results), quick, breaker_of(engine).state)
    assert quick_s < 0.5
    assert monitor.probes >= 1 and 0 == monitor.failed
    engine.dispose()


def test_brownout_is_not_an_outage(proxied: tuple[sa.Engine, FaultProxy]) -> None:
    """Replies 1 s late are slow, not silent: the probe answers and calls complete."""
    engine, proxy = proxied
    assert 1 == _one(engine)
    proxy.latency(0.5)  # each direction: a 1 s round trip
    assert 1 == _one(engine)
    monitor = resilience_of(engine).monitor
    assert ("closed", 0) == (breaker_of(engine).state, monitor.failed)


def test_connect_into_a_silent_port_fails_within_the_bound(server: str) -> None:
    """engine.connect() into a blackhole fails with an explained error within 5 s."""
    u = sa.make_url(server)
    with FaultProxy(u.host or "127.0.0.1", u.port) as proxy:
        proxy.blackhole()
        engine = resilient_db.create_engine(_proxied(server, proxy), policy=DEFAULT)
        error, took = _raised(lambda: _one(engine))
        monitor = resilience_of(engine).monitor
        assert monitor.wait(monitor.verdict_within() + 1.0)  # the timeout raised suspicion
        verdict = (breaker_of(engine).state, monitor.failed)
        engine.dispose()
    ctx = resilient_db.error_context(error)
    assert ctx is not None and (ctx.phase, ctx.kind) == ("connect", "connect_timeout")
    assert took < 5.0, took
    assert ("open", 1) == verdict  # the probe got no answer either: unreachable


@pytest.mark.slow  # several seconds: skipped by the SQLAlchemy 2.0 pass
def test_connect_timeouts_into_a_slow_server_do_not_open_the_breaker(pg_url: str) -> None:
    """A brownout makes new connects time out; the probe answers, so nothing is counted."""
    u = sa.make_url(pg_url)
    with FaultProxy(u.host or "127.0.0.1", u.port) as proxy:
        engine = resilient_db.create_engine(_proxied(pg_url, proxy), policy=DEFAULT)
        assert 1 == _one(engine)
        proxy.latency(0.5)  # PostgreSQL's handshake needs two round trips: over 2 s
        threshold = breaker_of(engine).policy.failure_threshold
        with concurrent.futures.ThreadPoolExecutor(threshold + 1) as pool:
            held = [pool.submit(engine.connect) for _ in range(threshold + 1)]
            outcomes = [f.exception() or f.result() for f in held]
        monitor = resilience_of(engine).monitor
        monitor.wait(monitor.verdict_within() + 1.0)
        verdict = (breaker_of(engine).state, monitor.failed)
        later, _ = _raised(engine.connect)  # after the verdict: the diagnosis says slow
        proxy.passthrough()
        for o in outcomes:
            if isinstance(o, sa.Connection):
                o.close()
        engine.dispose()
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    kinds = [getattr(resilient_db.error_context(e), "kind", None) for e in errors]
    assert kinds.count("connect_timeout") >= threshold, kinds
    assert monitor.probes >= 1
    assert ("closed", 0) == verdict
    ctx = resilient_db.error_context(later)
    assert ctx is not None and "connect_timeout" == ctx.kind
    assert "reachable but too slow to complete a connection" in ctx.diagnosis


@pytest.mark.parametrize(("nbytes", "verdict"), [(1, ("closed", 0)), (0, ("open", 1))])
def test_connects_reset_in_the_handshake_are_judged_by_the_probe(
    pg_url: str, nbytes: int, verdict: tuple[str, int]
) -> None:
    """A connect reset during the handshake counts only if the probe gets no answer either.

    ``reset_after(1)``: the server's first byte (its answer to the SSL request, which
    is all a probe asks for) gets through, then every connection is reset: the server
    answered, nothing counts. ``reset_after(0)``: not a byte comes back: unreachable.
    """
    u = sa.make_url(pg_url)
    with FaultProxy(u.host or "127.0.0.1", u.port) as proxy:
        proxy.reset_after(nbytes)
        engine = resilient_db.create_engine(_proxied(pg_url, proxy), policy=DEFAULT)
        threshold = breaker_of(engine).policy.failure_threshold
        errors = [_raised(lambda: _one(engine))[0] for _ in range(threshold + 1)]
        monitor = resilience_of(engine).monitor
        assert monitor.wait(monitor.verdict_within() + 1.0)
        seen = (breaker_of(engine).state, monitor.failed)
        engine.dispose()
    kinds = [getattr(resilient_db.error_context(e), "kind", None) for e in errors]
    assert "disconnect" == kinds[0], kinds
    assert monitor.probes >= 1
    assert verdict == seen


def test_nobody_waits_while_a_probe_is_out(pg_url: str) -> None:
    """With every connection in use and a probe out, a checkout fails at once."""
    engine = resilient_db.create_engine(pg_url, policy=DEFAULT, pool_size=1, max_overflow=0)
    held = engine.connect()
    monitor = resilience_of(engine).monitor
    monitor.probing = True
    try:
        error, took = _raised(lambda: engine.connect())
    finally:
        monitor.probing = False
        held.close()
    assert isinstance(error, PoolExhaustedError)
    assert took < 0.1
    engine.dispose()


def test_health_during_and_after_a_partition(proxied: tuple[sa.Engine, FaultProxy]) -> None:
    """health(ping=True) never says ok while silent, never hangs, and recovers after."""
    engine, proxy = proxied
    assert "ok" == resilient_db.health(engine, ping=True).status
    proxy.blackhole()
    statuses = []
    for _ in range(3):
        t0 = time.monotonic()
        statuses.append(resilient_db.health(engine, ping=True, timeout=1.0).status)
        assert time.monotonic() - t0 < 1.5
    assert "ok" not in statuses
    proxy.passthrough()  # the flows that lost data stay silent: the pool must replace them
    healed = time.monotonic()
    status = ""
    while time.monotonic() - healed < 10 and status != "ok":
        status = resilient_db.health(engine, ping=True, timeout=1.0).status
        time.sleep(0.05)
    # ok again once the breaker's next probe (reset_timeout after it opened) succeeds
    assert "ok" == status
    assert time.monotonic() - healed < resilient_db.policy_of(engine).breaker.reset_timeout + 1.5


async def test_health_async_during_and_after_a_partition(pg_url: str) -> None:
    """health_async(ping=True) on asyncpg: never ok while silent, ok again after it heals."""
    u = sa.make_url(pg_url)
    with FaultProxy(u.host or "127.0.0.1", u.port) as proxy:
        url = sa.make_url(_proxied(pg_url, proxy)).set(drivername="postgresql+asyncpg")
        engine = resilient_db.create_async_engine(url, policy=DEFAULT)
        try:
            assert "ok" == (await resilient_db.health_async(engine, ping=True)).status
            proxy.blackhole()
            statuses = []
            for _ in range(3):
                t0 = time.monotonic()
                snap = await resilient_db.health_async(engine, ping=True, timeout=1.0)
                statuses.append(snap.status)
                assert time.monotonic() - t0 < 1.5
            assert "ok" not in statuses
            proxy.passthrough()
            healed = time.monotonic()
            status = ""
            while time.monotonic() - healed < 10 and status != "ok":
                status = (await resilient_db.health_async(engine, ping=True, timeout=1.0)).status
                await asyncio.sleep(0.05)
            assert "ok" == status
        finally:
            proxy.passthrough()
            await engine.dispose()


def test_probe_verdicts_against_real_servers(server: str) -> None:
    """answers(): None from a live server, a reason from a refusing or silent one."""
    u = sa.make_url(server)
    target = Target.from_url(u)
    assert answers(target, 1.0, {"user": u.username}) is None
    with FaultProxy(u.host or "127.0.0.1", u.port) as proxy:
        behind = Target.from_url(u.set(host=proxy.host, port=proxy.port))
        proxy.refuse()
        refused = answers(behind, 1.0, {})
        proxy.blackhole()
        t0 = time.monotonic()
        silent = answers(behind, 0.5, {})
        took = time.monotonic() - t0
    assert refused is not None and "connect failed" in refused
    assert silent is not None and "no" in silent
    assert took < 1.0


def test_waiters_are_released_when_the_probe_fails(pg_url: str) -> None:
    """A caller waiting for a connection gets CircuitOpenError once the database is found gone."""
    u = sa.make_url(pg_url)
    with FaultProxy(u.host or "127.0.0.1", u.port) as proxy:
        engine = resilient_db.create_engine(
            _proxied(pg_url, proxy), policy=DEFAULT, pool_size=1, max_overflow=0
        )
        assert 1 == _one(engine)
        box: dict[str, BaseException] = {}
        started = threading.Event()

        def in_flight() -> None:
            with engine.connect() as conn:
                started.set()
                try:
                    conn.execute(sa.text("SELECT 2"))
                except Exception as e:
                    box["flight"] = e

        t = threading.Thread(target=in_flight)
        proxy.blackhole()
        t.start()
        started.wait(5)
        time.sleep(0.1)  # the in-flight call is now blocked on the silent network
        error, took = _raised(lambda: _one(engine))  # waits for the one connection
        t.join(10)
        engine.dispose()
    assert isinstance(error, CircuitOpenError), repr(error)
    assert took < 3.0, took
    assert "flight" in box


def test_call_timeout_option_lets_long_work_run(server: str) -> None:
    """resilient_db_call_timeout=None lifts the call deadline for that checkout only.

    On MariaDB too: PyMySQL's own read_timeout would cut the call at the policy's
    deadline whatever the option said, so the watchdog alone enforces it.
    """
    policy = Policy(timeouts=resilient_db.Timeouts(call=1.0, statement=None), validate="off")
    engine = resilient_db.create_engine(server, policy=policy)
    with engine.connect() as conn:
        conn = conn.execution_options(resilient_db_call_timeout=None)
        assert 1 == len(conn.execute(_sleep_sql(engine, 1.5)).all())
    with engine.connect() as conn:  # back from the pool: the policy's deadline again
        error, took = _raised(lambda: conn.execute(_sleep_sql(engine, 1.5)))
    ctx = resilient_db.error_context(error)
    assert ctx is not None and "read_timeout" == ctx.kind
    assert took < 1.4, took
    with (
        pytest.raises(resilient_db.ConfigurationError, match="resilient_db_call_timeout"),
        engine.connect() as conn,
    ):
        conn.execution_options(resilient_db_call_timeout="long").execute(sa.text("SELECT 1"))
    engine.dispose()
