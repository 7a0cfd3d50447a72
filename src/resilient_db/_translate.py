"""The one place where a driver's or the network's error becomes the error users catch.

SQLAlchemy already wraps a DBAPI error in its own class (``OperationalError``,
``InterfaceError``...). What it leaves is translated here, so that
``except sqlalchemy.exc.OperationalError`` catches the same faults on every driver
(docs/async.md):

- a bare network error at connect (asyncpg raises ``OSError`` / ``TimeoutError``
  itself): :func:`connect_failure`;
- on an async engine, a call error asyncpg raised bare or as ``InterfaceError``
  (a connection the server closed, the watchdog's shot): :func:`call_failure`;
- a COMMIT whose outcome is unknown: :func:`ambiguous_commit`;
- aiomysql's connect cut at the connect timeout, raised as PyMySQL raises the same
  fault, so that :func:`resilient_db.classify` reads both alike:
  :func:`aiomysql_connect_timeout`.

Each result carries the :class:`~resilient_db.ErrorContext` the caller built.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import exc as sa_exc

from .classify import Kind
from .errors import AmbiguousCommitError, ErrorContext, attach

__all__ = [
    "aiomysql_connect_timeout",
    "ambiguous_commit",
    "call_failure",
    "connect_failure",
    "operational",
]

# kinds meaning the server or the network closed the connection
_GONE = frozenset(
    k.value
    for k in (Kind.DISCONNECT, Kind.ADMIN_TERMINATED, Kind.SERVER_SHUTDOWN, Kind.IDLE_TIMEOUT)
)


def operational(
    orig: BaseException,
    ectx: ErrorContext,
    *,
    statement: str | None = None,
    invalidated: bool = False,
) -> sa_exc.OperationalError:
    """``orig`` as :class:`sqlalchemy.exc.OperationalError` with ``ectx`` (no parameters)."""
    wrapped = sa_exc.OperationalError(
        statement, None, orig, hide_parameters=True, connection_invalidated=invalidated
    )
    attach(wrapped, ectx)
    return wrapped


def connect_failure(dialect: Any, error: BaseException, ectx: ErrorContext) -> BaseException:
    """What a failed connect raises: the driver's or SQLAlchemy's error as it is, a bare
    network error (asyncpg) as ``OperationalError``. ``error`` already carries ``ectx``."""
    if isinstance(error, (dialect.loaded_dbapi.Error, sa_exc.SQLAlchemyError)) or not (
        isinstance(error, Exception)
    ):
        return error
    return operational(error, ectx)


def call_failure(ctx: Any, found: BaseException, ectx: ErrorContext) -> BaseException | None:
    """The ``OperationalError`` for an async engine's call error in another shape, or None.

    ``ctx`` is SQLAlchemy's ``ExceptionContext``, ``found`` the error it raises,
    ``ectx`` the context resilient_db's ``handle_error`` attached to it.
    """
    orig: BaseException = ctx.original_exception
    timed_out = ectx.kind == Kind.READ_TIMEOUT.value
    if (
        (ctx.sqlalchemy_exception is None and isinstance(orig, (OSError, asyncio.TimeoutError)))
        # the watchdog's shot: asyncpg says "connection was closed", a generic DBAPIError
        or (timed_out and not isinstance(found, sa_exc.OperationalError))
        # a connection the server closed: asyncpg's "connection is closed" is an
        # InterfaceError, where the other drivers raise OperationalError (docs/async.md)
        or (ectx.kind in _GONE and isinstance(found, sa_exc.InterfaceError))
    ):
        return operational(orig, ectx, statement=ctx.statement, invalidated=bool(ctx.is_disconnect))
    return None


def ambiguous_commit(
    engine: str, diagnosis: str, orig: BaseException, ectx: ErrorContext
) -> AmbiguousCommitError:
    """A COMMIT lost in flight: :class:`~resilient_db.AmbiguousCommitError`, caused by ``orig``."""
    return AmbiguousCommitError(
        f"Engine '{engine}': {diagnosis} (cause: {type(orig).__name__})",
        ectx,
        orig=orig if isinstance(orig, Exception) else None,
    )


def aiomysql_connect_timeout(host: str) -> BaseException:
    """aiomysql's connect cut at the connect timeout, as PyMySQL reports the same fault."""
    import aiomysql

    error: BaseException = aiomysql.OperationalError(
        2003, f"Can't connect to MySQL server on {host!r} (timed out)"
    )
    return error
