"""OpenTelemetry spans and span events.

- ``resilient_db.connect``: one CLIENT span per connect sequence (a new DBAPI
  connection, with its retries); each retried attempt is an event
  ``resilient_db.retry``; a final failure sets status ERROR, ``error.type``
  (the classification) and ``resilient_db.diagnosis``.
- ``resilient_db.unit_of_work``: one INTERNAL span per unit of work run by
  :func:`unit_of_work` (for the unit-of-work retry), with an event per replay.
- Calls rejected by the open breaker, and errors raised to the application,
  become events on the caller's current span (``resilient_db.breaker.rejected``,
  ``resilient_db.error``).

No per-statement span: use ``opentelemetry-instrumentation-sqlalchemy`` for
those (see ``docs/observability.md``). Attributes never hold a password or a
bind parameter; the statement text (``db.query.text``) is added to error
events only when instrumented with ``capture_statement=True``. Exceptions are
not recorded with ``record_exception`` because driver messages are not ours
to vouch for: the classification, SQLSTATE and diagnosis are.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from ..classify import Classification
from ..errors import ErrorContext

__all__ = [
    "CONNECT_SPAN",
    "UNIT_OF_WORK_SPAN",
    "add_current_event",
    "end_span",
    "error_attributes",
    "rejected_event",
    "start_span",
]

CONNECT_SPAN = "resilient_db.connect"
UNIT_OF_WORK_SPAN = "resilient_db.unit_of_work"


def start_span(tracer: Tracer, name: str, attributes: dict[str, Any], *, client: bool) -> Span:
    """Start a span that does not become current (nothing runs "inside" it)."""
    return tracer.start_span(
        name,
        kind=SpanKind.CLIENT if client else SpanKind.INTERNAL,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    )


def error_attributes(c: Classification | None, ctx: ErrorContext | None = None) -> dict[str, Any]:
    """``error.type``, ``db.response.status_code`` and the diagnosis, for spans."""
    attrs: dict[str, Any] = {}
    kind = ctx.kind if ctx is not None else (c.kind.value if c is not None else "unknown")
    code = ctx.code if ctx is not None else (c.code if c is not None else None)
    attrs["error.type"] = kind
    if code:
        attrs["db.response.status_code"] = code
    diagnosis = ctx.diagnosis if ctx is not None else (c.diagnosis if c is not None else "")
    if diagnosis:
        attrs["resilient_db.diagnosis"] = diagnosis
    return attrs


def end_span(span: Span, attrs: dict[str, Any], error: dict[str, Any] | None) -> None:
    """Set the final attributes, ERROR status when ``error`` is given, and end."""
    if span.is_recording():
        span.set_attributes(attrs)
        if error is not None:
            span.set_attributes(error)
            span.set_status(
                Status(StatusCode.ERROR, str(error.get("resilient_db.diagnosis") or "failed"))
            )
    span.end()


def add_current_event(name: str, attrs: dict[str, Any]) -> None:
    """Add an event to the caller's current span, if it records."""
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, attrs)


def rejected_event(pool_attrs: dict[str, Any], state: str, retry_in: float | None) -> None:
    """``resilient_db.breaker.rejected`` on the caller's current span, if it records."""
    span = trace.get_current_span()
    if span.is_recording():
        attrs = {
            **pool_attrs,
            "resilient_db.breaker.state": state,
            "resilient_db.retry_in": retry_in if retry_in is not None else -1.0,
        }
        span.add_event("resilient_db.breaker.rejected", attrs)
