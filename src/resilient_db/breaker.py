"""A circuit breaker whose lock guards state transitions, never a database call.

The states and the listener protocol are pybreaker's (``closed``, ``open``,
``half-open``; listeners with ``state_change(cb, old, new)``, ``failure`` and
``success`` methods, so a ``pybreaker.CircuitBreakerListener`` works as is).
Unlike ``pybreaker.CircuitBreaker.call``, nothing here wraps the guarded call:
the engine asks :meth:`CircuitBreaker.before_call` for admission, runs the
database call with no lock held, then reports the outcome. Time comes from a
monotonic clock that tests replace; cancellation is never reported as failure.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from .config import BreakerPolicy

__all__ = ["BreakerSnapshot", "CircuitBreaker", "Rejected"]

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


class BreakerListener(Protocol):  # pragma: no cover - protocol
    """What a listener may implement; every method is optional."""

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None: ...


class Rejected(Exception):
    """Raised by :meth:`CircuitBreaker.before_call` when a call may not proceed."""

    def __init__(self, state: str, retry_in: float | None) -> None:
        super().__init__(state, retry_in)
        self.state = state
        self.retry_in = retry_in


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """A consistent view of a breaker, for health checks and operators."""

    name: str
    state: str
    consecutive_failures: int
    failures: int
    successes: int
    rejected: int
    transitions: int
    retry_in: float | None
    probes_in_flight: int
    last_failure: str | None
    forced: bool

    def to_dict(self) -> dict[str, Any]:
        """Return the snapshot as a JSON-serialisable dict."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


class CircuitBreaker:
    """Per-engine breaker; see :class:`~resilient_db.BreakerPolicy` for the rules."""

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        listeners: Iterable[Any] = (),
    ) -> None:
        self.name = name
        self.policy = policy
        self.clock = clock
        self.listeners: list[Any] = list(listeners)
        self._lock = threading.Lock()
        self.state = CLOSED
        self._consecutive = 0
        self._half_open_successes = 0
        self._probes = 0
        self._opened_at = 0.0
        self._forced = False
        self.failures = 0
        self.successes = 0
        self.rejected = 0
        self.transitions = 0
        self.last_failure: str | None = None
        self._window: collections.deque[bool] | None = (
            collections.deque(maxlen=policy.window) if policy.failure_rate is not None else None
        )
        self._window_failures = 0
        #: True while closed with nothing to count: a success changes nothing, so
        #: the checkout hot path can skip reporting it.
        self.quiet = self._window is None

    def _requiet(self) -> None:
        self.quiet = self.state is CLOSED and not self._consecutive and self._window is None

    # -- admission ---------------------------------------------------------------

    def before_call(self) -> bool:
        """Admit a call. Returns True when the call is a half-open probe.

        Raises :class:`Rejected` when the breaker is open (or half-open with all
        probe slots taken). The caller must report the outcome of a probe with
        :meth:`record_success`, :meth:`record_failure` or :meth:`release`.
        """
        if self.state is CLOSED:
            return False
        with self._lock:
            if (
                self.state is OPEN
                and not self._forced
                and self.clock() - self._opened_at >= self.policy.reset_timeout
            ):
                self._transition(HALF_OPEN)
            if self.state is HALF_OPEN and self._probes < self.policy.half_open_max_calls:
                self._probes += 1
                return True
            if self.state is CLOSED:
                return False
            self.rejected += 1
            raise Rejected(self.state, self._retry_in_locked())

    def retry_in(self) -> float | None:
        """Seconds until the next probe is admitted, or None when closed."""
        with self._lock:
            return self._retry_in_locked()

    def _retry_in_locked(self) -> float | None:
        if self.state is CLOSED:
            return None
        if self.state is HALF_OPEN or self._forced:
            return 0.0 if not self._forced else None
        return max(0.0, self._opened_at + self.policy.reset_timeout - self.clock())

    # -- outcomes ----------------------------------------------------------------

    def record_success(self, probe: bool = False) -> None:
        """Report a call that reached the database and got an answer."""
        if not probe and self.quiet:
            return  # the happy path: nothing to change, no lock
        with self._lock:
            self.successes += 1
            self._consecutive = 0
            self._push(True)
            if probe:
                self._probes = max(0, self._probes - 1)
            if self.state is HALF_OPEN and probe:
                self._half_open_successes += 1
                if self._half_open_successes >= self.policy.success_threshold:
                    self._transition(CLOSED)
            self._requiet()
        self._notify("success")

    def record_failure(self, diagnosis: str | None = None, probe: bool = False) -> None:
        """Report a counted failure (a fault of the database or the path to it)."""
        with self._lock:
            self.failures += 1
            self._consecutive += 1
            if diagnosis:
                self.last_failure = diagnosis
            self._push(False)
            if probe:
                self._probes = max(0, self._probes - 1)
            if self.state is HALF_OPEN or (self.state is CLOSED and self._should_trip()):
                self._transition(OPEN)
            self._requiet()
        self._notify("failure")

    def release(self, probe: bool) -> None:
        """A call ended without a verdict (cancelled, or an application error)."""
        if probe:
            with self._lock:
                self._probes = max(0, self._probes - 1)

    def _push(self, ok: bool) -> None:
        w = self._window
        if w is None:
            return
        if len(w) == w.maxlen and not w[0]:
            self._window_failures -= 1
        w.append(ok)
        if not ok:
            self._window_failures += 1

    def _should_trip(self) -> bool:
        p = self.policy
        if self._consecutive >= p.failure_threshold:
            return True
        w = self._window
        if w is not None and p.failure_rate is not None and len(w) >= p.minimum_calls:
            return self._window_failures / len(w) >= p.failure_rate
        return False

    # -- transitions -------------------------------------------------------------

    def _transition(self, new: str) -> None:
        old = self.state
        if old == new:
            if new is OPEN:
                self._opened_at = self.clock()
            return
        self.transitions += 1
        if new is OPEN:
            self._opened_at = self.clock()
            self._half_open_successes = 0
        elif new is HALF_OPEN:
            self._half_open_successes = 0
            self._probes = 0
        else:
            self._consecutive = 0
            self._probes = 0
            self._forced = False
            if self._window is not None:
                self._window.clear()
                self._window_failures = 0
        self.state = new
        self._requiet()
        for listener in self.listeners:
            fn = getattr(listener, "state_change", None)
            if fn is not None:
                with contextlib.suppress(Exception):
                    fn(self, old, new)

    def _notify(self, what: str) -> None:
        for listener in self.listeners:
            fn = getattr(listener, what, None)
            if fn is not None:
                with contextlib.suppress(Exception):
                    fn(self) if what == "success" else fn(self, None)

    # -- operator controls -------------------------------------------------------

    def force_open(self) -> None:
        """Open the breaker and keep it open until :meth:`force_close` or :meth:`reset`."""
        with self._lock:
            self._transition(OPEN)
            self._forced = True

    def force_close(self) -> None:
        """Close the breaker now."""
        with self._lock:
            self._forced = False
            self._transition(CLOSED)

    def reset(self) -> None:
        """Close the breaker and clear its counters."""
        with self._lock:
            self._forced = False
            self._transition(CLOSED)
            self.failures = self.successes = self.rejected = 0
            self.last_failure = None

    def snapshot(self) -> BreakerSnapshot:
        """A consistent copy of the breaker's state and counters."""
        with self._lock:
            return BreakerSnapshot(
                name=self.name,
                state=self.state,
                consecutive_failures=self._consecutive,
                failures=self.failures,
                successes=self.successes,
                rejected=self.rejected,
                transitions=self.transitions,
                retry_in=self._retry_in_locked(),
                probes_in_flight=self._probes,
                last_failure=self.last_failure,
                forced=self._forced,
            )
