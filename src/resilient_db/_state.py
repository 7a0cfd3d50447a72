"""Per-engine state and the registry of resilient engines.

The lowest layer of the runtime: :class:`Resilience` holds what one engine
knows (policy, target, breaker, counters, the last error) and builds the
:class:`~resilient_db.ErrorContext` of its failures; the registry maps a
SQLAlchemy engine to it. Nothing here imports the public façades, so every
other module can import this one.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import QueuePool

from . import _compat
from ._events import Dispatcher, ErrorClassified, deliver
from ._limit import AdaptiveLimit
from ._watchdog import WATCHED_DRIVERS
from .breaker import BreakerSnapshot, CircuitBreaker
from .classify import Classification, Kind, Target
from .config import Policy
from .errors import ConfigurationError, ErrorContext

if TYPE_CHECKING:
    from ._types import EngineLike

__all__ = [
    "EXITS",
    "ConnState",
    "Resilience",
    "breaker_of",
    "breaker_state",
    "conn_state",
    "default_name",
    "is_registered",
    "policy_of",
    "register",
    "resilience_of",
]

#: Never a failure of the database: cancellation and interpreter exits pass through.
EXITS = (asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit)


class ConnState:
    """What resilient_db knows of one pooled DBAPI connection.

    Kept on the pool record (:func:`resilient_db._compat.record_state`), not in its
    ``info``: that dictionary is the application's (``Connection.info``). A new
    connection on the record starts with a new state, as SQLAlchemy clears
    ``info`` when it reconnects a record.
    """

    __slots__ = ("dbapi", "failed", "host", "idle_since", "slot", "t_out")

    def __init__(self) -> None:
        self.slot: Any = None  # the watchdog slot (_deadline.watch_connection)
        self.dbapi: Any = None  # the DBAPI connection the slot watches
        self.failed = False  # this checkout must not count as a success
        self.idle_since: float | None = None  # when it was checked in (Resilience.clock)
        self.t_out: float | None = None  # when it was checked out (telemetry timings)
        self.host: Any = None  # the failover host it is connected to

    def __repr__(self) -> str:
        return f"<resilient_db ConnState slot={self.slot!r} failed={self.failed}>"


def conn_state(record: Any) -> ConnState:
    """The record's :class:`ConnState`, made on first use."""
    st = _compat.record_state(record)
    if st is None:
        st = ConnState()
        _compat.set_record_state(record, st)
    return st  # type: ignore[no-any-return]


class Resilience:
    """The per-engine state: policy, target, breaker, counters."""

    def __init__(
        self,
        engine: Engine,
        name: str,
        policy: Policy,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.policy = policy
        self.target = Target.from_url(engine.url)
        self.clock = clock
        self.is_async = bool(getattr(engine.dialect, "is_async", False))
        self.breaker: CircuitBreaker | None = (
            CircuitBreaker(name, policy.breaker, clock=clock) if policy.breaker.enabled else None
        )
        self.waiting = 0
        self.wait_lock = threading.Lock()
        self.last_error: ErrorContext | None = None
        self.connect_attempts = 0
        # half-open probe tokens by the pool record carrying them (not in its ConnState:
        # a reconnect of the record starts a new one)
        self.probes: dict[Any, int] = {}
        # called before each connect attempt; resilient_db.testing.FaultInjector raises here
        self.connect_faults: list[Callable[[], None]] = []
        self.pool_timeouts = 0
        driver = getattr(engine.dialect, "driver", None)
        self.watch = policy.timeouts.call is not None and driver in WATCHED_DRIVERS
        self.slow_call = policy.breaker.slow_call if self.breaker is not None else None
        # copied out of the policy for the checkout hot path
        # the bulkhead needs QueuePool's counters; other pools never make callers wait
        self.max_waiters = policy.pool.max_waiters if isinstance(engine.pool, QueuePool) else None
        # an embedded SQLite connection cannot go stale while idle
        self.ping_after_idle = (
            None if engine.dialect.name == "sqlite" else policy.pool.ping_after_idle
        )
        # the adaptive concurrency limit (resilient_db._limit.AdaptiveLimit), or None
        # (a QueuePool's: its size and overflow bound the limit; wrap() keeps the engine's pool)
        self.limit: AdaptiveLimit | None = None
        if policy.pool.adaptive and isinstance(engine.pool, QueuePool):
            most = engine.pool.size() + max(0, _compat.max_overflow(engine.pool))
            self.limit = AdaptiveLimit(most, name=name)
        self.open_verdict: Classification | None = None
        self.dialect = engine.dialect
        # what the runtime reports goes to these subscribers (_events.py)
        self.events = Dispatcher()
        #: Wall-clock time the database last answered (a connect or a health ping).
        self.last_ok: float | None = None
        # resilient_db.telemetry.EngineTelemetry (set by telemetry.attach); `timing` is
        # the same object, set only while per-call timings are on (the hot path checks it)
        self.telemetry: Any = None
        self.timing: Any = None
        # the telemetry timing each execute (db.client.operation.duration), or None
        self.exec_timer: Any = None
        self.pymysql = driver == "pymysql"
        #: the dialect's driver name ("psycopg", "pymysql", ...), or None
        self.driver: str | None = driver
        # host selection of a multi-host engine (resilient_db.failover.attach sets it)
        self.failover: Any = None
        # the silence detector and probe (resilient_db._probe.Monitor), or None
        self.monitor: Any = None

    def context(
        self,
        c: Classification,
        *,
        phase: str,
        attempt: int = 1,
        elapsed: float = 0.0,
        history: tuple[str, ...] = (),
        retry_in: float | None = None,
        diagnosis: str | None = None,
        extra: tuple[tuple[str, Any], ...] = (),
        target: Target | None = None,
    ) -> ErrorContext:
        """Build the error context for a classified failure of this engine.

        Pure: nothing is counted or remembered; the hooks that raise the failure
        call :meth:`record_error` too. ``target`` names the host actually tried
        (multi-host engines); default: the URL's.
        """
        return ErrorContext.for_target(
            self.name,
            target or self.target,
            c,
            phase=phase,
            attempt=attempt,
            elapsed=round(elapsed, 6),
            breaker_state=self.breaker.state if self.breaker is not None else None,
            history=history,
            retry_in=retry_in,
            extra=extra,
            **({} if diagnosis is None else {"diagnosis": diagnosis}),
        )

    def record_error(self, c: Classification, ctx: ErrorContext) -> ErrorContext:
        """A failure of this engine is being raised: remember it and report it."""
        if c.kind is not Kind.CIRCUIT_OPEN:
            self.last_error = ctx
        handlers = self.events.get(ErrorClassified)
        if handlers:
            deliver(handlers, ErrorClassified(self.name, c, ctx))
        return ctx

    def answered(self) -> None:
        """The database answered (a connect or a health ping succeeded)."""
        self.last_ok = time.time()


_REGISTRY: weakref.WeakKeyDictionary[Engine, Resilience] = weakref.WeakKeyDictionary()


def default_name(url: URL) -> str:
    """The engine name used when none is given: ``backend:host/database``."""
    t = url.get_backend_name()
    if t == "sqlite":
        return f"sqlite:{url.database or 'memory'}"
    return f"{t}:{url.host or 'localhost'}/{url.database or ''}"


def register(engine: Engine, r: Resilience) -> None:
    """Record that ``engine`` runs with ``r`` (wrap() checks :func:`is_registered` first)."""
    _REGISTRY[engine] = r


def is_registered(engine: Engine) -> bool:
    """True when ``engine`` is a resilient engine."""
    return engine in _REGISTRY


def resilience_of(engine: EngineLike) -> Resilience:
    """The resilience state of a wrapped engine (Engine, AsyncEngine or Connection)."""
    inner: Any = getattr(engine, "sync_engine", engine)
    e: Any = getattr(inner, "engine", inner)  # a Connection's engine
    r = _REGISTRY.get(e) if isinstance(e, Engine) else None
    if r is None and isinstance(e, Engine):
        proxied = _compat.proxied_engine(e)  # Engine.execution_options() copies
        r = _REGISTRY.get(proxied) if proxied is not None else None
    if r is None:
        raise ConfigurationError(
            "engine",
            "is not a resilient_db engine.",
            "Create it with resilient_db.create_engine() or wrap it with resilient_db.wrap().",
        )
    return r


def policy_of(engine: EngineLike) -> Policy:
    """The :class:`Policy` an engine runs with."""
    return resilience_of(engine).policy


def breaker_of(engine: EngineLike) -> CircuitBreaker:
    """The engine's circuit breaker: ``snapshot()``, ``force_open()``, ``reset()``..."""
    b = resilience_of(engine).breaker
    if b is None:
        raise ConfigurationError(
            "policy.breaker.enabled", "is False for this engine.", "Enable the breaker."
        )
    return b


def breaker_state(engine: EngineLike) -> BreakerSnapshot | None:
    """A snapshot of the engine's breaker, or None when it has none."""
    b = resilience_of(engine).breaker
    return b.snapshot() if b is not None else None
