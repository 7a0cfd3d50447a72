"""A circuit breaker whose lock guards state transitions, never a database call.

The states and the listener protocol are pybreaker's (``closed``, ``open``,
``half-open``; listeners with ``state_change(cb, old, new)``, ``failure`` and
``success`` methods, so a ``pybreaker.CircuitBreakerListener`` works as is).
Unlike ``pybreaker.CircuitBreaker.call``, nothing here wraps the guarded call:
the engine asks :meth:`CircuitBreaker.before_call` for admission, runs the
database call with no lock held, then reports the outcome. Listeners are
called after the lock is released, so one may read :meth:`snapshot`. Time
comes from a monotonic clock that tests replace; cancellation is never
reported as failure.
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


class SharedState(Protocol):  # pragma: no cover - protocol
    """A fleet-wide gate on half-open probes (see :mod:`resilient_db.fleet`)."""

    def acquire_probe(self, token: int) -> float | None:
        """None: the probe may run; a number: rejected, seconds until it is worth retrying.

        Called without the breaker's lock, only for a call that would be a
        half-open probe; any I/O it does must be short and bounded.
        """
        ...

    def probe_done(self, token: int | bool, outcome: bool | None) -> None:
        """An admitted probe ended: True succeeded, False failed, None without a verdict.

        Called with the breaker's lock held: it must not block or do I/O.
        """
        ...


class Rejected(Exception):
    """Raised by :meth:`CircuitBreaker.before_call` when a call may not proceed."""

    def __init__(self, state: str, retry_in: float | None) -> None:
        self.state, self.retry_in = state, retry_in  # args: set by Exception.__new__


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
    """Per-engine breaker; see :class:`~resilient_db.BreakerPolicy` for the rules.

    Closed, it counts failures: ``failure_threshold`` consecutive ones, or a
    ``failure_rate`` over the last ``window`` calls, open it. Open, every call
    is rejected until ``reset_timeout`` has passed; then it is half-open and
    admits ``half_open_max_calls`` probes at a time. A failed probe opens it
    again, and the next probe is admitted ``reset_timeout`` after the failed
    one was (a probe that hung for its connect timeout does not push recovery
    further back); ``success_threshold`` successful probes close it.

    A probe is identified by the token :meth:`before_call` returns, so the
    outcome of a probe from an earlier half-open period never frees a slot of
    the current one.
    """

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
        # guards `rejected` alone: the open fast path counts rejections without _lock
        # (taken after _lock when both are held)
        self._count_lock = threading.Lock()
        self.state = CLOSED
        self._consecutive = 0
        self._half_open_successes = 0
        self._probes = 0
        self._epoch = 0  # numbers the half-open periods; a probe's token
        self._opened_at = 0.0
        self._last_probe_at: float | None = None
        self._forced = False
        self._events: list[tuple[str, str]] = []
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
        #: A fleet-wide probe gate (:func:`resilient_db.share_breaker`), or None.
        self.shared: SharedState | None = None

    def _requiet(self) -> None:
        self.quiet = self.state is CLOSED and not self._consecutive and self._window is None

    # -- admission ---------------------------------------------------------------

    def before_call(self) -> int:
        """Admit a call. Returns 0, or a probe token (> 0) for a half-open probe.

        Raises :class:`Rejected` when the breaker is open (or half-open with all
        probe slots taken). The caller must report the outcome of a probe with
        :meth:`record_success`, :meth:`record_failure` or :meth:`release`,
        passing the token back.
        """
        state = self.state
        if state is CLOSED:
            return 0
        if state is OPEN and (rejected := self.rejection()) is not None:
            raise rejected
        with self._lock:
            if (
                self.state is OPEN
                and not self._forced
                and self.clock() - self._opened_at >= self.policy.reset_timeout
            ):
                self._transition(HALF_OPEN)
            if self.state is HALF_OPEN and self._probes < self.policy.half_open_max_calls:
                self._probes += 1
                previous, self._last_probe_at = self._last_probe_at, self.clock()
                token = self._epoch
            elif self.state is CLOSED:
                token = 0
            else:
                self._reject()
                raise Rejected(self.state, self._retry_in_locked())
            events = self._take_events()
        self._emit(events)
        shared = self.shared
        if token and shared is not None:
            # the fleet's probe lease, asked for with no lock held
            wait = shared.acquire_probe(token)
            if wait is not None:  # another replica is probing: give the slot back
                with self._lock:
                    if self._is_current(token):
                        self._probes = max(0, self._probes - 1)
                        self._last_probe_at = previous
                    self._reject()
                raise Rejected(HALF_OPEN, wait)
        return token

    def rejection(self) -> Rejected | None:
        """While plainly open: count a rejected call, return its Rejected (no lock); else None."""
        if self.state is not OPEN:
            return None
        left = None if self._forced else self._opened_at + self.policy.reset_timeout - self.clock()
        if left is not None and left <= 0:
            return None
        self._reject()
        return Rejected(OPEN, left)

    def _reject(self) -> None:
        with self._count_lock:  # `+= 1` is a read and a write: never lose a concurrent one
            self.rejected += 1

    def retry_in(self) -> float | None:
        """Seconds until the next probe is admitted, or None when closed (or forced open)."""
        with self._lock:
            return self._retry_in_locked()

    def _retry_in_locked(self) -> float | None:
        if self.state is CLOSED or self._forced:
            return None
        if self.state is HALF_OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.policy.reset_timeout - self.clock())

    def _is_current(self, probe: int | bool) -> bool:
        # True (a bare flag from an older caller) means "a probe of this period"
        return bool(probe) and (probe is True or probe == self._epoch)

    # -- outcomes ----------------------------------------------------------------

    def record_success(self, probe: int | bool = 0) -> None:
        """Report a call that reached the database and got an answer."""
        if not probe and self.quiet:
            return  # the happy path: nothing to change, no lock
        with self._lock:
            self.successes += 1
            self._consecutive = 0
            self._push(True)
            if probe and self.shared is not None:
                self.shared.probe_done(probe, True)
            if self._is_current(probe):
                self._probes = max(0, self._probes - 1)
                if self.state is HALF_OPEN:
                    self._half_open_successes += 1
                    if self._half_open_successes >= self.policy.success_threshold:
                        self._transition(CLOSED)
            self._requiet()
            events = self._take_events()
        self._emit(events)
        self._notify("success")

    def record_failure(
        self, diagnosis: str | None = None, probe: int | bool = 0, *, at_once: bool = False
    ) -> None:
        """Report a counted failure (the database could not be reached).

        ``at_once``: open without waiting for the failure threshold.
        """
        with self._lock:
            self.failures += 1
            self._consecutive += 1
            if diagnosis:
                self.last_failure = diagnosis
            self._push(False)
            if probe and self.shared is not None:
                self.shared.probe_done(probe, False)
            if self._is_current(probe):
                self._probes = max(0, self._probes - 1)
            if self.state is HALF_OPEN or (
                self.state is CLOSED and (at_once or self._should_trip())
            ):
                self._transition(OPEN)
            self._requiet()
            events = self._take_events()
        self._emit(events)
        self._notify("failure")

    def trip(self, reason: str) -> None:
        """Open now on direct evidence that the database cannot be reached (a failed probe)."""
        self.record_failure(reason, at_once=True)

    def release(self, probe: int | bool) -> None:
        """A call ended without a verdict (cancelled, or an application error)."""
        if probe:
            with self._lock:
                if self.shared is not None:
                    self.shared.probe_done(probe, None)
                if self._is_current(probe):
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
        """Change state (lock held); listeners are told once the lock is released."""
        old = self.state
        now = self.clock()
        if old == new:
            if new is OPEN:
                self._opened_at = now
            return
        self.transitions += 1
        if new is OPEN:
            # a failed probe: the next one is due reset_timeout after it was admitted
            last = self._last_probe_at
            self._opened_at = last if old is HALF_OPEN and last is not None else now
            self._half_open_successes = 0
        elif new is HALF_OPEN:
            self._epoch += 1
            self._half_open_successes = 0
            self._probes = 0
            self._last_probe_at = None
        else:
            self._consecutive = 0
            self._probes = 0
            self._forced = False
            self._last_probe_at = None
            self._clear_window()
        self.state = new
        self._requiet()
        self._events.append((old, new))

    def _clear_window(self) -> None:
        if self._window is not None:
            self._window.clear()
            self._window_failures = 0

    def _take_events(self) -> list[tuple[str, str]]:
        events = self._events
        if events:
            self._events = []
        return events

    def _emit(self, events: list[tuple[str, str]]) -> None:
        for old, new in events:
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

    def adopt(
        self,
        state: str,
        retry_in: float = 0.0,
        *,
        unless_changed: int | None = None,
        reason: str | None = None,
    ) -> bool:
        """Take a state decided elsewhere: the fleet's shared state (:mod:`resilient_db.fleet`).

        ``open`` with ``retry_in`` seconds left, ``half-open`` or ``closed``. A
        breaker forced open by an operator is left alone, and so is one whose
        :attr:`transitions` count is no longer ``unless_changed`` (it changed
        state on its own since the shared state was read). Returns True when
        the state or the open deadline changed; ``reason`` (why the fleet
        opened) then becomes :attr:`last_failure`.
        """
        with self._lock:
            if self._forced or (unless_changed is not None and self.transitions != unless_changed):
                return False
            changed = state != self.state
            if state == OPEN:
                opened_at = self.clock() + max(0.0, retry_in) - self.policy.reset_timeout
                changed = changed or abs(opened_at - self._opened_at) > 1e-3
                self._transition(OPEN)
                self._opened_at = opened_at
            elif state == HALF_OPEN:
                self._transition(HALF_OPEN)
            elif state == CLOSED:
                self._transition(CLOSED)
            else:
                raise ValueError(f"unknown breaker state {state!r}")
            if reason and changed and state != CLOSED:
                self.last_failure = reason
            events = self._take_events()
        self._emit(events)
        return changed

    # -- operator controls -------------------------------------------------------

    def force_open(self) -> None:
        """Open the breaker and keep it open until :meth:`force_close` or :meth:`reset`."""
        with self._lock:
            self._last_probe_at = None
            self._transition(OPEN)
            self._forced = True
            events = self._take_events()
        self._emit(events)

    def force_close(self) -> None:
        """Close the breaker now (the failure count starts again from zero)."""
        with self._lock:
            self._forced = False
            self._transition(CLOSED)
            self._consecutive = 0
            self._clear_window()
            self._requiet()
            events = self._take_events()
        self._emit(events)

    def reset(self) -> None:
        """Close the breaker and clear its counters."""
        with self._lock:
            self._forced = False
            self._transition(CLOSED)
            self._consecutive = 0
            self._probes = 0
            self._clear_window()
            self.failures = self.successes = 0
            with self._count_lock:
                self.rejected = 0
            self.last_failure = None
            self._requiet()
            events = self._take_events()
        self._emit(events)

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
