"""The cascade benchmark's report: the acceptance targets of issue 13 and the tables."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

#: "every DB request answered within ... of its arrival" (blackhole)
ANSWER_WITHIN = 3.0
#: "fail in under ..." (refusing, from 1 s into the outage)
FAST_FAIL = 0.005


def targets(r: dict[str, Any]) -> list[tuple[str, bool]]:
    """The acceptance targets of ``r``'s scenario and whether this run met them."""
    p99_ok = r["cpu_p99_ms_during"] <= 2 * r["cpu_p99_ms_before"]
    full, reset = r["full_service_s"], r["reset_timeout_s"]
    recovered = full is not None and full <= reset + 0.5
    recovery = f"full DB service within reset_timeout + 0.5 s ({reset + 0.5:g} s) of the return"
    if r["scenario"] == "blackhole":
        rej = r["burst_rejection_p99_us"]
        return [
            ("non-DB p99 during <= 2x before", p99_ok),
            ("non-DB throughput during >= 95% of before",
             r["cpu_rps_during"] >= 0.95 * r["cpu_rps_before"]),
            (f"every DB request answered within {ANSWER_WITHIN:g} s of its arrival",
             r["db_max_s"] <= ANSWER_WITHIN),
            (recovery, recovered),
            ("(open-breaker rejection p99 < 50 us, hot path, burst)", rej is not None and rej < 50),
        ]  # fmt: skip
    if r["scenario"] == "brownout":
        return [
            ("non-DB p99 during <= 2x before", p99_ok),
            ("the slow database still serves DB requests (served OK > 0)", r["db_ok_during"] > 0),
        ]
    return [
        (f"from 1 s into the outage >= 95% of DB requests fail in < {FAST_FAIL * 1e3:g} ms",
         r["fast_fail_share"] >= 0.95),
        (recovery, recovered),
    ]  # fmt: skip


def print_targets(results: list[dict[str, Any]]) -> int:
    """Print the ok / MISS lines of the resilient_db rows; the number missed."""
    missed = 0
    for r in results:
        if not r["resilient"]:
            continue
        for what, ok in targets(r):
            missed += not ok and not what.startswith("(")
            tag = f"[{r['db']} {r['scenario']} {r['setup']}]"
            print(f"  {tag:34} {'ok  ' if ok else 'MISS'} {what}")
    return missed


def _fmt(x: float | None, spec: str = ".2f", unit: str = "") -> str:
    if x is None:
        return "never"
    if math.isinf(x):
        return "hung"
    if math.isnan(x):
        return "-"
    return f"{x:{spec}}{unit}"


def _us(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 1e3:
        return f"{x:.0f} µs"
    return f"{x / 1e3:.1f} ms" if x < 1e6 else f"{x / 1e6:.1f} s"


def _label(r: dict[str, Any]) -> str:
    if r["setup"] == "resilient_db":
        return "resilient_db (default policy)"
    if r["setup"] == "tuned":
        return "tuned: resilient_db, tuned policy"
    if r["setup"] == "small-bulkhead":
        return "small-bulkhead: default, pool 2+0, 0 waiters"
    if r["setup"] == "adaptive":
        return "adaptive: default, PoolPolicy(adaptive=True)"
    return str(r["setup"])


def render(results: list[dict[str, Any]], *, with_scenario: bool = False) -> str:
    """A Markdown table of the results (one row per run)."""
    headers = [
        "db",
        "set-up",
        "non-DB req/s before / during / after",
        "non-DB p99 ms before / during / after",
        "DB failed (hung)",
        "DB served OK during",
        "fail < 5 ms (from +1 s)",
        "outage → open",
        "return → full service",
        "rejection p99 stream / burst",
        "slowest DB answer",
    ]
    if with_scenario:
        headers.insert(0, "outage")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in results:
        rps = " / ".join(f"{r[f'cpu_rps_{p}']:.0f}" for p in ("before", "during", "after"))
        p99 = " / ".join(_fmt(r[f"cpu_p99_ms_{p}"], ".1f") for p in ("before", "during", "after"))
        opened = "no breaker" if r["setup"] == "raw" else _fmt(r["open_after_s"], ".2f", " s")
        rej = _us(r["rejection_p99_us"]) if r["rejections"] else "-"
        if r.get("burst_rejection_p99_us") is not None:
            rej += " / " + _us(r["burst_rejection_p99_us"])
        share = r["fast_fail_share"]
        cells = [
            r["db"],
            _label(r),
            rps,
            p99,
            f"{r['db_failed']}/{r['db_requests']} ({r['db_hung']})",
            f"{r['db_ok_during']}/{r['db_during']}",
            "-" if math.isnan(share) else f"{share:.0%}",
            opened,
            _fmt(r["full_service_s"], ".2f", " s"),
            rej,
            _fmt(r["db_max_s"], ".2f", " s"),
        ]
        if with_scenario:
            cells.insert(0, r["scenario"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


DOC = Path(__file__).resolve().parent.parent / "docs" / "resilience.md"
BEGIN, END = "<!-- cascade:begin -->", "<!-- cascade:end -->"


def write_doc(text: str, path: Path = DOC) -> None:
    """Replace the generated block of docs/resilience.md with ``text``."""
    doc = path.read_text()
    a, b = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    path.write_text(doc[:a] + "\n" + text + "\n" + doc[b:])


def _median(xs: list[float]) -> float:
    s = sorted(x for x in xs if not math.isnan(x))
    if not s:
        return math.nan
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def _never(x: float) -> str:
    return "never" if math.isinf(x) else _fmt(x, ".2f", " s")


def render_medians(results: list[dict[str, Any]]) -> str:
    """A Markdown table of the medians over repeated runs, with the targets met per run."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["scenario"], r["db"], r["setup"]), []).append(r)
    headers = [
        "outage",
        "db",
        "set-up",
        "runs",
        "non-DB req/s before / during",
        "non-DB p99 ms before / during",
        "DB served OK during",
        "fail < 5 ms (from +1 s)",
        "outage → open",
        "return → full service",
        "slowest DB answer",
        "targets met (per run)",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for (scenario, db, _), rs in groups.items():

        def med(key: str, rs: list[dict[str, Any]] = rs) -> float:
            vals = [r[key] for r in rs]
            return _median([math.inf if v is None else float(v) for v in vals])

        met = []
        if rs[0]["resilient"]:
            per_run = [targets(r) for r in rs]
            for i, (what, _) in enumerate(per_run[0]):
                if not what.startswith("("):
                    met.append(f"{sum(t[i][1] for t in per_run)}/{len(rs)}")
        share = med("fast_fail_share")
        cells = [
            scenario,
            db,
            _label(rs[0]),
            str(len(rs)),
            f"{med('cpu_rps_before'):.0f} / {med('cpu_rps_during'):.0f}",
            f"{_fmt(med('cpu_p99_ms_before'), '.1f')} / {_fmt(med('cpu_p99_ms_during'), '.1f')}",
            f"{med('db_ok_during'):.0f}/{med('db_during'):.0f}",
            "-" if math.isnan(share) else f"{share:.0%}",
            "no breaker" if rs[0]["setup"] == "raw" else _never(med("open_after_s")),
            _never(med("full_service_s")),
            _fmt(med("db_max_s"), ".2f", " s"),
            " · ".join(met) if met else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
