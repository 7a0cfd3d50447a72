"""The sync call path: :func:`run_transaction` and :func:`transactional`.

One attempt on an Engine or a sessionmaker, and the loop of attempts 2..n over
tenacity's ``Retrying``; every decision is :class:`~._control._Control`'s.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, overload

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Engine

from .. import _backoff
from .. import idempotency as _idem
from ..config import Policy, RetryPolicy
from ..errors import ConfigurationError
from ._binds import _check_args, _check_key_function, _check_transactional
from ._control import _Control
from ._unit import (
    _DUPLICATE,
    _MYSQL,
    _VERIFIED,
    ALREADY_COMMITTED,
    AlreadyCommitted,
    _claim_failed,
    _Try,
    _Unit,
    _warn_escaped,
    logger,
)

if TYPE_CHECKING:
    from typing import Concatenate, ParamSpec, TypeAlias

    from sqlalchemy.orm import sessionmaker

    P = ParamSpec("P")
    SyncBind: TypeAlias = "Engine | sessionmaker[Any]"

T = TypeVar("T")


def _claim(executor: Any, key: str) -> bool:
    """Record ``key`` in the attempt's transaction; False when it was already there."""
    try:
        executor.execute(_idem.claim_statement(), _idem.claim_params(key))
    except sa_exc.DBAPIError as e:
        if _claim_failed(e):
            return False
        raise
    return True


def _close(resource: Any) -> None:
    """Close a Connection or Session without masking the error that got us here."""
    try:
        resource.close()
    except Exception:  # the connection is already invalidated or the server is gone
        logger.debug("closing after a unit-of-work attempt failed", exc_info=True)


def _engine_once(engine: Engine, u: _Unit, t: _Try) -> Any:
    t.phase = "connect"
    conn = engine.connect()
    try:
        t.phase = "execute"
        dialect = engine.dialect.name
        opts = u.options(dialect)
        if opts:
            conn.execution_options(**opts)
        trans = conn.begin()
        if u.read_only and dialect in _MYSQL:
            conn.exec_driver_sql("START TRANSACTION READ ONLY")
        if u.key is not None:
            if not _claim(conn, u.key):
                return _DUPLICATE
            t.claimed = True
        try:
            result = u.fn(conn)
        finally:
            t.escaped = conn.get_transaction() is not trans
        t.result = result
        t.phase = "commit"
        if t.escaped:
            _warn_escaped()
            conn.commit()  # what fn did after its own commit; a no-op without a transaction
        else:
            trans.commit()
        return result
    finally:
        _close(conn)


def _session_once(factory: sessionmaker[Any], u: _Unit, t: _Try) -> Any:
    t.phase = "execute"
    session = factory()
    try:
        trans = session.begin()  # no I/O: the connection is taken on first use
        if u.isolation_level is not None or u.read_only:
            dialect = session.get_bind().dialect.name
            opts = u.options(dialect)
            if opts:
                session.connection(execution_options=opts)
            if u.read_only and dialect in _MYSQL:
                session.execute(text("START TRANSACTION READ ONLY"))
        if u.key is not None:
            if not _claim(session, u.key):
                return _DUPLICATE
            t.claimed = True
        try:
            result = u.fn(session)
            t.result = result
            session.flush()
        finally:
            t.escaped = session.get_transaction() is not trans
        t.phase = "commit"
        if t.escaped:
            _warn_escaped()
        if not t.escaped or session.get_transaction() is not None:
            session.commit()
        return result
    finally:
        _close(session)


def _verify_once(bind: Any, verify: Callable[[Any], Any]) -> bool:
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return bool(verify(conn))
    with bind() as session:
        return bool(verify(session))


def _sync_runner(bind: object) -> Callable[[Any, _Unit, _Try], Any]:
    if isinstance(bind, Engine):
        return _engine_once
    from sqlalchemy.orm import sessionmaker

    if isinstance(bind, sessionmaker):
        return _session_once
    from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

    hint = (
        "Use run_transaction_async / transactional_async for async engines and sessions."
        if isinstance(bind, (AsyncEngine, async_sessionmaker))
        else "Pass the Engine (not a Connection) or a sessionmaker, so that every attempt "
        "can open a fresh transaction."
    )
    raise ConfigurationError(
        "bind", f"must be a sqlalchemy Engine or sessionmaker, got {type(bind).__name__}.", hint
    )


class _SyncLoop:
    """Attempts 2..n of a sync unit of work, driven by tenacity."""

    def __init__(self, ctl: _Control, once: Callable[[Any, _Unit, _Try], Any]) -> None:
        self.ctl = ctl
        self.once = once

    def run(self) -> Any:
        from tenacity import Retrying

        ctl = self.ctl
        _backoff.sleep(ctl.first_pause())
        retrying = Retrying(sleep=_backoff.sleep, **ctl.retrying_kwargs())
        try:
            out = retrying(self.attempt)
        except BaseException as e:
            ctl.give_up(e)
        return ctl.outcome(out)

    def attempt(self) -> Any:
        ctl, unit = self.ctl, self.ctl.unit
        ctl.attempt += 1
        t = _Try()
        try:
            if ctl.pending and unit.verify is not None:
                t.phase = "verify"
                committed = _verify_once(ctl.bind, unit.verify)
                ctl.verified(committed)
                if committed:
                    return _VERIFIED
            return self.once(ctl.bind, unit, t)
        except BaseException as e:
            ctl.retry_ok = ctl.failed(e, t)
            raise


def _run_sync(
    bind: Any,
    fn: Callable[[Any], Any],
    policy: Policy | RetryPolicy | None,
    read_only: bool,
    key: str | None,
    verify: Callable[[Any], Any] | None,
    isolation_level: str | None,
) -> Any:
    _check_args(fn, policy, read_only, key, verify, isolation_level, is_async=False)
    once = _sync_runner(bind)
    unit = _Unit(fn, read_only, key, verify, isolation_level)
    _check_transactional(bind, unit)
    t0 = time.monotonic()
    t = _Try()
    try:
        out = once(bind, unit, t)
    except BaseException as e:
        ctl = _Control(bind, policy, unit, t0)
        if not ctl.failed(e, t):
            err = ctl.final(e)
            if err is e:
                raise
            raise err from e
    else:
        return ALREADY_COMMITTED if out is _DUPLICATE else out
    return _SyncLoop(ctl, once).run()


@overload
def run_transaction(
    bind: SyncBind,
    fn: Callable[[Any], T],
    *,
    policy: Policy | RetryPolicy | None = None,
    read_only: bool = False,
    idempotency_key: None = None,
    verify: Callable[[Any], bool] | None = None,
    isolation_level: str | None = None,
) -> T: ...


@overload
def run_transaction(
    bind: SyncBind,
    fn: Callable[[Any], T],
    *,
    policy: Policy | RetryPolicy | None = None,
    read_only: bool = False,
    idempotency_key: str,
    verify: Callable[[Any], bool] | None = None,
    isolation_level: str | None = None,
) -> T | AlreadyCommitted: ...


def run_transaction(
    bind: SyncBind,
    fn: Callable[[Any], T],
    *,
    policy: Policy | RetryPolicy | None = None,
    read_only: bool = False,
    idempotency_key: str | None = None,
    verify: Callable[[Any], bool] | None = None,
    isolation_level: str | None = None,
) -> T | AlreadyCommitted:
    """Run ``fn`` in a transaction, re-running the whole unit when that is safe.

    ``bind`` is an :class:`~sqlalchemy.engine.Engine` (``fn`` receives a
    Connection inside a transaction) or a :class:`~sqlalchemy.orm.sessionmaker`
    (``fn`` receives a fresh Session per attempt). ``fn`` must not commit; the
    runner commits and returns ``fn``'s result. An attempt in which ``fn``
    committed or rolled back the runner's transaction itself is never re-run
    (its work may be committed); a bind in AUTOCOMMIT isolation raises
    :class:`~resilient_db.ConfigurationError` unless ``read_only=True`` or
    ``isolation_level`` is given.

    - Re-run only when the error's classification (the engine's
      :class:`~resilient_db.ErrorContext`, else :func:`~resilient_db.classify`)
      says the transaction was lost before COMMIT (``RetryLevel.TRANSACTION``
      or ``CONNECT``), with full-jitter backoff, within ``policy.retry.attempts``
      and ``deadline`` (default: the engine's policy, else ``DEFAULT_POLICY``).
      Connect attempts the engine already made count against ``attempts``; an
      exhausted pool (:class:`~resilient_db.PoolExhaustedError`, including
      bulkhead rejections) is never re-run.
    - ``read_only=True``: the transaction is made read-only (PostgreSQL,
      MySQL/MariaDB) and may also be re-run after an ambiguous commit.
    - An ambiguous commit raises :class:`~resilient_db.AmbiguousCommitError`,
      unless ``idempotency_key`` is given (recorded in the same transaction; a
      retry that finds it does not re-run) or ``verify(conn_or_session) -> bool``
      says whether the earlier attempt committed (True: done, False: re-run).
    - With ``idempotency_key``, a key recorded by an earlier call returns
      :data:`ALREADY_COMMITTED` without running ``fn``; a key recorded by an
      ambiguous attempt of this call returns what ``fn`` returned in it.

    The final error is the real one, with an :class:`~resilient_db.ErrorContext`
    giving the attempt number and the history of failure kinds.
    """
    result: T | AlreadyCommitted = _run_sync(
        bind, fn, policy, read_only, idempotency_key, verify, isolation_level
    )
    return result


@overload
def transactional(
    bind: SyncBind,
    *,
    policy: Policy | RetryPolicy | None = None,
    read_only: bool = False,
    idempotency_key: None = None,
    verify: Callable[..., bool] | None = None,
    isolation_level: str | None = None,
) -> Callable[[Callable[Concatenate[Any, P], T]], Callable[P, T]]: ...


@overload
def transactional(
    bind: SyncBind,
    *,
    policy: Policy | RetryPolicy | None = None,
    read_only: bool = False,
    idempotency_key: Callable[..., str],
    verify: Callable[..., bool] | None = None,
    isolation_level: str | None = None,
) -> Callable[[Callable[Concatenate[Any, P], T]], Callable[P, T | AlreadyCommitted]]: ...


def transactional(
    bind: SyncBind,
    *,
    policy: Policy | RetryPolicy | None = None,
    read_only: bool = False,
    idempotency_key: Callable[..., str] | None = None,
    verify: Callable[..., bool] | None = None,
    isolation_level: str | None = None,
) -> Callable[[Callable[Concatenate[Any, P], T]], Callable[P, Any]]:
    """Decorator form of :func:`run_transaction`.

    The decorated function takes the Connection (or Session) first; callers
    pass only the other arguments::

        @transactional(engine, idempotency_key=lambda src, dst, amount, ref: ref)
        def transfer(conn, src, dst, amount, ref): ...

        transfer(1, 2, 100, "transfer-123")

    ``idempotency_key`` and ``verify`` are callables here: the key is computed
    from the call's arguments, and ``verify(conn, *args, **kwargs)`` gets them
    too.
    """
    _check_key_function(idempotency_key)

    def decorate(fn: Callable[Concatenate[Any, P], T]) -> Callable[P, Any]:
        if inspect.iscoroutinefunction(fn):
            raise ConfigurationError(
                "transactional", "decorates a coroutine function.", "Use transactional_async."
            )

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            key = idempotency_key(*args, **kwargs) if idempotency_key is not None else None
            check: Callable[[Any], bool] | None = None
            if verify is not None:
                check = lambda c: verify(c, *args, **kwargs)  # noqa: E731
            return _run_sync(
                bind,
                lambda c: fn(c, *args, **kwargs),
                policy,
                read_only,
                key,
                check,
                isolation_level,
            )

        return wrapper

    return decorate
