"""Fork safety (_fork.py): a forked child never uses a connection its parent opened.

Each test forks for real; the child reports through a pipe as JSON and leaves with
``os._exit`` so no pytest machinery runs twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

import resilient_db
from resilient_db import Policy, PoolPolicy, Timeouts
from resilient_db._watchdog import WATCHDOG
from resilient_db.engine import resilience_of
from resilient_db.fleet import share_breaker

POLICY = Policy(timeouts=Timeouts(connect=2, call=2, checkout=1), validate="off")


def in_child(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Fork, run ``work`` in the child, return its JSON-able result (or its error)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            out: dict[str, Any] = work()
        except BaseException as e:
            out = {"error": f"{type(e).__name__}: {e}"}
        os.write(write, json.dumps(out).encode())
        os.close(write)
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert 0 == os.waitstatus_to_exitcode(status)
    return dict(json.loads(b"".join(chunks)))


def backend_pid(engine: sa.Engine) -> int:
    """The PostgreSQL backend pid of the connection the pool hands out."""
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


@pytest.fixture
def engine(pg_url: str) -> Iterator[sa.Engine]:
    """A resilient engine with one connection the parent opened, pooled."""
    e = resilient_db.create_engine(pg_url, policy=POLICY, pool_size=1, max_overflow=0)
    yield e
    e.dispose()


def test_child_gets_its_own_connection_and_parent_keeps_its_own(engine: sa.Engine) -> None:
    """The child's backend pid differs from the parent's; the parent's connection still works."""
    parent_pid = backend_pid(engine)

    def child() -> dict[str, Any]:
        return {
            "backend": backend_pid(engine),
            "pooled_at_start": engine.pool.checkedin(),
            "watchdog_alive": WATCHDOG._thread is not None and WATCHDOG._thread.is_alive(),
        }

    seen = in_child(child)
    assert {"pooled_at_start": 1, "watchdog_alive": True} == {
        k: seen.get(k) for k in ("pooled_at_start", "watchdog_alive")
    }, seen
    assert parent_pid != seen["backend"]
    assert parent_pid == backend_pid(engine)  # the same session, unharmed by the child


def test_child_does_not_inherit_the_parents_watchdog_slots(engine: sa.Engine) -> None:
    """A parent slot armed at the fork is not fired in the child (it would cut a shared socket)."""
    backend_pid(engine)
    parent_slots = len(WATCHDOG._slots)

    def child() -> dict[str, Any]:
        return {"slots": len(WATCHDOG._slots)}

    assert parent_slots >= 1
    assert {"slots": 0} == in_child(child)


def test_child_is_not_blocked_by_a_lock_held_at_the_fork(engine: sa.Engine) -> None:
    """The breaker's and the bulkhead's locks, held by a parent thread at the fork, are new."""
    r = resilience_of(engine)
    b = r.breaker
    assert b is not None
    with b._lock, r.wait_lock:

        def child() -> dict[str, Any]:
            signal.alarm(10)  # a deadlocked child dies of SIGALRM: the exit code fails the test
            with r.wait_lock:
                pass
            return {"state": b.snapshot().state, "backend": backend_pid(engine)}

        seen = in_child(child)
    assert ("closed", int) == (seen.get("state"), type(seen.get("backend"))), seen


def test_child_adaptive_limit_decides_although_its_lock_was_held(pg_url: str) -> None:
    """The adaptive limit's decision lock, held in the parent at the fork, is new in the child."""
    e = resilient_db.create_engine(
        pg_url, policy=dataclasses.replace(POLICY, pool=PoolPolicy(adaptive=True))
    )
    lim = resilience_of(e).limit
    assert lim is not None
    try:
        backend_pid(e)  # the baseline: a fast call
        with lim._lock:

            def child() -> dict[str, Any]:
                for t in range(40):  # 20 s of 1 s calls, 8 per 0.5 s window
                    lim.sample(1.0, 1e6 + t / 16)
                return {"limit": lim.limit}

            seen = in_child(child)
        assert {"limit": 2} == seen
    finally:
        e.dispose()


def test_fleet_store_restarts_in_the_child(engine: sa.Engine, redis_url: str) -> None:
    """The child's store is a new replica whose sync thread runs; the parent's is unchanged."""
    store = share_breaker(engine, redis_url, name=f"fork-{uuid.uuid4().hex[:8]}")
    try:
        parent_replica = store.replica

        def child() -> dict[str, Any]:
            t = store._thread
            return {
                "replica": store.replica,
                "alive": t is not None and t.is_alive() and t is not threading.main_thread(),
                "synced": store.sync(),
            }

        seen = in_child(child)
        assert {"alive": True, "synced": True} == {k: seen.get(k) for k in ("alive", "synced")}
        assert parent_replica != seen["replica"]
        assert (parent_replica, True) == (store.replica, store.sync())
    finally:
        store.close()
