"""Per-call deadlines, and the first sign of a silent database.

psycopg (3 and 2) and aiomysql block in ``recv`` for ever when the network goes
silent on an established connection; asyncpg has ``command_timeout``, but it
arms and cancels an event-loop timer for every protocol message exchange. Each
watched connection gets a :class:`Slot`; a call arms it with a deadline and
disarms it when done (two attribute writes). One daemon thread sleeps until the
soonest deadline or silence threshold of the armed slots (at most ``idle``
seconds) and, when a deadline has passed, shuts the socket down so the blocked
call fails at once and SQLAlchemy discards the connection. A call armed with a
deadline sooner than the thread's next wake-up wakes it; a healthy engine's
calls never do, so the thread wakes about once a second, not twenty times.
A slot's engine may also ask to hear of a call silent for longer than its
``probe_after`` (:class:`Suspicious`): the same scan tells it, and the engine
probes the database (:mod:`resilient_db._probe`).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol

__all__ = ["WATCHED_DRIVERS", "Slot", "Watchdog", "socket_fileno"]

# Drivers without a client-side read timeout: guarded by the watchdog.
# asyncpg has command_timeout, but it costs an event-loop timer per protocol exchange.
# PyMySQL has a read timeout of its own, but its calls are watched for silence too.
WATCHED_DRIVERS = frozenset(
    {"psycopg", "psycopg2", "psycopg_async", "aiomysql", "asyncpg", "pymysql"}
)


#: "no deadline": far enough that it never passes, while the call stays watched for silence
FOREVER = 10.0**9


class Suspicious(Protocol):  # pragma: no cover - protocol
    """What a slot's engine offers the watchdog: a threshold and a callback."""

    probe_after: float

    def suspect(self, now: float) -> None:
        """A call has been silent for ``probe_after`` seconds; must not block."""


class Slot:
    """The deadline state of one DBAPI connection.

    ``fired``: the watchdog shut the socket down during the current call.
    ``shot``: it did so although that call still returned (its reply was in,
    but an event loop or a thread ran too late to see it before the
    deadline); the connection is dead and must not serve another call.
    """

    __slots__ = (
        "__weakref__",
        "armed_at",
        "cut",
        "deadline",
        "dog",
        "fd_getter",
        "fired",
        "monitor",
        "own_call",
        "session",
        "shot",
    )

    def __init__(
        self,
        fd_getter: Callable[[], int | None],
        monitor: Suspicious | None = None,
        dog: Watchdog | None = None,
    ) -> None:
        self.deadline = 0.0
        #: the watchdog that scans this slot, woken when a deadline is due before its next scan
        self.dog = dog
        self.armed_at = 0.0
        self.fired = False
        self.shot = False
        self.fd_getter = fd_getter
        self.monitor = monitor
        #: why the engine cut this call before its deadline (the database is unreachable)
        self.cut: str | None = None
        #: the connection's own call deadline while checked out (execution option
        #: ``resilient_db_call_timeout``): -1 none set, else seconds (FOREVER: no deadline)
        self.own_call = -1.0
        #: the server's id of this connection's session, when its engine may look it up
        #: (:mod:`resilient_db._sessions`)
        self.session: int | None = None

    def arm(self, seconds: float) -> float:
        """Arm a deadline ``seconds`` from now, never later than one already armed.

        Returns the deadline that was armed before, for :meth:`disarm`.
        """
        outer = self.deadline
        now = time.monotonic()
        deadline = now + seconds
        if not outer:
            self.armed_at = now
            self.deadline = deadline
        elif deadline < outer:
            self.deadline = deadline
        else:
            return outer
        dog = self.dog
        if dog is not None and deadline < dog.next_wake:
            dog.wake()
        return outer

    def disarm(self, outer: float) -> None:
        """The call ended: restore the deadline that was armed before it."""
        self.deadline = outer

    def returned(self) -> None:
        """The call returned: if the watchdog fired anyway, the connection is ``shot``.

        A call that raised instead leaves ``fired`` for the engine's
        ``handle_error``, which classifies its error as the deadline's.
        """
        if self.fired:
            self.fired = False
            self.shot = True


def socket_fileno(dbapi_connection: object) -> int | None:
    """The socket's file descriptor of a driver connection, or None.

    psycopg 3, psycopg2, PyMySQL, aiomysql and asyncpg connections; None when the
    connection is closed or of an unknown kind.
    """
    pgconn = getattr(dbapi_connection, "pgconn", None)
    if pgconn is not None:
        try:
            return int(pgconn.socket)
        except Exception:
            return None
    fileno = getattr(dbapi_connection, "fileno", None)
    if callable(fileno):
        try:
            return int(fileno())
        except Exception:
            return None
    sock = getattr(dbapi_connection, "_sock", None)
    if sock is None:  # aiomysql: an asyncio stream; asyncpg: an asyncio transport
        transport = getattr(dbapi_connection, "_writer", None) or getattr(
            dbapi_connection, "_transport", None
        )
        try:
            sock = transport.get_extra_info("socket") if transport is not None else None
        except Exception:
            return None
    if sock is not None:
        try:
            return int(sock.fileno())
        except Exception:
            return None
    return None


class Watchdog:
    """Shuts down sockets whose call outlived its deadline."""

    def __init__(
        self,
        tick: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        idle: float = 1.0,
    ) -> None:
        #: how often a call already silent past its threshold is reported again
        self.tick = tick
        #: the longest sleep; shortened to the smallest ``probe_after`` of the slots' engines
        self.idle = idle
        self.clock = clock
        #: when the thread scans next; a deadline armed sooner than this wakes it
        self.next_wake = 0.0
        self._soonest = FOREVER
        self._woken = threading.Event()
        self._slots: weakref.WeakSet[Slot] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.fired = 0

    def slot(self, fd_getter: Callable[[], int | None], monitor: Suspicious | None = None) -> Slot:
        """Register a new slot and make sure the scanning thread runs."""
        s = Slot(fd_getter, monitor, self)
        with self._lock:
            if monitor is not None and monitor.probe_after < self.idle:
                self.idle = monitor.probe_after  # a new slot's silence is checked in time
            self._slots.add(s)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="resilient-db-watchdog", daemon=True
                )
                self._thread.start()
        return s

    def slots(self) -> list[Slot]:
        """The registered slots (of live connections)."""
        with self._lock:
            return list(self._slots)

    def after_fork(self) -> None:
        """In a forked child: forget the parent's slots; the thread restarts with the next slot.

        The parent's sockets are shared with the child: firing one of its slots
        here would shut down a connection the parent is using.
        """
        self._lock = threading.Lock()
        self._slots = weakref.WeakSet()
        self._thread = None
        self._woken = threading.Event()
        self.next_wake = 0.0

    def wake(self) -> None:
        """Scan now: a deadline was armed sooner than the next scan."""
        self._woken.set()

    def scan(self) -> int:
        """Fire every slot whose deadline has passed; returns how many fired.

        Also notes when the soonest deadline or silence threshold of the slots
        still armed falls, for the thread's next wake-up.
        """
        now = self.clock()
        fired = 0
        soonest = FOREVER
        with self._lock:
            slots = list(self._slots)
        for s in slots:
            d = s.deadline
            if not d or s.fired:
                continue
            if now < d:
                soonest = min(soonest, d)
                m = s.monitor
                if m is not None:
                    silent_at = s.armed_at + m.probe_after
                    if now >= silent_at:
                        m.suspect(now)
                        silent_at = now + self.tick  # still silent: report it again soon
                    soonest = min(soonest, silent_at)
                continue
            fd = s.fd_getter()
            if s.deadline != d:  # the call ended (or a new one began) meanwhile
                continue
            s.fired = True  # before the shot: the failing call must see it

            def due(s: Slot = s, d: float = d) -> bool:
                return s.deadline == d

            if fd is not None and fd >= 0 and not _shutdown(fd, due):
                s.fired = False  # the call ended just before the shot: spared
                continue
            fired += 1
        self.fired += fired
        self._soonest = soonest
        return fired

    def _run(self) -> None:
        while True:
            self.next_wake = FOREVER  # a deadline armed during the scan wakes the next sleep
            self._woken.clear()
            try:
                self.scan()
            except Exception:  # pragma: no cover - never let the guard thread die
                self._soonest = self.clock() + self.tick
            now = self.clock()
            wake = min(self._soonest, now + self.idle)
            self.next_wake = wake
            self._woken.wait(max(wake - now, 0.001))


def _shutdown(fd: int, due: Callable[[], bool]) -> bool:
    """Shut the socket down unless ``due()`` says, at the last moment, that the call ended."""
    try:
        dup = os.dup(fd)
    except OSError:
        return due()
    try:
        s = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return due()
    try:
        if not due():
            return False
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.close()
    return True


WATCHDOG = Watchdog()
