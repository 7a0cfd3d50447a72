"""In-process fault injection: make the next N connects or executes fail.

No server, proxy or monkeypatching needed, so it works for every dialect,
SQLite included::

    from resilient_db.testing import FaultInjector

    inject = FaultInjector(engine)
    inject.fail_connects(3, "refused")                  # the real driver error
    inject.fail_executes(1, "deadlock", match="INSERT")  # only INSERT statements

Everything goes through SQLAlchemy's own extension points, so an injected
error travels the same path as a real one: classification, the
:class:`~resilient_db.ErrorContext`, breaker accounting and retries.

- **Connects.** On a resilient engine the injector registers a fault hook that
  :func:`resilient_db._connect.connect` consults
  before each attempt, so an injected connect error is retried, counted and
  explained exactly like a refused TCP connection (``fail_connects(2)`` is
  absorbed by the default three attempts). A ``do_connect`` listener that
  raised would bypass that retry loop. On a plain SQLAlchemy engine the
  injector uses a ``do_connect`` listener (inserted first).
- **Executes.** The dialect's ``do_execute`` / ``do_executemany`` /
  ``do_execute_no_params`` listeners raise the error inside SQLAlchemy's
  execute ``try`` block (on every SQLAlchemy 2.x; ``before_cursor_execute``
  runs outside it on 2.0), so SQLAlchemy wraps it in its own exception class
  and runs ``handle_error``. For connection-loss kinds a
  second ``handle_error`` listener sets ``is_disconnect`` so the pool
  discards the connection, as it would after a real disconnect.

Errors are the real DBAPI classes of the engine's driver, built by
:func:`driver_error` with the errno, SQLSTATE and message text the driver
produces for that fault (``pymysql.err.OperationalError(2003, ...)``,
``psycopg.errors.DeadlockDetected``, ``sqlite3.OperationalError("database is
locked")``...). Commit-time faults (an ambiguous commit) cannot be injected in
process: use :class:`~resilient_db.testing.FaultProxy`'s
``drop_commit_reply()``.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeAlias

from sqlalchemy import event

from .._compat import run_awaitable
from ._driver_errors import driver_error, error_kinds, sync_engine

__all__ = ["ErrorSpec", "FaultInjector", "driver_error", "error_kinds"]

ErrorSpec: TypeAlias = "str | Callable[[], BaseException]"
"""A fault kind for :func:`driver_error` (``"refused"``) or a zero-argument
factory returning a fresh exception for each injected failure."""

# kinds after which the connection is unusable: the pool must discard it
_DISCONNECTS = frozenset(
    {"disconnect", "admin_terminated", "server_shutdown", "idle_timeout", "read_timeout"}
)


@dataclass
class _Rule:
    """One armed fault: the next ``remaining`` matching calls fail."""

    remaining: int | None
    factory: Callable[[], BaseException]
    disconnect: bool
    match: re.Pattern[str] | None
    delay: float


class FaultInjector:
    """Make the next N connects or statement executions of one engine fail.

    Works on :class:`sqlalchemy.engine.Engine` and ``AsyncEngine`` (resilient
    or plain). Rules queue up in the order they were armed; each injected
    failure consumes one from the first rule that matches. Create the injector
    after :func:`resilient_db.wrap` so connect faults take the resilient path.
    Use it as a context manager, or call :meth:`close`, to remove its
    listeners.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = sync_engine(engine)
        self._is_async = bool(getattr(self.engine.dialect, "is_async", False))
        self._lock = threading.Lock()
        self._connect_rules: list[_Rule] = []
        self._execute_rules: list[_Rule] = []
        self._disconnects: dict[int, BaseException] = {}
        self.connects_failed = 0
        """Connect attempts failed by the injector so far."""
        self.executes_failed = 0
        """Statement executions failed by the injector so far."""
        self._resilience: Any = None
        self._closed = False
        try:
            from ..engine import resilience_of

            self._resilience = resilience_of(self.engine)
        except Exception:
            self._resilience = None
        if self._resilience is not None:
            self._resilience.connect_faults.append(self._connect_fault)
        else:
            event.listen(self.engine, "do_connect", self._do_connect, insert=True)
        for name, listener in self._execute_listeners():
            event.listen(self.engine, name, listener)
        event.listen(self.engine, "handle_error", self._handle_error)

    # -- arming ------------------------------------------------------------------

    def fail_connects(
        self, n: int | None = 1, error: ErrorSpec = "refused", *, delay: float = 0.0
    ) -> None:
        """Make the next ``n`` connect attempts raise ``error`` (``None``: until cleared).

        ``error`` is a kind for :func:`driver_error` or a factory returning a
        fresh exception. ``delay`` seconds pass before each failure, as for a
        connect timeout.
        """
        rule = self._rule(n, error, None, delay)
        with self._lock:
            self._connect_rules.append(rule)

    def fail_executes(
        self,
        n: int | None = 1,
        error: ErrorSpec = "disconnect",
        *,
        match: str | re.Pattern[str] | None = None,
        delay: float = 0.0,
    ) -> None:
        """Make the next ``n`` statement executions raise ``error`` (``None``: until cleared).

        ``match`` restricts the fault to statements containing that text
        (case-insensitive) or matching that compiled regular expression.
        ``delay`` seconds pass before each failure (a hung server). The
        connection is discarded afterwards for connection-loss kinds
        (``disconnect``, ``admin_terminated``, ...), as after the real fault.
        """
        if isinstance(match, str):
            pattern: re.Pattern[str] | None = re.compile(re.escape(match), re.IGNORECASE)
        else:
            pattern = match
        rule = self._rule(n, error, pattern, delay)
        with self._lock:
            self._execute_rules.append(rule)

    def clear(self) -> None:
        """Disarm every pending fault; counters are kept."""
        with self._lock:
            self._connect_rules.clear()
            self._execute_rules.clear()

    @property
    def pending(self) -> bool:
        """True while some armed fault has not fired yet."""
        with self._lock:
            return bool(self._connect_rules or self._execute_rules)

    def close(self) -> None:
        """Disarm everything and remove the injector's listeners and hook."""
        if self._closed:
            return
        self._closed = True
        self.clear()
        if self._resilience is not None:
            faults = self._resilience.connect_faults
            if self._connect_fault in faults:
                faults.remove(self._connect_fault)
        else:
            event.remove(self.engine, "do_connect", self._do_connect)
        for name, listener in self._execute_listeners():
            event.remove(self.engine, name, listener)
        event.remove(self.engine, "handle_error", self._handle_error)

    def __enter__(self) -> FaultInjector:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<FaultInjector {self.engine.dialect.name} connects_failed={self.connects_failed} "
            f"executes_failed={self.executes_failed} pending={self.pending}>"
        )

    # -- internals ---------------------------------------------------------------

    def _rule(
        self, n: int | None, error: ErrorSpec, match: re.Pattern[str] | None, delay: float
    ) -> _Rule:
        if self._closed:
            raise RuntimeError("this FaultInjector was closed")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"n must be a positive int or None, got {n!r}")
        if not isinstance(delay, (int, float)) or delay < 0:
            raise ValueError(f"delay must be >= 0 seconds, got {delay!r}")
        if isinstance(error, str):
            kind = error
            driver_error(self.engine, kind)  # fail now, not at the first connect
            engine = self.engine

            def factory() -> BaseException:
                return driver_error(engine, kind)

            disconnect = kind in _DISCONNECTS
        elif callable(error):
            factory, disconnect = error, False
        else:
            raise TypeError("error must be a fault kind (str) or a callable returning one")
        return _Rule(n, factory, disconnect, match, float(delay))

    def _take(self, rules: list[_Rule], statement: str | None) -> _Rule | None:
        with self._lock:
            for i, rule in enumerate(rules):
                if rule.match is not None and (
                    statement is None or not rule.match.search(statement)
                ):
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        del rules[i]
                return rule
        return None

    def _wait(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self._is_async:
            run_awaitable(asyncio.sleep(seconds))
        else:
            time.sleep(seconds)

    def _connect_fault(self) -> None:
        """Called by Resilience.connect before each attempt; raises when armed."""
        if not self._connect_rules:
            return
        rule = self._take(self._connect_rules, None)
        if rule is None:
            return
        self._wait(rule.delay)
        exc = rule.factory()
        with self._lock:
            self.connects_failed += 1
        raise exc

    def _do_connect(self, dialect: Any, rec: Any, cargs: Any, cparams: Any) -> None:
        self._connect_fault()

    def _execute_listeners(self) -> tuple[tuple[str, Callable[..., None]], ...]:
        return (
            ("do_execute", self._do_execute),
            ("do_executemany", self._do_execute),
            ("do_execute_no_params", self._do_execute_no_params),
        )

    def _do_execute(self, cursor: Any, statement: str, parameters: Any, context: Any) -> None:
        self._execute_fault(statement)

    def _do_execute_no_params(self, cursor: Any, statement: str, context: Any) -> None:
        self._execute_fault(statement)

    def _execute_fault(self, statement: str) -> None:
        """Called inside SQLAlchemy's execute ``try`` block; raises when armed."""
        if not self._execute_rules:
            return
        rule = self._take(self._execute_rules, statement)
        if rule is None:
            return
        self._wait(rule.delay)
        exc = rule.factory()
        with self._lock:
            self.executes_failed += 1
            if rule.disconnect:
                self._disconnects[id(exc)] = exc
        raise exc

    def _handle_error(self, ctx: Any) -> None:
        if not self._disconnects:
            return
        with self._lock:
            exc = self._disconnects.pop(id(ctx.original_exception), None)
        if exc is not None and exc is ctx.original_exception:
            ctx.is_disconnect = True
