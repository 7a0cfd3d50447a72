"""The first hour and the hostile hour: query-string secrets, input refused early, defaults."""

from __future__ import annotations

import json
import logging
import math
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

import resilient_db
from resilient_db import (
    BreakerPolicy,
    ConfigurationError,
    Policy,
    PoolPolicy,
    RetryPolicy,
    Timeouts,
)
from resilient_db.cli import main
from resilient_db.testing import FaultProxy
from tests.conftest import SENTINEL
from tests.servers import APP_PASSWORD, APP_USER, PgServer, free_port


def query_password_url(server: PgServer, password: str, **extra: str) -> str:
    """The throw-away PostgreSQL's app URL with the password in the query string (libpq style)."""
    query = "&".join(f"{k}={v}" for k, v in {"password": password, **extra}.items())
    return f"postgresql+psycopg://{APP_USER}@{server.host}:{server.port}/app?{query}"


# --------------------------------------------------------------------------- secrets


@pytest.mark.postgres
def test_query_password_is_masked_in_the_strict_error(throwaway_pg: PgServer) -> None:
    """A wrong ?password= never shows in the strict error's str, repr or traceback."""
    url = query_password_url(throwaway_pg, SENTINEL)
    with pytest.raises(ConfigurationError) as info:
        resilient_db.create_engine(url, validate="strict")
    err = info.value
    shown = str(err) + repr(err) + "".join(traceback.format_exception(err))
    assert ("RDB301", False) == (err.report.root_cause.code, SENTINEL in shown)
    assert "?password=***" in str(err)


@pytest.mark.postgres
def test_query_password_still_logs_in(throwaway_pg: PgServer) -> None:
    """Masking the engine's URL keeps the query-string password the driver logs in with."""
    engine = resilient_db.create_engine(query_password_url(throwaway_pg, APP_PASSWORD))
    with engine.connect() as conn:
        assert 1 == conn.exec_driver_sql("SELECT 1").scalar()
    assert APP_PASSWORD not in repr(engine)
    engine.dispose()


def test_engine_repr_hides_secret_query_values() -> None:
    """password, sslpassword and token-like query values are *** in the engine's repr."""
    url = (
        f"postgresql+psycopg://app@db.internal/shop?password={SENTINEL}"
        f"&sslpassword={SENTINEL}&api_token={SENTINEL}&sslmode=require"
    )
    engine = resilient_db.create_engine(url, validate="off")
    expected = (
        "Engine(postgresql+psycopg://app@db.internal/shop?api_token=***&password=***"
        "&sslmode=require&sslpassword=***)"
    )
    assert (expected, False) == (repr(engine), SENTINEL in str(engine.url))
    assert SENTINEL == engine.url.query["password"]  # the value itself is kept for the driver


@pytest.mark.postgres
def test_check_json_masks_query_password(
    throwaway_pg: PgServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`resilient-db check URL --json` shows ?password=*** and the secret nowhere."""
    url = query_password_url(throwaway_pg, SENTINEL, sslpassword=SENTINEL + "x")
    status = main(["check", url, "--json"])
    out, err = capsys.readouterr()
    report = json.loads(out)
    masked = (
        f"postgresql+psycopg://app@127.0.0.1:{throwaway_pg.port}/app?password=***&sslpassword=***"
    )
    assert (2, masked, False) == (status, report["url"], SENTINEL in out + err)


@pytest.mark.postgres
def test_query_password_on_the_command_line_is_warned_of(
    throwaway_pg: PgServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ?password= given on the command line shows in `ps` too: RDB601 warns of it."""
    main(["check", query_password_url(throwaway_pg, APP_PASSWORD), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert (
        "warning"
        == report["findings"][[f["code"] for f in report["findings"]].index("RDB601")]["severity"]
    )


# --------------------------------------------------------------------------- input refused early


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: Timeouts(statement=1e30), "Timeouts.statement"),
        (lambda: Timeouts(call=1e308), "Timeouts.call"),
        (lambda: PoolPolicy(size=10**30), "PoolPolicy.size"),
        (lambda: RetryPolicy(attempts=10**30), "RetryPolicy.attempts"),
        (
            lambda: BreakerPolicy(failure_rate=0.5, window=5, minimum_calls=50),
            "BreakerPolicy.minimum_calls",
        ),
    ],
)
def test_out_of_range_policy_values_are_refused(build: Callable[[], Any], field: str) -> None:
    """Absurdly large values, and minimum_calls above the window, name their field."""
    with pytest.raises(ConfigurationError) as info:
        build()
    assert field == info.value.field


@pytest.mark.parametrize("blank", ["", "   "])
def test_blank_env_variable_does_not_turn_a_limit_off(blank: str) -> None:
    """RESILIENT_DB_TIMEOUTS_CALL= (blank) is an error naming the variable; only none disables."""
    with pytest.raises(ConfigurationError) as info:
        Policy.from_env({"RESILIENT_DB_TIMEOUTS_CALL": blank})
    off = Policy.from_env({"RESILIENT_DB_TIMEOUTS_CALL": "none"})
    assert ("RESILIENT_DB_TIMEOUTS_CALL", None) == (info.value.field, off.timeouts.call)


def test_env_error_names_the_variable_for_a_cross_field_rule() -> None:
    """A minimum_calls above the window, set in the environment, names the variable."""
    env = {
        "RESILIENT_DB_BREAKER_FAILURE_RATE": "0.5",
        "RESILIENT_DB_BREAKER_WINDOW": "5",
        "RESILIENT_DB_BREAKER_MINIMUM_CALLS": "50",
    }
    with pytest.raises(ConfigurationError) as info:
        Policy.from_env(env)
    assert "RESILIENT_DB_BREAKER_MINIMUM_CALLS" == info.value.field


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: resilient_db.health(None), "engine"),  # type: ignore[arg-type]
        (lambda: resilient_db.error_context("x"), "exc"),  # type: ignore[arg-type]
        (lambda: Policy.from_env(["RESILIENT_DB_POOL_SIZE=3"]), "environ"),  # type: ignore[arg-type]
        (lambda: resilient_db.create_engine("sqlite://", clock="x"), "clock"),  # type: ignore[arg-type]
        (
            lambda: resilient_db.create_async_engine("postgresql+psycopg2://u@h/db"),
            "url",
        ),
        (lambda: resilient_db.create_engine("sqlite://", pool_size=0), "pool_size"),
    ],
)
def test_wrong_types_at_the_surface_name_the_argument(call: Callable[[], Any], field: str) -> None:
    """A wrong argument fails at once with a ConfigurationError naming it."""
    with pytest.raises(ConfigurationError) as info:
        call()
    assert field == info.value.field


@pytest.mark.parametrize("seconds", [math.nan, math.inf, -1.0])
def test_fault_proxy_latency_refuses_non_finite(seconds: float) -> None:
    """FaultProxy.latency(nan) raises ConfigurationError naming 'seconds'."""
    with FaultProxy("127.0.0.1", free_port()) as proxy, pytest.raises(ConfigurationError) as info:
        proxy.latency(seconds)
    assert "seconds" == info.value.field


def test_pool_kwargs_are_folded_into_the_policy(tmp_path: Any) -> None:
    """create_engine(url, pool_size=20, ...) runs and reports the same pool."""
    engine = resilient_db.create_engine(
        f"sqlite:///{tmp_path / 'x.db'}",
        validate="off",
        pool_size=20,
        max_overflow=2,
        pool_timeout=3,
        pool_recycle=-1,
    )
    p = resilient_db.policy_of(engine)
    assert (20, 2, 3, None) == (
        p.pool.size,
        p.pool.max_overflow,
        p.timeouts.checkout,
        p.pool.recycle,
    )
    assert (20, 3) == (engine.pool.size(), engine.pool.timeout())  # type: ignore[attr-defined]
    engine.dispose()


# --------------------------------------------------------------------------- the first hour


def test_missing_driver_is_an_explained_configuration_error() -> None:
    """A driver that is not installed is a ConfigurationError naming the package to install."""
    with pytest.raises(ConfigurationError) as info:
        resilient_db.create_engine("postgresql+pg8000://app@db.internal/shop")
    assert ("url", "pip install 'pg8000'.") == (info.value.field, info.value.fix)


def test_postgres_scheme_is_refused_with_the_fix() -> None:
    """A Heroku-style postgres:// URL is a ConfigurationError that says postgresql://."""
    with pytest.raises(ConfigurationError) as info:
        resilient_db.create_engine("postgres://app@db.internal/shop")
    assert "Use 'postgresql+psycopg://...'" in info.value.fix


def test_check_postgres_scheme_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DATABASE_URL=postgres://... resilient-db check exits 2 naming postgresql://."""
    monkeypatch.setenv("DATABASE_URL", "postgres://app@db.internal/shop")
    status = main(["check", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert (2, "RDB102") == (status, report["root_cause"]["code"])
    assert "postgresql+psycopg://" in report["root_cause"]["fix"]


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("password", "database", "code"),
    [(SENTINEL, "app", "RDB301"), (APP_PASSWORD, "no_such_db", "RDB303")],
)
def test_default_refuses_to_start_on_a_wrong_setting(
    throwaway_pg: PgServer, password: str, database: str, code: str
) -> None:
    """By default a wrong password or unknown database raises at create_engine."""
    url = throwaway_pg.url(APP_USER, password, database)
    with pytest.raises(ConfigurationError) as info:
        resilient_db.create_engine(url)
    assert (code, False) == (info.value.report.root_cause.code, SENTINEL in str(info.value))


def test_default_refuses_an_unknown_host() -> None:
    """By default a host name that does not resolve raises (RDB201)."""
    with pytest.raises(ConfigurationError) as info:
        resilient_db.create_engine("postgresql+psycopg://app@no-such-host.invalid/shop")
    assert "RDB201" == info.value.report.root_cause.code


def test_default_starts_when_the_database_is_down(caplog: pytest.LogCaptureFixture) -> None:
    """By default an unreachable database logs one short WARNING and the engine is returned."""
    caplog.set_level(logging.WARNING, logger="resilient_db")
    engine = resilient_db.create_engine(f"postgresql+psycopg://app@127.0.0.1:{free_port()}/shop")
    records = [r for r in caplog.records if r.name == "resilient_db"]
    assert (1, "RDB202") == (
        len(records),
        records[0].resilient_db_report["root_cause"]["code"],  # type: ignore[attr-defined]
    )
    assert len(records[0].getMessage().splitlines()) <= 5
    assert isinstance(engine, sa.Engine)
    engine.dispose()


def test_warn_mode_still_only_warns_on_a_wrong_setting(caplog: pytest.LogCaptureFixture) -> None:
    """validate='warn' keeps the old behaviour: an unknown host is logged, not raised."""
    caplog.set_level(logging.WARNING, logger="resilient_db")
    engine = resilient_db.create_engine(
        "postgresql+psycopg://app@no-such-host.invalid/shop", validate="warn"
    )
    codes = [r.resilient_db_report["root_cause"]["code"] for r in caplog.records]  # type: ignore[attr-defined]
    assert ["RDB201"] == codes
    engine.dispose()


@pytest.mark.postgres
def test_capacity_check_does_not_count_the_engines_own_connections(
    throwaway_pg: PgServer,
) -> None:
    """Connections the validated engine holds are demand, not 'in use by others'."""
    engine = resilient_db.create_engine(throwaway_pg.url(), validate="off")

    def in_use() -> Any:
        finding = resilient_db.validate(engine, deadline=5).get("RDB402")
        assert finding is not None
        return dict(finding.details)["in_use"]

    idle = in_use()
    held = [engine.connect() for _ in range(3)]
    busy = in_use()
    for conn in held:
        conn.close()
    engine.dispose()
    assert idle == busy
