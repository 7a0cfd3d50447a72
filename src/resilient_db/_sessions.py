"""A silent call on a database that answers: ask the server whether its reply left.

The probe (:mod:`._probe`) tells a silent database from a slow call: when the
server answers a fresh connection, the silent calls are taken to be legitimate
(a long query, a lock wait) and run on to their own deadline. One case hides
there: the server finished the call and sent its reply, and the reply never
arrived, because that one flow died on the way (a NAT, firewall or load
balancer dropped its state) while new connections get through. The caller
would wait for the whole call deadline, and a COMMIT in flight would hold its
caller that long.

So when the probe gets an answer and a call has been silent for
:data:`STUCK_AFTER` seconds, the engine logs in on a fresh connection and asks
the server about those calls' own sessions (PostgreSQL: ``pg_stat_activity`` by
backend pid; MariaDB/MySQL: ``information_schema.PROCESSLIST`` by connection id,
both limited to the engine's own user). A session that went idle at least
:data:`IDLE_FOR` seconds ago, after its call began, has nothing more to send:
that call is cut at once with an explained error (a COMMIT in flight is an
ambiguous commit, never "not committed"). A session still running its statement
is left alone, and so is one the server does not show (it may sit behind a
connection pooler whose ids are not the server's): nothing is cut on a guess.
Only the synchronous drivers that report their session's id take part:
psycopg (3 and 2) and PyMySQL.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import Any

from ._watchdog import WATCHDOG, socket_fileno

__all__ = ["DRIVERS", "IDLE_FOR", "STUCK_AFTER", "idle_sessions", "session_id", "session_params"]

logger = logging.getLogger("resilient_db.probe")

#: seconds a call must have been silent before its session is looked up
STUCK_AFTER = 2.0
#: seconds its session must have been idle: its reply left the server that long ago
IDLE_FOR = 1.0
#: the drivers whose connections report their session's id to the engine
DRIVERS = frozenset({"psycopg", "psycopg2", "pymysql"})

_PG = (
    "SELECT pid, state IN ('idle', 'idle in transaction', 'idle in transaction (aborted)'),"
    " EXTRACT(EPOCH FROM clock_timestamp() - state_change),"
    " EXTRACT(EPOCH FROM clock_timestamp() - query_start)"
    " FROM pg_stat_activity"
    " WHERE pid = ANY(%s) AND usename = current_user AND datname = current_database()"
)
# TIME counts whole seconds in the current state; a Sleep's began when the reply left
_MYSQL = (
    "SELECT ID, COMMAND = 'Sleep', TIME, TIME FROM information_schema.PROCESSLIST"
    " WHERE USER = SUBSTRING_INDEX(USER(), '@', 1) AND ID IN ({})"
)


def session_id(driver: Any) -> int | None:
    """The server's id of a driver connection's session, or None.

    The PostgreSQL backend pid (psycopg 3 and 2) or the MySQL connection id
    (PyMySQL), as the server announced it at login.
    """
    pid = getattr(getattr(driver, "info", None), "backend_pid", None)  # psycopg 3 and 2
    if isinstance(pid, int) and pid > 0:
        return pid
    thread_id = getattr(driver, "thread_id", None)  # PyMySQL
    if callable(thread_id):
        try:
            tid = thread_id()
        except Exception:
            return None
        return tid if isinstance(tid, int) and tid > 0 else None
    return None


def session_params(driver: str, cparams: dict[str, Any], budget: float) -> dict[str, Any]:
    """The engine's connect parameters, with a connect timeout of ``budget`` seconds."""
    params = dict(cparams)
    if driver == "pymysql":
        params["connect_timeout"] = budget
    else:  # libpq: whole seconds, at least 2
        params["connect_timeout"] = max(2, math.ceil(budget))
    return params


def idle_sessions(
    dialect: str, connect: Callable[[], Any], silent: dict[int, float], budget: float
) -> dict[int, float]:
    """Which of the ``silent`` sessions are idle on the server: id -> seconds idle.

    ``silent`` maps each session id to how long its call has been silent.
    ``connect`` opens a fresh DBAPI connection; the lookup runs under a
    watchdog deadline of ``budget`` seconds. A session counts when it went
    idle at least :data:`IDLE_FOR` seconds ago and its last statement began
    no earlier than its call (one second of slack). Any failure gives no
    verdict at all.
    """
    if not silent:
        return {}
    ids = sorted(silent)
    conn: Any = None
    try:
        conn = connect()
        slot = WATCHDOG.slot(lambda: socket_fileno(conn))
        slot.arm(budget)
        try:
            cur = conn.cursor()
            if dialect == "postgresql":
                cur.execute(_PG, (ids,))
            else:
                cur.execute(_MYSQL.format(", ".join(["%s"] * len(ids))), ids)
            rows = cur.fetchall()
        finally:
            slot.disarm(0.0)
    except Exception as e:  # the class only: a driver's message may quote its DSN
        logger.debug("the session lookup failed: %s", type(e).__name__)
        return {}
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
    idle: dict[int, float] = {}
    for sid, is_idle, idle_for, since_statement in rows:
        if not is_idle or idle_for is None or since_statement is None:
            continue
        idle_for, since_statement = float(idle_for), float(since_statement)
        wait = silent.get(int(sid))
        if wait is None:
            continue
        # MySQL's TIME is whole seconds: one more, so a Sleep counted is IDLE_FOR long
        needed = IDLE_FOR if dialect == "postgresql" else IDLE_FOR + 1
        if idle_for >= needed and since_statement <= wait + 1.0:
            idle[int(sid)] = idle_for
    return idle
