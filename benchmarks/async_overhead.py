"""Happy-path async overhead: ``SELECT 1`` through raw and resilient AsyncEngines.

One call is what an async request does: check a connection out, run
``SELECT 1``, return the connection. Both engines run on the same event loop in
interleaved rounds; the report gives the median per-call latency of each and
the ratio (target: at most 1.05). The resilient engine runs the default policy,
driver defaults included (asyncpg ``server_settings``). A third
engine, ``raw+args``, is raw SQLAlchemy given the same driver arguments
(:func:`resilient_db.engine.driver_defaults`): resilient_db / raw+args is the cost
of resilient_db's own code, raw+args / raw the cost of the driver settings (the
per-call deadline is resilient_db's watchdog, not a driver setting).

    python -m benchmarks.async_overhead [--smoke] [--db sqlite,pg] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import resilient_db
from resilient_db.engine import driver_defaults

from ._util import PG_URL, async_interleaved, median, reachable, table

TARGET = 1.05

#: --db name -> async driver URL prefix
DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "pg": "postgresql+asyncpg",
    "psycopg": "postgresql+psycopg",
}


async def _call(engine: AsyncEngine, stmt: Any) -> object:
    async with engine.connect() as conn:
        return (await conn.execute(stmt)).scalar()


async def measure(url: str, *, rounds: int, calls: int) -> dict[str, Any]:
    """Median per-call seconds of raw and resilient async engines on ``url``, and the ratio."""
    raw = create_async_engine(url)
    args = driver_defaults(sa.make_url(url), resilient_db.DEFAULT_POLICY)
    tuned = create_async_engine(url, connect_args=args)
    res = resilient_db.create_async_engine(url, name="bench", validate="off")
    stmt = sa.text("SELECT 1")
    try:
        samples = await async_interleaved(
            {
                "raw": lambda: _call(raw, stmt),
                "raw+args": lambda: _call(tuned, stmt),
                "resilient_db": lambda: _call(res, stmt),
            },
            rounds=rounds,
            calls=calls,
        )
    finally:
        for engine in (raw, tuned, res):
            await engine.dispose()
    raw_med, tuned_med = median(samples["raw"]), median(samples["raw+args"])
    res_med = median(samples["resilient_db"])
    return {
        "raw_us": raw_med * 1e6,
        "raw_args_us": tuned_med * 1e6,
        "resilient_us": res_med * 1e6,
        "ratio": res_med / raw_med,
        "ratio_same_args": res_med / tuned_med,
        "rounds": rounds,
        "calls_per_round": calls,
    }


def _url(db: str, tmp: str) -> str | None:
    if db == "sqlite":
        return f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
    u = sa.make_url(PG_URL)
    if not reachable(u.host or "127.0.0.1", u.port or 5432):
        return None
    return u.set(drivername=DRIVERS[db]).render_as_string(hide_password=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print a table (or JSON)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.async_overhead", description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="a short run for CI")
    ap.add_argument("--db", default="sqlite,pg", help="comma-separated: sqlite,pg,psycopg")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    rounds, calls = (7, 150) if args.smoke else (21, 1000)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for db in args.db.split(","):
            if db not in DRIVERS:
                ap.error(f"unknown database {db!r}")
            url = _url(db, tmp)
            if url is None:
                print(f"async_overhead: {db} not reachable, skipped", file=sys.stderr)
                continue
            results[db] = asyncio.run(measure(url, rounds=rounds, calls=calls))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        rows = [
            (
                f"{db} ({DRIVERS[db]})",
                f"{r['raw_us']:.1f}",
                f"{r['raw_args_us']:.1f}",
                f"{r['resilient_us']:.1f}",
                f"{r['ratio']:.3f}",
                f"{r['ratio_same_args']:.3f}",
                "ok" if r["ratio"] <= TARGET else f"over {TARGET}",
            )
            for db, r in results.items()
        ]
        print("Async happy-path overhead: SELECT 1 per call (checkout + execute + return), medians")
        headers = ["db", "raw µs", "raw+args µs", "resilient_db µs", "ratio", "vs raw+args"]
        print(table([*headers, f"target ≤ {TARGET}"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
