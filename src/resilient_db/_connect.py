"""The connect sequence: one attempt, the retries that are safe, the session set-up.

:func:`connect` is what the engine's ``do_connect`` listener runs for every new
DBAPI connection: injected faults first (:class:`resilient_db.testing.FaultInjector`),
then the host (chosen by failover for a multi-host engine), then, after a
failure, the retry loop with backoff for failures classified as safe to retry
at connect, while the breaker stays closed. The final failure carries its
:class:`~resilient_db.ErrorContext` and is counted by the breaker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import exc as sa_exc

from . import _backoff, _compat
from ._admission import circuit_open
from ._driver_args import lock_wait_seconds
from ._events import RetryScheduled
from ._state import EXITS, Resilience
from ._translate import connect_failure
from .breaker import CLOSED, OPEN, Rejected
from .classify import Classification, Kind, RetryLevel, Target, classify
from .errors import attach

__all__ = [
    "connect",
    "connect_with",
    "is_driver_error",
    "mariadb_session",
    "open_connection",
    "opener",
]


def connect(
    r: Resilience,
    dialect: Any,
    cargs: Any,
    cparams: Any,
    rec: Any = None,
    later: Sequence[Callable[..., Any]] = (),
) -> Any:
    """Open a DBAPI connection, retrying what is safe to retry (``rec``: the pool record).

    ``later``: the engine's ``do_connect`` listeners registered after resilient_db's,
    run by each attempt before the driver's connect, on copies of ``cargs`` and
    ``cparams`` (one that returns a connection makes that attempt's connection).
    """

    def attempt() -> Any:
        ca, cp = (list(cargs), dict(cparams)) if later else (cargs, cparams)
        for fn in later:
            conn = fn(dialect, rec, ca, cp)
            if conn is not None:
                return conn
        if r.failover is not None:  # a multi-host engine picks the host (failover.py)
            return r.failover.connect(dialect, ca, cp, opener(r), rec)
        return open_connection(r, dialect, ca, cp)

    return connect_with(r, dialect, attempt)


def connect_with(r: Resilience, dialect: Any, attempt: Callable[[], Any]) -> Any:
    """Run connect attempts until one succeeds or retrying is no longer safe.

    The engine's own connect (:func:`connect`) or a ``creator=`` function.
    """
    if r.monitor is not None and r.monitor.probing:
        _await_verdict(r)  # do not connect into a database that may have gone silent
    start = r.clock()
    try:
        return _connect_once(r, attempt)
    except EXITS:
        raise
    except BaseException as e:
        error = e
    # outside the except block, so a later attempt's error is not chained to this one
    return _connect_retrying(r, dialect, attempt, error, start)


def _connect_once(r: Resilience, attempt: Callable[[], Any]) -> Any:
    """One connect attempt: injected faults first, then the attempt itself."""
    r.connect_attempts += 1
    for fault in r.connect_faults:
        fault()
    return attempt()


def is_driver_error(dialect: Any, error: BaseException) -> bool:
    """True for an error of the driver or the network, False for a program's own.

    A ``TypeError`` from a bad ``connect_args`` key or an application's exception
    raised in its ``do_connect`` listener is not a database failure: it passes
    through unchanged, without retries and without counting for the breaker.
    """
    if isinstance(error, (sa_exc.SQLAlchemyError, OSError, asyncio.TimeoutError)):
        return True
    dbapi = getattr(dialect, "loaded_dbapi", None)
    base = getattr(dbapi, "Error", None)
    if isinstance(base, type) and isinstance(error, base):
        return True
    # asyncpg raises its own exceptions at connect, outside the DBAPI adapter's classes
    driver = str(getattr(dialect, "driver", "") or "").lower()
    return bool(driver) and type(error).__module__.split(".")[0].lower() == driver


def opener(r: Resilience) -> Callable[[Any, Any, Any], Any]:
    """:func:`open_connection` for ``r``, as failover's per-host connect calls it."""

    def open_(dialect: Any, cargs: Any, cparams: Any) -> Any:
        return open_connection(r, dialect, cargs, cparams)

    return open_


def open_connection(r: Resilience, dialect: Any, cargs: Any, cparams: Any) -> Any:
    """The driver's connect, with PyMySQL's greeting bounded by the connect timeout."""
    if not r.pymysql:
        return dialect.connect(*cargs, **cparams)
    from ._pymysql import Connection  # PyMySQL without a CA bundle per connection

    handshake = cparams.get("connect_timeout")
    read = cparams.get("read_timeout")
    if not handshake or (read is not None and read <= handshake):
        return Connection(*cargs, **cparams)
    # PyMySQL reads the server greeting with read_timeout, not connect_timeout: bound
    # the handshake by the connect timeout, then restore the caller's read_timeout (none
    # by default: the watchdog bounds the calls; the socket leaves timeout mode at the
    # first read)
    conn = Connection(*cargs, **{**cparams, "read_timeout": handshake})
    conn._read_timeout = read
    return conn


def _connect_retrying(
    r: Resilience,
    dialect: Any,
    attempt_fn: Callable[[], Any],
    error: BaseException,
    start: float,
) -> Any:
    """The retry loop, entered only after a first attempt failed."""
    policy = r.policy.retry
    # getting a connection is bounded by Timeouts.checkout: no attempt starts after it, and
    # after a connect timeout none that could not end (pause + its own timeout) within it
    budget = min(policy.deadline, r.policy.timeouts.checkout)
    attempt_s = r.policy.timeouts.connect or 0.0
    history: list[str] = []
    attempt = 1
    while True:
        if not is_driver_error(dialect, error):
            raise error  # the program's own error: unchanged, not retried, not counted
        # a multi-host engine's attempt names the host it tried (failover.TARGET_ATTR)
        tried = getattr(error, "resilient_db_target", None)
        t = tried if isinstance(tried, Target) else r.target
        c = classify(error, phase="connect", target=t)
        if c.kind is Kind.CONNECT_TIMEOUT and r.monitor is not None:
            note = r.monitor.reachable_note(time.monotonic())
            if note is not None:  # a probe found the server answering: slow, not gone
                c = dataclasses.replace(c, diagnosis=f"{c.diagnosis} {note}")
        history.append(f"{c.kind.value}:{c.code}" if c.code else c.kind.value)
        b = r.breaker
        if b is not None and c.counts_for_breaker:
            _count(r, c)
        elapsed = r.clock() - start
        pause = _backoff.backoff(policy, attempt)
        if (
            c.retry is RetryLevel.CONNECT
            and attempt < policy.attempts
            and elapsed + pause < budget
            and (c.kind is not Kind.CONNECT_TIMEOUT or elapsed + pause + attempt_s <= budget)
            and (b is None or b.state is CLOSED)
        ):
            r.events.emit(RetryScheduled(r.name, "connect", c, attempt, pause))
            _sleep(r, pause)
            attempt += 1
            try:
                return _connect_once(r, attempt_fn)
            except EXITS:
                raise
            except BaseException as e:
                error = e
            continue
        ctx = r.context(
            c, phase="connect", attempt=attempt, elapsed=elapsed, history=tuple(history), target=t
        )
        r.record_error(c, ctx)
        attach(error, ctx)
        raised = connect_failure(dialect, error, ctx)
        if raised is error:
            raise error
        raise raised from error  # a bare socket error (asyncpg): OperationalError


#: A connect closed or killed during the handshake: the server (or a proxy) answered.
_LOST_IN_HANDSHAKE = frozenset({Kind.DISCONNECT, Kind.ADMIN_TERMINATED, Kind.READ_TIMEOUT})


def _count(r: Resilience, c: Classification) -> None:
    """Count a failed connect for the breaker, or let a probe judge it.

    A connect that timed out may have met a slow server (a brownout: every reply
    late), and one closed or killed during the handshake met a server that
    answered (a reset by a proxy, sessions killed by an operator while the pool
    reconnected): when the server can be probed, these only raise suspicion, and
    the probe's verdict decides (no answer trips the breaker, an answer counts
    nothing). Refusals, too many connections, a server shutting down and DNS
    failures count, and so does a half-open trial connect that was closed.
    """
    m = r.monitor
    b = r.breaker
    assert b is not None
    if (
        m is not None
        and m.can_probe
        and (c.kind is Kind.CONNECT_TIMEOUT or (c.kind in _LOST_IN_HANDSHAKE and b.state is CLOSED))
    ):
        m.suspect(time.monotonic())
        return
    b.record_failure(c.diagnosis)


def _await_verdict(r: Resilience) -> None:
    """A probe is out: wait for its verdict (at most its budget), then connect or be rejected."""
    m = r.monitor
    limit = m.verdict_within()
    if r.is_async:  # never block the event loop: poll
        end = time.monotonic() + limit
        while m.probing and time.monotonic() < end:
            _compat.run_awaitable(asyncio.sleep(0.02))
    else:
        m.wait(limit)
    b = r.breaker
    if b is not None and b.state is OPEN:  # the probe found it silent
        raise circuit_open(r, Rejected(OPEN, b.retry_in()))


def _sleep(r: Resilience, seconds: float) -> None:
    if r.is_async:
        _compat.run_awaitable(_backoff.async_sleep(seconds))
    else:
        _backoff.sleep(seconds)


def mariadb_session(r: Resilience) -> Callable[[Any, Any], None]:
    """Pool ``connect`` listener: MariaDB's statement timeout and InnoDB's lock wait.

    ``max_statement_time`` (MariaDB) is ``Timeouts.statement``;
    ``innodb_lock_wait_timeout`` half of it, so a lock wait ends as a retryable
    ``lock_timeout`` first. A setting the caller's own ``init_command`` makes
    wins: this listener runs after it and leaves that variable alone.
    """

    def listener(dbapi_connection: Any, record: Any) -> None:
        statement = r.policy.timeouts.statement
        if statement is None:
            return
        assignments = []
        if getattr(r.dialect, "is_mariadb", False) and not _init_command_sets(
            dbapi_connection, "max_statement_time"
        ):
            assignments.append(f"max_statement_time = {float(statement):g}")
        if not _init_command_sets(dbapi_connection, "innodb_lock_wait_timeout"):
            assignments.append(f"innodb_lock_wait_timeout = {lock_wait_seconds(statement)}")
        if not assignments:
            return
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SET SESSION " + ", ".join(assignments))
        finally:
            cursor.close()

    return listener


def _init_command_sets(dbapi_connection: Any, name: str) -> bool:
    """True when the connection's ``init_command`` (PyMySQL, aiomysql) mentions ``name``."""
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    command = getattr(driver, "init_command", None)
    if isinstance(command, bytes):
        command = command.decode("utf-8", "replace")
    return isinstance(command, str) and name in command.lower()
