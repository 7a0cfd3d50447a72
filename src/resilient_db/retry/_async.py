"""The async call path: :func:`run_transaction_async` and :func:`transactional_async`.

The twin of :mod:`._sync` on an AsyncEngine or an async_sessionmaker, over
tenacity's ``AsyncRetrying``; every decision is :class:`~._control._Control`'s.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable
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

    from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

    P = ParamSpec("P")
    AsyncBind: TypeAlias = "AsyncEngine | async_sessionmaker[Any]"

T = TypeVar("T")


async def _aclaim(executor: Any, key: str) -> bool:
    try:
        await executor.execute(_idem.claim_statement(), _idem.claim_params(key))
    except sa_exc.DBAPIError as e:
        if _claim_failed(e):
            return False
        raise
    return True


async def _aclose(resource: Any) -> None:
    try:
        await resource.close()
    except Exception:
        logger.debug("closing after a unit-of-work attempt failed", exc_info=True)


async def _aengine_once(engine: AsyncEngine, u: _Unit, t: _Try) -> Any:
    t.phase = "connect"
    conn = await engine.connect().start()
    try:
        t.phase = "execute"
        dialect = engine.dialect.name
        opts = u.options(dialect)
        if opts:
            await conn.execution_options(**opts)
        trans = await conn.begin()
        if u.read_only and dialect in _MYSQL:
            await conn.exec_driver_sql("START TRANSACTION READ ONLY")
        if u.key is not None:
            if not await _aclaim(conn, u.key):
                return _DUPLICATE
            t.claimed = True
        try:
            result = await u.fn(conn)
        finally:
            sync = conn.sync_connection
            now = sync.get_transaction() if sync is not None else None
            t.escaped = now is not trans.sync_transaction
        t.result = result
        t.phase = "commit"
        if t.escaped:
            _warn_escaped()
            await conn.commit()
        else:
            await trans.commit()
        return result
    finally:
        await _aclose(conn)


async def _asession_once(factory: async_sessionmaker[Any], u: _Unit, t: _Try) -> Any:
    t.phase = "execute"
    session = factory()
    try:
        sync = session.sync_session
        trans = sync.begin()  # no I/O: the connection is taken on first use
        if u.isolation_level is not None or u.read_only:
            dialect = sync.get_bind().dialect.name
            opts = u.options(dialect)
            if opts:
                await session.connection(execution_options=opts)
            if u.read_only and dialect in _MYSQL:
                await session.execute(text("START TRANSACTION READ ONLY"))
        if u.key is not None:
            if not await _aclaim(session, u.key):
                return _DUPLICATE
            t.claimed = True
        try:
            result = await u.fn(session)
            t.result = result
            await session.flush()
        finally:
            t.escaped = sync.get_transaction() is not trans
        t.phase = "commit"
        if t.escaped:
            _warn_escaped()
        if not t.escaped or sync.get_transaction() is not None:
            await session.commit()
        return result
    finally:
        await _aclose(session)


async def _averify_once(bind: Any, verify: Callable[[Any], Any]) -> bool:
    from sqlalchemy.ext.asyncio import AsyncEngine

    if isinstance(bind, AsyncEngine):
        async with bind.connect() as conn:
            return bool(await verify(conn))
    async with bind() as session:
        return bool(await verify(session))


def _async_runner(bind: object) -> Callable[[Any, _Unit, _Try], Awaitable[Any]]:
    from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

    if isinstance(bind, AsyncEngine):
        return _aengine_once
    if isinstance(bind, async_sessionmaker):
        return _asession_once
    raise ConfigurationError(
        "bind",
        f"must be a sqlalchemy AsyncEngine or async_sessionmaker, got {type(bind).__name__}.",
        "Use run_transaction / transactional for sync engines and sessionmakers."
        if isinstance(bind, Engine)
        else "Pass the AsyncEngine (not an AsyncConnection) or an async_sessionmaker.",
    )


class _AsyncLoop:
    """Attempts 2..n of an async unit of work, driven by tenacity."""

    def __init__(self, ctl: _Control, once: Callable[[Any, _Unit, _Try], Awaitable[Any]]):
        self.ctl = ctl
        self.once = once

    async def run(self) -> Any:
        from tenacity import AsyncRetrying

        ctl = self.ctl
        await _backoff.async_sleep(ctl.first_pause())
        retrying = AsyncRetrying(sleep=_backoff.async_sleep, **ctl.retrying_kwargs())
        try:
            out: Any = await retrying(self.attempt)
        except BaseException as e:
            ctl.give_up(e)
        return ctl.outcome(out)

    async def attempt(self) -> Any:
        ctl, unit = self.ctl, self.ctl.unit
        ctl.attempt += 1
        t = _Try()
        try:
            if ctl.pending and unit.verify is not None:
                t.phase = "verify"
                committed = await _averify_once(ctl.bind, unit.verify)
                ctl.verified(committed)
                if committed:
                    return _VERIFIED
            return await self.once(ctl.bind, unit, t)
        except BaseException as e:
            ctl.retry_ok = ctl.failed(e, t)
            raise


async def _run_async(
    bind: Any,
    fn: Callable[[Any], Awaitable[Any]],
    policy: Policy | RetryPolicy | None,
    read_only: bool,
    key: str | None,
    verify: Callable[[Any], Awaitable[Any]] | None,
    isolation_level: str | None,
) -> Any:
    _check_args(fn, policy, read_only, key, verify, isolation_level, is_async=True)
    once = _async_runner(bind)
    unit = _Unit(fn, read_only, key, verify, isolation_level)
    _check_transactional(bind, unit)
    t0 = time.monotonic()
    t = _Try()
    try:
        out = await once(bind, unit, t)
    except BaseException as e:
        ctl = _Control(bind, policy, unit, t0)
        if not ctl.failed(e, t):
            err = ctl.final(e)
            if err is e:
                raise
            raise err from e
    else:
        return ALREADY_COMMITTED if out is _DUPLICATE else out
    return await _AsyncLoop(ctl, once).run()


@overload
async def run_transaction_async(
    bind: AsyncBind,
    fn: Callable[[Any], Awaitable[T]],
    *,
    policy: Policy | RetryPolicy | None = None,
    read_only: bool = False,
    idempotency_key: None = None,
    verify: Callable[[Any], Awaitable[bool]] | None = None,
    isolation_level: str | None = None,
) -> T: ...


@overload
async def run_transaction_async(
    bind: AsyncBind,
    fn: Callable[[Any], Awaitable[T]],
    *,
    policy: Policy | RetryPolicy | None = None,
    read_only: bool = False,
    idempotency_key: str,
    verify: Callable[[Any], Awaitable[bool]] | None = None,
    isolation_level: str | None = None,
) -> T | AlreadyCommitted: ...


async def run_transaction_async(
    bind: AsyncBind,
    fn: Callable[[Any], Awaitable[T]],
    *,
    policy: Policy | RetryPolicy | None = None,
    read_only: bool = False,
    idempotency_key: str | None = None,
    verify: Callable[[Any], Awaitable[bool]] | None = None,
    isolation_level: str | None = None,
) -> T | AlreadyCommitted:
    """The async twin of :func:`run_transaction`.

    ``bind`` is an :class:`~sqlalchemy.ext.asyncio.AsyncEngine` (``fn`` receives
    an AsyncConnection) or an :class:`~sqlalchemy.ext.asyncio.async_sessionmaker`
    (a fresh AsyncSession per attempt); ``fn`` and ``verify`` are coroutine
    functions. Backoff awaits ``asyncio.sleep``; cancellation is never retried.
    """
    result: T | AlreadyCommitted = await _run_async(
        bind, fn, policy, read_only, idempotency_key, verify, isolation_level
    )
    return result


@overload
def transactional_async(
    bind: AsyncBind,
    *,
    policy: Policy | RetryPolicy | None = None,
    read_only: bool = False,
    idempotency_key: None = None,
    verify: Callable[..., Awaitable[bool]] | None = None,
    isolation_level: str | None = None,
) -> Callable[[Callable[Concatenate[Any, P], Awaitable[T]]], Callable[P, Awaitable[T]]]: ...


@overload
def transactional_async(
    bind: AsyncBind,
    *,
    policy: Policy | RetryPolicy | None = None,
    read_only: bool = False,
    idempotency_key: Callable[..., str],
    verify: Callable[..., Awaitable[bool]] | None = None,
    isolation_level: str | None = None,
) -> Callable[
    [Callable[Concatenate[Any, P], Awaitable[T]]], Callable[P, Awaitable[T | AlreadyCommitted]]
]: ...


def transactional_async(
    bind: AsyncBind,
    *,
    policy: Policy | RetryPolicy | None = None,
    read_only: bool = False,
    idempotency_key: Callable[..., str] | None = None,
    verify: Callable[..., Awaitable[bool]] | None = None,
    isolation_level: str | None = None,
) -> Callable[[Callable[Concatenate[Any, P], Awaitable[T]]], Callable[P, Awaitable[Any]]]:
    """Decorator form of :func:`run_transaction_async`; see :func:`transactional`."""
    _check_key_function(idempotency_key)

    def decorate(fn: Callable[Concatenate[Any, P], Awaitable[T]]) -> Callable[P, Awaitable[Any]]:
        if not (
            inspect.iscoroutinefunction(fn)
            or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004
        ):
            raise ConfigurationError(
                "transactional_async",
                "decorates a plain (sync) function; the runner would await its result.",
                "Declare it with `async def`, or use transactional with a sync Engine.",
            )

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            key = idempotency_key(*args, **kwargs) if idempotency_key is not None else None
            check: Callable[[Any], Awaitable[bool]] | None = None
            if verify is not None:
                check = lambda c: verify(c, *args, **kwargs)  # noqa: E731
            return await _run_async(
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
