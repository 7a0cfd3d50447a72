"""The decisions shared by both runners: pure and synchronous, no database I/O.

:class:`_Control` holds a unit of work's state after its first failure and
decides what is retryable (database errors only; the classification, or the
engine's recorded verdict), keeps the attempt and deadline bookkeeping (the
engine's connect attempts count against the unit's), applies the ambiguity
rules (an ambiguous commit is re-run only with an idempotency key, ``verify``
or ``read_only``) and builds the final error with its
:class:`~resilient_db.ErrorContext`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING, Any, NoReturn

from sqlalchemy import exc as sa_exc

from .. import _backoff
from .._events import RetryScheduled
from .._state import default_name, resilience_of
from ..classify import Classification, Kind, RetryLevel, Target, classify
from ..config import DEFAULT_POLICY, Policy, RetryPolicy
from ..errors import _CONTEXT_ATTR, AmbiguousCommitError, ConfigurationError, ErrorContext, attach
from ._binds import _engine_of
from ._unit import _DUPLICATE, _MISSING, _VERIFIED, ALREADY_COMMITTED, _Try, _Unit, logger

if TYPE_CHECKING:
    from .._state import Resilience

# Bare exceptions count as database errors only when raised inside these packages.
_DB_PACKAGES = frozenset(
    {"sqlalchemy", "asyncpg", "psycopg", "psycopg2", "pymysql", "aiomysql", "aiosqlite", "sqlite3"}
)


def _from_database(exc: BaseException) -> bool:
    """True for SQLAlchemy errors, and bare socket/timeout errors raised by a driver.

    asyncpg lets some socket errors through unwrapped; an ``OSError`` raised by
    the application's own code (an HTTP call inside the unit) is not retried.
    """
    if isinstance(exc, sa_exc.SQLAlchemyError):
        return True
    if not isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError)):
        return False
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if isinstance(module, str) and module.partition(".")[0] in _DB_PACKAGES:
            return True
        tb = tb.tb_next
    return False


def _own_context(exc: BaseException) -> ErrorContext | None:
    """The context attached to ``exc`` itself (never one of its causes')."""
    ctx = getattr(exc, _CONTEXT_ATTR, None)
    return ctx if isinstance(ctx, ErrorContext) else None


def _judged(c: Classification, ctx: ErrorContext | None) -> Classification:
    """``c`` with the retry level the engine recorded in ``ctx``, when there is one.

    The engine knows more than the error: a multi-host engine re-routes a write
    refused by a demoted primary and records that it may be re-run.
    """
    if ctx is None or ctx.retry == c.retry.value:
        return c
    try:
        return dataclasses.replace(c, retry=RetryLevel(ctx.retry))
    except ValueError:  # pragma: no cover - contexts are built from RetryLevel values
        return c


_ESCAPED = (
    "Not re-run: the unit of work committed or rolled back the runner's transaction "
    "itself, so some of its writes may already be committed. Let the runner commit."
)


class _Control:
    """State of a unit of work after its first failure; decides and annotates."""

    def __init__(
        self, bind: Any, policy: Policy | RetryPolicy | None, unit: _Unit, t0: float
    ) -> None:
        engine = _engine_of(bind)
        r: Resilience | None = None
        if engine is not None:
            try:
                r = resilience_of(engine)
            except ConfigurationError:  # a plain SQLAlchemy engine
                r = None
        self.r = r
        if isinstance(policy, RetryPolicy):
            self.policy = policy
        elif isinstance(policy, Policy):
            self.policy = policy.retry
        else:
            self.policy = r.policy.retry if r is not None else DEFAULT_POLICY.retry
        if r is not None:
            self.target, self.name = r.target, r.name
        elif engine is not None:
            self.target, self.name = Target.from_url(engine.url), default_name(engine.url)
        else:
            self.target, self.name = Target(), "unknown"
        self.bind = bind
        self.unit = unit
        self.t0 = t0
        self.attempt = 1
        self.history: list[str] = []
        self.pending = 0  # number of the attempt whose COMMIT outcome is unknown, or 0
        self.ambiguous_result: Any = _MISSING
        self.last_exc: BaseException | None = None
        self.last_c: Classification | None = None
        self.last_phase = "execute"
        self.escaped = False
        self.retry_ok = False

    # -- per failure -----------------------------------------------------------

    def failed(self, exc: BaseException, t: _Try) -> bool:
        """Record a failed attempt; True when re-running the unit is safe."""
        if t.claimed:  # this attempt inserted the key: no earlier attempt committed
            self.pending, self.ambiguous_result = 0, _MISSING
        self.last_exc, self.last_phase, self.last_c = exc, t.phase, None
        self.escaped = t.escaped
        if not isinstance(exc, Exception):  # cancellation, KeyboardInterrupt, SystemExit
            self.history.append(Kind.CANCELLED.value)
            return False
        if isinstance(exc, ConfigurationError):
            self.history.append(Kind.CONFIGURATION.value)
            return False
        if not _from_database(exc):
            self.history.append(Kind.APPLICATION.value)
            return False
        phase = "execute" if t.phase == "verify" else t.phase
        ctx = _own_context(exc)
        c = _judged(classify(exc, phase=phase, target=self.target), ctx)
        self.last_c = c
        if ctx is not None and ctx.phase == "connect" and ctx.history:
            # the engine already retried the connect: those attempts count against
            # the unit's, so a refused connection is tried `attempts` times in all
            self.history.extend(ctx.history)
            self.attempt += max(1, ctx.attempt) - 1
        else:
            label = ctx.kind if ctx is not None else c.kind.value
            code = ctx.code if ctx is not None else c.code
            self.history.append(f"{label}:{code}" if code else label)
        if c.kind is Kind.AMBIGUOUS_COMMIT:
            if self.unit.read_only and not t.escaped:  # nothing was written: re-run
                return True
            self.pending, self.ambiguous_result = self.attempt, t.result
            return (self.unit.key is not None or self.unit.verify is not None) and not t.escaped
        if t.escaped or c.kind is Kind.POOL_EXHAUSTED:
            # work may be committed; or the pool (or its bulkhead) is shedding load,
            # which a re-run would only add to
            return False
        return c.retry is not RetryLevel.NEVER

    def verified(self, committed: bool) -> None:
        """``verify`` settled the pending ambiguous commit."""
        if not committed:
            self.pending, self.ambiguous_result = 0, _MISSING
        logger.info(
            "Unit of work on %s: verify() says the ambiguous attempt %s.",
            self.name,
            "committed" if committed else "did not commit; re-running",
            extra=self._extra("ambiguous_verified", committed=committed),
        )

    def outcome(self, out: Any) -> Any:
        """Map an attempt's return value to the caller's result."""
        if out is _DUPLICATE or out is _VERIFIED:
            result = self.ambiguous_result
            if out is _DUPLICATE:
                logger.info(
                    "Unit of work on %s: its idempotency key was already recorded; not re-run.",
                    self.name,
                    extra=self._extra("already_committed", resolved=result is not _MISSING),
                )
            return ALREADY_COMMITTED if result is _MISSING else result
        return out

    # -- scheduling ------------------------------------------------------------

    def first_pause(self) -> float:
        """The sleep before attempt 2; gives up when attempts or deadline are used up."""
        p = self.policy
        pause = _backoff.backoff(p, 1)
        if self.attempt >= p.attempts or time.monotonic() - self.t0 + pause >= p.deadline:
            assert self.last_exc is not None
            self.give_up(self.last_exc)
        self._log_retry(pause)
        return pause

    def retrying_kwargs(self) -> dict[str, Any]:
        """tenacity arguments for attempts 2..n (the first attempt ran outside tenacity)."""
        from tenacity import retry_if_exception, stop_before_delay, wait_random_exponential
        from tenacity.stop import stop_base

        ctl = self

        class _Spent(stop_base):
            # attempts are counted by the unit, which adds the engine's connect attempts
            def __call__(self, retry_state: Any) -> bool:
                return ctl.attempt >= ctl.policy.attempts

        p = self.policy
        remaining = max(0.0, p.deadline - (time.monotonic() - self.t0))
        return {
            "retry": retry_if_exception(self._should_retry),
            "stop": _Spent() | stop_before_delay(remaining),
            # tenacity's n-th wait is our attempt n+1's: initial * 2**n, capped, full jitter
            "wait": wait_random_exponential(multiplier=p.initial * 2, max=p.max_backoff),
            "before_sleep": self._before_sleep,
            "reraise": True,
        }

    def _should_retry(self, exc: BaseException) -> bool:
        return exc is self.last_exc and self.retry_ok

    def _before_sleep(self, state: Any) -> None:
        self._log_retry(float(state.upcoming_sleep))

    def _log_retry(self, pause: float) -> None:
        last = self.history[-1] if self.history else "?"
        if self.r is not None and self.last_c is not None:
            event = RetryScheduled(self.name, "transaction", self.last_c, self.attempt, pause)
            self.r.events.emit(event)
        logger.info(
            "Unit of work on %s: attempt %d failed (%s); re-running in %.3fs.",
            self.name,
            self.attempt,
            last,
            pause,
            extra=self._extra("unit_retry", attempt=self.attempt, kind=last, retry_in=pause),
        )

    def _extra(self, event: str, **fields: Any) -> dict[str, Any]:
        return {"resilient_db": {"event": event, "engine": self.name, **fields}}

    # -- the final error -------------------------------------------------------

    def give_up(self, exc: BaseException) -> NoReturn:
        """Raise the final error for ``exc`` (annotated; never tenacity's RetryError)."""
        err = self.final(exc)
        if err is exc:
            raise exc
        raise err from exc

    def final(self, exc: BaseException) -> BaseException:
        """The error the caller sees, carrying attempt, elapsed time and history."""
        if not isinstance(exc, Exception):
            return exc  # cancellation is passed through untouched
        c = self.last_c if exc is self.last_exc else None
        elapsed = time.monotonic() - self.t0
        fields = {
            "attempt": self.attempt,
            "elapsed": round(elapsed, 6),
            "history": tuple(self.history),
        }
        ambiguous_here = c is not None and c.kind is Kind.AMBIGUOUS_COMMIT
        if self.pending and not isinstance(exc, AmbiguousCommitError):
            return self._ambiguous(exc, c, fields, ambiguous_here)
        if c is None:  # an application error: leave it alone unless it was a replay
            if self.attempt > 1:
                attach(exc, self._plain_context(None, fields))
            return exc
        base = _own_context(exc) or self._context(c)
        if self.escaped and exc is self.last_exc:
            diagnosis = f"{base.diagnosis} {_ESCAPED}" if base.diagnosis else _ESCAPED
            fields = {**fields, "retry": RetryLevel.NEVER.value, "diagnosis": diagnosis}
        attach(exc, dataclasses.replace(base, **fields))  # type: ignore[arg-type]
        return exc

    def _ambiguous(
        self, exc: BaseException, c: Classification | None, fields: dict[str, Any], here: bool
    ) -> AmbiguousCommitError:
        # what classify() says of any connection lost during COMMIT, with this error's code
        lost = classify(TimeoutError("commit"), phase="commit", target=self.target)
        verdict = dataclasses.replace(lost, code=c.code if c else None)
        if here:
            message = f"Engine '{self.name}': {verdict.diagnosis} (cause: {type(exc).__name__})"
        else:
            last = self.history[-1] if self.history else "?"
            message = (
                f"Engine '{self.name}': the outcome of attempt {self.pending} is unknown: the "
                f"connection was lost while its COMMIT was in flight, and the retries could "
                f"not settle it (attempt {self.attempt} failed with {last}). Verify before "
                f"re-running."
            )
        ctx = dataclasses.replace(self._context(verdict, phase="commit"), **fields)
        return AmbiguousCommitError(message, ctx)

    def _context(self, c: Classification, phase: str | None = None) -> ErrorContext:
        phase = phase or ("execute" if self.last_phase == "verify" else self.last_phase)
        if self.r is not None:
            return self.r.context(c, phase=phase)
        return self._plain_context(c, {}, phase=phase)

    def _plain_context(
        self, c: Classification | None, fields: dict[str, Any], phase: str = "execute"
    ) -> ErrorContext:
        ctx = ErrorContext.for_target(
            self.name,
            self.target,
            c,
            phase=phase,
            **({} if c is not None else {"kind": Kind.APPLICATION.value}),
        )
        return dataclasses.replace(ctx, **fields) if fields else ctx
