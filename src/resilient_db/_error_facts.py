"""What an error says, read through its chain: SQLSTATE, MySQL errno and message text.

Used by :mod:`resilient_db.classify`, which decides on what these read. The chain
(the error, its causes and contexts) is walked by :func:`resilient_db.errors.chain`.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import exc as sa_exc

from . import _classify_rules as _table
from .errors import chain as _chain

__all__ = [
    "dns_for_now",
    "find_code",
    "is_database_error",
    "is_mysql",
    "is_python_level",
    "message",
    "mysql_errno",
    "sqlstate",
]


def is_mysql(e: BaseException) -> bool:
    """True for an error of a MySQL / MariaDB driver."""
    return type(e).__module__.startswith(_table.MYSQL_MODULES)


def sqlstate(e: BaseException) -> str | None:
    """A PostgreSQL SQLSTATE. MySQL errors carry one too (PyMySQL >= 1.2), but it is
    coarse (1044, 1064 and 1142 all say 42000; 1213 says 40001) and means something
    else in PostgreSQL's table, so for them the errno is the only signal."""
    if is_mysql(e):
        return None
    for attr in ("sqlstate", "pgcode"):
        value = getattr(e, attr, None)
        if isinstance(value, str) and len(value) == 5:
            return value
    return None


def mysql_errno(e: BaseException) -> int | None:
    """The MySQL / MariaDB errno of ``e`` itself."""
    if not is_mysql(e):
        return None
    if e.args and isinstance(e.args[0], int):
        return e.args[0]
    return None


def message(exc: BaseException) -> str:
    """The chain's messages in lower case (SQLAlchemy's statement wrappers skipped)."""
    parts = []
    for e in _chain(exc):
        if isinstance(e, sa_exc.StatementError):
            continue
        try:
            parts.append(str(e))
        except Exception:  # a broken __str__ must not break classification
            parts.append(type(e).__name__)
    return " | ".join(parts).lower()


_DRIVER_MODULES = (*_table.PG_SQLITE_MODULES, *_table.MYSQL_MODULES)


def is_database_error(exc: BaseException) -> bool:
    """True when a driver, SQLAlchemy's DBAPI wrapper or the OS raised (part of) ``exc``.

    Message text is only read for these: an application's own ``ValueError("... does
    not exist")`` or ``KeyError("timed out")`` must stay UNKNOWN and never be retried.
    """
    return any(
        isinstance(e, (sa_exc.DBAPIError, OSError))
        or type(e).__module__.startswith(_DRIVER_MODULES)
        for e in _chain(exc)
    )


def find_code(exc: BaseException) -> tuple[str | None, int | None]:
    """The most specific SQLSTATE (skipping class 08 wrappers) and MySQL errno."""
    states: list[str] = []
    num: int | None = None
    for e in _chain(exc):
        s = sqlstate(e)
        if s is not None:
            states.append(s)
        if num is None:
            num = mysql_errno(e)
    specific = [s for s in states if not s.startswith("08")]
    if specific:
        return specific[0], num
    return (states[0] if states else None), num


def dns_for_now(exc: BaseException) -> bool:
    """True when the resolver failed for now (EAI_AGAIN), not the name."""
    text = message(exc)
    return "temporary failure" in text or "errno -3]" in text


def is_python_level(exc: BaseException) -> bool:
    """True when the chain holds a non-DBAPI error (bare socket errors, pool timeouts)."""
    return any(
        isinstance(e, (OSError, sa_exc.TimeoutError, asyncio.CancelledError, KeyboardInterrupt))
        for e in _chain(exc)
    )
