"""Startup validation: will this URL and policy work, and if not, why not?

:func:`validate` runs small checks, layer by layer, and returns a
:class:`Report` of :class:`Finding` values with stable codes (the full list,
with causes and fixes, is in ``docs/checks.md``)::

    RDB1xx  URL and driver          RDB4xx  server capacity and version
    RDB2xx  network: DNS, TCP, TLS  RDB5xx  policy timeouts vs the server's
    RDB3xx  login, database, role   RDB6xx  hygiene

Once a layer fails, the checks that need the server are reported as skipped,
so the first error is the root cause. The whole run is bounded by its
deadline: each network step gets the policy's connect timeout or what is left
of the deadline, and the checks run in a worker thread that is abandoned if a
driver ignores its timeout.

Validation opens its own short-lived connections (a throw-away engine with
``NullPool`` and the engine's connect arguments), never the engine's pool, so
its failures do not count for the circuit breaker. No password appears in a
report.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import math
import os
import re
import socket
import sqlite3
import textwrap
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit

import sqlalchemy
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import NullPool

from .classify import Classification, Kind, Target, classify
from .config import DEFAULT_POLICY, Policy
from .errors import ConfigurationError

__all__ = ["CHECKS", "SCHEMA_VERSION", "Finding", "Report", "startup_check", "validate"]

Severity = Literal["error", "warning", "info"]
Detail = str | int | float | bool | None

#: Version of :meth:`Report.to_dict`'s layout; bumped only on incompatible changes.
SCHEMA_VERSION = 1

_LOG = logging.getLogger("resilient_db")

#: Every check code and its short title. Codes are stable; see ``docs/checks.md``.
CHECKS: Mapping[str, str] = MappingProxyType(
    {
        "RDB000": "validator",
        "RDB101": "URL syntax",
        "RDB102": "dialect",
        "RDB103": "driver installed",
        "RDB201": "DNS",
        "RDB202": "TCP connect",
        "RDB203": "host reachable",
        "RDB204": "TLS",
        "RDB205": "database greeting",
        "RDB206": "handshake",
        "RDB209": "deadline",
        "RDB301": "authentication",
        "RDB302": "user exists",
        "RDB303": "database exists",
        "RDB304": "connection settings",
        "RDB305": "read-write server",
        "RDB306": "write privilege",
        "RDB307": "SQLite directory",
        "RDB308": "SQLite file",
        "RDB309": "SQLite writable",
        "RDB399": "connect",
        "RDB400": "server version",
        "RDB401": "connection slots",
        "RDB402": "pool vs max_connections",
        "RDB403": "pool vs free slots",
        "RDB404": "pool vs user limit",
        "RDB405": "supported version",
        "RDB406": "server ready",
        "RDB501": "connect timeout",
        "RDB502": "statement timeout",
        "RDB503": "call deadline",
        "RDB504": "pool_recycle vs wait_timeout",
        "RDB505": "pool_recycle vs idle_session_timeout",
        "RDB506": "idle-in-transaction timeout",
        "RDB507": "connect timeout vs retry deadline",
        "RDB508": "statement timeout vs call deadline",
        "RDB601": "password on command line",
        "RDB602": "application_name",
        "RDB603": "TLS enforced",
        "RDB604": "hide_parameters",
        "RDB605": "SQLite journal mode",
    }
)

_LAYERS = {
    "0": "validator",
    "1": "url",
    "2": "network",
    "3": "database",
    "4": "server",
    "5": "policy",
    "6": "hygiene",
}

# Oldest server versions still maintained upstream; older ones get RDB405.
_MIN_VERSIONS = {"PostgreSQL": (13,), "MariaDB": (10, 6), "MySQL": (8, 0)}

_DRIVER_PACKAGES = {
    "psycopg": "psycopg[binary]",
    "psycopg_async": "psycopg[binary]",
    "psycopg2": "psycopg2-binary",
    "asyncpg": "asyncpg",
    "pg8000": "pg8000",
    "pymysql": "PyMySQL",
    "aiomysql": "aiomysql",
    "mysqldb": "mysqlclient",
    "asyncmy": "asyncmy",
    "aiosqlite": "aiosqlite",
}

_MARGIN = 0.25  # seconds kept back from each network step to report its outcome
_DEFAULT_CONNECT = 5.0


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Finding:
    """The outcome of one check.

    ``severity`` is ``error`` (it will not work), ``warning`` (it works but
    will hurt) or ``info`` (passed, skipped or worth knowing). ``field`` names
    the setting to change, when there is one. Never holds a password.
    """

    code: str
    severity: Severity
    title: str
    message: str
    fix: str = ""
    field: str | None = None
    skipped: bool = False
    details: tuple[tuple[str, Detail], ...] = ()

    @property
    def layer(self) -> str:
        """``url``, ``network``, ``database``, ``server``, ``policy`` or ``hygiene``."""
        return _LAYERS.get(self.code[3:4], "other")

    @property
    def status(self) -> str:
        """``error``, ``warning``, ``skipped`` or ``ok`` (an info that passed)."""
        if self.skipped:
            return "skipped"
        return "ok" if self.severity == "info" else self.severity

    def to_dict(self) -> dict[str, Any]:
        """The finding as a JSON-serialisable dict (see ``docs/checks.md``)."""
        return {
            "code": self.code,
            "severity": self.severity,
            "status": self.status,
            "layer": self.layer,
            "title": self.title,
            "message": self.message,
            "fix": self.fix,
            "field": self.field,
            "skipped": self.skipped,
            "details": dict(self.details),
        }


@dataclass(frozen=True, slots=True)
class Report:
    """Everything :func:`validate` found, sorted by code (layer order).

    ``root_cause`` is the first error: the lowest failing layer.
    """

    url: str
    target: Target
    access: str
    findings: tuple[Finding, ...]
    elapsed: float
    deadline: float

    @property
    def ok(self) -> bool:
        """True when no check found an error (warnings allowed)."""
        return not self.errors

    @property
    def root_cause(self) -> Finding | None:
        """The first error, or None."""
        return self.errors[0] if self.errors else None

    @property
    def errors(self) -> tuple[Finding, ...]:
        """The findings of severity ``error``."""
        return tuple(f for f in self.findings if f.severity == "error")

    @property
    def warnings(self) -> tuple[Finding, ...]:
        """The findings of severity ``warning``."""
        return tuple(f for f in self.findings if f.severity == "warning")

    def codes(self) -> tuple[str, ...]:
        """The codes of every finding, in order."""
        return tuple(f.code for f in self.findings)

    def get(self, code: str) -> Finding | None:
        """The first finding with ``code``, or None."""
        return next((f for f in self.findings if f.code == code), None)

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-serialisable dict, schema version 1 (``docs/checks.md``)."""
        t = self.target
        root = self.root_cause
        return {
            "schema_version": SCHEMA_VERSION,
            "ok": self.ok,
            "url": self.url,
            "target": {
                "dialect": t.dialect,
                "driver": t.driver,
                "host": t.host,
                "port": t.port,
                "database": t.database,
                "user": t.user,
            },
            "access": self.access,
            "elapsed": round(self.elapsed, 3),
            "deadline": self.deadline,
            "root_cause": root.to_dict() if root is not None else None,
            "summary": {
                "error": len(self.errors),
                "warning": len(self.warnings),
                "info": sum(1 for f in self.findings if f.severity == "info"),
                "skipped": sum(1 for f in self.findings if f.skipped),
            },
            "findings": [f.to_dict() for f in self.findings],
        }

    def summary(self) -> str:
        """``"1 error, 2 warnings, 5 skipped in 0.03s"``."""
        e, w = len(self.errors), len(self.warnings)
        s = sum(1 for f in self.findings if f.skipped)
        return (
            f"{e} error{'s' * (e != 1)}, {w} warning{'s' * (w != 1)}, {s} skipped "
            f"in {self.elapsed:.2f}s"
        )

    def render(self, *, color: bool = False, width: int = 100, verbose: bool = True) -> str:
        """A readable table, root cause first.

        ``color`` adds ANSI colours; ``verbose=False`` lists only errors and warnings.
        """
        return _render(self, color=color, width=width, verbose=verbose)

    def __str__(self) -> str:
        return self.render()


class _Style:
    def __init__(self, color: bool) -> None:
        self.color = color

    def __call__(self, text: str, *codes: str) -> str:
        if not self.color or not codes:
            return text
        return f"\033[{';'.join(codes)}m{text}\033[0m"


_STATUS_LABEL = {"error": "ERROR", "warning": "WARN", "skipped": "skip", "ok": "ok"}
_STATUS_STYLE = {"error": ("1", "31"), "warning": ("33",), "skipped": ("2",), "ok": ("32",)}


def _render(report: Report, *, color: bool, width: int, verbose: bool) -> str:
    st = _Style(color)
    width = max(60, width)
    lines = [
        f"resilient-db check of {report.url}",
        f"expecting {report.access}; deadline {report.deadline:g}s; {report.summary()}",
    ]
    root = report.root_cause
    if root is not None:
        lines.append("")
        lines.append(st(f"ROOT CAUSE {root.code} ({root.title})", "1", "31"))
        for para in (root.message, f"Fix: {root.fix}" if root.fix else ""):
            if para:
                lines += textwrap.wrap(para, width - 2, initial_indent="  ", subsequent_indent="  ")
    rows = [f for f in report.findings if verbose or (f.severity != "info" and f is not root)]
    if not rows:
        return "\n".join(lines)
    lines.append("")
    title_w = max([len("CHECK")] + [len(f.title) for f in rows])
    title_w = min(title_w, 36)
    head = f"{'CODE':<7} {'STATUS':<6} {'CHECK':<{title_w}} RESULT"
    lines.append(st(head, "1"))
    indent = 7 + 1 + 6 + 1 + title_w + 1
    text_w = max(30, width - indent)
    for f in rows:
        body = textwrap.wrap(f.message, text_w) or [""]
        if f.fix and f.severity != "info":
            body += textwrap.wrap(f"fix: {f.fix}", text_w)
        label = _STATUS_LABEL[f.status]
        status = st(f"{label:<6}", *_STATUS_STYLE[f.status])
        lines.append(f"{f.code:<7} {status} {f.title[:title_w]:<{title_w}} {body[0]}")
        lines += [" " * indent + b for b in body[1:]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- public API


def validate(
    url_or_engine: str | URL | Engine | Any,
    *,
    policy: Policy | None = None,
    deadline: float = 10.0,
) -> Report:
    """Check a database URL or engine layer by layer and explain what is wrong.

    ``url_or_engine`` is a URL (string or :class:`sqlalchemy.engine.URL`), an
    :class:`~sqlalchemy.engine.Engine` or an ``AsyncEngine``; an engine is
    checked with its own connect arguments and pool size. ``policy`` defaults
    to the engine's policy (or :data:`~resilient_db.DEFAULT_POLICY`). The whole
    validation finishes within ``deadline`` seconds, even against a blackholed
    host. Never raises for a bad configuration: read :attr:`Report.root_cause`.
    """
    return _validate(url_or_engine, policy=policy, deadline=deadline)


def startup_check(engine: Engine, *, strict: bool) -> None:
    """Validate ``engine`` at creation, bounded by its ``policy.retry.deadline``.

    With ``strict`` an error raises :class:`ConfigurationError` whose message is
    the whole report (root cause first, ``field`` the failing setting or
    ``url``); otherwise errors and warnings are logged as one WARNING record on
    the ``resilient_db`` logger, with the report in
    ``extra={"resilient_db_report": report.to_dict()}``.
    """
    policy = _policy_for(engine, None)
    report = _validate(engine, policy=policy, deadline=policy.retry.deadline)
    root = report.root_cause
    if strict and root is not None:
        raise ConfigurationError(
            root.field or "url",
            f"[{root.code}] {root.message}",
            f"{root.fix}\n\n{report.render(verbose=False)}",
            report=report,
        )
    if report.errors or report.warnings:
        _LOG.warning(
            "resilient_db startup check: %s",
            report.render(verbose=False),
            extra={"resilient_db_report": report.to_dict()},
        )
    else:
        _LOG.debug("resilient_db startup check passed: %s", report.summary())


def _validate(
    source: Any,
    *,
    policy: Policy | None,
    deadline: float,
    password_on_command_line: bool = False,
) -> Report:
    if (
        isinstance(deadline, bool)
        or not isinstance(deadline, (int, float))
        or not math.isfinite(deadline)
        or deadline <= 0
    ):
        raise ConfigurationError(
            "deadline", f"must be a positive number of seconds, got {deadline!r}.", "Pass e.g. 10."
        )
    if not isinstance(source, (str, URL, Engine)) and not isinstance(
        getattr(source, "sync_engine", None), Engine
    ):
        raise ConfigurationError(
            "url_or_engine",
            f"must be a URL string, sqlalchemy URL, Engine or AsyncEngine, got "
            f"{type(source).__name__}.",
            "Pass DATABASE_URL or an engine.",
        )
    run = _Run(
        source,
        policy=_policy_for(source, policy),
        deadline=float(deadline),
        password_on_command_line=password_on_command_line,
    )
    worker = threading.Thread(target=run.execute, name="resilient-db-validate", daemon=True)
    worker.start()
    worker.join(max(0.0, run.deadline_at - run.clock()))
    if worker.is_alive():
        run.abandon()
    return run.report()


def _policy_for(source: Any, policy: Policy | None) -> Policy:
    if policy is not None:
        if not isinstance(policy, Policy):
            raise ConfigurationError(
                "policy",
                f"must be a resilient_db.Policy, got {type(policy).__name__}.",
                "Build one with resilient_db.Policy(...).",
            )
        return policy
    if isinstance(source, (str, URL)):
        return DEFAULT_POLICY
    from .engine import policy_of

    try:
        return policy_of(source)
    except ConfigurationError:
        return DEFAULT_POLICY


# --------------------------------------------------------------------------- the run


class _ConnectFailed(Exception):
    def __init__(self, exc: BaseException) -> None:
        super().__init__(type(exc).__name__)
        self.exc = exc


@dataclass
class _Facts:
    """What the probe read from the server (missing values stay None)."""

    product: str = ""
    version: str = ""
    version_tuple: tuple[int, ...] = ()
    user: str | None = None
    database: str | None = None
    connect_ms: float = 0.0
    max_connections: int | None = None
    reserved: int = 0
    current: int | None = None
    superuser: bool = False
    user_limit: int | None = None
    database_limit: int | None = None
    read_only: bool | None = None
    read_only_reason: str = ""
    bypasses_read_only: bool = False
    can_write: bool | None = None
    write_reason: str = ""
    idle_session_timeout: float | None = None
    idle_in_tx_timeout: float | None = None
    wait_timeout: int | None = None
    interactive_timeout: int | None = None
    journal_mode: str | None = None
    errors: dict[str, str] = field(default_factory=dict)


class _Run:
    """One validation: state shared by the checks, filled by the worker thread."""

    def __init__(
        self,
        source: Any,
        *,
        policy: Policy,
        deadline: float,
        password_on_command_line: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.t0 = clock()
        self.deadline = deadline
        self.deadline_at = self.t0 + deadline
        self.argv_password = password_on_command_line
        self._lock = threading.Lock()
        self._findings: list[Finding] = []
        self._abandoned = False
        self.step = "starting"
        # level -> code of the failure that blocks it: url, network, connection
        self.blocked: dict[str, str] = {}
        self.engine: Engine | None = None
        self.url: URL | None = None
        self.masked = "<invalid URL>"
        self.password: str | None = None
        self.target = Target()
        self.backend = ""
        self.driver = ""
        self.is_async = False
        self.args: dict[str, Any] = {}
        self.creator: Callable[..., Any] | None = None
        self.listeners: list[Callable[..., Any]] = []
        self.addrs: list[tuple[Any, Any, Any, Any, Any]] = []
        self.tcp_ok: bool | None = None
        self.facts: _Facts | None = None
        self.source = source
        self.policy = policy

    # -- bookkeeping ---------------------------------------------------------------

    def remaining(self) -> float:
        return self.deadline_at - self.clock()

    def step_timeout(self) -> float | None:
        """Time allowed for one network step, or None when the deadline is spent."""
        left = self.remaining() - _MARGIN
        if left <= 0.05:
            return None
        connect = self.policy.timeouts.connect
        return min(connect if connect is not None else _DEFAULT_CONNECT, left)

    def scrub(self, text: str) -> str:
        pw = self.password
        if pw:
            for form in {pw, quote(pw, safe=""), quote(pw)}:
                if len(form) < 4:  # too short to tell from ordinary text; not a real secret
                    continue
                if len(form) >= 8:
                    text = text.replace(form, "***")
                else:  # a short password would mangle ordinary words
                    text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(form)}(?![A-Za-z0-9])", "***", text)
        return text

    def add(
        self,
        code: str,
        severity: Severity,
        message: str,
        fix: str = "",
        field: str | None = None,
        /,
        **details: Detail,
    ) -> None:
        self._append(code, severity, message, fix, field, False, details)

    def _append(
        self,
        code: str,
        severity: Severity,
        message: str,
        fix: str,
        field: str | None,
        skipped: bool,
        details: Mapping[str, Detail],
    ) -> None:
        f = Finding(
            code=code,
            severity=severity,
            title=CHECKS[code],
            message=self.scrub(message),
            fix=self.scrub(fix),
            field=field,
            skipped=skipped,
            details=tuple(
                (k, self.scrub(v) if isinstance(v, str) else v) for k, v in details.items()
            ),
        )
        with self._lock:
            if not self._abandoned:
                self._findings.append(f)

    def ok(self, code: str, message: str, **details: Detail) -> None:
        self.add(code, "info", message, **details)

    def skip(self, code: str, because: str) -> None:
        verb = "failed" if self._severity_of(because) == "error" else "reported a problem"
        self._append(code, "info", f"skipped because {because} {verb}", "", None, True, {})

    def _severity_of(self, code: str) -> str:
        with self._lock:
            return next((f.severity for f in self._findings if f.code == code), "error")

    def block(self, code: str, *levels: str) -> None:
        for level in levels:
            self.blocked.setdefault(level, code)

    def abandon(self) -> None:
        """The worker overran the deadline: freeze the findings and say where it hung."""
        with self._lock:
            if self._abandoned:
                return
            step = self.step
        self.add(
            "RDB209",
            "error",
            f"Validation did not finish within its deadline of {self.deadline:g}s; it was "
            f"still {step}. That step is hanging: a silent network, a "
            "firewall dropping packets, or a driver without a finite timeout.",
            "Check the network path to the database; give the driver a finite connect "
            "timeout (Policy.timeouts.connect) or raise the deadline.",
            step=step,
        )
        with self._lock:
            self._abandoned = True

    def report(self) -> Report:
        with self._lock:
            findings = sorted(self._findings, key=lambda f: f.code)
        return Report(
            url=self.masked,
            target=self.target,
            access=self.policy.access,
            findings=tuple(findings),
            elapsed=self.clock() - self.t0,
            deadline=self.deadline,
        )

    # -- the plan ------------------------------------------------------------------

    def execute(self) -> None:
        try:
            self._execute()
        except Exception as exc:  # a bug in a check must not hide the others
            self.add(
                "RDB000",
                "warning",
                f"Validation stopped unexpectedly while {self.step}: {type(exc).__name__}: "
                f"{_first_line(exc)}",
                "Report this as a bug in resilient_db, with the output of `resilient-db check`.",
            )

    def _execute(self) -> None:
        self.step = "parsing the URL"
        if not self._check_url():
            return
        self._prepare_connect_args()
        for check in _LOCAL_CHECKS:
            check(self)
        if self.backend == "sqlite":
            self.step = "checking the SQLite file"
            _check_sqlite_file(self)
        else:
            self.step = f"resolving {self.target.host}"
            _check_dns(self)
            if self.backend == "postgresql":
                self.step = f"opening a TCP connection to {self.target.where}"
                _check_tcp(self)
        self.step = f"connecting to {self.target.where}"
        _check_connect(self)
        for check in _SERVER_CHECKS:
            check(self)

    # -- layer 1: URL and driver ---------------------------------------------------

    def _check_url(self) -> bool:
        source = self.source
        if hasattr(source, "sync_engine"):
            source = source.sync_engine
        if isinstance(source, Engine):
            self.engine = source
            url: URL = source.url
        elif isinstance(source, URL):
            url = source
        elif isinstance(source, str):
            try:
                url = make_url(source)
            except (sa_exc.ArgumentError, ValueError, TypeError):
                self.add(
                    "RDB101",
                    "error",
                    "The database URL cannot be parsed (expected "
                    "dialect+driver://user:password@host:port/database).",
                    "Check the URL; special characters in the user or password "
                    "(@ : / % #) must be %-encoded.",
                    "url",
                )
                self.block("RDB101", "url", "network", "connection")
                return False
        else:  # pragma: no cover - checked by _validate()
            raise TypeError(type(source).__name__)
        self.url = url
        self.password = url.password if isinstance(url.password, str) else None
        self.masked = url.render_as_string(hide_password=True)
        self.target = Target.from_url(url)
        try:
            dialect_cls = url.get_dialect()
        except sa_exc.NoSuchModuleError:
            self.ok("RDB101", "The URL is well formed.")
            self.add(
                "RDB102",
                "error",
                f"SQLAlchemy knows no dialect or driver named '{url.drivername}'.",
                "Use postgresql+psycopg, postgresql+asyncpg, mysql+pymysql, mysql+aiomysql or "
                "sqlite (with an optional +driver).",
                "url",
            )
            self.block("RDB102", "url", "network", "connection")
            return False
        self.ok("RDB101", "The URL is well formed.")
        self.backend = url.get_backend_name()
        self.driver = url.get_driver_name()
        self.is_async = bool(getattr(dialect_cls, "is_async", False))
        self.ok("RDB102", f"Dialect {self.backend}, driver {self.driver}.")
        try:
            dialect_cls.import_dbapi()
        except ImportError as exc:
            pkg = _DRIVER_PACKAGES.get(self.driver, self.driver)
            self.add(
                "RDB103",
                "error",
                f"The driver '{self.driver}' is not installed ({_first_line(exc)}).",
                f"pip install {pkg} (or resilient-db[postgres] / resilient-db[mysql]).",
                "url",
            )
            self.block("RDB103", "url", "network", "connection")
            return False
        self.ok("RDB103", f"The driver '{self.driver}' is installed.")
        return True

    def _prepare_connect_args(self) -> None:
        assert self.url is not None
        if self.engine is not None:
            pool = self.engine.pool
            creator = getattr(pool, "_creator", None)
            cparams: Any = None
            if callable(creator):
                try:
                    cparams = inspect.getclosurevars(creator).nonlocals.get("cparams")
                except TypeError:
                    cparams = None
            if isinstance(cparams, Mapping):
                self.args = dict(cparams)
            elif callable(creator):
                self.creator = creator
            for fn in self.engine.dialect.dispatch.do_connect:
                if getattr(fn, "__module__", "") != "resilient_db._hooks":
                    self.listeners.append(fn)
        else:
            from .engine import _merge_connect_args

            self.args = _merge_connect_args(self.url, self.policy, {})

    def opt(self, key: str) -> Any:
        """A connect parameter: connect args first, then the URL's query string."""
        if key in self.args:
            return self.args[key]
        assert self.url is not None
        value = self.url.query.get(key)
        if isinstance(value, tuple):
            return value[-1] if value else None
        return value

    # -- connection ----------------------------------------------------------------

    def bounded_args(self, step: float) -> dict[str, Any]:
        """The connect args with every timeout capped to ``step`` seconds."""
        a = dict(self.args)

        def cap(key: str, default: float | None = None) -> float:
            cur = _as_float(a.get(key, self.opt(key)))
            if cur is None or cur <= 0:
                cur = default if default is not None else step
            return min(cur, step)

        if self.backend == "postgresql":
            if self.driver == "asyncpg":
                a["timeout"] = cap("timeout")
                a["command_timeout"] = cap("command_timeout")
            else:
                a["connect_timeout"] = max(2, int(cap("connect_timeout")))
                ms = max(1, int(step * 1000))
                a["options"] = f"{a.get('options', '')} -c statement_timeout={ms}".strip()
        elif self.backend in ("mysql", "mariadb"):
            a["connect_timeout"] = cap("connect_timeout")
            if self.driver == "pymysql":
                a["read_timeout"] = cap("read_timeout")
                a["write_timeout"] = cap("write_timeout")
        elif self.backend == "sqlite" and self.driver != "aiosqlite":
            a["timeout"] = cap("timeout", 1.0)
        return a

    def throwaway(self, args: dict[str, Any]) -> Engine:
        assert self.url is not None
        if self.creator is not None:
            eng = sqlalchemy.create_engine(
                self.url, creator=self.creator, poolclass=NullPool, hide_parameters=True
            )
        else:
            eng = sqlalchemy.create_engine(
                self.url, poolclass=NullPool, connect_args=args, hide_parameters=True
            )
        for fn in self.listeners:
            event.listen(eng, "do_connect", fn)
        return eng

    def open_and_probe(self, args: dict[str, Any], step: float) -> _Facts:
        if self.is_async:
            return asyncio.run(self._aopen_and_probe(args, step))
        eng = self.throwaway(args)
        try:
            t = self.clock()
            try:
                conn = eng.connect()
            except Exception as exc:
                raise _ConnectFailed(exc) from None
            facts = _Facts(connect_ms=(self.clock() - t) * 1000)
            self.step = f"reading server settings from {self.target.where}"
            with conn:
                _probe(conn.execution_options(isolation_level="AUTOCOMMIT"), facts)
            return facts
        finally:
            eng.dispose()

    async def _aopen_and_probe(self, args: dict[str, Any], step: float) -> _Facts:
        from sqlalchemy.ext.asyncio import create_async_engine

        assert self.url is not None
        eng = create_async_engine(
            self.url, poolclass=NullPool, connect_args=args, hide_parameters=True
        )
        try:
            t = self.clock()
            try:
                conn = eng.connect()
                await asyncio.wait_for(conn.start(), timeout=step + _MARGIN / 2)
            except Exception as exc:
                raise _ConnectFailed(exc) from None
            facts = _Facts(connect_ms=(self.clock() - t) * 1000)
            self.step = f"reading server settings from {self.target.where}"
            try:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                await asyncio.wait_for(
                    conn.run_sync(_probe, facts), timeout=max(0.1, self.remaining())
                )
            finally:
                await conn.close()
            return facts
        finally:
            await eng.dispose()

    # -- policy values, from the engine when there is one --------------------------

    def demand(self) -> tuple[int | None, str]:
        """Connections the pools may open in total, and how that was computed."""
        n = self.policy.instances
        per = f"per instance, {n} instance{'s' * (n != 1)}"
        if self.engine is not None:
            pool = self.engine.pool
            size_fn = getattr(pool, "size", None)
            overflow = getattr(pool, "_max_overflow", None)
            if not callable(size_fn) or not isinstance(overflow, int):
                return None, f"the engine's {type(pool).__name__} has no fixed size"
            size = int(size_fn())
            if overflow < 0:
                return None, "max_overflow=-1 lets the pool grow without limit"
        else:
            size, overflow = self.policy.pool.size, self.policy.pool.max_overflow
        return (size + overflow) * n, f"({size} + {overflow} overflow {per})"

    def recycle(self) -> float | None:
        if self.engine is not None:
            r = getattr(self.engine.pool, "_recycle", -1)
            return float(r) if isinstance(r, (int, float)) and r >= 0 else None
        return self.policy.pool.recycle


# --------------------------------------------------------------------------- helpers


def _as_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _first_line(exc: BaseException) -> str:
    """The driver's own words: the innermost DBAPI message, first line, trimmed."""
    inner: BaseException = exc
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException):
        inner = orig
    text = str(inner).strip() or type(inner).__name__
    line = text.splitlines()[0].strip()
    if inner.args and isinstance(inner.args[0], int) and len(inner.args) > 1:
        line = f"{inner.args[0]} {inner.args[1]}"  # PyMySQL: (errno, message)
    return line[:240]


def _is_loopback(host: str | None) -> bool:
    if not host or host.startswith("/") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _secs(value: float) -> str:
    return f"{value:g}s"


# --------------------------------------------------------------------------- local checks


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
        if _as_float(run.opt("read_timeout")) is None:
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
    pymysql_unbounded = (
        run.driver == "pymysql"
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
    if run.argv_password and run.password:
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


# --------------------------------------------------------------------------- network


def _check_dns(run: _Run) -> None:
    """RDB201: the host name resolves."""
    host = run.target.host
    if not host or host.startswith("/"):
        run.ok("RDB201", "No host name: the driver connects over a Unix socket.")
        return
    port = run.target.port or 0
    try:
        ipaddress.ip_address(host)
        literal = True
    except ValueError:
        literal = False
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        temporary = exc.errno == socket.EAI_AGAIN
        run.add(
            "RDB201",
            "error",
            (
                f"The DNS lookup of '{host}' failed temporarily ({exc.strerror}): the "
                "resolver is unreachable or overloaded."
                if temporary
                else f"The host name '{host}' does not resolve ({exc.strerror})."
            ),
            "Check the host in the URL (a typo, a missing DNS record, or a name that only "
            "resolves inside another network or VPN) and this machine's resolver.",
            "url",
        )
        run.block("RDB201", "network", "connection")
        return
    run.addrs = list(infos)
    shown = sorted({str(i[4][0]) for i in infos})
    if literal:
        run.ok("RDB201", f"{host} is an IP address.")
    else:
        run.ok("RDB201", f"{host} resolves to {', '.join(shown[:4])}.", addresses=len(shown))


def _check_tcp(run: _Run) -> None:
    """RDB202/RDB203: something accepts TCP connections at host:port."""
    if "network" in run.blocked:
        run.skip("RDB202", run.blocked["network"])
        return
    if not run.addrs:
        return
    refused = unreachable = 0
    reason = ""
    for family, socktype, proto, _name, sockaddr in run.addrs:
        step = run.step_timeout()
        if step is None:
            run.abandon()
            return
        s = socket.socket(family, socktype, proto)
        s.settimeout(step)
        t = run.clock()
        try:
            s.connect(sockaddr)
        except ConnectionRefusedError:
            refused += 1
        except TimeoutError:
            unreachable += 1
            reason = f"no answer within {_secs(round(step, 2))}"
        except OSError as exc:  # no route, network down...
            unreachable += 1
            reason = exc.strerror or str(exc)
        else:
            run.tcp_ok = True
            run.ok(
                "RDB202",
                f"{run.target.where} accepts TCP connections ({(run.clock() - t) * 1000:.1f} ms).",
            )
            return
        finally:
            s.close()
    run.tcp_ok = False
    where = run.target.where
    if unreachable or not refused:
        run.add(
            "RDB203",
            "error",
            f"{where} did not answer the TCP connection ({reason}): the "
            "host is down or unreachable, or a firewall drops the packets (blackholed).",
            "Check the host and port in the URL, routing, and firewall or security-group "
            "rules between this machine and the database.",
            "url",
        )
        run.block("RDB203", "network", "connection")
    else:
        run.add(
            "RDB202",
            "error",
            f"Nothing accepts connections at {where}: connection refused. The server is "
            "down or restarting, the port is wrong, or it listens on another address.",
            "Check the host and port in the URL, and that the server runs and listens on "
            "that address (PostgreSQL listen_addresses, MariaDB bind-address).",
            "url",
        )
        run.block("RDB202", "network", "connection")


# --------------------------------------------------------------------------- connect


_KIND_CODES: dict[Kind, str] = {
    Kind.DNS: "RDB201",
    Kind.REFUSED: "RDB202",
    Kind.TLS: "RDB204",
    Kind.CONNECT_TIMEOUT: "RDB205",
    Kind.READ_TIMEOUT: "RDB205",
    Kind.DISCONNECT: "RDB206",
    Kind.ADMIN_TERMINATED: "RDB206",
    Kind.IDLE_TIMEOUT: "RDB206",
    Kind.AUTHENTICATION: "RDB301",
    Kind.UNKNOWN_USER: "RDB302",
    Kind.UNKNOWN_DATABASE: "RDB303",
    Kind.CONFIGURATION: "RDB304",
    Kind.READ_ONLY: "RDB305",
    Kind.TOO_MANY_CONNECTIONS: "RDB401",
    Kind.SERVER_SHUTDOWN: "RDB406",
}


def _code_for(run: _Run, exc: BaseException, c: Classification) -> str:
    code = _KIND_CODES.get(c.kind, "RDB399")
    text = _first_line(exc).lower()
    if c.code == "2003" and any(w in text for w in ("timed out", "unreachable", "no route")):
        return "RDB203"  # PyMySQL: the TCP connect itself failed
    if code == "RDB205" and run.tcp_ok is False:
        return "RDB203"
    if run.backend == "sqlite" and code == "RDB304":
        return "RDB399"
    return code


def _connect_message(run: _Run, code: str, words: str, step: float) -> tuple[str, str, str]:
    """(message, fix, field) for a failed connection attempt."""
    t = run.target
    where, user, db = t.where, t.user or "?", t.database or "?"
    said = f" The driver said: {words}"
    if code == "RDB201":
        return (
            f"The host name '{t.host}' does not resolve.{said}",
            "Check the host in the URL and this machine's DNS resolver.",
            "url",
        )
    if code == "RDB202":
        return (
            f"Nothing accepts connections at {where}: connection refused.{said}",
            "Check the host and port in the URL and that the server is running.",
            "url",
        )
    if code == "RDB203":
        return (
            f"{where} did not answer the TCP connection within {_secs(round(step, 2))}: the "
            f"host is down or unreachable, or a firewall drops the packets.{said}",
            "Check the host and port, routing and firewall rules.",
            "url",
        )
    if code == "RDB204":
        return (
            f"TLS mismatch with {where}: the client requires TLS and the server does not "
            f"offer it, or the server requires TLS and the client does not use it.{said}",
            "Make both sides agree: enable TLS on the server, or change sslmode (PostgreSQL) "
            "or the ssl_* parameters (MariaDB) in the URL.",
            "url",
        )
    if code == "RDB205" and run.tcp_ok is None and run.driver != "pymysql":
        return (
            f"{where} did not complete the connection within {_secs(round(step, 2))} (no TCP "
            "answer or no database greeting): a firewall dropping packets, a proxy swallowing "
            f"traffic, another service on that port, or a hung server.{said}",
            "Check the host and port, the firewall rules, and that the port belongs to the "
            "database and the server responds.",
            "url",
        )
    if code == "RDB205":
        return (
            f"{where} accepted the TCP connection but sent no database greeting within "
            f"{_secs(round(step, 2))}: a proxy or firewall swallowing traffic, another service "
            f"on that port, or a hung server.{said}",
            "Check that the port belongs to the database (not a proxy or another service) and "
            "that the server responds; raise Policy.timeouts.connect only if the network is "
            "really that slow.",
            "url",
        )
    if code == "RDB206":
        return (
            f"{where} closed the connection during the handshake.{said}",
            "Read the server log: a proxy, the server's connection limits or a crash may drop it.",
            "url",
        )
    if code == "RDB301":
        return (
            f"{where} rejected the login of user '{user}': the password is wrong or the user "
            f"does not exist.{said}",
            "Check the user and password in the URL (special characters must be %-encoded) "
            "and the server's authentication rules (pg_hba.conf, MariaDB GRANTs and host "
            "part of the account).",
            "url",
        )
    if code == "RDB302":
        return (
            f"The user '{user}' does not exist on {where}.{said}",
            "Fix the user name in the URL, or create the user.",
            "url",
        )
    if code == "RDB303":
        return (
            f"The database '{db}' does not exist on {where}, or user '{user}' may not access "
            f"it.{said}",
            "Fix the database name in the URL, or create it and grant the user access.",
            "url",
        )
    if code == "RDB304":
        return (
            f"{where} rejected the connection settings.{said}",
            "Remove or fix the option in the URL or connect_args (e.g. a parameter only a "
            "superuser may set).",
            "url",
        )
    if code == "RDB305":
        return (
            f"{where} is read-only.{said}",
            "Point the URL at the primary, or set Policy.access='read-only'.",
            "url",
        )
    if code == "RDB401":
        return (
            f"{where} refused the connection because its connection limit is reached now.{said}",
            "Find who holds the connections (pg_stat_activity / SHOW PROCESSLIST), lower "
            "pool size x instances, or raise max_connections.",
            "pool.size",
        )
    if code == "RDB406":
        return (
            f"{where} is not accepting connections (starting up, shutting down or in "
            f"recovery).{said}",
            "Wait for the server to finish starting; read its log if this persists.",
            "url",
        )
    return (
        f"Connecting to {where} failed.{said}",
        "Read the driver's message; see docs/checks.md (RDB399).",
        "url",
    )


def _check_connect(run: _Run) -> None:
    """RDB301 (and every code a failed connect maps to): connect and read the server."""
    server_codes = _server_codes(run)
    blocked = run.blocked.get("connection") or run.blocked.get("network")
    if blocked is not None:
        if run.backend != "sqlite":
            run.skip("RDB301", blocked)
        for code in server_codes:
            run.skip(code, blocked)
        return
    step = run.step_timeout()
    if step is None:
        run.abandon()
        return
    try:
        facts = run.open_and_probe(run.bounded_args(step), step)
    except _ConnectFailed as failed:
        exc = failed.exc
        c = classify(exc, phase="connect", target=run.target)
        code = _code_for(run, exc, c)
        message, fix, fld = _connect_message(run, code, _first_line(exc), step)
        if run.backend != "sqlite" and run.tcp_ok is None and code[:4] != "RDB2":
            run.ok("RDB202", f"{run.target.where} accepts connections.")
        elif run.backend != "sqlite" and run.tcp_ok is None and code == "RDB204":
            run.ok("RDB202", f"{run.target.where} accepts TCP connections.")
        run.add(code, "error", message, fix, fld, kind=c.kind.value, driver_code=c.code)
        run.block(code, "connection")
        if code.startswith("RDB2") and run.backend != "sqlite":
            run.skip("RDB301", code)
        for other in server_codes:
            if other != code:
                run.skip(other, code)
        return
    run.facts = facts
    if run.backend == "sqlite":
        return
    if run.tcp_ok is None:
        run.ok("RDB202", f"{run.target.where} accepts connections.")
    run.ok(
        "RDB301",
        f"Logged in as '{facts.user or run.target.user}' to database "
        f"'{facts.database or run.target.database}' in {facts.connect_ms:.0f} ms.",
    )


def _server_codes(run: _Run) -> tuple[str, ...]:
    if run.backend == "postgresql":
        return ("RDB305", "RDB306", "RDB400", "RDB402", "RDB505", "RDB506")
    if run.backend in ("mysql", "mariadb"):
        return ("RDB305", "RDB306", "RDB400", "RDB402", "RDB504")
    if run.backend == "sqlite":
        return ("RDB605",)
    return ()


# --------------------------------------------------------------------------- probes


def _probe(conn: Connection, facts: _Facts) -> None:
    name = conn.dialect.name
    if name == "postgresql":
        _probe_pg(conn, facts)
    elif name in ("mysql", "mariadb"):
        _probe_mysql(conn, facts)
    elif name == "sqlite":
        _probe_sqlite(conn, facts)


def _query(conn: Connection, facts: _Facts, what: str, sql: str) -> list[Any] | None:
    try:
        return list(conn.exec_driver_sql(sql).fetchall())
    except sa_exc.DBAPIError as exc:
        facts.errors[what] = _first_line(exc)
        return None


_PG_MAIN = """
SELECT version(),
       current_setting('server_version_num')::int,
       current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int
         + coalesce(current_setting('reserved_connections', true), '0')::int,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int,
       pg_is_in_recovery(),
       current_setting('default_transaction_read_only'),
       current_setting('transaction_read_only'),
       r.rolsuper, r.rolconnlimit, d.datconnlimit,
       current_user::text, current_database()::text
FROM pg_roles r, pg_database d
WHERE r.rolname = current_user AND d.datname = current_database()
"""
_PG_SETTINGS = """
SELECT name, setting FROM pg_settings
WHERE name IN ('idle_session_timeout', 'idle_in_transaction_session_timeout')
"""
_PG_WRITE = """
SELECT coalesce(has_schema_privilege(current_schema(), 'CREATE'), false),
       EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE c.relkind IN ('r', 'p')
                 AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                 AND n.nspname !~ '^pg_toast'
                 AND has_table_privilege(c.oid, 'INSERT')),
       coalesce(current_schema()::text, '')
"""


def _probe_pg(conn: Connection, facts: _Facts) -> None:
    facts.product = "PostgreSQL"
    rows = _query(conn, facts, "server", _PG_MAIN)
    if rows:
        (version, num, maxc, reserved, current, recovery, dtro, tro, su, rlim, dlim, u, d) = rows[0]
        facts.version = str(version).split(" on ")[0].replace("PostgreSQL ", "")
        facts.version_tuple = (int(num) // 10000, int(num) % 10000)
        facts.max_connections, facts.reserved, facts.current = int(maxc), int(reserved), current
        facts.superuser = bool(su)
        facts.user_limit = int(rlim) if rlim is not None and int(rlim) >= 0 else None
        facts.database_limit = int(dlim) if dlim is not None and int(dlim) >= 0 else None
        facts.user, facts.database = u, d
        facts.read_only = tro == "on"
        if recovery:
            facts.read_only_reason = "it is a hot standby (pg_is_in_recovery() is true)"
        elif dtro == "on":
            facts.read_only_reason = (
                "default_transaction_read_only is on (set on the server, the database or the role)"
            )
        elif tro == "on":
            facts.read_only_reason = "transaction_read_only is on"
    settings = _query(conn, facts, "settings", _PG_SETTINGS) or []
    values = {str(n): _as_float(v) for n, v in settings}
    ist, iit = values.get("idle_session_timeout"), values.get("idle_in_transaction_session_timeout")
    facts.idle_session_timeout = ist / 1000 if ist else None
    facts.idle_in_tx_timeout = iit / 1000 if iit else None
    if facts.superuser:
        facts.can_write, facts.write_reason = True, "superuser"
        return
    priv = _query(conn, facts, "privileges", _PG_WRITE)
    if priv:
        create, insert, schema = priv[0]
        facts.can_write = bool(create or insert)
        if insert:
            facts.write_reason = "INSERT on at least one table"
        elif create:
            facts.write_reason = f"CREATE on schema {schema}"
        else:
            facts.write_reason = (
                f"no INSERT on any table and no CREATE on schema {schema or '(none)'}"
            )


_GRANT_RE = re.compile(
    r"^GRANT (?P<privs>.+?) ON (?:(?:TABLE|FUNCTION|PROCEDURE|PACKAGE BODY|PACKAGE) )?"
    r"(?P<obj>\S+) TO ",
    re.IGNORECASE,
)
_MAX_USER_RE = re.compile(r"MAX_USER_CONNECTIONS (\d+)", re.IGNORECASE)
_WRITE_PRIVS = {"ALL", "ALL PRIVILEGES", "INSERT", "UPDATE", "DELETE"}
_BYPASS_PRIVS = {"ALL", "ALL PRIVILEGES", "SUPER", "READ_ONLY ADMIN"}


def _db_matches(pattern: str, database: str | None) -> bool:
    if pattern == "*":
        return True
    if database is None:
        return False
    rx = ""
    i = 0
    while i < len(pattern):  # MySQL db patterns: % and _ wildcards, \ escapes
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            rx += re.escape(pattern[i + 1])
            i += 2
            continue
        rx += ".*" if ch == "%" else "." if ch == "_" else re.escape(ch)
        i += 1
    return re.fullmatch(rx, database) is not None


def _parse_grants(lines: list[str], database: str | None, facts: _Facts) -> None:
    write_on: list[str] = []
    roles = False
    for line in lines:
        m = _MAX_USER_RE.search(line)
        if m and int(m.group(1)) > 0:
            facts.user_limit = int(m.group(1))
        g = _GRANT_RE.match(line)
        if g is None:
            roles = roles or line.upper().startswith("GRANT `")
            continue
        privs = {p.strip().split(" (")[0].upper() for p in g.group("privs").split(",")}
        obj = g.group("obj")
        db_part = obj.split(".", 1)[0].strip("`").replace("``", "`")
        if obj == "*.*" and privs & _BYPASS_PRIVS:
            facts.bypasses_read_only = True
        if privs & _WRITE_PRIVS and _db_matches(db_part, database):
            write_on.append(obj)
    if write_on:
        facts.can_write, facts.write_reason = True, f"write privileges on {write_on[0]}"
    elif roles:
        facts.can_write, facts.write_reason = None, "privileges come through roles (not inspected)"
    else:
        facts.can_write = False
        facts.write_reason = f"no INSERT/UPDATE/DELETE grant covering database {database}"


def _probe_mysql(conn: Connection, facts: _Facts) -> None:
    rows = _query(
        conn,
        facts,
        "server",
        "SELECT VERSION(), @@global.max_connections, @@global.max_user_connections, "
        "@@global.read_only, @@session.wait_timeout, @@global.interactive_timeout, "
        "CURRENT_USER(), DATABASE()",
    )
    if rows:
        version, maxc, max_user, ro, wait, interactive, user, database = rows[0]
        facts.version = str(version)
        facts.product = "MariaDB" if "mariadb" in facts.version.lower() else "MySQL"
        facts.version_tuple = tuple(int(x) for x in re.findall(r"\d+", facts.version)[:3])
        facts.max_connections = int(maxc)
        facts.user_limit = int(max_user) if max_user else None
        facts.read_only = bool(int(ro))
        if facts.read_only:
            facts.read_only_reason = "read_only is ON (a replica, or set by an operator)"
        facts.wait_timeout, facts.interactive_timeout = int(wait), int(interactive)
        facts.user, facts.database = str(user), database
    status = _query(conn, facts, "status", "SHOW GLOBAL STATUS LIKE 'Threads_connected'")
    if status:
        facts.current = int(status[0][1])
    grants = _query(conn, facts, "privileges", "SHOW GRANTS")
    if grants is not None:
        _parse_grants([str(r[0]) for r in grants], facts.database, facts)


def _probe_sqlite(conn: Connection, facts: _Facts) -> None:
    facts.product = "SQLite"
    facts.version = sqlite3.sqlite_version
    try:  # SQLite opens lazily: this reads the header ("file is not a database")
        conn.exec_driver_sql("PRAGMA schema_version").fetchall()
    except sa_exc.DBAPIError as exc:
        raise _ConnectFailed(exc) from None
    mode = _query(conn, facts, "journal", "PRAGMA journal_mode")
    if mode:
        facts.journal_mode = str(mode[0][0]).lower()


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


# --------------------------------------------------------------------------- server checks


def _need_facts(run: _Run, code: str) -> _Facts | None:
    if code not in _server_codes(run) or run.facts is None:
        return None
    return run.facts


def _check_read_only(run: _Run) -> None:
    """RDB305: a read-write service is connected to a server that accepts writes."""
    f = _need_facts(run, "RDB305")
    if f is None:
        return
    where = run.target.where
    if f.read_only is None:
        run.ok("RDB305", f"Could not tell whether {where} is read-only: {f.errors}.")
    elif f.read_only and run.policy.access == "read-write":
        extra = (
            " This user bypasses read_only (SUPER / READ_ONLY ADMIN), which hides the problem "
            "until a write reaches a real replica."
            if f.bypasses_read_only
            else ""
        )
        run.add(
            "RDB305",
            "error",
            f"{where} is read-only: {f.read_only_reason}. The policy expects read-write "
            f"(Policy.access), so every write will fail.{extra}",
            "Point the URL at the primary (or the read-write endpoint), or set "
            "Policy.access='read-only' if this service only reads.",
            "url",
            reason=f.read_only_reason,
        )
    elif f.read_only:
        run.ok("RDB305", f"{where} is read-only ({f.read_only_reason}), as expected.")
    else:
        run.ok("RDB305", f"{where} accepts writes (a primary).", access=run.policy.access)


def _check_write_privilege(run: _Run) -> None:
    """RDB306: the user may write, when the policy says the service writes."""
    f = _need_facts(run, "RDB306")
    if f is None:
        return
    user = f.user or run.target.user
    if run.policy.access == "read-only":
        run.ok("RDB306", "Write privileges are not needed (Policy.access='read-only').")
    elif f.can_write is None:
        why = f.write_reason or f.errors.get("privileges", "unknown")
        run.ok("RDB306", f"Could not tell whether '{user}' may write: {why}.")
    elif not f.can_write:
        run.add(
            "RDB306",
            "warning",
            f"User '{user}' seems unable to write in database '{f.database or run.target.database}'"
            f" ({f.write_reason}), but the policy expects read-write.",
            "GRANT INSERT, UPDATE, DELETE (or ownership) to the user, or set "
            "Policy.access='read-only'.",
            "url",
        )
    else:
        run.ok("RDB306", f"User '{user}' may write ({f.write_reason}).")


def _check_version(run: _Run) -> None:
    """RDB400 / RDB405: the server's version, and whether it is still maintained."""
    f = _need_facts(run, "RDB400")
    if f is None:
        return
    if not f.version:
        run.ok("RDB400", f"Could not read the server version: {f.errors}.")
        return
    run.ok("RDB400", f"{f.product} {f.version}.", version=f.version)
    minimum = _MIN_VERSIONS.get(f.product)
    if minimum is not None and f.version_tuple and f.version_tuple < minimum:
        run.add(
            "RDB405",
            "warning",
            f"{f.product} {f.version} is older than {'.'.join(map(str, minimum))}, the oldest "
            "release still maintained upstream: no more security or bug fixes.",
            f"Plan an upgrade of {f.product}.",
        )


def _check_capacity(run: _Run) -> None:
    """RDB402-RDB404: the pools fit in the server's connection limits."""
    f = _need_facts(run, "RDB402")
    if f is None:
        return
    where = run.target.where
    demand, how = run.demand()
    if f.max_connections is None:
        run.ok("RDB402", f"Could not read max_connections: {f.errors}.")
        return
    reserved = 0 if f.superuser else f.reserved
    limit = f.max_connections - reserved
    limit_how = f"max_connections {f.max_connections}" + (
        f" - {reserved} reserved for superusers" if reserved else ""
    )
    if demand is None:
        run.add(
            "RDB402",
            "warning",
            f"The pool size is unbounded ({how}): it can open connections until {where} "
            f"refuses them ({limit_how}).",
            "Use a QueuePool with a finite max_overflow (resilient_db.create_engine does).",
            "pool.max_overflow",
        )
        return
    if demand > limit:
        run.add(
            "RDB402",
            "error",
            f"The pools may open {demand} connections {how}, but {where} accepts at most "
            f"{limit} for this user ({limit_how}).",
            "Lower Policy.pool.size / max_overflow or Policy.instances, raise the server's "
            "max_connections, or put a connection pooler (PgBouncer, MaxScale) in front.",
            "pool.size",
            demand=demand,
            limit=limit,
        )
    else:
        run.ok(
            "RDB402",
            f"The pools may open {demand} connections {how}; {where} allows {limit}.",
            demand=demand,
            limit=limit,
        )
        if f.current is not None:
            free = limit - max(0, f.current - 1)  # not counting this probe's own connection
            if demand > free:
                run.add(
                    "RDB403",
                    "warning",
                    f"Only {max(free, 0)} connection slots are free on {where} now "
                    f"({f.current - 1} in use by others, {limit} allowed); the pools may need "
                    f"{demand}.",
                    "Find what holds the connections (pg_stat_activity / SHOW PROCESSLIST: "
                    "other services, leaks, idle sessions) before scaling out.",
                    "instances",
                    free=free,
                    current=f.current,
                )
    for label, lim in (("user", f.user_limit), ("database", f.database_limit)):
        if lim is not None and demand > lim:
            name = f.user if label == "user" else f.database
            run.add(
                "RDB404",
                "error",
                f"The pools may open {demand} connections, but the {label} '{name}' is limited "
                f"to {lim} connections on {where}.",
                "Raise the limit (ALTER ROLE/DATABASE ... CONNECTION LIMIT, or GRANT ... WITH "
                "MAX_USER_CONNECTIONS / max_user_connections) or lower the pool.",
                "pool.size",
                limit=lim,
            )


def _check_wait_timeout(run: _Run) -> None:
    """RDB504: pooled MariaDB connections are recycled before the server drops them."""
    f = _need_facts(run, "RDB504")
    if f is None:
        return
    wt = f.wait_timeout
    recycle = run.recycle()
    if wt is None:
        run.ok("RDB504", f"Could not read wait_timeout: {f.errors}.")
    elif recycle is None or recycle >= wt:
        shown = "off" if recycle is None else _secs(recycle)
        run.add(
            "RDB504",
            "error",
            f"pool_recycle ({shown}) is not below the server's wait_timeout ({wt}s; "
            f"interactive_timeout {f.interactive_timeout}s): the server closes connections idle "
            f"longer than {wt}s, so pooled connections die in the pool (error 2006 'MySQL "
            "server has gone away', or an extra reconnect on checkout).",
            f"Set Policy.pool.recycle below {wt} (e.g. {max(1, int(wt * 0.8))}), or raise "
            "wait_timeout on the server.",
            "pool.recycle",
            wait_timeout=wt,
            interactive_timeout=f.interactive_timeout,
        )
    else:
        run.ok("RDB504", f"pool_recycle {_secs(recycle)} < wait_timeout {wt}s.")


def _check_idle_session(run: _Run) -> None:
    """RDB505: pooled PostgreSQL connections outlive no idle_session_timeout."""
    f = _need_facts(run, "RDB505")
    if f is None:
        return
    ist = f.idle_session_timeout
    recycle = run.recycle()
    if ist is None:
        run.ok("RDB505", "idle_session_timeout is off.")
    elif recycle is None or recycle >= ist:
        shown = "off" if recycle is None else _secs(recycle)
        run.add(
            "RDB505",
            "error",
            f"pool_recycle ({shown}) is not below the server's idle_session_timeout "
            f"({_secs(ist)}): the server terminates pooled connections that sit idle "
            "(SQLSTATE 57P05).",
            f"Set Policy.pool.recycle below {ist:g}, or raise idle_session_timeout.",
            "pool.recycle",
            idle_session_timeout=ist,
        )
    else:
        run.ok("RDB505", f"pool_recycle {_secs(recycle)} < idle_session_timeout {_secs(ist)}.")


def _check_idle_in_transaction(run: _Run) -> None:
    """RDB506: what idle_in_transaction_session_timeout does to slow units of work."""
    f = _need_facts(run, "RDB506")
    if f is None:
        return
    iit = f.idle_in_tx_timeout
    if iit is None:
        run.ok("RDB506", "idle_in_transaction_session_timeout is off.")
    else:
        run.ok(
            "RDB506",
            f"Transactions left idle longer than {_secs(iit)} between statements are "
            "terminated by the server (SQLSTATE 25P03).",
            idle_in_transaction_session_timeout=iit,
        )


def _check_journal_mode(run: _Run) -> None:
    """RDB605: SQLite's journal mode."""
    f = _need_facts(run, "RDB605")
    if f is None or f.journal_mode is None:
        return
    if f.journal_mode == "wal":
        run.ok("RDB605", "journal_mode=wal: readers work while a writer writes.")
    else:
        run.ok(
            "RDB605",
            f"journal_mode={f.journal_mode}: a writer blocks readers; PRAGMA journal_mode=WAL "
            "lets them work concurrently.",
        )


_SERVER_CHECKS: tuple[Callable[[_Run], None], ...] = (
    _check_read_only,
    _check_write_privilege,
    _check_version,
    _check_capacity,
    _check_wait_timeout,
    _check_idle_session,
    _check_idle_in_transaction,
    _check_journal_mode,
)
