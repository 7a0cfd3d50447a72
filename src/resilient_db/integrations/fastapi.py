"""FastAPI (and Starlette): database failures answered with an explained 503.

::

    app = FastAPI(lifespan=lifespan)
    add_exception_handlers(app)

Covers :class:`~resilient_db.CircuitOpenError`, :class:`~resilient_db.PoolExhaustedError`
and SQLAlchemy's ``OperationalError``, ``InterfaceError`` (an asyncpg disconnect) and
``TimeoutError``; see :func:`resilient_db.integrations.http.unavailable`.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from .http import UNAVAILABLE_ERRORS, unavailable

__all__ = ["add_exception_handlers", "database_unavailable"]


async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The exception handler: 503 with the diagnosis and ``Retry-After``."""
    status, body, headers = unavailable(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def add_exception_handlers(app: Any) -> None:
    """Register :func:`database_unavailable` for every database-unavailable error."""
    for cls in UNAVAILABLE_ERRORS:
        app.add_exception_handler(cls, database_unavailable)
