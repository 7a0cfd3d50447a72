"""``resilient-db demo``: the SQLite outage, with and without resilient_db."""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from resilient_db import demo
from resilient_db.cli import main
from resilient_db.demo import Settings, Variant, summarize
from resilient_db.testing._timeline import Sample

ROWS = (
    "requests",
    "served ok",
    "failed fast (error page)",
    "timed out (client gave up)",
    "p99 latency, non-DB requests",
    "p99 latency, DB requests",
    "time to detect (first error)",
    "time to recover (after db back)",
    "peak request queue",
)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One real ``resilient-db demo --quick --plot`` run."""
    png = tmp_path_factory.mktemp("demo") / "demo.png"
    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["demo", "--quick", "--plot", str(png)])
    yield {
        "code": code,
        "out": out.getvalue(),
        "err": err.getvalue(),
        "seconds": time.monotonic() - start,
        "png": png,
    }


def _table(out: str) -> dict[str, tuple[str, str]]:
    table: dict[str, tuple[str, str]] = {}
    for line in out.splitlines():
        label = line[:34].strip()
        if label in ROWS:
            cells = re.findall(r"never|\d+\.\d+ s|\d+", line[34:])
            table[label] = (cells[0], cells[1])
    return table


def _num(cell: str) -> float:
    return float("inf") if cell == "never" else float(cell.removesuffix(" s"))


def _timeline(out: str, heading: str) -> list[tuple[float, str]]:
    lines = out.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(heading))
    events = []
    for line in lines[i + 1 :]:
        m = re.match(r"^\s+([+-]\d+\.\d\d) s  (.+)$", line)
        if not m:
            break
        events.append((float(m.group(1)), m.group(2)))
    return events


@pytest.mark.slow  # a whole-service scenario: skipped by the SQLAlchemy 2.0 pass
def test_quick_demo_runs_in_time(quick: dict[str, Any]) -> None:
    """``demo --quick`` exits 0 within the CI budget and says what it is running."""
    assert 0 == quick["code"]
    assert quick["seconds"] < 20
    assert "running the service without resilient_db" in quick["err"]
    assert quick["out"].startswith(
        "resilient-db demo: a web service on SQLite loses its database for 3 s"
    )


@pytest.mark.slow  # a whole-service scenario: skipped by the SQLAlchemy 2.0 pass
def test_timelines_read_like_incident_reports(quick: dict[str, Any]) -> None:
    """Each variant has an ordered timeline from the outage to the recovery."""
    for heading in ("without resilient_db  [", "with resilient_db  ["):
        events = _timeline(quick["out"], heading)
        times = [t for t, _ in events]
        assert sorted(times) == times
        assert (0.0, "outage starts") == (events[0][0], events[0][1][:13])
        back = next(t for t, text in events if text.startswith("database back"))
        assert 2.9 < back < 3.5
        assert events[-1][1].startswith("recovered")
    with_rdb = [text for _, text in _timeline(quick["out"], "with resilient_db  [")]
    assert any(text.startswith("breaker open: database requests fail fast") for text in with_rdb)
    assert any(text.startswith("breaker closed") for text in with_rdb)
    without = [text for _, text in _timeline(quick["out"], "without resilient_db  [")]
    assert any(text.startswith("all workers stuck waiting for the lock") for text in without)


@pytest.mark.slow  # a whole-service scenario: skipped by the SQLAlchemy 2.0 pass
def test_numbers_are_consistent(quick: dict[str, Any]) -> None:
    """Same load for both; every request counted once; resilient_db fails fast, others flow."""
    table = _table(quick["out"])
    assert set(ROWS) == set(table)
    for col in (0, 1):
        total = int(table["requests"][col])
        parts = sum(
            int(table[k][col])
            for k in ("served ok", "failed fast (error page)", "timed out (client gave up)")
        )
        assert total == parts
    assert table["requests"][0] == table["requests"][1]
    without_p99, with_p99 = (_num(c) for c in table["p99 latency, non-DB requests"])
    assert with_p99 < 1.0 < without_p99
    assert _num(table["time to detect (first error)"][1]) < 1.0
    assert int(table["failed fast (error page)"][1]) > 0
    assert int(table["timed out (client gave up)"][1]) < int(table["timed out (client gave up)"][0])
    assert int(table["peak request queue"][1]) < int(table["peak request queue"][0])


@pytest.mark.slow  # a whole-service scenario: skipped by the SQLAlchemy 2.0 pass
def test_plot_written(quick: dict[str, Any]) -> None:
    """--plot writes a PNG with both runs."""
    data = Path(quick["png"]).read_bytes()
    assert (b"\x89PNG\r\n\x1a\n", True) == (data[:8], len(data) > 20_000)
    assert f"plot written to {quick['png']}" in quick["out"]


def _variant() -> Variant:
    """A hand-made run: outage from t=10 to t=13, breaker open 10.3..13.4."""
    v = Variant("with resilient_db", "test engine")
    v.t0, v.outage_start, v.outage_end, v.t_end = 9.0, 10.0, 13.0, 15.0
    v.samples = [
        Sample(9.5, 9.51, "ok", None, True),
        Sample(9.6, 9.602, "ok", None, False),
        Sample(10.0, 10.25, "failed", "lock_timeout", True),
        Sample(10.4, 10.4001, "rejected", "circuit_open", True),
        Sample(10.5, 12.9, "timeout", None, False),
        Sample(13.1, 13.2, "rejected", "circuit_open", True),
        Sample(13.3, 13.45, "ok", None, True),
    ]
    v.queue_sizes = [(9.5, 0), (10.5, 40), (11.0, 3)]
    v.breaker = [(10.3, "closed", "open"), (13.4, "half-open", "closed")]
    return v


def test_summary_definitions() -> None:
    """Detect = first DB error after the outage began; recover = first OK DB request after."""
    s = Settings(rate=50.0)
    summ = summarize(_variant(), s)
    assert {
        "requests": 7,
        "ok": 3,
        "failed_fast": 3,
        "rejected_by_breaker": 2,
        "timed_out": 1,
        "detect_s": 0.25,
        "recover_s": 0.45,
        "peak_queue": 40,
    } == {
        k: summ[k]
        for k in (
            "requests",
            "ok",
            "failed_fast",
            "rejected_by_breaker",
            "timed_out",
            "detect_s",
            "recover_s",
            "peak_queue",
        )
    }
    assert {
        "first_error": 0.25,
        "first_error_kind": "lock_timeout",
        "clients_give_up": 2.5,
        "queue_piles_up": 0.5,
        "breaker_open": 0.3,
        "failed_probes": 0,
        "breaker_closed": 3.4,
        "recovered": 3.45,
    } == summ["events"]


def test_json_output(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints the settings and one summary per variant."""
    v = _variant()
    monkeypatch.setattr(demo, "simulate", lambda settings, progress=None: [v, v])
    assert 0 == main(["demo", "--quick", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert (3.0, 2) == (doc["settings"]["outage"], len(doc["variants"]))
    assert 0.25 == doc["variants"][0]["detect_s"]
