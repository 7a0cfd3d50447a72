"""The engine's one ``handle_error`` listener: classify, build context, count, decide.

Every error raised inside a Connection passes here once, in a fixed order:
carry over a context the connect sequence built; otherwise classify it (a call
the watchdog cut is a ``read_timeout``), count it for the breaker, mark a lost
connection as a disconnect so the pool never hands it out again, re-route a
write refused by a standby (failover), then attach the
:class:`~resilient_db.ErrorContext` (or raise :class:`AmbiguousCommitError`
for a COMMIT whose outcome is unknown), and last report it
(:class:`~resilient_db._events.CallFailed`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from . import _compat
from ._deadline import SETTING_UP, slot_of
from ._events import CallFailed, deliver
from ._state import EXITS, Resilience, conn_state
from ._translate import ambiguous_commit
from .classify import Kind, classify
from .errors import _CONTEXT_ATTR, ErrorContext, attach, redact_parameters

__all__ = ["handle_error"]

# kinds after which the connection cannot be used again
_LOST = frozenset(
    {
        Kind.DISCONNECT,
        Kind.READ_TIMEOUT,
        Kind.ADMIN_TERMINATED,
        Kind.SERVER_SHUTDOWN,
        Kind.IDLE_TIMEOUT,
        Kind.AMBIGUOUS_COMMIT,
    }
)


def handle_error(r: Resilience) -> Callable[[Any], BaseException | None]:
    """The SQLAlchemy ``handle_error`` listener of ``r``'s engine."""

    def listener(ctx: Any) -> BaseException | None:
        orig: BaseException = ctx.original_exception
        sa_error: BaseException | None = ctx.sqlalchemy_exception
        target_exc = sa_error if sa_error is not None else orig
        # classified in connect(): carry it over. Only orig's own context: one found
        # through __context__ belongs to an earlier error this one was raised while handling
        existing = getattr(orig, _CONTEXT_ATTR, None)
        if isinstance(existing, ErrorContext):
            attach(target_exc, existing)
            _report(r, ctx, existing)
            return None
        if isinstance(orig, EXITS) or ctx.is_pre_ping:
            return None
        if ctx.parameters:
            redact_parameters(ctx.parameters, orig, sa_error)
        return _classified(r, ctx, orig, target_exc)

    return listener


def _classified(
    r: Resilience, ctx: Any, orig: BaseException, target_exc: BaseException
) -> BaseException | None:
    phase = _phase(ctx, orig)
    diagnosis: str | None = None
    cut: str | None = None
    fo = r.failover
    t = r.target if fo is None else fo.target_of(ctx.connection)
    c = classify(target_exc, phase=phase, target=t)
    conn = ctx.connection
    if r.watch:
        # no Connection: a new connection's set-up failed (see _deadline.watch_connection)
        setting_up = SETTING_UP.get()
        slot = slot_of(conn) if conn is not None else setting_up
        if setting_up is not None and (conn is None or slot is setting_up):
            setting_up.deadline = 0.0  # that set-up failed, so it is over
            SETTING_UP.set(None)
        if slot is not None and (slot.fired or slot.shot):
            # the watchdog cut this call, or an earlier one that still returned (shot):
            # then nothing of this call reached the server, so no ambiguous commit
            earlier = not slot.fired
            slot.fired = False
            cut, slot.cut = slot.cut, None  # cut early: a probe found the database silent
            if slot is setting_up:  # the first connection's initialize()
                phase = "connect"
            # a call on an open connection timed out (a set-up query too: not a connect
            # timeout); at COMMIT, an ambiguous commit
            call_phase = "execute" if phase == "connect" or earlier else phase
            c = classify(TimeoutError("call deadline"), phase=call_phase, target=t)
            if cut is not None and not earlier:
                diagnosis = (
                    f"{c.diagnosis} {cut}"
                    if c.kind is Kind.AMBIGUOUS_COMMIT
                    else f"{cut} The call was cut at once, not left to its deadline."
                )
    if c.kind is Kind.READ_TIMEOUT and cut is None and r.monitor is not None:
        r.monitor.suspect(time.monotonic())  # a call outlived its deadline: probe the database
    b = r.breaker
    if b is not None:
        if c.counts_for_breaker:
            b.record_failure(c.diagnosis)
        if conn is not None:
            # returning this checkout is then no success: a counted failure, or
            # an application error, which must not reset the failure count either
            rec = _compat.record_of(conn)
            if rec is not None:
                conn_state(rec).failed = True
    if c.kind in _LOST and not ctx.is_disconnect:
        ctx.is_disconnect = True  # never return a broken connection to the pool
    if c.kind is Kind.READ_TIMEOUT:
        # one call outlived its deadline: discard that connection, not the pool
        ctx.invalidate_pool_on_disconnect = False
    if c.kind is Kind.READ_ONLY and fo is not None:
        c = fo.refused_write(ctx, c)  # the primary moved: re-route (failover.py)
    ectx = r.record_error(c, r.context(c, phase=phase, target=t, diagnosis=diagnosis))
    if c.kind is Kind.AMBIGUOUS_COMMIT:
        error = ambiguous_commit(r.name, c.diagnosis, orig, ectx)
        _report(r, ctx, ectx)
        return error
    attach(target_exc, ectx)
    _report(r, ctx, ectx)
    return None


def _report(r: Resilience, ctx: Any, ectx: ErrorContext) -> None:
    """The CallFailed event: the statement's text (never its parameters), its duration."""
    handlers = r.events.get(CallFailed)
    if not handlers:
        return
    # the call deadline's wrapper marks a failed execute it timed (Resilience.exec_timer)
    t0 = getattr(ctx.execution_context, "_rdb_t0", None)
    duration = time.perf_counter() - t0 if t0 is not None else None
    deliver(handlers, CallFailed(r.name, ectx, ctx.statement, duration))


def _phase(ctx: Any, orig: BaseException) -> str:
    """connect / execute / commit / rollback, read from the failing call stack.

    Reading the traceback costs nothing on the happy path, unlike commit and
    rollback event listeners, which would run on every transaction.
    """
    if ctx.connection is None:
        return "connect"
    if ctx.statement is not None:
        return "execute"
    return _compat.commit_or_rollback_in(orig.__traceback__) or "execute"
