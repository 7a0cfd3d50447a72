"""Finding out a silent database in seconds: suspicion, an out-of-band probe, a verdict.

A call on an established connection that stays silent for
``BreakerPolicy.probe_after`` seconds makes the engine suspicious (the
watchdog's scan tells its :class:`Monitor`). One probe per engine then asks
the server directly, on a fresh TCP connection and with a budget of
``BreakerPolicy.probe_timeout`` seconds, whether it answers at all:

- PostgreSQL: an ``SSLRequest``, answered with one byte before any
  authentication (the server logs nothing for it);
- MariaDB/MySQL: the server's greeting, sent as soon as it accepts; the
  handshake is then completed with PyMySQL, so the server never counts the
  probe as an aborted connect (``max_connect_errors``).

No answer: the breaker opens at once, the engine's calls in flight are cut
with an explained ``read_timeout``, and nobody waits for a connection. An
answer: the slow calls are legitimate and run on to their own deadline. The
verdict is about reaching the server, so it holds behind a brownout (one late
reply is still a reply) and never cancels a long query on a healthy server.
After an answer, a call silent for a few seconds has its own session looked up
on the server (:mod:`._sessions`): one the server finished with long ago lost
its reply on the way, and is cut too.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from ._events import ProbeVerdict, RepliesLost
from ._sessions import STUCK_AFTER, idle_sessions, session_params
from ._state import Resilience
from ._watchdog import WATCHDOG, Slot
from .classify import Target

__all__ = ["Monitor", "answers", "probeable"]

logger = logging.getLogger("resilient_db.probe")

_SSL_REQUEST = struct.pack("!ii", 8, 80877103)
_UNREACHED = ("connect ",)  # verdicts of a connection that was never accepted
_CONFIRM = 0.25  # seconds: the confirming probe's budget
_LOST = (
    "the connection's network path is broken (a NAT, firewall or load balancer dropped "
    "the flow) while new connections get through, so the breaker stays closed."
)


class Monitor:
    """One engine's silence detector and probe (set on ``Resilience.monitor``)."""

    def __init__(self, r: Resilience, open_: Callable[..., Any] | None = None) -> None:
        """``open_(r, dialect, cargs, cparams)`` opens a session to look sessions up with."""
        b = r.policy.breaker
        assert b.probe_after is not None
        self.probe_after: float = b.probe_after
        self.budget = b.probe_timeout
        self._r = weakref.ref(r)
        self._lock = threading.Lock()
        #: True while a probe is out: nobody waits for a connection meanwhile
        self.probing = False
        self._done = threading.Event()  # set while no probe is out
        self._done.set()
        self._next_at = 0.0
        #: why the last probe found the database unreachable; None once it answers again
        self.unreachable: str | None = None
        self.probes = 0
        self.failed = 0
        #: (dialect, cargs, cparams) of the last successful connect: a MySQL probe logs
        #: in with the cparams, a session lookup connects with all three
        self.connect_args: tuple[Any, Any, dict[str, Any]] | None = None
        self._open = open_
        self._lookup_at = 0.0  # no session lookup before this (one every STUCK_AFTER)
        #: calls cut because their session was idle on the server (their reply was lost)
        self.lost_replies = 0
        #: when the last probe that got an answer finished, and how long the answer took
        self.answered_at = -1.0
        self.answered_in = 0.0

    def suspect(self, now: float) -> None:
        """A call has been silent for ``probe_after`` seconds (the watchdog's thread)."""
        if self.probing or now < self._next_at:
            return
        with self._lock:
            if self.probing or now < self._next_at:
                return
            self.probing = True
            self._done.clear()
        threading.Thread(target=self._run, name="resilient-db-probe", daemon=True).start()

    @property
    def can_probe(self) -> bool:
        """True when :func:`answers` can ask this engine's server (a TCP or socket host)."""
        r = self._r()
        return r is not None and probeable(r.target)

    def reachable_note(self, now: float, recent: float = 10.0) -> str | None:
        """What the last probe said, for a connect timeout's diagnosis; None if none recently.

        A connect that timed out while probes find the server answering met a
        slow server, not a gone one: the diagnosis says so.
        """
        ago = now - self.answered_at
        if self.answered_at < 0 or ago > recent or self.unreachable is not None:
            return None
        if not self.can_probe:  # nothing was asked: no verdict to report
            return None
        return (
            f"A probe {ago:.1f}s earlier got the server's answer in {self.answered_in:.2f}s: "
            "it is reachable but too slow to complete a connection in time (a brownout, an "
            "overloaded server or a slow network), so this timeout does not count for the "
            "breaker."
        )

    def verdict_within(self) -> float:
        """The longest a probe takes from start to verdict (its budget and the confirmation)."""
        return self.budget + min(_CONFIRM, self.budget)

    def wait(self, timeout: float) -> bool:
        """Block until no probe is out (a thread, never the event loop); False on timeout."""
        return self._done.wait(timeout)

    def _run(self) -> None:
        r = self._r()
        answered = False
        try:
            if r is None:
                return
            self.probes += 1
            t0 = time.monotonic()
            kwargs = self.connect_args[2] if self.connect_args is not None else {}
            reason = answers(r.target, self.budget, kwargs)
            took = time.monotonic() - t0
            if reason is not None and not reason.startswith(_UNREACHED):
                # connected, then silence or a reset: confirm on another fresh connection,
                # briefly, so a probe that met a blip that has healed (a stall, a proxy or
                # load balancer resetting its flows) does not trip
                reason = answers(r.target, min(_CONFIRM, self.budget), kwargs)
            if reason is None:
                self.unreachable = None
                self.answered_in, self.answered_at = took, time.monotonic()
                r.events.emit(ProbeVerdict(r.name, True, None, 0))
                answered = True
            else:
                self._unreachable(r, reason)
        except Exception:  # pragma: no cover - a probe must never kill its thread loudly
            logger.debug("probe failed unexpectedly", exc_info=True)
        finally:
            self._next_at = time.monotonic() + self.probe_after
            self.probing = False
            self._done.set()
        if answered and r is not None:  # after the verdict: nobody waits on the lookup
            try:
                self._lost_replies(r)
            except Exception:  # pragma: no cover - as above
                logger.debug("session lookup failed unexpectedly", exc_info=True)

    def _lost_replies(self, r: Resilience) -> None:
        """The server answers: cut the silent calls whose session it finished with."""
        args, open_ = self.connect_args, self._open
        now = time.monotonic()
        if args is None or open_ is None or now < self._lookup_at:
            return
        due = [
            s
            for s in WATCHDOG.slots()
            if s.monitor is self
            and s.session is not None
            and s.deadline
            and not s.fired
            and now - s.armed_at >= STUCK_AFTER
        ]
        if not due:
            return
        self._lookup_at = now + STUCK_AFTER  # a long query is looked up every few seconds
        armed = {s: s.armed_at for s in due}
        silent = {s.session: now - s.armed_at for s in due if s.session is not None}
        dialect, cargs, cparams = args
        params = session_params(r.driver or "", cparams, self.budget)
        idle = idle_sessions(
            r.target.dialect or "", lambda: open_(r, dialect, cargs, params), silent, self.budget
        )
        cuts = []
        for s in due:
            idle_for = idle.get(s.session) if s.session is not None else None
            if idle_for is None or s.armed_at != armed[s]:
                continue  # not idle, or that call ended meanwhile (_cut skips a disarmed one)
            why = (
                f"{r.target.where} finished this call {idle_for:.1f}s before (its session "
                f"is idle on the server) but the reply never arrived: {_LOST}"
            )
            cuts.append((s, why))
        cut = _cut(cuts)
        if cut:
            self.lost_replies += cut
            why = f"{r.target.where} answers, but had sent replies that never arrived: {_LOST}"
            r.events.emit(RepliesLost(r.name, why, cut))  # logged at WARNING

    def _unreachable(self, r: Resilience, reason: str) -> None:
        """No answer: open the breaker, cut the calls in flight, report the verdict."""
        self.failed += 1
        diagnosis = (
            f"{r.target.where} stopped answering: a probe on a fresh connection got no "
            f"reply within {self.budget:g}s ({reason}); the network is partitioned or "
            "the server hangs."
        )
        self.unreachable = diagnosis
        if r.breaker is not None:
            r.breaker.trip(diagnosis)
        slots = WATCHDOG.slots()
        cut = _cut([(s, diagnosis) for s in slots if s.monitor is self and s.deadline])
        r.events.emit(ProbeVerdict(r.name, False, diagnosis, cut))  # logged at WARNING


def _cut(cuts: list[tuple[Slot, str]]) -> int:
    """Make each armed slot's call due now, with its reason; shut them down at once."""
    now = time.monotonic()
    cut = 0
    for slot, why in cuts:
        if slot.deadline and not slot.fired:
            slot.cut = why
            slot.deadline = min(slot.deadline, now)  # due now
            cut += 1
    if cut:
        WATCHDOG.scan()  # not at the watchdog's next tick
    return cut


def probeable(target: Target) -> bool:
    """True when :func:`answers` really asks the server (PostgreSQL, MariaDB/MySQL, a host)."""
    return bool(target.host) and target.dialect in ("postgresql", "mysql", "mariadb")


def answers(target: Target, budget: float, connect_kwargs: dict[str, Any]) -> str | None:
    """Ask the server whether it answers at all; None if it does, else why not.

    A server that cannot be probed this way (no TCP host, another dialect) is
    taken to answer: then the calls' own deadlines decide, as without probes.
    """
    if target.dialect == "postgresql":
        return _probe_pg(target, budget)
    if target.dialect in ("mysql", "mariadb"):
        return _probe_mysql(target, budget, connect_kwargs)
    return None


def _open(target: Target, budget: float, default_port: int) -> socket.socket | str:
    host = target.host
    if not host:
        return "no host"
    port = int(target.port or default_port)
    deadline = time.monotonic() + budget
    try:
        if host.startswith("/"):  # a Unix-domain socket directory (PostgreSQL)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(budget)
            sock.connect(f"{host}/.s.PGSQL.{port}")
        else:
            sock = socket.create_connection((host, port), timeout=budget)
    except TimeoutError:
        return "connect timed out"
    except OSError as e:
        return f"connect failed: {e.strerror or type(e).__name__}"
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    return sock


def _probe_pg(target: Target, budget: float) -> str | None:
    sock = _open(target, budget, 5432)
    if isinstance(sock, str):
        return None if sock == "no host" else sock
    with contextlib.closing(sock):
        try:
            sock.sendall(_SSL_REQUEST)
            reply = sock.recv(1)
        except TimeoutError:
            return "no reply"
        except OSError as e:
            return f"connection failed: {e.strerror or type(e).__name__}"
    return None if reply else "connection closed without a reply"


def _probe_mysql(target: Target, budget: float, connect_kwargs: dict[str, Any]) -> str | None:
    sock = _open(target, budget, 3306)
    if isinstance(sock, str):
        return None if sock == "no host" else sock
    try:
        greeting = sock.recv(4, socket.MSG_PEEK)
    except TimeoutError:
        sock.close()
        return "no greeting"
    except OSError as e:
        sock.close()
        return f"connection failed: {e.strerror or type(e).__name__}"
    if not greeting:
        sock.close()
        return "connection closed without a greeting"
    threading.Thread(
        target=_finish_mysql_handshake, args=(sock, target, connect_kwargs), daemon=True
    ).start()
    return None


_MYSQL_KEYS = ("user", "password", "database", "db", "charset", "ssl", "program_name")


def _finish_mysql_handshake(sock: socket.socket, target: Target, kwargs: dict[str, Any]) -> None:
    """Log in and out, so the server does not count the probe as an aborted connect."""
    try:
        from ._pymysql import Connection

        args = {k: kwargs[k] for k in _MYSQL_KEYS if k in kwargs}
        if "db" in args:
            args.setdefault("database", args.pop("db"))
        conn = Connection(
            host=target.host,
            port=int(target.port or 3306),
            defer_connect=True,
            connect_timeout=10,
            read_timeout=10,
            **args,
        )
        conn.connect(sock)
        conn.close()
    except Exception:
        with contextlib.suppress(Exception):
            sock.close()
