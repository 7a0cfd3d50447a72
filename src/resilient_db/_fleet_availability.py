"""Whether the fleet store's Redis answers (:mod:`resilient_db.fleet`).

The store's availability fields, the scrubbed reason of the last failure, the
log lines when Redis goes away and comes back, and :meth:`status` for health.
A mixin of :class:`~resilient_db.fleet.RedisBreakerStore`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("resilient_db.fleet")


class StoreAvailability:
    """The availability half of :class:`~resilient_db.fleet.RedisBreakerStore`."""

    kind: str
    name: str
    replica: str
    _secrets: tuple[str, ...]
    _mu: threading.Lock
    _held: list[tuple[int, str, str]]
    _busy_until: float
    _failures: int
    available: bool
    error: str | None
    unavailable_since: float | None
    synced_at: float | None
    shared_state: str | None

    def _scrub(self, e: BaseException) -> str:
        text = f"{type(e).__name__}: {e}"
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "***")
        return text[:300]

    def _unavailable(self, e: BaseException) -> None:
        reason = self._scrub(e)
        with self._mu:
            self._held = []  # leases can no longer be renewed: they expire on their own
            self._busy_until = 0.0
            self._failures += 1
            self.error = reason
            first = self.available
            if first:
                self.available = False
                self.unavailable_since = time.time()
        if first:
            log.warning(
                "Shared breaker state '%s' unavailable (%s): this replica runs on its "
                "local circuit breaker until Redis answers again.",
                self.name,
                reason,
            )

    def _available(self) -> None:
        with self._mu:
            self.synced_at = time.time()
            self._failures = 0
            back = not self.available
            if back:
                self.available = True
                self.error = None
                self.unavailable_since = None
        if back:
            log.info("Shared breaker state '%s' available again.", self.name)

    def status(self) -> dict[str, Any]:
        """What health reports: kind, name, ok, error, since, fleet state, sync age."""
        synced = self.synced_at
        return {
            "kind": self.kind,
            "name": self.name,
            "ok": self.available,
            "error": self.error,
            "unavailable_since": self.unavailable_since,
            "shared_state": self.shared_state,
            "synced_age": round(time.time() - synced, 3) if synced is not None else None,
            "replica": self.replica,
        }
