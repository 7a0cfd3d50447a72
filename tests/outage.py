"""The outage drill every integration test runs: refuse, blackhole, restore.

A service runs in front of a :class:`~resilient_db.testing.FaultProxy` with a short
policy (:data:`POLICY_ENV`). The drill asserts what a user must see: the non-database
call stays fast, database calls answer with an explained failure (an HTTP 503 with
the diagnosis, or a Celery error with its context) while the database refuses and
while it is silent, and every call succeeds again within the breaker's reset once
the database is back.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from resilient_db.testing import FaultProxy

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "integrations"

RESET_TIMEOUT = 1.0
#: Short timeouts so that the drill takes seconds; the breaker opens after two failures.
POLICY_ENV = {
    "RESILIENT_DB_TIMEOUTS_CONNECT": "1",
    "RESILIENT_DB_TIMEOUTS_CALL": "2",
    "RESILIENT_DB_TIMEOUTS_CHECKOUT": "1",
    "RESILIENT_DB_RETRY_ATTEMPTS": "1",
    "RESILIENT_DB_BREAKER_FAILURE_THRESHOLD": "2",
    "RESILIENT_DB_BREAKER_RESET_TIMEOUT": str(RESET_TIMEOUT),
}
#: libpq's connect_timeout is whole seconds, at least 2: a connect into silence fails then.
SILENT_CONNECT_S = 2.0
FAST_S = 0.5


@dataclass
class Answer:
    """One call's outcome: ok, or the explained failure (kind and diagnosis)."""

    ok: bool
    kind: str | None = None
    diagnosis: str | None = None
    seconds: float = 0.0
    detail: Any = None


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def proxied(url: str) -> Iterator[tuple[FaultProxy, str]]:
    """A FaultProxy in front of ``url``'s server and the URL through it."""
    u = sa.make_url(url)
    with FaultProxy(u.host or "127.0.0.1", u.port or 5432) as proxy:
        yield proxy, u.set(host=proxy.host, port=proxy.port).render_as_string(False)


@contextmanager
def server(
    argv: list[str], env: Mapping[str, str], ready: Callable[[], bool], stop: int = 15
) -> Iterator[None]:
    """Run ``argv`` (a service) until the test ends, then send ``stop``; wait for ``ready()``."""
    # the service's log goes to a file: a pipe nobody reads fills up (64 KiB of warnings
    # and task tracebacks during an outage) and then blocks the service in its logging
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        argv,
        cwd=EXAMPLES,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env},
        stdout=subprocess.DEVNULL if not os.environ.get("RDB_SERVER_LOG") else None,
        stderr=None if os.environ.get("RDB_SERVER_LOG") else log,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                err = log.read().decode(errors="replace")
                raise AssertionError(f"{argv[:3]} did not start: {err[-3000:]}")
            time.sleep(0.1)
        yield
    finally:
        os.killpg(proc.pid, stop)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


def timed(call: Callable[[], Answer]) -> Answer:
    """``call()`` with its duration."""
    t0 = time.monotonic()
    answer = call()
    answer.seconds = time.monotonic() - t0
    return answer


def explained(answers: list[Answer]) -> list[str]:
    """The failures among ``answers`` that are not an explained failure."""
    return [
        f"{a}"
        for a in answers
        if a.ok or not a.kind or not a.diagnosis or a.kind in ("unknown", "database_unavailable")
    ]


def drill(proxy: FaultProxy, db: Callable[[], Answer], live: Callable[[], Answer]) -> None:
    """Refuse, blackhole, restore; assert what callers see at each step."""
    assert timed(db).ok, "the service does not work before the outage"

    proxy.refuse()
    proxy.reset_all()  # the database went down: its connections are gone
    # a lost session does not count, a refused connect does (threshold 2): a worker sees
    # circuit_open at its fourth request at the latest (lost, refused, refused, open);
    # with two server workers, 8 requests give one of them at least four, whatever the split
    refused = [timed(db) for _ in range(8)]
    assert [] == explained(refused), "refused: every database call is an explained failure"
    assert any(a.kind == "circuit_open" for a in refused), [a.kind for a in refused]
    assert timed(live).seconds < FAST_S

    proxy.blackhole()
    time.sleep(RESET_TIMEOUT)  # the breakers let a probe through: it meets the silence
    pending: list[Answer] = []
    worker = threading.Thread(target=lambda: pending.append(timed(db)))
    worker.start()
    time.sleep(0.2)
    during = timed(live)  # while a database call waits on the silent network
    worker.join(SILENT_CONNECT_S + 5)
    # each later call is rejected while a probe is in flight, or is the next probe: the
    # next one is due reset_timeout after the last was admitted, and a probe into
    # silence takes the connect timeout (longer than this reset_timeout)
    silent = [*pending, timed(db)]
    assert [] == explained(silent), "silent: every database call is an explained failure"
    assert during.seconds < FAST_S, during
    assert max(a.seconds for a in silent) < SILENT_CONNECT_S + 1.5, silent

    proxy.passthrough()
    t0 = time.monotonic()
    streak = 0
    while streak < 4:
        assert time.monotonic() - t0 < RESET_TIMEOUT + 1.5, "not back within the breaker's reset"
        streak = streak + 1 if timed(db).ok else 0
        time.sleep(0.05)


def python() -> str:
    """The interpreter running the tests (its venv has the integrations extra)."""
    return sys.executable
