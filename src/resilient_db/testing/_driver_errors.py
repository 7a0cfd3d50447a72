"""The exception a database driver raises for a fault kind (:func:`driver_error`).

Real DBAPI classes of the engine's driver with the errno, SQLSTATE and message
text the driver produces (PostgreSQL: psycopg, psycopg2, asyncpg; MariaDB/MySQL:
PyMySQL, aiomysql; SQLite), for :class:`~resilient_db.testing.FaultInjector` and
for tests that build errors themselves.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine

from .._compat import asyncpg_dbapi_error

_PG_CONNECT = 'connection to server at "{host}", port {port} failed: '
# kind -> (SQLSTATE or None for libpq's code-less connect errors, message)
_PG: dict[str, tuple[str | None, str]] = {
    "refused": (
        None,
        _PG_CONNECT + "Connection refused\n\tIs the server running on that host and "
        "accepting TCP/IP connections?",
    ),
    "connect_timeout": (None, "connection timeout expired"),
    "authentication": (
        None,
        _PG_CONNECT + 'FATAL:  password authentication failed for user "{user}"',
    ),
    "too_many_connections": (None, _PG_CONNECT + "FATAL:  sorry, too many clients already"),
    "server_shutdown": (None, _PG_CONNECT + "FATAL:  the database system is shutting down"),
    "disconnect": (
        None,
        "consuming input failed: server closed the connection unexpectedly\n\tThis probably "
        "means the server terminated abnormally\n\tbefore or while processing the request.",
    ),
    "admin_terminated": ("57P01", "terminating connection due to administrator command"),
    "idle_timeout": ("57P05", "terminating connection due to idle-session timeout"),
    "read_only": ("25006", "cannot execute INSERT in a read-only transaction"),
    "serialization_failure": ("40001", "could not serialize access due to concurrent update"),
    "deadlock": ("40P01", "deadlock detected"),
    "lock_timeout": ("55P03", "canceling statement due to lock timeout"),
    "statement_timeout": ("57014", "canceling statement due to statement timeout"),
    "disk_full": ("53100", 'could not extend file "base/16384/16385": No space left on device'),
}

# kind -> (errno, message) as PyMySQL / aiomysql raise them (MariaDB server texts)
_MYSQL: dict[str, tuple[int, str]] = {
    "refused": (2003, "Can't connect to MySQL server on '{host}' ([Errno 111] Connection refused)"),
    "connect_timeout": (2003, "Can't connect to MySQL server on '{host}' (timed out)"),
    "authentication": (1045, "Access denied for user '{user}'@'{client}' (using password: YES)"),
    "too_many_connections": (1040, "Too many connections"),
    "server_shutdown": (1053, "Server shutdown in progress"),
    "disconnect": (
        2013,
        "Lost connection to MySQL server during query ([Errno 104] Connection reset by peer)",
    ),
    "admin_terminated": (1927, "Connection was killed"),
    "read_timeout": (2013, "Lost connection to MySQL server during query (timed out)"),
    "read_only": (
        1290,
        "The MariaDB server is running with the --read-only option so it cannot execute "
        "this statement",
    ),
    "deadlock": (1213, "Deadlock found when trying to get lock; try restarting transaction"),
    "lock_timeout": (1205, "Lock wait timeout exceeded; try restarting transaction"),
    "statement_timeout": (1969, "Query execution was interrupted (max_statement_time exceeded)"),
    "disk_full": (1114, "The table 'resilient_db_injected' is full"),
}

# kind -> (result code, result name, message) as sqlite3 raises them
_SQLITE: dict[str, tuple[int, str, str]] = {
    "lock_timeout": (5, "SQLITE_BUSY", "database is locked"),
    "read_only": (8, "SQLITE_READONLY", "attempt to write a readonly database"),
    "disk_full": (13, "SQLITE_FULL", "database or disk is full"),
    "configuration": (14, "SQLITE_CANTOPEN", "unable to open database file"),
}

# kind -> asyncpg exception class name (server errors asyncpg raises with a SQLSTATE)
_ASYNCPG: dict[str, str] = {
    "authentication": "InvalidPasswordError",
    "too_many_connections": "TooManyConnectionsError",
    "server_shutdown": "CannotConnectNowError",
    "disconnect": "ConnectionDoesNotExistError",
    "admin_terminated": "AdminShutdownError",
    "idle_timeout": "IdleSessionTimeoutError",
    "read_only": "ReadOnlySQLTransactionError",
    "serialization_failure": "SerializationError",
    "deadlock": "DeadlockDetectedError",
    "lock_timeout": "LockNotAvailableError",
    "statement_timeout": "QueryCanceledError",
    "disk_full": "DiskFullError",
}


def sync_engine(engine: Any) -> Engine:
    e = getattr(engine, "sync_engine", engine)
    e = getattr(e, "engine", e)
    if not isinstance(e, Engine):
        raise TypeError(f"expected a SQLAlchemy Engine or AsyncEngine, got {type(engine).__name__}")
    return e


def error_kinds(engine: Any) -> tuple[str, ...]:
    """The fault kinds :func:`driver_error` can build for ``engine``'s driver."""
    e = sync_engine(engine)
    backend, driver = e.dialect.name, getattr(e.dialect, "driver", "")
    if backend == "sqlite":
        return tuple(sorted(_SQLITE))
    if backend in ("mysql", "mariadb"):
        return tuple(sorted(_MYSQL))
    if backend == "postgresql" and driver == "asyncpg":
        return tuple(sorted({*_ASYNCPG, "refused", "connect_timeout"}))
    if backend == "postgresql":
        return tuple(sorted(_PG))
    return ()


def driver_error(engine: Any, kind: str, *, message: str | None = None) -> BaseException:
    """Build the exception ``engine``'s driver raises for the fault ``kind``.

    ``kind`` is a :class:`~resilient_db.Kind` value such as ``"refused"``,
    ``"disconnect"``, ``"deadlock"``, ``"lock_timeout"`` or ``"disk_full"``;
    :func:`error_kinds` lists those available for a driver (SQLite has only
    ``lock_timeout``, ``read_only``, ``disk_full`` and ``configuration``).
    The result is an instance of the driver's real DBAPI class with the errno
    or SQLSTATE the driver sets (asyncpg: SQLAlchemy's adapter error caused by
    the asyncpg exception, or the bare socket error asyncpg lets through), so
    :func:`resilient_db.classify` treats it as the real thing. ``message``
    replaces the driver's message text.

    Raises:
        ValueError: the driver has no such fault.
    """
    e = sync_engine(engine)
    backend, driver = e.dialect.name, getattr(e.dialect, "driver", "")
    url = e.url
    fields = {
        "host": url.host or "localhost",
        "port": url.port or {"postgresql": 5432}.get(backend, 3306),
        "user": url.username or "?",
        "client": "127.0.0.1",
    }
    kinds = error_kinds(e)
    if kind not in kinds:
        raise ValueError(
            f"{backend}+{driver} has no injectable fault {kind!r}; choose one of "
            f"{', '.join(kinds) or '(none)'}"
        )
    dbapi = e.dialect.loaded_dbapi
    if backend == "sqlite":
        code, name, text = _SQLITE[kind]
        exc: BaseException = dbapi.OperationalError(message or text)
        exc.sqlite_errorcode = code  # type: ignore[attr-defined]
        exc.sqlite_errorname = name  # type: ignore[attr-defined]
        return exc
    if backend in ("mysql", "mariadb"):
        num, text = _MYSQL[kind]
        cls = dbapi.InternalError if num < 1000 else dbapi.OperationalError
        exc = cls(num, message or text.format(**fields))
        return exc
    if driver == "asyncpg":
        return _asyncpg_error(dbapi, kind, message, fields)
    state, text = _PG[kind]
    text = message or text.format(**fields)
    if driver == "psycopg2":
        return _psycopg2_error(state, text)
    if state is None:
        if kind == "connect_timeout":
            import psycopg

            return psycopg.errors.ConnectionTimeout(text)
        prefix = "" if kind == "disconnect" else "connection failed: "
        exc = dbapi.OperationalError(prefix + text)
        return exc
    import psycopg

    exc = psycopg.errors.lookup(state)(text)
    return exc


def _psycopg2_error(state: str | None, text: str) -> BaseException:
    import psycopg2
    import psycopg2.errors

    if state is None:
        if text.startswith("connection timeout"):
            text = "timeout expired"
        error: BaseException = psycopg2.OperationalError(text + "\n")
        return error
    exc: BaseException = psycopg2.errors.lookup(state)(text)
    # pgcode and pgerror are read-only and set by libpq; the pickle protocol sets them
    exc.__setstate__({"pgcode": state, "pgerror": f"ERROR:  {text}\n"})
    return exc


def _asyncpg_error(
    dbapi: Any, kind: str, message: str | None, fields: dict[str, Any]
) -> BaseException:
    if kind == "refused":
        return ConnectionRefusedError(
            111, message or f"Connect call failed ('{fields['host']}', {fields['port']})"
        )
    if kind == "connect_timeout":
        return TimeoutError(message or "")
    import asyncpg.exceptions

    cls = getattr(asyncpg.exceptions, _ASYNCPG[kind])
    texts = {"disconnect": "connection was closed in the middle of operation"}
    state = cls.sqlstate
    text = (
        message
        or texts.get(kind)
        or next((t for s, t in _PG.values() if s == state), kind.replace("_", " "))
    )
    # what SQLAlchemy's asyncpg adapter raises: its own DBAPI class, caused by asyncpg's
    return asyncpg_dbapi_error(dbapi, cls(text))
