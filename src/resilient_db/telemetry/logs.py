"""Log records on the ``resilient_db`` logger.

What is logged, and at which level:

- each circuit breaker state change: WARNING when it opens, INFO when it goes
  half-open or closes again;
- each connect that failed for good (after its retries, or at once for an
  error that is not retried): WARNING;
- while the breaker is open, rejected calls are not logged one by one: a
  summary at most every ``summary_interval`` seconds (WARNING), and the total
  when the breaker leaves the open state;
- each connect retry: DEBUG;
- a silence probe that got no answer: WARNING, on ``resilient_db.probe``.

Nothing at WARNING or above on the happy path. An :class:`EngineLog`, subscribed
to the engine's events when it is made, writes them. Every record carries the error
context in ``extra={"resilient_db": {...}}`` (never a password or a bind
parameter); no handler or level is configured here.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from .._events import (
    BreakerStateChanged,
    CircuitRejected,
    ConnectFailed,
    ErrorClassified,
    ProbeVerdict,
    RepliesLost,
    RetryScheduled,
)
from ..classify import Kind
from ..errors import ErrorContext

if TYPE_CHECKING:
    from .._state import Resilience

__all__ = ["LOGGER_NAME", "EngineLog", "RejectionSummary", "logger"]

LOGGER_NAME = "resilient_db"
logger = logging.getLogger(LOGGER_NAME)
probe_logger = logging.getLogger("resilient_db.probe")

#: Seconds between two summaries of rejected calls while a breaker stays open.
SUMMARY_INTERVAL = 60.0


class EngineLog:
    """The log records of one engine: a subscriber to its events."""

    def __init__(self, r: Resilience) -> None:
        self.r = r
        self.summary = RejectionSummary(r)
        self._lock = threading.Lock()

    def subscribe(self) -> None:
        """Subscribe to the engine's events (once, when the engine is made)."""
        events = self.r.events
        events.subscribe(self.breaker_changed, BreakerStateChanged)
        events.subscribe(self.connect_failed, ConnectFailed)
        events.subscribe(self.retry_scheduled, RetryScheduled)
        events.subscribe(self.summary.rejected, CircuitRejected)
        events.subscribe(self.error_classified, ErrorClassified)
        events.subscribe(self.probe_verdict, ProbeVerdict)
        events.subscribe(self.replies_lost, RepliesLost)

    def breaker_changed(self, ev: BreakerStateChanged) -> None:
        """Log the change; leaving the open state reports the calls rejected meanwhile."""
        with self._lock:
            rejected = self.summary.closed() if ev.old == "open" else 0
        breaker_changed(self.r, ev, rejected)

    def connect_failed(self, ev: ConnectFailed) -> None:
        """A connect that failed for good, when it was the database's failure."""
        if ev.context is not None:
            connect_failed(self.r, ev.context)

    def retry_scheduled(self, ev: RetryScheduled) -> None:
        """A connect retry, at DEBUG (the unit-of-work runner logs its own)."""
        if ev.level == "connect":
            connect_retry(self.r, ev.classification.kind.value, ev.attempt, ev.delay)

    def error_classified(self, ev: ErrorClassified) -> None:
        """Every host of a multi-host engine open: a rejection like the others."""
        if ev.classification.kind is Kind.CIRCUIT_OPEN:
            self.summary.rejected(ev.context)

    def probe_verdict(self, ev: ProbeVerdict) -> None:
        """A silence probe that got no answer."""
        if not ev.answered:
            probe_logger.warning(
                "database unreachable; %d call(s) in flight cut",
                ev.cut,
                extra={"db_engine": ev.engine, "db_diagnosis": ev.diagnosis},
            )

    def replies_lost(self, ev: RepliesLost) -> None:
        """Calls cut because the server had sent their replies, which never arrived."""
        probe_logger.warning(
            "database answers; %d call(s) whose reply was lost on the way cut",
            ev.cut,
            extra={"db_engine": ev.engine, "db_diagnosis": ev.diagnosis},
        )


def _extra(r: Resilience, event: str, **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"event": event, "engine": r.name}
    data.update(fields)
    return {"resilient_db": data}


def breaker_changed(r: Resilience, ev: BreakerStateChanged, rejected: int) -> None:
    """Log one breaker state change."""
    b = r.breaker
    if b is None:  # pragma: no cover - only breakers call this
        return
    old, new = ev.old, ev.new
    where = r.target.where
    last = ev.last_failure or "no failure recorded"
    fields: dict[str, Any] = {"old_state": old, "new_state": new, "forced": ev.forced}
    if new == "open":
        if ev.forced:
            msg = (
                f"Circuit breaker '{r.name}' forced open by an operator: "
                f"calls to {where} fail fast."
            )
        else:
            msg = (
                f"Circuit breaker '{r.name}' opened: calls to {where} fail fast for "
                f"{b.policy.reset_timeout:g}s. Last failure: {last}"
            )
        fields["last_failure"] = ev.last_failure
        logger.warning(msg, extra=_extra(r, "breaker_opened", **fields))
    elif new == "half-open":
        fields["rejected_while_open"] = rejected
        logger.info(
            "Circuit breaker '%s' half-open: probing %s (%d call(s) rejected while open).",
            r.name,
            where,
            rejected,
            extra=_extra(r, "breaker_half_open", **fields),
        )
    else:
        fields["rejected_while_open"] = rejected
        logger.info(
            "Circuit breaker '%s' closed: %s answers again.",
            r.name,
            where,
            extra=_extra(r, "breaker_closed", **fields),
        )


def connect_failed(r: Resilience, ctx: ErrorContext) -> None:
    """Log a connect that failed for good."""
    # the real time it took: a single attempt may have waited the whole connect timeout
    attempts = f"{ctx.attempt} attempts" if ctx.attempt > 1 else "1 attempt"
    tried = f"after {attempts} in {ctx.elapsed:.2f}s"
    logger.warning(
        "Could not connect to %s (%s, %s): %s",
        _where(ctx),
        ctx.kind,
        tried,
        ctx.diagnosis,
        extra=_extra(r, "connect_failed", context=ctx.to_dict()),
    )


def connect_retry(r: Resilience, kind: str, attempt: int, delay: float) -> None:
    """Log one connect retry at DEBUG."""
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "Connect attempt %d to %s failed (%s); retrying in %.3fs.",
            attempt,
            r.target.where,
            kind,
            delay,
            extra=_extra(r, "connect_retry", kind=kind, attempt=attempt, retry_in=delay),
        )


def _where(ctx: ErrorContext) -> str:
    if ctx.dialect == "sqlite":
        return f"SQLite {ctx.database or ':memory:'!r}"
    return f"{ctx.host}:{ctx.port}" if ctx.port else str(ctx.host or "the database")


class RejectionSummary:
    """Counts the rejected calls of ``r``'s engine; logs a summary at most once per interval."""

    def __init__(self, r: Resilience, interval: float = SUMMARY_INTERVAL) -> None:
        self.r = r
        self.interval = interval
        self.pending = 0
        self.total = 0
        self._since: float | None = None

    def rejected(self, rejection: CircuitRejected | ErrorContext) -> None:
        """Count one rejection; log a summary when the interval has passed.

        ``rejection``: the event of a rejected checkout (its error's context is
        rendered only for the summary), or the context of a rejected call of a
        multi-host engine. Subscribed as it is: one Python call per rejection.
        """
        now = self.r.clock()
        self.pending += 1
        self.total += 1
        if self._since is None:
            self._since = now
            return
        span = now - self._since
        if span < self.interval:
            return
        n, self.pending, self._since = self.pending, 0, now
        ctx = rejection if isinstance(rejection, ErrorContext) else rejection.error.context
        if ctx is None:  # pragma: no cover - a rejection always has its context
            return
        retry = "when an operator closes it" if ctx.retry_in is None else f"in {ctx.retry_in:.1f}s"
        r = self.r
        logger.warning(
            "Circuit breaker '%s' still open: %d call(s) rejected in the last %.0fs; "
            "next probe %s.",
            r.name,
            n,
            span,
            retry,
            extra=_extra(r, "breaker_rejections", rejected=n, seconds=span, context=ctx.to_dict()),
        )

    def closed(self) -> int:
        """The breaker left the open state: return the total and start over."""
        total = self.total
        self.pending = self.total = 0
        self._since = None
        return total
