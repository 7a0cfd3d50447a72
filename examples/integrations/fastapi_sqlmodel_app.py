"""FastAPI + SQLModel on asyncpg, with resilient_db, served by uvicorn with several workers.

The engine is built in the lifespan (once per worker process, never at import), sessions
are SQLModel's own ``AsyncSession``, and ``add_exception_handlers`` turns a database
failure (``CircuitOpenError``, ``PoolExhaustedError``, SQLAlchemy's ``OperationalError``
and ``InterfaceError`` of an asyncpg disconnect, ``TimeoutError``) into an explained
503 with ``Retry-After``. ``/live`` never touches the database.

Run it::

    DATABASE_URL=postgresql+asyncpg://app@db/app \\
    uvicorn --workers 2 --app-dir examples/integrations fastapi_sqlmodel_app:app
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from sqlalchemy import func
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

import resilient_db
from resilient_db.integrations.fastapi import add_exception_handlers


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """One engine per worker process, disposed at shutdown."""
    engine = resilient_db.create_async_engine(
        os.environ["DATABASE_URL"],
        name=os.environ.get("SERVICE_NAME", "heroes"),
        policy=resilient_db.Policy.from_env(),
    )
    app.state.engine = engine
    yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)
add_exception_handlers(app)


async def session(request: Request) -> AsyncIterator[AsyncSession]:
    """A SQLModel AsyncSession per request."""
    async with AsyncSession(request.app.state.engine) as s:
        yield s


Session = Annotated[AsyncSession, Depends(session)]


@app.get("/live")
async def live() -> dict[str, object]:
    """Liveness: the process answers; the database is not asked."""
    return {"status": "alive", "worker": os.getpid()}


@app.get("/db")
async def backend(s: Session) -> dict[str, object]:
    """A database round trip: this worker's PostgreSQL backend pid."""
    pid = (await s.exec(select(func.pg_backend_pid()))).one()
    return {"backend_pid": pid, "worker": os.getpid()}
