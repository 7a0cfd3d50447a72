"""``create_async_engine`` and ``wrap_async``: genuine AsyncEngines with resilience attached.

An :class:`~sqlalchemy.ext.asyncio.AsyncEngine` is a thin proxy over a
synchronous :class:`~sqlalchemy.engine.Engine`, its ``sync_engine``, whose
driver calls run in greenlets on the event loop. Everything resilient_db
attaches to a sync engine (the pool subclass, the ``do_connect`` and
``handle_error`` listeners, the watchdog) works unchanged on ``sync_engine``:
the same policy, classification, error context, breaker and bulkhead, with
backoff sleeps that await :func:`asyncio.sleep` instead of blocking the loop.

This module adds what only async drivers need:

- aiomysql's ``connect_timeout`` bounds the TCP connect but not the MySQL
  handshake, so a server that accepts and never greets would hang the connect
  for ever: the whole connect is put under ``Timeouts.connect``;
- asyncpg raises ``TimeoutError`` (a ``command_timeout`` the caller set) and
  socket errors bare, past SQLAlchemy's exception wrapping, and a call the
  watchdog cut as a generic ``DBAPIError``: they become
  :class:`sqlalchemy.exc.OperationalError` with their ErrorContext, and a
  timed-out asyncpg connection is aborted at once instead of being closed
  "gracefully" for up to 2 more seconds over the network that went silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as _sa_create_async_engine

from ._compat import spawn
from ._driver_args import engine_kwargs
from ._translate import aiomysql_connect_timeout, call_failure
from .classify import Kind
from .config import Policy, ValidateMode
from .engine import (
    _check_clock,
    _check_policy,
    _fold_pool_kwargs,
    _parse_url,
    _startup_validate,
    _validate_mode,
    policy_of,
    resilience_of,
    wrap,
)
from .errors import ConfigurationError, chain, error_context
from .failover import Failover, Host, Role, split_url

__all__ = ["create_async_engine", "wrap_async"]

_ASYNC_DRIVERS = "postgresql+asyncpg, postgresql+psycopg, mysql+aiomysql or sqlite+aiosqlite"


def create_async_engine(
    url: str | URL,
    *,
    name: str | None = None,
    policy: Policy | None = None,
    validate: ValidateMode | None = None,
    clock: Callable[[], float] | None = None,
    hosts: Sequence[str | tuple[str, int]] | None = None,
    role: Role | None = None,
    breaker: Any = None,
    **kwargs: Any,
) -> AsyncEngine:
    """Create a genuine :class:`~sqlalchemy.ext.asyncio.AsyncEngine` with resilience attached.

    The async twin of :func:`resilient_db.create_engine`: the same ``policy``
    (timeouts, bounded pool, bulkhead, connect retries, circuit breaker), the
    same classified errors with their :class:`~resilient_db.ErrorContext`, and
    the same driver defaults. The URL must name an asyncio driver
    (``postgresql+asyncpg``, ``postgresql+psycopg``, ``mysql+aiomysql``,
    ``sqlite+aiosqlite``). ``kwargs`` go to
    :func:`sqlalchemy.ext.asyncio.create_async_engine` and win over the
    policy's defaults.

    ``validate`` runs the same startup checks as the sync engine, in a worker
    thread with its own event loop; they block the caller for up to
    ``policy.retry.deadline`` seconds, so create engines at import or startup
    time, not inside request handlers. ``clock`` replaces :func:`time.monotonic`
    (tests); ``breaker``: the application's ``pybreaker.CircuitBreaker``.

    ``hosts`` (``["db1:5432", "db2:5432"]``, or libpq-style ``?host=a:5432&host=b:5432``
    in the URL) and ``role`` (``"primary"``, the default, ``"any"`` or
    ``"prefer-standby"``; in the URL ``target_session_attrs``): one logical
    database served by several hosts, as for :func:`resilient_db.create_engine`
    (see :mod:`resilient_db.failover`).
    """
    policy = _check_policy(policy)
    mode = _validate_mode(policy, validate)  # before anything is built or connected
    _check_clock(clock)
    u, host_list, role = split_url(_parse_url(url), hosts, role)
    policy = _fold_pool_kwargs(policy, kwargs)
    kw = engine_kwargs(u, policy, kwargs)
    try:
        engine = _sa_create_async_engine(u, **kw)
    except TypeError as e:
        raise ConfigurationError(
            "create_async_engine",
            f"an argument was rejected by SQLAlchemy: {e}.",
            "Remove or fix it.",
        ) from None
    except sa_exc.ArgumentError as e:
        raise ConfigurationError("create_async_engine", str(e), "Fix the argument.") from None
    except sa_exc.InvalidRequestError:
        raise ConfigurationError(
            "url",
            f"names the driver '{u.get_driver_name()}', which is not an asyncio driver.",
            f"Use {_ASYNC_DRIVERS}, or resilient_db.create_engine() for a sync engine.",
        ) from None
    wrap_async(
        engine,
        name=name,
        policy=policy,
        clock=clock,
        hosts=host_list,
        role=role if host_list is not None else None,
        breaker=breaker,
    )
    fo = _failover_of(engine)
    if fo is not None and mode != "off":
        # validate the server the engine picks, not whichever host is listed first
        chosen = _select(fo, engine, kw["connect_args"])
        if chosen != fo.hosts[0]:
            check = _sa_create_async_engine(u.set(host=chosen.host, port=chosen.port), **kw)
            try:
                wrap_async(check, name=name, policy=policy)
                _startup_validate(check.sync_engine, policy, validate)
            finally:
                check.sync_engine.dispose()  # never connected: nothing to await
            return engine
    _startup_validate(engine.sync_engine, policy, validate)
    return engine


def wrap_async(
    async_engine: AsyncEngine,
    *,
    name: str | None = None,
    policy: Policy | None = None,
    clock: Callable[[], float] | None = None,
    hosts: Sequence[str | tuple[str, int] | Host] | None = None,
    role: Role | None = None,
    breaker: Any = None,
) -> AsyncEngine:
    """Attach resilience to an existing AsyncEngine and return the same object.

    The pool and driver settings the engine was created with are kept; use
    :func:`create_async_engine` to also get resilient_db's safe defaults.
    ``policy_of``, ``breaker_of``, ``hosts_of`` and ``health_async`` accept the
    AsyncEngine. ``hosts``, ``role`` and ``breaker``: as for :func:`create_async_engine`.
    """
    if not isinstance(async_engine, AsyncEngine):
        raise ConfigurationError(
            "engine",
            f"must be a sqlalchemy.ext.asyncio.AsyncEngine, got {type(async_engine).__name__}.",
            "For a sync Engine use resilient_db.wrap().",
        )
    policy = _check_policy(policy)
    sync_engine = async_engine.sync_engine
    # dialect events ignore insert=True: registered before wrap() so that it runs
    # before resilient_db's own do_connect listener, which makes the attempt
    remove = _bound_connect(sync_engine, policy)
    try:
        wrap(
            sync_engine,
            name=name,
            policy=policy,
            clock=clock,
            hosts=hosts,
            role=role,
            breaker=breaker,
        )
    except BaseException:
        remove()
        raise
    # after resilient_db's handle_error listener, which classifies and attaches context
    event.listen(sync_engine, "handle_error", _after_classified)
    return async_engine


# -- failover: the startup check validates the host the engine picks -------------------


def _failover_of(engine: AsyncEngine) -> Failover | None:
    fo = resilience_of(engine).failover
    return fo if isinstance(fo, Failover) else None


def _select(fo: Failover, engine: AsyncEngine, connect_args: dict[str, Any]) -> Host:
    """:meth:`Failover.select` on a worker thread's own event loop.

    The async drivers need an event loop and a greenlet; the caller may be
    running its own loop already (creating an engine inside a coroutine).
    """
    sync_engine = engine.sync_engine
    args = dict(connect_args)
    # select() connects past the do_connect listeners: bound aiomysql's handshake here
    creator = _aiomysql_creator(
        policy_of(engine).timeouts.connect, getattr(sync_engine.dialect, "driver", "")
    )
    if creator is not None:
        args.setdefault("async_creator_fn", creator)
    box: list[Host] = []

    def run() -> None:
        box.append(asyncio.run(spawn(fo.select, sync_engine, args)))

    worker = threading.Thread(target=run, name="resilient-db-select", daemon=True)
    worker.start()
    worker.join()
    return box[0] if box else fo.hosts[0]


# -- aiomysql: the whole connect under the connect timeout ----------------------------


def _bound_connect(engine: Engine, policy: Policy) -> Callable[[], None]:
    """Put aiomysql's whole connect, handshake included, under ``Timeouts.connect``.

    Returns a function that takes the listener off again.
    """
    bounded = _aiomysql_creator(policy.timeouts.connect, getattr(engine.dialect, "driver", ""))
    if bounded is None:
        return lambda: None

    def add_creator(dialect: Any, rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        # SQLAlchemy's documented hook for a custom async connect (async_creator)
        cparams.setdefault("async_creator_fn", bounded)

    event.listen(engine, "do_connect", add_creator)
    return lambda: event.remove(engine, "do_connect", add_creator)


def _aiomysql_creator(timeout: float | None, driver: str) -> Callable[..., Awaitable[Any]] | None:
    """``aiomysql.connect`` under ``timeout``; None for other drivers or no timeout."""
    if timeout is None or driver != "aiomysql":
        return None
    import aiomysql

    def bounded(*args: Any, **kwargs: Any) -> Awaitable[Any]:
        return _connect_within(aiomysql.connect, timeout, args, kwargs)

    return bounded


async def _connect_within(
    connect: Callable[..., Awaitable[Any]],
    timeout: float,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    try:
        return await asyncio.wait_for(connect(*args, **kwargs), timeout)
    except asyncio.TimeoutError:
        # (aiomysql closes the socket when its handshake read is cancelled)
        raise aiomysql_connect_timeout(kwargs.get("host", "localhost")) from None


# -- asyncpg: bare errors, slow "graceful" closes ---------------------------------------


def _after_classified(ctx: Any) -> BaseException | None:
    """``handle_error``: wrap asyncpg's bare errors; abort a timed-out asyncpg connection."""
    orig: BaseException = ctx.original_exception
    found = ctx.sqlalchemy_exception if ctx.sqlalchemy_exception is not None else orig
    _hide_argument_values(found)
    if getattr(ctx, "chained_exception", None) is not None:
        return None  # an earlier listener already replaced the error
    ectx = error_context(found)
    if ectx is None:
        return None  # cancellation, or an error nobody classified
    if ectx.kind == Kind.READ_TIMEOUT.value and ctx.connection is not None:
        _abort_asyncpg(ctx.connection)
    return call_failure(ctx, found, ectx)  # asyncpg's other shapes: OperationalError


# asyncpg encodes bind values itself and quotes the offending one in its error:
# "invalid input for query argument $1: 'value...' (reason)"
_ARGUMENT = "invalid input for query argument"
_ARGUMENT_VALUE = re.compile(
    r"(invalid input for query argument \$\d+(?: in element #\d+ of executemany\(\) "
    r"sequence)?): .*",
    re.DOTALL,
)


def _hide_argument_values(exc: BaseException) -> None:
    """Cut the bind value out of asyncpg's client-side encoding errors (hide_parameters)."""
    hits = [e for e in chain(exc) if _ARGUMENT in _text(e)]
    if not hits:
        return
    reason = "value hidden"
    for e in hits:
        cause = e.__cause__
        if cause is not None and _ARGUMENT not in _text(cause):
            # the encoder's own error may quote the value too: keep only its type
            reason = f"value hidden; {type(cause).__name__}"
            e.__cause__ = None
            e.__suppress_context__ = True
    for e in hits:
        e.args = (_ARGUMENT_VALUE.sub(rf"\1: [{reason}]", _text(e)),)


def _text(e: BaseException) -> str:
    return e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else ""


def _abort_asyncpg(connection: Any) -> None:
    """Abort the transport; SQLAlchemy's invalidation then finds it closed."""
    try:
        driver = connection.connection.driver_connection
    except Exception:
        return
    if type(driver).__module__.startswith("asyncpg"):
        with contextlib.suppress(Exception):
            driver.terminate()
