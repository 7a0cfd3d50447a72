"""Fail-fast cost: a call rejected by an open breaker, resilient_db against pybreaker.

``resilient_db``: ``engine.connect()`` on a SQLite engine whose breaker was
opened by counted failures (default policy), raising :class:`CircuitOpenError`.
``pybreaker``: ``cb.call(fn)`` on an open ``pybreaker.CircuitBreaker``,
raising ``CircuitBreakerError``. Each call is timed on its own; the variants
alternate round by round (each breaker is opened again at the start of its
round, so the default ``reset_timeout`` never lets a probe through), and the
report gives the median over rounds of each round's p50 and p99.

    python -m benchmarks.rejection [--smoke] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pybreaker

import resilient_db

from ._util import median, table

TARGET_US = 5.0


def _quantile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1e3


def _timed(fn: Callable[[], None], calls: int) -> tuple[float, float]:
    """(p50, p99) in µs of ``calls`` calls of ``fn``, each timed on its own."""
    clock = time.perf_counter_ns
    samples = []
    for _ in range(calls):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    samples.sort()
    return _quantile(samples, 0.5), _quantile(samples, 0.99)


def measure(url: str, *, rounds: int, calls: int) -> dict[str, Any]:
    """Median p50/p99 (µs) of a rejected call through each breaker."""
    # the breaker opens once per round: keep its WARNING off the benchmark's output
    logging.getLogger("resilient_db").addHandler(logging.NullHandler())
    engine = resilient_db.create_engine(url, name="bench", validate="off")
    ours = resilient_db.breaker_of(engine)
    cb = pybreaker.CircuitBreaker(fail_max=1)

    def open_ours() -> None:
        ours.reset()
        for _ in range(ours.policy.failure_threshold):
            ours.record_failure("benchmark: counted failure")

    # try/except rather than contextlib.suppress: the timed call is the rejection alone
    def connect() -> None:
        try:  # noqa: SIM105
            engine.connect()
        except resilient_db.CircuitOpenError:
            pass

    def nothing() -> None:
        pass

    def call() -> None:
        try:  # noqa: SIM105
            cb.call(nothing)
        except pybreaker.CircuitBreakerError:
            pass

    variants = {"resilient_db": (open_ours, connect), "pybreaker": (cb.open, call)}
    p50: dict[str, list[float]] = {n: [] for n in variants}
    p99: dict[str, list[float]] = {n: [] for n in variants}
    try:
        for reopen, fn in variants.values():  # warm-up
            reopen()
            _timed(fn, 200)
        for r in range(rounds):
            for name in variants if r % 2 == 0 else list(reversed(variants)):
                reopen, fn = variants[name]
                reopen()
                a, b = _timed(fn, calls)
                p50[name].append(a)
                p99[name].append(b)
        if ours.state != "open":  # pragma: no cover - a round outlived reset_timeout
            raise RuntimeError("the engine's breaker closed during the run")
    finally:
        engine.dispose()
    return {n: {"p50_us": median(p50[n]), "p99_us": median(p99[n])} for n in variants} | {
        "rounds": rounds,
        "calls_per_round": calls,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print a table (or JSON)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.rejection", description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="a short run for CI")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    rounds, calls = (11, 500) if args.smoke else (21, 5000)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(f"sqlite:///{Path(tmp) / 'bench.db'}", rounds=rounds, calls=calls)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    ours, theirs = result["resilient_db"], result["pybreaker"]
    verdict = "ok" if ours["p50_us"] <= TARGET_US else f"over {TARGET_US}"
    rows = [
        ("resilient_db: engine.connect()", f"{ours['p50_us']:.2f}", f"{ours['p99_us']:.2f}"),
        ("pybreaker: cb.call()", f"{theirs['p50_us']:.2f}", f"{theirs['p99_us']:.2f}"),
    ]
    print(f"Rejection by an open breaker: {rounds} rounds of {calls} calls, medians")
    print(table(["path", "p50 µs", "p99 µs"], rows))
    print(
        f"ratio {ours['p50_us'] / theirs['p50_us']:.2f} x pybreaker "
        f"(target p50 ≤ {TARGET_US} µs: {verdict})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
