"""Happy-path overhead: ``SELECT 1`` through raw SQLAlchemy and through resilient_db.

One call is what a request does: check a connection out, run ``SELECT 1``,
return the connection. Both engines run in the same process in interleaved
rounds; the report gives the median per-call latency of each, their ratio, and
the median of the per-round ratios ("paired": each round against the raw round
next to it), which is the figure judged against the target: the machine's speed
drifts by tens of percent between rounds, and a ratio of two medians can land
on different speeds while a round and its neighbour share one.

``--aa`` measures raw SQLAlchemy against a second raw engine: the noise of the
method on this machine, to read the real figures against (a perfect method
says 1.000).

    python -m benchmarks.overhead [--smoke] [--aa] [--db sqlite,pg,mariadb]
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

import resilient_db

from ._util import interleaved, median, per_database, table

TARGET = 1.05
#: (rounds, calls) of a full run: many short rounds, so the variants alternate every few
#: tenths of a second and a slow drift of the machine's speed (another process, the
#: CPU's clock) hits both alike (21 x 2,000 before 2026-12-06: the same calls in all)
ROUNDS = (854, 50)


def request(engine: sa.Engine, stmt: Any) -> object:
    """What a request does: check a connection out, run ``stmt``, return the connection."""
    with engine.connect() as conn:
        return conn.execute(stmt).scalar()


def measure(url: str, *, rounds: int, calls: int, aa: bool = False) -> dict[str, Any]:
    """Median per-call seconds of raw and resilient engines on ``url``, and the ratio.

    ``aa``: a second raw SQLAlchemy engine in place of the resilient one.
    """
    raw = sa.create_engine(url)
    res = (
        sa.create_engine(url)
        if aa
        else resilient_db.create_engine(url, name="bench", validate="off")
    )
    stmt = sa.text("SELECT 1")
    try:
        samples = interleaved(
            {"raw": lambda: request(raw, stmt), "resilient_db": lambda: request(res, stmt)},
            rounds=rounds,
            calls=calls,
        )
    finally:
        raw.dispose()
        res.dispose()
    raw_med, res_med = median(samples["raw"]), median(samples["resilient_db"])
    pairs = zip(samples["raw"], samples["resilient_db"], strict=True)
    return {
        "raw_us": raw_med * 1e6,
        "resilient_us": res_med * 1e6,
        "ratio": res_med / raw_med,
        # each round's ratio against the raw round next to it, then the median
        "paired_ratio": median([res / raw for raw, res in pairs]),
        "rounds": rounds,
        "calls_per_round": calls,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print a table (or JSON)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="a short run for CI")
    ap.add_argument("--db", default="sqlite,pg", help="comma-separated: sqlite,pg,mariadb")
    ap.add_argument("--aa", action="store_true", help="raw against raw: the method's noise")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    results = per_database(
        ap, args, "overhead", functools.partial(measure, aa=args.aa), full=ROUNDS
    )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        rows = [
            (
                db,
                f"{r['raw_us']:.1f}",
                f"{r['resilient_us']:.1f}",
                f"{r['ratio']:.3f}",
                f"{r['paired_ratio']:.3f}",
                "ok" if r["paired_ratio"] <= TARGET else f"over {TARGET}",
            )
            for db, r in results.items()
        ]
        print("Happy-path overhead: SELECT 1 per call (checkout + execute + return), medians")
        if args.aa:
            print("A/A: both engines are raw SQLAlchemy (the method's noise)")
        print(
            table(
                ["db", "raw µs", "resilient_db µs", "ratio", "paired", f"paired ≤ {TARGET}"],
                rows,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
