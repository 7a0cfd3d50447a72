"""Bounded waits for the tests that call into a silent network.

Without a working deadline such a call blocks for good. :func:`bounded` and
:func:`abounded` give it a generous wall-clock limit and then fail the test with
a message naming the deadline that did not fire, instead of hanging the suite
(pytest-timeout, configured in ``pyproject.toml``, is only the last resort).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

#: far above any deadline these tests set, far below pytest-timeout's limit
LIMIT = 15.0


def _fail(deadline: str, seconds: float, unblock: Callable[[], object] | None) -> None:
    if unblock is not None:
        unblock()  # e.g. reset the proxy's connections, so the test's clean-up cannot hang
    pytest.fail(f"no call deadline: {deadline} still blocked after {seconds:g}s", pytrace=False)


def bounded(
    fn: Callable[[], T],
    *,
    deadline: str,
    unblock: Callable[[], object] | None = None,
    seconds: float = LIMIT,
) -> T:
    """Run ``fn()`` in a thread: its result or its exception, or fail naming ``deadline``.

    On failure ``unblock()`` runs first (``FaultProxy.reset_all``) and the call is
    given a moment to end, so the test's own clean-up does not block on it.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # handed to the caller, as if it had called fn()
            box["error"] = e

    worker = threading.Thread(target=run, name="bounded-call", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        try:
            _fail(deadline, seconds, unblock)
        finally:
            worker.join(5.0)
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result


async def abounded(
    aw: Awaitable[T],
    *,
    deadline: str,
    unblock: Callable[[], object] | None = None,
    seconds: float = LIMIT,
) -> T:
    """Await ``aw``: its result or its exception, or fail naming ``deadline``.

    On failure ``unblock()`` runs first and the call is given a moment to end.
    """
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        if unblock is not None:
            unblock()
        done, _ = await asyncio.wait({task}, timeout=5.0)
        if not done:
            task.cancel()
        _fail(deadline, seconds, None)
    return task.result()
