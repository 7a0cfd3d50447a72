"""Messages that DO carry the password are scrubbed: validation findings, the fleet store.

PostgreSQL, MariaDB and redis-py never echo a password, so these tests feed the
scrubbing code messages that do (raw, %-encoded, a proxy or driver message that
repeats the whole URL): the faults a real server cannot produce are mocked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, quote_plus

import psycopg
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import event

import resilient_db
from resilient_db.fleet import RedisBreakerStore, share_breaker
from resilient_db.validation import validate

#: a password whose %-encoded form differs from the raw one
PASSWORD = "S3ntinel/pa ss@w0rd:DO-NOT-LEAK"
ENCODED = quote(PASSWORD, safe="")
#: every form a message may carry: raw, %-encoded, as SQLAlchemy renders a URL, as a query
FORMS = (PASSWORD, ENCODED, quote(PASSWORD), quote(PASSWORD, safe=" +"), quote_plus(PASSWORD))


def _echoing_messages(url: sa.URL) -> list[str]:
    """What a chatty driver or proxy might say: the password raw, encoded and in the URL."""
    rendered = url.render_as_string(hide_password=False)
    return [
        f"password authentication failed: got {PASSWORD!r}",
        f"bad password {ENCODED}",
        f"proxy could not reach {rendered}",
    ]


@pytest.fixture
def pg_secret_url(pg_url: str) -> sa.URL:
    """The shared PostgreSQL's URL with PASSWORD as its password (trust auth ignores it)."""
    return sa.make_url(pg_url).set(password=PASSWORD)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["raw", "encoded", "url"])
def test_validation_findings_scrub_an_echoed_password(pg_secret_url: sa.URL, which: int) -> None:
    """A connect error that repeats the password leaves no trace of it in the report."""
    message = _echoing_messages(pg_secret_url)[which]
    engine = sa.create_engine(pg_secret_url)

    @event.listens_for(engine, "do_connect")
    def echo(*_: Any) -> None:
        raise psycopg.OperationalError(message)

    try:
        report = validate(engine, policy=resilient_db.Policy(validate="off"), deadline=5)
    finally:
        engine.dispose()
    text = json.dumps(report.to_dict()) + str(report) + repr(report)
    assert report.root_cause is not None  # the fault was reported
    assert any(form in message for form in FORMS)  # the message did carry it
    assert [] == [form for form in FORMS if form in text]


@pytest.fixture
def store_engine(sqlite_url: str) -> Iterator[sa.Engine]:
    """A resilient engine whose breaker the fleet store shares."""
    engine = resilient_db.create_engine(sqlite_url, validate="off")
    yield engine
    engine.dispose()


def _redis_url(redis_url: str) -> str:
    """The test Redis's URL with PASSWORD (%-encoded) as its password."""
    parts = sa.make_url(redis_url.replace("redis://", "postgresql://", 1))
    return f"redis://:{ENCODED}@{parts.host}:{parts.port or 6379}/0"


@pytest.mark.parametrize("form", ["raw", "encoded", "url"])
def test_fleet_store_scrubs_a_redis_error_repeating_the_password(
    store_engine: sa.Engine,
    redis_url: str,
    form: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Redis error that repeats the URL's password is scrubbed from status, error and logs."""
    url = _redis_url(redis_url)
    said = {"raw": PASSWORD, "encoded": ENCODED, "url": f"Error connecting to {url}"}[form]
    store = share_breaker(store_engine, url, name="scrub-test", start=False)
    try:

        def fail(*_: Any, **__: Any) -> None:
            raise redis.exceptions.ConnectionError(f"AUTH failed for {said}")

        store._scripts = dict.fromkeys(store._scripts, fail)
        caplog.set_level("WARNING", logger="resilient_db")
        assert store.sync() is False
        seen = json.dumps(store.status(), default=str) + str(store.error) + caplog.text
    finally:
        store.close()
    assert "AUTH failed" in seen  # the error was recorded
    assert [] == [f for f in (PASSWORD, ENCODED) if f in seen]


def test_fleet_store_scrubs_a_client_password(
    store_engine: sa.Engine, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A ready client's password is scrubbed from its errors too."""
    client = redis.Redis.from_url(_redis_url(redis_url))
    store = RedisBreakerStore(client, "scrub-client")
    store.attach(resilient_db.breaker_of(store_engine), start=False)
    try:

        def fail(*_: Any, **__: Any) -> None:
            raise redis.exceptions.ConnectionError(f"AUTH failed for {PASSWORD}")

        store._scripts = dict.fromkeys(store._scripts, fail)
        caplog.set_level("WARNING", logger="resilient_db")
        assert store.sync() is False
        seen = str(store.error) + caplog.text
    finally:
        store.close()
        client.close()
    assert "AUTH failed" in seen
    assert PASSWORD not in seen
