"""The HTTP answer to a database failure, for any web framework.

A request that failed because the database is unavailable (breaker open, pool
exhausted, connection refused, lost or timed out) gets ``503 Service
Unavailable`` with the diagnosis and a ``Retry-After`` header, never a stack
trace: an :class:`~resilient_db.ErrorContext` never holds a password or a
bind parameter.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import exc as sa_exc

from ..errors import ConfigurationError, ResilientDBError, error_context

__all__ = ["UNAVAILABLE_ERRORS", "unavailable"]

#: What a handler should catch: resilient_db's errors, and SQLAlchemy's errors of an
#: unavailable database (refused, lost, timed out; asyncpg disconnects are InterfaceError).
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    ResilientDBError,
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
)


def unavailable(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``(status, body, headers)`` for ``exc``: 503 with the diagnosis and ``Retry-After``.

    ``body`` is ``{"error": kind, "diagnosis": ..., "retry_in": seconds or None}``.
    A :class:`~resilient_db.ConfigurationError` is the service's fault, not the
    database's: 500.
    """
    if isinstance(exc, ConfigurationError):
        return 500, {"error": "configuration", "diagnosis": str(exc), "retry_in": None}, {}
    ctx = error_context(exc)
    retry_in = ctx.retry_in if ctx is not None else None
    body = {
        "error": ctx.kind if ctx is not None else "database_unavailable",
        "diagnosis": ctx.diagnosis if ctx is not None else "The database is unavailable.",
        "retry_in": retry_in,
    }
    wait = max(1, math.ceil(retry_in)) if retry_in is not None else 1
    return 503, body, {"Retry-After": str(wait)}
