"""pytest plugin (registered through the ``pytest11`` entry point, so it loads by itself).

Fixtures:

- ``fault_proxy``: a started :class:`~resilient_db.testing.DatabaseProxy` in
  front of the server named by ``--rdb-url`` or ``RESILIENT_DB_TEST_URL``;
  connect through ``fault_proxy.url``. Skips the test when no server URL is
  configured.
- ``fault_injector``: a factory ``fault_injector(engine) ->``
  :class:`~resilient_db.testing.FaultInjector`; every injector is closed after
  the test.
- ``rdb_no_backoff``: turns backoff sleeps off for the test
  (:func:`resilient_db.set_testing`) and restores the previous setting.

The assertions (``assert_fails_fast``, ``assert_degraded_gracefully``,
``assert_recovers``) are plain functions in :mod:`resilient_db.testing`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

__all__ = ["fault_injector", "fault_proxy", "rdb_no_backoff", "rdb_url"]

ENV_URL = "RESILIENT_DB_TEST_URL"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--rdb-url``."""
    group = parser.getgroup("resilient-db")
    group.addoption(
        "--rdb-url",
        default=None,
        metavar="URL",
        help=f"database URL behind the fault_proxy fixture (default: ${ENV_URL})",
    )


@pytest.fixture
def rdb_url(request: pytest.FixtureRequest) -> str:
    """The database URL from ``--rdb-url`` or ``RESILIENT_DB_TEST_URL``; skips when unset."""
    url = request.config.getoption("rdb_url", default=None) or os.environ.get(ENV_URL)
    if not url:
        pytest.skip(f"no database URL: pass --rdb-url or set {ENV_URL}")
    return str(url)


@pytest.fixture
def fault_proxy(rdb_url: str) -> Iterator[Any]:
    """A started fault proxy in front of ``rdb_url``; ``fault_proxy.url`` goes through it."""
    from sqlalchemy.engine import make_url

    from .dbproxy import DatabaseProxy

    if make_url(rdb_url).get_backend_name() == "sqlite":
        pytest.skip("SQLite has no network to break; use the fault_injector fixture")
    with DatabaseProxy(rdb_url) as proxy:
        yield proxy


@pytest.fixture
def fault_injector() -> Iterator[Callable[[Any], Any]]:
    """Factory: ``fault_injector(engine)`` returns a FaultInjector closed after the test."""
    from .inject import FaultInjector

    made: list[FaultInjector] = []

    def make(engine: Any) -> FaultInjector:
        injector = FaultInjector(engine)
        made.append(injector)
        return injector

    yield make
    for injector in made:
        injector.close()


@pytest.fixture
def rdb_no_backoff() -> Iterator[None]:
    """No backoff sleeps between retries during the test."""
    from .._backoff import set_testing, testing_enabled

    before = testing_enabled()
    set_testing(True)
    yield
    set_testing(before)
