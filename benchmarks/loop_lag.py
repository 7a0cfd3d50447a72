"""Event-loop health while the database is blackholed.

A :class:`~resilient_db.testing.FaultProxy` in front of PostgreSQL swallows all
traffic (connections are accepted, no byte comes back). Meanwhile 200 tasks
keep calling ``SELECT 1`` through the engine, each pausing ``--think`` seconds
after a failure as a client or request handler would, and a probe task sleeps
10 ms in a loop and records how late it wakes up: the event-loop lag. Anything
that blocks the loop (a blocking sleep between retries, a lock held across a
database call, synchronous DNS) shows up as lag.

Two engines run one after the other, each with a fresh proxy:

- ``raw``: ``sqlalchemy.ext.asyncio.create_async_engine(url)``, its defaults;
- ``resilient_db``: ``resilient_db.create_async_engine(url)``, default policy.

Reported per driver and engine: lag p50 / p99 / max, calls answered and
failed (by error type), and the share of one CPU the process used. Target:
resilient_db's p99 lag under 20 ms. The proxy runs its own loop in a thread of
this process, so its (small) work competes for the GIL too.

    python -m benchmarks.loop_lag [--smoke] [--drivers asyncpg,psycopg] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import resilient_db
from resilient_db.testing.proxy import FaultProxy

from ._util import PG_URL, reachable, table

TARGET_MS = 20.0
PROBE_INTERVAL = 0.010

DRIVERS = {"asyncpg": "postgresql+asyncpg", "psycopg": "postgresql+psycopg"}


def _percentile(xs: Sequence[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def run(
    engine: AsyncEngine, proxy: FaultProxy, *, seconds: float, tasks: int, think: float
) -> dict[str, Any]:
    """Blackhole the proxy, drive ``tasks`` callers for ``seconds`` and measure the lag."""
    stmt = sa.text("SELECT 1")
    stopping = False
    lags: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    answered = 0

    async def caller() -> None:
        nonlocal answered
        while not stopping:
            try:
                async with engine.connect() as conn:
                    await conn.execute(stmt)
                answered += 1
            except Exception as e:
                errors[type(e).__name__] += 1
                await asyncio.sleep(think)

    async def probe() -> None:
        while not stopping:
            t0 = time.perf_counter()
            await asyncio.sleep(PROBE_INTERVAL)
            lags.append(time.perf_counter() - t0 - PROBE_INTERVAL)

    async with engine.connect() as conn:  # the database works before the outage
        await conn.execute(stmt)
    proxy.blackhole()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    workers = [asyncio.create_task(caller()) for _ in range(tasks)]
    prober = asyncio.create_task(probe())
    await asyncio.sleep(seconds)
    stopping = True
    cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, prober, return_exceptions=True)
    return {
        "lag_p50_ms": statistics.median(lags) * 1e3,
        "lag_p99_ms": _percentile(lags, 0.99) * 1e3,
        "lag_max_ms": max(lags) * 1e3,
        "probes": len(lags),
        "answered": answered,
        "failed": dict(errors.most_common()),
        "cpu_share": cpu,
    }


async def measure(
    url: str, *, seconds: float, tasks: int, think: float, policy: resilient_db.Policy
) -> dict[str, dict[str, Any]]:
    """Lag figures for a raw and a resilient engine on ``url`` (blackholed through a proxy)."""
    u = sa.make_url(url)
    results: dict[str, dict[str, Any]] = {}
    for name in ("raw", "resilient_db"):
        with FaultProxy(u.host or "127.0.0.1", u.port or 5432) as proxy:
            via = u.set(host=proxy.host, port=proxy.port)
            if name == "raw":
                engine = create_async_engine(via)
            else:
                engine = resilient_db.create_async_engine(via, policy=policy, validate="off")
            try:
                results[name] = await run(engine, proxy, seconds=seconds, tasks=tasks, think=think)
            finally:
                await engine.dispose()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print a table (or JSON)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.loop_lag", description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="a short run for CI")
    ap.add_argument(
        "--drivers", default=None, help="comma-separated (default: asyncpg,psycopg; smoke: asyncpg)"
    )
    ap.add_argument("--tasks", type=int, default=200, help="concurrent callers")
    ap.add_argument("--think", type=float, default=0.05, help="pause after a failure, s")
    ap.add_argument("--seconds", type=float, default=None, help="outage length per run")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (4.0 if args.smoke else 15.0)
    # the default policy, with the connect timeout shortened in smoke runs so that
    # the breaker still opens (after the first connects time out) within the run
    policy = resilient_db.DEFAULT_POLICY
    if args.smoke:
        policy = resilient_db.Policy(timeouts=resilient_db.Timeouts(connect=1.0))
    u = sa.make_url(PG_URL)
    if not reachable(u.host or "127.0.0.1", u.port or 5432):
        print("loop_lag: PostgreSQL not reachable, skipped", file=sys.stderr)
        return 0
    logging.getLogger("resilient_db").setLevel(logging.ERROR)  # one warning per failure
    logging.getLogger("psycopg").setLevel(logging.ERROR)  # cancelled hung raw queries
    results: dict[str, dict[str, dict[str, Any]]] = {}
    drivers = args.drivers or ("asyncpg" if args.smoke else "asyncpg,psycopg")
    for driver in drivers.split(","):
        if driver not in DRIVERS:
            ap.error(f"unknown driver {driver!r}")
        url = u.set(drivername=DRIVERS[driver]).render_as_string(hide_password=False)
        results[driver] = asyncio.run(
            measure(url, seconds=seconds, tasks=args.tasks, think=args.think, policy=policy)
        )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    rows = []
    for driver, by_engine in results.items():
        for name, r in by_engine.items():
            failed = ", ".join(f"{k} {v}" for k, v in r["failed"].items()) or "-"
            verdict = ""
            if name == "resilient_db":
                verdict = "ok" if r["lag_p99_ms"] < TARGET_MS else f"over {TARGET_MS:g} ms"
            rows.append(
                (
                    driver,
                    name,
                    f"{r['lag_p50_ms']:.2f}",
                    f"{r['lag_p99_ms']:.2f}",
                    f"{r['lag_max_ms']:.2f}",
                    r["answered"],
                    failed,
                    f"{r['cpu_share']:.0%}",
                    verdict,
                )
            )
    print(
        f"Event-loop lag, database blackholed for {seconds:g} s, {args.tasks} callers "
        f"(pause {args.think:g} s after a failure), probe every {PROBE_INTERVAL * 1e3:g} ms"
    )
    headers = ["driver", "engine", "p50 ms", "p99 ms", "max ms", "answered", "failed", "CPU"]
    print(table([*headers, f"p99 < {TARGET_MS:g} ms"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
