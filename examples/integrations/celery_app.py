"""Celery on resilient_db: no database work at import, errors that keep their context.

- Importing this module (the producer does, to call the tasks) opens no connection:
  the engine is built on first use, and in each prefork child by ``worker_process_init``.
- Tasks use ``resilient_db.integrations.celery.DatabaseTask``: a database error crosses
  the (JSON) result backend as a ``PortableOperationalError`` or resilient_db's own
  ``CircuitOpenError``..., still an ``OperationalError``, with its ``ErrorContext``.

Run a worker::

    DATABASE_URL=postgresql+psycopg://app@db/app CELERY_BROKER=redis://localhost:6379/0 \\
    celery --workdir examples/integrations -A celery_app worker --concurrency 2
"""

from __future__ import annotations

import os
import threading
from typing import Any

import sqlalchemy as sa
from celery import Celery
from celery.signals import worker_process_init

import resilient_db

BROKER = os.environ.get("CELERY_BROKER", "redis://127.0.0.1:6379/0")
app = Celery(
    "jobs",
    broker=BROKER,
    backend=BROKER,
    task_cls="resilient_db.integrations.celery:DatabaseTask",
)
app.conf.update(
    task_default_queue=os.environ.get("CELERY_QUEUE", "celery"),
    result_serializer="json",
    task_serializer="json",
    broker_connection_retry_on_startup=True,
)

_engine: sa.Engine | None = None
_lock = threading.Lock()


def engine() -> sa.Engine:
    """The process's engine, built on first use."""
    global _engine
    with _lock:
        if _engine is None:
            _engine = resilient_db.create_engine(
                os.environ["DATABASE_URL"],
                name=os.environ.get("SERVICE_NAME", "jobs"),
                policy=resilient_db.Policy.from_env(),
            )
        return _engine


@worker_process_init.connect
def _start_worker_process(**_: Any) -> None:
    engine()  # each worker process: its own engine and startup check, before the first task


@app.task
def ping() -> int:
    """A task that does not touch the database: the worker process's pid."""
    return os.getpid()


@app.task
def backend_pid() -> int:
    """A task with a database round trip."""
    with engine().connect() as conn:
        return int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
