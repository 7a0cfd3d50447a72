"""Import cost: ``import resilient_db`` against ``import sqlalchemy`` (each with psycopg too).

Each sample is a fresh interpreter (``python -I``) that times its own import
with :func:`time.perf_counter` and reports its peak RSS; the variants alternate
round by round, and the report gives the medians, the ratio of import times
and the extra RSS, without a driver and with psycopg (the target applies to
the pair with psycopg, what a PostgreSQL service imports). The async API,
the startup checks, the unit-of-work retry, the fleet store and the
idempotency helpers load on first use, and the telemetry (OpenTelemetry's
API) with the first engine: the last pair adds creating one SQLite engine
(``validate='off'``: no startup checks) to each import.

    python -m benchmarks.import_cost [--smoke] [--rounds N] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from ._util import median, table

TARGET = 1.15

#: name -> the import statement timed in a fresh interpreter
VARIANTS = {
    "sqlalchemy": "import sqlalchemy",
    "resilient_db": "import resilient_db",
    "sqlalchemy, psycopg": "import sqlalchemy, psycopg",
    "resilient_db, psycopg": "import resilient_db, psycopg",
    "sqlalchemy + engine": "import sqlalchemy; sqlalchemy.create_engine('sqlite://')",
    "resilient_db + engine": (
        "import resilient_db; resilient_db.create_engine('sqlite://', validate='off')"
    ),
}
#: (baseline, ours); the target applies to the second pair
PAIRS = (
    ("sqlalchemy", "resilient_db"),
    ("sqlalchemy, psycopg", "resilient_db, psycopg"),
    ("sqlalchemy + engine", "resilient_db + engine"),
)
TARGET_PAIR = 1

_CHILD = """
import resource, sys, time
t0 = time.perf_counter()
{stmt}
t = time.perf_counter() - t0
print(t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def sample(stmt: str) -> tuple[float, float]:
    """(import seconds, peak RSS in MB) of ``stmt`` in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-I", "-c", _CHILD.format(stmt=stmt)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[0]), int(out[1]) / 1024  # ru_maxrss is in KiB on Linux


def measure(rounds: int) -> dict[str, Any]:
    """Median import seconds and peak RSS of each variant, variants alternating."""
    names = list(VARIANTS)
    for name in names:  # warm the file system cache
        sample(VARIANTS[name])
    times: dict[str, list[float]] = {n: [] for n in names}
    rss: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else list(reversed(names)):
            t, m = sample(VARIANTS[name])
            times[name].append(t)
            rss[name].append(m)
    return {
        "variants": {
            n: {"import_ms": median(times[n]) * 1e3, "rss_mb": median(rss[n])} for n in names
        },
        "pairs": [
            {
                "baseline": base,
                "ours": ours,
                "ratio": median(times[ours]) / median(times[base]),
                "extra_rss_mb": median(rss[ours]) - median(rss[base]),
            }
            for base, ours in PAIRS
        ],
        "rounds": rounds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print a table (or JSON)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.import_cost", description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="a short run for CI")
    ap.add_argument("--rounds", type=int, default=None, help="interpreters per variant")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.smoke else 21)
    result = measure(rounds)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    v = result["variants"]
    rows = []
    for i, p in enumerate(result["pairs"]):
        target = "ok" if p["ratio"] <= TARGET else f"over {TARGET}"
        for name in (p["baseline"], p["ours"]):
            rows.append((name, f"{v[name]['import_ms']:.1f}", f"{v[name]['rss_mb']:.1f}", ""))
        verdict = f" (target ≤ {TARGET}: {target})" if i == TARGET_PAIR else ""
        rows[-1] = (*rows[-1][:3], f"{p['ratio']:.3f}, {p['extra_rss_mb']:+.1f} MB{verdict}")
    print(f"Import cost: fresh interpreters, {rounds} rounds, medians")
    print(table(["import", "ms", "peak RSS MB", "ratio, extra RSS"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
