"""Run every benchmark: ``python -m benchmarks [--smoke]``.

Each benchmark module exposes ``main(argv) -> int``; a missing optional
module (not written yet, or its extra not installed) is reported and skipped.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

#: module name -> arguments added in smoke mode
BENCHMARKS: dict[str, list[str]] = {
    "overhead": ["--smoke"],
    "import_cost": ["--smoke"],
    "rejection": ["--smoke"],
    "async_overhead": ["--smoke"],
    "telemetry_overhead": ["--smoke"],
    "loop_lag": ["--smoke"],
    "cascade": ["--smoke"],
    "ledger": ["--smoke"],
    "fleet": ["--smoke"],
}


def main() -> int:
    """Run the benchmarks one after another; non-zero if any failed to run."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="short runs, for CI")
    ap.add_argument("only", nargs="*", help="benchmark names (default: all)")
    args = ap.parse_args()
    failed = 0
    for name, smoke_args in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        try:
            mod = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"benchmarks.{name}":
                continue
            raise
        print(f"\n== {name}", flush=True)
        t0 = time.monotonic()
        rc = mod.main(smoke_args if args.smoke else [])
        print(f"({name}: {time.monotonic() - t0:.1f} s)", flush=True)
        if rc:
            print(f"benchmark {name} exited with {rc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
