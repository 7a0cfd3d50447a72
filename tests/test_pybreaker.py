"""``breaker=``: an engine and the application's pybreaker keep each other informed."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pybreaker
import pytest
import sqlalchemy as sa

import resilient_db
from resilient_db import BreakerPolicy, Policy, RetryPolicy, Timeouts
from resilient_db._pybreaker import FORWARDER, DatabaseFailure
from resilient_db.testing import FaultProxy, ManualClock
from tests.test_fork import in_child

RESET_TIMEOUT = 5.0
POLICY = Policy(
    timeouts=Timeouts(connect=2, call=2, checkout=1),
    retry=RetryPolicy(attempts=1),
    breaker=BreakerPolicy(failure_threshold=2, reset_timeout=RESET_TIMEOUT),
)


class Failures(pybreaker.CircuitBreakerListener):
    """Remembers the failures a pybreaker was told about."""

    def __init__(self) -> None:
        self.seen: list[BaseException] = []

    def failure(self, cb: pybreaker.CircuitBreaker, exc: BaseException) -> None:
        self.seen.append(exc)


@dataclass
class Rig:
    """A resilient engine behind a FaultProxy, bridged to an application pybreaker."""

    engine: sa.Engine
    proxy: FaultProxy
    cb: pybreaker.CircuitBreaker
    clock: ManualClock
    failures: Failures

    def select(self) -> object:
        """One checkout and ``SELECT 1``."""
        with self.engine.connect() as conn:
            return conn.execute(sa.text("SELECT 1")).scalar_one()

    def fail(self, n: int) -> None:
        """``n`` connects that fail (the proxy refuses them)."""
        for _ in range(n):
            with pytest.raises(sa.exc.OperationalError):
                self.select()

    def ours(self) -> resilient_db.BreakerSnapshot:
        """The engine's breaker now."""
        return resilient_db.breaker_of(self.engine).snapshot()


def make_rig(pg_url: str, cb: pybreaker.CircuitBreaker) -> Iterator[Rig]:
    url = sa.make_url(pg_url)
    clock = ManualClock()
    failures = Failures()
    cb.add_listener(failures)
    with FaultProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        engine = resilient_db.create_engine(
            url.set(host=proxy.host, port=proxy.port),
            validate="off",
            policy=POLICY,
            clock=clock,
            breaker=cb,
        )
        try:
            yield Rig(engine, proxy, cb, clock, failures)
        finally:
            engine.dispose()


@pytest.fixture
def rig(pg_url: str) -> Iterator[Rig]:
    """A bridge to a pybreaker that only the engine's reports can open (fail_max 100)."""
    yield from make_rig(pg_url, pybreaker.CircuitBreaker(fail_max=100, name="payments"))


def guarded(cb: pybreaker.CircuitBreaker) -> str:
    """What the application's ``@cb`` code sees now."""
    try:
        return str(cb.call(lambda: "ran"))
    except pybreaker.CircuitBreakerError:
        return "CircuitBreakerError"


def test_breaker_must_be_a_pybreaker(sqlite_url: str) -> None:
    """Anything but a pybreaker.CircuitBreaker is refused, naming the argument."""
    with pytest.raises(resilient_db.ConfigurationError) as e:
        resilient_db.create_engine(sqlite_url, breaker=resilient_db.CircuitBreaker)
    assert "breaker" == e.value.field
    engine = sa.create_engine(sqlite_url)
    with pytest.raises(resilient_db.ConfigurationError) as e:
        resilient_db.wrap(engine, breaker="payments")
    assert ("breaker", "must be a pybreaker.CircuitBreaker, got str.") == (
        e.value.field,
        e.value.problem,
    )
    with pytest.raises(resilient_db.ConfigurationError) as e:
        resilient_db.create_async_engine("sqlite+aiosqlite://", breaker=object())
    assert "breaker" == e.value.field
    off = Policy(breaker=BreakerPolicy(enabled=False))
    with pytest.raises(resilient_db.ConfigurationError) as e:
        resilient_db.wrap(engine, policy=off, breaker=pybreaker.CircuitBreaker())
    assert ("breaker", True) == (e.value.field, "enabled is False" in e.value.problem)


def test_pybreaker_is_imported_only_for_breaker() -> None:
    """An engine without breaker= never imports pybreaker."""
    code = (
        "import sys, resilient_db\n"
        "resilient_db.create_engine('sqlite://', validate='off')\n"
        "print('pybreaker' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "False" == out.stdout.strip()


def test_outage_opens_the_app_breaker_and_recovery_closes_it(rig: Rig) -> None:
    """The engine's breaker opening opens the pybreaker; its successful probe closes it."""
    assert "ran" == guarded(rig.cb)
    rig.proxy.refuse()
    rig.fail(2)
    assert FORWARDER.wait()
    assert ("open", "open", "CircuitBreakerError") == (
        rig.ours().state,
        rig.cb.current_state,
        guarded(rig.cb),
    )
    # the first failure was counted; the second opened the engine's breaker, and so the
    # pybreaker, before it was reported (an open pybreaker counts nothing)
    assert [DatabaseFailure] == [type(e) for e in rig.failures.seen]
    assert str(rig.failures.seen[0]).startswith("engine 'postgresql:")
    rig.proxy.passthrough()
    rig.clock.advance(RESET_TIMEOUT)
    assert 1 == rig.select()  # the probe
    assert FORWARDER.wait()
    assert ("closed", "closed", "ran") == (rig.ours().state, rig.cb.current_state, guarded(rig.cb))


def test_counted_failures_reach_the_pybreaker_counter(pg_url: str) -> None:
    """Each failure the engine counts is one on the pybreaker's counter: its fail_max applies."""
    for r in make_rig(pg_url, pybreaker.CircuitBreaker(fail_max=1, name="payments")):
        r.proxy.refuse()
        r.fail(1)
        assert FORWARDER.wait()
        # the pybreaker tripped on the engine's report; the engine's breaker needs 2
        assert ("closed", 1, "open") == (r.ours().state, r.ours().failures, r.cb.current_state)


def test_app_breaker_open_rejects_checkouts(rig: Rig) -> None:
    """The application's open pybreaker makes checkouts fail fast, naming it."""
    assert 1 == rig.select()
    rig.cb.open()
    attempts = resilient_db.engine.resilience_of(rig.engine).connect_attempts
    with pytest.raises(resilient_db.CircuitOpenError) as e:
        rig.select()
    ctx = resilient_db.error_context(e.value)
    assert ctx is not None
    assert "the application's pybreaker 'payments' is open." in ctx.diagnosis
    # held open for the pybreaker's reset_timeout (60 s), no connect attempted
    assert (60.0, attempts) == (
        ctx.retry_in,
        resilient_db.engine.resilience_of(rig.engine).connect_attempts,
    )
    rig.cb.close()  # the application's breaker recovered: the engine follows
    assert ("closed", 1) == (rig.ours().state, rig.select())


def test_app_half_open_trial_call_is_the_engines_probe(pg_url: str) -> None:
    """The pybreaker's trial call goes through the engine as its probe; both close."""
    for r in make_rig(pg_url, pybreaker.CircuitBreaker(reset_timeout=0, name="payments")):
        r.cb.open()
        assert "open" == r.ours().state
        assert 1 == r.cb.call(r.select)  # half-open: the trial call
        assert FORWARDER.wait()
        snap = r.ours()
        assert ("closed", "closed", 1) == (snap.state, r.cb.current_state, snap.successes)


def test_no_feedback_loop(rig: Rig) -> None:
    """The pybreaker the engine opened does not push the engine's recovery back."""
    rig.proxy.refuse()
    rig.fail(2)
    assert FORWARDER.wait()
    snap = rig.ours()
    # opened once, by its own failures; its next probe is still due after its own timeout
    assert ("open", 1, RESET_TIMEOUT, False) == (
        snap.state,
        snap.transitions,
        snap.retry_in,
        snap.forced,
    )
    assert "open" == rig.cb.current_state


def test_app_close_leaves_an_engine_opened_by_its_own_failures(rig: Rig) -> None:
    """Closing the pybreaker by hand does not close an engine breaker the database opened."""
    rig.proxy.refuse()
    rig.fail(2)
    assert FORWARDER.wait()
    rig.cb.close()
    assert ("open", 1) == (rig.ours().state, rig.ours().transitions)


def test_reports_never_wait_for_the_pybreaker_lock(rig: Rig) -> None:
    """A failure is reported without waiting while application code holds the pybreaker."""
    inside, release = threading.Event(), threading.Event()

    def slow() -> None:  # an application call guarded by the pybreaker (it holds its lock)
        inside.set()
        release.wait(10)

    app = threading.Thread(target=lambda: rig.cb.call(slow))
    app.start()
    try:
        assert inside.wait(5)
        rig.proxy.refuse()
        done = threading.Event()
        worker = threading.Thread(target=lambda: (rig.fail(2), done.set()))
        worker.start()
        assert done.wait(5)  # the engine's breaker opened while the pybreaker was busy
        assert "open" == rig.ours().state
    finally:
        release.set()
        app.join(10)
    assert FORWARDER.wait()
    assert "open" == rig.cb.current_state


def test_async_engine_honours_the_app_breaker(tmp_path: object) -> None:
    """create_async_engine(breaker=) rejects checkouts while the application's breaker is open."""
    cb = pybreaker.CircuitBreaker(name="payments")

    async def run() -> str:
        engine = resilient_db.create_async_engine(
            f"sqlite+aiosqlite:///{tmp_path}/a.db", validate="off", breaker=cb
        )
        try:
            cb.open()
            try:
                async with engine.connect():
                    return "connected"
            except resilient_db.CircuitOpenError as e:
                return type(e).__name__
        finally:
            await engine.dispose()

    assert "CircuitOpenError" == asyncio.run(run())


def test_the_pybreaker_forgets_a_disposed_engine(sqlite_url: str) -> None:
    """An engine gone, its listener leaves the application's long-lived pybreaker."""
    cb = pybreaker.CircuitBreaker(name="payments")
    engine = resilient_db.create_engine(sqlite_url, validate="off", breaker=cb)
    assert 1 == len(cb.listeners)
    engine.dispose()
    del engine
    gc.collect()
    assert () == cb.listeners


def test_a_forked_child_reports_to_its_pybreaker(rig: Rig) -> None:
    """In a forked child, the engine's breaker opening still opens the pybreaker."""
    rig.proxy.refuse()
    rig.fail(1)
    assert FORWARDER.wait()  # the parent's forwarding thread has run

    def child() -> dict[str, Any]:
        rig.fail(1)  # the second failure opens the child's engine breaker
        return {"forwarded": FORWARDER.wait(), "app": rig.cb.current_state}

    assert {"forwarded": True, "app": "open"} == in_child(child)
    assert "closed" == rig.cb.current_state  # the parent's pybreaker is its own
