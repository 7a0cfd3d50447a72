"""The idempotency-key table: how a unit of work survives an ambiguous commit.

When the connection dies while COMMIT is in flight, nobody can tell whether the
transaction committed. A unit of work run with ``idempotency_key="transfer-123"``
first inserts that key into ``resilient_db_idempotency``, in the same
transaction as its own writes. The key is committed exactly when the writes are,
so a later attempt (or a later call) that finds the key knows the work is done;
one that can insert it knows the earlier attempt did not commit. While an
attempt is still in flight, its uncommitted key row blocks a concurrent insert
of the same key until it commits or rolls back.

Create the table once at startup with :func:`ensure_idempotency_table` (or from
a migration: :data:`idempotency_table` is a plain :class:`sqlalchemy.Table`),
and delete old keys with :func:`purge_idempotency_keys`.
"""

from __future__ import annotations

import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from .errors import ConfigurationError

__all__ = [
    "IDEMPOTENCY_TABLE_NAME",
    "KEY_MAX_LENGTH",
    "ensure_idempotency_table",
    "idempotency_table",
    "purge_idempotency_keys",
]

#: Name of the table holding the keys of committed units of work.
IDEMPOTENCY_TABLE_NAME = "resilient_db_idempotency"
#: Longest accepted idempotency key, in characters.
KEY_MAX_LENGTH = 255

_metadata = sa.MetaData()

#: The key table: ``idempotency_key`` (primary key) and ``created_at`` (UTC, naive).
#: The column is not called ``key``, a reserved word in MySQL/MariaDB.
idempotency_table = sa.Table(
    IDEMPOTENCY_TABLE_NAME,
    _metadata,
    sa.Column("idempotency_key", sa.String(KEY_MAX_LENGTH), primary_key=True),
    sa.Column("created_at", sa.DateTime(), nullable=False),
)

_INSERT = idempotency_table.insert()


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def ensure_idempotency_table(bind: Engine | Connection) -> None:
    """Create ``resilient_db_idempotency`` if it does not exist yet.

    Safe to call at every startup and from several processes at once. Async
    engines: ``async with engine.begin() as conn: await conn.run_sync(ensure_idempotency_table)``.
    """
    try:
        idempotency_table.create(bind, checkfirst=True)
    except sa_exc.DBAPIError:
        # Another process created it between our check and our CREATE.
        if not isinstance(bind, Engine):
            raise
        with bind.connect() as conn:
            if not sa.inspect(conn).has_table(IDEMPOTENCY_TABLE_NAME):
                raise


def purge_idempotency_keys(bind: Engine | Connection, older_than: datetime.timedelta) -> int:
    """Delete keys recorded more than ``older_than`` ago; return how many were deleted.

    Keep keys longer than any caller could retry the same request. With a
    Connection the delete runs in its current transaction (commit it yourself).
    """
    if not isinstance(older_than, datetime.timedelta):
        raise ConfigurationError(
            "older_than",
            f"must be a datetime.timedelta, got {type(older_than).__name__}.",
            "Pass e.g. datetime.timedelta(days=7).",
        )
    stmt = idempotency_table.delete().where(idempotency_table.c.created_at < _utcnow() - older_than)
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            return int(conn.execute(stmt).rowcount)
    return int(bind.execute(stmt).rowcount)


def check_key(key: object) -> None:
    """Raise :class:`ConfigurationError` unless ``key`` is a usable idempotency key."""
    if not isinstance(key, str) or not key or len(key) > KEY_MAX_LENGTH:
        raise ConfigurationError(
            "idempotency_key",
            f"must be a non-empty string of at most {KEY_MAX_LENGTH} characters, "
            f"got {type(key).__name__}"
            + (f" of length {len(key)}." if isinstance(key, str) else "."),
            "Use a stable identifier of the request, e.g. 'transfer-<uuid>'.",
        )


def claim_params(key: str) -> dict[str, Any]:
    """The bind parameters of the key insert."""
    return {"idempotency_key": key, "created_at": _utcnow()}


def claim_statement() -> Any:
    """The INSERT that records a key (run inside the unit of work's transaction)."""
    return _INSERT


def is_missing_table(exc: BaseException) -> bool:
    """True when ``exc`` says the idempotency table does not exist."""
    text = str(getattr(exc, "orig", None) or exc).lower()
    return IDEMPOTENCY_TABLE_NAME in text and any(
        f in text for f in ("does not exist", "doesn't exist", "no such table", "undefined table")
    )


def missing_table_error() -> ConfigurationError:
    """The error raised when a key is used before the table was created."""
    return ConfigurationError(
        "idempotency_key",
        f"the table {IDEMPOTENCY_TABLE_NAME!r} does not exist.",
        "Call resilient_db.ensure_idempotency_table(engine) once at startup, or create "
        "resilient_db.idempotency_table in a migration.",
    )
