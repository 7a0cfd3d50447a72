"""The per-call deadline: watchdog slots, guarded driver calls, server-side cursors.

A connection of a watched driver (:data:`~resilient_db._watchdog.WATCHED_DRIVERS`)
gets a :class:`~resilient_db._watchdog.Slot` as soon as it is open; its set-up
runs under one ``Timeouts.call`` deadline, and afterwards each driver call
(execute, commit, rollback, each fetch of a server-side cursor) arms the slot
for ``Timeouts.call`` seconds. The same wrapper times calls against the
breaker's slow-call threshold.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from . import _compat
from ._sessions import DRIVERS, session_id
from ._state import ConnState, Resilience, conn_state
from ._watchdog import FOREVER, WATCHDOG, Slot, socket_fileno
from .errors import ConfigurationError

__all__ = [
    "SETTING_UP",
    "guard_calls",
    "guard_server_side_cursors",
    "on_connect",
    "slot_of",
    "watch_connection",
]

_perf = time.perf_counter
_mono = time.monotonic

# The slot of the connection whose set-up (the pool's connect listeners) runs in this
# context (thread, or asyncio task: SQLAlchemy's greenlets share the task's context).
# A set-up error is raised with no Connection to find the slot through.
SETTING_UP: contextvars.ContextVar[Slot | None] = contextvars.ContextVar(
    "resilient_db_setting_up", default=None
)


def watch_connection(r: Resilience, dbapi_connection: Any, record: Any) -> None:
    """A watchdog slot for a new DBAPI connection, armed for its set-up.

    Called as soon as the connection is open, before the pool's ``connect``
    event listeners run: SQLAlchemy's dialect set-up (asyncpg's type-codec
    queries, the first connection's ``initialize()``) and resilient_db's own
    ``SET SESSION`` then run under one ``Timeouts.call`` deadline, which
    :func:`on_connect`, the last ``connect`` listener, disarms. An asyncpg
    connection given its own ``command_timeout`` gets no slot: asyncpg
    bounds every call of it already, and the caller's setting wins.
    """
    if not r.watch or record is None:
        return
    st = _compat.record_state(record)
    if st is not None and st.slot is not None and st.dbapi is dbapi_connection:
        return
    SETTING_UP.set(None)
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

    slot = WATCHDOG.slot(fd, r.monitor)
    if r.monitor is not None and r.driver in DRIVERS:
        slot.session = session_id(driver)  # a silent call's session may be looked up
    slot.arm(r.policy.timeouts.call)  # type: ignore[arg-type]
    st = conn_state(record)
    st.slot, st.dbapi = slot, dbapi_connection
    SETTING_UP.set(slot)


def on_connect(r: Resilience) -> Callable[[Any, Any], None]:
    """The pool ``connect`` listener, the last one: the connection's set-up is done.

    It disarms the slot :func:`watch_connection` armed (and makes one for a
    connection that did not come through ``do_connect``).
    """

    def listener(dbapi_connection: Any, record: Any) -> None:
        # a connection that did not come through do_connect: a listener before
        # resilient_db's returned it, and the record's state is its predecessor's
        watch_connection(r, dbapi_connection, record)
        st = _compat.record_state(record)
        slot = st.slot if st is not None and st.dbapi is dbapi_connection else None
        if slot is not None:
            slot.disarm(0.0)  # shot during the set-up: its first call fails as read_timeout
        SETTING_UP.set(None)

    return listener


def _bounds_own_calls(driver: Any) -> bool:
    """True for an asyncpg connection with a ``command_timeout`` of its own."""
    asyncpg = sys.modules.get("asyncpg")  # loaded, if this is an asyncpg connection
    if asyncpg is None or not isinstance(driver, asyncpg.Connection):
        return False  # a connection_class= subclass is an asyncpg.Connection too
    config = getattr(driver, "_config", None)
    return getattr(config, "command_timeout", None) is not None


def slot_of(conn: Any) -> Slot | None:
    """The watchdog slot of a Connection, pooled or ad-hoc DBAPI connection."""
    st = _compat.record_state(_compat.record_of(conn))
    slot = st.slot if st is not None else None
    return slot if isinstance(slot, Slot) else None


CALL_TIMEOUT = "resilient_db_call_timeout"  # the connection execution option


def _own_call(value: Any) -> float:
    """The seconds of a ``resilient_db_call_timeout`` execution option (None: no deadline).

    ``conn.execution_options(resilient_db_call_timeout=120)`` raises the per-call
    deadline of that connection's calls until it is returned to the pool; ``None``
    removes it (the silence probe still watches the calls). Read from the execution
    context, not through a connection event: any connection event listener would
    make SQLAlchemy dispatch events on every call of every connection.
    """
    if value is None:
        return FOREVER
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
        raise ConfigurationError(
            CALL_TIMEOUT,
            f"must be a number of seconds in (0, 86400] or None, got {value!r}.",
            "Pass e.g. 120 for a long migration, or None for no client-side deadline.",
        )
    return float(value)


def slow(r: Resilience, st: ConnState) -> None:
    """A call outlived the slow-call threshold: count it and spoil the checkout."""
    st.failed = True
    if r.breaker is not None:
        r.breaker.record_failure(
            f"A call to {r.target.where} took longer than the slow-call threshold "
            f"({r.slow_call}s): the database is overloaded or the network is slow."
        )


def guard_calls(dialect: Any, r: Resilience) -> None:
    """Put every driver call of this engine under the per-call deadline and slow-call clock.

    The engine's one dialect wrapper, installed once (by the engine when it has
    a deadline or a slow-call threshold, else by telemetry when it starts
    timing): ``do_execute``, ``do_executemany`` and ``do_execute_no_params``
    (the execution context comes last), also timed for telemetry while
    ``r.exec_timer`` is set, and ``do_commit`` / ``do_rollback``, which are not
    cursor executes (psycopg would block for ever on a COMMIT sent into a silent
    network). Wrapping the dialect costs one Python call per statement;
    cursor-execute event listeners would make SQLAlchemy join listener
    collections for every Connection, several microseconds per request.
    """
    if getattr(dialect, "_rdb_guarded_calls", False):
        return
    dialect._rdb_guarded_calls = True
    call = r.policy.timeouts.call if r.watch else None
    slow_call = r.slow_call
    clock = r.clock
    sample = r.limit.sample if r.limit is not None else None  # the adaptive limit's

    def guard(
        original: Callable[..., Any], rollback: bool = False, timed: bool = False
    ) -> Callable[..., Any]:
        # an execute's execution context comes last; a commit's / rollback's connection first
        state_of = _compat.context_state if timed else _compat.connection_state
        at = -1 if timed else 0

        def guarded(*args: Any) -> Any:
            # the record's state up front only for the watchdog slot; a slow call reads it after
            st = state_of(args[at]) if call is not None else None
            slot = st.slot if st is not None else None
            if rollback and slot is not None and slot.shot:
                # its socket is shut down: the server rolled back when it saw the connection
                # close, and the pool replaces this connection at checkin
                return None
            # a deadline around this call (a connection's set-up) bounds it too, restored after
            if slot is not None:
                if timed:  # an execute: its context carries the connection's options
                    option = args[-1].execution_options.get(CALL_TIMEOUT, slot)
                    if option is not slot:
                        slot.own_call = _own_call(option)  # until the connection is returned
                own = slot.own_call
                outer = slot.arm(call if own < 0 else own)
            else:
                outer, own = 0.0, -1.0
            t0 = clock() if slow_call is not None else 0.0
            # the start for the limiter (arm() read the clock); a set-up call is not sampled
            began = -1.0 if sample is None or outer else slot.armed_at if slot else _mono()
            tel = r.exec_timer if timed else None
            started = _perf() if tel is not None else 0.0
            try:
                result = original(*args)
            except BaseException:
                if tel is not None:  # telemetry's handle_error records it with its error
                    with contextlib.suppress(AttributeError, TypeError):
                        args[-1]._rdb_t0 = started
                raise
            finally:
                if slot is not None:
                    slot.deadline = outer  # Slot.disarm(outer), inlined: the hot path
            if tel is not None:
                tel.operations.add(_perf() - started)
            if slot is not None and slot.fired:  # Slot.returned(), inlined
                slot.returned()
            if began >= 0.0 and own < 0 and sample is not None:  # own < 0: not long work
                now = _mono()
                sample(now - began, now)
            if slow_call is not None and clock() - t0 > slow_call:
                rec = _compat.record_of(args[at])
                if rec is not None:
                    slow(r, conn_state(rec))
            return result

        return guarded

    for name in ("do_execute", "do_executemany", "do_execute_no_params"):
        setattr(dialect, name, guard(getattr(dialect, name), timed=True))
    dialect.do_commit = guard(dialect.do_commit)
    dialect.do_rollback = guard(dialect.do_rollback, rollback=True)


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
        own = slot.own_call
        outer = slot.arm(self._rdb_call if own < 0 else own)
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


def guard_server_side_cursors(dialect: Any, call: float) -> None:
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
        st = _compat.context_state(self)
        slot = st.slot if st is not None else None
        return cursor if slot is None else _DeadlineCursor(cursor, slot, call)

    dialect.execution_ctx_cls = type(
        f"Resilient{base.__name__}",
        (base,),
        {"create_server_side_cursor": create_server_side_cursor, "_rdb_guarded": True},
    )
