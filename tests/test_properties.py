"""Property tests (hypothesis) for the pure parts: classification, backoff, breaker, redaction."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import exc as sa_exc

from resilient_db import BreakerPolicy, Kind, RetryLevel, RetryPolicy, classify
from resilient_db._backoff import backoff
from resilient_db.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, Rejected
from resilient_db.errors import REDACTED, redact_parameters
from resilient_db.testing import ManualClock

PHASES = st.sampled_from([None, "connect", "checkout", "execute", "commit", "rollback"])


class FakeDriverError(Exception):
    """Stands in for a DBAPI error carrying an arbitrary SQLSTATE."""

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@settings(max_examples=300, deadline=None)
@given(
    message=st.text(max_size=200),
    sqlstate=st.one_of(st.none(), st.text(alphabet="0123456789ABCDEFP", min_size=5, max_size=5)),
    invalidated=st.booleans(),
    phase=PHASES,
)
def test_classify_never_fails_and_is_consistent(
    message: str, sqlstate: str | None, invalidated: bool, phase: str | None
) -> None:
    """Any driver error gets a kind, a retry level and a non-empty diagnosis."""
    orig = FakeDriverError(message, sqlstate)
    exc = sa_exc.OperationalError("SELECT 1", {}, orig, connection_invalidated=invalidated)
    c = classify(exc, phase=phase)
    assert isinstance(c.kind, Kind)
    assert isinstance(c.retry, RetryLevel)
    assert c.diagnosis
    if c.kind is Kind.AMBIGUOUS_COMMIT:
        assert (phase, RetryLevel.NEVER) == ("commit", c.retry)


@given(phase=PHASES, cause=st.sampled_from([asyncio.CancelledError, KeyboardInterrupt]))
def test_cancellation_never_counts_or_retries(phase: str | None, cause: type) -> None:
    """Cancellation is never a failure, whatever the phase."""
    c = classify(cause(), phase=phase)
    assert (Kind.CANCELLED, RetryLevel.NEVER, False) == (c.kind, c.retry, c.counts_for_breaker)


@given(
    attempts=st.integers(min_value=1, max_value=60),
    initial=st.floats(min_value=0, max_value=5),
    cap=st.floats(min_value=0, max_value=30),
    r=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_backoff_stays_within_the_full_jitter_ceiling(
    attempts: int, initial: float, cap: float, r: float
) -> None:
    """The n-th pause is in [0, min(max_backoff, initial * 2**(n-1))]."""
    policy = RetryPolicy(attempts=3, initial=initial, max_backoff=cap)
    pause = backoff(policy, attempts, lambda: r)
    assert 0.0 <= pause <= min(cap, initial * 2 ** (attempts - 1))


@settings(max_examples=200, deadline=None)
@given(
    threshold=st.integers(min_value=1, max_value=5),
    max_probes=st.integers(min_value=1, max_value=3),
    steps=st.lists(
        st.sampled_from(["call_ok", "call_fail", "call_hold", "finish_ok", "finish_fail", "tick"]),
        max_size=60,
    ),
)
def test_breaker_invariants(threshold: int, max_probes: int, steps: list[str]) -> None:
    """Probes in flight never exceed the limit; open rejects until reset_timeout passes."""
    reset = 1.0
    clock = ManualClock(0.0)
    policy = BreakerPolicy(
        failure_threshold=threshold, reset_timeout=reset, half_open_max_calls=max_probes
    )
    b = CircuitBreaker("prop", policy, clock=clock)
    held: list[int] = []
    # when the open period began: at the trip, or (a failed probe) when the last probe went in
    opened_at: float | None = None
    probe_at: float | None = None
    last = b.snapshot()
    for step in steps:
        if step == "tick":
            clock.now += 0.5  # exact in binary: reset_timeout is reached exactly
        elif step.startswith("finish"):
            if held:
                token = held.pop(0)
                if step == "finish_ok":
                    b.record_success(token)
                else:
                    b.record_failure("boom", token)
        else:
            before = b.snapshot()
            try:
                token = b.before_call()
            except Rejected as rej:
                if rej.state == OPEN:  # only until reset_timeout has passed since it opened
                    assert opened_at is not None and clock.now - opened_at < reset
                    assert rej.retry_in == pytest.approx(opened_at + reset - clock.now)
                else:  # half-open: only when every probe slot is taken
                    assert (HALF_OPEN, max_probes) == (rej.state, b.snapshot().probes_in_flight)
            else:
                if before.state == OPEN:  # admitted (as a probe) only once reset_timeout passed
                    assert opened_at is not None and clock.now - opened_at >= reset
                if token:
                    probe_at = clock.now
                if step == "call_hold":
                    held.append(token)
                elif step == "call_ok":
                    b.record_success(token)
                else:
                    b.record_failure("boom", token)
        snap = b.snapshot()
        if snap.state == OPEN and (last.state != OPEN or snap.transitions != last.transitions):
            opened_at = clock.now if last.state == CLOSED or probe_at is None else probe_at
        last = snap
        assert snap.state in (CLOSED, OPEN, HALF_OPEN)
        assert 0 <= snap.probes_in_flight <= max_probes


@given(
    secret=st.text(min_size=4, max_size=40).filter(lambda s: REDACTED not in s),
    prefix=st.text(max_size=30),
    suffix=st.text(max_size=30),
    shape=st.sampled_from(["dict", "tuple", "many"]),
)
def test_redaction_removes_every_long_bind_value(
    secret: str, prefix: str, suffix: str, shape: str
) -> None:
    """A bind value of 4+ characters quoted anywhere in a message is gone afterwards."""
    params: object = {"p": secret} if shape == "dict" else (secret,)
    if shape == "many":
        params = [{"p": "x"}, {"p": secret}]
    exc = ValueError(f"{prefix}{secret}{suffix}", 42)
    redact_parameters(params, exc)
    assert secret not in exc.args[0]
    assert 42 == exc.args[1]


def test_short_values_are_left_alone() -> None:
    """Values under four characters are not redacted (they would mangle the message)."""
    exc = ValueError("key (id)=(7) already exists")
    redact_parameters({"id": 7}, exc)
    assert ("key (id)=(7) already exists",) == exc.args


@pytest.mark.parametrize("value", [True, None, 3.5])
def test_non_text_parameters_do_not_crash(value: object) -> None:
    """Booleans, None and floats in parameters are handled."""
    exc = ValueError("3.5 is odd")
    redact_parameters({"v": value}, exc)
    assert isinstance(exc.args[0], str)
