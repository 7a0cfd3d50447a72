"""Tests for resilient_db.validation: validate(), Report/Finding and startup checks."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import resilient_db
from resilient_db import (
    ConfigurationError,
    Finding,
    Policy,
    PoolPolicy,
    Report,
    RetryPolicy,
    Timeouts,
    validate,
)
from resilient_db.testing import FaultProxy
from resilient_db.validation import CHECKS, SCHEMA_VERSION
from resilient_db.validation.context import _Facts
from resilient_db.validation.server import _db_matches, _parse_grants
from tests.conftest import SENTINEL
from tests.servers import APP_PASSWORD, APP_USER, MariaServer, PgServer, free_port

DOCS = Path(__file__).resolve().parents[1] / "docs" / "checks.md"


def pg_app_url(server: PgServer, password: str = APP_PASSWORD, database: str = "app") -> str:
    """The throw-away PostgreSQL's password-protected application URL."""
    return server.url(APP_USER, password, database)


def maria_app_url(server: MariaServer, password: str = APP_PASSWORD, database: str = "test") -> str:
    """The throw-away MariaDB's password-protected application URL."""
    return server.url(APP_USER, password, database)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port whose accept queue is full, so new SYNs are dropped (a blackhole)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # the handshake completes in the kernel
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    yield port
    for c in fillers:
        c.close()
    listener.close()


def assert_clean(report: Report) -> None:
    """The sentinel password appears nowhere in the report."""
    assert SENTINEL not in json.dumps(report.to_dict())
    assert SENTINEL not in report.render()


# --------------------------------------------------------------------------- correct setups


def test_correct_configuration_is_ok(any_url: str) -> None:
    """A correct URL on each database gives an ok report without errors or warnings."""
    if any_url.startswith("sqlite"):
        sqlite3.connect(any_url.removeprefix("sqlite:///")).close()
    report = validate(any_url, deadline=10)
    assert (True, None, ()) == (report.ok, report.root_cause, report.warnings)
    assert "RDB101" in report.codes()


def test_validate_an_engine_uses_its_connect_args(pg_url: str) -> None:
    """validate(engine) connects with the engine's own connect_args (here: TLS required)."""
    engine = sa.create_engine(pg_url, connect_args={"sslmode": "require"})
    report = validate(engine, deadline=5)
    assert "RDB204" == report.root_cause.code if report.root_cause else None
    engine.dispose()


def test_validate_an_engine_reports_hide_parameters_off(pg_url: str) -> None:
    """An engine that shows bind parameters in errors gets warning RDB604."""
    engine = sa.create_engine(pg_url, hide_parameters=False)
    report = validate(engine, deadline=5)
    finding = report.get("RDB604")
    assert ("warning", "hide_parameters") == (
        finding.severity if finding else None,
        finding.field if finding else None,
    )


def test_async_engine_is_validated_with_its_driver(pg_url: str) -> None:
    """An asyncpg URL is checked with asyncpg itself and passes."""
    url = pg_url.replace("+psycopg", "+asyncpg")
    report = validate(url, deadline=5)
    assert (True, "asyncpg") == (report.ok, report.target.driver)


# --------------------------------------------------------------------------- layers


def test_invalid_url_is_rdb101_and_not_echoed() -> None:
    """An unparsable URL is RDB101 and the raw text (with its password) is never shown."""
    report = validate(f"postgresql://u:{SENTINEL}@h:notaport/db")
    assert ("RDB101", "<invalid URL>") == (report.root_cause.code, report.url)  # type: ignore[union-attr]
    assert_clean(report)


def test_unknown_dialect_is_rdb102() -> None:
    """A driver name SQLAlchemy does not know is RDB102; no network check runs."""
    report = validate("postgresql+nosuchdriver://u@127.0.0.1/db")
    assert ("RDB102", ()) == (
        report.root_cause.code,  # type: ignore[union-attr]
        tuple(c for c in report.codes() if c.startswith("RDB2")),
    )


def test_dns_failure_skips_the_server_checks(pg_url: str) -> None:
    """A name that does not resolve is the root cause; server checks say they were skipped."""
    url = sa.make_url(pg_url).set(host="db.does-not-exist.invalid", password=SENTINEL)
    report = validate(url, deadline=5)
    skipped = {f.code: f.message for f in report.findings if f.skipped}
    assert "RDB201" == report.root_cause.code  # type: ignore[union-attr]
    assert "skipped because RDB201 failed" == skipped["RDB305"]
    assert {"RDB202", "RDB301", "RDB402"} <= set(skipped)
    assert_clean(report)


def test_blackholed_host_is_bounded_by_the_deadline(pg_url: str, silent_port: int) -> None:
    """A host that drops SYNs is RDB203 (TCP layer), reported within the deadline."""
    url = sa.make_url(pg_url).set(port=silent_port)
    t = time.monotonic()
    report = validate(url, deadline=2.5)
    elapsed = time.monotonic() - t
    assert "RDB203" == report.root_cause.code  # type: ignore[union-attr]
    assert elapsed < 2.5 + 1.5  # bounded (not a speed claim): slack for a loaded 2-core box


def test_hung_driver_is_abandoned_at_the_deadline() -> None:
    """A driver that ignores every timeout is abandoned: RDB209 names the step that hung."""
    release = threading.Event()

    def hang() -> None:
        release.wait(10)
        raise OSError("released")

    engine = sa.create_engine("postgresql+psycopg://", creator=hang)
    try:
        t = time.monotonic()
        report = validate(engine, deadline=1.0)
        elapsed = time.monotonic() - t
    finally:
        release.set()
    assert "RDB209" == report.root_cause.code  # type: ignore[union-attr]
    assert "connecting" in report.root_cause.message  # type: ignore[union-attr]
    assert elapsed < 1.0 + 1.5  # bounded: the driver would hang 10 s


def test_policy_timeouts_are_checked() -> None:
    """Disabled or inverted timeouts give warnings RDB501/502/507/508 naming the field."""
    policy = Policy(
        timeouts=Timeouts(connect=None, statement=40.0, call=35.0),
        retry=RetryPolicy(deadline=3.0),
    )
    report = validate(f"postgresql+psycopg://u@127.0.0.1:{free_port()}/db", policy=policy)
    warned = {f.code: f.field for f in report.warnings}
    assert {
        "RDB501": "timeouts.connect",
        "RDB508": "timeouts.call",
    } == {k: v for k, v in warned.items() if k in ("RDB501", "RDB508")}
    no_stmt = validate("sqlite://", policy=Policy(timeouts=Timeouts(connect=20.0, statement=None)))
    assert {"RDB502", "RDB507"} <= {f.code for f in no_stmt.warnings}


def test_pymysql_call_deadline_is_the_watchdog_on_resilient_engines(mariadb_url: str) -> None:
    """RDB501/503 on PyMySQL: a plain engine needs read_timeout; resilient_db's does not."""
    plain = sa.create_engine(mariadb_url)
    resilient = resilient_db.create_engine(mariadb_url, validate="off")
    try:
        reports = [validate(plain, deadline=5), validate(resilient, deadline=5)]
    finally:
        plain.dispose()
        resilient.dispose()
    warned = [{f.code for f in r.warnings} & {"RDB501", "RDB503"} for r in reports]
    assert [{"RDB501", "RDB503"}, set()] == warned


def test_pool_larger_than_server_allows(server_url: str) -> None:
    """Pools x instances above max_connections is error RDB402 on the pool.size field."""
    report = validate(server_url, policy=Policy(instances=60), deadline=5)
    root = report.root_cause
    assert ("RDB402", "pool.size") == (root.code, root.field)  # type: ignore[union-attr]
    assert dict(root.details)["demand"] == 600  # type: ignore[union-attr]


def test_unbounded_engine_pool_is_a_warning(pg_url: str) -> None:
    """An engine whose QueuePool may overflow without limit gets warning RDB402."""
    engine = sa.create_engine(pg_url, max_overflow=-1)
    finding = validate(engine, deadline=5).get("RDB402")
    assert "warning" == (finding.severity if finding else None)


# --------------------------------------------------------------------------- PostgreSQL roles


@pytest.mark.postgres
def test_pg_read_only_database_for_read_write_policy(throwaway_pg: PgServer) -> None:
    """A database with default_transaction_read_only=on is RDB305 for a read-write policy."""
    db = f"ro_{uuid.uuid4().hex[:8]}"
    throwaway_pg.psql(
        f"CREATE DATABASE {db} OWNER {APP_USER};\n"
        f"ALTER DATABASE {db} SET default_transaction_read_only = on;"
    )
    try:
        rw = validate(pg_app_url(throwaway_pg, database=db), deadline=5)
        ro = validate(
            pg_app_url(throwaway_pg, database=db), policy=Policy(access="read-only"), deadline=5
        )
    finally:
        throwaway_pg.psql(f"DROP DATABASE {db};")
    assert ("RDB305", "read-write") == (rw.root_cause.code, rw.access)  # type: ignore[union-attr]
    assert "default_transaction_read_only" in rw.root_cause.message  # type: ignore[union-attr]
    assert (True, "read-only") == (ro.ok, ro.access)


@pytest.mark.postgres
def test_pg_idle_session_timeout_below_pool_recycle(throwaway_pg: PgServer) -> None:
    """idle_session_timeout shorter than pool_recycle is RDB505; idle-in-tx is reported."""
    throwaway_pg.psql(
        f"ALTER ROLE {APP_USER} SET idle_session_timeout = '10s';\n"
        f"ALTER ROLE {APP_USER} SET idle_in_transaction_session_timeout = '20s';"
    )
    try:
        report = validate(pg_app_url(throwaway_pg), deadline=5)
    finally:
        throwaway_pg.psql(
            f"ALTER ROLE {APP_USER} RESET idle_session_timeout;\n"
            f"ALTER ROLE {APP_USER} RESET idle_in_transaction_session_timeout;"
        )
    root = report.root_cause
    info = report.get("RDB506")
    assert ("RDB505", "pool.recycle") == (root.code, root.field)  # type: ignore[union-attr]
    assert 20.0 == dict(info.details)["idle_in_transaction_session_timeout"]  # type: ignore[union-attr]


@pytest.mark.postgres
def test_pg_user_without_write_privilege(throwaway_pg: PgServer) -> None:
    """A role that can neither INSERT nor CREATE anywhere gets warning RDB306."""
    role = f"reader_{uuid.uuid4().hex[:8]}"
    throwaway_pg.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{APP_PASSWORD}';")
    try:
        report = validate(throwaway_pg.url(role, APP_PASSWORD, "postgres"), deadline=5)
    finally:
        throwaway_pg.psql(f"DROP ROLE {role};")
    finding = report.get("RDB306")
    assert "warning" == (finding.severity if finding else None)


@pytest.mark.postgres
def test_pg_role_connection_limit_below_pool(throwaway_pg: PgServer) -> None:
    """A role CONNECTION LIMIT lower than the pools is RDB404."""
    throwaway_pg.psql(f"ALTER ROLE {APP_USER} CONNECTION LIMIT 3;")
    try:
        report = validate(pg_app_url(throwaway_pg), deadline=5)
    finally:
        throwaway_pg.psql(f"ALTER ROLE {APP_USER} CONNECTION LIMIT -1;")
    assert ("RDB404", 3) == (
        report.root_cause.code,  # type: ignore[union-attr]
        dict(report.root_cause.details)["limit"],  # type: ignore[union-attr]
    )


# --------------------------------------------------------------------------- MariaDB grants


def test_mariadb_grants_are_parsed() -> None:
    """SHOW GRANTS lines give write access, the per-user limit and read_only bypass."""
    facts = _Facts()
    _parse_grants(
        [
            "GRANT USAGE ON *.* TO `app`@`127.0.0.1` IDENTIFIED BY PASSWORD '*AB' "
            "WITH MAX_USER_CONNECTIONS 4",
            "GRANT SELECT, INSERT ON `te\\_st`.* TO `app`@`127.0.0.1`",
        ],
        "te_st",
        facts,
    )
    assert (True, 4, False) == (facts.can_write, facts.user_limit, facts.bypasses_read_only)
    admin = _Facts()
    _parse_grants(["GRANT ALL PRIVILEGES ON *.* TO `root`@`%` WITH GRANT OPTION"], "x", admin)
    assert (True, True) == (admin.can_write, admin.bypasses_read_only)


def test_mysql_database_patterns() -> None:
    """GRANT database patterns honour % and _ wildcards and backslash escapes."""
    assert (True, True, False, True) == (
        _db_matches("app%", "app_prod"),
        _db_matches("a_p", "app"),
        _db_matches("a\\_p", "app"),
        _db_matches("*", None),
    )


@pytest.mark.mariadb
def test_mariadb_read_only_and_pool_recycle(throwaway_mariadb: MariaServer) -> None:
    """read_only=ON is RDB305; pool_recycle >= wait_timeout is RDB504 on pool.recycle."""
    throwaway_mariadb.set_global(read_only=1, wait_timeout=20)
    try:
        report = validate(maria_app_url(throwaway_mariadb), deadline=5)
    finally:
        throwaway_mariadb.set_global(read_only=0, wait_timeout=28800)
    errors = {f.code: f.field for f in report.errors}
    assert {"RDB305": "url", "RDB504": "pool.recycle"} == errors
    assert "RDB305" == report.root_cause.code  # type: ignore[union-attr]


# --------------------------------------------------------------------------- SQLite


def test_sqlite_missing_directory(tmp_path: Path) -> None:
    """A SQLite file in a directory that does not exist is RDB307."""
    report = validate(f"sqlite:///{tmp_path / 'nope' / 'app.db'}")
    assert "RDB307" == report.root_cause.code  # type: ignore[union-attr]


def test_sqlite_missing_file_is_a_warning_and_not_created(tmp_path: Path) -> None:
    """A missing SQLite file is warning RDB308 and validation does not create it."""
    path = tmp_path / "app.db"
    report = validate(f"sqlite:///{path}")
    assert (True, ("RDB308",), False) == (
        report.ok,
        tuple(f.code for f in report.warnings),
        path.exists(),
    )


def test_sqlite_not_a_database(tmp_path: Path) -> None:
    """A file that is not a SQLite database fails the connect check (RDB399)."""
    path = tmp_path / "app.db"
    path.write_bytes(b"this is not a database file, just text" * 50)
    report = validate(f"sqlite:///{path}")
    assert "RDB399" == report.root_cause.code  # type: ignore[union-attr]
    assert "not a database" in report.root_cause.message  # type: ignore[union-attr]


def test_sqlite_journal_mode_is_reported(tmp_path: Path) -> None:
    """The SQLite journal mode is reported as RDB605."""
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as c:
        c.execute("PRAGMA journal_mode=wal")
    finding = validate(f"sqlite:///{path}").get("RDB605")
    assert "journal_mode=wal" in (finding.message if finding else "")


# --------------------------------------------------------------------------- values


def test_report_to_dict_schema(pg_url: str) -> None:
    """to_dict() follows schema version 1 and is JSON-serialisable."""
    data = json.loads(json.dumps(validate(pg_url, deadline=5).to_dict()))
    assert SCHEMA_VERSION == data["schema_version"] == 1
    assert {
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
    } == set(data)
    assert {
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
    } == set(data["findings"][0])
    assert {"error", "warning", "info", "skipped"} == set(data["summary"])


def test_findings_are_frozen_and_codes_documented() -> None:
    """Finding is immutable, and docs/checks.md explains every check code."""
    f = Finding("RDB101", "info", "URL syntax", "ok")
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.code = "RDB102"  # type: ignore[misc]
    documented = set(re.findall(r"^### (RDB\d{3})", DOCS.read_text(), re.M))
    assert set(CHECKS) == documented


def test_render_colours_only_on_request() -> None:
    """render() is plain text unless color=True."""
    report = validate("sqlite://")
    assert ("\033[" in report.render(color=True), "\033[" in report.render()) == (True, False)


def test_bad_input_is_a_configuration_error() -> None:
    """Something that is neither a URL nor an engine raises ConfigurationError at once."""
    with pytest.raises(ConfigurationError) as info:
        validate(42)
    assert "url_or_engine" == info.value.field


def test_startup_validation_never_feeds_the_breaker(caplog: pytest.LogCaptureFixture) -> None:
    """A refused connection at startup is reported but not counted by the engine's breaker."""
    caplog.set_level(logging.WARNING, logger="resilient_db")
    engine = resilient_db.create_engine(f"postgresql+psycopg://u@127.0.0.1:{free_port()}/db")
    snapshot = resilient_db.breaker_state(engine)
    codes = [r.resilient_db_report["root_cause"]["code"] for r in caplog.records]  # type: ignore[attr-defined]
    assert (["RDB202"], 0, "closed") == (
        codes,
        snapshot.failures if snapshot else -1,
        snapshot.state if snapshot else None,
    )


def test_bad_deadline_is_a_configuration_error() -> None:
    """A non-positive deadline raises ConfigurationError naming 'deadline'."""
    with pytest.raises(ConfigurationError) as info:
        validate("sqlite://", deadline=0)
    assert "deadline" == info.value.field


# --------------------------------------------------------------------------- startup


@pytest.mark.postgres
def test_strict_startup_raises_for_wrong_password(throwaway_pg: PgServer) -> None:
    """validate='strict' raises ConfigurationError with the whole report, password masked."""
    with pytest.raises(ConfigurationError) as info:
        resilient_db.create_engine(pg_app_url(throwaway_pg, SENTINEL), validate="strict")
    err = info.value
    assert ("url", "RDB301") == (err.field, err.report.root_cause.code)
    assert str(err).startswith("url: [RDB301]")
    assert "ROOT CAUSE RDB301" in str(err)
    assert SENTINEL not in str(err)


@pytest.mark.postgres
def test_warn_startup_logs_one_record_and_returns_engine(
    throwaway_pg: PgServer, caplog: pytest.LogCaptureFixture
) -> None:
    """validate='warn' logs one WARNING with the report and still returns the engine."""
    caplog.set_level(logging.DEBUG, logger="resilient_db")
    engine = resilient_db.create_engine(pg_app_url(throwaway_pg, SENTINEL), validate="warn")
    records = [r for r in caplog.records if r.name == "resilient_db" and r.levelno >= logging.INFO]
    assert 1 == len(records)
    rec = records[0]
    assert (logging.WARNING, "RDB301") == (
        rec.levelno,
        rec.resilient_db_report["root_cause"]["code"],  # type: ignore[attr-defined]
    )
    assert SENTINEL not in rec.getMessage()
    assert isinstance(engine, sa.Engine)
    engine.dispose()


def test_warn_startup_engine_works(pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """An engine created despite a warned problem (pool too large) runs queries."""
    caplog.set_level(logging.WARNING, logger="resilient_db")
    engine = resilient_db.create_engine(pg_url, policy=Policy(instances=60))
    with engine.connect() as conn:
        assert 1 == conn.exec_driver_sql("SELECT 1").scalar()
    engine.dispose()
    codes = [r.resilient_db_report["root_cause"]["code"] for r in caplog.records]  # type: ignore[attr-defined]
    assert ["RDB402"] == codes


@pytest.mark.postgres
def test_strict_startup_on_blackholed_host_is_bounded(pg_url: str) -> None:
    """Strict startup against a silent proxy fails within the retry deadline, naming RDB205."""
    policy = Policy(timeouts=Timeouts(connect=2.0), retry=RetryPolicy(deadline=2.5))
    with FaultProxy("127.0.0.1", sa.make_url(pg_url).port or 5432) as proxy:
        proxy.blackhole()
        url = sa.make_url(pg_url).set(host=proxy.host, port=proxy.port)
        t = time.monotonic()
        with pytest.raises(ConfigurationError) as info:
            resilient_db.create_engine(url, policy=policy, validate="strict")
        elapsed = time.monotonic() - t
    assert "RDB205" == info.value.report.root_cause.code
    assert elapsed < 2.5 + 1.5  # bounded (not a speed claim): slack for a loaded 2-core box


def test_pool_policy_sizes_the_demand(pg_url: str) -> None:
    """The demand in RDB402 is (size + max_overflow) x instances from the policy."""
    policy = Policy(pool=PoolPolicy(size=3, max_overflow=1), instances=2)
    finding = validate(pg_url, policy=policy, deadline=5).get("RDB402")
    assert 8 == dict(finding.details)["demand"]  # type: ignore[union-attr]
