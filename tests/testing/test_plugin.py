"""The pytest plugin (fixtures, --rdb-url) and the outage assertions."""

from __future__ import annotations

import textwrap
import time

import pytest
import sqlalchemy as sa

import resilient_db
from resilient_db import BreakerPolicy, Policy, Timeouts
from resilient_db.testing import (
    FaultInjector,
    assert_degraded_gracefully,
    assert_fails_fast,
    assert_fails_fast_async,
    assert_recovers,
)

pytest_plugins = ["pytester"]

INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"

USER_SUITE = textwrap.dedent(
    """
    import pytest
    import sqlalchemy as sa
    import resilient_db
    from resilient_db import BreakerPolicy, Policy, Timeouts
    from resilient_db._backoff import testing_enabled
    from resilient_db.testing import (
        assert_degraded_gracefully, assert_fails_fast, assert_recovers,
    )

    POLICY = Policy(
        timeouts=Timeouts(connect=1, call=1),
        breaker=BreakerPolicy(failure_threshold=2, reset_timeout=0.2),
    )

    def test_injected_outage_on_sqlite(fault_injector, tmp_path):
        engine = resilient_db.create_engine(f"sqlite:///{tmp_path}/app.db", policy=POLICY)
        fault_injector(engine).fail_connects(None, "disk_full")  # no connection to be had
        contexts = assert_degraded_gracefully(engine, within=1.0, calls=3, breaker_opens=True)
        assert ["disk_full", "disk_full", "circuit_open"] == [c.kind for c in contexts]

    def test_injectors_are_closed_after_each_test(fault_injector, tmp_path):
        engine = resilient_db.create_engine(f"sqlite:///{tmp_path}/app.db")
        inject = fault_injector(engine)
        inject.fail_executes(None, "disk_full")
        pytest.injector = inject

    def test_previous_injector_was_closed():
        with pytest.raises(RuntimeError):
            pytest.injector.fail_executes(1, "disk_full")

    def test_no_backoff(rdb_no_backoff):
        assert testing_enabled()

    def test_backoff_back_on():
        assert not testing_enabled()

    def test_network_outage(fault_proxy):
        engine = resilient_db.create_engine(fault_proxy.url, policy=POLICY)
        with engine.connect() as conn:
            assert 1 == conn.execute(sa.text("SELECT 1")).scalar()
        fault_proxy.refuse()
        fault_proxy.reset_all()
        assert_degraded_gracefully(engine, within=3.0, calls=3, breaker_opens=True)
        fault_proxy.passthrough()
        assert assert_recovers(engine, within=5.0) < 5.0
        engine.dispose()
    """
)


def test_plugin_loads_from_its_entry_point(pytester: pytest.Pytester) -> None:
    """In a fresh process the fixtures exist without -p; fault_proxy skips without a URL."""
    pytester.makeini(INI)
    pytester.makepyfile(test_user=USER_SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(passed=6, skipped=1)
    result.stdout.fnmatch_lines(["*no database URL: pass --rdb-url or set RESILIENT_DB_TEST_URL*"])


def test_fault_proxy_fixture_with_rdb_url(pytester: pytest.Pytester, pg_url: str) -> None:
    """--rdb-url puts the fault_proxy fixture in front of a real server."""
    pytester.makeini(INI)
    pytester.makepyfile(test_user=USER_SUITE)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--rdb-url={pg_url}", "-k", "network_outage"
    )
    result.assert_outcomes(passed=1)


def test_url_from_the_environment(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RESILIENT_DB_TEST_URL is read when --rdb-url is absent; SQLite URLs skip the proxy."""
    monkeypatch.setenv("RESILIENT_DB_TEST_URL", "sqlite:///somewhere.db")
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        def test_url(rdb_url):
            assert "sqlite:///somewhere.db" == rdb_url

        def test_proxy(fault_proxy):
            raise AssertionError("not reached")
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*SQLite has no network to break*"])


# -- the assertions, directly ------------------------------------------------------------


def test_assert_fails_fast_returns_the_exception() -> None:
    """It returns what was raised in time, and explains a call that returned or was slow."""

    def boom() -> None:
        raise KeyError("x")

    assert isinstance(assert_fails_fast(boom, 1.0), KeyError)
    with pytest.raises(AssertionError, match="but the call returned"):
        assert_fails_fast(lambda: None, 1.0)
    with pytest.raises(AssertionError, match=r"failing with KeyError took .*s, more than 0.0s"):
        assert_fails_fast(boom, 0.0)
    with pytest.raises(KeyError):  # not the expected type: it propagates
        assert_fails_fast(boom, 1.0, raises=ValueError)


async def test_assert_fails_fast_async() -> None:
    """The async twin awaits the call."""

    async def boom() -> None:
        raise KeyError("x")

    async def fine() -> None:
        return None

    assert isinstance(await assert_fails_fast_async(boom, 1.0), KeyError)
    with pytest.raises(AssertionError, match="but the call returned"):
        await assert_fails_fast_async(fine, 1.0)


def test_assert_degraded_gracefully_rejects_a_healthy_or_plain_engine(sqlite_url: str) -> None:
    """A database that answers, or an error without a diagnosis, fails the assertion."""
    engine = resilient_db.create_engine(sqlite_url)
    with pytest.raises(AssertionError, match="call 1 of 3: expected an exception"):
        assert_degraded_gracefully(engine)
    plain = sa.create_engine(sqlite_url)
    FaultInjector(plain).fail_executes(None, "disk_full")
    with pytest.raises(AssertionError, match="without a resilient_db diagnosis"):
        assert_degraded_gracefully(plain)


def test_assert_degraded_gracefully_checks_the_breaker(sqlite_url: str) -> None:
    """breaker_opens=True fails while the breaker is still closed."""
    policy = Policy(breaker=BreakerPolicy(failure_threshold=5))
    engine = resilient_db.create_engine(sqlite_url, policy=policy)
    FaultInjector(engine).fail_executes(None, "disk_full")
    with pytest.raises(AssertionError, match="breaker to be open, it is closed"):
        assert_degraded_gracefully(engine, calls=2, breaker_opens=True)


def test_assert_recovers(sqlite_url: str) -> None:
    """It retries until a call succeeds, and gives up with the last diagnosis."""
    engine = resilient_db.create_engine(
        sqlite_url, policy=Policy(timeouts=Timeouts(statement=1.0), breaker=BreakerPolicy())
    )
    inject = FaultInjector(engine)
    inject.fail_executes(2, "disk_full")
    assert assert_recovers(engine, within=2.0, interval=0.001) < 2.0
    assert 2 == inject.executes_failed
    inject.fail_executes(None, "read_only")
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"within 0.05s; last: \[read_only\]"):
        assert_recovers(engine, within=0.05, interval=0.01)
    assert time.monotonic() - start < 1.0
