"""The state of one validation run, shared by the checks that fill it.

:class:`_Run` holds what the checks learnt (URL, connect arguments, server
facts), the deadline every network step is bounded by, and the findings;
it scrubs the password from everything it records.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus

from sqlalchemy.engine import URL, Engine

from .._compat import queue_pool_limits
from ..classify import Target
from ..config import Policy
from .report import CHECKS, Detail, Finding, Report, Severity

_MARGIN = 0.25  # seconds kept back from each network step to report its outcome
_DEFAULT_CONNECT = 5.0


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
        self.secrets: list[str] = []  # the password and secret query values
        self.target = Target()
        self.backend = ""
        self.driver = ""
        self.is_async = False
        self.args: dict[str, Any] = {}
        self.creator: Callable[..., Any] | None = None
        self.listeners: list[Callable[..., Any]] = []
        #: the engine is resilient_db's (or a URL checked as resilient_db would connect):
        #: its watchdog bounds PyMySQL's calls and its connect bounds the greeting
        self.resilient = True
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
        secrets = {s for s in (self.password, *self.secrets) if s}
        for pw in sorted(secrets, key=len, reverse=True):
            # raw, %-encoded, as SQLAlchemy renders a URL (safe=" +"), as a query value
            forms = {pw, quote(pw, safe=""), quote(pw), quote(pw, safe=" +"), quote_plus(pw)}
            for form in sorted(forms, key=len, reverse=True):
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

    # -- connect parameters --------------------------------------------------------

    def opt(self, key: str) -> Any:
        """A connect parameter: connect args first, then the URL's query string."""
        if key in self.args:
            return self.args[key]
        assert self.url is not None
        value = self.url.query.get(key)
        if isinstance(value, tuple):
            return value[-1] if value else None
        return value

    # -- policy values, from the engine when there is one --------------------------

    def demand(self) -> tuple[int | None, str]:
        """Connections the pools may open in total, and how that was computed."""
        n = self.policy.instances
        per = f"per instance, {n} instance{'s' * (n != 1)}"
        if self.engine is not None:
            pool = self.engine.pool
            limits = queue_pool_limits(pool)
            if limits is None:
                return None, f"the engine's {type(pool).__name__} has no fixed size"
            size, overflow = limits
            if overflow < 0:
                return None, "max_overflow=-1 lets the pool grow without limit"
        else:
            size, overflow = self.policy.pool.size, self.policy.pool.max_overflow
        return (size + overflow) * n, f"({size} + {overflow} overflow {per})"

    def others_in_use(self, current: int | None) -> int | None:
        """Of the server's ``current`` connections, those held by others.

        Not this probe's own, nor those the validated engine's pool holds now:
        they are part of the pools' demand already.
        """
        if current is None:
            return None
        fn = getattr(self.engine.pool, "checkedout", None) if self.engine is not None else None
        try:
            own = max(0, int(fn())) if callable(fn) else 0
        except Exception:  # an exotic pool
            own = 0
        return max(0, current - 1 - own)

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


def _secs(value: float) -> str:
    return f"{value:g}s"
