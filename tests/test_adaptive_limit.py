"""The adaptive concurrency limit (``PoolPolicy.adaptive``): shed load when calls get slow.

The limiter's arithmetic is tested with explicit times (no clock is read, no
sleeps); its enforcement at checkout and its reaction to a real brownout
against the real servers, through the fault proxy.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import resilient_db
from resilient_db import ConfigurationError, Policy, PoolExhaustedError, PoolPolicy
from resilient_db._limit import FLOOR, MINIMUM, SAMPLES, WINDOW, AdaptiveLimit
from resilient_db.engine import resilience_of
from resilient_db.testing import FaultProxy

ADAPTIVE = Policy(pool=PoolPolicy(adaptive=True), validate="off")


def _feed(lim: AdaptiveLimit, seconds: float, start: float, windows: int) -> float:
    """``SAMPLES`` calls of ``seconds`` per window, for ``windows`` windows; the end time.

    A decision judges the calls that ended before the call that triggers it:
    one more call at the end time has the last window judged.
    """
    t = start
    for _ in range(windows):
        for k in range(SAMPLES):
            lim.sample(seconds, t + k * WINDOW / SAMPLES)
        t += WINDOW
    lim.sample(seconds, t)
    return t


# -- the arithmetic -----------------------------------------------------------------------


def test_fast_calls_keep_the_limit_at_the_pool_size() -> None:
    lim = AdaptiveLimit(10)
    _feed(lim, 0.0005, 0.0, 20)
    assert (10, 0) == (lim.limit, lim.decreases)
    assert lim.baseline == pytest.approx(0.0005)


def test_a_brownout_halves_the_limit_once_per_window_down_to_the_minimum() -> None:
    lim = AdaptiveLimit(10)
    t = _feed(lim, 0.001, 0.0, 4)
    limits = []
    for _ in range(4):
        t = _feed(lim, 1.0, t, 1)
        limits.append(lim.limit)
    assert [5, 2, 2, 2] == limits  # x0.5 per window, never below MINIMUM
    assert MINIMUM == 2 and lim.latency == 1.0


def test_decisions_wait_for_the_window() -> None:
    lim = AdaptiveLimit(10)
    _feed(lim, 0.001, 0.0, 1)
    for k in range(100):  # a hundred slow calls within one window: no decision yet
        lim.sample(1.0, WINDOW * 1.01 + k * WINDOW / 1000)
    assert 10 == lim.limit
    lim.sample(1.0, WINDOW * 2)  # the window has passed: one decision
    lim.sample(1.0, WINDOW * 2.5 - 1e-9)
    assert 5 == lim.limit


def test_the_limit_climbs_back_by_one_per_window_when_latency_recovers() -> None:
    lim = AdaptiveLimit(10)
    t = _feed(lim, 0.001, 0.0, 2)
    t = _feed(lim, 1.0, t, 3)
    assert 2 == lim.limit
    seen = []
    for _ in range(10):
        t = _feed(lim, 0.001, t, 1)
        seen.append(lim.limit)
    assert [3, 4, 5, 6, 7, 8, 9, 10, 10, 10] == seen


def test_long_queries_among_short_ones_do_not_lower_the_limit() -> None:
    """The sample is the shortest recent call: three 6 s queries do not move it."""
    lim = AdaptiveLimit(10)
    t = 0.0
    for w in range(40):
        for k in range(SAMPLES):
            # each window: three long queries end among five short calls
            lim.sample(6.0 if (k < 3 and w % 4 == 0) else 0.001, t + k * WINDOW / SAMPLES)
        t += WINDOW
    assert (10, 0) == (lim.limit, lim.decreases)


def test_jitter_under_the_absolute_floor_does_not_count() -> None:
    """A 30 ms call against a 0.3 ms baseline is jitter on a loaded machine, not a brownout."""
    lim = AdaptiveLimit(10)
    t = _feed(lim, 0.0003, 0.0, 2)
    _feed(lim, FLOOR * 0.6, t, 10)
    assert 10 == lim.limit


def test_a_lasting_latency_becomes_the_new_baseline() -> None:
    """As Vegas' minRTT reset: a database slow for good is served at full concurrency again."""
    lim = AdaptiveLimit(10)
    t = _feed(lim, 0.001, 0.0, 2)
    t = _feed(lim, 0.2, t, 3)
    assert 2 == lim.limit
    windows = 0
    while lim.limit < 10 and windows < 400:
        t = _feed(lim, 0.2, t, 1)
        windows += 1
    assert lim.limit == 10 and 30 < windows < 120  # about 15-60 s under load
    assert 0.1 <= lim.baseline <= 0.2


def test_a_pool_of_one_has_a_minimum_of_one() -> None:
    lim = AdaptiveLimit(1)
    t = _feed(lim, 0.001, 0.0, 1)
    _feed(lim, 1.0, t, 3)
    assert 1 == lim.limit


def test_concurrent_samples_make_one_decision_per_window() -> None:
    lim = AdaptiveLimit(64)
    _feed(lim, 0.001, 0.0, 1)
    start = threading.Barrier(8)

    def slow() -> None:
        start.wait()
        for k in range(500):
            lim.sample(1.0, WINDOW * 1.5 + k * 1e-6)  # all in one window

    threads = [threading.Thread(target=slow) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert 64 == lim.limit  # the window was still open
    start = threading.Barrier(8)
    threads = [threading.Thread(target=lambda: (start.wait(), lim.sample(1.0, WINDOW * 2)))
               for _ in range(8)]  # fmt: skip
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert 32 == lim.limit  # eight threads saw the window pass: one decision


# -- the policy ---------------------------------------------------------------------------


def test_adaptive_must_be_a_bool() -> None:
    with pytest.raises(ConfigurationError) as info:
        PoolPolicy(adaptive="yes")  # type: ignore[arg-type]
    assert "PoolPolicy.adaptive" in str(info.value)


def test_adaptive_from_the_environment() -> None:
    policy = Policy.from_env({"RESILIENT_DB_POOL_ADAPTIVE": "true"})
    assert policy.pool.adaptive is True
    assert Policy().pool.adaptive is False  # opt-in (docs/resilience.md has the measurement)


def test_off_by_default_and_without_a_queue_pool(sqlite_url: str) -> None:
    engine = resilient_db.create_engine(sqlite_url, policy=Policy(validate="off"))
    assert resilience_of(engine).limit is None
    memory = resilient_db.create_engine("sqlite://", policy=ADAPTIVE)  # SingletonThreadPool
    assert resilience_of(memory).limit is None
    engine.dispose()
    memory.dispose()


# -- against the real servers -------------------------------------------------------------


def _proxied(url: str, proxy: FaultProxy) -> str:
    u = sa.make_url(url)
    return u.set(host=proxy.host, port=proxy.port).render_as_string(hide_password=False)


def _one(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT 1")).scalar_one())


def test_a_lowered_limit_refuses_checkouts_at_once_explained(server_url: str) -> None:
    """In use >= the lowered limit: PoolExhaustedError at once, naming limit, latency, baseline."""
    engine = resilient_db.create_engine(server_url, policy=ADAPTIVE)
    lim = resilience_of(engine).limit
    assert lim is not None and 10 == lim.maximum
    assert 1 == _one(engine)
    t = time.monotonic() + 1.0  # after the engine's own samples' window
    for _ in range(3):
        t = _feed(lim, 1.0, t, 1)
    assert 2 == lim.limit
    held = [engine.connect() for _ in range(2)]
    t0 = time.monotonic()
    with pytest.raises(PoolExhaustedError) as info:
        engine.connect()
    took = time.monotonic() - t0
    for conn in held:
        conn.close()
    assert took < 0.1  # never a wait for a connection
    msg = str(info.value)
    assert "adaptive concurrency limit: 2 connections in use, limit 2 of 10" in msg
    assert "1.000s against a baseline of" in msg
    ctx = resilient_db.error_context(info.value)
    assert ctx is not None and ctx.phase == "checkout"
    extra = dict(ctx.extra)
    assert (2, 10, 1.0) == (extra["adaptive_limit"], extra["max_limit"], extra["latency"])
    pw = sa.make_url(server_url).password
    assert not pw or pw not in msg
    assert 1 == _one(engine)  # under the limit again
    engine.dispose()


@pytest.fixture(params=["pg", "mariadb"])
def proxied(request: pytest.FixtureRequest) -> Iterator[tuple[sa.Engine, FaultProxy]]:
    url = str(request.getfixturevalue("pg_url" if request.param == "pg" else "mariadb_url"))
    u = sa.make_url(url)
    with FaultProxy(u.host or "127.0.0.1", u.port) as proxy:
        engine = resilient_db.create_engine(_proxied(url, proxy), policy=ADAPTIVE)
        try:
            yield engine, proxy
        finally:
            proxy.passthrough()
            engine.dispose()


@pytest.mark.slow  # a whole-service scenario: skipped by the SQLAlchemy 2.0 pass
def test_the_limit_falls_in_a_brownout_and_climbs_back_after(
    proxied: tuple[sa.Engine, FaultProxy],
) -> None:
    """Every reply 1 s late: the limit falls within seconds, callers are shed at once."""
    engine, proxy = proxied
    lim = resilience_of(engine).limit
    assert lim is not None
    stop = threading.Event()
    shed: list[float] = []  # seconds per refused checkout
    served = [0]

    def worker() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                _one(engine)
                served[0] += 1
            except PoolExhaustedError as e:
                if "adaptive concurrency limit" in str(e):
                    shed.append(time.monotonic() - t0)
                stop.wait(0.02)
            except Exception:
                stop.wait(0.02)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        for _ in range(6):
            pool.submit(worker)
        try:
            time.sleep(1.0)
            assert lim.limit == lim.maximum
            proxy.latency(0.5)
            fell_at = _wait_for(lambda: lim.limit <= 2, 8.0)
            assert fell_at is not None, lim
            assert lim.latency > 0.5
            time.sleep(1.0)
            assert shed and max(shed) < 0.5  # refused at once, never queued
            proxy.latency(0)
            back_at = _wait_for(lambda: lim.limit == lim.maximum, 10.0)
            assert back_at is not None, lim
        finally:
            stop.set()
    assert served[0] > 0


def _wait_for(cond: object, timeout: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():  # type: ignore[operator]
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


@pytest.mark.slow  # several seconds: skipped by the SQLAlchemy 2.0 pass
def test_long_queries_beside_short_ones_do_not_lower_the_limit(server_url: str) -> None:
    """Three concurrent 4 s queries beside a stream of short ones: nothing shed, all fast."""
    engine = resilient_db.create_engine(server_url, policy=ADAPTIVE)
    lim = resilience_of(engine).limit
    assert lim is not None
    sleep = "SELECT pg_sleep(4)" if engine.dialect.name == "postgresql" else "SELECT SLEEP(4)"

    def slow() -> object:
        with engine.connect() as conn:
            return conn.execute(sa.text(sleep)).scalar_one()

    quick: list[float] = []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(slow) for _ in range(3)]
        while not all(f.done() for f in futures):
            t0 = time.monotonic()
            assert 1 == _one(engine)
            quick.append(time.monotonic() - t0)
            time.sleep(0.01)
        results = [f.result() for f in futures]
    for _ in range(20):  # decisions after the long queries' completions
        _one(engine)
        time.sleep(WINDOW / 10)
    assert 3 == len(results)
    assert (lim.maximum, 0) == (lim.limit, lim.decreases)
    assert sorted(quick)[int(len(quick) * 0.99) - 1] < 0.5
    engine.dispose()
