"""Shared helpers: interleaved timing rounds and result tables."""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

PG_URL = os.environ.get("RDB_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("RDB_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


def reachable(host: str, port: int) -> bool:
    """True when something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


#: Untimed calls of each variant before the rounds.
WARMUP = 200


def interleaved(
    variants: dict[str, Callable[[], object]], *, rounds: int, calls: int, warmup: int = WARMUP
) -> dict[str, list[float]]:
    """Per-call seconds for each variant, one sample per round, variants alternating.

    The order of the variants is reversed every round so neither always runs
    first (caches, CPU frequency).
    """
    names = list(variants)
    for name in names:
        fn = variants[name]
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else list(reversed(names))
        for name in order:
            fn = variants[name]
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls)
    return samples


async def async_interleaved(
    variants: dict[str, Callable[[], Awaitable[object]]],
    *,
    rounds: int,
    calls: int,
    warmup: int = 200,
) -> dict[str, list[float]]:
    """:func:`interleaved` for coroutine functions, awaited one after another on the loop."""
    names = list(variants)
    for name in names:
        fn = variants[name]
        for _ in range(warmup):
            await fn()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else list(reversed(names))
        for name in order:
            fn = variants[name]
            t0 = time.perf_counter()
            for _ in range(calls):
                await fn()
            samples[name].append((time.perf_counter() - t0) / calls)
    return samples


def median(xs: Sequence[float]) -> float:
    """The median of a non-empty sequence."""
    return float(statistics.median(xs))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def sync_urls(dbs: str, tmp: str, prog: str) -> Iterator[tuple[str, str]]:
    """(name, URL) for each of ``dbs`` ("sqlite,pg,mariadb"): a SQLite file in ``tmp``, or
    :data:`PG_URL` / :data:`MARIADB_URL` when its server answers (else a note on stderr
    and skipped).

    Raises ValueError for an unknown name.
    """
    for db in dbs.split(","):
        if db == "sqlite":
            yield db, f"sqlite:///{Path(tmp) / 'bench.db'}"
        elif db in ("pg", "mariadb"):
            url, port, name = (
                (PG_URL, 5432, "PostgreSQL") if db == "pg" else (MARIADB_URL, 3306, "MariaDB")
            )
            u = make_url(url)
            if not reachable(u.host or "127.0.0.1", u.port or port):
                print(f"{prog}: {name} not reachable, skipped", file=sys.stderr)
                continue
            yield db, url
        else:
            raise ValueError(f"unknown database {db!r}")


#: (rounds, calls) of the interleaved sync benchmarks: ``--smoke`` and a full run.
SMOKE_ROUNDS = (7, 200)
FULL_ROUNDS = (21, 2000)


def per_database(
    ap: argparse.ArgumentParser,
    args: argparse.Namespace,
    prog: str,
    measure: Callable[..., dict[str, Any]],
    full: tuple[int, int] = FULL_ROUNDS,
) -> dict[str, dict[str, Any]]:
    """``measure(url, rounds=, calls=)`` on each database of ``--db``, by name.

    The rounds follow ``--smoke``; an unknown database name is a usage error.
    """
    rounds, calls = SMOKE_ROUNDS if args.smoke else full
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for db, url in sync_urls(args.db, tmp, prog):
                results[db] = measure(url, rounds=rounds, calls=calls)
        except ValueError as e:
            ap.error(str(e))
    return results
