"""``resilient-db drill``: a game day through the fault proxy, against real servers."""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from tests.conftest import PG_URL, SENTINEL, require

from resilient_db.cli import main
from resilient_db.testing.drill import format_table


def _run(argv: list[str]) -> tuple[int, str, str, float]:
    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue(), time.monotonic() - start


@pytest.fixture(scope="module")
def pg_drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One short default-scenario drill against PostgreSQL (password: the SENTINEL)."""
    url = sa.make_url(PG_URL)
    require(url.host or "127.0.0.1", url.port or 5432, "PostgreSQL")
    secret = url.set(password=SENTINEL).render_as_string(hide_password=False)
    png = tmp_path_factory.mktemp("drill") / "drill.png"
    code, out, err, seconds = _run(
        ["drill", secret, "--phase-seconds", "2", "--json", "--plot", str(png)]
    )
    yield {
        "code": code,
        "report": json.loads(out),
        "stdout": out,
        "stderr": err,
        "png": png,
        "seconds": seconds,
    }


@pytest.mark.slow  # a whole-service scenario: skipped by the SQLAlchemy 2.0 pass
def test_default_scenario_detects_and_recovers(pg_drill: dict[str, Any]) -> None:
    """Every fault is survived; each makes new connections fail, so each opens the breaker."""
    report = pg_drill["report"]
    assert (0, True) == (pg_drill["code"], report["recovered"])
    names = [p["name"] for p in report["phases"]]
    assert [
        "baseline",
        "refuse",
        "after refuse",
        "blackhole",
        "after blackhole",
        "reset",
        "after reset",
        "latency",
        "after latency",
    ] == names
    by = {p["name"]: p for p in report["phases"]}
    assert (0, 0) == (by["baseline"]["failed"], by["baseline"]["rejected"])
    assert by["baseline"]["ok"] > 10
    for fault in ("refuse", "blackhole", "reset"):
        phase = by[fault]
        assert phase["detect_s"] is not None and phase["detect_s"] < 3.0, phase
        # a reply already on its way when the fault began may still arrive: one per worker
        assert phase["rejected"] > 0 and phase["ok"] <= report["threads"], phase
        assert phase["recover_s"] is not None and phase["recover_s"] < 5.0, phase
        assert by[f"after {fault}"]["ok"] > 0
    # silence: calls end at the 1 s call deadline (or the 2 s connect timeout), never hang
    assert 900 < by["blackhole"]["max_ms"] < 3000
    # 100 ms per packet each way: slower, never failing, breaker closed
    assert (0, None) == (by["latency"]["failed"], by["latency"]["detect_s"])
    assert by["latency"]["p50_ms"] > 5 * by["baseline"]["p50_ms"]
    assert pg_drill["seconds"] < 30


@pytest.mark.slow  # a whole-service scenario: skipped by the SQLAlchemy 2.0 pass
def test_json_report_schema(pg_drill: dict[str, Any]) -> None:
    """The --json document has the documented keys and types."""
    report = pg_drill["report"]
    assert {
        "version",
        "target",
        "scratch_table",
        "threads",
        "phase_seconds",
        "latency_s",
        "policy",
        "duration_s",
        "recovered",
        "proxy_errors",
        "phases",
        "breaker",
        "breaker_open",
        "series_interval_s",
        "series",
    } == set(report)
    assert {
        "dialect": "postgresql",
        "driver": "psycopg",
        "host": "127.0.0.1",
        "port": 5432,
        "database": "test",
        "user": "postgres",
    } == report["target"]
    phase_keys = {
        "name",
        "fault",
        "start_s",
        "end_s",
        "requests",
        "ok",
        "failed",
        "rejected",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "errors",
        "detect_s",
        "recover_s",
    }
    for phase in report["phases"]:
        assert phase_keys == set(phase)
        assert phase["requests"] == phase["ok"] + phase["failed"] + phase["rejected"]
    assert {"t", "ok", "failed", "rejected", "timeout", "p50_ms", "p99_ms"} == set(
        report["series"][0]
    )
    assert {"t_s", "state"} == set(report["breaker"][0])
    assert report["scratch_table"].startswith("resilient_db_drill_")
    assert [] == report["proxy_errors"]


@pytest.mark.slow  # a whole-service scenario: skipped by the SQLAlchemy 2.0 pass
def test_scratch_table_dropped_and_password_hidden(pg_drill: dict[str, Any]) -> None:
    """The drill leaves no table behind and never prints the password."""
    table = pg_drill["report"]["scratch_table"]
    assert table.startswith("resilient_db_drill_")
    engine = sa.create_engine(PG_URL)
    with engine.connect() as conn:  # this drill's own table: other runs may share the server
        left = conn.execute(
            sa.text("SELECT count(*) FROM pg_tables WHERE tablename = :t"), {"t": table}
        ).scalar()
    engine.dispose()
    assert 0 == left
    assert f"dropped scratch table {pg_drill['report']['scratch_table']}" in pg_drill["stderr"]
    assert SENTINEL not in pg_drill["stdout"] + pg_drill["stderr"]


@pytest.mark.slow  # a whole-service scenario: skipped by the SQLAlchemy 2.0 pass
def test_plot_is_a_png(pg_drill: dict[str, Any]) -> None:
    """--plot writes a real PNG image of a sensible size."""
    data = Path(pg_drill["png"]).read_bytes()
    assert b"\x89PNG\r\n\x1a\n" == data[:8]
    assert len(data) > 20_000


@pytest.mark.slow  # a whole-service scenario: skipped by the SQLAlchemy 2.0 pass
def test_text_table(pg_drill: dict[str, Any]) -> None:
    """The text report has one row per phase under the column headers."""
    lines = format_table(pg_drill["report"]).splitlines()
    assert lines[2].split() == [
        "phase",
        "secs",
        "ok",
        "failed",
        "rejected",
        "p50",
        "ms",
        "p99",
        "ms",
        "max",
        "ms",
        "detect",
        "recover",
        "errors",
    ]
    assert lines[4].startswith("baseline")
    assert any(line.startswith("blackhole") and "read_timeout" in line for line in lines)


def test_mariadb_refuse(mariadb_url: str) -> None:
    """The drill works against MariaDB too (one fault, text output)."""
    code, out, err, seconds = _run(
        ["drill", mariadb_url, "--phase-seconds", "1", "--scenario", "refuse", "--quiet"]
    )
    assert (0, "") == (code, err)
    row = next(line for line in out.splitlines() if line.startswith("refuse")).split()
    ok, failed, rejected, detect = int(row[2]), int(row[3]), int(row[4]), row[8]
    # a reply already on its way when the fault began may still arrive: one per worker (4)
    assert (True, True, True, True) == (ok <= 4, failed > 0, rejected > 0, detect.endswith("s"))
    # a connect the proxy accepted just before it began refusing gets no greeting
    assert set(row[10::2]) <= {"refused", "disconnect", "ambiguous_commit", "connect_timeout"}
    assert seconds < 15


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:///app.db", "has no network connection to break"),
        ("postgresql+psycopg://app@/shop?host=/var/run/postgresql", "would bypass the proxy"),
        ("mysql+pymysql://app@db/shop?unix_socket=/tmp/mysql.sock", "would bypass the proxy"),
    ],
)
def test_refuses_urls_it_cannot_sit_in_front_of(url: str, message: str) -> None:
    """Only the host:port in the URL is ever contacted: anything else is refused."""
    code, out, err, _ = _run(["drill", url])
    assert (2, "") == (code, out)
    assert message in err


def test_bad_options() -> None:
    """Unknown faults and non-positive durations are usage errors."""
    code, _, err, _ = _run(["drill", PG_URL, "--scenario", "refuse,meteor"])
    assert (2, True) == (code, "unknown fault meteor" in err)
    code, _, err, _ = _run(["drill", PG_URL, "--phase-seconds", "0"])
    assert 2 == code


def test_unreachable_server_is_explained() -> None:
    """A target that is down ends the drill at once with the diagnosis, exit status 1."""
    code, out, err, seconds = _run(["drill", "postgresql+psycopg://app@127.0.0.1:1/x", "--quiet"])
    assert (1, "") == (code, out)
    assert "could not set up the drill: [refused] Nothing is accepting connections" in err
    assert seconds < 10


def test_reads_the_url_from_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a URL argument the drill reads $DATABASE_URL, as `check` does."""
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://app@127.0.0.1:1/x")
    code, out, err, _ = _run(["drill", "--quiet"])
    assert (1, "") == (code, out)
    assert "could not set up the drill: [refused]" in err
    monkeypatch.delenv("DATABASE_URL")
    code, _, err, _ = _run(["drill"])
    assert (2, "resilient-db drill: no database URL: pass one or set $DATABASE_URL\n") == (
        code,
        err,
    )


def test_policy_is_a_file_as_for_check(tmp_path: Path) -> None:
    """--policy FILE reads a JSON policy, as `check --policy` does; a typo is a usage error."""
    policy = tmp_path / "policy.json"
    policy.write_text('{"pool": {"sizee": 3}}')
    code, out, err, _ = _run(
        ["drill", "postgresql+psycopg://app@127.0.0.1:1/x", "--policy", str(policy)]
    )
    assert (2, "") == (code, out)
    assert f"--policy {policy}: pool.sizee: is not a setting of PoolPolicy." in err


def test_plot_draws_bins_as_steps_and_the_legend_outside() -> None:
    """A bin's count is flat over its own interval (nothing rises before the fault) and
    the legend sits right of the axes."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from resilient_db.testing._timeline import Panel, figure

    series = [
        {"t": i * 0.5, "ok": 0, "failed": 0, "rejected": 20 if i >= 10 else 0, "timeout": 0}
        | {"p50_ms": 1.0, "p99_ms": 2.0}
        for i in range(16)
    ]
    fig = figure([Panel("p", series, 0.5, faults=[(5.0, 8.0, "refuse")])], title="t")
    top = fig.axes[0]
    (line,) = [ln for ln in top.get_lines() if ln.get_label() == "rejected fast"]
    xs, ys = line.get_path().vertices.T  # the path as drawn, steps included
    first = min(x for x, y in zip(xs, ys, strict=True) if y > 0)
    fig.canvas.draw()
    legend_box = top.get_legend().get_window_extent()
    axes_box = top.get_window_extent()
    plt.close(fig)
    assert ("steps-post", 5.0, True) == (
        line.get_drawstyle(),
        first,
        legend_box.x0 >= axes_box.x1,
    )
