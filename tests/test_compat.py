"""The one seam to SQLAlchemy's internals: every private name still means what we use it for."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import QueuePool

from resilient_db import _compat

SRC = Path(__file__).resolve().parents[1] / "src" / "resilient_db"

# instance attributes: checked on a live pool / record / context below
_INSTANCE = {
    ("sqlalchemy.pool.Pool", "_dialect"),
    ("sqlalchemy.pool.Pool", "_invalidate_time"),
    ("sqlalchemy.pool.Pool", "_invoke_creator"),
    ("sqlalchemy.pool.QueuePool", "_overflow"),
    ("sqlalchemy.pool.QueuePool", "_max_overflow"),
    ("sqlalchemy.pool.QueuePool", "_pool"),
    ("sqlalchemy.pool.base._ConnectionFairy", "_connection_record"),
    ("sqlalchemy.engine.Connection", "_dbapi_connection"),
    ("sqlalchemy.engine.default.DefaultExecutionContext", "_dbapi_connection"),
    ("sqlalchemy.engine.Engine", "_proxied"),
}


def _owner(path: str) -> object:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return importlib.import_module(path)


@pytest.mark.parametrize(
    "owner,name",
    [n for n in _compat.PRIVATE_NAMES if n not in _INSTANCE],
    ids="{0[0]}.{0[1]}".format,
)
def test_private_name_exists(owner: str, name: str) -> None:
    """Each private SQLAlchemy name the compat module lists exists in this SQLAlchemy."""
    obj = _owner(owner)
    if name.endswith("=)"):  # a keyword argument of a method
        method, _, kw = name[:-2].partition("(")
        params = inspect.signature(getattr(obj, method)).parameters
        assert kw in params, f"{owner}.{method}() lost its {kw}= argument"
    else:
        assert hasattr(obj, name), f"SQLAlchemy {sa.__version__}: {owner}.{name} is gone"


def test_every_instance_name_is_listed() -> None:
    """The instance attributes checked below are all listed in PRIVATE_NAMES."""
    assert _INSTANCE <= set(_compat.PRIVATE_NAMES)


def test_instance_attributes_on_live_objects() -> None:
    """The pool, record, fairy, connection and context attributes exist on real objects."""
    engine = sa.create_engine("sqlite://", poolclass=QueuePool, pool_size=1, max_overflow=2)
    pool = engine.pool
    assert isinstance(pool._invalidate_time, (int, float))
    assert pool._dialect is engine.dialect
    assert (0, 2) == (pool._overflow + pool.size(), pool._max_overflow)
    assert 0 == pool._pool.qsize()
    seen: list[object] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def grab(conn, cursor, statement, params, context, many):  # type: ignore[no-untyped-def]
        seen.append(context._dbapi_connection)

    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        fairy = conn._dbapi_connection
        assert fairy is seen[0]
        assert fairy._connection_record.info is conn.info
    copy = engine.execution_options(isolation_level="AUTOCOMMIT")
    assert engine is copy._proxied
    engine.dispose()


def test_pool_functions_against_a_real_queue_pool() -> None:
    """reclass_pool, the bound checkout/check-in, can_grow and no_free_connection on a QueuePool."""
    engine = sa.create_engine("sqlite://", poolclass=QueuePool, pool_size=1, max_overflow=0)
    got: list[str] = []

    def do_get_bound(self):  # type: ignore[no-untyped-def]
        got.append("get")
        return self._rdb_do_get()  # the original method, for the hot path

    def do_return_bound(self, record):  # type: ignore[no-untyped-def]
        got.append("return")
        self._rdb_do_return(record)

    base = _compat.reclass_pool(
        engine.pool, "Test", {}, checkout=do_get_bound, checkin=do_return_bound
    )
    assert (QueuePool, QueuePool) == (base, _compat.base_pool_class(engine.pool))
    assert "TestQueuePool" == type(engine.pool).__name__
    with engine.connect() as conn:
        assert (False, True) == (
            _compat.queue_pool_can_grow(engine.pool),
            _compat.no_free_connection(engine.pool),
        )
        record = _compat.record_of(conn)
        assert record is conn._dbapi_connection._connection_record
        assert record is _compat.record_of(conn.connection)
    assert ["get", "return"] == got
    assert _compat.no_free_connection(engine.pool) is False
    _compat.reclass_pool(engine.pool, "Bound", {}, checkout=do_get_bound, checkin=do_return_bound)
    with engine.connect() as conn:
        assert _compat.no_free_connection(engine.pool) is True
        state = object()
        _compat.set_record_state(_compat.record_of(conn), state)
        assert state is _compat.connection_state(conn.connection)
        assert _compat.connection_state(object()) is None
    assert ["get", "return"] * 2 == got
    engine.dispose()


def test_pool_connect_is_the_fairy_checkout_reclass_pool_calls() -> None:
    """Pool.connect() is nothing but ``_ConnectionFairy._checkout(self)``.

    reclass_pool calls that directly (one frame less per checkout) for every pool
    class that inherits Pool.connect; a class with its own connect keeps it.
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(sa.pool.Pool.connect)))
    fn = tree.body[0]
    assert isinstance(fn, ast.FunctionDef)
    body = [
        n for n in fn.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
    ]
    assert ["return _ConnectionFairy._checkout(self)"] == [ast.unparse(n) for n in body]
    queue = sa.create_engine("sqlite://", poolclass=QueuePool)
    single = sa.create_engine("sqlite://", poolclass=sa.pool.SingletonThreadPool)
    for engine in (queue, single):
        _compat.reclass_pool(engine.pool, "Test", {}, checkout=_do_get, checkin=_do_return)
    assert sa.pool.base._ConnectionFairy._checkout == type(queue.pool)._rdb_connect
    assert sa.pool.SingletonThreadPool.connect is type(single.pool)._rdb_connect
    for engine in (queue, single):
        first = type(engine.pool)._rdb_connect(engine.pool)
        assert first.dbapi_connection is not None
        first.close()
        engine.dispose()


def _do_get(self):  # type: ignore[no-untyped-def]
    return self._rdb_do_get()


def _do_return(self, record):  # type: ignore[no-untyped-def]
    self._rdb_do_return(record)


def test_record_functions_against_a_real_record() -> None:
    """is_invalidated, invalidate_older and checkin_failed on a real pool record."""
    engine = sa.create_engine("sqlite://", poolclass=QueuePool, pool_size=1, max_overflow=0)
    pool = engine.pool
    _compat.reclass_pool(
        pool, "Plain", {}, checkout=QueuePool._do_get, checkin=QueuePool._do_return_conn
    )
    rec = pool._rdb_do_get()
    assert _compat.is_invalidated(rec) is False
    _compat.invalidate_older(pool, rec)
    assert pool._invalidate_time >= rec.starttime
    _compat.checkin_failed(rec, RuntimeError("x"))
    assert 0 == pool.checkedout()
    rec2 = pool._rdb_do_get()
    _compat.checkin_unused(rec2)
    assert 0 == pool.checkedout()
    engine.dispose()


def test_commit_frames_are_found() -> None:
    """A failure inside COMMIT is read as phase commit from SQLAlchemy's frame names."""
    engine = sa.create_engine("sqlite://")

    @sa.event.listens_for(engine, "commit")
    def fail(conn):  # type: ignore[no-untyped-def]
        raise RuntimeError("commit failed")

    with pytest.raises(RuntimeError) as info, engine.begin() as conn:
        conn.execute(sa.text("SELECT 1"))
    assert "commit" == _compat.commit_or_rollback_in(info.value.__traceback__)
    engine.dispose()


def test_no_private_sqlalchemy_name_outside_compat() -> None:
    """Only _compat.py touches the private names it lists."""
    # a keyword argument is searched for by itself: checkin() is public, the keyword is not
    names = {name[:-2].partition("(")[2] or name for _, name in _compat.PRIVATE_NAMES}
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "_compat.py":
            continue
        text = path.read_text()
        for name in names:
            if re.search(rf"[.\"' ]{re.escape(name)}\b", text):
                offenders.append(f"{path.relative_to(SRC)}: {name}")
    assert [] == offenders


def test_sqlalchemy_version_is_supported() -> None:
    """The installed SQLAlchemy is a 2.x the project says it supports."""
    assert sa.__version__.startswith("2."), sys.version


def test_pool_creator_functions() -> None:
    """has_engine_creator tells create_engine's connect from creator=; wrap_creator wraps it."""
    plain = sa.create_engine("sqlite://", poolclass=QueuePool)
    import sqlite3

    own = sa.create_engine("sqlite://", creator=lambda: sqlite3.connect(":memory:"))
    assert (True, False) == (
        _compat.has_engine_creator(plain.pool),
        _compat.has_engine_creator(own.pool),
    )
    calls: list[object] = []

    def wrapper(invoke, record):  # type: ignore[no-untyped-def]
        calls.append(record)
        return invoke(record)

    original = own.pool._creator
    _compat.wrap_creator(own.pool, wrapper)
    assert original is _compat.pool_creator(own.pool)
    with own.connect() as conn:
        assert 1 == conn.exec_driver_sql("SELECT 1").scalar()
    own.dispose()  # recreate() hands the wrapped creator to the new pool
    with own.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    assert 2 == len(calls)
    assert calls[0] is not None
    plain.dispose()


def test_dialect_listeners_run_in_registration_order_and_stop_at_a_connection() -> None:
    """listeners_after relies on do_connect order: insert=True ignored, first connection wins."""
    engine = sa.create_engine("sqlite://")
    order: list[str] = []

    def first(*args):  # type: ignore[no-untyped-def]
        order.append("first")

    def second(dialect, rec, cargs, cparams):  # type: ignore[no-untyped-def]
        order.append("second")
        return dialect.connect(*cargs, **cparams)

    def third(*args):  # type: ignore[no-untyped-def]
        order.append("third")

    sa.event.listen(engine, "do_connect", first)
    sa.event.listen(engine, "do_connect", second)
    sa.event.listen(engine, "do_connect", third, insert=True)
    assert [second, third] == _compat.listeners_after(engine.dialect, "do_connect", first)
    engine.connect().close()
    assert ["first", "second"] == order
    engine.dispose()


def test_record_state_lives_off_the_records_info() -> None:
    """A pool record takes resilient_db's attribute; context_state finds it from a context."""
    engine = sa.create_engine("sqlite://", poolclass=QueuePool)
    marker = object()
    seen: list[object] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def grab(conn, cursor, statement, params, context, many):  # type: ignore[no-untyped-def]
        seen.append(_compat.context_state(context))

    with engine.connect() as conn:
        _compat.set_record_state(_compat.record_of(conn), marker)
        conn.exec_driver_sql("SELECT 1")
        assert ({}, marker) == (conn.info, _compat.record_state(_compat.record_of(conn)))
    assert [marker] == seen
    engine.dispose()


def test_asyncpg_dbapi_error_matches_the_adapter() -> None:
    """The asyncpg adapter's error for an asyncpg error: its DBAPI class, sqlstate, cause."""
    pytest.importorskip("asyncpg")
    import asyncpg.exceptions

    engine = sa.create_engine("postgresql+asyncpg://u@h/db")
    dbapi = engine.dialect.loaded_dbapi
    orig = asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
    exc = _compat.asyncpg_dbapi_error(dbapi, orig)
    assert (dbapi.Error, "40P01", orig) == (
        type(exc),
        exc.sqlstate,  # type: ignore[attr-defined]
        exc.__cause__,
    )
    assert "deadlock detected" in str(exc)


def test_installed_sqlalchemy_meets_the_declared_floor() -> None:
    """pyproject's sqlalchemy floor is what CI installs at least (checked on both lines)."""
    text = (SRC.parents[1] / "pyproject.toml").read_text()
    floor = re.search(r'"sqlalchemy>=([\d.]+)"', text)
    assert floor is not None
    want = tuple(int(p) for p in floor.group(1).split("."))
    have = tuple(int(p) for p in re.findall(r"\d+", sa.__version__)[:3])
    assert have >= want, f"SQLAlchemy {sa.__version__} is below the floor {floor.group(1)}"
