"""Metrics, traces and logs for resilient_db engines.

Every engine is instrumented when it is created, against the global
OpenTelemetry providers (no-ops until an SDK is configured; see
``docs/observability.md``). :func:`instrument` re-instruments an engine with
explicit providers, e.g. a test's ``MeterProvider`` with an in-memory reader.

Telemetry is a subscriber to the engine's events (:mod:`resilient_db.events`),
like the log records (:mod:`.logs`): the runtime never calls it. The parts:

- ``_engine.py``: :class:`EngineTelemetry`, the instruments and attributes of
  one engine, its event handlers, and the per-call timings (only when the
  opt-in pool timings are on, each checkout and checkin; operation timings
  come from the call deadline's dialect wrapper). Per-call durations wait in
  a :class:`~._deferred.Deferred` buffer and reach the SDK when a reader
  collects (see ``_deferred.py``);
- ``_connect.py``: the span and metrics of a connect sequence;
- ``_unit.py``: :func:`unit_of_work`, a span for hand-written retry loops;
- ``metrics.py``, ``tracing.py``, ``logs.py``: the instruments, span helpers
  and log records.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from .._state import resilience_of
from ..errors import ConfigurationError
from ._connect import ConnectSequence as ConnectSequence  # the import path of 0.x
from ._deferred import DEFAULT_CAPACITY
from ._engine import EngineTelemetry, telemetry_of
from ._unit import UnitOfWork, unit_of_work
from .metrics import METRICS, MetricSpec

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from .._state import Resilience
    from .._types import EngineLike

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
