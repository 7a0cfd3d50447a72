"""Tests for `resilient-db check` against real PostgreSQL, MariaDB and SQLite."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import resilient_db
from resilient_db.cli import build_parser, main
from resilient_db.testing import FaultProxy
from tests import test_validate
from tests.conftest import SENTINEL
from tests.servers import APP_PASSWORD, APP_USER, MariaServer, PgServer, free_port

BIN = Path(sys.executable).parent / "resilient-db"

# A loopback port that drops SYNs (a blackholed host), shared with the API tests.
silent_port = test_validate.silent_port


def check(
    capsys: pytest.CaptureFixture[str], *argv: str, json_out: bool = True
) -> tuple[int, str, dict[str, Any] | None]:
    """Run `check` in-process; return (status, stdout+stderr, parsed JSON report or None)."""
    args = ["check", *argv, *(["--json"] if json_out else [])]
    try:
        status = main(args)
    except SystemExit as exc:  # argparse errors
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert SENTINEL not in out + err
    report = json.loads(out) if json_out and out.startswith("{") else None
    return status, out + err, report


def root(report: dict[str, Any] | None) -> str | None:
    """The root-cause code of a JSON report."""
    assert report is not None
    cause = report["root_cause"]
    return str(cause["code"]) if isinstance(cause, dict) else None


def with_password(url: str, **parts: Any) -> str:
    """``url`` with the sentinel password and other parts replaced, as a string."""
    u = sa.make_url(url).set(password=SENTINEL, **parts)
    return u.render_as_string(hide_password=False)


@pytest.fixture
def env_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A clean environment: no DATABASE_URL or RESILIENT_DB_* variables."""
    for key in list(os.environ):
        if key == "DATABASE_URL" or key.startswith("RESILIENT_DB_"):
            monkeypatch.delenv(key)
    yield


@pytest.fixture
def pg_sentinel(throwaway_pg: PgServer) -> Iterator[tuple[str, str]]:
    """A throwaway PostgreSQL login whose real password is SENTINEL: (role, URL)."""
    role = f"rdb_sentinel_{uuid.uuid4().hex[:10]}"
    throwaway_pg.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{SENTINEL}';")
    try:
        yield role, throwaway_pg.url(role, SENTINEL, "app")
    finally:
        throwaway_pg.psql(f"DROP ROLE IF EXISTS {role};")


@pytest.fixture
def mariadb_sentinel(throwaway_mariadb: MariaServer) -> Iterator[tuple[str, str]]:
    """A throwaway MariaDB account whose real password is SENTINEL: (account, URL)."""
    user = f"rdb_sentinel_{uuid.uuid4().hex[:10]}"
    account = f"'{user}'@'127.0.0.1'"
    throwaway_mariadb.sql(
        f"CREATE USER {account} IDENTIFIED BY '{SENTINEL}'; GRANT ALL ON test.* TO {account};"
    )
    try:
        yield account, throwaway_mariadb.url(user, SENTINEL, "test")
    finally:
        throwaway_mariadb.sql(f"DROP USER IF EXISTS {account};")


@pytest.fixture(params=["postgresql", "mariadb"])
def sentinel_url(request: pytest.FixtureRequest) -> str:
    """A server URL whose password is SENTINEL and that logs in: shared PostgreSQL (trust,
    the password is ignored) and a throwaway MariaDB account (root has no password)."""
    if request.param == "postgresql":
        return with_password(str(request.getfixturevalue("pg_url")))
    _, url = request.getfixturevalue("mariadb_sentinel")
    return str(url)


# --------------------------------------------------------------------------- network layer


def test_wrong_host(capsys: pytest.CaptureFixture[str], server_url: str) -> None:
    """A host where no database listens is RDB202 (refused), exit 2."""
    status, out, report = check(capsys, with_password(server_url, host="127.0.0.2"))
    assert (2, "RDB202") == (status, root(report))
    assert "127.0.0.2" in out


def test_dns_failure(capsys: pytest.CaptureFixture[str], server_url: str) -> None:
    """A host name that does not resolve is RDB201, exit 2."""
    status, _, report = check(capsys, with_password(server_url, host="db.does-not-exist.invalid"))
    assert (2, "RDB201") == (status, root(report))


def test_wrong_port(capsys: pytest.CaptureFixture[str], server_url: str) -> None:
    """A port with no listener is RDB202, exit 2."""
    status, _, report = check(capsys, with_password(server_url, port=free_port()))
    assert (2, "RDB202") == (status, root(report))


def test_blackholed_port(capsys: pytest.CaptureFixture[str], server_url: str) -> None:
    """A proxy that accepts but never answers is RDB205, within the deadline."""
    upstream = sa.make_url(server_url)
    with FaultProxy("127.0.0.1", upstream.port or 0) as proxy:
        proxy.blackhole()
        url = with_password(server_url, host=proxy.host, port=proxy.port)
        t = time.monotonic()
        status, out, report = check(capsys, url, "--deadline", "2.5")
        elapsed = time.monotonic() - t
    assert (2, "RDB205") == (status, root(report))
    assert elapsed < 2.5 + 1.5  # bounded (not a speed claim): slack for a loaded 2-core box
    assert "greeting" in out


def test_blackholed_host(capsys: pytest.CaptureFixture[str], pg_url: str, silent_port: int) -> None:
    """A host that drops SYNs is RDB203 (the TCP layer), within the deadline."""
    t = time.monotonic()
    status, _, report = check(capsys, with_password(pg_url, port=silent_port), "--deadline", "2")
    elapsed = time.monotonic() - t
    assert (2, "RDB203") == (status, root(report))
    assert elapsed < 2 + 1.5  # bounded (not a speed claim): slack for a loaded 2-core box


def test_tls_required_but_not_offered(capsys: pytest.CaptureFixture[str], server_url: str) -> None:
    """The client requires TLS and the server has none: RDB204."""
    query = "sslmode=require" if server_url.startswith("postgresql") else "ssl_check_hostname=false"
    status, _, report = check(capsys, f"{with_password(server_url)}?{query}")
    assert (2, "RDB204") == (status, root(report))


# --------------------------------------------------------------------------- login layer


@pytest.mark.postgres
def test_wrong_password_pg(capsys: pytest.CaptureFixture[str], throwaway_pg: PgServer) -> None:
    """A wrong password on PostgreSQL is RDB301 and the password is never printed."""
    status, out, report = check(capsys, throwaway_pg.url(APP_USER, SENTINEL, "app"))
    assert (2, "RDB301") == (status, root(report))
    assert f"{APP_USER}:***@" in out


@pytest.mark.mariadb
def test_wrong_password_mariadb(
    capsys: pytest.CaptureFixture[str], throwaway_mariadb: MariaServer
) -> None:
    """A wrong password on MariaDB is RDB301 (human output)."""
    status, out, _ = check(
        capsys, throwaway_mariadb.url(APP_USER, SENTINEL, "test"), json_out=False
    )
    assert 2 == status
    assert "ROOT CAUSE RDB301" in out


@pytest.mark.postgres
def test_unknown_user_pg(capsys: pytest.CaptureFixture[str], throwaway_pg: PgServer) -> None:
    """An unknown user on PostgreSQL looks like a wrong password: RDB301 says both."""
    status, out, report = check(capsys, throwaway_pg.url("nobody", SENTINEL, "app"))
    assert (2, "RDB301") == (status, root(report))
    assert "does not exist" in out


@pytest.mark.mariadb
def test_unknown_user_mariadb(
    capsys: pytest.CaptureFixture[str], throwaway_mariadb: MariaServer
) -> None:
    """An unknown user on MariaDB is rejected at login (RDB301)."""
    status, _, report = check(capsys, throwaway_mariadb.url("nobody", SENTINEL, "test"))
    assert (2, "RDB301") == (status, root(report))


@pytest.mark.postgres
def test_unknown_database_pg(capsys: pytest.CaptureFixture[str], throwaway_pg: PgServer) -> None:
    """An unknown database on PostgreSQL is RDB303."""
    status, _, report = check(capsys, throwaway_pg.url(APP_USER, APP_PASSWORD, "no_such_db"))
    assert (2, "RDB303") == (status, root(report))


@pytest.mark.mariadb
def test_unknown_database_mariadb(
    capsys: pytest.CaptureFixture[str], throwaway_mariadb: MariaServer
) -> None:
    """An unknown database for a limited MariaDB user (1044) is RDB303."""
    status, _, report = check(capsys, throwaway_mariadb.url(APP_USER, APP_PASSWORD, "no_such_db"))
    assert (2, "RDB303") == (status, root(report))


# --------------------------------------------------------------------------- server layer


def test_pool_larger_than_server_allows(
    capsys: pytest.CaptureFixture[str], sentinel_url: str
) -> None:
    """--instances large enough to exceed max_connections is RDB402 (password never shown)."""
    status, _, report = check(capsys, sentinel_url, "--instances", "60")
    assert (2, "RDB402") == (status, root(report))


@pytest.mark.postgres
def test_too_many_connections_pg(
    capsys: pytest.CaptureFixture[str], throwaway_pg: PgServer, pg_sentinel: tuple[str, str]
) -> None:
    """A role with no connection slot left is refused at connect: RDB401."""
    role, url = pg_sentinel
    throwaway_pg.psql(f"ALTER ROLE {role} CONNECTION LIMIT 0;")
    status, _, report = check(capsys, url)
    assert (2, "RDB401") == (status, root(report))


@pytest.mark.mariadb
def test_too_many_connections_mariadb(
    capsys: pytest.CaptureFixture[str],
    throwaway_mariadb: MariaServer,
    mariadb_sentinel: tuple[str, str],
) -> None:
    """A MariaDB user at its MAX_USER_CONNECTIONS is refused (1226): RDB401."""
    account, url = mariadb_sentinel
    throwaway_mariadb.sql(f"GRANT USAGE ON *.* TO {account} WITH MAX_USER_CONNECTIONS 1;")
    holder = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with holder.connect():
            status, _, report = check(capsys, url)
    finally:
        holder.dispose()
    assert (2, "RDB401") == (status, root(report))


@pytest.mark.postgres
def test_read_only_server_for_read_write_policy(
    capsys: pytest.CaptureFixture[str], throwaway_pg: PgServer, pg_sentinel: tuple[str, str]
) -> None:
    """A read-only PostgreSQL role session for a read-write policy is RDB305; read-only is ok."""
    role, url = pg_sentinel
    throwaway_pg.psql(f"ALTER ROLE {role} SET default_transaction_read_only = on;")
    status, _, report = check(capsys, url)
    ro_status, _, ro_report = check(capsys, url, "--access", "read-only")
    assert (2, "RDB305") == (status, root(report))
    assert (0, None) == (ro_status, root(ro_report))


@pytest.mark.mariadb
def test_read_only_mariadb(
    capsys: pytest.CaptureFixture[str],
    throwaway_mariadb: MariaServer,
    mariadb_sentinel: tuple[str, str],
) -> None:
    """MariaDB with read_only=ON for a read-write policy is RDB305."""
    throwaway_mariadb.set_global(read_only=1)
    try:
        status, _, report = check(capsys, mariadb_sentinel[1])
    finally:
        throwaway_mariadb.set_global(read_only=0)
    assert (2, "RDB305") == (status, root(report))


# --------------------------------------------------------------------------- policy layer


def test_pool_recycle_longer_than_wait_timeout_json_policy(
    capsys: pytest.CaptureFixture[str], mariadb_sentinel: tuple[str, str], tmp_path: Path
) -> None:
    """A JSON policy with pool.recycle above MariaDB's wait_timeout is RDB504."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"pool": {"recycle": 100000}}))
    status, _, report = check(capsys, mariadb_sentinel[1], "--policy", str(policy))
    assert (2, "RDB504") == (status, root(report))
    assert isinstance(report, dict)
    assert "pool.recycle" == report["root_cause"]["field"]


def test_pool_recycle_from_toml_policy_and_env(
    capsys: pytest.CaptureFixture[str],
    mariadb_sentinel: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same fault from a TOML policy, and from RESILIENT_DB_POOL_RECYCLE without one."""
    url = mariadb_sentinel[1]
    policy = tmp_path / "policy.toml"
    policy.write_text("[resilient_db.pool]\nrecycle = 100000\n")
    toml_status, _, toml_report = check(capsys, url, "--policy", str(policy))
    monkeypatch.setenv("RESILIENT_DB_POOL_RECYCLE", "100000")
    env_status, _, env_report = check(capsys, url)
    assert (2, "RDB504", 2, "RDB504") == (
        toml_status,
        root(toml_report),
        env_status,
        root(env_report),
    )


# --------------------------------------------------------------------------- correct setups


def test_correct_configuration_exits_zero(
    capsys: pytest.CaptureFixture[str], any_url: str, env_url: None
) -> None:
    """A correct configuration on each database is ok with exit 0, even with --strict."""
    if any_url.startswith("sqlite"):
        sqlite3.connect(any_url.removeprefix("sqlite:///")).close()
    status, _, report = check(capsys, any_url, "--strict")
    assert (0, True, None) == (status, report["ok"] if report else None, root(report))
    human_status, human, _ = check(capsys, any_url, json_out=False)
    assert 0 == human_status
    assert "\033[" not in human  # stdout is not a TTY: no colours
    assert "0 errors" in human


@pytest.mark.postgres
def test_password_on_command_line_is_a_warning(
    capsys: pytest.CaptureFixture[str], throwaway_pg: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL with a password on argv warns (RDB601): exit 1 with --strict; from $ENV it does not."""
    url = throwaway_pg.url(APP_USER, APP_PASSWORD, "app")
    argv_status, out, _ = check(capsys, url, "--strict", json_out=False)
    monkeypatch.setenv("MY_DB", url)
    env_status, _, _ = check(capsys, "--env", "MY_DB", "--strict")
    assert (1, 0) == (argv_status, env_status)
    assert "RDB601" in out
    assert APP_PASSWORD not in out


def test_json_schema(capsys: pytest.CaptureFixture[str], pg_url: str) -> None:
    """--json prints the documented schema version 1."""
    _, _, report = check(capsys, with_password(pg_url, port=free_port()))
    assert report is not None
    assert (1, False, "RDB202") == (report["schema_version"], report["ok"], root(report))
    assert [
        "schema_version",
        "ok",
        "url",
        "target",
        "access",
        "elapsed",
        "deadline",
        "root_cause",
        "summary",
        "findings",
    ] == list(report)
    finding = report["findings"][0]
    assert [
        "code",
        "severity",
        "status",
        "layer",
        "title",
        "message",
        "fix",
        "field",
        "skipped",
        "details",
    ] == list(finding)
    assert {"user", "host", "port", "database", "dialect", "driver"} == set(report["target"])
    statuses = {f["status"] for f in report["findings"]}
    assert {"ok", "error", "skipped"} <= statuses


# --------------------------------------------------------------------------- arguments


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    """--help works for the tool and for every subcommand, exit 0."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    commands = list(sub.choices or ())
    assert "check" in commands
    for argv in (["--help"], *([c, "--help"] for c in commands)):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert 0 == info.value.code
        assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["--deadline", "0"],
        ["--deadline", "soon"],
        ["--instances", "0"],
        ["--access", "write-only"],
        ["sqlite://", "--policy", "/nonexistent/policy.json"],
        ["postgresql://u:" + SENTINEL + "@h/db", "unexpected-extra"],
    ],
)
def test_bad_arguments_are_one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """Bad arguments exit 2 with one line on stderr, no traceback, no password."""
    status, out, _ = check(capsys, *argv, json_out=False)
    assert 2 == status
    lines = out.strip().splitlines()
    assert 1 == len(lines)
    assert "error:" in lines[0]
    assert "Traceback" not in out


def test_bad_policy_file_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """An unknown key in the policy file is a one-line error naming it."""
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"pool": {"sise": 3}}))
    status, out, _ = check(capsys, "sqlite://", "--policy", str(policy), json_out=False)
    assert (2, 1) == (status, len(out.strip().splitlines()))
    assert "pool.sise" in out


def test_missing_url(capsys: pytest.CaptureFixture[str], env_url: None) -> None:
    """No URL and no $DATABASE_URL: a one-line error, exit 2."""
    status, out, _ = check(capsys, json_out=False)
    assert (2, "resilient-db check: error: no database URL: pass one or set $DATABASE_URL") == (
        status,
        out.strip(),
    )


@pytest.mark.postgres
def test_console_script_wrong_password(throwaway_pg: PgServer) -> None:
    """The installed `resilient-db check` reads $DATABASE_URL, exits 2 and names RDB301."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESILIENT_DB_")}
    env["DATABASE_URL"] = throwaway_pg.url(APP_USER, SENTINEL, "app")
    env["NO_COLOR"] = "1"
    proc = subprocess.run(
        [str(BIN), "check"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert 2 == proc.returncode
    assert "ROOT CAUSE RDB301" in proc.stdout
    assert SENTINEL not in proc.stdout + proc.stderr


def test_python_dash_m_check_json(sqlite_url: str) -> None:
    """`python -m resilient_db check --json` works and prints the JSON report."""
    sqlite3.connect(sqlite_url.removeprefix("sqlite:///")).close()
    proc = subprocess.run(
        [sys.executable, "-m", "resilient_db", "check", sqlite_url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (0, True) == (proc.returncode, json.loads(proc.stdout)["ok"])


def test_quiet_prints_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """--quiet prints one line like pg_isready, with the same exit status."""
    url = f"postgresql+psycopg://app@127.0.0.1:{free_port()}/shop"
    status, out, _ = check(capsys, url, "--quiet", json_out=False)
    assert (2, 1) == (status, len(out.splitlines()))
    assert out.startswith(f"{url} - error RDB202 (TCP connect): Nothing is accepting connections")


def test_bad_port_says_it_is_not_a_number(capsys: pytest.CaptureFixture[str]) -> None:
    """A port that is not a number is named as such (RDB101), not as a generic syntax error."""
    status, _, report = check(capsys, "postgresql+psycopg://app@db.internal:54x2/shop")
    assert (2, "RDB101") == (status, root(report))
    assert report is not None
    assert (
        "The database URL has the port '54x2', which is not a number."
        == (report["root_cause"]["message"])
    )


def test_table_fits_the_width_without_breaking_words(pg_url: str) -> None:
    """Each table line fits the terminal (unless one word is longer) and CHECK cells are whole
    words of the check's title, so the terminal never wraps a line inside a word."""
    report = resilient_db.validate(pg_url, deadline=5)
    titles = {w for f in report.findings for w in f.title.split()}
    for width in (60, 80, 100):
        text = report.render(width=width)
        head = next(line for line in text.splitlines() if line.startswith("CODE "))
        rows = text.split(head)[1].splitlines()[1:]
        start, end = head.index("CHECK"), head.index("RESULT")
        cells = {w for row in rows for w in row[start:end].split()}
        too_long = [r for r in rows if len(r) > width and len(r[end:].split()) > 1]
        assert (set(), []) == (cells - titles, too_long), width
