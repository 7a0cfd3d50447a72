"""Celery: database errors that reach the caller with their context.

Celery's result backend stores a task's exception by type name and ``args``
(JSON, the default serializer) and rebuilds it with ``type(*args)``; a plain
SQLAlchemy ``OperationalError`` cannot be rebuilt that way and arrives as
``builtins.Exception``. Tasks built on :class:`DatabaseTask` raise
:func:`resilient_db.portable_error` instead: a
:class:`~resilient_db.PortableOperationalError` (still an ``OperationalError``)
with the message and the :class:`~resilient_db.ErrorContext`. resilient_db's own
errors (``CircuitOpenError``...) cross as they are.

::

    app = Celery("jobs", task_cls="resilient_db.integrations.celery:DatabaseTask")
"""

from __future__ import annotations

from typing import Any

from celery import Task

from ..errors import portable_error

__all__ = ["DatabaseTask"]


class DatabaseTask(Task):  # type: ignore[misc]
    """A Celery task whose database errors survive the result backend with their context."""

    abstract = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            carried = portable_error(exc)
            if carried is exc:
                raise
            raise carried from exc
