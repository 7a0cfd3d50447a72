"""Test helpers for exercising database resilience.

- :class:`FaultProxy` / :class:`DatabaseProxy`: a TCP proxy that breaks the
  network between a client and a real server (refuse, blackhole, latency,
  resets, lost COMMIT replies).
- :class:`FaultInjector` / :func:`driver_error`: in-process faults for any
  dialect, SQLite included: the next N connects or executes raise the
  driver's real error.
- Assertions: :func:`assert_fails_fast`, :func:`assert_degraded_gracefully`,
  :func:`assert_recovers`.
- :func:`set_testing`: no backoff sleeps in your test suite; :class:`ManualClock`: an
  injected clock for breaker and retry timing.
- A pytest plugin (loaded automatically) with the ``fault_proxy``,
  ``fault_injector`` and ``rdb_no_backoff`` fixtures; see ``docs/testing.md``.
"""

from resilient_db._backoff import set_testing
from resilient_db.testing.assertions import (
    assert_degraded_gracefully,
    assert_fails_fast,
    assert_fails_fast_async,
    assert_recovers,
)
from resilient_db.testing.clock import ManualClock
from resilient_db.testing.dbproxy import DatabaseProxy
from resilient_db.testing.inject import ErrorSpec, FaultInjector, driver_error, error_kinds
from resilient_db.testing.proxy import Fault, FaultProxy

__all__ = [
    "DatabaseProxy",
    "ErrorSpec",
    "Fault",
    "FaultInjector",
    "FaultProxy",
    "ManualClock",
    "assert_degraded_gracefully",
    "assert_fails_fast",
    "assert_fails_fast_async",
    "assert_recovers",
    "driver_error",
    "error_kinds",
    "set_testing",
]
