"""What the runtime reports: frozen event objects, and each engine's dispatcher.

The runtime never calls telemetry or the logger. At each point worth
reporting it hands one frozen event to the engine's :class:`Dispatcher`,
which calls the handlers subscribed to that event class, in subscription
order: the log records (:mod:`resilient_db.telemetry.logs`), the metrics and
spans (:mod:`resilient_db.telemetry`) and any handler of the application's
(:func:`resilient_db.events.subscribe`). A handler that raises is logged at
DEBUG and skipped: reporting never breaks a database call.

The dispatcher is a dict from event class to a tuple of handlers, so a site
asks ``r.events.get(Kind)`` (one C-level lookup) and builds the event only
when somebody listens. Events never hold a password or a bind parameter: an
:class:`~resilient_db.ErrorContext` never does, and :class:`CallFailed`
carries the SQL text alone.

Per-call timings are not events: a checkout, a check-in and every execute
would each build an object. Telemetry samples them through
``Resilience.timing`` and ``Resilience.exec_timer`` (see ``_deadline.py``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .classify import Classification
    from .errors import CircuitOpenError, ErrorContext

__all__ = [
    "EVENTS",
    "BreakerRelay",
    "BreakerStateChanged",
    "CallFailed",
    "CircuitRejected",
    "ConnectCancelled",
    "ConnectFailed",
    "ConnectStarted",
    "Connected",
    "Dispatcher",
    "ErrorClassified",
    "Event",
    "ProbeVerdict",
    "RetryScheduled",
    "ValidationFailed",
    "deliver",
    "report_failure",
]

_logger = logging.getLogger("resilient_db.events")


@dataclass(frozen=True, slots=True)
class Event:
    """The base of every event: the name of the engine it happened on."""

    engine: str


@dataclass(frozen=True, slots=True)
class ConnectStarted(Event):
    """A connect sequence (a new DBAPI connection, with its retries) begins."""


@dataclass(frozen=True, slots=True)
class Connected(Event):
    """The connect sequence made a connection."""


@dataclass(frozen=True, slots=True)
class ConnectFailed(Event):
    """The connect sequence failed for good (after its retries).

    ``context``: the error's context, or None for an error that is not the
    database's (it passes through unclassified).
    """

    context: ErrorContext | None


@dataclass(frozen=True, slots=True)
class ConnectCancelled(Event):
    """The connect sequence was cancelled (never a failure)."""


@dataclass(frozen=True, slots=True)
class RetryScheduled(Event):
    """An attempt failed and will be retried after ``delay`` seconds.

    ``level``: ``connect`` (the engine's connect retry) or ``transaction`` (the
    unit-of-work retry); ``attempt``: the number of the attempt that failed.
    """

    level: str
    classification: Classification
    attempt: int
    delay: float


@dataclass(frozen=True, slots=True)
class ErrorClassified(Event):
    """A classified failure of the engine is being raised to the application.

    Connects that failed for good, pool timeouts, rejected checkouts of a
    multi-host engine, and every database error of a call.
    """

    classification: Classification
    context: ErrorContext


@dataclass(frozen=True, slots=True)
class CallFailed(Event):
    """An error passed the engine's ``handle_error`` listener, with its context.

    ``statement``: the SQL text of a failed execute (never its parameters), or
    None; ``duration``: seconds the failed driver execute ran, when it was
    timed (telemetry's per-call timings are on), else None.
    """

    context: ErrorContext
    statement: str | None
    duration: float | None


@dataclass(frozen=True, slots=True)
class CircuitRejected(Event):
    """A checkout rejected by the open breaker (one per rejected call).

    ``error`` is the :class:`~resilient_db.CircuitOpenError` about to be raised;
    its message and context are rendered when first read.
    """

    state: str
    retry_in: float | None
    error: CircuitOpenError


@dataclass(frozen=True, slots=True)
class BreakerStateChanged(Event):
    """The engine's circuit breaker changed state (told once its lock is released)."""

    old: str
    new: str
    forced: bool
    last_failure: str | None


@dataclass(frozen=True, slots=True)
class ValidationFailed(Event):
    """A pooled connection failed its ping (``check``: ``idle_ping``)."""

    check: str


@dataclass(frozen=True, slots=True)
class ProbeVerdict(Event):
    """The silence probe's verdict: the server answered, or not (then ``diagnosis``).

    ``cut``: how many calls in flight were cut at once.
    """

    answered: bool
    diagnosis: str | None
    cut: int


@dataclass(frozen=True, slots=True)
class RepliesLost(Event):
    """The server answers, but ``cut`` silent calls were cut: their sessions were idle on it.

    The server had sent those replies; they were lost on the way (``diagnosis``).
    """

    diagnosis: str
    cut: int


#: Every event class, in the order of a connection's life.
EVENTS: tuple[type[Event], ...] = (
    ConnectStarted,
    RetryScheduled,
    Connected,
    ConnectFailed,
    ConnectCancelled,
    ErrorClassified,
    CallFailed,
    CircuitRejected,
    BreakerStateChanged,
    ValidationFailed,
    ProbeVerdict,
    RepliesLost,
)


def _quick_init(cls: type[Event]) -> None:
    """Give ``cls`` an ``__init__`` that fills its slots directly.

    A frozen dataclass's own ``__init__`` sets each field through
    ``object.__setattr__``, about 0.25 µs a field: a third of what a call
    rejected by the open breaker may cost. This one calls the slots'
    descriptors, as ``object.__setattr__`` would, with the same signature; the
    instances stay frozen (assigning a field raises ``FrozenInstanceError``).
    """
    names = [f.name for f in fields(cls)]
    setters: dict[str, Any] = {}
    for name in names:
        owner = next(k for k in cls.__mro__ if name in getattr(k, "__slots__", ()))
        setters[f"_set_{name}"] = vars(owner)[name].__set__
    body = "".join(f"    _set_{n}(self, {n})\n" for n in names)
    namespace: dict[str, Any] = {}
    exec(f"def __init__(self, {', '.join(names)}):\n{body}", setters, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__annotations__ = dict(cls.__init__.__annotations__)
    cls.__init__ = init  # type: ignore[method-assign]


for _cls in EVENTS:
    _quick_init(_cls)

E = TypeVar("E", bound=Event)
Handler = Callable[[Any], object]


def deliver(handlers: tuple[Handler, ...], event: Event) -> None:
    """Call each handler with ``event``; one that raises is logged at DEBUG and skipped."""
    for handler in handlers:
        try:
            handler(event)
        except Exception:
            report_failure(handler)


def report_failure(handler: Handler) -> None:
    """Log, at DEBUG, the exception a handler raised (called in its ``except`` block)."""
    _logger.debug("resilient_db event handler %r failed", handler, exc_info=True)


class Dispatcher(dict[type[Event], tuple[Handler, ...]]):
    """One engine's subscribers: a tuple of handlers per event class.

    Read it like a dict (``get(Kind)`` is empty or absent when nobody listens);
    change it only with :meth:`subscribe` and :meth:`unsubscribe`, which swap
    in new tuples, so emitting takes no lock.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        counts = ", ".join(f"{k.__name__}: {len(v)}" for k, v in self.items() if v)
        return f"<resilient_db Dispatcher {{{counts}}}>"

    def subscribe(self, handler: Callable[[E], object], *kinds: type[E]) -> None:
        """Call ``handler`` with every event of ``kinds`` (default: every event)."""
        for kind in kinds:
            if kind is not Event and kind not in EVENTS:
                raise TypeError(f"not a resilient_db event class: {kind!r}")
        wanted: tuple[type[Event], ...] = kinds or EVENTS
        if Event in wanted:
            wanted = EVENTS
        with self._lock:
            for k in dict.fromkeys(wanted):
                self[k] = (*self.get(k, ()), handler)

    def unsubscribe(self, handler: Callable[..., object]) -> None:
        """Stop calling ``handler`` (for every event class it was subscribed to)."""
        with self._lock:
            for k, handlers in list(self.items()):
                kept = tuple(h for h in handlers if h != handler)
                if kept:
                    self[k] = kept
                else:
                    del self[k]

    def emit(self, event: Event) -> None:
        """Hand ``event`` to its subscribers (for rare events; hot sites check first)."""
        handlers = self.get(type(event))
        if handlers:
            deliver(handlers, event)


class BreakerRelay:
    """A :class:`~resilient_db.CircuitBreaker` listener: state changes become events."""

    __slots__ = ("events", "name")

    def __init__(self, name: str, events: Dispatcher) -> None:
        self.name = name
        self.events = events

    def state_change(self, cb: Any, old: Any, new: Any) -> None:
        """The breaker changed state (called with its lock released)."""
        self.events.emit(
            BreakerStateChanged(self.name, str(old), str(new), bool(cb._forced), cb.last_failure)
        )
