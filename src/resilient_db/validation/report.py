"""The outcome of a validation: :class:`Finding`, :class:`Report`, the check codes.

:data:`CHECKS` lists every code with its title; :meth:`Report.to_dict` is the
JSON layout (schema :data:`SCHEMA_VERSION`) and :meth:`Report.render` the
readable table printed by ``resilient-db check``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from ..classify import Target

__all__ = ["CHECKS", "SCHEMA_VERSION", "Detail", "Finding", "Report", "Severity"]

Severity = Literal["error", "warning", "info"]
Detail = str | int | float | bool | None

#: Version of :meth:`Report.to_dict`'s layout; bumped only on incompatible changes.
SCHEMA_VERSION = 1

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
                lines += textwrap.wrap(
                    para,
                    width - 2,
                    initial_indent="  ",
                    subsequent_indent="  ",
                    break_long_words=False,
                    break_on_hyphens=False,
                )
    rows = [f for f in report.findings if verbose or (f.severity != "info" and f is not root)]
    if not rows:
        return "\n".join(lines)
    lines.append("")
    title_w = max([len("CHECK")] + [len(f.title) for f in rows])
    # a narrow terminal: wrap the CHECK column too, at spaces, never inside a word
    longest_word = max(len(w) for f in rows for w in f.title.split())
    title_w = max(min(title_w, 36, width - 7 - 1 - 6 - 1 - 1 - 24), longest_word, len("CHECK"))
    head = f"{'CODE':<7} {'STATUS':<6} {'CHECK':<{title_w}} RESULT"
    lines.append(st(head, "1"))
    indent = 7 + 1 + 6 + 1 + title_w + 1
    text_w = max(20, width - indent)
    for f in rows:
        body = _wrap(f.message, text_w) or [""]
        if f.fix and f.severity != "info":
            body += _wrap(f"fix: {f.fix}", text_w)
        titles = _wrap(f.title, title_w)
        label = _STATUS_LABEL[f.status]
        status = st(f"{label:<6}", *_STATUS_STYLE[f.status])
        for i in range(max(len(body), len(titles))):
            left = f"{f.code:<7} {status}" if i == 0 else " " * 14
            title = titles[i] if i < len(titles) else ""
            text = body[i] if i < len(body) else ""
            lines.append(f"{left} {title:<{title_w}} {text}".rstrip())
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` at spaces; a longer word (a URL) stays whole."""
    return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)
