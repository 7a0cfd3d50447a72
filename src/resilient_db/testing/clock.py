"""A monotonic clock that moves only when a test moves it."""

from __future__ import annotations

__all__ = ["ManualClock"]


class ManualClock:
    """Pass as ``clock=`` to ``create_engine``/``wrap``/``CircuitBreaker``; call :meth:`advance`.

    Breaker timing (reset timeouts, half-open), retry deadlines and idle pings
    then follow the test, never the wall clock::

        clock = ManualClock()
        engine = resilient_db.create_engine(url, clock=clock)
        ...                       # trip the breaker
        clock.advance(5.0)        # the reset timeout has passed
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        self.now += seconds
