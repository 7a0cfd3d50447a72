"""The adaptive concurrency limit: shed load when the database gets slow (``PoolPolicy.adaptive``).

As Netflix's concurrency-limits (Vegas, gradient) and Envoy's adaptive
concurrency filter do, the engine compares the latency of its calls with its
own baseline and moves a limit on the connections in use (AIMD):

- **sample**: the *shortest* of the last :data:`SAMPLES` driver calls
  (execute, commit, rollback). In a brownout every call is slow, so the
  shortest is slow too; a few long queries among short ones do not move it.
  Calls of a connection given its own deadline
  (``resilient_db_call_timeout``) are declared long work and not sampled.
- **baseline**: the engine's no-load round trip: it follows a faster sample
  at once and drifts slowly (:data:`DRIFT` of the gap per decision) towards a
  slower one, so a latency that lasts (a new normal) is accepted in about
  twenty seconds under load, as Vegas' minRTT reset and the gradient
  limiter's long-term average do.
- **decision**, at most once per :data:`WINDOW` seconds: a sample above
  ``max(TOLERANCE * baseline, FLOOR)`` halves the limit (not below
  :data:`MINIMUM`); otherwise it grows by one, up to ``size + max_overflow``.
  The absolute floor keeps microsecond jitter of a local server from counting.

The pool's checkout (:mod:`._admission`) refuses a connection at once, with
:class:`~resilient_db.PoolExhaustedError`, when the connections in use reach a
lowered limit: nobody waits because of it. The check and the checkout are not
one atomic step, so simultaneous checkouts may overshoot the limit by a few.
"""

from __future__ import annotations

import logging
import math
import threading

__all__ = ["DRIFT", "FLOOR", "MINIMUM", "SAMPLES", "TOLERANCE", "WINDOW", "AdaptiveLimit"]

logger = logging.getLogger("resilient_db.limit")

#: seconds between two decisions
WINDOW = 0.5
#: the sample is the shortest of this many last calls
SAMPLES = 8
#: a sample above this many times the baseline means "slow"
TOLERANCE = 2.0
#: ... and above this many seconds: a local server's jitter never counts
FLOOR = 0.05
#: the limit never falls below this (nor above size + max_overflow)
MINIMUM = 2
#: share of the gap a slower sample moves the baseline by, per decision
DRIFT = 0.02
#: the limit's factor when the sample is slow
BACKOFF = 0.5


class AdaptiveLimit:
    """One engine's adaptive limit on connections in use (``Resilience.limit``).

    :meth:`sample` is called after each driver call with its duration and the
    time it ended (``time.monotonic()``; tests pass their own times, no clock
    is read here); :attr:`limit` is read at every checkout.
    """

    __slots__ = (
        "_i",
        "_lock",
        "_next",
        "_ring",
        "baseline",
        "decreases",
        "latency",
        "limit",
        "maximum",
        "minimum",
        "name",
    )

    def __init__(self, maximum: int, *, name: str = "") -> None:
        #: the largest limit: the pool's size + max_overflow
        self.maximum = maximum
        self.minimum = min(MINIMUM, maximum)
        #: connections allowed in use now
        self.limit = maximum
        #: the no-load call duration, seconds (inf until the first decision)
        self.baseline = math.inf
        #: the sample of the last decision (shortest recent call), seconds
        self.latency = math.nan
        #: decisions that lowered the limit
        self.decreases = 0
        self.name = name
        self._ring = [math.inf] * SAMPLES
        self._i = 0
        self._next = -math.inf
        self._lock = threading.Lock()

    def sample(self, seconds: float, now: float) -> None:
        """A call took ``seconds`` and ended at ``now``; first decide, if a window has passed.

        A few writes from any thread, without a lock (a sample lost to a race
        does not matter); the decision, once per window, takes one.
        """
        if now >= self._next:  # judges the calls that ended before this one
            self._decide(now)
        i = self._i
        self._ring[i] = seconds
        self._i = (i + 1) % SAMPLES

    def threshold(self) -> float:
        """The sample above which calls are slow: ``max(TOLERANCE * baseline, FLOOR)``."""
        return max(TOLERANCE * self.baseline, FLOOR)

    def _decide(self, now: float) -> None:
        if not self._lock.acquire(blocking=False):
            return  # another thread is deciding this window
        try:
            if now < self._next:
                return
            self._next = now + WINDOW
            m = min(self._ring)
            if m == math.inf:  # no call has ended yet
                return
            self.latency = m
            base = self.baseline
            if m <= base:
                base = m
            else:  # slowly towards a slower sample: a lasting latency becomes the norm
                base += (m - base) * DRIFT
            self.baseline = base
            limit = self.limit
            if m > max(TOLERANCE * base, FLOOR):
                new = max(self.minimum, int(limit * BACKOFF))
                if new < limit:
                    self.decreases += 1
                    if limit == self.maximum:
                        logger.warning(
                            "engine '%s': calls take %.3fs against a baseline of %.3fs; "
                            "concurrency limit lowered to %d of %d (load is shed, not queued)",
                            self.name, m, base, new, self.maximum,
                        )  # fmt: skip
            else:
                new = min(self.maximum, limit + 1)
                if new == self.maximum and limit < new:
                    logger.info(
                        "engine '%s': latency back to %.3fs; concurrency limit at %d again",
                        self.name, m, new,
                    )  # fmt: skip
            self.limit = new
        finally:
            self._lock.release()

    def __repr__(self) -> str:
        return (
            f"<AdaptiveLimit {self.limit}/{self.maximum} latency={self.latency:.4f}s "
            f"baseline={self.baseline:.4f}s>"
        )
