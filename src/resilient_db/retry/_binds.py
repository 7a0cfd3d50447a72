"""Checks on what the runner is given: arguments, and binds that cannot be re-run safely.

All pure and without I/O: a bind's AUTOCOMMIT isolation is read from its
execution options and dialect, and :func:`_engine_of` finds the sync Engine
behind an Engine, AsyncEngine or (async_)sessionmaker.
"""

from __future__ import annotations

import inspect
from typing import Any

from sqlalchemy.engine import Connection, Engine

from .. import idempotency as _idem
from ..config import Policy, RetryPolicy
from ..errors import ConfigurationError
from ._unit import _Unit


def _check_args(
    fn: object,
    policy: object,
    read_only: object,
    key: object,
    verify: object,
    isolation_level: object,
    *,
    is_async: bool,
) -> None:
    if not callable(fn):
        raise ConfigurationError("fn", f"must be callable, got {type(fn).__name__}.", "")
    if not is_async and inspect.iscoroutinefunction(fn):
        raise ConfigurationError(
            "fn",
            "is a coroutine function; the sync runner would never await it.",
            "Use run_transaction_async / transactional_async with an AsyncEngine.",
        )
    if policy is not None and not isinstance(policy, (Policy, RetryPolicy)):
        raise ConfigurationError(
            "policy",
            f"must be a resilient_db.Policy or RetryPolicy, got {type(policy).__name__}.",
            "Pass e.g. RetryPolicy(attempts=5, deadline=10).",
        )
    if not isinstance(read_only, bool):
        raise ConfigurationError("read_only", f"must be True or False, got {read_only!r}.", "")
    if key is not None:
        _idem.check_key(key)
    if verify is not None and not callable(verify):
        raise ConfigurationError("verify", "must be callable or None.", "")
    if isolation_level is not None and (
        not isinstance(isolation_level, str) or isolation_level.upper() == "AUTOCOMMIT"
    ):
        raise ConfigurationError(
            "isolation_level",
            f"must be a transaction isolation level, got {isolation_level!r}.",
            "Use e.g. 'SERIALIZABLE' or 'REPEATABLE READ'; AUTOCOMMIT has no transaction to retry.",
        )


def _check_key_function(idempotency_key: object) -> None:
    """The decorators take the key as a function of the call's arguments."""
    if idempotency_key is not None and not callable(idempotency_key):
        raise ConfigurationError(
            "idempotency_key",
            "must be a callable computing the key from the call's arguments in the decorator.",
            "Pass e.g. idempotency_key=lambda order_id: f'order-{order_id}'.",
        )


def _sync_binds(bind: Any) -> list[Engine | Connection]:
    """The sync Engines and Connections an (async) engine or (async_)sessionmaker uses."""
    kw = getattr(bind, "kw", None)
    if isinstance(kw, dict):  # sessionmaker / async_sessionmaker
        binds = kw.get("binds")
        found = [kw.get("bind"), *(binds.values() if isinstance(binds, dict) else ())]
    else:
        found = [bind]
    out: list[Engine | Connection] = []
    for b in found:
        if not isinstance(b, (Engine, Connection)):  # AsyncEngine / AsyncConnection
            b = getattr(b, "sync_connection", None) or getattr(b, "sync_engine", None)
        if isinstance(b, (Engine, Connection)):
            out.append(b)
    return out


def _is_autocommit(bind: Engine | Connection) -> bool:
    """True when connections of ``bind`` run in AUTOCOMMIT isolation (no I/O).

    The level comes from execution options (``engine.execution_options(...)``,
    ``conn.execution_options(...)``) or, failing that, from
    ``create_engine(isolation_level=...)``, which SQLAlchemy keeps on the dialect;
    ``Connection._is_autocommit_isolation()`` reads the same two places.
    """
    level = bind.get_execution_options().get("isolation_level")
    if level is None:
        level = getattr(bind.dialect, "_on_connect_isolation_level", None)
    return isinstance(level, str) and level.upper() == "AUTOCOMMIT"


def _check_transactional(bind: Any, unit: _Unit) -> None:
    """Refuse a bind whose connections would commit every statement on its own.

    A re-run would then repeat writes that were already committed. A read-only
    unit writes nothing, and a unit's own ``isolation_level`` replaces the bind's.
    """
    if unit.read_only or unit.isolation_level is not None:
        return
    if any(_is_autocommit(b) for b in _sync_binds(bind)):
        raise ConfigurationError(
            "isolation_level",
            "the engine (or connection) runs in AUTOCOMMIT isolation: every statement "
            "commits on its own, so a re-run would repeat writes that already committed.",
            "Use an engine without isolation_level='AUTOCOMMIT' (e.g. "
            "engine.execution_options(isolation_level='READ COMMITTED')), pass "
            "isolation_level='READ COMMITTED' to the runner, or read_only=True for a unit "
            "that only reads.",
        )


def _engine_of(bind: Any) -> Engine | None:
    """The sync Engine behind an Engine, AsyncEngine or (async_)sessionmaker, if known."""
    kw = getattr(bind, "kw", None)
    if isinstance(kw, dict):  # sessionmaker / async_sessionmaker
        bind = kw.get("bind")
    bind = getattr(bind, "sync_engine", bind)
    if isinstance(bind, Connection):
        bind = bind.engine
    return bind if isinstance(bind, Engine) else None
