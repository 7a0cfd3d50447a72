"""OpenTelemetry metrics: the database semantic conventions plus resilient_db's own.

One :class:`Instruments` set exists per ``MeterProvider`` and is shared by every
engine that reports to it (an SDK drops the callbacks of an instrument created
twice). Pool and breaker state are read by observable instruments at
collection time, so nothing happens per call for them; the per-call
histograms (``wait_time``, ``use_time``, ``operation.duration``) are timed
only once a real SDK has collected at least once, and their values wait in
each engine's buffers until the next collection's first callback flushes
them (see ``docs/observability.md``).

:data:`METRICS` lists every instrument with its kind, unit and attributes; the
docs, the alert rules and the tests are checked against it.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation

if TYPE_CHECKING:
    from ._engine import EngineTelemetry

__all__ = ["METRICS", "Instruments", "MetricSpec", "instruments_for", "is_real_provider"]

_logger = logging.getLogger("resilient_db")

POOL = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
ERROR_TYPE = "error.type"
STATUS_CODE = "db.response.status_code"
BREAKER_STATE = "resilient_db.breaker.to_state"
PHASE = "resilient_db.phase"
RETRY_LEVEL = "resilient_db.retry.level"
CHECK = "resilient_db.validation.check"
OP_ATTRS = ("db.system.name", "db.namespace", "server.address", "server.port")

#: Bucket boundaries (seconds) advised for every duration histogram (the semconv advice).
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)

#: ``resilient_db.breaker.state`` values.
BREAKER_STATE_VALUES = {"closed": 0, "half-open": 1, "open": 2}


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One instrument: OTel name, instrument kind, unit, attribute keys, description.

    ``optional`` attributes appear only on some data points (e.g. ``error.type``
    on failed operations).
    """

    name: str
    kind: str
    unit: str
    attributes: tuple[str, ...]
    description: str
    optional: tuple[str, ...] = ()
    per_call: bool = False

    @property
    def prometheus_name(self) -> str:
        """The name the OTel Prometheus exporter gives it (``_total``/unit suffixes)."""
        base = self.name.replace(".", "_")
        unit = "" if self.unit.startswith("{") else {"s": "seconds"}.get(self.unit, self.unit)
        if unit and not base.endswith("_" + unit):
            base += "_" + unit
        if self.kind in ("Counter", "ObservableCounter"):
            base += "_total"
        return base


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "db.client.connection.count",
        "ObservableUpDownCounter",
        "{connection}",
        (POOL, STATE),
        "The number of connections that are currently in the state described by the state "
        "attribute.",
    ),
    MetricSpec(
        "db.client.connection.max",
        "ObservableUpDownCounter",
        "{connection}",
        (POOL,),
        "The maximum number of open connections allowed.",
    ),
    MetricSpec(
        "db.client.connection.idle.max",
        "ObservableUpDownCounter",
        "{connection}",
        (POOL,),
        "The maximum number of idle open connections allowed.",
    ),
    MetricSpec(
        "db.client.connection.pending_requests",
        "ObservableUpDownCounter",
        "{request}",
        (POOL,),
        "The number of current pending requests for an open connection.",
    ),
    MetricSpec(
        "db.client.connection.timeouts",
        "ObservableCounter",
        "{timeout}",
        (POOL,),
        "The number of connection timeouts that have occurred trying to obtain a connection "
        "from the pool.",
    ),
    MetricSpec(
        "db.client.connection.create_time",
        "Histogram",
        "s",
        (POOL,),
        "The time it took to create a new connection (all connect attempts and backoff).",
    ),
    MetricSpec(
        "db.client.connection.wait_time",
        "Histogram",
        "s",
        (POOL,),
        "The time it took to obtain an open connection from the pool.",
        per_call=True,
    ),
    MetricSpec(
        "db.client.connection.use_time",
        "Histogram",
        "s",
        (POOL,),
        "The time between borrowing a connection and returning it to the pool.",
        per_call=True,
    ),
    MetricSpec(
        "db.client.operation.duration",
        "Histogram",
        "s",
        OP_ATTRS,
        "Duration of database client operations.",
        optional=(ERROR_TYPE, STATUS_CODE, "db.namespace", "server.address", "server.port"),
        per_call=True,
    ),
    MetricSpec(
        "resilient_db.breaker.state",
        "ObservableGauge",
        "{state}",
        (POOL,),
        "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
    ),
    MetricSpec(
        "resilient_db.breaker.transitions",
        "ObservableCounter",
        "{transition}",
        (POOL, BREAKER_STATE),
        "Circuit breaker state changes, by the state entered.",
    ),
    MetricSpec(
        "resilient_db.breaker.rejections",
        "ObservableCounter",
        "{rejection}",
        (POOL,),
        "Calls rejected without I/O because the circuit breaker was open.",
    ),
    MetricSpec(
        "resilient_db.breaker.store.available",
        "ObservableGauge",
        "{store}",
        (POOL,),
        "1 while the breaker's shared state store (Redis) answers, 0 while the replica runs "
        "on its local breaker alone; reported only for engines with a shared breaker.",
    ),
    MetricSpec(
        "resilient_db.retry.attempts",
        "Counter",
        "{attempt}",
        (POOL, ERROR_TYPE, RETRY_LEVEL),
        "Retries started, by the classification of the failure that caused them.",
    ),
    MetricSpec(
        "resilient_db.connect.failures",
        "Counter",
        "{failure}",
        (POOL, ERROR_TYPE),
        "Failed connect attempts, by classification.",
        optional=(STATUS_CODE,),
    ),
    MetricSpec(
        "resilient_db.errors",
        "Counter",
        "{error}",
        (POOL, ERROR_TYPE, PHASE),
        "Errors raised to the application, by classification and phase.",
    ),
    MetricSpec(
        "resilient_db.commit.ambiguous",
        "Counter",
        "{commit}",
        (POOL,),
        "Connections lost while COMMIT was in flight (outcome unknown).",
    ),
    MetricSpec(
        "resilient_db.validation.failures",
        "Counter",
        "{failure}",
        (POOL, CHECK),
        "Connection validation failures (a pooled connection failed its ping, or a startup "
        "check failed).",
    ),
)

_SPEC = {m.name: m for m in METRICS}


def is_real_provider(provider: MeterProvider) -> bool:
    """False for the API's no-op and proxy (not yet set) providers."""
    return type(provider).__name__ not in ("NoOpMeterProvider", "_ProxyMeterProvider")


class Instruments:
    """The instruments of one meter, and the engines whose state they observe."""

    def __init__(self, meter: Meter, *, real: bool) -> None:
        self.engines: weakref.WeakSet[EngineTelemetry] = weakref.WeakSet()
        #: True once a real SDK is known to collect: per-call timings are worth it.
        self.collecting = real
        self._lock = threading.Lock()

        def h(name: str) -> Any:
            s = _SPEC[name]
            return meter.create_histogram(
                s.name,
                unit=s.unit,
                description=s.description,
                explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
            )

        def c(name: str) -> Any:
            s = _SPEC[name]
            return meter.create_counter(s.name, unit=s.unit, description=s.description)

        self.create_time = h("db.client.connection.create_time")
        self.wait_time = h("db.client.connection.wait_time")
        self.use_time = h("db.client.connection.use_time")
        self.operation_duration = h("db.client.operation.duration")
        self.retry_attempts = c("resilient_db.retry.attempts")
        self.connect_failures = c("resilient_db.connect.failures")
        self.errors = c("resilient_db.errors")
        self.ambiguous_commits = c("resilient_db.commit.ambiguous")
        self.validation_failures = c("resilient_db.validation.failures")

        observe: dict[str, Callable[[EngineTelemetry], Iterable[Observation]]] = {
            "db.client.connection.count": _connection_count,
            "db.client.connection.max": _connection_max,
            "db.client.connection.idle.max": _idle_max,
            "db.client.connection.pending_requests": _pending,
            "db.client.connection.timeouts": _timeouts,
            "resilient_db.breaker.state": _breaker_state,
            "resilient_db.breaker.transitions": _breaker_transitions,
            "resilient_db.breaker.rejections": _breaker_rejections,
            "resilient_db.breaker.store.available": _breaker_store,
        }
        create = {
            "ObservableUpDownCounter": meter.create_observable_up_down_counter,
            "ObservableCounter": meter.create_observable_counter,
            "ObservableGauge": meter.create_observable_gauge,
        }
        for name, fn in observe.items():
            s = _SPEC[name]
            create[s.kind](
                s.name, callbacks=[self._callback(fn)], unit=s.unit, description=s.description
            )

    def _callback(
        self, fn: Callable[[EngineTelemetry], Iterable[Observation]]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterator[Observation]:
            if not self.collecting:
                self._first_collection()
            engines = list(self.engines)
            # The SDK runs every callback before it reads the synchronous instruments'
            # storage, so the first callback of a collection records what the engines
            # timed since the last one into it (the others find the buffers empty).
            for tel in engines:
                try:
                    tel.flush()
                except Exception:  # never lose this collection's other observations
                    _logger.debug("resilient_db: flushing held timings failed", exc_info=True)
            for tel in engines:
                yield from fn(tel)

        return callback

    def _first_collection(self) -> None:
        """A real reader is collecting: turn per-call timings on for every engine."""
        with self._lock:
            if self.collecting:
                return
            self.collecting = True
        for tel in list(self.engines):
            tel.start_timings()

    def add(self, tel: EngineTelemetry) -> None:
        """Observe ``tel``'s engine from now on."""
        self.engines.add(tel)

    def discard(self, tel: EngineTelemetry) -> None:
        """Stop observing ``tel``'s engine."""
        self.engines.discard(tel)


# -- observable callbacks: read state at collection time --------------------------


def _connection_count(tel: EngineTelemetry) -> Iterator[Observation]:
    stats = tel.pool_stats()
    if stats is not None and stats.checked_in is not None and stats.checked_out is not None:
        yield Observation(stats.checked_in, tel.idle_attrs)
        yield Observation(stats.checked_out, tel.used_attrs)


def _connection_max(tel: EngineTelemetry) -> Iterator[Observation]:
    stats = tel.pool_stats()
    if stats is not None and stats.max is not None:
        yield Observation(stats.max, tel.pool_attrs)


def _idle_max(tel: EngineTelemetry) -> Iterator[Observation]:
    stats = tel.pool_stats()
    if stats is not None and stats.size is not None:
        yield Observation(stats.size, tel.pool_attrs)


def _pending(tel: EngineTelemetry) -> Iterator[Observation]:
    yield Observation(tel.resilience.waiting, tel.pool_attrs)


def _timeouts(tel: EngineTelemetry) -> Iterator[Observation]:
    yield Observation(tel.resilience.pool_timeouts, tel.pool_attrs)


def _breaker_state(tel: EngineTelemetry) -> Iterator[Observation]:
    b = tel.resilience.breaker
    if b is not None:
        yield Observation(BREAKER_STATE_VALUES.get(b.state, 2), tel.pool_attrs)


def _breaker_transitions(tel: EngineTelemetry) -> Iterator[Observation]:
    if tel.resilience.breaker is not None:
        for state, n in tel.transitions.items():
            yield Observation(n, {**tel.pool_attrs, BREAKER_STATE: state})


def _breaker_rejections(tel: EngineTelemetry) -> Iterator[Observation]:
    b = tel.resilience.breaker
    if b is not None:
        yield Observation(tel.rejections.read(b.rejected), tel.pool_attrs)


def _breaker_store(tel: EngineTelemetry) -> Iterator[Observation]:
    shared = getattr(tel.resilience.breaker, "shared", None)
    available = getattr(shared, "available", None)
    if available is not None:
        yield Observation(1 if available else 0, tel.pool_attrs)


class Monotonic:
    """Turns a counter that ``reset()`` may zero into a monotonic total."""

    def __init__(self) -> None:
        self._base = 0
        self._last = 0

    def read(self, value: int) -> int:
        """The total so far, given the source counter's current value."""
        if value < self._last:
            self._base += self._last
        self._last = value
        return self._base + value


# -- one instrument set per provider -------------------------------------------

_GLOBAL: Instruments | None = None
_ATTR = "_resilient_db_instruments"
_OTHERS: dict[int, tuple[Any, Instruments]] = {}  # providers that take no attribute
_REGISTRY_LOCK = threading.Lock()


def instruments_for(meter_provider: MeterProvider | None, version: str) -> Instruments:
    """The shared instrument set for ``meter_provider`` (None: the global provider).

    It lives on the provider object itself, so it goes away with the provider.
    """
    global _GLOBAL
    with _REGISTRY_LOCK:
        if meter_provider is None or meter_provider is metrics.get_meter_provider():
            if _GLOBAL is None:
                provider = metrics.get_meter_provider()
                meter = metrics.get_meter("resilient_db", version)
                _GLOBAL = Instruments(meter, real=is_real_provider(provider))
            return _GLOBAL
        found: Instruments | None = getattr(meter_provider, _ATTR, None)
        if found is None and id(meter_provider) in _OTHERS:
            found = _OTHERS[id(meter_provider)][1]
        if found is None:
            meter = metrics.get_meter("resilient_db", version, meter_provider=meter_provider)
            found = Instruments(meter, real=is_real_provider(meter_provider))
            try:
                setattr(meter_provider, _ATTR, found)
            except (AttributeError, TypeError):
                _OTHERS[id(meter_provider)] = (meter_provider, found)
        return found
