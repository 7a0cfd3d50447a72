"""Assertions for outage tests: fail fast, degrade gracefully, recover.

They raise :class:`AssertionError` with an explanation, so they work under
pytest, unittest or plain scripts.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from ..errors import ErrorContext, error_context

__all__ = [
    "assert_degraded_gracefully",
    "assert_fails_fast",
    "assert_fails_fast_async",
    "assert_recovers",
]


def _check_elapsed(elapsed: float, max_seconds: float, what: str) -> None:
    if elapsed > max_seconds:
        raise AssertionError(f"{what} took {elapsed:.3f}s, more than {max_seconds}s")


def assert_fails_fast(
    fn: Callable[[], object],
    max_seconds: float,
    *,
    raises: type[BaseException] | tuple[type[BaseException], ...] = Exception,
) -> BaseException:
    """Assert that ``fn()`` raises ``raises`` within ``max_seconds``; return the exception.

    Fails when ``fn`` returns normally, raises something else, or takes longer.
    """
    start = time.monotonic()
    try:
        result = fn()
    except raises as e:
        _check_elapsed(time.monotonic() - start, max_seconds, f"failing with {type(e).__name__}")
        return e
    if isinstance(result, Awaitable):
        raise AssertionError("fn returned an awaitable: use assert_fails_fast_async")
    raise AssertionError(f"expected an exception within {max_seconds}s, but the call returned")


async def assert_fails_fast_async(
    fn: Callable[[], Awaitable[object]],
    max_seconds: float,
    *,
    raises: type[BaseException] | tuple[type[BaseException], ...] = Exception,
) -> BaseException:
    """Async twin of :func:`assert_fails_fast`: ``await fn()`` must raise in time."""
    start = time.monotonic()
    try:
        await fn()
    except raises as e:
        _check_elapsed(time.monotonic() - start, max_seconds, f"failing with {type(e).__name__}")
        return e
    raise AssertionError(f"expected an exception within {max_seconds}s, but the call returned")


def _texts(exc: BaseException) -> str:
    parts = [str(exc), *getattr(exc, "__notes__", ())]
    ctx = error_context(exc)
    if ctx is not None:
        parts.append(repr(ctx.to_dict()))
    return "\n".join(parts)


def assert_degraded_gracefully(
    engine: Any,
    *,
    within: float = 2.0,
    calls: int = 3,
    statement: str = "SELECT 1",
    breaker_opens: bool = False,
) -> list[ErrorContext]:
    """Assert that while the database is unavailable, ``engine`` fails fast and explains why.

    Runs ``statement`` ``calls`` times. Each call must raise a SQLAlchemy
    error within ``within`` seconds (no hang), carry a resilient_db
    :class:`~resilient_db.ErrorContext` with a diagnosis, and never show the
    URL's password. With ``breaker_opens=True`` the engine's circuit breaker
    must be open afterwards. Returns the contexts, one per call.
    """
    from ..engine import breaker_state

    password = getattr(engine, "url", None) and engine.url.password
    contexts: list[ErrorContext] = []
    for i in range(1, calls + 1):

        def call() -> None:
            with engine.connect() as conn:
                conn.execute(sa.text(statement))

        try:
            exc = assert_fails_fast(call, within, raises=sa_exc.SQLAlchemyError)
        except AssertionError as e:
            raise AssertionError(f"call {i} of {calls}: {e}") from None
        ctx = error_context(exc)
        if ctx is None or not ctx.diagnosis:
            raise AssertionError(
                f"call {i} of {calls} raised {type(exc).__name__} without a resilient_db "
                f"diagnosis (is the engine from resilient_db.create_engine()?): {exc}"
            )
        if password and str(password) in _texts(exc):
            raise AssertionError(f"call {i} of {calls}: the error shows the database password")
        contexts.append(ctx)
    if breaker_opens:
        snap = breaker_state(engine)
        if snap is None or snap.state != "open":
            state = "no breaker" if snap is None else snap.state
            raise AssertionError(f"expected the circuit breaker to be open, it is {state}")
    return contexts


def assert_recovers(
    engine: Any,
    *,
    within: float = 10.0,
    statement: str = "SELECT 1",
    interval: float = 0.05,
) -> float:
    """Assert that ``statement`` succeeds again within ``within`` seconds; return the seconds.

    Retries every ``interval`` seconds (real time), through an open breaker's
    probe, until a call succeeds.
    """
    start = time.monotonic()
    last: BaseException | None = None
    while True:
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(statement))
            return time.monotonic() - start
        except sa_exc.SQLAlchemyError as e:
            last = e
        if time.monotonic() - start + interval > within:
            ctx = error_context(last) if last is not None else None
            why = f"[{ctx.kind}] {ctx.diagnosis}" if ctx is not None else repr(last)
            raise AssertionError(f"the database did not answer within {within}s; last: {why}")
        time.sleep(interval)
