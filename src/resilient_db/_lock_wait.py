"""Diagnosis details that read more than the error code: lock waits and "gone away".

Used by :mod:`resilient_db.classify` only. PostgreSQL names no blocking session in
a lock-wait error, but its CONTEXT line names the relation a statement waited to
lock, also when the statement timeout (57014), not ``lock_timeout`` (55P03),
ended the wait; where to look for the blocker depends on the server.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable

from sqlalchemy import exc as sa_exc

__all__ = ["GONE_AWAY", "lock_template", "pg_lock_wait"]

#: PostgreSQL's CONTEXT line for a statement waiting on a row lock (XactLockTableWait):
#: "while updating tuple (0,1) in relation "t"", "while locking tuple ...", ...
_PG_LOCK_WAIT = re.compile(r'while [a-z ]+\(\d+,\d+\)[a-z ]* in relation "([^"]{1,64})"')

#: added to a MySQL 2006 "gone away" disconnect: the idle case, where this advice fits
GONE_AWAY = (
    " If it follows idle periods, the server's wait_timeout closed it: keep "
    "PoolPolicy.ping_after_idle on and recycle below wait_timeout."
)


def pg_lock_wait(chain: Iterable[BaseException]) -> str | None:
    """The relation a PostgreSQL statement was waiting to lock, when the error says so.

    ``chain`` is the error and its causes. psycopg and psycopg2 put the CONTEXT
    line in the message; asyncpg keeps it in the exception's ``context`` attribute.
    """
    for e in chain:
        if isinstance(e, sa_exc.StatementError):
            continue
        texts = [getattr(e, "context", None), getattr(getattr(e, "diag", None), "context", None)]
        with contextlib.suppress(Exception):
            texts.append(str(e))
        for text in texts:
            if isinstance(text, str) and (m := _PG_LOCK_WAIT.search(text)) is not None:
                return m.group(1)
    return None


def lock_template(template: str, code: str | None, dialect: str | None, on: str) -> str:
    """The lock-wait diagnosis: what ended the wait, on what, and where to find the blocker."""
    template = template.replace("a lock held", f"a lock{on} held")
    if code == "57014":
        template = template.replace(
            "Gave up waiting", "The statement timeout cancelled the statement while it waited"
        )
    if dialect == "postgresql" or (dialect is None and code in ("57014", "55P03")):
        blocker = (
            "find the blocker in pg_stat_activity (pg_blocking_pids() of a waiting session; "
            "often one 'idle in transaction')."
        )
    elif dialect in ("mysql", "mariadb") or code == "1205":
        blocker = "find the blocker in information_schema.innodb_trx / innodb_lock_waits."
    elif dialect == "sqlite":
        blocker = "another connection held the database's write lock past the busy timeout."
    else:
        return template
    head, _sep, _tail = template.rpartition("; ")
    return f"{head}; {blocker}"
