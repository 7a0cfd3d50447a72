"""Metrics, traces and logs for resilient_db engines.

Every engine is instrumented when it is created, against the global
OpenTelemetry providers (no-ops until an SDK is configured; see
``docs/observability.md``). :func:`instrument` re-instruments an engine with
explicit providers, e.g. a test's ``MeterProvider`` with an in-memory reader.

The engine's hooks call an :class:`EngineTelemetry` at a few points: a
classified error, a connect sequence, a failed validation, and, only when
the opt-in pool timings are on, each checkout and checkin. Operation timings
(``db.client.operation.duration``) wrap the dialect's execute methods instead.
Per-call durations wait in a :class:`~._deferred.Deferred` buffer and reach
the SDK when a reader collects (see ``_deferred.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from opentelemetry import trace
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import Span, Tracer, TracerProvider
from sqlalchemy import event

from .._deadline import guard_calls
from .._state import conn_state, resilience_of
from ..classify import Classification, Kind, Target, classify
from ..errors import CircuitOpenError, ConfigurationError, ErrorContext, error_context
from ..health import pool_stats
from . import logs, tracing
from ._deferred import DEFAULT_CAPACITY, Deferred, DeferredCount
from .metrics import METRICS, Instruments, MetricSpec, Monotonic, instruments_for

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from .._state import Resilience
    from .._types import EngineLike
    from ..health import PoolStats

__all__ = [
    "METRICS",
    "EngineTelemetry",
    "MetricSpec",
    "UnitOfWork",
    "attach",
    "instrument",
    "telemetry_of",
    "unit_of_work",
]

_VERSION = "0.1.0"
_perf = time.perf_counter
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _safe(fn: Callable[_P, _R]) -> Callable[_P, _R | None]:
    """Telemetry must never break a database call: log its own errors at DEBUG."""

    @functools.wraps(fn)
    def safe(*args: _P.args, **kwargs: _P.kwargs) -> _R | None:
        try:
            return fn(*args, **kwargs)
        except Exception:
            logs.logger.debug("resilient_db telemetry hook %s failed", fn.__name__, exc_info=True)
            return None

    return safe


class EngineTelemetry:
    """The telemetry of one engine: its attributes, instruments, tracer and logger state.

    ``timings`` (None: automatic) turns the per-call histograms on or off;
    ``pool_timings`` adds the per-checkout ones to them; ``timing_buffer``
    values of each wait for a collection; see :func:`instrument`.
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
        self.summary = logs.RejectionSummary()
        #: Wall-clock time the database last answered (a connect or a health ping).
        self.last_ok: float | None = None
        self._listening = False
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._detached = False

    # -- wiring --------------------------------------------------------------------

    def start(self) -> None:
        """Attach to the engine: observed by the instruments, breaker listener, hooks."""
        r = self.resilience
        r.telemetry = self
        self.instruments.add(self)
        if r.breaker is not None:
            r.breaker.listeners.append(self)
        event.listen(self._engine_or_raise(), "handle_error", self._handle_error)
        if self.timings or (self.timings is None and self.instruments.collecting):
            self.start_timings()

    def detach(self) -> None:
        """Stop reporting for this engine (before it is re-instrumented)."""
        self._detached = True
        self.flush()  # what was timed so far still reaches this telemetry's provider
        r = self.resilience
        self.instruments.discard(self)
        if r.breaker is not None and self in r.breaker.listeners:
            r.breaker.listeners.remove(self)
        if r.timing is self:
            r.timing = None
        if r.exec_timer is self:
            r.exec_timer = None
        if r.telemetry is self:
            r.telemetry = None
        engine = self._engine()
        if engine is not None:
            with contextlib.suppress(Exception):
                event.remove(engine, "handle_error", self._handle_error)

    def _engine_or_raise(self) -> Engine:
        engine = self._engine()
        if engine is None:  # pragma: no cover - the engine instruments itself
            raise RuntimeError("the engine is gone")
        return engine

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

    # -- events from the hooks ------------------------------------------------------

    @_safe
    def on_error(self, c: Classification, ctx: ErrorContext) -> None:
        """A classified error is about to be raised (from ``Resilience.context``)."""
        ins = self.instruments
        error_type = c.kind.value
        ins.errors.add(
            1, {**self.pool_attrs, "error.type": error_type, "resilient_db.phase": ctx.phase}
        )
        if c.kind is Kind.AMBIGUOUS_COMMIT:
            ins.ambiguous_commits.add(1, self.pool_attrs)
        if c.kind is Kind.CIRCUIT_OPEN:  # every host of a multi-host engine open
            self.summary.rejected(self, ctx)
            tracing.rejected_event(self.pool_attrs, ctx.breaker_state or "open", ctx.retry_in)
        elif ctx.phase not in ("execute", "commit", "rollback"):
            # statement errors get their event from _handle_error, with the statement
            tracing.add_current_event("resilient_db.error", self._event_attrs(ctx))

    def rejected(self, state: str, retry_in: float | None, err: CircuitOpenError) -> None:
        """A checkout rejected by the open breaker: counted (added to ``resilient_db.errors``
        at :meth:`flush`), summarised in the log, an event if the caller's span records."""
        try:
            self.rejected_checkouts.add_one()
            self.summary.rejected(self, err)  # renders err's context only for a summary
            tracing.rejected_event(self.pool_attrs, state, retry_in)
        except Exception:  # telemetry never breaks a call
            logs.logger.debug("resilient_db telemetry hook rejected failed", exc_info=True)

    def _event_attrs(self, ctx: ErrorContext) -> dict[str, Any]:
        attrs = {**self.pool_attrs, "resilient_db.phase": ctx.phase}
        attrs.update(tracing.error_attributes(None, ctx))
        return attrs

    @_safe
    def _handle_error(self, exc_ctx: Any) -> None:
        """SQLAlchemy ``handle_error`` listener (runs after the engine's own)."""
        exc = getattr(exc_ctx, "chained_exception", None) or exc_ctx.sqlalchemy_exception
        ctx = error_context(exc) or error_context(exc_ctx.original_exception)
        if ctx is None:
            return
        if ctx.phase in ("execute", "commit", "rollback"):
            attrs = self._event_attrs(ctx)
            if self.capture_statement and exc_ctx.statement:
                attrs["db.query.text"] = exc_ctx.statement
            tracing.add_current_event("resilient_db.error", attrs)
        t0 = getattr(exc_ctx.execution_context, "_rdb_t0", None)
        if t0 is not None and self._listening:
            attrs = {**self.op_attrs(), "error.type": ctx.kind}
            if ctx.code:
                attrs["db.response.status_code"] = ctx.code
            self.instruments.operation_duration.record(_perf() - t0, attrs)

    def connect(self, connect: Any, dialect: Any, cargs: Any, cparams: Any) -> Any:
        """Run ``connect`` (``Resilience.connect``) as one traced, timed connect sequence."""
        seq = _safe(ConnectSequence)(self)
        if seq is None:
            return connect(dialect, cargs, cparams)
        token = _SEQUENCE.set(seq)
        try:
            conn = connect(dialect, cargs, cparams)
        except Exception as e:
            seq.failed(error_context(e))
            raise
        except BaseException:
            seq.cancelled()
            raise
        finally:
            _SEQUENCE.reset(token)
        seq.succeeded()
        return conn

    @_safe
    def connect_retry(self, c: Classification, attempt: int, delay: float) -> None:
        """Connect attempt ``attempt`` failed with ``c``; retrying after ``delay`` seconds."""
        seq = _SEQUENCE.get()
        if seq is not None and seq.tel is self:
            seq.retry(c, attempt, delay)
        else:
            ConnectSequence.count_failure(self, c.kind.value, c.code)
            self.retried(c, "connect")

    @_safe
    def validation_failed(self, check: str) -> None:
        """A pooled connection failed its ping, or a startup check failed."""
        self.instruments.validation_failures.add(
            1, {**self.pool_attrs, "resilient_db.validation.check": check}
        )

    @_safe
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

    def answered(self) -> None:
        """The database answered (a connect or a health ping succeeded)."""
        self.last_ok = time.time()

    # -- breaker listener (called by CircuitBreaker once its lock is released) -------

    @_safe
    def state_change(self, cb: Any, old: Any, new: Any) -> None:
        """Count the transition and log it."""
        with self._state_lock:
            self.transitions[new] = self.transitions.get(new, 0) + 1
            rejected = self.summary.closed() if old == "open" else 0
        logs.breaker_changed(self, str(old), str(new), rejected)


class ConnectSequence:
    """One connect sequence: its span, its retries, its outcome."""

    __slots__ = ("attempts", "span", "t0", "tel")

    def __init__(self, tel: EngineTelemetry) -> None:
        self.tel = tel
        self.t0 = _perf()
        self.attempts = 1
        attrs = {**tel.pool_attrs, **tel.op_attrs()}
        self.span: Span = tracing.start_span(tel.tracer, tracing.CONNECT_SPAN, attrs, client=True)

    @staticmethod
    def count_failure(tel: EngineTelemetry, kind: str, code: str | None) -> None:
        """Count one failed connect attempt."""
        attrs = {**tel.pool_attrs, "error.type": kind}
        if code:
            attrs["db.response.status_code"] = code
        tel.instruments.connect_failures.add(1, attrs)

    @_safe
    def retry(self, c: Classification, attempt: int, delay: float) -> None:
        """Attempt ``attempt`` failed and will be retried after ``delay`` seconds."""
        tel = self.tel
        self.attempts = attempt + 1
        self.count_failure(tel, c.kind.value, c.code)
        tel.retried(c, "connect")
        if self.span.is_recording():
            attrs = {"resilient_db.attempt": attempt, "resilient_db.retry_in": delay}
            attrs.update(tracing.error_attributes(c))
            self.span.add_event("resilient_db.retry", attrs)
        logs.connect_retry(tel, c.kind.value, attempt, delay)

    @_safe
    def failed(self, ctx: ErrorContext | None) -> None:
        """The sequence failed for good (``ctx``: the error's context, if classified)."""
        tel = self.tel
        self.count_failure(
            tel, ctx.kind if ctx is not None else "unknown", ctx.code if ctx else None
        )
        attempts = ctx.attempt if ctx is not None else self.attempts
        error = (
            tracing.error_attributes(None, ctx) if ctx is not None else {"error.type": "unknown"}
        )
        tracing.end_span(self.span, {"resilient_db.attempts": attempts}, error)
        if ctx is not None:
            logs.connect_failed(tel, ctx)

    @_safe
    def succeeded(self) -> None:
        """A connection was made."""
        tel = self.tel
        tel.instruments.create_time.record(_perf() - self.t0, tel.pool_attrs)
        tel.answered()
        tracing.end_span(self.span, {"resilient_db.attempts": self.attempts}, None)

    @_safe
    def cancelled(self) -> None:
        """The sequence was cancelled (never a failure)."""
        tracing.end_span(self.span, {"resilient_db.cancelled": True}, None)


_SEQUENCE: contextvars.ContextVar[ConnectSequence | None] = contextvars.ContextVar(
    "resilient_db_connect_sequence", default=None
)


def _target_attrs(t: Target) -> dict[str, Any]:
    attrs: dict[str, Any] = {"db.system.name": t.dialect or "other_sql"}
    if t.database:
        attrs["db.namespace"] = t.database
    if t.dialect != "sqlite" and t.host:
        attrs["server.address"] = t.host
        if t.port:
            attrs["server.port"] = t.port
    return attrs


# -- public API ------------------------------------------------------------------


def attach(engine: Engine, r: Resilience) -> EngineTelemetry:
    """Instrument a freshly wrapped engine with the global providers."""
    tel = EngineTelemetry(engine, r)
    tel.start()
    return tel


def instrument(
    engine: EngineLike,
    *,
    meter_provider: MeterProvider | None = None,
    tracer_provider: TracerProvider | None = None,
    timings: bool | None = None,
    pool_timings: bool = False,
    capture_statement: bool = False,
    timing_buffer: int = DEFAULT_CAPACITY,
) -> EngineTelemetry:
    """(Re-)instrument a resilient_db engine and return its telemetry.

    Every engine is instrumented with the global providers when it is
    created; call this to report to other providers instead (e.g. a test's
    ``MeterProvider(metric_readers=[InMemoryMetricReader()])``), or to change
    the options:

    - ``timings``: the per-call histogram ``db.client.operation.duration``
      (one record per driver execute). ``None`` (default): on as soon as a
      real SDK collects (at once for an explicit SDK provider); ``True``: on
      now; ``False``: never.
    - ``pool_timings``: also record ``db.client.connection.wait_time`` (per
      checkout) and ``use_time`` (per checkin), whenever ``timings`` are on.
      Off by default: two more values per request for the collection to record.
    - ``capture_statement``: add the SQL text (never its parameters) as
      ``db.query.text`` to error span events.
    - ``timing_buffer``: how many values of each per-call histogram wait for
      the next collection (8 bytes each) before further ones are recorded at
      once. The request path then pays an append instead of an SDK
      ``record()``; the collecting thread records them. ``0`` records every
      value at once (the SDK's exemplars can then link a duration to the
      trace it was measured in).

    ``engine`` may be an Engine, an AsyncEngine or a Connection.
    """
    if isinstance(timing_buffer, bool) or not isinstance(timing_buffer, int) or timing_buffer < 0:
        raise ConfigurationError(
            "instrument(timing_buffer=)",
            f"must be a whole number of values, 0 or more, got {timing_buffer!r}.",
            f"Use 0 to record every value at once, or the default {DEFAULT_CAPACITY}.",
        )

    r = resilience_of(engine)
    inner = getattr(engine, "sync_engine", engine)
    sync = cast("Engine", getattr(inner, "engine", inner))  # a Connection's engine
    old = r.telemetry
    if isinstance(old, EngineTelemetry):
        old.detach()
    tel = EngineTelemetry(
        sync,
        r,
        meter_provider=meter_provider,
        tracer_provider=tracer_provider,
        timings=timings,
        pool_timings=pool_timings,
        capture_statement=capture_statement,
        timing_buffer=timing_buffer,
    )
    tel.start()
    return tel


def telemetry_of(engine: EngineLike) -> EngineTelemetry:
    """The :class:`EngineTelemetry` of a resilient_db engine."""
    tel = resilience_of(engine).telemetry
    if not isinstance(tel, EngineTelemetry):  # pragma: no cover - always attached
        raise LookupError("this engine has no telemetry attached")
    return tel


class UnitOfWork:
    """The span of one unit of work; report each replay with :meth:`retry`."""

    def __init__(self, tel: EngineTelemetry, span: Span) -> None:
        self.tel = tel
        self.span = span
        self.attempts = 1

    def retry(self, exc: BaseException, delay: float) -> None:
        """The attempt failed with ``exc`` and the unit of work will be replayed."""
        c = _classification(self.tel, exc)
        with trace.use_span(self.span, end_on_exit=False):
            self.tel.retried(c, "transaction", attempt=self.attempts, delay=delay)
        self.attempts += 1


def _classification(tel: EngineTelemetry, exc: BaseException) -> Classification:
    return classify(exc, target=tel.resilience.target)


@contextlib.contextmanager
def unit_of_work(engine: EngineLike, name: str | None = None) -> Iterator[UnitOfWork]:
    """A span around one unit of work (all its attempts), current while it runs.

    The unit-of-work retry calls :meth:`UnitOfWork.retry` before each replay;
    an exception leaving the block sets status ERROR with its classification.
    """
    tel = telemetry_of(engine)
    attrs: dict[str, Any] = {**tel.pool_attrs, **tel.op_attrs()}
    if name:
        attrs["resilient_db.unit_of_work"] = name
    span = tracing.start_span(tel.tracer, tracing.UNIT_OF_WORK_SPAN, attrs, client=False)
    uow = UnitOfWork(tel, span)
    try:
        with trace.use_span(
            span, end_on_exit=False, record_exception=False, set_status_on_exception=False
        ):
            yield uow
    except BaseException as e:
        if isinstance(e, Exception):
            c = _classification(tel, e)
            error = tracing.error_attributes(c, error_context(e))
        else:
            error = None
        tracing.end_span(span, {"resilient_db.attempts": uow.attempts}, error)
        raise
    tracing.end_span(span, {"resilient_db.attempts": uow.attempts}, None)
