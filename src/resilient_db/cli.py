"""The ``resilient-db`` command: ``check``, ``drill`` and ``demo``.

Each subcommand lives in the module that owns its behaviour and exposes
``add_arguments(parser)`` and ``run(args) -> int``; this module only wires them
and turns bad arguments into a one-line error (exit status 2).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

# name -> (module, one-line help)
_COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("resilient_db.validation.cli", "validate a database URL and explain what is wrong"),
    "drill": (
        "resilient_db.testing._drill_cli",
        "rehearse an outage against a database via a proxy",
    ),
    "demo": ("resilient_db.demo", "simulate an outage on SQLite, with and without resilient_db"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        from ._urls import mask_text

        message = mask_text(message)  # no passwords
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    parser = _Parser(
        prog="resilient-db",
        description="Validate, explain and rehearse database trouble for SQLAlchemy services.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (module, help_text) in _COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``resilient-db`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        print("resilient-db: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
