"""Happy-path cost in instructions: what a request costs the client, without the noise.

The wall-clock benchmark (``benchmarks.overhead``) moves by several percent
between runs on a shared machine. This one counts the instructions the
client process executes per request, under ``valgrind --tool=callgrind``,
which the machine's load does not move. It is not exact either: the same code
measured 1.024-1.070 on PostgreSQL and 0.999-1.036 on SQLite in runs of one
afternoon (hash seeds, memory layout, how often a driver polls its socket), so
compare several runs. The hash seed is now fixed (``PYTHONHASHSEED=0``); with
it, raw SQLite still moved 257,130-259,684 instructions per request between runs. Each engine (raw
SQLAlchemy, resilient_db with the default policy) runs in its own process
twice, with a warm-up of 200 requests and then 200 and ``200 + N`` requests
(the cyclic garbage collector off: it runs in lumps); the difference over N
cancels start-up and warm-up. A request is what ``benchmarks.overhead``
times: check a connection out, run ``SELECT 1``, return it.

The ratio is of client instructions only: the server's time and the network
are not in it, so against a server it overstates the share of the request
the library costs. Only the main thread (the one making the requests) counts:
the watchdog thread wakes on wall-clock time (about once a second while calls
are healthy), and under valgrind a request takes ~50x longer, so its share per
request would be ~50x what it is in real life, and vary with the machine's load.

    python -m benchmarks.instructions [--db sqlite,pg,mariadb] [--requests 500]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._util import sync_urls, table
from .overhead import request

TARGET = 1.05
BASE = 200
_TOTALS = re.compile(r"^totals:\s*(\d+)", re.M)


def child(url: str, kind: str, n: int) -> None:
    """Run ``n`` requests after a warm-up (inside valgrind)."""
    import sqlalchemy as sa

    import resilient_db

    engine = (
        sa.create_engine(url)
        if kind == "raw"
        else resilient_db.create_engine(url, name="bench", validate="off")
    )
    stmt = sa.text("SELECT 1")
    for _ in range(200):  # warm-up
        request(engine, stmt)
    # the cyclic collector runs in lumps (one pass can cost as much as 50 requests):
    # off while measuring, so the difference of two runs is the requests' own work
    gc.collect()
    gc.disable()
    for _ in range(n):
        request(engine, stmt)
    gc.enable()
    engine.dispose()


def _count(url: str, kind: str, n: int) -> int:
    """Instructions of the main thread (the requests') in one run of :func:`child`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--separate-threads=yes",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "benchmarks.instructions",
            "--child",
            url,
            kind,
            str(n),
        ]
        # one hash seed for every run: a random one alone moved the count by 1-3%
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        text = Path(f"{out}-01").read_text()
    m = _TOTALS.search(text)
    if m is None:
        raise RuntimeError("no instruction total in callgrind's output")
    return int(m.group(1))


def measure(url: str, requests: int) -> dict[str, Any]:
    """Instructions per request of raw SQLAlchemy and of resilient_db on ``url``."""
    per: dict[str, float] = {}
    for kind in ("raw", "resilient_db"):
        per[kind] = (_count(url, kind, BASE + requests) - _count(url, kind, BASE)) / requests
    return {
        "raw_instructions": per["raw"],
        "resilient_instructions": per["resilient_db"],
        "ratio": per["resilient_db"] / per["raw"],
        "requests": requests,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Print instructions per request and the ratio per database (or JSON)."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["--child"]:
        child(args_in[1], args_in[2], int(args_in[3]))
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__)
    ap.add_argument("--db", default="sqlite,pg,mariadb", help="comma-separated")
    ap.add_argument("--requests", type=int, default=500, help="measured requests")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(args_in)
    if shutil.which("valgrind") is None:
        print("benchmarks.instructions: valgrind is not installed, skipped", file=sys.stderr)
        return 0
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for db, url in sync_urls(args.db, tmp, "instructions"):
                results[db] = measure(url, args.requests)
        except ValueError as e:
            ap.error(str(e))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    rows = [
        (
            db,
            f"{r['raw_instructions']:,.0f}",
            f"{r['resilient_instructions']:,.0f}",
            f"{r['ratio']:.3f}",
            "ok" if r["ratio"] <= TARGET else f"over {TARGET}",
        )
        for db, r in results.items()
    ]
    print("Client instructions per request (checkout + SELECT 1 + return), callgrind")
    print(table(["db", "raw", "resilient_db", "ratio", f"target ≤ {TARGET}"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
