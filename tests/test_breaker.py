"""Unit tests of CircuitBreaker: state machine, probes, manual control, with an injected clock."""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import types
from typing import Any

import pybreaker
import pytest

from resilient_db import BreakerPolicy, CircuitBreaker, breaker
from resilient_db.breaker import CLOSED, HALF_OPEN, OPEN, Rejected
from resilient_db.testing import ManualClock


def make(clock: ManualClock | None = None, **policy: Any) -> CircuitBreaker:
    """A breaker with a short reset timeout and the given policy overrides."""
    fields: dict[str, Any] = {"failure_threshold": 3, "reset_timeout": 5.0}
    fields.update(policy)
    return CircuitBreaker("test", BreakerPolicy(**fields), clock=clock or ManualClock())


def trip(cb: CircuitBreaker) -> None:
    """Record failures until the breaker opens."""
    for _ in range(cb.policy.failure_threshold):
        cb.record_failure("db down")
    assert OPEN == cb.state


def test_opens_after_threshold_consecutive_failures() -> None:
    """failure_threshold - 1 failures keep it closed; the next one opens it."""
    cb = make(failure_threshold=3)
    cb.record_failure("x")
    cb.record_failure("x")
    assert CLOSED == cb.state
    cb.record_failure("x")
    assert OPEN == cb.state
    assert 1 == cb.transitions


def test_success_resets_the_consecutive_count() -> None:
    """A success between failures restarts the count."""
    cb = make(failure_threshold=3)
    cb.record_failure()
    cb.record_failure()
    cb.record_success()
    cb.record_failure()
    cb.record_failure()
    assert CLOSED == cb.state
    assert 2 == cb.snapshot().consecutive_failures


def test_failure_rate_over_window_opens() -> None:
    """With failure_rate, half of the last calls failing opens it once minimum_calls is met."""
    cb = make(failure_threshold=100, failure_rate=0.5, window=4, minimum_calls=4)
    cb.record_success()
    cb.record_failure()
    cb.record_success()
    assert CLOSED == cb.state  # 3 calls < minimum_calls
    cb.record_failure()
    assert OPEN == cb.state


def test_failure_rate_window_slides() -> None:
    """Old failures leave the window: 1 failure in the last 4 calls stays below 50 %."""
    cb = make(failure_threshold=100, failure_rate=0.5, window=4, minimum_calls=4)
    cb.record_failure()
    for _ in range(3):
        cb.record_success()
    cb.record_success()  # pushes the failure out
    cb.record_failure()
    assert CLOSED == cb.state
    assert 2 == cb.failures


def test_open_rejects_with_retry_in() -> None:
    """While open, before_call raises Rejected with the time left until the next probe."""
    clock = ManualClock()
    cb = make(clock, reset_timeout=5.0)
    trip(cb)
    clock.advance(2.0)
    with pytest.raises(Rejected) as info:
        cb.before_call()
    assert OPEN == info.value.state
    assert 3.0 == pytest.approx(info.value.retry_in)
    assert 1 == cb.rejected
    assert "db down" == cb.last_failure


def test_half_open_admits_the_configured_number_of_probes() -> None:
    """After reset_timeout exactly half_open_max_calls probes are admitted at a time."""
    clock = ManualClock()
    cb = make(clock, half_open_max_calls=2)
    trip(cb)
    clock.advance(5.0)
    tokens = [cb.before_call(), cb.before_call()]
    assert all(tokens)
    assert HALF_OPEN == cb.state
    with pytest.raises(Rejected) as info:
        cb.before_call()
    assert (HALF_OPEN, 0.0) == (info.value.state, info.value.retry_in)
    assert 2 == cb.snapshot().probes_in_flight


def test_half_open_default_is_one_probe_at_a_time() -> None:
    """The default policy lets one probe through; a release frees the slot."""
    clock = ManualClock()
    cb = CircuitBreaker("d", BreakerPolicy(reset_timeout=1.0), clock=clock)
    for _ in range(BreakerPolicy().failure_threshold):
        cb.record_failure()
    clock.advance(1.0)
    token = cb.before_call()
    with pytest.raises(Rejected):
        cb.before_call()
    cb.release(token)
    assert 0 != cb.before_call()


def test_probe_success_closes() -> None:
    """One successful probe closes the breaker (success_threshold=1)."""
    clock = ManualClock()
    cb = make(clock)
    trip(cb)
    clock.advance(5.0)
    cb.record_success(cb.before_call())
    assert CLOSED == cb.state
    assert 0 == cb.before_call()


def test_success_threshold_needs_that_many_probes() -> None:
    """With success_threshold=2 the first good probe leaves it half-open."""
    clock = ManualClock()
    cb = make(clock, success_threshold=2)
    trip(cb)
    clock.advance(5.0)
    cb.record_success(cb.before_call())
    assert HALF_OPEN == cb.state
    cb.record_success(cb.before_call())
    assert CLOSED == cb.state


def test_non_probe_success_does_not_close() -> None:
    """A success from a call admitted before the breaker opened is no probe."""
    clock = ManualClock()
    cb = make(clock)
    trip(cb)
    clock.advance(5.0)
    cb.before_call()
    cb.record_success(0)
    assert HALF_OPEN == cb.state


def test_failed_probe_reopens_and_next_probe_is_due_from_its_admission() -> None:
    """A probe that hung 4 s then failed: the next probe is due 5 s after it was admitted."""
    clock = ManualClock()
    cb = make(clock, reset_timeout=5.0)
    trip(cb)
    clock.advance(5.0)
    token = cb.before_call()
    clock.advance(4.0)  # e.g. a connect timeout
    cb.record_failure("still down", probe=token)
    assert OPEN == cb.state
    assert 1.0 == pytest.approx(cb.retry_in())
    clock.advance(1.0)
    assert 0 != cb.before_call()


def test_any_counted_failure_in_half_open_reopens() -> None:
    """A failure reported while half-open, even from a non-probe call, reopens."""
    clock = ManualClock()
    cb = make(clock)
    trip(cb)
    clock.advance(5.0)
    cb.before_call()
    cb.record_failure("late failure of an old call")
    assert OPEN == cb.state


def test_stale_probe_token_does_not_free_a_current_slot() -> None:
    """The outcome of a probe from an earlier half-open period leaves the current probe alone."""
    clock = ManualClock()
    cb = make(clock)
    trip(cb)
    clock.advance(5.0)
    old = cb.before_call()
    cb.record_failure("down")  # reopens; `old` is now stale
    clock.advance(5.0)
    current = cb.before_call()
    cb.release(old)
    assert (1, True) == (cb.snapshot().probes_in_flight, old != current)
    with pytest.raises(Rejected):
        cb.before_call()
    cb.record_success(old)
    assert HALF_OPEN == cb.state
    cb.record_success(current)
    assert CLOSED == cb.state


def test_force_open_holds_until_force_close() -> None:
    """force_open rejects even after reset_timeout, with no retry_in; force_close closes."""
    clock = ManualClock()
    cb = make(clock)
    cb.force_open()
    clock.advance(3600)
    with pytest.raises(Rejected) as info:
        cb.before_call()
    assert (OPEN, None) == (info.value.state, info.value.retry_in)
    snap = cb.snapshot()
    assert (True, None) == (snap.forced, snap.retry_in)
    cb.force_close()
    assert (CLOSED, False) == (cb.state, cb.snapshot().forced)
    assert 0 == cb.before_call()


def test_reset_clears_counters_and_the_consecutive_count() -> None:
    """reset() closes and zeroes counters, including failures counted while closed."""
    clock = ManualClock()
    cb = make(clock, failure_threshold=3)
    cb.record_failure("a")
    cb.record_failure("b")
    cb.reset()
    snap = cb.snapshot()
    expected = (CLOSED, 0, 0, 0, None)
    actual = (
        snap.state,
        snap.consecutive_failures,
        snap.failures,
        snap.rejected,
        snap.last_failure,
    )
    assert expected == actual
    cb.record_failure()
    cb.record_failure()
    assert CLOSED == cb.state


def test_quiet_flag_tracks_whether_a_success_changes_anything() -> None:
    """quiet (the hot-path shortcut) is off while failures are pending or a window is kept."""
    cb = make()
    assert cb.quiet
    cb.record_failure()
    assert not cb.quiet
    cb.record_success()
    assert cb.quiet
    assert not make(failure_rate=0.5).quiet


def test_listener_is_called_outside_the_lock() -> None:
    """A pybreaker listener sees each transition and may read snapshot() without deadlock."""
    seen: list[tuple[str, str, str]] = []

    class Listener(pybreaker.CircuitBreakerListener):
        def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
            seen.append((old_state, new_state, cb.snapshot().state))

    clock = ManualClock()
    cb = make(clock)
    cb.listeners.append(Listener())
    trip(cb)
    clock.advance(5.0)
    cb.record_success(cb.before_call())
    expected = [(CLOSED, OPEN, OPEN), (OPEN, HALF_OPEN, HALF_OPEN), (HALF_OPEN, CLOSED, CLOSED)]
    assert expected == seen


def test_lock_is_free_after_admission() -> None:
    """before_call returns with the lock released: the database call runs without it."""
    clock = ManualClock()
    cb = make(clock)
    trip(cb)
    clock.advance(5.0)
    cb.before_call()
    assert not cb._lock.locked()


def test_concurrent_admission_in_half_open_is_bounded() -> None:
    """16 threads racing for probes in half-open: exactly half_open_max_calls get through."""
    clock = ManualClock()
    cb = make(clock, half_open_max_calls=3)
    trip(cb)
    clock.advance(5.0)
    barrier = threading.Barrier(16)
    admitted: list[int] = []

    def worker() -> None:
        barrier.wait()
        with contextlib.suppress(Rejected):
            admitted.append(cb.before_call())

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 3 == len(admitted)
    assert 13 == cb.rejected


def test_snapshot_to_dict() -> None:
    """The snapshot serialises to a plain dict with every field."""
    cb = make()
    cb.record_failure("boom")
    d = cb.snapshot().to_dict()
    assert ("test", CLOSED, 1, "boom") == (
        d["name"],
        d["state"],
        d["consecutive_failures"],
        d["last_failure"],
    )


def test_rejections_counted_concurrently_are_never_lost() -> None:
    """Another thread rejected between any two bytecodes of a rejection: no count is lost."""
    cb = make()
    trip(cb)
    requests: queue.Queue[threading.Event | None] = queue.Queue()

    def other() -> None:
        while (done := requests.get()) is not None:
            with contextlib.suppress(Rejected):
                cb.before_call()
            done.set()

    worker = threading.Thread(target=other)
    worker.start()
    interleaved = 0

    def step(frame: types.FrameType, event: str, arg: Any) -> Any:
        nonlocal interleaved
        if event == "opcode":  # let the other thread run one whole before_call now
            done = threading.Event()
            requests.put(done)
            done.wait(0.05)  # it may be blocked on a lock this thread holds
            interleaved += 1
        return step

    def tracer(frame: types.FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename != breaker.__file__:
            return None
        frame.f_trace_opcodes = True
        return step

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        with contextlib.suppress(Rejected):
            cb.before_call()
    finally:
        sys.settrace(previous)
        requests.put(None)
        worker.join()
    assert 1 + interleaved == cb.rejected


def test_rejection_while_open_counts_and_raises_nothing() -> None:
    """rejection(): a Rejected to raise while plainly open; None when before_call must decide."""
    clock = ManualClock()
    cb = make(clock)
    assert None is cb.rejection()
    trip(cb)
    clock.advance(2.0)
    rej = cb.rejection()
    assert rej is not None
    assert (OPEN, 3.0, 1) == (rej.state, rej.retry_in, cb.rejected)
    clock.advance(3.0)  # a probe is due: before_call admits it
    assert None is cb.rejection()
    assert (1, HALF_OPEN) == (cb.before_call(), cb.state)
    cb.force_open()
    forced = cb.rejection()
    assert forced is not None
    assert (OPEN, None, 2) == (forced.state, forced.retry_in, cb.rejected)
