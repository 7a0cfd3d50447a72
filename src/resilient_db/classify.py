"""The one place where driver errors become a classification and a diagnosis.

``classify(exc)`` accepts anything a SQLAlchemy engine can raise, for psycopg 3,
psycopg2, asyncpg, PyMySQL, aiomysql and sqlite3, including the bare socket
errors asyncpg lets through. It decides on SQLSTATE or MySQL errno first, then
on ``connection_invalidated`` and message text (libpq gives no SQLSTATE for
connect-time failures), and only last on the exception class, which is not a
usable signal on its own (see ``docs/errors.md``).
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


# kind -> (retry level, counts for the breaker, diagnosis template)
_RULES: dict[Kind, tuple[RetryLevel, bool, str]] = {
    Kind.REFUSED: (
        RetryLevel.CONNECT,
        True,
        "Nothing is accepting connections at {where}: the server is down or restarting, "
        "or the port in DATABASE_URL is wrong.",
    ),
    Kind.DNS: (
        RetryLevel.NEVER,
        False,
        "Host name '{host}' does not resolve. Check the host in DATABASE_URL. "
        "Configuration error, not an outage.",
    ),
    Kind.CONNECT_TIMEOUT: (
        RetryLevel.CONNECT,
        True,
        "{where} accepted no connection or sent no database greeting within the connect "
        "timeout: the wrong port or service, a proxy or firewall swallowing traffic, "
        "or a hung server.",
    ),
    Kind.TLS: (
        RetryLevel.NEVER,
        False,
        "TLS mismatch with {where}: the client requires TLS and the server doesn't offer it "
        "(or 'no encryption': the server requires TLS). Fix sslmode in DATABASE_URL or "
        "the server's TLS setup.",
    ),
    Kind.AUTHENTICATION: (
        RetryLevel.NEVER,
        False,
        "Authentication failed for user '{user}' at {where}: the user doesn't exist or the "
        "password is wrong. Check the password in DATABASE_URL. Configuration error, "
        "not an outage; not retrying.",
    ),
    Kind.UNKNOWN_USER: (
        RetryLevel.NEVER,
        False,
        "Authentication failed for '{user}' at {where}: the user doesn't exist or the "
        "password is wrong. Check DATABASE_URL.",
    ),
    Kind.UNKNOWN_DATABASE: (
        RetryLevel.NEVER,
        False,
        "Database '{database}' does not exist on {where}, or '{user}' can't access it. "
        "Check the database name in DATABASE_URL.",
    ),
    Kind.TOO_MANY_CONNECTIONS: (
        RetryLevel.CONNECT,
        True,
        "{where} refused a new connection because its connection limit is reached. "
        "Lower pool_size x instances or raise max_connections. Retrying with backoff.",
    ),
    Kind.DISCONNECT: (
        RetryLevel.TRANSACTION,
        True,
        "The connection to {where} was lost: the server restarted or failed over, the "
        "session was killed (KILL / pg_terminate_backend) or timed out idle "
        "(idle_session_timeout, wait_timeout), or a proxy, load balancer or firewall reset "
        "it. The transaction was not committed; the pool was refreshed, so the next "
        "checkout gets a new connection.",
    ),
    Kind.READ_TIMEOUT: (
        RetryLevel.TRANSACTION,
        True,
        "{where} sent no reply within the per-call deadline, so the connection was discarded: "
        "the network went silent (blackhole), the server hangs, or the query is slower "
        "than the deadline.",
    ),
    Kind.SERVER_SHUTDOWN: (
        RetryLevel.CONNECT,
        True,
        "The database at {where} is shutting down or restarting. Any in-flight transaction "
        "was lost; connecting will be retried until the server is back.",
    ),
    Kind.ADMIN_TERMINATED: (
        RetryLevel.TRANSACTION,
        True,
        "The server ended the session on {where}: a restart or shutdown (a pooled connection "
        "that died in a fast restart fails like this on its first statement), or an "
        "administrator or another process (pg_terminate_backend / KILL). The open "
        "transaction was rolled back; the pool was refreshed, so the next checkout gets a "
        "new connection.",
    ),
    Kind.IDLE_TIMEOUT: (
        RetryLevel.CONNECT,
        True,
        "{where} closed a connection that sat idle longer than its timeout. Set pool_recycle "
        "below that timeout, or enable pool_pre_ping.",
    ),
    Kind.READ_ONLY: (
        RetryLevel.NEVER,
        False,
        "{where} is read-only (a standby/replica, or read_only is set). DATABASE_URL points "
        "at a replica, or a failover demoted this node. Writes must go to the primary.",
    ),
    Kind.SERIALIZATION_FAILURE: (
        RetryLevel.TRANSACTION,
        False,
        "Serialization conflict (40001) with a concurrent transaction. Nothing was "
        "committed; replay the whole transaction.",
    ),
    Kind.DEADLOCK: (
        RetryLevel.TRANSACTION,
        False,
        "Deadlock with a concurrent transaction. It was rolled back and can be replayed. "
        "Frequent deadlocks mean lock ordering is inconsistent.",
    ),
    Kind.LOCK_TIMEOUT: (
        RetryLevel.TRANSACTION,
        False,
        "Gave up waiting for a lock held by another transaction (often one left idle in a "
        "transaction): a lock wait, not a slow query. A replay after rollback may succeed; "
        "find the blocker in pg_stat_activity / information_schema.innodb_trx.",
    ),
    Kind.STATEMENT_TIMEOUT: (
        RetryLevel.NEVER,
        False,
        "A query exceeded the server's statement timeout and was cancelled. Optimise it or "
        "raise the timeout; a retry will probably time out again.",
    ),
    Kind.QUERY_CANCELED: (
        RetryLevel.TRANSACTION,
        False,
        "The statement was cancelled by another session (pg_cancel_backend / KILL QUERY). "
        "On PostgreSQL the transaction is aborted; replay the whole unit of work.",
    ),
    Kind.DISK_FULL: (
        RetryLevel.NEVER,
        True,
        "The database server is out of disk space (or over a temp-space limit). Writes will "
        "keep failing until space is freed; an ops problem, not a code bug.",
    ),
    Kind.POOL_EXHAUSTED: (
        RetryLevel.CONNECT,
        False,
        "All local pool connections stayed busy until the checkout timeout: likely leaked "
        "connections, an undersized pool or a slow database, not a network problem.",
    ),
    Kind.AMBIGUOUS_COMMIT: (
        RetryLevel.NEVER,
        True,
        "The connection to {where} was lost while COMMIT was in flight, so the transaction "
        "may or may not have committed. It won't be retried automatically. Verify before "
        "re-running.",
    ),
    Kind.CIRCUIT_OPEN: (
        RetryLevel.NEVER,
        False,
        "The circuit breaker for {where} is open: calls fail fast without reaching the database.",
    ),
    Kind.CONFIGURATION: (
        RetryLevel.NEVER,
        False,
        "{where} rejected the connection settings (a parameter the user may not set, a "
        "missing file or directory, or a bad option). Check DATABASE_URL and connect_args.",
    ),
    Kind.CANCELLED: (
        RetryLevel.NEVER,
        False,
        "The call was cancelled by the caller; this is not a database failure.",
    ),
    Kind.APPLICATION: (
        RetryLevel.NEVER,
        False,
        "The database rejected the statement (constraint, syntax, permission or data error). "
        "Fix the query or the data; retrying will not help.",
    ),
    Kind.UNKNOWN: (
        RetryLevel.NEVER,
        False,
        "Unrecognised database error; not retried. See the original error above.",
    ),
}

# PostgreSQL SQLSTATE -> kind (exact codes first, then classes)
_PG_CODES: dict[str, Kind] = {
    "28P01": Kind.AUTHENTICATION,
    "28000": Kind.AUTHENTICATION,
    "3D000": Kind.UNKNOWN_DATABASE,
    "53300": Kind.TOO_MANY_CONNECTIONS,
    "57P01": Kind.ADMIN_TERMINATED,
    "57P02": Kind.ADMIN_TERMINATED,
    "57P03": Kind.SERVER_SHUTDOWN,
    "57P05": Kind.IDLE_TIMEOUT,
    "25P03": Kind.IDLE_TIMEOUT,
    "25006": Kind.READ_ONLY,
    "40001": Kind.SERIALIZATION_FAILURE,
    "40P01": Kind.DEADLOCK,
    "55P03": Kind.LOCK_TIMEOUT,
    "53100": Kind.DISK_FULL,
    "53400": Kind.DISK_FULL,
    "53200": Kind.DISK_FULL,
    "08001": Kind.REFUSED,
    "08004": Kind.TOO_MANY_CONNECTIONS,
    "42501": Kind.APPLICATION,
}
_PG_CLASSES: dict[str, Kind] = {
    "08": Kind.DISCONNECT,
    "22": Kind.APPLICATION,
    "23": Kind.APPLICATION,
    "42": Kind.APPLICATION,
    "0A": Kind.APPLICATION,
    "21": Kind.APPLICATION,
    "44": Kind.APPLICATION,
    "P0": Kind.APPLICATION,
}

# MySQL / MariaDB errno -> kind
_MY_CODES: dict[int, Kind] = {
    1045: Kind.AUTHENTICATION,
    1698: Kind.UNKNOWN_USER,
    1044: Kind.UNKNOWN_DATABASE,
    1049: Kind.UNKNOWN_DATABASE,
    2026: Kind.TLS,
    3159: Kind.TLS,
    1040: Kind.TOO_MANY_CONNECTIONS,
    1203: Kind.TOO_MANY_CONNECTIONS,
    1226: Kind.TOO_MANY_CONNECTIONS,
    2005: Kind.DNS,
    2006: Kind.DISCONNECT,
    2013: Kind.DISCONNECT,
    2055: Kind.DISCONNECT,
    1927: Kind.ADMIN_TERMINATED,
    1053: Kind.SERVER_SHUTDOWN,
    1205: Kind.LOCK_TIMEOUT,
    1213: Kind.DEADLOCK,
    1969: Kind.STATEMENT_TIMEOUT,
    3024: Kind.STATEMENT_TIMEOUT,
    1317: Kind.QUERY_CANCELED,
    1290: Kind.READ_ONLY,
    1792: Kind.READ_ONLY,
    1836: Kind.READ_ONLY,
    1114: Kind.DISK_FULL,
    1021: Kind.DISK_FULL,
    1041: Kind.DISK_FULL,
}
# server-side statement errors that are the application's fault
# fmt: off
_MY_APPLICATION = frozenset({
    1022, 1048, 1051, 1054, 1062, 1064, 1065, 1091, 1110, 1136, 1142, 1143, 1146, 1149,
    1166, 1169, 1216, 1217, 1264, 1292, 1364, 1366, 1406, 1451, 1452, 1690, 3819, 4025,
    1050, 1060, 1061, 1068, 1072, 1075, 1171, 1227, 1265,
})
# fmt: on

# message fragments (lower case) -> kind, for errors without a code (libpq at connect)
_TEXT_RULES: tuple[tuple[str, Kind], ...] = (
    ("temporary failure in name resolution", Kind.DNS),
    ("could not translate host name", Kind.DNS),
    ("failed to resolve host", Kind.DNS),
    ("name or service not known", Kind.DNS),
    ("nodename nor servname", Kind.DNS),
    ("no address associated with hostname", Kind.DNS),
    ("errno -2]", Kind.DNS),
    ("errno -3]", Kind.DNS),
    ("errno -5]", Kind.DNS),
    ("server does not support ssl", Kind.TLS),
    ("ssl was required", Kind.TLS),
    ("rejected ssl upgrade", Kind.TLS),
    ("no encryption", Kind.TLS),
    ("ssl is required", Kind.TLS),
    ("certificate verify failed", Kind.TLS),
    ("password authentication failed", Kind.AUTHENTICATION),
    ("authentication failed", Kind.AUTHENTICATION),
    ("no password supplied", Kind.AUTHENTICATION),
    ("pg_hba.conf rejects", Kind.AUTHENTICATION),
    ("no pg_hba.conf entry", Kind.AUTHENTICATION),
    ("access denied for user", Kind.AUTHENTICATION),
    ("does not exist", Kind.UNKNOWN_DATABASE),  # refined below for roles
    ("too many clients already", Kind.TOO_MANY_CONNECTIONS),
    ("remaining connection slots are reserved", Kind.TOO_MANY_CONNECTIONS),
    ("too many connections", Kind.TOO_MANY_CONNECTIONS),
    ("the database system is shutting down", Kind.SERVER_SHUTDOWN),
    ("the database system is starting up", Kind.SERVER_SHUTDOWN),
    ("not yet accepting connections", Kind.SERVER_SHUTDOWN),
    ("the database system is in recovery mode", Kind.SERVER_SHUTDOWN),
    ("terminating connection due to administrator command", Kind.ADMIN_TERMINATED),
    ("terminating connection due to idle-session timeout", Kind.IDLE_TIMEOUT),
    ("permission denied to set parameter", Kind.CONFIGURATION),
    ("connection refused", Kind.REFUSED),
    ("errno 111]", Kind.REFUSED),
    ("timeout expired", Kind.CONNECT_TIMEOUT),
    ("timed out", Kind.READ_TIMEOUT),
    ("server closed the connection unexpectedly", Kind.DISCONNECT),
    ("consuming input failed", Kind.DISCONNECT),
    ("connection already closed", Kind.DISCONNECT),
    ("the connection is closed", Kind.DISCONNECT),
    ("connection was closed", Kind.DISCONNECT),
    ("connection reset by peer", Kind.DISCONNECT),
    ("broken pipe", Kind.DISCONNECT),
    ("ssl syscall error", Kind.DISCONNECT),
    ("lost connection", Kind.DISCONNECT),
    ("gone away", Kind.DISCONNECT),
    # sqlite3
    ("database is locked", Kind.LOCK_TIMEOUT),
    ("database table is locked", Kind.LOCK_TIMEOUT),
    ("database or disk is full", Kind.DISK_FULL),
    ("attempt to write a readonly database", Kind.READ_ONLY),
    ("unable to open database file", Kind.CONFIGURATION),
)

_CONNECTION_LOSS = {
    Kind.DISCONNECT,
    Kind.READ_TIMEOUT,
    Kind.ADMIN_TERMINATED,
    Kind.SERVER_SHUTDOWN,
    Kind.IDLE_TIMEOUT,
}


_MYSQL_MODULES = ("pymysql", "aiomysql", "MySQLdb", "mysql.connector", "asyncmy")


def _is_mysql(e: BaseException) -> bool:
    return type(e).__module__.startswith(_MYSQL_MODULES)


def _sqlstate(e: BaseException) -> str | None:
    """A PostgreSQL SQLSTATE. MySQL errors carry one too (PyMySQL >= 1.2), but it is
    coarse (1044, 1064 and 1142 all say 42000; 1213 says 40001) and means something
    else in PostgreSQL's table, so for them the errno is the only signal."""
    if _is_mysql(e):
        return None
    for attr in ("sqlstate", "pgcode"):
        value = getattr(e, attr, None)
        if isinstance(value, str) and len(value) == 5:
            return value
    return None


def _mysql_errno(e: BaseException) -> int | None:
    if not _is_mysql(e):
        return None
    if e.args and isinstance(e.args[0], int):
        return e.args[0]
    return None


def _message(exc: BaseException) -> str:
    parts = []
    for e in _chain(exc):
        if isinstance(e, sa_exc.StatementError):
            continue
        try:
            parts.append(str(e))
        except Exception:  # a broken __str__ must not break classification
            parts.append(type(e).__name__)
    return " | ".join(parts).lower()


_DRIVER_MODULES = ("psycopg", "psycopg2", "asyncpg", "sqlite3", "aiosqlite", *_MYSQL_MODULES)


def _is_database_error(exc: BaseException) -> bool:
    """True when a driver, SQLAlchemy's DBAPI wrapper or the OS raised (part of) ``exc``.

    Message text is only read for these: an application's own ``ValueError("... does
    not exist")`` or ``KeyError("timed out")`` must stay UNKNOWN and never be retried.
    """
    return any(
        isinstance(e, (sa_exc.DBAPIError, OSError))
        or type(e).__module__.startswith(_DRIVER_MODULES)
        for e in _chain(exc)
    )


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
        if any(
            f in text
            for f in (
                "name or service not known",
                "errno -2]",
                "errno -3]",
                "getaddrinfo",
                "nodename nor servname",
            )
        ):
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
    if num in _MY_APPLICATION:
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
            said = _kind_from_text(_message(e))
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
        if isinstance(
            e,
            (
                sa_exc.IntegrityError,
                sa_exc.ProgrammingError,
                sa_exc.DataError,
                sa_exc.NotSupportedError,
            ),
        ):
            return Kind.APPLICATION
    return None


def _find_code(exc: BaseException) -> tuple[str | None, int | None]:
    """The most specific SQLSTATE (skipping class 08 wrappers) and MySQL errno."""
    states: list[str] = []
    num: int | None = None
    for e in _chain(exc):
        s = _sqlstate(e)
        if s is not None:
            states.append(s)
        if num is None:
            num = _mysql_errno(e)
    specific = [s for s in states if not s.startswith("08")]
    if specific:
        return specific[0], num
    return (states[0] if states else None), num


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
        text = _message(exc)
        sqlstate, num = _find_code(exc)
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
        python_level = _is_python_level(exc)
        if kind is None and python_level:
            kind = _kind_from_type(exc, phase)
        if kind is None and _is_database_error(exc):
            kind = _kind_from_text(text)
        if kind is None and not python_level:
            kind = _kind_from_type(exc, phase)
        if kind is None:
            kind = Kind.UNKNOWN
    if phase == "commit" and kind in _CONNECTION_LOSS:
        kind = Kind.AMBIGUOUS_COMMIT
    assert kind is not None
    kind, template = _template(kind, code, exc, target)
    retry, counts, _ = _RULES[kind]
    # the breaker judges whether the database can be reached: only a failed attempt to
    # reach it counts (a fresh connection; a probe). A lost session does not: the pool
    # reconnects, and that connect counts if the database is really gone.
    counts = counts and phase in (None, "connect")
    if phase == "connect" and kind in _CONNECTION_LOSS:
        retry = RetryLevel.CONNECT
    if kind is Kind.IDLE_TIMEOUT and code == "25P03":
        retry = RetryLevel.TRANSACTION  # idle *in a transaction*: that transaction is lost
    if kind is Kind.DNS and ("temporary failure" in _message(exc) or "errno -3]" in _message(exc)):
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
    kind: Kind, code: str | None, exc: BaseException, target: Target | None
) -> tuple[Kind, str]:
    """The kind (a statement timeout in a lock wait is a lock wait) and its diagnosis."""
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


def _is_python_level(exc: BaseException) -> bool:
    """True when the chain holds a non-DBAPI error (bare socket errors, pool timeouts)."""
    return any(
        isinstance(e, (OSError, sa_exc.TimeoutError, asyncio.CancelledError, KeyboardInterrupt))
        for e in _chain(exc)
    )


def _format(template: str, target: Target | None) -> str:
    t = target or Target()
    return template.format(
        where=t.where,
        host=t.host or "?",
        user=t.user or "?",
        database=t.database or "?",
    )
