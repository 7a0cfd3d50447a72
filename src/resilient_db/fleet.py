"""One circuit breaker for a fleet: breaker state shared through Redis.

Replicas of a service that share a breaker name see one state. The local
:class:`~resilient_db.CircuitBreaker` still decides every call from memory;
a :class:`RedisBreakerStore` attached to it keeps it in step with the fleet:

- **Publish.** When the local breaker opens (it tripped, or its probe
  failed), a background thread writes ``open`` with a Redis TTL of the time
  left until the next probe (``SET ... PX``: expiry is Redis's clock, never
  a wall clock compared across hosts) plus a ``tripped`` marker; when it
  closes after a successful probe, it deletes the keys.
- **Follow.** Every ``staleness`` seconds the same thread reads the shared
  state in one round trip (a Lua script) and adopts it: a replica that never
  saw a failure opens with the fleet's remaining time, goes half-open when
  the ``open`` key expires, and closes when a probe anywhere succeeded.
- **Probe.** Half-open, a call that would be a probe first takes a
  fleet-wide lease (``SET probe:<i> NX PX lease_ttl``, ``half_open_max_calls``
  slots): only holders probe, so the database sees at most that many probes
  across the fleet. The holder's thread renews its lease while the probe
  runs, so a crashed holder frees it within ``lease_ttl``. A replica that was
  refused a lease rejects locally, without asking Redis again, for up to
  ``staleness`` seconds.

The happy path never touches Redis: a closed breaker admits calls from its
local state. The only Redis round trip a caller can wait for is the lease of
a would-be probe, bounded by the client's ``socket_timeout`` (0.2 s).

When Redis is unreachable (or errs), the store says so (``available`` is
False, :meth:`RedisBreakerStore.status` carries the reason, health reports
``degraded``, the ``resilient_db.breaker.store.available`` metric reads 0)
and the replica runs on its local breaker alone, probing without a lease;
the thread retries with backoff and, once Redis answers, first publishes
what the local breaker decided meanwhile, then follows the fleet again.
Redis trouble never rejects a call.

Keys (all in one Redis Cluster slot thanks to the ``{name}`` hash tag)::

    resilient_db:breaker:{name}:open      exists while open; PTTL = time to half-open
    resilient_db:breaker:{name}:tripped   exists while not closed; value: why it opened
    resilient_db:breaker:{name}:ok        successful probes this half-open period
    resilient_db:breaker:{name}:probe:<i> probe leases, value = holder
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import uuid
import weakref
from typing import Any

from ._fleet_availability import StoreAvailability
from ._fleet_redis import client_from_url, client_secrets, register_scripts
from ._fork import track_store
from ._state import breaker_of, resilience_of
from .breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from .errors import ConfigurationError

__all__ = ["RedisBreakerStore", "share_breaker"]

#: How long the ``tripped`` marker outlives the last failure it recorded (ms).
TRIPPED_TTL_MS = 24 * 3600 * 1000
#: Longest pause between reconnection attempts while Redis is down (s).
MAX_BACKOFF = 5.0


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(
            f"RedisBreakerStore.{name}", f"must be a number > 0, got {value!r}.", "Give seconds."
        )
    return float(value)


class RedisBreakerStore(StoreAvailability):
    """Shares one :class:`~resilient_db.CircuitBreaker`'s state with every replica
    using the same ``name`` on the same Redis (see the module docs).

    ``redis`` is a URL (``redis://[:password@]host:port/db``, ``rediss://``...)
    or a ready client (``redis.Redis`` or ``redis.cluster.RedisCluster``; give
    it short timeouts and no retries yourself). ``staleness`` bounds how old
    the local view of the fleet may be; ``lease_ttl`` is how long a probe
    lease lives without renewal (default ``max(1, 4 * staleness)``);
    ``socket_timeout`` bounds every Redis call made through a URL-built client.

    Use :func:`share_breaker` to attach one to an engine. :meth:`close` stops
    the background thread.
    """

    kind = "redis"

    def __init__(
        self,
        redis: Any,
        name: str,
        *,
        staleness: float = 0.5,
        lease_ttl: float | None = None,
        socket_timeout: float = 0.2,
        prefix: str = "resilient_db:breaker:",
        replica: str | None = None,
    ) -> None:
        if not isinstance(name, str) or not name or "{" in name or "}" in name:
            raise ConfigurationError(
                "RedisBreakerStore.name",
                f"must be a non-empty string without braces, got {name!r}.",
                "Use the engine's name, e.g. 'orders-db'.",
            )
        self.name = name
        self.staleness = _check_positive("staleness", staleness)
        self.lease_ttl = _check_positive(
            "lease_ttl", lease_ttl if lease_ttl is not None else max(1.0, 4 * self.staleness)
        )
        self.socket_timeout = _check_positive("socket_timeout", socket_timeout)
        #: Identifies this process in lease values (host:pid:random).
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.own_replica = replica is None  # a forked child then gets its own (_fork.py)
        self._owns_client = isinstance(redis, str)
        if isinstance(redis, str):
            self.client, self._secrets = client_from_url(redis, self.socket_timeout)
        else:
            self.client, self._secrets = redis, client_secrets(redis)
        self._base = base = f"{prefix}{{{name}}}"
        self.key_open = f"{base}:open"
        self.key_tripped = f"{base}:tripped"
        self.key_ok = f"{base}:ok"
        self.key_leases: tuple[str, ...] = ()
        self._scripts: dict[str, Any] = register_scripts(self.client)
        self._breaker: weakref.ReferenceType[CircuitBreaker] | None = None
        self._mu = threading.Lock()  # guards the fields below; never held during I/O
        self._pending: str | None = None  # the local decision not yet published
        self._done: list[tuple[str, str, bool | None]] = []  # (lease key, holder, outcome)
        self._held: list[tuple[int, str, str]] = []  # (token, lease key, holder)
        self._busy_until = 0.0  # lease refused: reject locally until then
        self._adopting: int | None = None  # thread id while adopting the shared state
        self._seq = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0
        self._pid = os.getpid()
        #: False while Redis is unreachable: the replica runs on its local breaker.
        self.available = True
        #: Why Redis is unavailable (no secrets), or None.
        self.error: str | None = None
        #: Wall-clock time Redis became unavailable, or None.
        self.unavailable_since: float | None = None
        #: Wall-clock time of the last successful sync, or None.
        self.synced_at: float | None = None
        #: The fleet's state at the last sync: closed, open or half-open.
        self.shared_state: str | None = None

    # -- wiring ----------------------------------------------------------------------

    def attach(self, breaker: CircuitBreaker, *, start: bool = True) -> RedisBreakerStore:
        """Share ``breaker``: sync once now, then (``start``) keep syncing in a thread.

        The first sync runs here, so a replica starting while the fleet is
        open starts open; if Redis does not answer, the store starts
        unavailable and the breaker works on its own.
        """
        if breaker.shared is not None:
            raise ConfigurationError(
                "breaker", "is already shared.", "Call share_breaker() once per engine."
            )
        n = breaker.policy.half_open_max_calls
        self.key_leases = tuple(f"{self._base}:probe:{i}" for i in range(n))
        self._breaker = weakref.ref(breaker)
        breaker.listeners.append(self)
        breaker.shared = self
        if breaker.state is not CLOSED:
            self._pending = breaker.state if breaker.state is OPEN else None
        self.sync()
        if start:
            self._thread = threading.Thread(
                target=self._run, name=f"resilient_db-fleet-{self.name}", daemon=True
            )
            self._thread.start()
            track_store(self)  # a forked child restarts it (_fork.py)
        return self

    def close(self) -> None:
        """Stop syncing, give back held leases, detach from the breaker."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.socket_timeout + 1.0)
        b = self._breaker() if self._breaker is not None else None
        if b is not None:
            if b.shared is self:
                b.shared = None
            if self in b.listeners:
                b.listeners.remove(self)
        with self._mu:
            leases = [(key, holder) for _, key, holder in self._held]
            leases += [(key, holder) for key, holder, _ in self._done]
            self._held, self._done = [], []
        if self.available:
            for key, holder in leases:
                try:
                    self._scripts["lease"](keys=[key], args=[holder, 0])
                except Exception:  # best effort: the lease expires on its own
                    break
        if self._owns_client:
            with contextlib.suppress(Exception):
                self.client.close()

    def _all_keys(self) -> list[str]:
        return [self.key_open, self.key_tripped, self.key_ok, *self.key_leases]

    # -- breaker hooks (called by the CircuitBreaker) --------------------------------

    def state_change(self, cb: Any, old: Any, new: Any) -> None:
        """Breaker listener: queue the local decision for publication (no I/O here)."""
        if threading.get_ident() == self._adopting:
            return  # the fleet's own state being adopted: nothing to tell the fleet
        if new in (OPEN, CLOSED):
            with self._mu:
                self._pending = str(new)
            self._wake.set()

    def acquire_probe(self, token: int) -> float | None:
        """Take a fleet-wide probe lease for a would-be probe (one bounded Redis call).

        Returns None when the probe may run (a lease was granted, or Redis is
        unavailable and the local breaker decides alone), else the seconds
        until a lease may be free.
        """
        b = self._breaker() if self._breaker is not None else None
        if not self.available or b is None or os.getpid() != self._pid:
            return None
        now = b.clock()
        with self._mu:
            if now < self._busy_until:
                return self._busy_until - now
            self._seq += 1
            holder = f"{self.replica}:{self._seq}"
        try:
            slot, ms = self._scripts["acquire"](
                keys=[self.key_open, self.key_tripped, *self.key_leases],
                args=[holder, int(self.lease_ttl * 1000)],
            )
        except Exception as e:
            self._unavailable(e)
            return None  # Redis trouble never rejects a call
        slot, ms = int(slot), int(ms)
        if slot > 0:
            with self._mu:
                self._held.append((token, self.key_leases[slot - 1], holder))
            self._wake.set()  # renew the lease while the probe runs
            return None
        if slot == -2:  # the fleet closed meanwhile: probe on (the local breaker decides)
            self._wake.set()
            return None
        wait = ms / 1000.0 if ms > 0 else self.staleness
        with self._mu:
            self._busy_until = now + min(wait, self.staleness)
        if slot == -1:  # reopened elsewhere: follow at the next sync, which is now
            self._wake.set()
        return wait

    def probe_done(self, token: int | bool, outcome: bool | None) -> None:
        """A probe ended: queue its lease's release (and success) for the thread (no I/O)."""
        with self._mu:
            for i, (held_token, key, holder) in enumerate(self._held):
                if token is True or held_token == token:
                    del self._held[i]
                    self._done.append((key, holder, outcome))
                    break
            else:
                return
        self._wake.set()

    # -- the sync cycle --------------------------------------------------------------

    def sync(self) -> bool:
        """One cycle: publish the local decision, settle leases, adopt the fleet's state.

        Runs in the background thread; tests call it directly. Returns False
        (and marks the store unavailable) when Redis did not answer.
        """
        b = self._breaker() if self._breaker is not None else None
        if b is None or os.getpid() != self._pid:
            return False
        with self._mu:
            pending, self._pending = self._pending, None
            done, self._done = self._done, []
            held = list(self._held)
        try:
            if pending == OPEN:
                left = b.retry_in()
                ms = int((b.policy.reset_timeout if left is None else left) * 1000)
                why = b.last_failure or ("forced open by an operator" if left is None else "open")
                self._scripts["open"](
                    keys=[self.key_open, self.key_tripped, self.key_ok],
                    args=[self.replica, ms, TRIPPED_TTL_MS, f"{why} [replica {self.replica}]"],
                )
            elif pending == CLOSED:
                self._scripts["close"](keys=self._all_keys())
            pending = None
            for key, holder, outcome in done:
                if outcome:
                    self._scripts["probe_ok"](
                        keys=[key, *self._all_keys()],
                        args=[holder, b.policy.success_threshold, TRIPPED_TTL_MS],
                    )
                else:
                    self._scripts["lease"](keys=[key], args=[holder, 0])
            for _, key, holder in held:
                self._scripts["lease"](keys=[key], args=[holder, int(self.lease_ttl * 1000)])
            version = b.transitions
            ms, why = self._scripts["read"](keys=[self.key_open, self.key_tripped])
        except Exception as e:
            # unsettled leases expire on their own; the local decision waits for Redis
            if pending is not None:
                with self._mu:
                    if self._pending is None:
                        self._pending = pending
            self._unavailable(e)
            return False
        ms = int(ms)
        reason = why.decode("utf-8", "replace") if isinstance(why, bytes) else str(why or "")
        if ms > 0:
            state, left = OPEN, ms / 1000.0
        else:
            state, left = (HALF_OPEN if reason else CLOSED), 0.0
        self.shared_state = state
        if state == OPEN or state != b.state:
            self._adopting = threading.get_ident()
            try:
                b.adopt(state, left, unless_changed=version, reason=reason or None)
            finally:
                self._adopting = None
        self._available()
        return True

    def _interval(self) -> float:
        if self._held:
            return min(self.staleness, self.lease_ttl / 3)
        return self.staleness

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                ok = self.sync()
            except Exception as e:  # the thread must never die
                self._unavailable(e)
                ok = False
            if self._breaker is None or self._breaker() is None:
                return  # the engine is gone
            if ok:
                self._wake.wait(self._interval())
            else:
                pause = min(MAX_BACKOFF, self.staleness * 2 ** min(self._failures, 10))
                self._stop.wait(pause * random.uniform(0.5, 1.0))


def share_breaker(
    engine: Any,
    redis: Any,
    *,
    name: str | None = None,
    staleness: float = 0.5,
    lease_ttl: float | None = None,
    socket_timeout: float = 0.2,
    start: bool = True,
) -> RedisBreakerStore:
    """Share ``engine``'s circuit breaker with every replica using ``name`` on ``redis``.

    ``redis`` is a URL or a client; ``name`` defaults to the engine's name.
    Returns the attached :class:`RedisBreakerStore` (``status()``,
    ``available``, ``close()``). ``start=False`` skips the background thread
    (tests drive :meth:`RedisBreakerStore.sync` themselves). Call it in each
    worker process after forking.
    """
    breaker = breaker_of(engine)
    store = RedisBreakerStore(
        redis,
        name if name is not None else resilience_of(engine).name,
        staleness=staleness,
        lease_ttl=lease_ttl,
        socket_timeout=socket_timeout,
    )
    return store.attach(breaker, start=start)
