"""Telemetry overhead: ``SELECT 1`` through raw SQLAlchemy and resilient_db engines.

Six engines in interleaved rounds, same process: raw SQLAlchemy; resilient_db
with no OpenTelemetry SDK (the default: no-op instruments); resilient_db with an
SDK ``MeterProvider`` + in-memory reader and ``TracerProvider`` + in-memory
exporter and the default timings (``db.client.operation.duration`` per execute,
held until the reader collects); the same with ``timing_buffer=0`` (each value
recorded at once); with ``pool_timings=True`` (plus ``wait_time``/``use_time``
per checkout); and with ``timings=False`` (observable pool and breaker metrics
only).

The held values cost the SDK's ``record()`` later, on the collecting thread.
That cost is measured too, after the timed rounds, and shown per call beside
the request-path figure ("+collect"), so nothing is hidden.

    python -m benchmarks.telemetry_overhead [--smoke] [--db sqlite,pg] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

import resilient_db
from resilient_db.telemetry import instrument, telemetry_of

from ._util import WARMUP, interleaved, median, per_database, table
from .overhead import request

#: variant -> target ratio to raw SQLAlchemy (None: informational)
TARGETS: dict[str, float | None] = {
    "no_sdk": 1.05,
    "sdk": 1.10,
    "sdk_unbuffered": None,
    "sdk_pool_timings": None,
    "sdk_no_timings": None,
}
#: instrument() options of the SDK variants
SDK_OPTIONS: dict[str, dict[str, Any]] = {
    "sdk": {},
    "sdk_unbuffered": {"timing_buffer": 0},
    "sdk_pool_timings": {"pool_timings": True},
    "sdk_no_timings": {"timings": False},
}


def measure(url: str, *, rounds: int, calls: int) -> dict[str, Any]:
    """Median per-call µs of each variant and its ratio to raw SQLAlchemy."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    tracers = TracerProvider()
    tracers.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    engines: dict[str, sa.Engine] = {"raw": sa.create_engine(url)}
    for name in TARGETS:
        engines[name] = resilient_db.create_engine(url, name=f"bench-{name}", validate="off")
    for name, options in SDK_OPTIONS.items():
        instrument(engines[name], meter_provider=meters, tracer_provider=tracers, **options)
    stmt = sa.text("SELECT 1")
    deferred: dict[str, float] = {}
    try:
        samples = interleaved(
            {n: (lambda e=e: request(e, stmt)) for n, e in engines.items()},
            rounds=rounds,
            calls=calls,
        )
        made = WARMUP + rounds * calls
        for name in SDK_OPTIONS:  # what the held values cost when a reader collects
            t0 = time.perf_counter()
            held = telemetry_of(engines[name]).flush()
            deferred[name] = (time.perf_counter() - t0) / made
            if held and held < made:  # a full buffer recorded some at once: counted above
                print(f"note: {name}: {made - held} values were recorded at once", file=sys.stderr)
        reader.get_metrics_data()
    finally:
        for e in engines.values():
            e.dispose()
    raw = median(samples["raw"])
    out: dict[str, Any] = {"raw_us": raw * 1e6}
    for name in TARGETS:
        m = median(samples[name])
        later = deferred.get(name, 0.0)
        out[name] = {
            "us": m * 1e6,
            "ratio": m / raw,
            "collect_us": later * 1e6,
            "ratio_with_collect": (m + later) / raw,
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print a table (or JSON)."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.telemetry_overhead", description=__doc__
    )
    ap.add_argument("--smoke", action="store_true", help="a short run for CI")
    ap.add_argument("--db", default="sqlite,pg", help="comma-separated: sqlite,pg")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    results = per_database(ap, args, "telemetry_overhead", measure)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    rows = []
    for db, r in results.items():
        for name, target in TARGETS.items():
            v = r[name]
            ratio = v["ratio"]
            verdict = "" if target is None else "ok" if ratio <= target else "over"
            rows.append(
                (
                    db,
                    name,
                    f"{r['raw_us']:.1f}",
                    f"{v['us']:.1f}",
                    f"{ratio:.3f}",
                    "-" if target is None else f"≤ {target}",
                    verdict,
                    f"{v['collect_us']:.1f}",
                    f"{v['ratio_with_collect']:.3f}",
                )
            )
    print("Telemetry overhead: SELECT 1 per call (checkout + execute + return), medians")
    print("+collect: the held values' SDK record() at collection time, per call")
    print(
        table(
            ["db", "variant", "raw µs", "µs", "ratio", "target", "", "+collect µs", "ratio incl."],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
