"""Attach one engine's resilience to a real SQLAlchemy engine, in a fixed order.

All through SQLAlchemy's own extension points:

1. the pool admits checkouts through the breaker and the bulkhead (:mod:`._admission`);
2. ``do_connect`` runs the connect sequence (:mod:`._connect`) and gives a new
   connection its watchdog slot (:mod:`._deadline`);
3. ``handle_error`` classifies every error once (:mod:`._handle_error`);
4. the breaker's state changes become events (:mod:`._events`), to which the
   log records and then telemetry subscribe (:mod:`.telemetry`);
5. ``connect`` listeners set MariaDB's session timeout, then end the set-up deadline;
6. the dialect's driver calls run under the call deadline (and are sampled by the
   adaptive concurrency limit, :mod:`._limit`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from . import _compat
from ._admission import install_pool
from ._connect import connect, connect_with, mariadb_session, open_connection
from ._deadline import (
    SETTING_UP,
    guard_calls,
    guard_server_side_cursors,
    on_connect,
    watch_connection,
)
from ._events import (
    BreakerRelay,
    ConnectCancelled,
    Connected,
    ConnectFailed,
    ConnectStarted,
)
from ._handle_error import handle_error
from ._probe import Monitor
from ._state import Resilience
from .errors import error_context

__all__ = ["install"]


def _new_connection(r: Resilience, rec: Any, open_: Callable[[], Any]) -> Any:
    """Run one connect sequence ``open_`` (with its span) and give the result its slot."""
    SETTING_UP.set(None)  # an earlier set-up in this context that failed is over
    conn = open_() if not r.events.get(ConnectStarted) else _reported(r, open_)
    r.answered()
    if r.watch:  # before the pool's connect listeners: they run the set-up queries
        watch_connection(r, conn, rec)
    return conn


def _reported(r: Resilience, open_: Callable[[], Any]) -> Any:
    """Run ``open_`` between a ConnectStarted event and its outcome's event."""
    events = r.events
    events.emit(ConnectStarted(r.name))
    try:
        conn = open_()
    except Exception as e:
        events.emit(ConnectFailed(r.name, error_context(e)))
        raise
    except BaseException:
        events.emit(ConnectCancelled(r.name))
        raise
    events.emit(Connected(r.name))
    return conn


def install(engine: Engine, r: Resilience) -> None:
    """Attach ``r`` to ``engine``: pool admission, event listeners, call deadline."""
    # OpenTelemetry's API loads with the first engine, not with `import resilient_db`
    from .telemetry import attach as attach_telemetry
    from .telemetry.logs import EngineLog

    install_pool(engine.pool, r)
    if r.watch and r.policy.breaker.probe_after is not None:
        r.monitor = Monitor(r, open_connection)

    def do_connect(d: Any, rec: Any, ca: Any, cp: Any) -> Any:
        # the application's listeners registered after this one (after wrap()) run
        # first, in each attempt: SQLAlchemy stops at the connection returned here
        later = _compat.listeners_after(d, "do_connect", do_connect)
        conn = _new_connection(r, rec, lambda: connect(r, d, ca, cp, rec, later))
        m = r.monitor
        if m is not None:  # the database answers; a MySQL probe logs in with these
            m.connect_args = (d, ca, cp)  # and a session lookup (_sessions.py)
            m.unreachable = None
        return conn

    event.listen(engine, "do_connect", do_connect)
    if not _compat.has_engine_creator(engine.pool):
        # creator= connects past do_connect: the same connect sequence around it
        dialect = engine.dialect

        def creator(invoke: Callable[[Any], Any], rec: Any) -> Any:
            return _new_connection(r, rec, lambda: connect_with(r, dialect, lambda: invoke(rec)))

        _compat.wrap_creator(engine.pool, creator)
    event.listen(engine, "handle_error", handle_error(r))
    if r.breaker is not None:
        r.breaker.listeners.append(BreakerRelay(r.name, r.events))
    EngineLog(r).subscribe()  # log records
    attach_telemetry(engine, r)  # metrics and spans (no-ops until an SDK is set)
    if engine.dialect.name in ("mysql", "mariadb") and r.policy.timeouts.statement is not None:
        # after SQLAlchemy's first-connect listener, which sets dialect.is_mariadb
        event.listen(engine, "connect", mariadb_session(r))
    call = r.policy.timeouts.call
    if r.watch and call is not None:
        # the last connect listener: it disarms the set-up deadline do_connect armed
        event.listen(engine, "connect", on_connect(r))
        if engine.dialect.supports_server_side_cursors:
            guard_server_side_cursors(engine.dialect, call)
    if r.watch or r.slow_call is not None or r.limit is not None:
        guard_calls(engine.dialect, r)
