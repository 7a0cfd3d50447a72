"""Pool admission: the breaker gate, the bulkhead and the idle ping, at every checkout.

The engine's pool object becomes an instance of a subclass of its own class
(``Resilient<QueuePool>``, see :func:`resilient_db._compat.reclass_pool`)
whose checkout enforces a lowered adaptive concurrency limit (:mod:`._limit`),
consults the breaker, bounds the callers waiting for a
connection (``PoolPolicy.max_waiters``), pings a connection that sat idle,
and whose check-in reports the outcome of a half-open probe to the breaker.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import Pool

from . import _compat
from ._events import CircuitRejected, ValidationFailed, report_failure
from ._state import EXITS, ConnState, Resilience, conn_state
from ._watchdog import Slot
from .breaker import CLOSED, OPEN, Rejected
from .classify import Kind, classify
from .errors import CircuitOpenError, ErrorContext, PoolExhaustedError

__all__ = ["circuit_open", "install_pool", "limit_exceeded", "pool_exhausted"]

_STATE = _compat.STATE_ATTR  # a record's ConnState, read inline on the checkout hot path

# kinds of a failed idle ping meaning the server closed the socket (a restart, an idle
# timeout): the pool's older connections are dead too, reconnecting decides. A ping
# into silence (read_timeout) still counts: reconnecting would wait out a timeout.
_GONE = frozenset({Kind.DISCONNECT, Kind.ADMIN_TERMINATED, Kind.SERVER_SHUTDOWN, Kind.IDLE_TIMEOUT})


def circuit_open(r: Resilience, rej: Rejected) -> CircuitOpenError:
    """The error for a call rejected by the open breaker.

    Rejections come by the thousand while the breaker is open: the values are
    taken now, the message and context are rendered on first access, and the
    :class:`~resilient_db._events.CircuitRejected` event is built only when
    somebody listens (telemetry counts it; logs are a rate-limited summary).
    """
    b = r.breaker
    if b is not None:
        state, last, forced = b.state, b.last_failure, b._forced
    else:  # pragma: no cover - only a breaker rejects
        state, last, forced = rej.state, None, False
    err = CircuitOpenError.deferred(lambda: _open_message(r, rej, state, last, forced))
    handlers = r.events.get(CircuitRejected)
    if handlers:  # deliver()'s loop, inline: this runs for every call while open
        event = CircuitRejected(r.name, state, rej.retry_in, err)
        for handler in handlers:
            try:
                handler(event)
            except Exception:
                report_failure(handler)
    return err


def _open_message(
    r: Resilience, rej: Rejected, state: str, last: str | None, forced: bool
) -> tuple[str, ErrorContext]:
    c = r.open_verdict
    if c is None:  # the same for every rejection: classify once
        c = r.open_verdict = classify(CircuitOpenError("open"), target=r.target)
    retry_in = rej.retry_in
    if forced:
        diagnosis = (
            f"The circuit breaker for {r.target.where} was forced open by an operator: "
            "calls fail fast without reaching the database until it is closed "
            "(force_close() or reset())."
        )
    else:
        when = "when an operator closes it" if retry_in is None else f"in {retry_in:.2f}s"
        diagnosis = f"{c.diagnosis} Next probe {when}."
        if last:
            diagnosis += f" Last failure: {last}"
    ctx = r.context(c, phase="checkout", retry_in=retry_in, diagnosis=diagnosis)
    ctx = dataclasses.replace(ctx, breaker_state=state)
    message = f"Circuit breaker '{r.name}' is {rej.state}: not connecting to {r.target.where}. "
    return message + diagnosis, ctx


def pool_exhausted(r: Resilience, pool: Pool, waiting: int, cause: str) -> PoolExhaustedError:
    """The error for a checkout that found no free connection in time."""
    r.pool_timeouts += 1
    size = getattr(pool, "size", lambda: 0)()
    in_use = getattr(pool, "checkedout", lambda: 0)()
    overflow = max(0, _compat.max_overflow(pool))
    c = classify(sa_exc.TimeoutError(cause), target=r.target)
    diagnosis = (
        f"pool exhausted: {in_use} in use, {waiting} waiting \u2014 a leak or a slow "
        f"database, not a network problem (pool_size {size} + max_overflow {overflow}, "
        f"max_waiters {r.max_waiters}: {cause})."
    )
    stats = (
        ("pool_size", size),
        ("max_overflow", overflow),
        ("in_use", in_use),
        ("waiting", waiting),
        ("max_waiters", r.max_waiters),
        ("checkout_timeout", r.policy.timeouts.checkout),
    )
    ctx = r.record_error(c, r.context(c, phase="checkout", diagnosis=diagnosis, extra=stats))
    return PoolExhaustedError(f"{diagnosis} [engine '{r.name}']", ctx)


def _vet(r: Resilience, pool: Pool, rec: Any, probe: int, waited: bool) -> Any:
    """The rare checkout path: a half-open probe, a caller that waited, an idle connection.

    A caller that waited while the breaker opened is rejected like any other;
    an idle connection (and any pooled connection handed to a probe) is pinged
    within the call deadline and, if dead, replaced (or the checkout rejected
    when that failure opened the breaker). A record SQLAlchemy will reconnect
    anyway (invalidated, or older than a pool invalidation) is not pinged. A
    probe's token is kept in ``r.probes`` until check-in.
    """
    b = r.breaker
    try:
        if waited and not probe and b is not None and b.state is not CLOSED:
            probe = b.before_call()
        stale = _idle_too_long(r, rec)
        # a probe's verdict must come from the database, not from an idle pooled socket
        if (
            (stale or probe)
            and not _compat.is_invalidated(rec)
            and not _ping(r, pool, rec, bool(probe))
        ):
            rec.invalidate()
            r.events.emit(ValidationFailed(r.name, "idle_ping"))
            if b is not None and b.state is not CLOSED:
                b.release(probe)
                probe = 0
                probe = b.before_call()
        if probe:
            r.probes[rec] = probe
    except Rejected as rej:
        conn_state(rec).failed = True  # handed back unused: no verdict
        _compat.checkin_unused(rec)
        raise circuit_open(r, rej) from None
    except BaseException as e:
        if b is not None:
            b.release(probe)
        _compat.checkin_failed(rec, e)
        raise
    return rec


def _ping(r: Resilience, pool: Pool, record: Any, probe: bool) -> bool:
    """Ping an idle pooled connection within the call deadline; False if it is dead.

    A ping that finds the socket closed by the server invalidates the pool's
    connections as old as this one (a server restart closed them all). An idle
    connection lost is no evidence that the database cannot be reached: the
    reconnect that follows counts if it is really down. A half-open probe's
    ping into silence is such evidence, and counts.
    """
    dbapi = record.dbapi_connection
    st = getattr(record, _STATE, None)
    slot: Slot | None = st.slot if st is not None else None
    call = r.policy.timeouts.call
    if slot is not None and call is not None:
        slot.arm(min(call, r.policy.timeouts.connect or call))
    try:
        _compat.pool_dialect(pool).do_ping(dbapi)
    except EXITS:
        raise
    except BaseException as e:
        fired = slot is not None and slot.fired
        c = classify(TimeoutError() if fired else e, phase="execute", target=r.target)
        if c.kind in _GONE:
            _compat.invalidate_older(pool, record)  # as SQLAlchemy's pre-ping does
        elif probe and r.breaker is not None:
            r.breaker.record_failure(c.diagnosis)
        elif fired and r.monitor is not None:
            r.monitor.suspect(time.monotonic())  # silence: ask the database directly
        return False
    finally:
        if slot is not None:
            slot.deadline = 0.0
            slot.fired = False
    return True


def _idle_too_long(r: Resilience, rec: Any) -> bool:
    idle = r.ping_after_idle
    if idle is None:
        return False
    st = getattr(rec, _STATE, None)
    since = st.idle_since if st is not None else None
    return since is not None and r.clock() - since > idle


def limit_exceeded(r: Resilience, pool: Pool, in_use: int) -> PoolExhaustedError:
    """The error for a checkout refused by the lowered adaptive concurrency limit."""
    r.pool_timeouts += 1
    lim = r.limit
    assert lim is not None
    limit, latency, baseline = lim.limit, lim.latency, lim.baseline
    c = classify(sa_exc.TimeoutError("adaptive concurrency limit"), target=r.target)
    diagnosis = (
        f"adaptive concurrency limit: {in_use} connections in use, limit {limit} of "
        f"{lim.maximum} \u2014 {r.target.where} is slow (the shortest recent call took "
        f"{latency:.3f}s against a baseline of {baseline:.3f}s), so load is shed at once "
        "instead of queued; the limit rises again as latency recovers."
    )
    stats = (
        ("in_use", in_use),
        ("adaptive_limit", limit),
        ("max_limit", lim.maximum),
        ("latency", round(latency, 6)),
        ("baseline", round(baseline, 6)),
    )
    ctx = r.record_error(c, r.context(c, phase="checkout", diagnosis=diagnosis, extra=stats))
    return PoolExhaustedError(f"{diagnosis} [engine '{r.name}']", ctx)


def _admit(self: Any) -> Any:
    # Hot path, every checkout: breaker closed, no timings, no need to wait.
    r: Resilience = self._rdb
    lim = r.limit
    if lim is not None and lim.limit < lim.maximum:
        in_use = self.checkedout()  # never wait because of the limit: refuse now
        if in_use >= lim.limit:
            raise limit_exceeded(r, self, in_use)
    b = r.breaker
    if (
        (b is None or b.state is CLOSED)
        and r.timing is None
        and (r.max_waiters is None or _compat.queue_pool_can_grow(self))
    ):
        try:
            rec = self._rdb_do_get()  # the pool class's own checkout (_compat.reclass_pool)
        except sa_exc.TimeoutError:
            raise pool_exhausted(r, self, r.waiting, "checkout timed out") from None
        idle = r.ping_after_idle
        if idle is not None:
            st = getattr(rec, _STATE, None)
            since = st.idle_since if st is not None else None
            if since is not None and r.clock() - since > idle:
                rec = _vet(r, self, rec, 0, False)
        return rec
    return _admit_slow(self)


def _admit_slow(self: Any) -> Any:
    r: Resilience = self._rdb
    timing = r.timing
    t0 = time.perf_counter() if timing is not None else 0.0
    b = r.breaker
    probe = 0
    if b is not None and b.state is not CLOSED:
        rejected = b.rejection()  # the flood while open: nothing raised until ours
        if rejected is not None:
            raise circuit_open(r, rejected)
        try:
            probe = b.before_call()
        except Rejected as rej:
            raise circuit_open(r, rej) from None
    limit = r.max_waiters
    counted = False
    if limit is not None and _compat.no_free_connection(self):
        m = r.monitor
        if (m is not None and m.probing) or (b is not None and b.state is not CLOSED):
            # no queueing into a database that may be gone: fail now, not after the wait
            if b is not None:
                b.release(probe)
            raise pool_exhausted(
                r, self, r.waiting, "the database is being probed or the breaker is not closed"
            )
        with r.wait_lock:
            waiting = r.waiting
            if waiting < limit:
                r.waiting += 1
                counted = True
        if not counted:
            if b is not None:
                b.release(probe)
            raise pool_exhausted(r, self, waiting, "too many callers waiting")
    try:
        rec = self._rdb_do_get()
    except sa_exc.TimeoutError:
        if b is not None:
            b.release(probe)
        raise pool_exhausted(r, self, r.waiting, "checkout timed out") from None
    except BaseException:
        if b is not None:
            b.release(probe)
        raise
    finally:
        if counted:
            with r.wait_lock:
                r.waiting -= 1
    if probe or counted or _idle_too_long(r, rec):
        rec = _vet(r, self, rec, probe, counted)
    if timing is not None:
        timing.checked_out(rec, t0)
    return rec


def _checkin(self: Any, record: Any) -> None:
    r: Resilience = self._rdb
    if r.timing is not None:
        r.timing.checked_in(record)
    b = r.breaker
    st: ConnState | None = getattr(record, _STATE, None)
    if r.watch and st is not None:
        slot = st.slot
        if slot is not None:
            slot.own_call = -1.0  # a deadline raised for one checkout ends with it
        if slot is not None and slot.shot:
            # its socket was shut down after its call returned: never hand it out again
            st.failed = True
            record.invalidate(soft=True)  # reconnected at its next checkout
    # a record without state (SQLite) carries no mark: skip the reads; a server
    # connection's state always holds its watchdog slot or idle time
    if b is not None and (st is not None or r.probes or not b.quiet):
        probe = r.probes.pop(record, 0) if r.probes else 0
        failed = st is not None and st.failed
        if failed and st is not None:
            st.failed = False
        if failed or record.dbapi_connection is None:
            b.release(probe)
        elif probe or not b.quiet:
            b.record_success(probe)
    if r.ping_after_idle is not None:
        (st if st is not None else conn_state(record)).idle_since = r.clock()
    self._rdb_do_return(record)  # the pool class's own check-in


def _connect(self: Any) -> Any:
    # Pool.connect(): the flood of calls while the breaker is open is rejected here,
    # before SQLAlchemy builds a checkout (the other cases: _admit_slow)
    b = self._rdb.breaker
    if b is not None and b.state is OPEN:
        rejected = b.rejection()
        if rejected is not None:
            raise circuit_open(self._rdb, rejected)
    return self._rdb_connect(self)  # the pool class's own connect (_compat.reclass_pool)


def install_pool(pool: Pool, r: Resilience) -> None:
    """Make ``pool`` admit checkouts through ``r``'s breaker, bulkhead and idle ping."""
    attrs = {"_rdb": r, "__module__": __name__, "connect": _connect}
    _compat.reclass_pool(pool, "Resilient", attrs, checkout=_admit, checkin=_checkin)
