"""Backoff arithmetic and the sleepers; pure and shared by sync and async paths."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from .config import RetryPolicy

__all__ = ["async_sleep", "backoff", "set_testing", "sleep", "testing_enabled"]

_testing = False


def set_testing(enabled: bool) -> None:
    """Turn backoff sleeps off (``True``) in your test suite, or back on.

    Attempt counts, classification and breaker behaviour are unchanged; only
    the waiting between attempts is skipped.
    """
    global _testing
    _testing = bool(enabled)


def testing_enabled() -> bool:
    """True when :func:`set_testing` switched sleeps off."""
    return _testing


def backoff(policy: RetryPolicy, attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential backoff before attempt ``attempt + 1`` (attempt >= 1)."""
    ceiling = min(policy.max_backoff, policy.initial * (2 ** (attempt - 1)))
    return float(ceiling * rand())


def sleep(seconds: float) -> None:
    """Blocking sleep that honours :func:`set_testing`."""
    if seconds > 0 and not _testing:
        time.sleep(seconds)


async def async_sleep(seconds: float) -> None:
    """Event-loop sleep that honours :func:`set_testing`."""
    if seconds > 0 and not _testing:
        await asyncio.sleep(seconds)
