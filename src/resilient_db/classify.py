"""The one place where driver errors become a classification and a diagnosis.

``classify(exc)`` accepts anything a SQLAlchemy engine can raise, for psycopg 3,
psycopg2, asyncpg, PyMySQL, aiomysql and sqlite3, including the bare socket
errors asyncpg lets through. It decides on SQLSTATE or MySQL errno first, then
on ``connection_invalidated`` and message text (libpq gives no SQLSTATE for
connect-time failures), and only last on the exception class, which is not a
usable signal on its own (see ``docs/errors.md``).

The tables it decides with (codes, message fragments, and each kind's retry level
and diagnosis) are pure data in ``_classify_rules.py``; :func:`explain` gives the
startup checks the same diagnosis words.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import socket
import ssl
from dataclasses import dataclass
from enum import Enum

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL

from . import _classify_rules as _table
from ._error_facts import (
    dns_for_now,
    find_code,
    is_database_error,
    is_python_level,
    message,
)
from ._lock_wait import GONE_AWAY, lock_template, pg_lock_wait
from .errors import CircuitOpenError, ResilientDBError, error_context
from .errors import chain as _chain

__all__ = ["Classification", "Kind", "RetryLevel", "Target", "classify"]


class Kind(str, Enum):
    """What went wrong, in operator terms."""

    REFUSED = "refused"
    DNS = "dns"
    CONNECT_TIMEOUT = "connect_timeout"
    TLS = "tls"
    AUTHENTICATION = "authentication"
    UNKNOWN_DATABASE = "unknown_database"
    UNKNOWN_USER = "unknown_user"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    DISCONNECT = "disconnect"
    READ_TIMEOUT = "read_timeout"
    SERVER_SHUTDOWN = "server_shutdown"
    ADMIN_TERMINATED = "admin_terminated"
    IDLE_TIMEOUT = "idle_timeout"
    READ_ONLY = "read_only"
    SERIALIZATION_FAILURE = "serialization_failure"
    DEADLOCK = "deadlock"
    LOCK_TIMEOUT = "lock_timeout"
    STATEMENT_TIMEOUT = "statement_timeout"
    QUERY_CANCELED = "query_canceled"
    DISK_FULL = "disk_full"
    POOL_EXHAUSTED = "pool_exhausted"
    AMBIGUOUS_COMMIT = "ambiguous_commit"
    CIRCUIT_OPEN = "circuit_open"
    CONFIGURATION = "configuration"
    CANCELLED = "cancelled"
    APPLICATION = "application"
    UNKNOWN = "unknown"


class RetryLevel(str, Enum):
    """Where a retry is safe.

    ``CONNECT``: nothing reached the database; retry transparently with backoff
    (also safe for a whole unit of work). ``TRANSACTION``: the transaction is
    lost; only re-running the whole unit of work from BEGIN is safe.
    ``NEVER``: raise at once.
    """

    CONNECT = "connect"
    TRANSACTION = "transaction"
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class Target:
    """Where an engine connects, without the password."""

    dialect: str | None = None
    driver: str | None = None
    host: str | None = None
    port: int | None = None
    database: str | None = None
    user: str | None = None

    @classmethod
    def from_url(cls, url: URL) -> Target:
        """Build a target from a SQLAlchemy URL; the password is dropped."""
        port = url.port
        if port is None:
            port = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}.get(url.get_backend_name())
        return cls(
            dialect=url.get_backend_name(),
            driver=url.get_driver_name(),
            host=url.host or (None if url.get_backend_name() == "sqlite" else "localhost"),
            port=None if url.get_backend_name() == "sqlite" else port,
            database=url.database,
            user=url.username,
        )

    @property
    def where(self) -> str:
        """``host:port``, the SQLite file, or a neutral phrase."""
        if self.dialect == "sqlite":
            return f"the SQLite database {self.database or ':memory:'!r}"
        if self.host:
            return f"{self.host}:{self.port}" if self.port else self.host
        return "the database server"


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one error."""

    kind: Kind
    retry: RetryLevel
    counts_for_breaker: bool
    code: str | None
    diagnosis: str

    @property
    def transient(self) -> bool:
        """True when some retry (connect or unit of work) may succeed."""
        return self.retry is not RetryLevel.NEVER


#: what a connect timeout waited for, in the runtime's diagnoses
_WITHIN = "the connect timeout"


def _sentences(*parts: str) -> str:
    return " ".join(p for p in parts if p)


# the rule tables (_classify_rules.py) with their kinds and retry levels as enums
# kind -> (retry level, counts for the breaker, diagnosis template)
_RULES: dict[Kind, tuple[RetryLevel, bool, str]] = {
    Kind(kind): (RetryLevel(retry), counts, _sentences(*words).replace("{within}", _WITHIN))
    for kind, (retry, counts, *words) in _table.RULES.items()
}
_VARIANTS = {
    name: _sentences(*words).replace("{within}", _WITHIN)
    for name, words in _table.CONNECT_VARIANTS.items()
}
_PG_CODES = {code: Kind(kind) for code, kind in _table.PG_CODES.items()}
_PG_CLASSES = {code: Kind(kind) for code, kind in _table.PG_CLASSES.items()}
_MY_CODES = {num: Kind(kind) for num, kind in _table.MY_CODES.items()}
_TEXT_RULES = tuple((fragment, Kind(kind)) for fragment, kind in _table.TEXT_RULES)

_CONNECTION_LOSS = frozenset(Kind(kind) for kind in _table.CONNECTION_LOSS)


def _kind_from_pg(code: str, text: str) -> Kind | None:
    if code == "57014":
        if "statement timeout" in text:
            return Kind.STATEMENT_TIMEOUT
        if "lock timeout" in text:
            return Kind.LOCK_TIMEOUT
        return Kind.QUERY_CANCELED
    if code in ("28000", "28P01") and "no encryption" in text:
        return Kind.TLS
    if code in _PG_CODES:
        return _PG_CODES[code]
    return _PG_CLASSES.get(code[:2])


def _kind_from_mysql(num: int, text: str, phase: str | None) -> Kind | None:
    if num == 2003:
        if any(f in text for f in _table.MY_DNS_FRAGMENTS):
            return Kind.DNS
        if "timed out" in text:
            return Kind.CONNECT_TIMEOUT
        if "connection reset" in text or "errno 104]" in text:
            return Kind.DISCONNECT  # something listened, then dropped the handshake
        return Kind.REFUSED
    if num == 2013 and "timed out" in text:
        return Kind.CONNECT_TIMEOUT if phase == "connect" else Kind.READ_TIMEOUT
    if num in _MY_CODES:
        return _MY_CODES[num]
    if num in _table.MY_APPLICATION:
        return Kind.APPLICATION
    return None


def _kind_from_text(text: str) -> Kind | None:
    for fragment, kind in _TEXT_RULES:
        if fragment in text:
            if kind is Kind.UNKNOWN_DATABASE and "role" in text:
                return Kind.UNKNOWN_USER
            if kind is Kind.UNKNOWN_DATABASE and "database" not in text:
                continue
            return kind
    return None


def _kind_from_type(exc: BaseException, phase: str | None) -> Kind | None:
    for e in _chain(exc):
        if isinstance(e, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
            return Kind.CANCELLED
        if isinstance(e, sa_exc.TimeoutError):
            return Kind.POOL_EXHAUSTED
        if isinstance(e, socket.gaierror):
            return Kind.DNS
        if isinstance(e, ConnectionRefusedError):
            return Kind.REFUSED
        if isinstance(e, ssl.SSLError):
            return Kind.TLS
        if isinstance(e, (TimeoutError, socket.timeout)):
            return Kind.CONNECT_TIMEOUT if phase == "connect" else Kind.READ_TIMEOUT
        if isinstance(e, OSError) and e.errno == _errno.ECONNREFUSED:
            return Kind.REFUSED
        if type(e) is ConnectionError:
            # asyncpg raises a bare ConnectionError("... rejected SSL upgrade") for a
            # TLS mismatch: the message says more than the class
            said = _kind_from_text(message(e))
            if said is not None:
                return said
        if isinstance(e, (ConnectionError, sa_exc.DisconnectionError)):
            return Kind.DISCONNECT
        if isinstance(e, sa_exc.PendingRollbackError):
            return Kind.APPLICATION
    for e in _chain(exc):
        if isinstance(e, sa_exc.DBAPIError) and e.connection_invalidated:
            return Kind.DISCONNECT
    for e in _chain(exc):
        if isinstance(e, _APPLICATION_ERRORS):
            return Kind.APPLICATION
    return None


_APPLICATION_ERRORS = (
    sa_exc.IntegrityError,
    sa_exc.ProgrammingError,
    sa_exc.DataError,
    sa_exc.NotSupportedError,
)


def classify(
    exc: BaseException,
    *,
    phase: str | None = None,
    target: Target | None = None,
) -> Classification:
    """Classify ``exc``: its kind, where a retry is safe, and what to tell an operator.

    ``phase`` is one of ``connect``, ``checkout``, ``execute``, ``commit``,
    ``rollback`` when known: a lost connection during ``commit`` is an ambiguous
    commit, and during ``connect`` it is safe to retry. ``target`` fills host,
    port, user and database into the diagnosis.
    """

    if isinstance(exc, CircuitOpenError):
        kind: Kind | None = Kind.CIRCUIT_OPEN
        code = None
    elif isinstance(exc, ResilientDBError) and (ctx := error_context(exc)) is not None:
        try:
            kind = Kind(ctx.kind)
        except ValueError:  # pragma: no cover - contexts come from this module
            kind = Kind.UNKNOWN
        code = ctx.code
    else:
        text = message(exc)
        sqlstate, num = find_code(exc)
        kind = None
        code = sqlstate or (str(num) if num is not None else None)
        if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
            kind = Kind.CANCELLED
        if kind is None and sqlstate is not None:
            kind = _kind_from_pg(sqlstate, text)
        if kind is None and num is not None:
            kind = _kind_from_mysql(num, text, phase)
        # a Python-level error (socket, pool timeout) is told by its type before its
        # text; a driver error by its text first, its type only when the text says nothing
        python_level = is_python_level(exc)
        if kind is None and python_level:
            kind = _kind_from_type(exc, phase)
        if kind is None and is_database_error(exc):
            kind = _kind_from_text(text)
        if kind is None and not python_level:
            kind = _kind_from_type(exc, phase)
        if kind is None:
            kind = Kind.UNKNOWN
    if phase == "commit" and kind in _CONNECTION_LOSS:
        kind = Kind.AMBIGUOUS_COMMIT
    assert kind is not None
    kind, template = _template(kind, code, exc, target, phase)
    retry, counts, _ = _RULES[kind]
    # the breaker judges whether the database can be reached: only a failed attempt to
    # reach it counts (a fresh connection; a probe). A lost session does not: the pool
    # reconnects, and that connect counts if the database is really gone.
    counts = counts and phase in (None, "connect")
    if phase == "connect" and kind in _CONNECTION_LOSS:
        retry = RetryLevel.CONNECT
    if kind is Kind.IDLE_TIMEOUT and code == "25P03":
        retry = RetryLevel.TRANSACTION  # idle *in a transaction*: that transaction is lost
    if kind is Kind.DNS and dns_for_now(exc):
        retry, counts = RetryLevel.CONNECT, True
    if kind is Kind.LOCK_TIMEOUT and any(type(e).__module__ == "sqlite3" for e in _chain(exc)):
        counts = True  # SQLite's lock covers the whole database: it is unavailable
    if kind is Kind.READ_ONLY:
        # Only a multi-host engine sees read-only at connect (NoPrimaryError: no host is
        # writable yet, a failover is in progress) or re-routes after a refused write,
        # recording the wider retry level in the error's context (docs/fleet.md).
        ro_ctx = error_context(exc)
        if phase == "connect":
            retry, counts = RetryLevel.CONNECT, True
        elif ro_ctx is not None and ro_ctx.kind == kind.value and ro_ctx.retry != "never":
            retry = RetryLevel(ro_ctx.retry)
    return Classification(
        kind=kind,
        retry=retry,
        counts_for_breaker=counts,
        code=code,
        diagnosis=_format(template, target),
    )


def _template(
    kind: Kind, code: str | None, exc: BaseException, target: Target | None, phase: str | None
) -> tuple[Kind, str]:
    """The kind (a statement timeout in a lock wait is a lock wait) and its diagnosis."""
    if kind is Kind.CONNECT_TIMEOUT and code == "2013":  # MySQL: TCP connected, no greeting
        return kind, _VARIANTS["no_greeting"]
    if kind is Kind.DISCONNECT and phase == "connect":  # no transaction was lost
        return kind, _VARIANTS["handshake_closed"]
    if kind is Kind.DNS and dns_for_now(exc):
        return kind, _VARIANTS["dns_temporary"]
    on = ""
    if kind in (Kind.STATEMENT_TIMEOUT, Kind.LOCK_TIMEOUT) and code in ("57014", "55P03"):
        relation = pg_lock_wait(_chain(exc))
        if relation is not None:
            # a statement timeout that struck while the statement waited for a lock
            kind = Kind.LOCK_TIMEOUT
            on = f' on a row of "{relation}"'.replace("{", "{{").replace("}", "}}")
    template = _RULES[kind][2]
    if kind is Kind.LOCK_TIMEOUT:
        template = lock_template(template, code, target.dialect if target else None, on)
    elif kind is Kind.DISCONNECT and code == "2006":
        # "gone away" on a connection's first use: it is the idle case that advice fits
        template += GONE_AWAY
    return kind, template


def explain(rule: Kind | str, target: Target | None, *, within: str = _WITHIN) -> tuple[str, str]:
    """(what happened, what to do) of a kind or a connect variant, without the engine's part.

    The startup checks (``validation/connect.py``) report a failed connect with it, so a
    check and a runtime error say the same. Not part of the public API.
    """
    key = rule.value if isinstance(rule, Kind) else rule
    if key in _table.CONNECT_VARIANTS:
        what, fix, _then = _table.CONNECT_VARIANTS[key]
    else:
        _retry, _counts, what, fix, _then = _table.RULES[key]
    return _format(what, target, within), _format(fix, target, within)


def _format(template: str, target: Target | None, within: str = _WITHIN) -> str:
    t = target or Target()
    return template.format(
        where=t.where,
        host=t.host or "?",
        user=t.user or "?",
        database=t.database or "?",
        within=within,
    )
