"""``resilient-db drill``: the command line of :func:`resilient_db.testing.drill.drill`.

The URL comes from the command line or, like ``check``, from ``$DATABASE_URL``
(``--env VAR``); ``--policy FILE`` is read as ``check --policy`` reads it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from sqlalchemy import exc as sa_exc

from .._urls import mask_text
from ..config import Policy
from ..errors import ConfigurationError, error_context
from .drill import DEFAULT_SCENARIO, DRILL_POLICY, FAULTS, drill, format_table, write_plot

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``resilient-db drill``."""
    parser.add_argument(
        "url",
        nargs="?",
        help="database URL (PostgreSQL or MySQL/MariaDB) to rehearse with (default: "
        "$DATABASE_URL); prefer the environment so the password stays out of `ps`",
    )
    parser.add_argument(
        "--env",
        default="DATABASE_URL",
        metavar="VAR",
        help="environment variable holding the URL when none is given (default: DATABASE_URL)",
    )
    parser.add_argument(
        "--scenario",
        default=",".join(DEFAULT_SCENARIO),
        help=f"comma-separated faults, in order (default: %(default)s; known: {', '.join(FAULTS)})",
    )
    parser.add_argument(
        "--phase-seconds",
        type=float,
        default=5.0,
        metavar="S",
        help="length of the baseline and of each fault (default: %(default)s)",
    )
    parser.add_argument(
        "--threads", type=int, default=4, help="workload threads (default: %(default)s)"
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=100.0,
        metavar="MS",
        help="delay per packet in the latency fault (default: %(default)s)",
    )
    parser.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="JSON or TOML file with Policy fields, as for `check` (default: the drill's "
        "short deadlines, 1 s, so the drill is quick)",
    )
    parser.add_argument(
        "--env-policy",
        action="store_true",
        help="rehearse the policy of the RESILIENT_DB_* environment variables (what `check` "
        "uses without --policy)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="write a PNG plot (needs matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument(
        "--verbose", action="store_true", help="also show resilient_db's own log messages"
    )


def _policy(args: argparse.Namespace) -> Policy:
    from ..validation.cli import load_policy

    if args.policy is not None and args.env_policy:
        raise ConfigurationError("--policy", "and --env-policy exclude each other.", "Pick one.")
    if args.policy is not None:
        return load_policy(args.policy)
    return Policy.from_env() if args.env_policy else DRILL_POLICY


def run(args: argparse.Namespace) -> int:
    """Run ``resilient-db drill``."""
    from ..validation.cli import _UsageError

    url = args.url if args.url is not None else os.environ.get(args.env)
    if not url:
        print(f"resilient-db drill: no database URL: pass one or set ${args.env}", file=sys.stderr)
        return 2
    scenario = [f.strip() for f in str(args.scenario).split(",") if f.strip()]
    bad = [f for f in scenario if f not in FAULTS]
    if bad or not scenario:
        print(
            f"resilient-db drill: unknown fault {', '.join(bad) or '(none)'}; "
            f"choose from {', '.join(FAULTS)}",
            file=sys.stderr,
        )
        return 2
    if args.phase_seconds <= 0 or args.threads < 1 or args.latency_ms < 0:
        print("resilient-db drill: --phase-seconds and --threads must be positive", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                "resilient-db drill: --plot needs matplotlib: pip install 'resilient-db[plot]'",
                file=sys.stderr,
            )
            return 2
    # The drill reports breaker and connect events itself; the engine's warnings repeat
    # them, and SQLAlchemy's pool logs a traceback for every connection the drill breaks.
    loggers = {name: logging.getLogger(name) for name in ("resilient_db", "sqlalchemy.pool")}
    levels = {name: lg.level for name, lg in loggers.items()}
    if not args.verbose:
        loggers["resilient_db"].setLevel(logging.ERROR)
        loggers["sqlalchemy.pool"].setLevel(logging.CRITICAL)
    try:
        policy = _policy(args)
        report = drill(
            url,
            scenario=scenario,
            phase_seconds=args.phase_seconds,
            threads=args.threads,
            latency=args.latency_ms / 1000.0,
            policy=policy,
            progress=None if args.quiet else sys.stderr,
        )
    except (ConfigurationError, _UsageError) as e:
        print(f"resilient-db drill: {mask_text(str(e))}", file=sys.stderr)
        return 2
    except sa_exc.ArgumentError as e:
        print(f"resilient-db drill: bad URL: {e}", file=sys.stderr)
        return 2
    except sa_exc.SQLAlchemyError as e:
        ctx = error_context(e)
        why = f"[{ctx.kind}] {ctx.diagnosis}" if ctx is not None else type(e).__name__
        print(f"resilient-db drill: could not set up the drill: {why}", file=sys.stderr)
        return 1
    finally:
        for name, lg in loggers.items():
            lg.setLevel(levels[name])
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    if args.plot:
        write_plot(report, args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0 if report["recovered"] else 1
