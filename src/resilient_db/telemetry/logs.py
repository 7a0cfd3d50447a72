"""Log records on the ``resilient_db`` logger.

What is logged, and at which level:

- each circuit breaker state change: WARNING when it opens, INFO when it goes
  half-open or closes again;
- each connect that failed for good (after its retries, or at once for an
  error that is not retried): WARNING;
- while the breaker is open, rejected calls are not logged one by one: a
  summary at most every ``summary_interval`` seconds (WARNING), and the total
  when the breaker leaves the open state;
- each connect retry: DEBUG.

Nothing at WARNING or above on the happy path. Every record carries the error
context in ``extra={"resilient_db": {...}}`` (never a password or a bind
parameter); no handler or level is configured here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..errors import CircuitOpenError, ErrorContext

if TYPE_CHECKING:
    from . import EngineTelemetry

__all__ = ["LOGGER_NAME", "RejectionSummary", "logger"]

LOGGER_NAME = "resilient_db"
logger = logging.getLogger(LOGGER_NAME)

#: Seconds between two summaries of rejected calls while a breaker stays open.
SUMMARY_INTERVAL = 60.0


def _extra(tel: EngineTelemetry, event: str, **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"event": event, "engine": tel.resilience.name}
    data.update(fields)
    return {"resilient_db": data}


def breaker_changed(tel: EngineTelemetry, old: str, new: str, rejected: int) -> None:
    """Log one breaker state change."""
    r = tel.resilience
    b = r.breaker
    if b is None:  # pragma: no cover - only breakers call this
        return
    where = r.target.where
    last = b.last_failure or "no failure recorded"
    fields: dict[str, Any] = {"old_state": old, "new_state": new, "forced": b._forced}
    if new == "open":
        if b._forced:
            msg = (
                f"Circuit breaker '{r.name}' forced open by an operator: "
                f"calls to {where} fail fast."
            )
        else:
            msg = (
                f"Circuit breaker '{r.name}' opened: calls to {where} fail fast for "
                f"{b.policy.reset_timeout:g}s. Last failure: {last}"
            )
        fields["last_failure"] = b.last_failure
        logger.warning(msg, extra=_extra(tel, "breaker_opened", **fields))
    elif new == "half-open":
        fields["rejected_while_open"] = rejected
        logger.info(
            "Circuit breaker '%s' half-open: probing %s (%d call(s) rejected while open).",
            r.name,
            where,
            rejected,
            extra=_extra(tel, "breaker_half_open", **fields),
        )
    else:
        fields["rejected_while_open"] = rejected
        logger.info(
            "Circuit breaker '%s' closed: %s answers again.",
            r.name,
            where,
            extra=_extra(tel, "breaker_closed", **fields),
        )


def connect_failed(tel: EngineTelemetry, ctx: ErrorContext) -> None:
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
        extra=_extra(tel, "connect_failed", context=ctx.to_dict()),
    )


def connect_retry(tel: EngineTelemetry, kind: str, attempt: int, delay: float) -> None:
    """Log one connect retry at DEBUG."""
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "Connect attempt %d to %s failed (%s); retrying in %.3fs.",
            attempt,
            tel.resilience.target.where,
            kind,
            delay,
            extra=_extra(tel, "connect_retry", kind=kind, attempt=attempt, retry_in=delay),
        )


def _where(ctx: ErrorContext) -> str:
    if ctx.dialect == "sqlite":
        return f"SQLite {ctx.database or ':memory:'!r}"
    return f"{ctx.host}:{ctx.port}" if ctx.port else str(ctx.host or "the database")


class RejectionSummary:
    """Counts rejected calls and logs a summary at most once per interval."""

    def __init__(self, interval: float = SUMMARY_INTERVAL) -> None:
        self.interval = interval
        self.pending = 0
        self.total = 0
        self._since: float | None = None

    def rejected(self, tel: EngineTelemetry, rejection: ErrorContext | CircuitOpenError) -> None:
        """Count one rejection; log a summary when the interval has passed.

        ``rejection``: its context, or the error (whose context is rendered only
        for the summary).
        """
        now = tel.resilience.clock()
        self.pending += 1
        self.total += 1
        if self._since is None:
            self._since = now
            return
        span = now - self._since
        if span < self.interval:
            return
        n, self.pending, self._since = self.pending, 0, now
        ctx = rejection if isinstance(rejection, ErrorContext) else rejection.context
        if ctx is None:  # pragma: no cover - a rejection always has its context
            return
        retry = "when an operator closes it" if ctx.retry_in is None else f"in {ctx.retry_in:.1f}s"
        logger.warning(
            "Circuit breaker '%s' still open: %d call(s) rejected in the last %.0fs; "
            "next probe %s.",
            tel.resilience.name,
            n,
            span,
            retry,
            extra=_extra(
                tel, "breaker_rejections", rejected=n, seconds=span, context=ctx.to_dict()
            ),
        )

    def closed(self) -> int:
        """The breaker left the open state: return the total and start over."""
        total = self.total
        self.pending = self.total = 0
        self._since = None
        return total
