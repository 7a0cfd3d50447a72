"""How resilience attaches to a real SQLAlchemy engine.

Three places, all SQLAlchemy's own extension points:

- the pool: the engine's pool object becomes an instance of a subclass of its
  own class (``Resilient<QueuePool>``) that consults the breaker before
  handing out a connection, bounds waiters (the bulkhead), pings connections
  that sat idle, and reports the outcome of each checkout to the breaker;
- ``do_connect``: connect attempts with classification, breaker accounting and
  backoff between attempts that are safe to retry;
- ``handle_error``: every error raised inside a Connection is classified,
  counted, and given its :class:`~resilient_db.ErrorContext`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool, QueuePool

from . import _backoff
from ._watchdog import WATCHDOG, Slot, socket_fileno
from .breaker import CLOSED, CircuitBreaker, Rejected
from .classify import Classification, Kind, RetryLevel, Target, classify
from .config import Policy
from .errors import (
    AmbiguousCommitError,
    CircuitOpenError,
    ErrorContext,
    PoolExhaustedError,
    attach,
    error_context,
)

__all__ = ["Resilience", "install"]

_EXIT = (asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit)

# Drivers without a client-side read timeout: guarded by the watchdog.
_WATCHED_DRIVERS = {"psycopg", "psycopg2", "psycopg_async"}


class Resilience:
    """The per-engine state: policy, target, breaker, counters."""

    def __init__(
        self,
        engine: Engine,
        name: str,
        policy: Policy,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.policy = policy
        self.target = Target.from_url(engine.url)
        self.clock = clock
        self.is_async = bool(getattr(engine.dialect, "is_async", False))
        self.breaker: CircuitBreaker | None = (
            CircuitBreaker(name, policy.breaker, clock=clock) if policy.breaker.enabled else None
        )
        self.waiting = 0
        self._wait_lock = threading.Lock()
        self.last_error: ErrorContext | None = None
        self.connect_attempts = 0
        self.connect_failures = 0
        self.pool_timeouts = 0
        self.watch = policy.timeouts.call is not None and engine.dialect.driver in _WATCHED_DRIVERS
        self.slow_call = policy.breaker.slow_call if self.breaker is not None else None
        # copied out of the policy for the checkout hot path
        # the bulkhead needs QueuePool's counters; other pools never make callers wait
        self.max_waiters = (
            policy.pool.max_waiters if isinstance(engine.pool, QueuePool) else None
        )
        # an embedded SQLite connection cannot go stale while idle
        self.ping_after_idle = (
            None if engine.dialect.name == "sqlite" else policy.pool.ping_after_idle
        )

    # -- context and errors ------------------------------------------------------

    def context(
        self,
        c: Classification,
        *,
        phase: str,
        attempt: int = 1,
        elapsed: float = 0.0,
        history: tuple[str, ...] = (),
        retry_in: float | None = None,
        diagnosis: str | None = None,
    ) -> ErrorContext:
        """Build the error context for a classified failure of this engine."""
        t = self.target
        ctx = ErrorContext(
            engine=self.name,
            dialect=t.dialect,
            driver=t.driver,
            host=t.host,
            port=t.port,
            database=t.database,
            user=t.user,
            phase=phase,
            attempt=attempt,
            elapsed=round(elapsed, 6),
            breaker_state=self.breaker.state if self.breaker is not None else None,
            code=c.code,
            kind=c.kind.value,
            retry=c.retry.value,
            diagnosis=diagnosis if diagnosis is not None else c.diagnosis,
            history=history,
            retry_in=retry_in,
        )
        if c.kind is not Kind.CIRCUIT_OPEN:
            self.last_error = ctx
        return ctx

    def circuit_open(self, rej: Rejected) -> CircuitOpenError:
        """The error for a call rejected by the open breaker."""
        c = classify(CircuitOpenError("open"), target=self.target)
        last = self.breaker.last_failure if self.breaker is not None else None
        retry_in = rej.retry_in
        when = "when an operator closes it" if retry_in is None else f"in {retry_in:.2f}s"
        diagnosis = f"{c.diagnosis} Next probe {when}."
        if last:
            diagnosis += f" Last failure: {last}"
        ctx = self.context(c, phase="checkout", retry_in=retry_in, diagnosis=diagnosis)
        return CircuitOpenError(
            f"Circuit breaker '{self.name}' is {rej.state}: not connecting to "
            f"{self.target.where}. {diagnosis}",
            ctx,
        )

    def pool_exhausted(self, pool: Pool, waiting: int, cause: str) -> PoolExhaustedError:
        """The error for a checkout that found no free connection in time."""
        self.pool_timeouts += 1
        size = getattr(pool, "size", lambda: 0)()
        in_use = getattr(pool, "checkedout", lambda: 0)()
        overflow = max(0, getattr(pool, "_max_overflow", 0))
        c = classify(sa_exc.TimeoutError(cause), target=self.target)
        diagnosis = (
            f"pool exhausted: {in_use} in use (pool_size {size} + max_overflow {overflow}), "
            f"{waiting} waiting ({cause}) - a leak or a slow database, not a network problem."
        )
        ctx = self.context(
            c,
            phase="checkout",
            diagnosis=diagnosis,
        )
        return PoolExhaustedError(f"{diagnosis} [engine '{self.name}']", ctx)

    # -- connect -----------------------------------------------------------------

    def connect(self, dialect: Any, cargs: Any, cparams: Any) -> Any:
        """Open a DBAPI connection, retrying what is safe to retry."""
        policy = self.policy.retry
        start = self.clock()
        history: list[str] = []
        attempt = 0
        while True:
            attempt += 1
            self.connect_attempts += 1
            try:
                conn = dialect.connect(*cargs, **cparams)
            except _EXIT:
                raise
            except BaseException as e:
                self.connect_failures += 1
                c = classify(e, phase="connect", target=self.target)
                history.append(f"{c.kind.value}:{c.code}" if c.code else c.kind.value)
                b = self.breaker
                if b is not None and c.counts_for_breaker:
                    b.record_failure(c.diagnosis)
                elapsed = self.clock() - start
                pause = _backoff.backoff(policy, attempt)
                if (
                    c.retry is RetryLevel.CONNECT
                    and attempt < policy.attempts
                    and elapsed + pause < policy.deadline
                    and (b is None or b.state is CLOSED)
                ):
                    self._sleep(pause)
                    continue
                ctx = self.context(
                    c, phase="connect", attempt=attempt, elapsed=elapsed, history=tuple(history)
                )
                attach(e, ctx)
                if isinstance(e, dialect.loaded_dbapi.Error) or not isinstance(e, Exception):
                    raise
                # bare socket errors (asyncpg) become the SQLAlchemy error users catch
                wrapped = sa_exc.OperationalError(None, None, e, hide_parameters=True)
                attach(wrapped, ctx)
                raise wrapped from e
            else:
                return conn

    def _sleep(self, seconds: float) -> None:
        if self.is_async:
            from sqlalchemy.util import await_only

            await_only(_backoff.async_sleep(seconds))
        else:
            _backoff.sleep(seconds)

    # -- handle_error ------------------------------------------------------------

    def handle_error(self, ctx: Any) -> BaseException | None:
        """SQLAlchemy ``handle_error`` listener."""
        orig: BaseException = ctx.original_exception
        sa_error: BaseException | None = ctx.sqlalchemy_exception
        target_exc = sa_error if sa_error is not None else orig
        existing = error_context(orig)
        if existing is not None:  # classified in connect(); carry it over
            attach(target_exc, existing)
            return None
        if isinstance(orig, _EXIT) or ctx.is_pre_ping:
            return None
        phase = _phase(ctx, orig)
        c = classify(target_exc, phase=phase, target=self.target)
        conn = ctx.connection
        if conn is not None and self.watch:
            slot = _slot_of(conn)
            if slot is not None and slot.fired:
                slot.fired = False
                c = classify(TimeoutError("call deadline"), phase=phase, target=self.target)
                if phase == "commit":
                    c = classify(TimeoutError("x"), phase="commit", target=self.target)
        b = self.breaker
        if b is not None and c.counts_for_breaker:
            b.record_failure(c.diagnosis)
        ectx = self.context(c, phase=phase)
        if c.kind is Kind.AMBIGUOUS_COMMIT:
            return AmbiguousCommitError(
                f"Engine '{self.name}': {c.diagnosis} (cause: {type(orig).__name__})", ectx
            )
        attach(target_exc, ectx)
        return None

    # -- per-call deadline and slow calls ----------------------------------------

    def before_execute(self, conn: Any, *args: Any) -> None:
        """Arm the watchdog (and the slow-call clock) for one cursor execute."""
        now = self.clock()
        conn.info["resilient_db.t0"] = now
        if self.watch:
            slot = _slot_of(conn)
            if slot is not None:
                call = self.policy.timeouts.call
                assert call is not None
                slot.deadline = time.monotonic() + call

    def after_execute(self, conn: Any, *args: Any) -> None:
        """Disarm the watchdog; report a slow call to the breaker."""
        if self.watch:
            slot = _slot_of(conn)
            if slot is not None:
                slot.deadline = 0.0
        if self.slow_call is not None and self.breaker is not None:
            t0 = conn.info.get("resilient_db.t0")
            if t0 is not None and self.clock() - t0 > self.slow_call:
                self.breaker.record_failure(
                    f"A call to {self.target.where} took longer than the slow-call threshold "
                    f"({self.slow_call}s): the database is overloaded or the network is slow."
                )

    def on_connect(self, dbapi_connection: Any, record: Any) -> None:
        """Pool ``connect`` listener: a watchdog slot per DBAPI connection."""
        if self.watch:
            ref = dbapi_connection

            def fd() -> int | None:
                return socket_fileno(ref)

            record.info["resilient_db.slot"] = WATCHDOG.slot(fd)

    # -- checkout hygiene ----------------------------------------------------------

    def ping(self, pool: Pool, record: Any) -> bool:
        """Ping an idle pooled connection within the call deadline; False if it is dead."""
        dbapi = record.dbapi_connection
        slot: Slot | None = record.info.get("resilient_db.slot")
        call = self.policy.timeouts.call
        if slot is not None and call is not None:
            slot.deadline = time.monotonic() + min(call, self.policy.timeouts.connect or call)
        try:
            pool._dialect.do_ping(dbapi)  # type: ignore[union-attr]
        except _EXIT:
            raise
        except BaseException:
            return False
        finally:
            if slot is not None:
                slot.deadline = 0.0
                slot.fired = False
        return True


def _slot_of(conn: Any) -> Slot | None:
    try:
        info = conn.info
    except Exception:
        return None
    slot = info.get("resilient_db.slot")
    return slot if isinstance(slot, Slot) else None


def _phase(ctx: Any, orig: BaseException) -> str:
    """connect / execute / commit / rollback, read from the failing call stack.

    Reading the traceback costs nothing on the happy path, unlike commit and
    rollback event listeners, which would run on every transaction.
    """
    if ctx.connection is None:
        return "connect"
    if ctx.statement is not None:
        return "execute"
    tb: TracebackType | None = orig.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_name
        if name in ("_commit_impl", "do_commit", "commit"):
            return "commit"
        if name in ("_rollback_impl", "do_rollback", "rollback"):
            return "rollback"
        tb = tb.tb_next
    return "execute"


class _ResilientPool:
    """Methods copied into a subclass of the engine's own pool class.

    They are copied rather than mixed in because CPython refuses to change an
    existing pool object's ``__class__`` to a class with an extra base.
    """

    _rdb: Resilience
    _rdb_base: type[Pool]

    def _do_get(self) -> Any:
        # Hot path: every checkout. Keep attribute look-ups and calls few.
        r = self._rdb
        b = r.breaker
        probe = False
        if b is not None and b.state is not CLOSED:
            try:
                probe = b.before_call()
            except Rejected as rej:
                raise r.circuit_open(rej) from None
        limit = r.max_waiters
        counted = False
        if (
            limit is not None
            and self._overflow >= self._max_overflow >= 0  # type: ignore[attr-defined]
            and self._pool.qsize() == 0  # type: ignore[attr-defined]
        ):
            with r._wait_lock:
                waiting = r.waiting
                if waiting < limit:
                    r.waiting += 1
                    counted = True
            if not counted:
                if b is not None:
                    b.release(probe)
                raise r.pool_exhausted(self, waiting, "too many callers waiting")  # type: ignore[arg-type]
        try:
            rec = self._rdb_base._do_get(self)  # type: ignore[arg-type]
        except sa_exc.TimeoutError:
            if b is not None:
                b.release(probe)
            raise r.pool_exhausted(self, r.waiting, "checkout timed out") from None  # type: ignore[arg-type]
        except BaseException:
            if b is not None:
                b.release(probe)
            raise
        finally:
            if counted:
                with r._wait_lock:
                    r.waiting -= 1
        info = rec.info
        if probe:
            info["resilient_db.probe"] = True
        idle = r.ping_after_idle
        if idle is not None:
            since = info.get("resilient_db.idle_since")
            if (
                since is not None
                and r.clock() - since > idle
                and rec.dbapi_connection is not None
                and not r.ping(self, rec)  # type: ignore[arg-type]
            ):
                rec.invalidate()
        return rec

    def _do_return_conn(self, record: Any) -> None:
        r = self._rdb
        b = r.breaker
        info = record.info
        if b is not None:
            probe = info.pop("resilient_db.probe", False)
            if record.dbapi_connection is None:
                b.release(probe)
            elif probe or not b.quiet:
                b.record_success(probe)
        if r.ping_after_idle is not None:
            info["resilient_db.idle_since"] = r.clock()
        self._rdb_base._do_return_conn(self, record)  # type: ignore[arg-type]


def install(engine: Engine, r: Resilience) -> None:
    """Attach ``r`` to ``engine``: pool subclass plus event listeners."""
    pool = engine.pool
    base = type(pool)
    if hasattr(base, "_rdb_base"):
        base = base._rdb_base
    cls = type(
        f"Resilient{base.__name__}",
        (base,),
        {
            "_rdb": r,
            "_rdb_base": base,
            "_do_get": _ResilientPool._do_get,
            "_do_return_conn": _ResilientPool._do_return_conn,
        },
    )
    pool.__class__ = cls

    event.listen(engine, "do_connect", lambda d, rec, ca, cp: r.connect(d, ca, cp))
    event.listen(engine, "handle_error", r.handle_error)
    if r.watch:
        event.listen(engine, "connect", r.on_connect)
    if r.watch or r.slow_call is not None:
        event.listen(engine, "before_cursor_execute", r.before_execute)
        event.listen(engine, "after_cursor_execute", r.after_execute)
