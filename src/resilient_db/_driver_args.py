"""The driver settings resilient_db gives a new engine: ``connect_args`` and pool sizing.

Pure functions of the URL and the :class:`~resilient_db.Policy`, shared by
:func:`resilient_db.create_engine`, :func:`resilient_db.create_async_engine`
and the startup checks (which connect with exactly these settings).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL
from sqlalchemy.pool import QueuePool

from ._urls import missing_driver
from .config import Policy
from .errors import ConfigurationError

__all__ = [
    "driver_defaults",
    "engine_kwargs",
    "load_dialect",
    "lock_wait_ms",
    "lock_wait_seconds",
    "merge_connect_args",
]

#: Seconds: the most SQLite's busy timeout gets from ``Timeouts.statement``. SQLite
#: has no server and no watchdog: the busy timeout is the only bound on a statement
#: waiting for another connection's lock, and a lock held longer than a second is a
#: long writer (a migration, ``VACUUM``, a backup), not contention: waiting it out
#: holds a worker per request (``connect_args={"timeout": ...}`` sets another).
SQLITE_BUSY_CAP = 1.0


def load_dialect(url: URL) -> Any:
    try:
        dialect_cls = url.get_dialect()
    except sa_exc.NoSuchModuleError:
        raise ConfigurationError(
            "url",
            f"names an unknown dialect or driver '{url.drivername}'.",
            "Use postgresql+psycopg, postgresql+asyncpg, mysql+pymysql, mysql+aiomysql or sqlite.",
        ) from None
    try:
        dialect_cls.import_dbapi()
    except ImportError as exc:  # a bare ModuleNotFoundError from inside SQLAlchemy otherwise
        raise ConfigurationError("url", *missing_driver(url, exc)) from None
    return dialect_cls


#: The share of ``Timeouts.statement`` a single lock wait may take by default.
LOCK_WAIT_SHARE = 0.5


def lock_wait_ms(statement: float) -> int:
    """The default lock-wait timeout in milliseconds for a statement timeout in seconds."""
    return max(1, int(statement * LOCK_WAIT_SHARE * 1000))


def lock_wait_seconds(statement: float) -> int:
    """InnoDB's lock-wait timeout: whole seconds, at least 1 (0 would mean "never wait")."""
    return max(1, int(statement * LOCK_WAIT_SHARE))


def driver_defaults(url: URL, policy: Policy) -> dict[str, Any]:
    """The ``connect_args`` resilient_db applies for ``url``'s driver.

    Finite connect timeouts (libpq and PyMySQL wait for ever or very long), a
    read timeout where the driver has a cheap one (PyMySQL; the watchdog bounds
    the calls of the others), a server-side statement timeout, a lock-wait
    timeout of half of it (PostgreSQL ``lock_timeout``; InnoDB's
    ``innodb_lock_wait_timeout`` is set with ``max_statement_time`` when the
    connection opens, see ``_connect.py``), so a lock wait ends as a retryable
    ``lock_timeout`` before the statement timeout would end it, TCP keepalives
    and ``application_name``. Anything the caller set wins.
    """
    t = policy.timeouts
    backend, driver = url.get_backend_name(), url.get_driver_name()
    args: dict[str, Any] = {}
    if backend == "postgresql" and driver in ("psycopg", "psycopg2", "psycopg_async"):
        if t.connect is not None:
            args["connect_timeout"] = max(2, round(t.connect))
        if policy.application_name:
            args["application_name"] = policy.application_name
        args.update(keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3)
        if t.call is not None:
            args["tcp_user_timeout"] = int(t.call * 1000)
        if t.statement is not None:
            args["options"] = (
                f"-c statement_timeout={int(t.statement * 1000)} "
                f"-c lock_timeout={lock_wait_ms(t.statement)}"
            )
    elif backend == "postgresql" and driver == "asyncpg":
        if t.connect is not None:
            args["timeout"] = t.connect
        # Timeouts.call: the watchdog, not command_timeout (a loop timer per protocol
        # exchange); a command_timeout given in connect_args still wins (_deadline.py)
        settings: dict[str, str] = {}
        if policy.application_name:
            settings["application_name"] = policy.application_name
        if t.statement is not None:
            settings["statement_timeout"] = str(int(t.statement * 1000))
            settings["lock_timeout"] = str(lock_wait_ms(t.statement))
        if settings:
            args["server_settings"] = settings
    elif backend in ("mysql", "mariadb"):
        if t.connect is not None:
            args["connect_timeout"] = max(1, round(t.connect))
        # Timeouts.call: the watchdog, as for psycopg, not PyMySQL's read_timeout /
        # write_timeout (a poll before every read, and the resilient_db_call_timeout
        # option could not lift them); the greeting is bounded by the connect timeout
        if policy.application_name and driver in ("pymysql", "aiomysql"):
            args["program_name"] = policy.application_name
    elif backend == "sqlite" and t.statement is not None:
        args["timeout"] = min(t.statement, SQLITE_BUSY_CAP)
    return args


def merge_connect_args(url: URL, policy: Policy, given: dict[str, Any]) -> dict[str, Any]:
    merged = driver_defaults(url, policy)
    query = set(url.query)
    for key in list(merged):
        if key in query:  # set in the URL's query string: the URL wins
            merged.pop(key)
    if "options" in merged and "options" in given:
        # libpq applies repeated -c settings in order: the caller's come last and win
        merged["options"] = f"{merged['options']} {given['options']}"
        given = {k: v for k, v in given.items() if k != "options"}
    if "server_settings" in merged and "server_settings" in given:
        merged["server_settings"] = {**merged["server_settings"], **given["server_settings"]}
        given = {k: v for k, v in given.items() if k != "server_settings"}
    merged.update(given)
    return merged


def engine_kwargs(url: URL, policy: Policy, kwargs: dict[str, Any]) -> dict[str, Any]:
    dialect_cls = load_dialect(url)
    kw = dict(kwargs)
    kw["connect_args"] = merge_connect_args(url, policy, dict(kw.get("connect_args") or {}))
    kw.setdefault("hide_parameters", True)
    poolclass = kw.get("poolclass")
    if poolclass is None and "pool" not in kw:
        try:
            poolclass = dialect_cls.get_pool_class(url)
        except Exception:
            poolclass = None
    if isinstance(poolclass, type) and issubclass(poolclass, QueuePool):
        p = policy.pool
        kw.setdefault("pool_size", p.size)
        kw.setdefault("max_overflow", p.max_overflow)
        kw.setdefault("pool_timeout", policy.timeouts.checkout)
        if p.recycle is not None and url.get_backend_name() != "sqlite":
            # SQLite has no server to time idle connections out
            kw.setdefault("pool_recycle", p.recycle)
    return kw
