"""Fork safety: a child process never uses what its parent opened.

gunicorn ``--preload``, Celery's prefork pool, uWSGI and ``multiprocessing``
with the ``fork`` start method copy the parent's memory into the child: its
pooled connections (sockets shared with the parent), its lock states and its
threads (which do not run in the child). :func:`after_fork_in_child`, registered
with :func:`os.register_at_fork`, runs in every child right after the fork and
applies SQLAlchemy's documented pattern to every live resilient engine:

- ``engine.dispose(close=False)``: the child gets a fresh, empty pool; the
  parent's connections are kept referenced (never closed, never finalised, never
  pinged) so nothing the child does reaches the parent's sessions;
- the engine's per-process state (bulkhead counters, half-open probe tokens,
  locks a parent thread may have held at the fork) starts afresh;
- the watchdog forgets the parent's slots (shutting a shared socket down would
  cut the parent's connection) and its thread starts again with the child's
  first watched connection;
- a fleet breaker store (:mod:`resilient_db.fleet`) gets a new replica id, a
  fresh Redis connection pool and its own sync thread.

The parent is untouched. Engines and stores are held by weak references.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
import weakref
from typing import Any

from sqlalchemy.engine import Engine

from ._state import resilience_of
from ._watchdog import WATCHDOG

__all__ = ["after_fork_in_child", "track_engine", "track_store"]

_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
_STORES: weakref.WeakSet[Any] = weakref.WeakSet()
#: the parent's pools, kept alive in the child so their connections are never finalised
_ORPHANS: list[Any] = []


def track_engine(engine: Engine) -> None:
    """Make ``engine`` fork-safe (called by :func:`resilient_db.wrap`)."""
    _ENGINES.add(engine)


def track_store(store: Any) -> None:
    """Restart ``store`` (a started :class:`~resilient_db.RedisBreakerStore`) in forked children."""
    _STORES.add(store)


def after_fork_in_child() -> None:
    """Give every live resilient engine and fleet store a fresh start in this child."""
    WATCHDOG.after_fork()
    for engine in list(_ENGINES):
        _ORPHANS.append(engine.pool)
        engine.dispose(close=False)
        _fresh_state(resilience_of(engine))
    for store in list(_STORES):
        _restart_store(store)


def _restart_store(store: Any) -> None:
    """A fleet store in the child: a new replica with its own Redis sockets and sync thread.

    The parent's leases stay the parent's. (Kept here, not in fleet.py, which may only
    shrink; it sets the store's own fields as its ``__init__`` does.)
    """
    store._mu = threading.Lock()
    store._wake, store._stop = threading.Event(), threading.Event()
    store._pid, store._held, store._done, store._busy_until = os.getpid(), [], [], 0.0
    if store.own_replica:
        store.replica = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    with contextlib.suppress(AttributeError):  # drops (never closes) the parent's sockets
        store.client.connection_pool.reset()
    b = store._breaker() if store._breaker is not None else None
    if b is not None and b.shared is store:
        store._thread = threading.Thread(
            target=store._run, name=f"resilient_db-fleet-{store.name}", daemon=True
        )
        store._thread.start()


def _fresh_state(r: Any) -> None:
    """The per-process state of one engine's resilience starts afresh in the child."""
    r.waiting = 0
    r.probes.clear()  # tokens of the parent's half-open probes, keyed by its records
    _reset_lock(r, "wait_lock")
    if r.breaker is not None:
        _reset_lock(r.breaker, "_lock", "_count_lock")
    if r.limit is not None:  # the adaptive limit's decision lock
        _reset_lock(r.limit, "_lock")
    m = r.monitor
    if m is not None:  # a probe out at the fork runs in the parent only
        _reset_lock(m, "_lock")
        m.probing = False


def _reset_lock(obj: Any, *names: str) -> None:
    """Replace ``obj``'s locks: a thread of the parent may have held them at the fork."""
    for name in names:
        getattr(obj, name)  # renamed: fail here, not deadlock in a child
        setattr(obj, name, threading.Lock())


if hasattr(os, "register_at_fork"):  # pragma: no branch - every POSIX platform has it
    os.register_at_fork(after_in_child=after_fork_in_child)
