"""Subscribe to what an engine reports: frozen event objects, one class per hook.

Telemetry (metrics, spans) and the log records are subscribers like any
other; add your own to count, alert or log differently::

    from resilient_db import events

    def on_open(ev: events.BreakerStateChanged) -> None:
        if ev.new == "open":
            page_someone(ev.engine, ev.last_failure)

    events.subscribe(engine, on_open, events.BreakerStateChanged)

A handler runs synchronously, in the thread (or task) that caused the event,
after the engine's own state is updated and before the error (if any) is
raised; it must be quick and must not use the engine. One that raises is
logged at DEBUG on ``resilient_db.events`` and skipped. Events never hold a
password or a bind parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from ._events import (
    BreakerStateChanged,
    CallFailed,
    CircuitRejected,
    ConnectCancelled,
    Connected,
    ConnectFailed,
    ConnectStarted,
    ErrorClassified,
    Event,
    ProbeVerdict,
    RepliesLost,
    RetryScheduled,
    ValidationFailed,
)
from ._state import resilience_of

if TYPE_CHECKING:
    from ._types import EngineLike

__all__ = [
    "BreakerStateChanged",
    "CallFailed",
    "CircuitRejected",
    "ConnectCancelled",
    "ConnectFailed",
    "ConnectStarted",
    "Connected",
    "ErrorClassified",
    "Event",
    "ProbeVerdict",
    "RepliesLost",
    "RetryScheduled",
    "ValidationFailed",
    "subscribe",
    "unsubscribe",
]

E = TypeVar("E", bound=Event)


def subscribe(engine: EngineLike, handler: Callable[[E], object], *kinds: type[E]) -> None:
    """Call ``handler(event)`` for each event of ``kinds`` on ``engine`` (default: all).

    ``engine``: an Engine, AsyncEngine or Connection of resilient_db. Handlers
    run in subscription order, after resilient_db's own.
    """
    resilience_of(engine).events.subscribe(handler, *kinds)


def unsubscribe(engine: EngineLike, handler: Callable[..., object]) -> None:
    """Stop calling ``handler`` for ``engine``'s events."""
    resilience_of(engine).events.unsubscribe(handler)
