"""Running a validation: the plan, its deadline, and the startup check.

The checks run in a worker thread, layer by layer; the caller waits at most
the deadline and then abandons the worker (RDB209) if a driver ignores its
timeout.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

from sqlalchemy.engine import URL, Engine

from .._state import policy_of
from ..config import DEFAULT_POLICY, Policy
from ..errors import ConfigurationError
from .connect import _check_connect
from .context import _first_line, _Run
from .local import _LOCAL_CHECKS, _check_sqlite_file, _check_url, _prepare_connect_args
from .network import _check_dns, _check_tcp
from .report import Finding, Report
from .server import _SERVER_CHECKS

__all__ = ["CONFIG_CODES", "is_configuration_error", "startup_check", "validate"]

_LOG = logging.getLogger("resilient_db")


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


#: Root causes that are settings, not an outage: the ``"config"`` mode refuses to
#: start on them (bad URL, missing driver, unknown host, wrong password, unknown
#: user or database, rejected connection settings, a missing SQLite directory).
CONFIG_CODES = frozenset(
    {
        "RDB101",
        "RDB102",
        "RDB103",
        "RDB201",
        "RDB301",
        "RDB302",
        "RDB303",
        "RDB304",
        "RDB307",
        "RDB308",
        "RDB309",
    }
)


def is_configuration_error(finding: Finding) -> bool:
    """True for an error a restart cannot fix: the ``"config"`` mode raises on it."""
    return (
        finding.severity == "error"
        and finding.code in CONFIG_CODES
        and not dict(finding.details).get("temporary")  # a DNS resolver that failed for now
    )


def startup_check(engine: Engine, *, mode: str = "config", strict: bool | None = None) -> None:
    """Validate ``engine`` at creation, bounded by its ``policy.retry.deadline``.

    ``mode`` (``strict=True`` means ``"strict"``, ``strict=False`` ``"warn"``):

    - ``"config"``: raise :class:`ConfigurationError` when the root cause is a
      setting (:data:`CONFIG_CODES`: bad URL, missing driver, unknown host,
      wrong password, unknown user or database); log a short WARNING for
      anything else, such as a database that is merely unreachable, so a
      service still starts (not ready) during an outage;
    - ``"strict"``: raise for any error;
    - ``"warn"``: never raise, log errors and warnings.

    The raised error's message is the whole report (root cause first,
    ``field`` the failing setting or ``url``). The WARNING record is one line
    per problem, with the full report in
    ``extra={"resilient_db_report": report.to_dict()}``.
    """
    if strict is not None:
        mode = "strict" if strict else "warn"
    policy = _policy_for(engine, None)
    report = _validate(engine, policy=policy, deadline=policy.retry.deadline)
    root = report.root_cause
    if root is not None and (
        mode == "strict" or (mode == "config" and is_configuration_error(root))
    ):
        raise ConfigurationError(
            root.field or "url",
            f"[{root.code}] {root.message}",
            f"{root.fix}\n\n{report.render(verbose=False)}",
            report=report,
        )
    if report.errors or report.warnings:
        _LOG.warning(
            "%s",
            _concise(report, starting=mode == "config"),
            extra={"resilient_db_report": report.to_dict()},
        )
    else:
        _LOG.debug("resilient_db startup check passed: %s", report.summary())


def _concise(report: Report, *, starting: bool) -> str:
    """A few lines: the summary, one line per error or warning, the root cause's fix."""
    root = report.root_cause
    lines = [f"resilient_db startup check of {report.url}: {report.summary()}"]
    if root is not None and starting:
        lines[0] += "; the engine starts anyway and is not ready until the database answers"
    for f in (*report.errors, *report.warnings):
        text = f.message if len(f.message) <= 160 else f.message[:157] + "..."
        lines.append(f"  {f.code} {f.title}: {text}")
    if root is not None and root.fix:
        lines.append(f"  fix ({root.code}): {root.fix}")
    return "\n".join(lines)


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
    worker = threading.Thread(
        target=_execute, args=(run,), name="resilient-db-validate", daemon=True
    )
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
    try:
        return policy_of(source)
    except ConfigurationError:
        return DEFAULT_POLICY


# --------------------------------------------------------------------------- the plan


def _execute(run: _Run) -> None:
    try:
        _plan(run)
    except Exception as exc:  # a bug in a check must not hide the others
        run.add(
            "RDB000",
            "warning",
            f"Validation stopped unexpectedly while {run.step}: {type(exc).__name__}: "
            f"{_first_line(exc)}",
            "Report this as a bug in resilient_db, with the output of `resilient-db check`.",
        )


def _plan(run: _Run) -> None:
    run.step = "parsing the URL"
    if not _check_url(run):
        return
    _prepare_connect_args(run)
    for check in _LOCAL_CHECKS:
        check(run)
    if run.backend == "sqlite":
        run.step = "checking the SQLite file"
        _check_sqlite_file(run)
    else:
        run.step = f"resolving {run.target.host}"
        _check_dns(run)
        if run.backend == "postgresql":
            run.step = f"opening a TCP connection to {run.target.where}"
            _check_tcp(run)
    run.step = f"connecting to {run.target.where}"
    _check_connect(run)
    for check in _SERVER_CHECKS:
        check(run)
