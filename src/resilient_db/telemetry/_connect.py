"""The span and metrics of a connect sequence, from the engine's connect events.

``ConnectStarted`` opens a :class:`ConnectSequence` (a CLIENT span) and makes
it current for the connecting thread or task; ``RetryScheduled`` at connect
level adds a retry event to it; ``Connected``, ``ConnectFailed`` or
``ConnectCancelled`` ends it.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from typing import TYPE_CHECKING

from opentelemetry.trace import Span

from .._events import ConnectFailed, RetryScheduled
from . import tracing

if TYPE_CHECKING:
    from ..classify import Classification
    from ..errors import ErrorContext
    from ._engine import EngineTelemetry

__all__ = ["ConnectSequence", "count_failure", "current", "end", "start"]

_perf = time.perf_counter


class ConnectSequence:
    """One connect sequence: its span, its retries, its outcome."""

    __slots__ = ("attempts", "span", "t0", "tel", "token")

    def __init__(self, tel: EngineTelemetry) -> None:
        self.tel = tel
        self.t0 = _perf()
        self.attempts = 1
        self.token: contextvars.Token[ConnectSequence | None] | None = None
        attrs = {**tel.pool_attrs, **tel.op_attrs()}
        self.span: Span = tracing.start_span(tel.tracer, tracing.CONNECT_SPAN, attrs, client=True)

    def retry(self, c: Classification, attempt: int, delay: float) -> None:
        """Attempt ``attempt`` failed and will be retried after ``delay`` seconds."""
        tel = self.tel
        self.attempts = attempt + 1
        count_failure(tel, c.kind.value, c.code)
        tel.retried(c, "connect")
        if self.span.is_recording():
            attrs = {"resilient_db.attempt": attempt, "resilient_db.retry_in": delay}
            attrs.update(tracing.error_attributes(c))
            self.span.add_event("resilient_db.retry", attrs)

    def failed(self, ctx: ErrorContext | None) -> None:
        """The sequence failed for good (``ctx``: the error's context, if classified)."""
        count_failure(
            self.tel, ctx.kind if ctx is not None else "unknown", ctx.code if ctx else None
        )
        attempts = ctx.attempt if ctx is not None else self.attempts
        error = (
            tracing.error_attributes(None, ctx) if ctx is not None else {"error.type": "unknown"}
        )
        tracing.end_span(self.span, {"resilient_db.attempts": attempts}, error)

    def succeeded(self) -> None:
        """A connection was made."""
        tel = self.tel
        tel.instruments.create_time.record(_perf() - self.t0, tel.pool_attrs)
        tracing.end_span(self.span, {"resilient_db.attempts": self.attempts}, None)

    def cancelled(self) -> None:
        """The sequence was cancelled (never a failure)."""
        tracing.end_span(self.span, {"resilient_db.cancelled": True}, None)


_SEQUENCE: contextvars.ContextVar[ConnectSequence | None] = contextvars.ContextVar(
    "resilient_db_connect_sequence", default=None
)


def count_failure(tel: EngineTelemetry, kind: str, code: str | None) -> None:
    """Count one failed connect attempt."""
    attrs = {**tel.pool_attrs, "error.type": kind}
    if code:
        attrs["db.response.status_code"] = code
    tel.instruments.connect_failures.add(1, attrs)


def start(tel: EngineTelemetry) -> None:
    """A connect sequence of ``tel``'s engine begins in this thread or task."""
    seq = ConnectSequence(tel)
    seq.token = _SEQUENCE.set(seq)


def current(tel: EngineTelemetry) -> ConnectSequence | None:
    """The connect sequence of ``tel`` running in this thread or task, if any."""
    seq = _SEQUENCE.get()
    return seq if seq is not None and seq.tel is tel else None


def end(tel: EngineTelemetry) -> ConnectSequence | None:
    """The running sequence of ``tel``, no longer current (the caller ends its span)."""
    seq = current(tel)
    if seq is not None and seq.token is not None:
        with contextlib.suppress(ValueError):  # set in another context
            _SEQUENCE.reset(seq.token)
        seq.token = None
    return seq


def retry(tel: EngineTelemetry, ev: RetryScheduled) -> None:
    """A connect attempt failed and is retried: an event on the sequence's span."""
    seq = current(tel)
    if seq is not None:
        seq.retry(ev.classification, ev.attempt, ev.delay)
    else:
        count_failure(tel, ev.classification.kind.value, ev.classification.code)
        tel.retried(ev.classification, "connect")


def failed(tel: EngineTelemetry, ev: ConnectFailed) -> None:
    """The sequence failed for good."""
    seq = end(tel)
    if seq is not None:
        seq.failed(ev.context)
