"""Happy-path overhead of a breaker shared through Redis (``resilient_db.share_breaker``).

One call is what a request does: check a connection out, run ``SELECT 1``,
return it. Three engines run in the same process in interleaved rounds: raw
SQLAlchemy, resilient_db with its local breaker, and resilient_db with the
breaker shared through Redis (its sync thread running, ``staleness`` 0.5 s).
The ratio that matters is shared / raw; the store's sync thread is the only
extra work, and no call makes a Redis round trip.

    python -m benchmarks.fleet [--smoke] [--db sqlite,pg] [--redis URL]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa

import resilient_db

from ._util import interleaved, median, per_database, reachable, table
from .overhead import request

TARGET = 1.05
REDIS_URL = os.environ.get("RDB_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def measure(url: str, redis_url: str, *, rounds: int, calls: int) -> dict[str, Any]:
    """Median per-call seconds of raw, local-breaker and shared-breaker engines, and ratios."""
    raw = sa.create_engine(url)
    local = resilient_db.create_engine(url, name="bench-local", validate="off")
    shared = resilient_db.create_engine(url, name="bench-shared", validate="off")
    name = f"bench-{uuid.uuid4().hex[:8]}"
    store = resilient_db.share_breaker(shared, redis_url, name=name)
    stmt = sa.text("SELECT 1")
    try:
        samples = interleaved(
            {
                "raw": lambda: request(raw, stmt),
                "local": lambda: request(local, stmt),
                "shared": lambda: request(shared, stmt),
            },
            rounds=rounds,
            calls=calls,
        )
        available = store.available
    finally:
        store.close()
        raw.dispose()
        local.dispose()
        shared.dispose()
    med = {k: median(v) for k, v in samples.items()}
    return {
        "raw_us": med["raw"] * 1e6,
        "local_us": med["local"] * 1e6,
        "shared_us": med["shared"] * 1e6,
        "ratio": med["shared"] / med["raw"],
        "ratio_local": med["local"] / med["raw"],
        "redis_available": available,
        "rounds": rounds,
        "calls_per_round": calls,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print a table (or JSON)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="a short run for CI")
    ap.add_argument("--db", default="sqlite,pg", help="comma-separated: sqlite,pg")
    ap.add_argument("--redis", default=REDIS_URL, help="Redis URL (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    where = urlsplit(args.redis)
    if not reachable(where.hostname or "127.0.0.1", where.port or 6379):
        print("fleet: Redis not reachable, skipped", file=sys.stderr)
        return 0
    results = per_database(ap, args, "fleet", functools.partial(measure, redis_url=args.redis))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        rows = [
            (
                db,
                f"{r['raw_us']:.1f}",
                f"{r['local_us']:.1f}",
                f"{r['shared_us']:.1f}",
                f"{r['ratio_local']:.3f}",
                f"{r['ratio']:.3f}",
                "ok" if r["ratio"] <= TARGET else f"over {TARGET}",
            )
            for db, r in results.items()
        ]
        print("Shared-breaker overhead: SELECT 1 per call (checkout + execute + return), medians")
        print(
            table(
                ["db", "raw µs", "local µs", "shared µs", "local/raw", "shared/raw", "target"],
                rows,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
