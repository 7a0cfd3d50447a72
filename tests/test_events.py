"""resilient_db.events: frozen event objects, delivered to the engine's subscribers."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import replace
from typing import Any

import pytest
import sqlalchemy as sa

import resilient_db
from resilient_db import events
from resilient_db._state import resilience_of
from resilient_db.config import BreakerPolicy, Policy, RetryPolicy
from resilient_db.testing import FaultInjector
from tests.conftest import SENTINEL

TRIP = Policy(
    breaker=BreakerPolicy(failure_threshold=2, reset_timeout=1000.0),
    retry=RetryPolicy(attempts=2, initial=0.001, max_backoff=0.001),
)


def refused() -> BaseException:
    return ConnectionRefusedError(111, "Connection refused")


def names(seen: list[events.Event]) -> list[str]:
    return [type(e).__name__ for e in seen]


def test_a_connection_and_a_failed_statement(sqlite_url: str) -> None:
    """A connect sequence, then a failing statement: classified, with its SQL text only."""
    engine = resilient_db.create_engine(sqlite_url, name="ev", validate="off")
    seen: list[events.Event] = []
    events.subscribe(engine, seen.append)
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        with pytest.raises(sa.exc.OperationalError):
            conn.execute(sa.text("SELECT * FROM no_such_table WHERE x = :x"), {"x": SENTINEL})
    assert ["ConnectStarted", "Connected", "ErrorClassified", "CallFailed"] == names(seen)
    classified, failed = seen[2], seen[3]
    assert isinstance(classified, events.ErrorClassified)
    assert isinstance(failed, events.CallFailed)
    assert ("ev", "execute") == (failed.engine, failed.context.phase)
    assert classified.context is failed.context
    assert failed.statement is not None and "no_such_table" in failed.statement
    assert all(SENTINEL not in repr(e) for e in seen)


def test_connect_retries_breaker_and_rejections(sqlite_url: str) -> None:
    """Refused connects: a retry, the breaker opening, the failure, then rejections."""
    engine = resilient_db.create_engine(sqlite_url, name="down", policy=TRIP, validate="off")
    seen: list[events.Event] = []
    events.subscribe(engine, seen.append)
    FaultInjector(engine).fail_connects(1000, refused)
    with pytest.raises(sa.exc.OperationalError):
        engine.connect()
    for _ in range(3):
        with pytest.raises(resilient_db.CircuitOpenError):
            engine.connect()
    assert [
        "ConnectStarted",
        "RetryScheduled",
        "BreakerStateChanged",
        "ErrorClassified",
        "ConnectFailed",
        "CircuitRejected",
        "CircuitRejected",
        "CircuitRejected",
    ] == names(seen)
    retry, changed, _, failed, rejected = seen[1:6]
    assert isinstance(retry, events.RetryScheduled)
    assert ("connect", 1, "refused") == (
        retry.level,
        retry.attempt,
        retry.classification.kind.value,
    )
    assert isinstance(changed, events.BreakerStateChanged)
    assert ("closed", "open", False) == (changed.old, changed.new, changed.forced)
    assert isinstance(failed, events.ConnectFailed) and failed.context is not None
    assert (2, "refused") == (failed.context.attempt, failed.context.kind)
    assert isinstance(rejected, events.CircuitRejected)
    assert rejected.state == "open" and rejected.retry_in is not None
    assert isinstance(rejected.error, resilient_db.CircuitOpenError)
    assert rejected.error.context is not None and rejected.error.context.phase == "checkout"


def test_only_the_kinds_asked_for(sqlite_url: str) -> None:
    """A handler subscribed to some classes gets those; unsubscribe stops it."""
    engine = resilient_db.create_engine(sqlite_url, name="kinds", validate="off")
    seen: list[events.Event] = []
    events.subscribe(engine, seen.append, events.Connected, events.BreakerStateChanged)
    with engine.connect():
        pass
    resilient_db.breaker_of(engine).force_open()
    events.unsubscribe(engine, seen.append)
    resilient_db.breaker_of(engine).force_close()
    assert ["Connected", "BreakerStateChanged"] == names(seen)
    assert isinstance(seen[1], events.BreakerStateChanged) and seen[1].forced
    with pytest.raises(TypeError, match="not a resilient_db event class"):
        events.subscribe(engine, seen.append, int)  # type: ignore[arg-type]


def test_a_failing_handler_never_breaks_a_call(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that raises is logged at DEBUG and skipped; the next one still runs."""
    caplog.set_level(logging.DEBUG, logger="resilient_db.events")
    engine = resilient_db.create_engine(sqlite_url, name="boom", validate="off")
    seen: list[events.Event] = []

    def boom(event: events.Event) -> None:
        raise RuntimeError("handler bug")

    events.subscribe(engine, boom)
    events.subscribe(engine, seen.append)
    with engine.connect() as conn:
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()
    assert ["ConnectStarted", "Connected"] == names(seen)
    assert 2 == sum("handler bug" in (r.exc_text or "") for r in caplog.records)


def test_events_are_frozen_slotted_dataclasses() -> None:
    """Every event class is a frozen dataclass with slots, built field by field."""
    classes = [getattr(events, n) for n in events.__all__ if n[0].isupper()]
    assert 13 == len(classes)
    for cls in classes:
        assert dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen, cls  # type: ignore[attr-defined]
        assert "__slots__" in vars(cls), cls
    ev = events.ValidationFailed("e", "idle_ping")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.check = "other"  # type: ignore[misc]
    assert not hasattr(ev, "__dict__")
    assert events.ValidationFailed("e", check="x") == replace(ev, check="x")
    assert "ValidationFailed(engine='e', check='idle_ping')" == repr(ev)


def test_unit_of_work_retry_is_an_event(sqlite_url: str) -> None:
    """The unit-of-work runner reports a replay as RetryScheduled at transaction level."""
    engine = resilient_db.create_engine(sqlite_url, name="uow", validate="off")
    seen: list[Any] = []
    events.subscribe(engine, seen.append, events.RetryScheduled)
    calls = []

    def unit(conn: sa.Connection) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise sa.exc.OperationalError("SELECT 1", {}, refused())
        return 1

    assert 1 == resilient_db.run_transaction(engine, unit)  # no backoff sleeps (conftest)
    (retry,) = seen
    assert ("transaction", 1, "uow") == (retry.level, retry.attempt, retry.engine)


def test_no_subscribers_means_no_event(sqlite_url: str) -> None:
    """With every subscriber gone, nothing is built: the dispatcher is empty."""
    engine = resilient_db.create_engine(sqlite_url, name="none", validate="off")
    r = resilience_of(engine)
    for handlers in list(r.events.values()):
        for h in handlers:
            r.events.unsubscribe(h)
    assert {} == dict(r.events)
    b = resilient_db.breaker_of(engine)
    b.force_open()
    with pytest.raises(resilient_db.CircuitOpenError):
        engine.connect()
    b.force_close()
    with engine.connect() as conn:
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()
