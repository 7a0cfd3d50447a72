"""Every private SQLAlchemy name resilient_db relies on, in one place.

Drop-in behaviour sometimes needs SQLAlchemy's internals: the pool's
``_do_get`` / ``_do_return_conn`` (the only points where every checkout and
check-in pass, whatever the pool class), a pool record's check-in variants, the
pool's invalidation time, the execution context's DBAPI connection. Each name
used is listed in :data:`PRIVATE_NAMES` and reached only through a function of
this module; ``tests/test_compat.py`` checks every one against the installed
SQLAlchemy, so an upgrade that renames one fails loudly there instead of
misbehaving at run time. CI runs the suite on the newest 2.0.x and on the
newest SQLAlchemy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import sqlalchemy
from sqlalchemy.engine import Engine
from sqlalchemy.pool import ConnectionPoolEntry, Pool, QueuePool
from sqlalchemy.pool.base import _ConnectionFairy
from sqlalchemy.util import await_only, greenlet_spawn

__all__ = [
    "PRIVATE_NAMES",
    "asyncpg_dbapi_error",
    "base_pool_class",
    "checkin_failed",
    "checkin_unused",
    "commit_or_rollback_in",
    "connection_state",
    "context_state",
    "has_engine_creator",
    "invalidate_older",
    "is_invalidated",
    "listeners_after",
    "max_overflow",
    "no_free_connection",
    "pool_creator",
    "pool_dialect",
    "proxied_engine",
    "queue_pool_can_grow",
    "queue_pool_limits",
    "reclass_pool",
    "record_of",
    "record_state",
    "run_awaitable",
    "set_record_state",
    "spawn",
    "wrap_creator",
]

#: (owner, name) of every private SQLAlchemy attribute used; tests check each exists.
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    ("sqlalchemy.pool.Pool", "_do_get"),
    ("sqlalchemy.pool.Pool", "_do_return_conn"),
    ("sqlalchemy.pool.Pool", "_dialect"),  # instance attribute
    ("sqlalchemy.pool.Pool", "_invalidate_time"),  # instance attribute
    ("sqlalchemy.pool.Pool", "_creator"),  # property: setting it sets _invoke_creator
    ("sqlalchemy.pool.Pool", "_invoke_creator"),  # instance attribute
    ("sqlalchemy.pool.QueuePool", "_overflow"),  # instance attribute
    ("sqlalchemy.pool.QueuePool", "_max_overflow"),  # instance attribute
    ("sqlalchemy.pool.QueuePool", "_pool"),  # instance attribute: the idle-connection queue
    ("sqlalchemy.pool.base._ConnectionRecord", "_is_hard_or_soft_invalidated"),
    ("sqlalchemy.pool.base._ConnectionRecord", "_checkin_failed"),
    ("sqlalchemy.pool.base._ConnectionRecord", "checkin(_fairy_was_created=)"),
    ("sqlalchemy.pool.base._ConnectionFairy", "_connection_record"),
    ("sqlalchemy.pool.base._ConnectionFairy", "_checkout"),  # what Pool.connect() calls
    ("sqlalchemy.engine.Connection", "_dbapi_connection"),
    ("sqlalchemy.engine.default.DefaultExecutionContext", "_dbapi_connection"),
    ("sqlalchemy.engine.Engine", "_proxied"),  # OptionEngine (Engine.execution_options())
    ("sqlalchemy.engine.Connection", "_commit_impl"),  # frame name
    ("sqlalchemy.engine.Connection", "_rollback_impl"),  # frame name
    ("sqlalchemy.dialects.postgresql.asyncpg.AsyncAdapt_asyncpg_dbapi", "_asyncpg_error_translate"),
    ("sqlalchemy.util", "await_only"),
    ("sqlalchemy.util", "greenlet_spawn"),
)

#: the installed SQLAlchemy's (major, minor)
SA_VERSION: tuple[int, int] = tuple(int(p) for p in sqlalchemy.__version__.split(".")[:2])  # type: ignore[assignment]

_COMMIT_FRAMES = frozenset({"_commit_impl", "do_commit", "commit"})
_ROLLBACK_FRAMES = frozenset({"_rollback_impl", "do_rollback", "rollback"})


# -- the pool ------------------------------------------------------------------------


def reclass_pool(
    pool: Pool,
    name: str,
    attrs: dict[str, Any],
    *,
    checkout: Callable[[Any], Any],
    checkin: Callable[[Any, Any], None],
) -> type[Pool]:
    """Make ``pool`` an instance of a new subclass of its own class.

    ``checkout(pool)`` replaces the class's ``_do_get`` and ``checkin(pool,
    record)`` its ``_do_return_conn``, the two methods every checkout and
    check-in pass through whatever the pool class; ``attrs`` are added as
    class attributes. The original class is kept as ``_rdb_base``, and its
    checkout and check-in as the pool's own ``_rdb_do_get()`` /
    ``_rdb_do_return(record)`` (the original methods, called without a wrapper
    on the hot path), and its ``connect`` as ``_rdb_connect(pool)``: for a class
    that inherits ``Pool.connect``, the ``_ConnectionFairy._checkout`` that
    method is made of, called without its frame. A pool re-classed
    before is re-classed from its original class. (CPython refuses to change
    an existing object's ``__class__`` to a class with an extra base, so the
    methods are set on a direct subclass.)
    """
    base = base_pool_class(pool)
    ns = {
        "_rdb_base": base,
        "_rdb_do_get": base._do_get,
        "_rdb_do_return": base._do_return_conn,
        "_rdb_connect": staticmethod(
            _ConnectionFairy._checkout if base.connect is Pool.connect else base.connect
        ),
        **attrs,
        "_do_get": checkout,
        "_do_return_conn": checkin,
    }
    cls = type(f"{name}{base.__name__}", (base,), ns)
    pool.__class__ = cls
    return base


def base_pool_class(pool: Pool) -> type[Pool]:
    """The pool's class before resilient_db re-classed it."""
    cls = type(pool)
    base: type[Pool] = getattr(cls, "_rdb_base", cls)
    return base


def queue_pool_can_grow(pool: Any) -> bool:
    """True when a QueuePool may still open a connection beyond its idle ones."""
    can: bool = pool._overflow < pool._max_overflow  # no bool(): every checkout calls this
    return can


def no_free_connection(pool: Any) -> bool:
    """True when a QueuePool has no idle connection and may not open another."""
    if not isinstance(pool, QueuePool):
        return False
    return bool(pool._pool.qsize() == 0 and pool._overflow >= pool._max_overflow >= 0)


def queue_pool_limits(pool: Any) -> tuple[int, int] | None:
    """``(pool_size, max_overflow)`` of a QueuePool (max_overflow -1: unlimited), else None."""
    if not isinstance(pool, QueuePool):
        return None
    return int(pool.size()), int(pool._max_overflow)


def max_overflow(pool: Any) -> int:
    """A QueuePool's ``max_overflow`` (-1: unlimited; 0 for other pools)."""
    return int(getattr(pool, "_max_overflow", 0))


def pool_dialect(pool: Pool) -> Any:
    """The dialect a pool pings its connections with."""
    return pool._dialect


def invalidate_older(pool: Pool, record: Any) -> None:
    """Invalidate every pooled connection as old as ``record``'s, as pre-ping does."""
    if pool._invalidate_time < record.starttime:
        pool._invalidate_time = time.time()


def has_engine_creator(pool: Pool) -> bool:
    """True when the pool connects through ``create_engine``'s own ``connect``.

    That function runs the dialect's ``do_connect`` listeners; a ``creator=``
    (or a ``pool=`` built by the application) connects past them.
    """
    creator = pool._creator
    return (
        getattr(creator, "__module__", None) == "sqlalchemy.engine.create"
        and getattr(creator, "__name__", None) == "connect"
    )


def wrap_creator(pool: Pool, wrapper: Callable[[Callable[[Any], Any], Any], Any]) -> None:
    """Make the pool connect through ``wrapper(invoke, record)``.

    ``invoke(record)`` calls the pool's creator as SQLAlchemy would (with or
    without the record, by its signature). ``Pool.recreate()`` (``dispose()``)
    hands the wrapped creator to the new pool.
    """
    invoke: Callable[[Any], Any] = pool._invoke_creator
    original = pool._creator

    def resilient_creator(connection_record: Any = None) -> Any:
        return wrapper(invoke, connection_record)

    resilient_creator._rdb_creator = original  # type: ignore[attr-defined]
    pool._creator = resilient_creator


def pool_creator(pool: Pool) -> Any:
    """The function the pool connects with (the application's, under :func:`wrap_creator`)."""
    creator = pool._creator
    return getattr(creator, "_rdb_creator", creator)


def listeners_after(dialect: Any, identifier: str, fn: Callable[..., Any]) -> list[Any]:
    """The dialect's ``identifier`` listeners registered after ``fn``, in calling order.

    SQLAlchemy calls dialect listeners in registration order (``insert=True``
    has no effect on them) and stops at the first ``do_connect`` listener that
    returns a connection.
    """
    found = list(getattr(dialect.dispatch, identifier))
    for i, listener in enumerate(found):
        if listener is fn:
            return found[i + 1 :]
    return []


# -- pool records ----------------------------------------------------------------------


def is_invalidated(record: Any) -> bool:
    """True when SQLAlchemy will reconnect this record at checkout anyway."""
    return bool(record._is_hard_or_soft_invalidated())


def checkin_unused(record: Any) -> None:
    """Give a record back from inside ``_do_get``: no fairy was made for it."""
    record.checkin(_fairy_was_created=False)


def checkin_failed(record: Any, error: BaseException) -> None:
    """A record's checkout failed inside ``_do_get``: discard its connection."""
    record._checkin_failed(error, _fairy_was_created=False)


#: resilient_db's own attribute on a pool record (its ``__slots__`` include ``__dict__``):
#: the record's ``info`` is the application's, shown as ``Connection.info``
STATE_ATTR = "_resilient_db"


def record_of(conn: Any) -> Any:
    """The pool record of a Connection, a pooled connection, an ad-hoc proxy, a context.

    A Connection's and an execution context's ``_dbapi_connection`` is the
    pooled connection (the first connection's ``dialect.initialize()`` runs on
    an ad-hoc proxy, which names the record too). None when there is none.
    """
    if isinstance(conn, ConnectionPoolEntry):
        return conn
    fairy = getattr(conn, "_dbapi_connection", conn)
    return getattr(fairy, "_connection_record", None)


def record_state(record: Any) -> Any:
    """resilient_db's state of a pool record (None if it has none yet)."""
    return getattr(record, STATE_ATTR, None)


def set_record_state(record: Any, state: Any) -> None:
    """Give a pool record resilient_db's state (None: forget it, for a new connection)."""
    setattr(record, STATE_ATTR, state)


def connection_state(pooled: Any) -> Any:
    """resilient_db's state of a pooled connection's record (commit/rollback: hot path)."""
    return getattr(getattr(pooled, "_connection_record", None), STATE_ATTR, None)


def context_state(context: Any) -> Any:
    """resilient_db's state of an execution context's pool record (the hot path)."""
    fairy = getattr(context, "_dbapi_connection", None)
    return getattr(getattr(fairy, "_connection_record", None), STATE_ATTR, None)


# -- engines and calls -------------------------------------------------------------------


def proxied_engine(engine: Engine) -> Engine | None:
    """The engine an ``Engine.execution_options()`` copy proxies, or None."""
    proxied = getattr(engine, "_proxied", None)
    return proxied if isinstance(proxied, Engine) else None


def commit_or_rollback_in(tb: TracebackType | None) -> str | None:
    """``"commit"`` / ``"rollback"`` when the traceback passed SQLAlchemy's COMMIT/ROLLBACK."""
    while tb is not None:
        name = tb.tb_frame.f_code.co_name
        if name in _COMMIT_FRAMES:
            return "commit"
        if name in _ROLLBACK_FRAMES:
            return "rollback"
        tb = tb.tb_next
    return None


def run_awaitable(awaitable: Any) -> Any:
    """Await ``awaitable`` from sync code running in SQLAlchemy's greenlet."""
    return await_only(awaitable)


def spawn(fn: Callable[..., Any], *args: Any) -> Any:
    """Run sync ``fn`` in a greenlet so it may use async drivers (an awaitable)."""
    return greenlet_spawn(fn, *args)


# -- drivers -----------------------------------------------------------------------------


def asyncpg_dbapi_error(dbapi: Any, orig: BaseException) -> BaseException:
    """The error SQLAlchemy's asyncpg adapter raises for asyncpg's ``orig``.

    Its own DBAPI class, caused by ``orig``, with ``sqlstate`` / ``pgcode``;
    2.0 prefixes the message with asyncpg's class and takes no ``error``
    argument, 2.1 keeps asyncpg's message. ``orig`` itself when no class maps.
    """
    mapping = dbapi._asyncpg_error_translate
    for base in type(orig).__mro__:
        if base in mapping:
            if SA_VERSION >= (2, 1):
                exc: BaseException = mapping[base](orig.args[0], orig)
            else:
                exc = mapping[base](f"{type(orig)}: {orig}")
            exc.pgcode = exc.sqlstate = getattr(orig, "sqlstate", None)  # type: ignore[attr-defined]
            exc.__cause__ = orig
            return exc
    return orig
