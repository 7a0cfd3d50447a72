"""``resilient-db check``: validate a database URL and explain what is wrong.

Exit status: 0 when no check found an error (and, with ``--strict``, no
warning), 1 for warnings with ``--strict``, 2 for errors and for bad arguments
(reported on one line, without a traceback). Passwords are always masked.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._urls import mask_text
from ..config import BreakerPolicy, Policy, PoolPolicy, RetryPolicy, Timeouts
from ..errors import ConfigurationError
from .report import Report
from .runner import _validate

__all__ = ["add_arguments", "load_policy", "one_line", "run"]

_GROUPS: dict[str, type[Any]] = {
    "timeouts": Timeouts,
    "pool": PoolPolicy,
    "retry": RetryPolicy,
    "breaker": BreakerPolicy,
}

EXIT_OK, EXIT_WARNINGS, EXIT_ERRORS = 0, 1, 2


class _UsageError(Exception):
    """A bad argument: printed on one line, exit status 2."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``check`` subcommand's arguments to ``parser``."""
    parser.description = (
        "Validate a database URL layer by layer (URL, DNS, TCP, TLS, login, database, "
        "privileges, server capacity, timeouts) and print the root cause of any problem. "
        "Check codes are explained in docs/checks.md. Exit status: 0 ok, 1 warnings "
        "(with --strict), 2 errors or bad arguments."
    )
    parser.add_argument(
        "url",
        nargs="?",
        help="database URL (default: $DATABASE_URL); prefer the environment so the password "
        "stays out of `ps` and shell history",
    )
    parser.add_argument(
        "--env",
        default="DATABASE_URL",
        metavar="VAR",
        help="environment variable holding the URL when none is given (default: DATABASE_URL)",
    )
    parser.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help='JSON or TOML file with Policy fields, e.g. {"pool": {"size": 10}, '
        '"instances": 4} (default: the RESILIENT_DB_* environment variables)',
    )
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the report as JSON")
    out.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print one line (like pg_isready): the URL, ok/warnings/error and the root "
        "cause; the exit status is the same",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when there are warnings"
    )
    parser.add_argument(
        "--deadline",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="finish within S seconds, even against an unreachable host (default: 10)",
    )
    parser.add_argument(
        "--instances",
        type=_positive_int,
        metavar="N",
        help="processes of the service sharing the database (overrides the policy)",
    )
    parser.add_argument(
        "--access",
        choices=("read-write", "read-only"),
        help="what the service needs from the database (overrides the policy)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``check``; return the exit status."""
    try:
        return _run(args)
    except _UsageError as exc:
        print(f"resilient-db check: error: {exc}", file=sys.stderr)
        return EXIT_ERRORS
    except ConfigurationError as exc:
        print(f"resilient-db check: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_ERRORS


def _run(args: argparse.Namespace) -> int:
    from_argv = args.url is not None
    url = args.url if from_argv else os.environ.get(args.env)
    if not url:
        raise _UsageError(f"no database URL: pass one or set ${args.env}")
    policy = load_policy(args.policy) if args.policy is not None else Policy.from_env()
    changes: dict[str, Any] = {}
    if args.instances is not None:
        changes["instances"] = args.instances
    if args.access is not None:
        changes["access"] = args.access
    if changes:
        policy = dataclasses.replace(policy, **changes)
    report = _validate(
        url, policy=policy, deadline=args.deadline, password_on_command_line=from_argv
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif args.quiet:
        print(one_line(report))
    else:
        tty = sys.stdout.isatty()
        color = tty and not os.environ.get("NO_COLOR")
        width = shutil.get_terminal_size((100, 24)).columns if tty else 100
        print(report.render(color=color, width=width))
    if not report.ok:
        return EXIT_ERRORS
    if args.strict and report.warnings:
        return EXIT_WARNINGS
    return EXIT_OK


def one_line(report: Report) -> str:
    """The ``--quiet`` line: ``URL - ok``, ``URL - 2 warnings (RDB502, RDB601)`` or the error."""
    root = report.root_cause
    if root is not None:
        return f"{report.url} - error {root.code} ({root.title}): {_one_line(root.message)}"
    if report.warnings:
        n = len(report.warnings)
        codes = ", ".join(f.code for f in report.warnings)
        return f"{report.url} - ok, {n} warning{'s' * (n != 1)} ({codes})"
    return f"{report.url} - ok"


def load_policy(path: Path) -> Policy:
    """Read a :class:`Policy` from a JSON or TOML file of its fields.

    Groups are tables (``[pool]`` / ``"pool": {...}``), top-level fields are
    keys (``instances = 4``); a ``[resilient_db]`` table may wrap everything.
    Unknown keys are errors, so a typo never falls back to a default.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _UsageError(f"--policy {path}: {exc.strerror or exc}") from None
    data: Any
    if path.suffix.lower() == ".toml":
        try:
            tomllib: Any = importlib.import_module("tomllib")
        except ImportError:  # Python 3.10
            raise _UsageError(f"--policy {path}: TOML needs Python 3.11+; use JSON") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise _UsageError(f"--policy {path}: invalid TOML: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _UsageError(f"--policy {path}: invalid JSON: {exc}") from None
    if isinstance(data, Mapping) and set(data) == {"resilient_db"}:
        data = data["resilient_db"]
    if not isinstance(data, Mapping):
        raise _UsageError(f"--policy {path}: expected an object/table of Policy fields")
    try:
        return _policy_from_mapping(data)
    except ConfigurationError as exc:
        raise _UsageError(f"--policy {path}: {_one_line(str(exc))}") from None


def _policy_from_mapping(data: Mapping[str, Any]) -> Policy:
    top = {f.name for f in dataclasses.fields(Policy)} - set(_GROUPS)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in _GROUPS:
            cls = _GROUPS[key]
            names = {f.name for f in dataclasses.fields(cls)}
            if not isinstance(value, Mapping):
                raise ConfigurationError(key, "must be a table/object of settings.", "")
            unknown = sorted(set(value) - names)
            if unknown:
                raise ConfigurationError(
                    f"{key}.{unknown[0]}",
                    f"is not a setting of {cls.__name__}.",
                    f"Use one of: {', '.join(sorted(names))}.",
                )
            kwargs[key] = cls(**value)
        elif key in top:
            kwargs[key] = value
        else:
            raise ConfigurationError(
                str(key),
                "is not a Policy field.",
                f"Use one of: {', '.join(sorted(top | set(_GROUPS)))}.",
            )
    return Policy(**kwargs)


def _one_line(text: str) -> str:
    return " ".join(mask_text(text).split())
