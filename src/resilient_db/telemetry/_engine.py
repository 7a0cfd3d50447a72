"""The telemetry of one engine: its instruments, its per-call timings, its event handlers.

An :class:`EngineTelemetry` subscribes to the engine's events
(:mod:`resilient_db._events`) when it starts and unsubscribes when it is
detached: errors, rejected checkouts, connect sequences, retries, failed
pings and breaker transitions become metrics and span events. Per-call
durations are not events: the call deadline's dialect wrapper and the pool
hand them to :meth:`EngineTelemetry.checked_out`, :meth:`~EngineTelemetry.checked_in`
and the :class:`~._deferred.Deferred` buffers while timings are on.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import Tracer, TracerProvider, get_current_span

from .._deadline import guard_calls
from .._events import (
    BreakerStateChanged,
    CallFailed,
    CircuitRejected,
    ConnectCancelled,
    Connected,
    ConnectFailed,
    ConnectStarted,
    ErrorClassified,
    RetryScheduled,
    ValidationFailed,
)
from .._state import conn_state, resilience_of
from ..classify import Classification, Kind, Target
from ..errors import ErrorContext
from ..health import pool_stats
from . import _connect, tracing
from ._deferred import DEFAULT_CAPACITY, Deferred, DeferredCount
from .metrics import Instruments, Monotonic, instruments_for

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Engine

    from .._state import Resilience
    from .._types import EngineLike
    from ..health import PoolStats

__all__ = ["EngineTelemetry", "telemetry_of"]

_VERSION = "0.1.0"
_perf = time.perf_counter


class EngineTelemetry:
    """The telemetry of one engine: its attributes, instruments and tracer.

    ``timings`` (None: automatic) turns the per-call histograms on or off;
    ``pool_timings`` adds the per-checkout ones to them; ``timing_buffer``
    values of each wait for a collection; see :func:`~resilient_db.telemetry.instrument`.
    """

    def __init__(
        self,
        engine: Engine,
        r: Resilience,
        *,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        timings: bool | None = None,
        pool_timings: bool = False,
        capture_statement: bool = False,
        timing_buffer: int = DEFAULT_CAPACITY,
    ) -> None:
        self.resilience = r
        self._engine = weakref.ref(engine)
        self.capture_statement = capture_statement
        self.instruments: Instruments = instruments_for(meter_provider, _VERSION)
        self.tracer: Tracer = trace.get_tracer(
            "resilient_db", _VERSION, tracer_provider=tracer_provider
        )
        self.timings = timings
        self.pool_timings = pool_timings
        pool = {"db.client.connection.pool.name": r.name}
        self.pool_attrs: dict[str, Any] = pool
        self.idle_attrs: dict[str, Any] = {**pool, "db.client.connection.state": "idle"}
        self.used_attrs: dict[str, Any] = {**pool, "db.client.connection.state": "used"}
        self._op_attrs: dict[str, Any] | None = None
        ins = self.instruments
        self.operations = Deferred(ins.operation_duration, self.op_attrs, timing_buffer)
        self.waits = Deferred(ins.wait_time, self._pool_attrs, timing_buffer)
        self.uses = Deferred(ins.use_time, self._pool_attrs, timing_buffer)
        self.transitions: dict[str, int] = {}
        self.rejections = Monotonic()
        rejected = {**pool, "error.type": "circuit_open", "resilient_db.phase": "checkout"}
        self.rejected_checkouts = DeferredCount(ins.errors, rejected)
        self._listening = False
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._detached = False

    # -- wiring --------------------------------------------------------------------

    def _handlers(self) -> tuple[tuple[type[Any], Callable[[Any], None]], ...]:
        return (
            (ErrorClassified, self.on_error),
            (CircuitRejected, self.on_rejected),
            (CallFailed, self.on_call_failed),
            (ConnectStarted, self.on_connect_started),
            (RetryScheduled, self.on_retry),
            (Connected, self.on_connected),
            (ConnectFailed, self.on_connect_failed),
            (ConnectCancelled, self.on_connect_cancelled),
            (ValidationFailed, self.on_validation_failed),
            (BreakerStateChanged, self.on_breaker_changed),
        )

    def start(self) -> None:
        """Attach to the engine: observed by the instruments, subscribed to its events."""
        r = self.resilience
        r.telemetry = self
        self.instruments.add(self)
        for kind, handler in self._handlers():
            r.events.subscribe(handler, kind)
        if self.timings or (self.timings is None and self.instruments.collecting):
            self.start_timings()

    def detach(self) -> None:
        """Stop reporting for this engine (before it is re-instrumented)."""
        self._detached = True
        self.flush()  # what was timed so far still reaches this telemetry's provider
        r = self.resilience
        self.instruments.discard(self)
        for _, handler in self._handlers():
            r.events.unsubscribe(handler)
        if r.timing is self:
            r.timing = None
        if r.exec_timer is self:
            r.exec_timer = None
        if r.telemetry is self:
            r.telemetry = None

    def start_timings(self) -> None:
        """Record the per-call histograms from now on (unless ``timings=False``).

        ``db.client.operation.duration`` always; ``wait_time`` and ``use_time``
        only with ``pool_timings`` (setting ``Resilience.timing`` sends the
        pool's checkout and checkin through :meth:`checked_out`/:meth:`checked_in`).
        """
        if self.timings is False or self._detached:
            return
        with self._lock:
            if self._listening:
                return
            engine = self._engine()
            if engine is None:
                return
            # the engine's one dialect wrapper (the call deadline's) times the executes
            guard_calls(engine.dialect, self.resilience)
            self.resilience.exec_timer = self
            self._listening = True
        if self.pool_timings:
            self.resilience.timing = self

    # -- state read at collection time ---------------------------------------------

    def flush(self) -> int:
        """Hand the held per-call durations to the SDK (at the start of a collection).

        Returns how many values were recorded.
        """
        self.rejected_checkouts.flush()
        return self.operations.flush() + self.waits.flush() + self.uses.flush()

    def _pool_attrs(self) -> dict[str, Any]:
        return self.pool_attrs

    @property
    def last_ok(self) -> float | None:
        """Wall-clock time the database last answered (a connect or a health ping)."""
        return self.resilience.last_ok

    def answered(self) -> None:
        """The database answered (a connect or a health ping succeeded)."""
        self.resilience.answered()

    def pool_stats(self) -> PoolStats | None:
        """The engine's current pool statistics, or None once the engine is gone."""
        engine = self._engine()
        if engine is None:
            return None
        stats = pool_stats(engine.pool, self.resilience)
        return stats if stats.size is not None else None

    def op_attrs(self) -> dict[str, Any]:
        """``db.system.name``, ``db.namespace``, ``server.*``: computed once, lazily."""
        attrs = self._op_attrs
        if attrs is None:
            t = self.resilience.target
            engine = self._engine()
            system = t.dialect or "other_sql"
            if engine is not None and getattr(engine.dialect, "is_mariadb", False):
                system = "mariadb"
            attrs = {**_target_attrs(t), "db.system.name": system}
            if t.dialect != "mysql" or (
                engine is not None and engine.dialect.server_version_info is not None
            ):
                self._op_attrs = attrs  # MySQL vs MariaDB is known after the first connect
        return attrs

    # -- per checkout (only when pool timings are on) --------------------------------

    def checked_out(self, record: Any, t0: float) -> None:
        """A connection left the pool: record the wait, remember when."""
        now = _perf()
        self.waits.add(now - t0)
        conn_state(record).t_out = now

    def checked_in(self, record: Any) -> None:
        """A connection came back: record how long it was used."""
        st = conn_state(record)
        t, st.t_out = st.t_out, None
        if t is not None:
            self.uses.add(_perf() - t)

    # -- event handlers --------------------------------------------------------------

    def on_error(self, ev: ErrorClassified) -> None:
        """A classified error is about to be raised."""
        c, ctx = ev.classification, ev.context
        ins = self.instruments
        ins.errors.add(
            1, {**self.pool_attrs, "error.type": c.kind.value, "resilient_db.phase": ctx.phase}
        )
        if c.kind is Kind.AMBIGUOUS_COMMIT:
            ins.ambiguous_commits.add(1, self.pool_attrs)
        if c.kind is Kind.CIRCUIT_OPEN:  # every host of a multi-host engine open
            tracing.rejected_event(self.pool_attrs, ctx.breaker_state or "open", ctx.retry_in)
        elif ctx.phase not in ("execute", "commit", "rollback"):
            # statement errors get their event from on_call_failed, with the statement
            tracing.add_current_event("resilient_db.error", self._event_attrs(ctx))

    def on_rejected(self, ev: CircuitRejected) -> None:
        """A checkout rejected by the open breaker: counted (added to ``resilient_db.errors``
        at :meth:`flush`), an event if the caller's span records."""
        self.rejected_checkouts.add_one()
        if get_current_span().is_recording():  # tested here: this runs for every rejection
            tracing.rejected_event(self.pool_attrs, ev.state, ev.retry_in)

    def _event_attrs(self, ctx: ErrorContext) -> dict[str, Any]:
        attrs = {**self.pool_attrs, "resilient_db.phase": ctx.phase}
        attrs.update(tracing.error_attributes(None, ctx))
        return attrs

    def on_call_failed(self, ev: CallFailed) -> None:
        """An error passed the engine's ``handle_error`` listener."""
        ctx = ev.context
        if ctx.phase in ("execute", "commit", "rollback"):
            attrs = self._event_attrs(ctx)
            if self.capture_statement and ev.statement:
                attrs["db.query.text"] = ev.statement
            tracing.add_current_event("resilient_db.error", attrs)
        if ev.duration is not None and self._listening:
            attrs = {**self.op_attrs(), "error.type": ctx.kind}
            if ctx.code:
                attrs["db.response.status_code"] = ctx.code
            self.instruments.operation_duration.record(ev.duration, attrs)

    def on_connect_started(self, ev: ConnectStarted) -> None:
        """A connect sequence begins: its span."""
        _connect.start(self)

    def on_retry(self, ev: RetryScheduled) -> None:
        """A connect attempt or a unit of work will be retried."""
        if ev.level == "connect":
            _connect.retry(self, ev)
        else:  # the unit-of-work runner's retry (its span events: UnitOfWork.retry)
            self.retried(ev.classification, ev.level)

    def on_connected(self, ev: Connected) -> None:
        """The connect sequence made a connection."""
        seq = _connect.end(self)
        if seq is not None:
            seq.succeeded()

    def on_connect_failed(self, ev: ConnectFailed) -> None:
        """The connect sequence failed for good."""
        _connect.failed(self, ev)

    def on_connect_cancelled(self, ev: ConnectCancelled) -> None:
        """The connect sequence was cancelled."""
        seq = _connect.end(self)
        if seq is not None:
            seq.cancelled()

    def on_validation_failed(self, ev: ValidationFailed) -> None:
        """A pooled connection failed its ping."""
        self.validation_failed(ev.check)

    def on_breaker_changed(self, ev: BreakerStateChanged) -> None:
        """Count the transition (``resilient_db.breaker.transitions``)."""
        with self._state_lock:
            self.transitions[ev.new] = self.transitions.get(ev.new, 0) + 1

    def validation_failed(self, check: str) -> None:
        """A pooled connection failed its ping, or a startup check failed."""
        self.instruments.validation_failures.add(
            1, {**self.pool_attrs, "resilient_db.validation.check": check}
        )

    def retried(
        self,
        c: Classification,
        level: str,
        *,
        attempt: int | None = None,
        delay: float | None = None,
    ) -> None:
        """Count one retry (``level``: ``connect`` or ``transaction``).

        A unit-of-work (``transaction``) retry is also an event on the current span.
        """
        self.instruments.retry_attempts.add(
            1, {**self.pool_attrs, "error.type": c.kind.value, "resilient_db.retry.level": level}
        )
        if level == "transaction":
            attrs: dict[str, Any] = {**self.pool_attrs, "resilient_db.retry.level": level}
            if attempt is not None:
                attrs["resilient_db.attempt"] = attempt
            if delay is not None:
                attrs["resilient_db.retry_in"] = delay
            attrs.update(tracing.error_attributes(c))
            tracing.add_current_event("resilient_db.retry", attrs)


def _target_attrs(t: Target) -> dict[str, Any]:
    attrs: dict[str, Any] = {"db.system.name": t.dialect or "other_sql"}
    if t.database:
        attrs["db.namespace"] = t.database
    if t.dialect != "sqlite" and t.host:
        attrs["server.address"] = t.host
        if t.port:
            attrs["server.port"] = t.port
    return attrs


def telemetry_of(engine: EngineLike) -> EngineTelemetry:
    """The :class:`EngineTelemetry` of a resilient_db engine."""
    tel = resilience_of(engine).telemetry
    if not isinstance(tel, EngineTelemetry):  # pragma: no cover - always attached
        raise LookupError("this engine has no telemetry attached")
    return tel
