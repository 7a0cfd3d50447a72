"""A reply lost on a live flow: the server answers probes, so the call's own session is asked.

Default policy, real servers, the fault proxy's ``lose_commit_reply()``: the
COMMIT reaches the server, its reply never reaches the client, and the client's
socket stays open and silent while new connections get through.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import resilient_db
from resilient_db import AmbiguousCommitError, Policy, events
from resilient_db._sessions import idle_sessions, session_id
from resilient_db.engine import breaker_of, resilience_of
from resilient_db.testing import DatabaseProxy
from tests.servers import free_port

DEFAULT = Policy(validate="off")


@pytest.fixture
def table(server_url: str) -> Iterator[tuple[str, sa.Engine]]:
    """A fresh table on the server, and a plain engine to look at it with."""
    name = f"lost_{uuid.uuid4().hex[:10]}"
    plain = sa.create_engine(server_url)
    with plain.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY)"))
    try:
        yield name, plain
    finally:
        with plain.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE {name}"))
        plain.dispose()


def test_a_lost_commit_reply_is_found_out_in_seconds(
    server_url: str, table: tuple[str, sa.Engine]
) -> None:
    """The COMMIT's session is idle on the server: the call is cut, an ambiguous commit."""
    name, plain = table
    with DatabaseProxy(server_url) as proxy:
        engine = resilient_db.create_engine(proxy.url, policy=DEFAULT)
        lost: list[events.RepliesLost] = []
        events.subscribe(engine, lost.append, events.RepliesLost)
        try:
            with engine.connect() as conn:  # a pooled connection, then the fault
                conn.execute(sa.text("SELECT 1"))
            proxy.lose_commit_reply()
            t0 = time.monotonic()
            with pytest.raises(AmbiguousCommitError) as info, engine.begin() as conn:
                conn.execute(sa.text(f"INSERT INTO {name} (id) VALUES (1)"))
            took = time.monotonic() - t0
            ctx = resilient_db.error_context(info.value)
            assert ctx is not None
            assert "the reply never arrived" in ctx.diagnosis
            # suspicion after probe_after, the lookup once silent for STUCK_AFTER (2 s),
            # after the session went idle for IDLE_FOR: seconds, not the 28 s deadline
            assert took < 6.0, took
            assert (1, False) == (proxy.commits_seen, proxy.commit_fault_armed)
            assert [1] == [ev.cut for ev in lost]
            assert "sent replies that never arrived" in lost[0].diagnosis
            monitor = resilience_of(engine).monitor
            assert (1, "closed") == (monitor.lost_replies, breaker_of(engine).state)
            with plain.connect() as check:  # the server did commit
                assert [1] == list(check.execute(sa.text(f"SELECT id FROM {name}")).scalars())
            with engine.connect() as conn:  # and the engine serves on
                assert 1 == conn.execute(sa.text("SELECT 1")).scalar_one()
        finally:
            proxy.passthrough()
            engine.dispose()


@pytest.mark.slow  # waits for the server's clock: skipped by the SQLAlchemy 2.0 pass
def test_session_lookup_tells_idle_from_running(server_url: str) -> None:
    """idle_sessions: a session in a long statement is not idle, an idle one is."""
    engine = sa.create_engine(server_url)
    sleep = "SELECT pg_sleep(3)" if engine.dialect.name == "postgresql" else "SELECT SLEEP(3)"
    try:
        idle_conn = engine.raw_connection()
        busy_conn = engine.raw_connection()
        idle_id = session_id(idle_conn.driver_connection)
        busy_id = session_id(busy_conn.driver_connection)
        assert idle_id is not None and busy_id is not None and idle_id != busy_id
        cur = idle_conn.cursor()
        cur.execute("SELECT 1")
        cur.fetchall()
        idle_conn.commit()
        busy = threading.Thread(target=lambda: busy_conn.cursor().execute(sleep))
        busy.start()
        # the server's clock decides how long a session is idle: no clock to inject here
        time.sleep(2.1)  # past IDLE_FOR (MySQL counts whole seconds: 2)
        opened: list[object] = []

        def connect() -> object:
            c = engine.raw_connection()
            opened.append(c)
            return c.driver_connection

        silent = {idle_id: 3.0, busy_id: 3.0, 2**31 - 7: 3.0}  # and one the server lacks
        found = idle_sessions(engine.dialect.name, connect, silent, 2.0)
        busy.join()
        assert [idle_id] == sorted(found)
        assert found[idle_id] >= 1.0
        # an idle session whose last statement began before the call did is no lost reply
        assert {} == idle_sessions(engine.dialect.name, connect, {idle_id: 0.5}, 2.0)
        # a lookup that cannot connect (a port nobody listens on) gives no verdict at all
        closed = sa.create_engine(sa.make_url(server_url).set(port=free_port()))
        refused = lambda: closed.raw_connection().driver_connection  # noqa: E731
        assert {} == idle_sessions(engine.dialect.name, refused, silent, 2.0)
        closed.dispose()
        idle_conn.close()
        busy_conn.close()
    finally:
        engine.dispose()
