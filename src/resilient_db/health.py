"""Health snapshots for readiness probes.

:func:`health` reads what the engine already knows (breaker, pool, last error,
last time the database answered) without I/O. With ``ping=True`` it also
checks out a pooled connection and pings it within ``timeout`` seconds:

- the ping is an ordinary checkout (the pool and the breaker see it like any
  other), plus the dialect's ping, whose failure is classified but not counted
  by the breaker;
- it is skipped while the breaker is open (the snapshot says ``down`` without
  touching the failing database) and while the pool has no free connection
  (``degraded``: a readiness probe must not queue behind the application);
- a sync ping runs in a helper thread so the deadline holds even on a
  blackholed network; at most one ping per engine is in flight: a sync call
  that finds the previous ping still running reports it failed, an async call
  that finds one in flight awaits that ping (within its own ``timeout``)
  instead of checking out another connection.

Status: ``down`` when the breaker is open or the ping failed; ``degraded``
when the breaker is half-open or has counted recent failures, the pool is
saturated, or the breaker's shared state (:func:`~resilient_db.share_breaker`)
is unreachable and the replica runs on its local breaker; ``ok`` otherwise.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import Pool, QueuePool

from ._compat import base_pool_class, no_free_connection
from ._compat import max_overflow as pool_max_overflow
from ._deadline import slot_of
from ._state import resilience_of
from .breaker import BreakerSnapshot
from .classify import classify
from .errors import ConfigurationError, ErrorContext, error_context

if TYPE_CHECKING:
    from ._types import EngineLike

__all__ = ["HealthSnapshot", "PoolStats", "health", "health_async", "pool_stats"]

OK = "ok"
DEGRADED = "degraded"
DOWN = "down"


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A pool's counters; ``None`` where the pool class keeps none (e.g. NullPool)."""

    kind: str
    size: int | None
    checked_in: int | None
    checked_out: int | None
    overflow: int | None
    max: int | None
    waiting: int

    @property
    def saturated(self) -> bool:
        """True when callers are waiting or every allowed connection is in use."""
        if self.waiting > 0:
            return True
        return (
            self.max is not None and self.checked_out is not None and self.checked_out >= self.max
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the stats as a JSON-serialisable dict."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    """One engine's health at ``checked_at`` (wall-clock seconds since the epoch).

    ``last_success`` is when the database last answered a connect or a health
    ping; ``ping_ok`` is None when no ping ran. ``reasons`` explain a status
    other than ``ok`` in operator terms.
    """

    status: str
    engine: str
    checked_at: float
    reasons: tuple[str, ...]
    breaker: BreakerSnapshot | None
    pool: PoolStats
    last_error: ErrorContext | None
    last_success: float | None
    ping_ok: bool | None = None
    ping_seconds: float | None = None
    #: The shared breaker store's status (``kind``, ``ok``, ``error``...), or None.
    breaker_store: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """True unless the status is ``down`` (``degraded`` still serves)."""
        return self.status != DOWN

    @property
    def diagnosis(self) -> str | None:
        """The last error's diagnosis, if any."""
        return self.last_error.diagnosis if self.last_error is not None else None

    def to_dict(self) -> dict[str, Any]:
        """Return the snapshot as a JSON-serialisable dict (``breaker_store`` when shared)."""
        data = {
            "status": self.status,
            "engine": self.engine,
            "checked_at": self.checked_at,
            "reasons": list(self.reasons),
            "breaker": self.breaker.to_dict() if self.breaker is not None else None,
            "pool": self.pool.to_dict(),
            "last_error": self.last_error.to_dict() if self.last_error is not None else None,
            "diagnosis": self.diagnosis,
            "last_success": self.last_success,
            "last_success_age": (
                round(self.checked_at - self.last_success, 3)
                if self.last_success is not None
                else None
            ),
            "ping_ok": self.ping_ok,
            "ping_seconds": self.ping_seconds,
        }
        if self.breaker_store is not None:
            data["breaker_store"] = dict(self.breaker_store)
        return data


def pool_stats(pool: Pool, r: Any) -> PoolStats:
    """Read ``pool``'s counters (``r``: the engine's Resilience, for the waiters)."""
    waiting = int(getattr(r, "waiting", 0))
    kind = base_pool_class(pool).__name__
    if isinstance(pool, QueuePool):
        size = pool.size()
        max_overflow = pool_max_overflow(pool)
        return PoolStats(
            kind=kind,
            size=size,
            checked_in=pool.checkedin(),
            checked_out=pool.checkedout(),
            overflow=max(0, pool.overflow()),
            max=size + max_overflow if max_overflow >= 0 else None,
            waiting=waiting,
        )
    return PoolStats(kind, None, None, None, None, None, waiting)


def _engine_and_resilience(engine: EngineLike, timeout: float = 1.0) -> tuple[Any, Any]:
    if not isinstance(getattr(engine, "sync_engine", engine), (Engine, Connection)):
        raise ConfigurationError(
            "engine",
            f"must be a resilient_db Engine, Connection or AsyncEngine, got "
            f"{type(engine).__name__}.",
            "Pass the engine resilient_db.create_engine() returned.",
        )
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ConfigurationError(
            "timeout", f"must be a positive number of seconds, got {timeout!r}.", "Pass e.g. 1."
        )

    r = resilience_of(engine)
    sync = getattr(engine, "sync_engine", engine)
    return getattr(sync, "engine", sync), r


def _snapshot(
    sync: Any,
    r: Any,
    *,
    ping_ok: bool | None = None,
    ping_seconds: float | None = None,
    ping_reason: str | None = None,
) -> HealthSnapshot:
    b = r.breaker.snapshot() if r.breaker is not None else None
    stats = pool_stats(sync.pool, r)
    reasons: list[str] = []
    status = OK
    unreachable = r.monitor.unreachable if r.monitor is not None else None
    if b is not None and b.state == "open":
        status = DOWN
        why = "forced open by an operator" if b.forced else (b.last_failure or "open")
        reasons.append(f"circuit breaker open: {why}")
    elif unreachable is not None:
        status = DOWN  # a probe found it silent; the breaker is half-open or disabled
        reasons.append(f"database unreachable: {unreachable}")
    if ping_ok is False:
        status = DOWN
    if ping_reason:
        reasons.append(ping_reason)
    shared = getattr(r.breaker, "shared", None)
    store = shared.status() if shared is not None and hasattr(shared, "status") else None
    if store is not None and not store.get("ok", True):
        reasons.append(
            f"shared breaker state unavailable ({store.get('kind')}: {store.get('error')}): "
            "running on the local circuit breaker"
        )
    if status != DOWN:
        if store is not None and not store.get("ok", True):
            status = DEGRADED
        if b is not None and b.state == "half-open":
            status = DEGRADED
            reasons.append("circuit breaker half-open: probing the database")
        elif b is not None and b.consecutive_failures:
            status = DEGRADED
            reasons.append(
                f"{b.consecutive_failures} consecutive failure(s) counted by the breaker"
            )
        if stats.saturated:
            status = DEGRADED
            reasons.append(
                f"pool saturated: {stats.checked_out} of {stats.max} connections in use, "
                f"{stats.waiting} caller(s) waiting"
            )
    return HealthSnapshot(
        status=status,
        engine=r.name,
        checked_at=time.time(),
        reasons=tuple(reasons),
        breaker=b,
        pool=stats,
        last_error=r.last_error,
        last_success=r.last_ok,
        ping_ok=ping_ok,
        ping_seconds=ping_seconds,
        breaker_store=store,
    )


def _skip_reason(sync: Any, r: Any) -> str | None:
    """Why a ping must not run now (breaker open, pool saturated), or None."""
    b = r.breaker
    if b is not None and b.state == "open":
        retry_in = b.retry_in()  # 0: the ping may be the half-open probe
        if retry_in is None or retry_in > 0.0:
            return "ping skipped: circuit breaker open"
    if r.waiting or no_free_connection(sync.pool):
        return "ping skipped: no free pooled connection"
    return None


def _failure(r: Any, exc: BaseException) -> str:
    ctx = error_context(exc)
    if ctx is None:
        # a raw ping's error passed no hook: this is where the failure is seen
        c = classify(exc, phase="ping", target=r.target)
        ctx = r.record_error(c, r.context(c, phase="ping"))
    return f"ping failed ({ctx.kind}): {ctx.diagnosis}"


_INFLIGHT: weakref.WeakKeyDictionary[Any, threading.Thread] = weakref.WeakKeyDictionary()
_INFLIGHT_LOCK = threading.Lock()
# health_async: the ping in flight per engine, and the timeout it was started with
_INFLIGHT_ASYNC: weakref.WeakKeyDictionary[Any, tuple[asyncio.Task[None], float]] = (
    weakref.WeakKeyDictionary()
)


def health(engine: EngineLike, *, ping: bool = False, timeout: float = 1.0) -> HealthSnapshot:
    """A frozen health snapshot of a resilient_db engine (see the module docs).

    ``engine`` may be an Engine, a Connection, or an AsyncEngine when
    ``ping`` is False (use :func:`health_async` to ping an AsyncEngine).
    """
    sync, r = _engine_and_resilience(engine, timeout)
    if not ping:
        return _snapshot(sync, r)
    if r.is_async:
        raise ConfigurationError(
            "ping", "cannot ping an AsyncEngine synchronously.", "Use await health_async(engine)."
        )
    skip = _skip_reason(sync, r)
    if skip is not None:
        return _snapshot(sync, r, ping_reason=skip)
    with _INFLIGHT_LOCK:
        running = _INFLIGHT.get(r)
        if running is not None and running.is_alive():
            return _snapshot(
                sync,
                r,
                ping_ok=False,
                ping_reason="ping failed: the previous ping is still running",
            )
        box: dict[str, Any] = {}
        worker = threading.Thread(
            target=_ping_sync,
            args=(sync, r, box, timeout),
            name=f"resilient_db-ping-{r.name}",
            daemon=True,
        )
        _INFLIGHT[r] = worker
    t0 = time.perf_counter()
    worker.start()
    worker.join(timeout)
    seconds = round(time.perf_counter() - t0, 6)
    if worker.is_alive():
        return _snapshot(
            sync,
            r,
            ping_ok=False,
            ping_seconds=seconds,
            ping_reason=f"ping failed: no answer within {timeout:g}s",
        )
    error = box.get("error")
    if error is not None:
        return _snapshot(sync, r, ping_ok=False, ping_seconds=seconds, ping_reason=error)
    r.answered()
    return _snapshot(sync, r, ping_ok=True, ping_seconds=seconds)


def _ping_sync(sync: Any, r: Any, box: dict[str, Any], timeout: float) -> None:
    try:
        fairy = sync.raw_connection()
    except Exception as e:
        box["error"] = _failure(r, e)
        return
    # the ping runs under the connection's watchdog slot: into a silent network it is
    # cut at `timeout`, so the next readiness check pings again instead of finding
    # this one still blocked on a dead socket
    slot = slot_of(fairy)
    outer = slot.arm(timeout) if slot is not None else 0.0
    try:
        sync.dialect.do_ping(fairy.dbapi_connection)
    except Exception as e:
        fairy.invalidate()
        fired = slot is not None and slot.fired
        box["error"] = _failure(r, TimeoutError("ping deadline") if fired else e)
    finally:
        if slot is not None:
            slot.disarm(outer)
            slot.fired = False
            slot.cut = None
        fairy.close()


async def health_async(
    engine: EngineLike, *, ping: bool = False, timeout: float = 1.0
) -> HealthSnapshot:
    """:func:`health` for an AsyncEngine: the ping is awaited within ``timeout``."""
    sync, r = _engine_and_resilience(engine, timeout)
    if not ping:
        return _snapshot(sync, r)
    skip = _skip_reason(sync, r)
    if skip is not None:
        return _snapshot(sync, r, ping_reason=skip)
    if not hasattr(engine, "sync_engine"):
        raise ConfigurationError(
            "engine", "health_async() pings an AsyncEngine.", "Use health() for an Engine."
        )
    loop = asyncio.get_running_loop()
    with _INFLIGHT_LOCK:
        task, limit = _INFLIGHT_ASYNC.get(r, (None, timeout))
        if task is None or task.done() or task.get_loop() is not loop:
            # a watched connection's ping is cut by the watchdog at `timeout` (cancelling an
            # asyncpg call into silence would wait for a cancel request that never
            # returns); the task's own deadline is only the backstop, or the bound of an
            # unwatched driver's ping
            backstop = timeout + (r.policy.timeouts.connect or 2.0) + 1.0 if r.watch else timeout
            task = loop.create_task(asyncio.wait_for(_ping_async(engine, timeout), backstop))
            task.add_done_callback(lambda t: _ping_done(r, t))
            limit = timeout
            _INFLIGHT_ASYNC[r] = (task, limit)
    t0 = time.perf_counter()
    try:
        # shielded: a caller that gives up (or is cancelled) leaves the shared ping alone
        await asyncio.wait_for(asyncio.shield(task), timeout)
    except asyncio.TimeoutError:
        seconds = round(time.perf_counter() - t0, 6)
        reason = f"ping failed: no answer within {min(timeout, limit):g}s"
        return _snapshot(sync, r, ping_ok=False, ping_seconds=seconds, ping_reason=reason)
    except Exception as e:
        seconds = round(time.perf_counter() - t0, 6)
        return _snapshot(sync, r, ping_ok=False, ping_seconds=seconds, ping_reason=_failure(r, e))
    r.answered()
    return _snapshot(sync, r, ping_ok=True, ping_seconds=round(time.perf_counter() - t0, 6))


def _ping_done(r: Any, task: asyncio.Task[None]) -> None:
    """Forget the finished ping and mark its outcome retrieved (a caller may have left)."""
    with _INFLIGHT_LOCK:
        if _INFLIGHT_ASYNC.get(r, (None, 0.0))[0] is task:
            del _INFLIGHT_ASYNC[r]
    if not task.cancelled():
        task.exception()


async def _ping_async(engine: Any, timeout: float) -> None:
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()

        def ping(sync_conn: Any) -> None:
            slot = slot_of(raw)
            outer = slot.arm(timeout) if slot is not None else 0.0
            try:
                sync_conn.dialect.do_ping(raw.dbapi_connection)
            except Exception as e:
                if slot is not None and slot.fired:  # cut by the watchdog: silence
                    raise TimeoutError("ping deadline") from e
                raise
            finally:
                if slot is not None:
                    slot.disarm(outer)
                    slot.fired = False
                    slot.cut = None

        try:
            await conn.run_sync(ping)
        except Exception:
            await conn.invalidate()
            raise
