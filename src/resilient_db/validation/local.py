"""Checks that need no network: the URL and driver, the policy, hygiene, the SQLite file.

Layer 1 (RDB1xx) parses the URL and reads the connect arguments every later
check uses; the RDB5xx/RDB6xx checks here compare the policy with what the
driver will do; RDB307-RDB309 look at the SQLite file on disk.
"""

from __future__ import annotations

import inspect
import ipaddress
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url

from .. import _compat
from .._driver_args import merge_connect_args
from .._urls import mask_url, missing_driver, port_problem, scheme_problem, secret_values
from ..classify import Target
from .context import _as_float, _Run, _secs

# --------------------------------------------------------------------------- URL and driver


def _check_url(run: _Run) -> bool:
    """RDB101-RDB103: the URL parses, names a known dialect, and its driver is installed."""
    source = run.source
    if hasattr(source, "sync_engine"):
        source = source.sync_engine
    if isinstance(source, Engine):
        run.engine = source
        url: URL = source.url
    elif isinstance(source, URL):
        url = source
    elif isinstance(source, str):
        try:
            url = make_url(source)
        except (sa_exc.ArgumentError, ValueError, TypeError):
            port = port_problem(source)
            if port is not None:
                run.add(
                    "RDB101",
                    "error",
                    f"The database URL {port}",
                    "Give the port as a number, e.g. postgresql+psycopg://app@db:5432/shop.",
                    "url",
                )
                run.block("RDB101", "url", "network", "connection")
                return False
            run.add(
                "RDB101",
                "error",
                "The database URL cannot be parsed (expected "
                "dialect+driver://user:password@host:port/database).",
                "Check the URL; special characters in the user or password "
                "(@ : / % #) must be %-encoded.",
                "url",
            )
            run.block("RDB101", "url", "network", "connection")
            return False
    else:  # pragma: no cover - checked by _validate()
        raise TypeError(type(source).__name__)
    run.url = url
    run.password = url.password if isinstance(url.password, str) else None
    run.secrets = secret_values(url)
    run.masked = mask_url(url)
    scheme = scheme_problem(url)
    if scheme is not None:
        run.ok("RDB101", "The URL is well formed.")
        run.add("RDB102", "error", f"The URL {scheme[0]}", scheme[1], "url")
        run.block("RDB102", "url", "network", "connection")
        return False
    try:
        dialect_cls = url.get_dialect()
    except sa_exc.NoSuchModuleError:
        run.ok("RDB101", "The URL is well formed.")
        run.add(
            "RDB102",
            "error",
            f"SQLAlchemy knows no dialect or driver named '{url.drivername}'.",
            "Use postgresql+psycopg, postgresql+asyncpg, mysql+pymysql, mysql+aiomysql or "
            "sqlite (with an optional +driver).",
            "url",
        )
        run.block("RDB102", "url", "network", "connection")
        return False
    run.target = Target.from_url(url)
    run.ok("RDB101", "The URL is well formed.")
    run.backend = url.get_backend_name()
    run.driver = url.get_driver_name()
    run.is_async = bool(getattr(dialect_cls, "is_async", False))
    run.ok("RDB102", f"Dialect {run.backend}, driver {run.driver}.")
    try:
        dialect_cls.import_dbapi()
    except ImportError as exc:
        problem, fix = missing_driver(url, exc)
        run.add("RDB103", "error", f"The URL {problem}", fix, "url")
        run.block("RDB103", "url", "network", "connection")
        return False
    run.ok("RDB103", f"The driver '{run.driver}' is installed.")
    return True


def _prepare_connect_args(run: _Run) -> None:
    """Read the connect arguments (or creator) and do_connect listeners the driver will get."""
    assert run.url is not None
    if run.engine is not None:
        pool = run.engine.pool
        creator = _compat.pool_creator(pool)
        cparams: Any = None
        if callable(creator):
            try:
                cparams = inspect.getclosurevars(creator).nonlocals.get("cparams")
            except TypeError:
                cparams = None
        if isinstance(cparams, Mapping):
            run.args = dict(cparams)
        elif callable(creator):
            run.creator = creator
        run.resilient = False
        for fn in run.engine.dialect.dispatch.do_connect:
            if getattr(fn, "__module__", "") != "resilient_db._attach":
                run.listeners.append(fn)
            else:
                run.resilient = True
    else:
        run.args = merge_connect_args(run.url, run.policy, {})


# --------------------------------------------------------------------------- policy and hygiene


def _is_loopback(host: str | None) -> bool:
    if not host or host.startswith("/") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_connect_timeout(run: _Run) -> None:
    """RDB501: a finite connect timeout is in effect for the driver."""
    if run.backend == "sqlite":
        return
    if run.creator is not None:
        run.ok("RDB501", "The engine uses a custom creator; its timeouts cannot be inspected.")
        return
    t = run.policy.timeouts.connect
    why = ""
    if run.backend == "postgresql" and run.driver == "asyncpg":
        eff = _as_float(run.opt("timeout"))
        eff = 60.0 if eff is None else eff
    elif run.backend == "postgresql":
        eff = _as_float(run.opt("connect_timeout"))
        if eff is None or eff <= 0:
            eff, why = None, "libpq waits for ever for an unreachable server or a silent port"
    elif run.driver == "pymysql":
        eff = _as_float(run.opt("connect_timeout"))
        eff = 10.0 if eff is None else eff
        if not run.resilient and _as_float(run.opt("read_timeout")) is None:
            eff, why = None, "PyMySQL's connect_timeout does not cover the handshake"
    else:
        eff = _as_float(run.opt("connect_timeout"))
    if eff is None:
        run.add(
            "RDB501",
            "warning",
            f"No finite connect timeout is in effect for {run.driver}: "
            f"{why or 'a connection attempt can hang'}.",
            "Set Policy.timeouts.connect (e.g. 5) and create the engine with "
            "resilient_db.create_engine(), or set connect_timeout (and read_timeout for "
            "PyMySQL) in connect_args.",
            "timeouts.connect",
        )
    else:
        run.ok("RDB501", f"Connect timeout {_secs(eff)} ({run.driver}).", connect=t)


def _check_statement_timeout(run: _Run) -> None:
    """RDB502: the policy sets a server-side statement timeout."""
    s = run.policy.timeouts.statement
    if s is None:
        run.add(
            "RDB502",
            "warning",
            "No statement timeout (Policy.timeouts.statement is None): a runaway query can "
            "hold a connection and its locks for ever.",
            "Set Policy.timeouts.statement (e.g. 30).",
            "timeouts.statement",
        )
    else:
        run.ok("RDB502", f"Statement timeout {_secs(s)}.")


def _check_call_deadline(run: _Run) -> None:
    """RDB503: a call on a silent connection cannot wait for ever."""
    c = run.policy.timeouts.call
    pymysql_unbounded = (  # resilient_db's watchdog bounds its PyMySQL calls
        run.driver == "pymysql"
        and not run.resilient
        and run.creator is None
        and _as_float(run.opt("read_timeout")) is None
    )
    if c is None or pymysql_unbounded:
        run.add(
            "RDB503",
            "warning",
            "No per-call deadline: a call on a connection whose network went silent "
            "(blackholed by a firewall or a failover) waits for ever.",
            "Set Policy.timeouts.call (e.g. 35) and use resilient_db.create_engine(); for "
            "PyMySQL set read_timeout.",
            "timeouts.call",
        )
    else:
        run.ok("RDB503", f"Per-call deadline {_secs(c)}.")


def _check_connect_vs_retry(run: _Run) -> None:
    """RDB507: one connect attempt must not use up the whole retry deadline."""
    t, d = run.policy.timeouts.connect, run.policy.retry.deadline
    if t is not None and t >= d:
        run.add(
            "RDB507",
            "warning",
            f"The connect timeout ({_secs(t)}) is not shorter than the retry deadline "
            f"({_secs(d)}): one hung attempt uses the whole budget and is never retried.",
            "Make Policy.timeouts.connect a fraction of Policy.retry.deadline (e.g. 5 and 10).",
            "timeouts.connect",
        )
    else:
        run.ok("RDB507", "The connect timeout leaves room for retries.")


def _check_statement_vs_call(run: _Run) -> None:
    """RDB508: the server cancels a slow statement before the client gives up."""
    s, c = run.policy.timeouts.statement, run.policy.timeouts.call
    if s is not None and c is not None and s >= c:
        run.add(
            "RDB508",
            "warning",
            f"The statement timeout ({_secs(s)}) is not shorter than the call deadline "
            f"({_secs(c)}): a slow query is cut by the client, which discards the connection, "
            "instead of being cancelled cleanly by the server.",
            "Keep Policy.timeouts.call a few seconds above Policy.timeouts.statement.",
            "timeouts.call",
        )
    else:
        run.ok("RDB508", "The server cancels slow statements before the client deadline.")


def _check_password_on_command_line(run: _Run) -> None:
    """RDB601: a password given on the command line is visible to every local user."""
    if run.argv_password and (run.password or run.secrets):
        run.add(
            "RDB601",
            "warning",
            "The URL was given on the command line with its password: it is visible in "
            "`ps` output and in shell history.",
            "Put the URL in an environment variable (--env VAR, default DATABASE_URL) or a "
            "secrets file instead.",
            "url",
        )


def _check_application_name(run: _Run) -> None:
    """RDB602: sessions carry a name DBAs can see."""
    if run.backend == "sqlite" or run.creator is not None:
        return
    if run.backend == "postgresql":
        name = run.opt("application_name")
        settings = run.args.get("server_settings")
        if name is None and isinstance(settings, Mapping):
            name = settings.get("application_name")
        where = "pg_stat_activity"
    elif run.driver == "pymysql":
        name = run.opt("program_name")
        where = "the MariaDB processlist / performance_schema connection attributes"
    else:
        return
    if not name:
        run.add(
            "RDB602",
            "warning",
            f"No application_name: this service's sessions cannot be told apart in {where}.",
            "Set Policy.application_name (or application_name in the URL).",
            "application_name",
        )
    else:
        run.ok("RDB602", f"Sessions are named '{name}'.")


def _check_tls_enforced(run: _Run) -> None:
    """RDB603: a remote database is reached over TLS that cannot silently fall back."""
    if run.backend == "sqlite" or run.creator is not None:
        return
    host = run.target.host
    if _is_loopback(host):
        run.ok("RDB603", "Loopback or Unix socket: TLS is not needed.")
        return
    if run.backend == "postgresql" and run.driver == "asyncpg":
        mode = run.opt("ssl")
        enforced = mode not in (None, False, "disable", "allow", "prefer")
    elif run.backend == "postgresql":
        mode = run.opt("sslmode")
        enforced = mode in ("require", "verify-ca", "verify-full")
    else:
        mode = run.opt("ssl")
        enforced = (
            bool(mode)
            or any(k.startswith("ssl") for k in run.args)
            or any(k.startswith("ssl") for k in (run.url.query if run.url is not None else {}))
        )
    if enforced:
        run.ok("RDB603", f"TLS is required for {host}.")
    else:
        fix = (
            "Add ?sslmode=require (better verify-full with sslrootcert) to the URL."
            if run.backend == "postgresql"
            else "Add ?ssl_ca=/path/to/ca.pem (or pass ssl={...} in connect_args)."
        )
        run.add(
            "RDB603",
            "warning",
            f"TLS is not enforced for {host}, which is not a loopback address: the driver's "
            "default falls back to plaintext without a word.",
            fix,
            "url",
        )


def _check_hide_parameters(run: _Run) -> None:
    """RDB604: bind parameters stay out of error messages and logs."""
    if run.engine is None:
        return
    if getattr(run.engine, "hide_parameters", True):
        run.ok("RDB604", "Bind parameters are hidden from error messages.")
    else:
        run.add(
            "RDB604",
            "warning",
            "hide_parameters is off: bind parameters (personal data, secrets) appear in error "
            "messages and logs.",
            "Create the engine with hide_parameters=True (resilient_db.create_engine does).",
            "hide_parameters",
        )


_LOCAL_CHECKS: tuple[Callable[[_Run], None], ...] = (
    _check_connect_timeout,
    _check_statement_timeout,
    _check_call_deadline,
    _check_connect_vs_retry,
    _check_statement_vs_call,
    _check_password_on_command_line,
    _check_application_name,
    _check_tls_enforced,
    _check_hide_parameters,
)


# --------------------------------------------------------------------------- SQLite file


def _sqlite_path(run: _Run) -> Path | None:
    assert run.url is not None
    db = run.url.database
    if not db or db == ":memory:":
        return None
    if str(run.url.query.get("uri", "")).lower() in ("true", "1") or db.startswith("file:"):
        parts = urlsplit(db)
        if "mode=memory" in parts.query:
            return None
        return Path(unquote(parts.path))
    return Path(db)


def _check_sqlite_file(run: _Run) -> None:
    """RDB307-RDB309: the SQLite file's directory, the file, and write access."""
    path = _sqlite_path(run)
    if path is None:
        run.ok("RDB308", "In-memory database: nothing on disk to check; data is lost at exit.")
        return
    path = path if path.is_absolute() else Path.cwd() / path
    directory = path.parent
    read_only = run.policy.access == "read-only" or "mode=ro" in str(run.url)
    if not directory.is_dir():
        run.add(
            "RDB307",
            "error",
            f"The directory of the SQLite file does not exist: {directory}.",
            "Create the directory or fix the path (sqlite:///relative.db is relative to the "
            "working directory, sqlite:////abs/path.db is absolute).",
            "url",
        )
        run.block("RDB307", "connection")
        return
    run.ok("RDB307", f"The directory {directory} exists.")
    if not path.exists():
        run.add(
            "RDB308",
            "warning",
            f"The SQLite file {path} does not exist yet: connecting will create an empty "
            "database there.",
            "Check the path if the data should already be there.",
            "url",
        )
        run.block("RDB308", "connection")
        if not read_only and not os.access(directory, os.W_OK):
            run.add(
                "RDB309",
                "error",
                f"The directory {directory} is not writable by this process, so the database "
                "cannot be created.",
                "Fix the directory's permissions or ownership.",
                "url",
            )
        return
    run.ok("RDB308", f"The SQLite file {path} exists ({path.stat().st_size} bytes).")
    if read_only:
        run.ok("RDB309", "Write access is not needed (read-only).")
    elif not os.access(path, os.W_OK) or not os.access(directory, os.W_OK):
        what = "file" if not os.access(path, os.W_OK) else "directory (needed for the journal)"
        run.add(
            "RDB309",
            "error",
            f"The SQLite {what} is not writable by this process ({path}), but the policy "
            "expects read-write.",
            "Fix the permissions or ownership of the file and its directory, or set "
            "Policy.access='read-only'.",
            "url",
        )
    else:
        run.ok("RDB309", "The file and its directory are writable.")
