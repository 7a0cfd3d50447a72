"""``wrap()`` is as safe as ``create_engine()`` wherever a built engine can be changed.

Connect parameters (timeouts, statement timeout, keepalives, application_name) for
connections the caller configured none for; bind parameters hidden from messages
and the INFO echo; ``engine_options()`` for what only a new pool can take.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import resilient_db
from resilient_db import Policy, Timeouts
from resilient_db.engine import driver_defaults
from tests.conftest import SENTINEL

POLICY = Policy(timeouts=Timeouts(connect=3, statement=12), validate="off")


@pytest.fixture
def plain(pg_url: str) -> Iterator[sa.Engine]:
    """A plain SQLAlchemy engine, as another library would build it (echo on)."""
    engine = sa.create_engine(pg_url, echo=True)
    yield engine
    engine.dispose()


def libpq_parameters(engine: sa.Engine) -> dict[str, str]:
    """The connection parameters libpq was given for a new pooled connection."""
    with engine.connect() as conn:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        return dict(dbapi.info.get_parameters())  # type: ignore[attr-defined]


def test_wrap_gives_connections_the_driver_defaults(plain: sa.Engine) -> None:
    """A wrapped plain engine connects with the policy's timeouts and application_name."""
    resilient_db.wrap(plain, policy=POLICY)
    with plain.connect() as conn:
        assert ("12s", "resilient-db") == (
            conn.execute(sa.text("SHOW statement_timeout")).scalar(),
            conn.execute(sa.text("SHOW application_name")).scalar(),
        )
    params = libpq_parameters(plain)
    assert ("3", "1") == (params.get("connect_timeout"), params.get("keepalives"))


def test_wrap_keeps_what_the_caller_set(pg_url: str) -> None:
    """connect_args and libpq options of the wrapped engine win over the defaults."""
    engine = sa.create_engine(
        pg_url,
        connect_args={
            "connect_timeout": 7,
            "application_name": "billing",
            "options": "-c statement_timeout=120000",
        },
    )
    try:
        resilient_db.wrap(engine, policy=POLICY)
        with engine.connect() as conn:
            assert ("2min", "billing") == (
                conn.execute(sa.text("SHOW statement_timeout")).scalar(),
                conn.execute(sa.text("SHOW application_name")).scalar(),
            )
        assert "7" == libpq_parameters(engine).get("connect_timeout")
    finally:
        engine.dispose()


def test_wrap_hides_bind_parameters(plain: sa.Engine, caplog: pytest.LogCaptureFixture) -> None:
    """No bind value in the error's [parameters: ...] line nor in the INFO echo."""
    resilient_db.wrap(plain, policy=POLICY)
    caplog.set_level(logging.INFO, logger="sqlalchemy.engine")
    other = "another-bound-value-" + SENTINEL[::-1]
    with pytest.raises(sa.exc.DataError) as info, plain.connect() as conn:
        conn.execute(sa.text("SELECT CAST(:v AS integer), :w"), {"v": SENTINEL, "w": other})
    texts = f"{info.value}\n{info.value!r}\n{caplog.text}"
    assert (False, False) == (SENTINEL in texts, other in texts)
    assert "SQL parameters hidden" in str(info.value)


def test_wrap_can_show_bind_parameters_for_debugging(plain: sa.Engine) -> None:
    """wrap(hide_parameters=False) leaves SQLAlchemy's [parameters: ...] line on."""
    resilient_db.wrap(plain, policy=POLICY, hide_parameters=False)
    with pytest.raises(sa.exc.DataError) as info, plain.connect() as conn:
        conn.execute(sa.text("SELECT CAST(:v AS integer), :w"), {"v": "x", "w": "shown-value"})
    assert "shown-value" in str(info.value)


def test_engine_options_build_the_pool_create_engine_would(pg_url: str) -> None:
    """engine_options() gives a plain create_engine the policy's pool and connect_args."""
    policy = Policy(
        pool=resilient_db.PoolPolicy(size=3, max_overflow=1), timeouts=Timeouts(checkout=4)
    )
    options = resilient_db.engine_options(pg_url, policy)
    engine = resilient_db.wrap(sa.create_engine(pg_url, **options), policy=policy)
    try:
        assert (3, 4.0, True) == (
            engine.pool.size(),  # type: ignore[attr-defined]
            engine.pool.timeout(),  # type: ignore[attr-defined]
            engine.hide_parameters,
        )
        assert options["connect_args"] == driver_defaults(engine.url, policy)
    finally:
        engine.dispose()
