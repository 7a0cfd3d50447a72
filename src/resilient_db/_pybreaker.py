"""``breaker=``: an engine that works with the application's ``pybreaker.CircuitBreaker``.

Both directions go through pybreaker's public API and its listeners:

- **engine → application.** When the engine's breaker opens, the pybreaker is
  opened (``cb.open()``), so the application's ``@cb`` code fails fast with
  ``CircuitBreakerError`` during a database outage. Each failure the engine's
  breaker counts is reported to the pybreaker's counter by ``cb.call()`` on a
  function that only raises it (:class:`DatabaseFailure`, an
  ``OperationalError``), so the pybreaker's ``fail_max`` and ``exclude`` apply
  and its lock is held around a ``raise``, never a database call. When the
  engine's breaker closes after a successful probe, a pybreaker it opened is
  closed again.
- **application → engine.** When the pybreaker opens on its own while the
  engine's breaker is closed, the engine's breaker takes the open state for
  the pybreaker's ``reset_timeout`` (checkouts fail fast with
  ``CircuitOpenError``, whose diagnosis names the pybreaker); when the
  pybreaker goes half-open the engine's does too, so the application's trial
  call is the engine's probe; when it closes, an engine breaker still open
  only because of it closes too.

pybreaker's ``call()`` holds its lock while the application's guarded function
runs, maybe a slow query: so the calls into the pybreaker run on one daemon
thread, and a request thread that just saw a database failure never waits for
that lock. Changes the bridge makes itself (on that thread, or while the
engine's breaker takes the pybreaker's state) are not sent back: no loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from ._state import Resilience
from .breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from .errors import ConfigurationError

__all__ = ["FORWARDER", "Bridge", "DatabaseFailure", "attach", "check"]

_logger = logging.getLogger("resilient_db")


def check(breaker: object, policy_enabled: bool = True) -> Any:
    """``breaker`` if it is a ``pybreaker.CircuitBreaker``; else :class:`ConfigurationError`."""
    import pybreaker  # only for engines given breaker=

    if not isinstance(breaker, pybreaker.CircuitBreaker):
        raise ConfigurationError(
            "breaker",
            f"must be a pybreaker.CircuitBreaker, got {type(breaker).__name__}.",
            "Pass the pybreaker.CircuitBreaker that guards your calls, or leave breaker out.",
        )
    if not policy_enabled:
        raise ConfigurationError(
            "breaker",
            "needs the engine's own circuit breaker, but policy.breaker.enabled is False.",
            "Enable it (BreakerPolicy(enabled=True)), or leave breaker out.",
        )
    return breaker


class DatabaseFailure(sa_exc.OperationalError):
    """A failure counted by the engine's breaker, as the pybreaker's listeners see it."""

    def __init__(self, message: str) -> None:
        super().__init__(None, None, Exception(message), hide_parameters=True)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _raise(e: BaseException) -> None:
    raise e


class _Forwarder:
    """One daemon thread running the calls into pybreakers, in order."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, fn: Callable[[], None]) -> None:
        self.queue.put(fn)
        t = self.thread
        if t is None:
            with self._lock:
                if self.thread is t:
                    t = threading.Thread(target=self._run, name="resilient_db-pybreaker")
                    t.daemon = True
                    self.thread = t  # before it runs: app_changed() tells it by identity
                    t.start()

    def _run(self) -> None:
        while True:
            fn = self.queue.get()
            try:
                fn()
            except Exception:  # one pybreaker's failing listener never stops the others
                _logger.debug("resilient_db: forwarding to a pybreaker failed", exc_info=True)

    def wait(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far has run (tests); False on timeout."""
        done = threading.Event()
        self.put(done.set)
        return done.wait(timeout)

    def after_fork(self) -> None:
        """In a forked child: a new lock and queue; the thread starts again when needed."""
        self.queue = queue.SimpleQueue()
        self.thread = None
        self._lock = threading.Lock()


FORWARDER = _Forwarder()
if hasattr(os, "register_at_fork"):  # the parent's pending reports are the parent's
    os.register_at_fork(after_in_child=FORWARDER.after_fork)


class Bridge:
    """Keeps one engine's breaker and one application pybreaker in step."""

    def __init__(self, r: Resilience, ours: CircuitBreaker, cb: Any) -> None:
        self.r = r
        self.ours = ours
        self.cb = cb
        #: the pybreaker is open because of the engine: close it when the engine's closes
        self.opened_app = False
        #: the engine breaker's transition count when it took the pybreaker's state
        self.held: int | None = None
        self._local = threading.local()

    @property
    def label(self) -> str:
        """How diagnoses name the pybreaker."""
        return f"the application's pybreaker '{self.cb.name or 'unnamed'}'"

    # -- the engine's breaker listener (called with no lock held) ----------------------

    def state_change(self, _ours: Any, _old: str, new: str) -> None:
        if getattr(self._local, "adopting", False):
            return  # the engine's breaker is taking the pybreaker's state
        if new == OPEN:
            FORWARDER.put(self._open_app)
        elif new == CLOSED:
            FORWARDER.put(self._close_app)

    def failure(self, _ours: Any, _exc: Any) -> None:
        last = self.ours.last_failure or "a database failure"
        FORWARDER.put(lambda: self._report(f"engine '{self.r.name}': {last}"))

    def success(self, _ours: Any) -> None:
        pass

    # -- on the forwarding thread ------------------------------------------------------

    def _open_app(self) -> None:
        if self.cb.current_state != "open":
            self.cb.open()

    def _close_app(self) -> None:
        if self.opened_app and self.cb.current_state != "closed":
            self.cb.close()
        self.opened_app = False

    def _report(self, message: str) -> None:
        # the pybreaker's lock is held around this raise only; what comes back is the
        # failure itself, or CircuitBreakerError (open, or this failure tripped it)
        with contextlib.suppress(Exception):
            self.cb.call(_raise, DatabaseFailure(message))

    # -- the pybreaker's listener (called with the pybreaker's lock held) --------------

    def app_changed(self, new: str) -> None:
        """The pybreaker changed state: the engine's breaker follows where it should."""
        if threading.current_thread() is FORWARDER.thread:
            if new == "open":  # the engine's failures or cb.open() opened it
                self.opened_app = True
            return
        ours = self.ours
        seen = ours.transitions
        if new == "open":
            if ours.state is CLOSED and self._adopt(OPEN, seen, self.cb.reset_timeout):
                self.held = ours.transitions
        elif new == "half-open":
            if self.held == seen and self._adopt(HALF_OPEN, seen):
                self.held = ours.transitions
        elif new == "closed" and self.held is not None:
            held, self.held = self.held, None
            self._adopt(CLOSED, held)

    def _adopt(self, state: str, seen: int, retry_in: float = 0.0) -> bool:
        reason = f"{self.label} is {state}." if state != CLOSED else None
        self._local.adopting = True
        try:
            return self.ours.adopt(state, retry_in, unless_changed=seen, reason=reason)
        finally:
            self._local.adopting = False


def _forget(cb: Any, listener: Any) -> None:
    with contextlib.suppress(ValueError):
        cb.remove_listener(listener)


def attach(engine: Engine, r: Resilience, cb: Any) -> Bridge:
    """Keep ``r``'s breaker and the pybreaker ``cb`` in step (``breaker=``).

    The pybreaker usually outlives the engine: its listener goes with the engine.
    """
    import pybreaker

    ours = r.breaker
    if ours is None:  # pragma: no cover - check() refused it
        raise ConfigurationError("breaker", "needs the engine's own circuit breaker.")
    bridge = Bridge(r, ours, cb)

    class Listener(pybreaker.CircuitBreakerListener):
        def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
            try:  # never break the application's call
                bridge.app_changed(str(getattr(new_state, "name", new_state)))
            except Exception:
                _logger.debug("resilient_db: following a pybreaker failed", exc_info=True)

    listener = Listener()
    ours.listeners.append(bridge)
    cb.add_listener(listener)
    weakref.finalize(engine, _forget, cb, listener)
    if cb.current_state == "open":
        bridge.app_changed("open")
    return bridge
