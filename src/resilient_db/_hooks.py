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
import contextlib
import contextvars
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

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
    _CONTEXT_ATTR,
    AmbiguousCommitError,
    CircuitOpenError,
    ErrorContext,
    PoolExhaustedError,
    attach,
    redact_parameters,
)

if TYPE_CHECKING:
    from .failover import Failover

__all__ = ["Resilience", "install"]

_EXIT = (asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit)

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

# kinds of a failed idle ping meaning the server closed the socket (a restart, an idle
# timeout): the pool's older connections are dead too, reconnecting decides. A ping
# into silence (read_timeout) still counts: reconnecting would wait out a timeout.
_GONE = frozenset({Kind.DISCONNECT, Kind.ADMIN_TERMINATED, Kind.SERVER_SHUTDOWN, Kind.IDLE_TIMEOUT})

# Drivers without a client-side read timeout: guarded by the watchdog.
# asyncpg has command_timeout, but it costs an event-loop timer per protocol exchange.
_WATCHED_DRIVERS = {"psycopg", "psycopg2", "psycopg_async", "aiomysql", "asyncpg"}

# The slot of the connection whose set-up (the pool's connect listeners) runs in this
# context (thread, or asyncio task: SQLAlchemy's greenlets share the task's context).
# A set-up error is raised with no Connection to find the slot through.
_SETTING_UP: contextvars.ContextVar[Slot | None] = contextvars.ContextVar(
    "resilient_db_setting_up", default=None
)


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
        # half-open probe tokens by the pool record carrying them, off record.info:
        # SQLAlchemy clears info whenever it reconnects a record
        self.probes: dict[Any, int] = {}
        # called before each connect attempt; resilient_db.testing.FaultInjector raises here
        self.connect_faults: list[Callable[[], None]] = []
        self.pool_timeouts = 0
        self.watch = policy.timeouts.call is not None and engine.dialect.driver in _WATCHED_DRIVERS
        self.slow_call = policy.breaker.slow_call if self.breaker is not None else None
        # copied out of the policy for the checkout hot path
        # the bulkhead needs QueuePool's counters; other pools never make callers wait
        self.max_waiters = policy.pool.max_waiters if isinstance(engine.pool, QueuePool) else None
        # an embedded SQLite connection cannot go stale while idle
        self.ping_after_idle = (
            None if engine.dialect.name == "sqlite" else policy.pool.ping_after_idle
        )
        self._open_verdict: Classification | None = None
        self.dialect = engine.dialect
        # resilient_db.telemetry.EngineTelemetry (set by telemetry.attach); `timing` is
        # the same object, set only while per-call timings are on (the hot path checks it)
        self.telemetry: Any = None
        self.timing: Any = None
        self._pymysql = engine.dialect.driver == "pymysql"
        # host selection of a multi-host engine (resilient_db.failover.attach sets it)
        self.failover: Failover | None = None

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
        extra: tuple[tuple[str, Any], ...] = (),
        target: Target | None = None,
    ) -> ErrorContext:
        """Build the error context for a classified failure of this engine.

        Pure: nothing is counted or remembered; the hooks that raise the failure
        call :meth:`record_error` too. ``target`` names the host actually tried
        (multi-host engines); default: the URL's.
        """
        return ErrorContext.for_target(
            self.name,
            target or self.target,
            c,
            phase=phase,
            attempt=attempt,
            elapsed=round(elapsed, 6),
            breaker_state=self.breaker.state if self.breaker is not None else None,
            history=history,
            retry_in=retry_in,
            extra=extra,
            **({} if diagnosis is None else {"diagnosis": diagnosis}),
        )

    def record_error(self, c: Classification, ctx: ErrorContext) -> ErrorContext:
        """A failure of this engine is being raised: remember it and tell telemetry."""
        if c.kind is not Kind.CIRCUIT_OPEN:
            self.last_error = ctx
        if self.telemetry is not None:
            self.telemetry.on_error(c, ctx)
        return ctx

    def circuit_open(self, rej: Rejected) -> CircuitOpenError:
        """The error for a call rejected by the open breaker."""
        c = self._open_verdict
        if c is None:  # the same for every rejection: classify once
            c = self._open_verdict = classify(CircuitOpenError("open"), target=self.target)
        last = self.breaker.last_failure if self.breaker is not None else None
        retry_in = rej.retry_in
        when = "when an operator closes it" if retry_in is None else f"in {retry_in:.2f}s"
        diagnosis = f"{c.diagnosis} Next probe {when}."
        if last:
            diagnosis += f" Last failure: {last}"
        ctx = self.record_error(
            c, self.context(c, phase="checkout", retry_in=retry_in, diagnosis=diagnosis)
        )
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
            f"pool exhausted: {in_use} in use, {waiting} waiting \u2014 a leak or a slow "
            f"database, not a network problem (pool_size {size} + max_overflow {overflow}, "
            f"max_waiters {self.max_waiters}: {cause})."
        )
        stats = (
            ("pool_size", size),
            ("max_overflow", overflow),
            ("in_use", in_use),
            ("waiting", waiting),
            ("max_waiters", self.max_waiters),
            ("checkout_timeout", self.policy.timeouts.checkout),
        )
        ctx = self.record_error(
            c, self.context(c, phase="checkout", diagnosis=diagnosis, extra=stats)
        )
        return PoolExhaustedError(f"{diagnosis} [engine '{self.name}']", ctx)

    # -- connect -----------------------------------------------------------------

    def connect(self, dialect: Any, cargs: Any, cparams: Any, rec: Any = None) -> Any:
        """Open a DBAPI connection, retrying what is safe to retry (``rec``: the pool record)."""
        start = self.clock()
        try:
            return self._connect_once(dialect, cargs, cparams, rec)
        except _EXIT:
            raise
        except BaseException as e:
            error = e
        # outside the except block, so a later attempt's error is not chained to this one
        return self._connect_retrying(dialect, cargs, cparams, error, start, rec)

    def _connect_once(self, dialect: Any, cargs: Any, cparams: Any, rec: Any = None) -> Any:
        """One connect attempt: injected faults first, then the (failover-chosen) host."""
        self.connect_attempts += 1
        for fault in self.connect_faults:
            fault()
        if self.failover is not None:  # a multi-host engine picks the host (failover.py)
            return self.failover.connect(dialect, cargs, cparams, self._open, rec)
        return self._open(dialect, cargs, cparams)

    def _open(self, dialect: Any, cargs: Any, cparams: Any) -> Any:
        handshake = cparams.get("connect_timeout") if self._pymysql else None
        read = cparams.get("read_timeout")
        if not handshake or (read is not None and read <= handshake):
            return dialect.connect(*cargs, **cparams)
        # PyMySQL reads the server greeting with read_timeout, not connect_timeout:
        # bound the handshake by the connect timeout, then restore the call deadline
        conn = dialect.connect(*cargs, **{**cparams, "read_timeout": handshake})
        conn._read_timeout = read
        return conn

    def _connect_retrying(
        self,
        dialect: Any,
        cargs: Any,
        cparams: Any,
        error: BaseException,
        start: float,
        rec: Any = None,
    ) -> Any:
        """The retry loop, entered only after a first attempt failed."""
        policy = self.policy.retry
        history: list[str] = []
        attempt = 1
        while True:
            # a multi-host engine's attempt names the host it tried (failover.TARGET_ATTR)
            tried = getattr(error, "resilient_db_target", None)
            t = tried if isinstance(tried, Target) else self.target
            c = classify(error, phase="connect", target=t)
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
                if self.telemetry is not None:
                    self.telemetry.connect_retry(c, attempt, pause)
                self._sleep(pause)
                attempt += 1
                try:
                    return self._connect_once(dialect, cargs, cparams, rec)
                except _EXIT:
                    raise
                except BaseException as e:
                    error = e
                continue
            ctx = self.context(
                c,
                phase="connect",
                attempt=attempt,
                elapsed=elapsed,
                history=tuple(history),
                target=t,
            )
            self.record_error(c, ctx)
            attach(error, ctx)
            if isinstance(
                error, (dialect.loaded_dbapi.Error, sa_exc.SQLAlchemyError)
            ) or not isinstance(error, Exception):
                raise error
            # bare socket errors (asyncpg) become the SQLAlchemy error users catch
            wrapped = sa_exc.OperationalError(None, None, error, hide_parameters=True)
            attach(wrapped, ctx)
            raise wrapped from error

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
        # classified in connect(): carry it over. Only orig's own context: one found
        # through __context__ belongs to an earlier error this one was raised while handling
        existing = getattr(orig, _CONTEXT_ATTR, None)
        if isinstance(existing, ErrorContext):
            attach(target_exc, existing)
            return None
        if isinstance(orig, _EXIT) or ctx.is_pre_ping:
            return None
        if ctx.parameters:
            redact_parameters(ctx.parameters, orig, sa_error)
        phase = _phase(ctx, orig)
        fo = self.failover
        t = self.target if fo is None else fo.target_of(ctx.connection)
        c = classify(target_exc, phase=phase, target=t)
        conn = ctx.connection
        if self.watch:
            # no Connection: a new connection's set-up failed (see watch_connection)
            setting_up = _SETTING_UP.get()
            slot = _slot_of(conn) if conn is not None else setting_up
            if setting_up is not None and (conn is None or slot is setting_up):
                setting_up.deadline = 0.0  # that set-up failed, so it is over
                _SETTING_UP.set(None)
            if slot is not None and (slot.fired or slot.shot):
                # the watchdog cut this call, or an earlier one that still returned (shot):
                # then nothing of this call reached the server, so no ambiguous commit
                earlier = not slot.fired
                slot.fired = False
                if slot is setting_up:  # the first connection's initialize()
                    phase = "connect"
                # a call on an open connection timed out (a set-up query too: not a connect
                # timeout); at COMMIT, an ambiguous commit
                call_phase = "execute" if phase == "connect" or earlier else phase
                c = classify(TimeoutError("call deadline"), phase=call_phase, target=t)
        b = self.breaker
        if b is not None:
            if c.counts_for_breaker:
                b.record_failure(c.diagnosis)
            if conn is not None:
                # returning this checkout is then no success: a counted failure, or
                # an application error, which must not reset the failure count either
                with contextlib.suppress(Exception):
                    conn.info["resilient_db.failed"] = True
        if c.kind in _LOST and not ctx.is_disconnect:
            ctx.is_disconnect = True  # never return a broken connection to the pool
        if c.kind is Kind.READ_TIMEOUT:
            # one call outlived its deadline: discard that connection, not the pool
            ctx.invalidate_pool_on_disconnect = False
        if c.kind is Kind.READ_ONLY and fo is not None:
            c = fo.refused_write(ctx, c)  # the primary moved: re-route (failover.py)
        ectx = self.record_error(c, self.context(c, phase=phase, target=t))
        if c.kind is Kind.AMBIGUOUS_COMMIT:
            return AmbiguousCommitError(
                f"Engine '{self.name}': {c.diagnosis} (cause: {type(orig).__name__})", ectx
            )
        attach(target_exc, ectx)
        return None

    # -- per-call deadline and slow calls ----------------------------------------

    def slow(self, info: dict[str, Any]) -> None:
        """A call outlived the slow-call threshold: count it and spoil the checkout."""
        info["resilient_db.failed"] = True
        if self.breaker is not None:
            self.breaker.record_failure(
                f"A call to {self.target.where} took longer than the slow-call threshold "
                f"({self.slow_call}s): the database is overloaded or the network is slow."
            )

    def watch_connection(self, dbapi_connection: Any, record: Any) -> None:
        """A watchdog slot for a new DBAPI connection, armed for its set-up.

        Called as soon as the connection is open, before the pool's ``connect``
        event listeners run: SQLAlchemy's dialect set-up (asyncpg's type-codec
        queries, the first connection's ``initialize()``) and resilient_db's own
        ``SET SESSION`` then run under one ``Timeouts.call`` deadline, which
        :meth:`on_connect`, the last ``connect`` listener, disarms. An asyncpg
        connection given its own ``command_timeout`` gets no slot: asyncpg
        bounds every call of it already, and the caller's setting wins.
        """
        if not self.watch or record is None or "resilient_db.slot" in record.info:
            return
        _SETTING_UP.set(None)
        driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        if _bounds_own_calls(driver):
            return
        try:
            ref: Callable[[], Any] = weakref.ref(driver)
        except TypeError:  # not weak-referenceable: keep it alive with its record

            def ref() -> Any:
                return driver

        def fd() -> int | None:
            conn = ref()
            return None if conn is None else socket_fileno(conn)

        slot = WATCHDOG.slot(fd)
        slot.deadline = time.monotonic() + self.policy.timeouts.call  # type: ignore[operator]
        record.info["resilient_db.slot"] = slot
        _SETTING_UP.set(slot)

    def on_connect(self, dbapi_connection: Any, record: Any) -> None:
        """Pool ``connect`` listener, the last one: the connection's set-up is done.

        Disarms the slot :meth:`watch_connection` armed (and makes one for a
        connection that did not come through ``do_connect``).
        """
        slot = record.info.get("resilient_db.slot")
        if slot is None:
            self.watch_connection(dbapi_connection, record)
            slot = record.info.get("resilient_db.slot")
        if slot is not None:
            slot.disarm(0.0)  # shot during the set-up: its first call fails as read_timeout
        _SETTING_UP.set(None)

    def on_connect_mariadb(self, dbapi_connection: Any, record: Any) -> None:
        """Pool ``connect`` listener: MariaDB's server-side statement timeout."""
        statement = self.policy.timeouts.statement
        if statement is None or not getattr(self.dialect, "is_mariadb", False):
            return
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"SET SESSION max_statement_time = {float(statement):g}")
        finally:
            cursor.close()

    # -- checkout hygiene ----------------------------------------------------------

    def vet(self, pool: Pool, rec: Any, probe: int, waited: bool) -> Any:
        """The rare checkout path: a half-open probe, a caller that waited, an idle connection.

        A caller that waited while the breaker opened is rejected like any other;
        an idle connection (and any pooled connection handed to a probe) is pinged
        within the call deadline and, if dead, replaced (or the checkout rejected
        when that failure opened the breaker). A record SQLAlchemy will reconnect
        anyway (invalidated, or older than a pool invalidation) is not pinged. A
        probe's token is kept in :attr:`probes` until check-in.
        """
        b = self.breaker
        try:
            if waited and not probe and b is not None and b.state is not CLOSED:
                probe = b.before_call()
            idle = self.ping_after_idle
            since = rec.info.get("resilient_db.idle_since")
            stale = idle is not None and since is not None and self.clock() - since > idle
            # a probe's verdict must come from the database, not from an idle pooled socket
            if (
                (stale or probe)
                and not rec._is_hard_or_soft_invalidated()
                and not self.ping(pool, rec)
            ):
                rec.invalidate()
                if self.telemetry is not None:
                    self.telemetry.validation_failed("idle_ping")
                if b is not None and b.state is not CLOSED:
                    b.release(probe)
                    probe = 0
                    probe = b.before_call()
            if probe:
                self.probes[rec] = probe
        except Rejected as rej:
            rec.info["resilient_db.failed"] = True  # handed back unused: no verdict
            rec.checkin(_fairy_was_created=False)
            raise self.circuit_open(rej) from None
        except BaseException as e:
            if b is not None:
                b.release(probe)
            rec._checkin_failed(e, _fairy_was_created=False)
            raise
        return rec

    def ping(self, pool: Pool, record: Any) -> bool:
        """Ping an idle pooled connection within the call deadline; False if it is dead.

        A ping that finds the socket closed by the server does not count for the
        breaker: it invalidates the pool's connections as old as this one (a server
        restart closed them all), and the reconnect that follows counts if the
        database is really down. A ping into silence counts.
        """
        dbapi = record.dbapi_connection
        slot: Slot | None = record.info.get("resilient_db.slot")
        call = self.policy.timeouts.call
        if slot is not None and call is not None:
            slot.deadline = time.monotonic() + min(call, self.policy.timeouts.connect or call)
        try:
            pool._dialect.do_ping(dbapi)  # type: ignore[union-attr]
        except _EXIT:
            raise
        except BaseException as e:
            fired = slot is not None and slot.fired
            c = classify(TimeoutError() if fired else e, phase="execute", target=self.target)
            if c.kind in _GONE:
                # as SQLAlchemy's pre-ping does (Pool._invalidate): recycle this generation
                if pool._invalidate_time < record.starttime:
                    pool._invalidate_time = time.time()
            elif self.breaker is not None and c.counts_for_breaker:
                self.breaker.record_failure(c.diagnosis)
            return False
        finally:
            if slot is not None:
                slot.deadline = 0.0
                slot.fired = False
        return True


def _bounds_own_calls(driver: Any) -> bool:
    """True for an asyncpg connection with a ``command_timeout`` of its own."""
    asyncpg = sys.modules.get("asyncpg")  # loaded, if this is an asyncpg connection
    if asyncpg is None or not isinstance(driver, asyncpg.Connection):
        return False  # a connection_class= subclass is an asyncpg.Connection too
    config = getattr(driver, "_config", None)
    return getattr(config, "command_timeout", None) is not None


def _slot_of(conn: Any) -> Slot | None:
    try:
        info = conn.info  # Connection / pooled connection: the record's info dict
    except Exception:
        info = None
    if not isinstance(info, dict):  # a bare DBAPI connection (psycopg has .info too)
        # the first connection's dialect.initialize() runs on an ad-hoc proxy of the record
        record = getattr(getattr(conn, "_dbapi_connection", None), "_connection_record", None)
        info = getattr(record, "info", None)
        if not isinstance(info, dict):
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
        # Hot path, every checkout: breaker closed, no timings, no need to wait.
        r = self._rdb
        b = r.breaker
        if (
            (b is None or b.state is CLOSED)
            and r.timing is None
            and (
                r.max_waiters is None or self._overflow < self._max_overflow  # type: ignore[attr-defined]
            )
        ):
            try:
                rec = self._rdb_base._do_get(self)  # type: ignore[arg-type]
            except sa_exc.TimeoutError:
                raise r.pool_exhausted(self, r.waiting, "checkout timed out") from None  # type: ignore[arg-type]
            idle = r.ping_after_idle
            if idle is not None:
                since = rec.info.get("resilient_db.idle_since")
                if since is not None and r.clock() - since > idle:
                    rec = r.vet(self, rec, 0, False)  # type: ignore[arg-type]
            return rec
        return _ResilientPool._do_get_guarded(self)

    def _do_get_guarded(self) -> Any:
        r = self._rdb
        timing = r.timing
        t0 = time.perf_counter() if timing is not None else 0.0
        b = r.breaker
        probe = 0
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
        if probe or counted:
            rec = r.vet(self, rec, probe, counted)  # type: ignore[arg-type]
        elif r.ping_after_idle is not None:
            since = rec.info.get("resilient_db.idle_since")
            if since is not None and r.clock() - since > r.ping_after_idle:
                rec = r.vet(self, rec, 0, False)  # type: ignore[arg-type]
        if timing is not None:
            timing.checked_out(rec, t0)
        return rec

    def _do_return_conn(self, record: Any) -> None:
        r = self._rdb
        if r.timing is not None:
            r.timing.checked_in(record)
        b = r.breaker
        info = record.info
        if r.watch:
            slot = info.get("resilient_db.slot")
            if slot is not None and slot.shot:
                # its socket was shut down after its call returned: never hand it out again
                info["resilient_db.failed"] = True
                record.invalidate(soft=True)  # reconnected at its next checkout
        # an empty info (SQLite) carries no mark: skip the pops; a server connection's
        # info always holds its watchdog slot or idle time, so there they run every time
        if b is not None and (info or r.probes or not b.quiet):
            probe = r.probes.pop(record, 0) if r.probes else 0
            if info.pop("resilient_db.failed", False) or record.dbapi_connection is None:
                b.release(probe)
            elif probe or not b.quiet:
                b.record_success(probe)
        if r.ping_after_idle is not None:
            info["resilient_db.idle_since"] = r.clock()
        self._rdb_base._do_return_conn(self, record)  # type: ignore[arg-type]


def _guard_calls(dialect: Any, r: Resilience) -> None:
    """Put every driver call of this engine under the per-call deadline and slow-call clock.

    Wraps this engine's own dialect instance only: ``do_execute``,
    ``do_executemany`` and ``do_execute_no_params`` (the execution context comes
    last), and ``do_commit`` / ``do_rollback``, which are not cursor executes
    (psycopg would block for ever on a COMMIT sent into a silent network).
    Wrapping the dialect costs one Python call per statement; cursor-execute
    event listeners would make SQLAlchemy join listener collections for every
    Connection, several microseconds per request.
    """
    call = r.policy.timeouts.call if r.watch else None
    slow = r.slow_call
    clock = r.clock

    def guard(
        original: Callable[..., Any], info_of: Callable[..., Any], rollback: bool = False
    ) -> Callable[..., Any]:
        def guarded(*args: Any) -> Any:
            # the record's info up front only for the watchdog slot; a slow call reads it after
            info = info_of(args) if call is not None else None
            slot = info.get("resilient_db.slot") if info else None
            if rollback and slot is not None and slot.shot:
                # its socket is shut down: the server rolled back when it saw the connection
                # close, and the pool replaces this connection at checkin
                return None
            # a deadline around this call (a connection's set-up) bounds it too, restored after
            outer = slot.arm(call) if slot is not None else 0.0
            t0 = clock() if slow is not None else 0.0
            try:
                result = original(*args)
            finally:
                if slot is not None:
                    slot.disarm(outer)
            if slot is not None:
                slot.returned()
            if slow is not None and clock() - t0 > slow:
                info = info if info is not None else info_of(args)
                if info is not None:
                    r.slow(info)
            return result

        return guarded

    for name in ("do_execute", "do_executemany", "do_execute_no_params"):
        setattr(dialect, name, guard(getattr(dialect, name), _context_info))
    dialect.do_commit = guard(dialect.do_commit, _connection_info)
    dialect.do_rollback = guard(dialect.do_rollback, _connection_info, rollback=True)


class _DeadlineCursor:
    """A server-side cursor whose fetches and close run under the per-call deadline.

    Each ``fetchone`` / ``fetchmany`` / ``fetchall`` of a server-side cursor
    (``stream()``, ``stream_results=True``, ``yield_per``) is a network round
    trip of its own, after the ``execute`` that opened the cursor; ``close``
    is one too (psycopg sends ``CLOSE``, aiomysql drains the unread rows).
    Everything else, attribute writes included, goes to the real cursor.
    """

    __slots__ = ("_rdb_call", "_rdb_cursor", "_rdb_slot")

    def __init__(self, cursor: Any, slot: Slot, call: float) -> None:
        object.__setattr__(self, "_rdb_cursor", cursor)
        object.__setattr__(self, "_rdb_slot", slot)
        object.__setattr__(self, "_rdb_call", call)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rdb_cursor, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._rdb_cursor, name, value)

    def _within(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        slot = self._rdb_slot
        outer = slot.arm(self._rdb_call)
        try:
            result = fn(*args, **kwargs)
        finally:
            slot.disarm(outer)
        slot.returned()
        return result

    def fetchone(self) -> Any:
        return self._within(self._rdb_cursor.fetchone)

    def fetchmany(self, *args: Any, **kwargs: Any) -> Any:
        return self._within(self._rdb_cursor.fetchmany, *args, **kwargs)

    def fetchall(self) -> Any:
        return self._within(self._rdb_cursor.fetchall)

    def close(self) -> Any:
        slot = self._rdb_slot
        outer = slot.arm(self._rdb_call)
        try:
            return self._rdb_cursor.close()
        finally:
            slot.disarm(outer)
            # SQLAlchemy swallows a failed close, so no handle_error reads `fired`: the
            # connection is marked shot now and its next call fails as read_timeout
            slot.returned()

    def scroll(self, *args: Any, **kwargs: Any) -> Any:
        return self._within(self._rdb_cursor.scroll, *args, **kwargs)

    def __next__(self) -> Any:
        return self._within(next, self._rdb_cursor)

    def __enter__(self) -> _DeadlineCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        rows = iter(self._rdb_cursor)
        while True:
            try:
                row = self._within(next, rows)
            except StopIteration:
                return
            yield row


def _guard_server_side_cursors(dialect: Any, call: float) -> None:
    """Put the fetches of this engine's server-side cursors under the per-call deadline.

    The dialect instance gets a subclass of its execution context class whose
    ``create_server_side_cursor()`` wraps the cursor in a :class:`_DeadlineCursor`
    when the connection has a watchdog slot. Ordinary (buffered) queries read
    all their rows within the guarded execute and never reach this code.
    """
    base = dialect.execution_ctx_cls
    if getattr(base, "_rdb_guarded", False):
        return

    def create_server_side_cursor(self: Any) -> Any:
        cursor = base.create_server_side_cursor(self)
        try:
            info = self._dbapi_connection.info
        except Exception:
            return cursor
        slot = info.get("resilient_db.slot") if isinstance(info, dict) else None
        return cursor if slot is None else _DeadlineCursor(cursor, slot, call)

    dialect.execution_ctx_cls = type(
        f"Resilient{base.__name__}",
        (base,),
        {"create_server_side_cursor": create_server_side_cursor, "_rdb_guarded": True},
    )


def _context_info(args: tuple[Any, ...]) -> dict[str, Any] | None:
    """The pool record's info dict, from an execute call's execution context."""
    try:
        info = args[-1]._dbapi_connection.info
    except Exception:
        return None
    return info if isinstance(info, dict) else None


def _connection_info(args: tuple[Any, ...]) -> dict[str, Any] | None:
    """The pool record's info dict, from a commit/rollback call's pooled connection."""
    try:
        info = args[0].info
    except Exception:
        return None
    return info if isinstance(info, dict) else None


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
            "_do_get_guarded": _ResilientPool._do_get_guarded,
            "_do_return_conn": _ResilientPool._do_return_conn,
        },
    )
    pool.__class__ = cls

    def do_connect(d: Any, rec: Any, ca: Any, cp: Any) -> Any:
        _SETTING_UP.set(None)  # an earlier set-up in this context that failed is over
        tel = r.telemetry  # a span and timing around the whole connect sequence
        if tel is None:
            conn = r.connect(d, ca, cp, rec)
        else:
            conn = tel.connect(lambda d_, ca_, cp_: r.connect(d_, ca_, cp_, rec), d, ca, cp)
        if r.watch:  # before the pool's connect listeners: they run the set-up queries
            r.watch_connection(conn, rec)
        return conn

    event.listen(engine, "do_connect", do_connect)
    event.listen(engine, "handle_error", r.handle_error)
    from .telemetry import attach  # metrics, spans and logs (no-ops until an SDK is set)

    attach(engine, r)
    if engine.dialect.name in ("mysql", "mariadb") and r.policy.timeouts.statement is not None:
        # after SQLAlchemy's first-connect listener, which sets dialect.is_mariadb
        event.listen(engine, "connect", r.on_connect_mariadb)
    call = r.policy.timeouts.call
    if r.watch and call is not None:
        # the last connect listener: it disarms the set-up deadline do_connect armed
        event.listen(engine, "connect", r.on_connect)
        if engine.dialect.supports_server_side_cursors:
            _guard_server_side_cursors(engine.dialect, call)
    if r.watch or r.slow_call is not None:
        _guard_calls(engine.dialect, r)
