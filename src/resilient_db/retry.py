"""Retry whole units of work: :func:`run_transaction`, :func:`transactional` and async twins.

A unit of work is a function that does its reads and writes on the Connection
(or Session) it is given and does not commit. The runner gives every attempt a
fresh transaction (and a fresh Session), commits it, and re-runs the whole
function only when the error's classification (the engine's
:class:`~resilient_db.ErrorContext` when it attached one, else
:func:`~resilient_db.classify`) says the transaction was lost and nothing was
committed: serialization failures, deadlocks, lock timeouts (after a rollback),
disconnects and terminated sessions before COMMIT, failed connects.
Application errors, statement timeouts, configuration errors, an open circuit
breaker, an exhausted pool and cancellation are raised at once.

Connect attempts the engine already made count against the unit's attempts,
so a refused connection is tried ``attempts`` times, not ``attempts**2``. A
unit is never re-run once its work may have been committed: an engine in
AUTOCOMMIT isolation is refused up front (unless ``read_only=True``), and an
attempt in which ``fn`` committed or rolled back the runner's transaction
itself is not retried.

An ambiguous commit (the connection died while COMMIT was in flight) is never
re-run blindly: it raises :class:`~resilient_db.AmbiguousCommitError` unless the
unit carries an ``idempotency_key`` (see :mod:`resilient_db.idempotency`) or a
``verify`` callback that settles whether the earlier attempt committed.

The first attempt runs plainly; tenacity's ``Retrying`` is built only after a
failure worth retrying, so the happy path costs what ``engine.begin()`` costs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeVar, overload

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from . import _backoff
from . import idempotency as _idem
from .classify import Classification, Kind, RetryLevel, Target, classify
from .config import DEFAULT_POLICY, Policy, RetryPolicy
from .errors import _CONTEXT_ATTR, AmbiguousCommitError, ConfigurationError, ErrorContext, attach

if TYPE_CHECKING:
    from typing import Concatenate, ParamSpec, TypeAlias

    from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
    from sqlalchemy.orm import sessionmaker

    from ._hooks import Resilience

    P = ParamSpec("P")
    SyncBind: TypeAlias = "Engine | sessionmaker[Any]"
    AsyncBind: TypeAlias = "AsyncEngine | async_sessionmaker[Any]"

__all__ = [
    "ALREADY_COMMITTED",
    "AlreadyCommitted",
    "run_transaction",
    "run_transaction_async",
    "transactional",
    "transactional_async",
]

T = TypeVar("T")

logger = logging.getLogger("resilient_db.retry")


class AlreadyCommitted(enum.Enum):
    """Type of :data:`ALREADY_COMMITTED`."""

    ALREADY_COMMITTED = "already_committed"

    def __repr__(self) -> str:
        return "resilient_db.ALREADY_COMMITTED"


#: Returned instead of the function's result when the unit's idempotency key
#: was already recorded by an earlier call: the work is done and was not re-run.
ALREADY_COMMITTED: Final = AlreadyCommitted.ALREADY_COMMITTED


class _Marker(enum.Enum):
    MISSING = 0  # no result recorded
    DUPLICATE = 1  # the idempotency key exists: committed earlier
    VERIFIED = 2  # verify() said the ambiguous attempt committed


_MISSING: Final = _Marker.MISSING
_DUPLICATE: Final = _Marker.DUPLICATE
_VERIFIED: Final = _Marker.VERIFIED

_MYSQL = ("mysql", "mariadb")
# Bare exceptions count as database errors only when raised inside these packages.
_DB_PACKAGES = frozenset(
    {"sqlalchemy", "asyncpg", "psycopg", "psycopg2", "pymysql", "aiomysql", "aiosqlite", "sqlite3"}
)


# -- the unit and one attempt --------------------------------------------------------


class _Unit:
    """What to run, and how; built once per call."""

    __slots__ = ("fn", "isolation_level", "key", "read_only", "verify")

    def __init__(
        self,
        fn: Callable[[Any], Any],
        read_only: bool,
        key: str | None,
        verify: Callable[[Any], Any] | None,
        isolation_level: str | None,
    ) -> None:
        self.fn = fn
        self.read_only = read_only
        self.key = key
        self.verify = verify
        self.isolation_level = isolation_level

    def options(self, dialect_name: str) -> dict[str, Any] | None:
        """Execution options to set on the attempt's connection before BEGIN."""
        if self.isolation_level is None and not self.read_only:
            return None
        opts: dict[str, Any] = {}
        if self.isolation_level is not None:
            opts["isolation_level"] = self.isolation_level
        if self.read_only and dialect_name == "postgresql":
            opts["postgresql_readonly"] = True
        return opts or None


class _Try:
    """One attempt's progress: where it failed and what ``fn`` returned."""

    __slots__ = ("claimed", "escaped", "phase", "result")

    def __init__(self) -> None:
        self.phase = "connect"
        self.result: Any = _MISSING
        self.claimed = False
        # fn committed or rolled back the runner's transaction: its work may be committed
        self.escaped = False


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


def _warn_escaped() -> None:
    logger.warning(
        "A unit of work committed or rolled back the runner's transaction itself; the "
        "runner committed what it left, and will not re-run such an attempt after a failure. "
        "Let the runner commit.",
        extra={"resilient_db": {"event": "unit_ended_transaction"}},
    )


def _claim_failed(exc: BaseException) -> bool:
    """True when the key insert failed because the key exists; re-raise otherwise."""
    if isinstance(exc, sa_exc.IntegrityError):
        return True
    if isinstance(exc, sa_exc.DBAPIError) and _idem.is_missing_table(exc):
        raise _idem.missing_table_error() from exc
    return False


# -- sync attempts ---------------------------------------------------------------------


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


# -- async attempts --------------------------------------------------------------------


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


# -- decisions (pure, shared by both runners) --------------------------------------------


def _engine_of(bind: Any) -> Engine | None:
    """The sync Engine behind an Engine, AsyncEngine or (async_)sessionmaker, if known."""
    kw = getattr(bind, "kw", None)
    if isinstance(kw, dict):  # sessionmaker / async_sessionmaker
        bind = kw.get("bind")
    bind = getattr(bind, "sync_engine", bind)
    if isinstance(bind, Connection):
        bind = bind.engine
    return bind if isinstance(bind, Engine) else None


def _from_database(exc: BaseException) -> bool:
    """True for SQLAlchemy errors, and bare socket/timeout errors raised by a driver.

    asyncpg lets some socket errors through unwrapped; an ``OSError`` raised by
    the application's own code (an HTTP call inside the unit) is not retried.
    """
    if isinstance(exc, sa_exc.SQLAlchemyError):
        return True
    if not isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError)):
        return False
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if isinstance(module, str) and module.partition(".")[0] in _DB_PACKAGES:
            return True
        tb = tb.tb_next
    return False


def _own_context(exc: BaseException) -> ErrorContext | None:
    """The context attached to ``exc`` itself (never one of its causes')."""
    ctx = getattr(exc, _CONTEXT_ATTR, None)
    return ctx if isinstance(ctx, ErrorContext) else None


def _judged(c: Classification, ctx: ErrorContext | None) -> Classification:
    """``c`` with the retry level the engine recorded in ``ctx``, when there is one.

    The engine knows more than the error: a multi-host engine re-routes a write
    refused by a demoted primary and records that it may be re-run.
    """
    if ctx is None or ctx.retry == c.retry.value:
        return c
    try:
        return dataclasses.replace(c, retry=RetryLevel(ctx.retry))
    except ValueError:  # pragma: no cover - contexts are built from RetryLevel values
        return c


_ESCAPED = (
    "Not re-run: the unit of work committed or rolled back the runner's transaction "
    "itself, so some of its writes may already be committed. Let the runner commit."
)


class _Control:
    """State of a unit of work after its first failure; decides and annotates."""

    def __init__(
        self, bind: Any, policy: Policy | RetryPolicy | None, unit: _Unit, t0: float
    ) -> None:
        engine = _engine_of(bind)
        r: Resilience | None = None
        if engine is not None:
            from .engine import resilience_of

            try:
                r = resilience_of(engine)
            except ConfigurationError:  # a plain SQLAlchemy engine
                r = None
        self.r = r
        if isinstance(policy, RetryPolicy):
            self.policy = policy
        elif isinstance(policy, Policy):
            self.policy = policy.retry
        else:
            self.policy = r.policy.retry if r is not None else DEFAULT_POLICY.retry
        if r is not None:
            self.target, self.name = r.target, r.name
        elif engine is not None:
            from .engine import _default_name

            self.target, self.name = Target.from_url(engine.url), _default_name(engine.url)
        else:
            self.target, self.name = Target(), "unknown"
        self.bind = bind
        self.unit = unit
        self.t0 = t0
        self.attempt = 1
        self.history: list[str] = []
        self.pending = 0  # number of the attempt whose COMMIT outcome is unknown, or 0
        self.ambiguous_result: Any = _MISSING
        self.last_exc: BaseException | None = None
        self.last_c: Classification | None = None
        self.last_phase = "execute"
        self.escaped = False
        self.retry_ok = False

    # -- per failure -----------------------------------------------------------

    def failed(self, exc: BaseException, t: _Try) -> bool:
        """Record a failed attempt; True when re-running the unit is safe."""
        if t.claimed:  # this attempt inserted the key: no earlier attempt committed
            self.pending, self.ambiguous_result = 0, _MISSING
        self.last_exc, self.last_phase, self.last_c = exc, t.phase, None
        self.escaped = t.escaped
        if not isinstance(exc, Exception):  # cancellation, KeyboardInterrupt, SystemExit
            self.history.append(Kind.CANCELLED.value)
            return False
        if isinstance(exc, ConfigurationError):
            self.history.append(Kind.CONFIGURATION.value)
            return False
        if not _from_database(exc):
            self.history.append(Kind.APPLICATION.value)
            return False
        phase = "execute" if t.phase == "verify" else t.phase
        ctx = _own_context(exc)
        c = _judged(classify(exc, phase=phase, target=self.target), ctx)
        self.last_c = c
        if ctx is not None and ctx.phase == "connect" and ctx.history:
            # the engine already retried the connect: those attempts count against
            # the unit's, so a refused connection is tried `attempts` times in all
            self.history.extend(ctx.history)
            self.attempt += max(1, ctx.attempt) - 1
        else:
            label = ctx.kind if ctx is not None else c.kind.value
            code = ctx.code if ctx is not None else c.code
            self.history.append(f"{label}:{code}" if code else label)
        if c.kind is Kind.AMBIGUOUS_COMMIT:
            if self.unit.read_only and not t.escaped:  # nothing was written: re-run
                return True
            self.pending, self.ambiguous_result = self.attempt, t.result
            return (self.unit.key is not None or self.unit.verify is not None) and not t.escaped
        if t.escaped or c.kind is Kind.POOL_EXHAUSTED:
            # work may be committed; or the pool (or its bulkhead) is shedding load,
            # which a re-run would only add to
            return False
        return c.retry is not RetryLevel.NEVER

    def verified(self, committed: bool) -> None:
        """``verify`` settled the pending ambiguous commit."""
        if not committed:
            self.pending, self.ambiguous_result = 0, _MISSING
        logger.info(
            "Unit of work on %s: verify() says the ambiguous attempt %s.",
            self.name,
            "committed" if committed else "did not commit; re-running",
            extra=self._extra("ambiguous_verified", committed=committed),
        )

    def outcome(self, out: Any) -> Any:
        """Map an attempt's return value to the caller's result."""
        if out is _DUPLICATE or out is _VERIFIED:
            result = self.ambiguous_result
            if out is _DUPLICATE:
                logger.info(
                    "Unit of work on %s: its idempotency key was already recorded; not re-run.",
                    self.name,
                    extra=self._extra("already_committed", resolved=result is not _MISSING),
                )
            return ALREADY_COMMITTED if result is _MISSING else result
        return out

    # -- scheduling ------------------------------------------------------------

    def first_pause(self) -> float | None:
        """The sleep before attempt 2, or None when attempts or deadline are used up."""
        p = self.policy
        pause = _backoff.backoff(p, 1)
        if self.attempt >= p.attempts or time.monotonic() - self.t0 + pause >= p.deadline:
            return None
        self._log_retry(pause)
        return pause

    def retrying_kwargs(self) -> dict[str, Any]:
        """tenacity arguments for attempts 2..n (the first attempt ran outside tenacity)."""
        from tenacity import retry_if_exception, stop_before_delay, wait_random_exponential
        from tenacity.stop import stop_base

        ctl = self

        class _Spent(stop_base):
            # attempts are counted by the unit, which adds the engine's connect attempts
            def __call__(self, retry_state: Any) -> bool:
                return ctl.attempt >= ctl.policy.attempts

        p = self.policy
        remaining = max(0.0, p.deadline - (time.monotonic() - self.t0))
        return {
            "retry": retry_if_exception(self._should_retry),
            "stop": _Spent() | stop_before_delay(remaining),
            # tenacity's n-th wait is our attempt n+1's: initial * 2**n, capped, full jitter
            "wait": wait_random_exponential(multiplier=p.initial * 2, max=p.max_backoff),
            "before_sleep": self._before_sleep,
            "reraise": True,
        }

    def _should_retry(self, exc: BaseException) -> bool:
        return exc is self.last_exc and self.retry_ok

    def _before_sleep(self, state: Any) -> None:
        self._log_retry(float(state.upcoming_sleep))

    def _log_retry(self, pause: float) -> None:
        last = self.history[-1] if self.history else "?"
        if self.r is not None and self.last_c is not None:
            tel = getattr(self.r, "telemetry", None)
            retried = getattr(tel, "retried", None)
            if callable(retried):
                try:
                    retried(self.last_c, "transaction")
                except Exception:  # telemetry never breaks a retry
                    logger.debug("telemetry failed", exc_info=True)
        logger.info(
            "Unit of work on %s: attempt %d failed (%s); re-running in %.3fs.",
            self.name,
            self.attempt,
            last,
            pause,
            extra=self._extra("unit_retry", attempt=self.attempt, kind=last, retry_in=pause),
        )

    def _extra(self, event: str, **fields: Any) -> dict[str, Any]:
        return {"resilient_db": {"event": event, "engine": self.name, **fields}}

    # -- the final error -------------------------------------------------------

    def give_up(self, exc: BaseException) -> NoReturn:
        """Raise the final error for ``exc`` (annotated; never tenacity's RetryError)."""
        err = self.final(exc)
        if err is exc:
            raise exc
        raise err from exc

    def final(self, exc: BaseException) -> BaseException:
        """The error the caller sees, carrying attempt, elapsed time and history."""
        if not isinstance(exc, Exception):
            return exc  # cancellation is passed through untouched
        c = self.last_c if exc is self.last_exc else None
        elapsed = time.monotonic() - self.t0
        fields = {
            "attempt": self.attempt,
            "elapsed": round(elapsed, 6),
            "history": tuple(self.history),
        }
        ambiguous_here = c is not None and c.kind is Kind.AMBIGUOUS_COMMIT
        if self.pending and not isinstance(exc, AmbiguousCommitError):
            return self._ambiguous(exc, c, fields, ambiguous_here)
        if c is None:  # an application error: leave it alone unless it was a replay
            if self.attempt > 1:
                attach(exc, self._plain_context(None, fields))
            return exc
        base = _own_context(exc) or self._context(c)
        if self.escaped and exc is self.last_exc:
            diagnosis = f"{base.diagnosis} {_ESCAPED}" if base.diagnosis else _ESCAPED
            fields = {**fields, "retry": RetryLevel.NEVER.value, "diagnosis": diagnosis}
        attach(exc, dataclasses.replace(base, **fields))  # type: ignore[arg-type]
        return exc

    def _ambiguous(
        self, exc: BaseException, c: Classification | None, fields: dict[str, Any], here: bool
    ) -> AmbiguousCommitError:
        # what classify() says of any connection lost during COMMIT, with this error's code
        lost = classify(TimeoutError("commit"), phase="commit", target=self.target)
        verdict = dataclasses.replace(lost, code=c.code if c else None)
        if here:
            message = f"Engine '{self.name}': {verdict.diagnosis} (cause: {type(exc).__name__})"
        else:
            last = self.history[-1] if self.history else "?"
            message = (
                f"Engine '{self.name}': the outcome of attempt {self.pending} is unknown: the "
                f"connection was lost while its COMMIT was in flight, and the retries could "
                f"not settle it (attempt {self.attempt} failed with {last}). Verify before "
                f"re-running."
            )
        ctx = dataclasses.replace(self._context(verdict, phase="commit"), **fields)
        return AmbiguousCommitError(message, ctx)

    def _context(self, c: Classification, phase: str | None = None) -> ErrorContext:
        phase = phase or ("execute" if self.last_phase == "verify" else self.last_phase)
        if self.r is not None:
            return self.r.context(c, phase=phase)
        return self._plain_context(c, {}, phase=phase)

    def _plain_context(
        self, c: Classification | None, fields: dict[str, Any], phase: str = "execute"
    ) -> ErrorContext:
        t = self.target
        ctx = ErrorContext(
            engine=self.name,
            dialect=t.dialect,
            driver=t.driver,
            host=t.host,
            port=t.port,
            database=t.database,
            user=t.user,
            phase=phase,
            code=c.code if c is not None else None,
            kind=(c.kind if c is not None else Kind.APPLICATION).value,
            retry=RetryLevel.NEVER.value if c is None else c.retry.value,
            diagnosis=c.diagnosis if c is not None else "",
        )
        return dataclasses.replace(ctx, **fields) if fields else ctx


# -- the sync runner ---------------------------------------------------------------------


class _SyncLoop:
    """Attempts 2..n of a sync unit of work, driven by tenacity."""

    def __init__(self, ctl: _Control, once: Callable[[Any, _Unit, _Try], Any]) -> None:
        self.ctl = ctl
        self.once = once

    def run(self) -> Any:
        from tenacity import Retrying

        ctl = self.ctl
        pause = ctl.first_pause()
        if pause is None:
            assert ctl.last_exc is not None
            ctl.give_up(ctl.last_exc)
        _backoff.sleep(pause)
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


# -- the async runner --------------------------------------------------------------------


class _AsyncLoop:
    """Attempts 2..n of an async unit of work, driven by tenacity."""

    def __init__(self, ctl: _Control, once: Callable[[Any, _Unit, _Try], Awaitable[Any]]):
        self.ctl = ctl
        self.once = once

    async def run(self) -> Any:
        from tenacity import AsyncRetrying

        ctl = self.ctl
        pause = ctl.first_pause()
        if pause is None:
            assert ctl.last_exc is not None
            ctl.give_up(ctl.last_exc)
        await _backoff.async_sleep(pause)
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


# -- public API --------------------------------------------------------------------------


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
    if idempotency_key is not None and not callable(idempotency_key):
        raise ConfigurationError(
            "idempotency_key",
            "must be a callable computing the key from the call's arguments in the decorator.",
            "Pass e.g. idempotency_key=lambda order_id: f'order-{order_id}'.",
        )

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
    if idempotency_key is not None and not callable(idempotency_key):
        raise ConfigurationError(
            "idempotency_key",
            "must be a callable computing the key from the call's arguments in the decorator.",
            "Pass e.g. idempotency_key=lambda order_id: f'order-{order_id}'.",
        )

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
