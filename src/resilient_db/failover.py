"""Multi-host failover: one logical database served by several hosts.

An engine given ``hosts=[...]`` (or a libpq-style URL ``?host=a:5432&host=b:5433``,
``?host=a,b&port=5432,5433``) connects to one host at a time and picks it on
every new connection:

1. hosts are tried in order: the host in use first, then hosts last seen with
   the wanted role, then hosts of unknown role, then the others (configured
   order breaks ties);
2. each host has its own :class:`~resilient_db.CircuitBreaker` (the policy's
   :class:`~resilient_db.BreakerPolicy`), fed by connect outcomes only, so a
   dead host is skipped without I/O until its reset timeout has passed;
3. a fresh connection's role is read before the pool gets it: PostgreSQL
   ``pg_is_in_recovery()`` and ``transaction_read_only``, MariaDB/MySQL
   ``@@global.read_only`` (never a write probe: an admin user bypasses
   ``read_only``);
4. when no host fits, the engine-level attempt fails: the last driver error
   (all hosts unreachable), :class:`~resilient_db.NoPrimaryError` (a host
   answered but none is writable: a failover is in progress), or
   :class:`~resilient_db.CircuitOpenError` (every host's breaker is open). Only
   these whole-engine failures count for the engine's own breaker, so it opens
   only when every host is failing.

A write refused as read-only (PostgreSQL 25006, MariaDB 1290/1792/1836) on a
``role="primary"`` engine means the primary moved: the host is marked a
standby, the pool is invalidated so every pooled connection is replaced, and
the error is classified ``RetryLevel.TRANSACTION`` (the write was refused, so
re-running the unit of work is safe): :func:`~resilient_db.run_transaction`
re-runs it on the new primary. The error itself is still the driver's
read-only error; its :class:`~resilient_db.ErrorContext` names the host that
refused it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine

from . import _compat
from ._connect import opener
from ._hosts import ROLES, Host, Role
from ._hosts import check_role as check_role
from ._hosts import parse_hosts as parse_hosts
from ._hosts import split_url as split_url
from ._state import conn_state, resilience_of
from ._watchdog import WATCHDOG, WATCHED_DRIVERS, socket_fileno
from .breaker import BreakerSnapshot, CircuitBreaker, Rejected
from .classify import _RULES, Classification, Kind, RetryLevel, Target, _format, classify
from .errors import CircuitOpenError, ConfigurationError, ErrorContext, NoPrimaryError

if TYPE_CHECKING:
    from ._state import Resilience
    from ._types import EngineLike

__all__ = ["ROLES", "Host", "HostStatus", "Role", "hosts_of"]

PRIMARY = "primary"
STANDBY = "standby"

_EXIT = (KeyboardInterrupt, SystemExit, GeneratorExit)
# the attribute a failed connect attempt's error carries: the Target it tried
TARGET_ATTR = "resilient_db_target"

logger = logging.getLogger("resilient_db.failover")


@dataclass(frozen=True, slots=True)
class HostStatus:
    """What a multi-host engine knows about one host (for health checks and operators).

    ``role`` is ``"primary"``, ``"standby"`` or None (never reached, or the
    engine's role is ``"any"`` so it is not checked); ``current`` is True for
    the host new connections go to first.
    """

    host: str
    port: int
    role: str | None
    current: bool
    breaker: BreakerSnapshot | None

    def to_dict(self) -> dict[str, Any]:
        """Return the status as a JSON-serialisable dict."""
        return {
            "host": self.host,
            "port": self.port,
            "role": self.role,
            "current": self.current,
            "breaker": self.breaker.to_dict() if self.breaker is not None else None,
        }


# -- the role probe -----------------------------------------------------------------


def probe_role(dbapi_connection: Any, backend: str) -> str:
    """``"primary"`` when the server accepts writes, else ``"standby"``.

    Reads server state only; never writes (an admin user would bypass
    MariaDB's ``read_only``). Ends the transaction the query opened.
    """
    cursor = dbapi_connection.cursor()
    try:
        if backend == "postgresql":
            cursor.execute(
                "SELECT pg_catalog.pg_is_in_recovery(), "
                "pg_catalog.current_setting('transaction_read_only')"
            )
            row = cursor.fetchone()
            writable = not row[0] and str(row[1]).lower() == "off"
        else:
            cursor.execute("SELECT @@global.read_only")
            row = cursor.fetchone()
            writable = str(row[0]).upper() in ("0", "OFF")
    finally:
        cursor.close()
    dbapi_connection.rollback()
    return PRIMARY if writable else STANDBY


# -- the per-engine state -----------------------------------------------------------


class Failover:
    """Host selection for one multi-host engine (``Resilience.failover``)."""

    def __init__(
        self,
        r: Resilience,
        backend: str,
        hosts: tuple[Host, ...],
        role: Role,
        *,
        clock: Callable[[], float],
        driver: str = "",
    ) -> None:
        self.r = r
        self.backend = backend
        # psycopg and aiomysql have no read timeout: the watchdog bounds the role check
        t = r.policy.timeouts
        self.check_limit = (t.connect or t.call) if driver in WATCHED_DRIVERS else None
        self.hosts = hosts
        self.role = role
        bp = r.policy.breaker
        self.breakers: dict[Host, CircuitBreaker | None] = {
            h: CircuitBreaker(f"{r.name}@{h}", bp, clock=clock) if bp.enabled else None
            for h in hosts
        }
        self.roles: dict[Host, str] = {}
        self.current: Host | None = None
        self._lock = threading.Lock()
        self._targets = {h: dataclasses.replace(r.target, host=h.host, port=h.port) for h in hosts}

    # -- choosing a host --------------------------------------------------------------

    def order(self) -> list[Host]:
        """The hosts in the order the next connect tries them."""
        with self._lock:
            current, roles = self.current, dict(self.roles)
        want = STANDBY if self.role == "prefer-standby" else PRIMARY

        def rank(h: Host) -> int:
            if h == current:
                return 0
            seen = roles.get(h)
            if self.role == "any" or seen == want:
                return 1
            return 2 if seen is None else 3

        return sorted(self.hosts, key=rank)

    def target(self, host: Host) -> Target:
        """The :class:`Target` of one host (for classification and error contexts)."""
        return self._targets[host]

    def connect(
        self,
        dialect: Any,
        cargs: Any,
        cparams: dict[str, Any],
        open_: Callable[[Any, Any, dict[str, Any]], Any],
        rec: Any = None,
    ) -> Any:
        """One engine-level connect attempt: the first host that fits, in :meth:`order`.

        ``rec`` is the pool's connection record being connected (the
        ``do_connect`` event's; SQLAlchemy clears its ``info`` before each
        connect): the chosen host is written into its ``info``, so that errors
        on the connection name that host.
        """
        params = {k: v for k, v in cparams.items() if k != "target_session_attrs"}
        outcomes: list[str] = []
        last_error: BaseException | None = None
        wrong_role = False
        fallback: tuple[Host, Any] | None = None
        for host in self.order():
            b = self.breakers[host]
            probe = 0
            if b is not None:
                try:
                    probe = b.before_call()
                except Rejected:
                    outcomes.append(f"{host} skipped (its breaker is open)")
                    continue
            conn = None
            try:
                conn = open_(dialect, cargs, {**params, "host": host.host, "port": host.port})
                seen = None if self.role == "any" else self._probe(conn)
            except BaseException as e:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                if isinstance(e, _EXIT) or not isinstance(e, Exception):
                    if b is not None:
                        b.release(probe)
                    self._close(fallback)
                    raise
                c = classify(e, phase="connect", target=self.target(host))
                if b is not None:
                    if c.counts_for_breaker:
                        b.record_failure(c.diagnosis, probe)
                    else:
                        b.release(probe)
                with contextlib.suppress(AttributeError, TypeError):
                    setattr(e, TARGET_ATTR, self.target(host))
                outcomes.append(f"{host} {c.kind.value}")
                last_error = e
                continue
            if b is not None:
                b.record_success(probe)
            if seen is not None:
                with self._lock:
                    self.roles[host] = seen
            if self.role == "any" or (seen == STANDBY) == (self.role == "prefer-standby"):
                self._close(fallback)
                return self._chosen(host, conn, rec)
            if self.role == "prefer-standby" and fallback is None:
                fallback = (host, conn)  # a primary serves reads when no standby is up
                continue
            wrong_role = True
            outcomes.append(f"{host} is a {seen}")
            with contextlib.suppress(Exception):
                conn.close()
        if fallback is not None:
            return self._chosen(*fallback, rec)
        raise self._no_host(outcomes, last_error, wrong_role)

    def _probe(self, conn: Any) -> str:
        limit = self.check_limit
        if limit is None:
            return probe_role(conn, self.backend)
        slot = WATCHDOG.slot(lambda: socket_fileno(getattr(conn, "driver_connection", conn)))
        slot.arm(limit)
        try:
            return probe_role(conn, self.backend)
        finally:
            slot.deadline = 0.0

    def _close(self, pair: tuple[Host, Any] | None) -> None:
        if pair is not None:
            with contextlib.suppress(Exception):
                pair[1].close()

    def _chosen(self, host: Host, conn: Any, rec: Any) -> Any:
        with self._lock:
            previous = self.current
            self.current = host
        if rec is not None:
            conn_state(rec).host = host
        if previous is not None and previous != host:
            logger.warning(
                "Engine '%s' moved from %s to %s (role %s).",
                self.r.name,
                previous,
                host,
                self.role,
                extra={
                    "resilient_db": {
                        "event": "failover",
                        "engine": self.r.name,
                        "from": str(previous),
                        "to": str(host),
                        "role": self.role,
                    }
                },
            )
        return conn

    def _no_host(
        self, outcomes: list[str], last_error: BaseException | None, wrong_role: bool
    ) -> BaseException:
        tried = ", ".join(outcomes)
        everywhere = dataclasses.replace(
            self.r.target, host=",".join(str(h) for h in self.hosts), port=None
        )
        if wrong_role:
            template = _RULES[Kind.READ_ONLY][2]
            c = Classification(
                Kind.READ_ONLY, RetryLevel.CONNECT, True, None, _format(template, everywhere)
            )
            ctx = self._context(c, everywhere, "read_only", RetryLevel.CONNECT)
            err = NoPrimaryError(
                f"Engine '{self.r.name}': no host accepts writes ({tried}). A failover is in "
                "progress or the primary is down; connecting is retried.",
                ctx,
            )
            setattr(err, TARGET_ATTR, everywhere)
            return err
        if last_error is not None:
            if len(outcomes) > 1:
                note = f"resilient_db failover: tried {tried}"
                with contextlib.suppress(Exception):
                    last_error.__notes__ = [*getattr(last_error, "__notes__", ()), note]  # type: ignore[attr-defined,unused-ignore]
            return last_error
        c = classify(CircuitOpenError("open"), target=everywhere)
        ctx = self._context(c, everywhere, "circuit_open", RetryLevel.NEVER)
        rejected = CircuitOpenError(
            f"Engine '{self.r.name}': every host's circuit breaker is open ({tried}).", ctx
        )
        setattr(rejected, TARGET_ATTR, everywhere)
        return rejected

    def _context(self, c: Classification, t: Target, kind: str, retry: RetryLevel) -> ErrorContext:
        return ErrorContext.for_target(
            self.r.name, t, c, phase="connect", kind=kind, retry=retry.value
        )

    # -- after connect and on errors ----------------------------------------------------

    def host_of(self, connection: Any) -> Host | None:
        """The host a Connection (or pooled connection) is connected to, if known."""
        st = _compat.record_state(_compat.record_of(connection))
        host = st.host if st is not None else None
        return host if isinstance(host, Host) else None

    def target_of(self, connection: Any) -> Target:
        """The :class:`Target` of a connection's host (the engine's when unknown)."""
        host = self.host_of(connection) if connection is not None else None
        return self.target(host) if host is not None else self.r.target

    def refused_write(self, ctx: Any, c: Classification) -> Classification:
        """``handle_error`` saw READ_ONLY: the primary moved. Re-route and re-classify.

        Marks the host a standby, makes SQLAlchemy discard the connection, and
        the whole pool when that host was the one in use, so the next checkout
        connects to the new primary; the unit of work may then be re-run.
        """
        if self.role != "primary":
            return c
        host = self.host_of(ctx.connection) if ctx.connection is not None else None
        with self._lock:
            was_current = host is None or host == self.current
            if host is not None:
                self.roles[host] = STANDBY
            if was_current:
                self.current = None
        ctx.is_disconnect = True
        ctx.invalidate_pool_on_disconnect = was_current
        others = ", ".join(str(h) for h in self.hosts if h != host)
        return dataclasses.replace(
            c,
            retry=RetryLevel.TRANSACTION,
            diagnosis=f"{c.diagnosis} The pool was invalidated; the next connection goes to "
            f"whichever of {others} is now primary, and the unit of work can be re-run.",
        )

    def select(self, engine: Engine, connect_args: dict[str, Any]) -> Host:
        """One pass over the hosts, outside the pool: the host new connections would use.

        For the startup check, which validates one server; the first host when
        none fits (the check then reports why).
        """
        dialect = engine.dialect
        cargs, cparams = dialect.create_connect_args(engine.url)
        try:
            conn = self.connect(dialect, cargs, {**cparams, **connect_args}, opener(self.r))
        except Exception:
            return self.hosts[0]
        with contextlib.suppress(Exception):
            conn.close()
        return self.current or self.hosts[0]

    def status(self) -> tuple[HostStatus, ...]:
        """A snapshot of every host, in configured order."""
        with self._lock:
            current, roles = self.current, dict(self.roles)
        out = []
        for h in self.hosts:
            b = self.breakers[h]
            out.append(
                HostStatus(h.host, h.port, roles.get(h), h == current, b.snapshot() if b else None)
            )
        return tuple(out)


def attach(engine: Engine, r: Resilience, hosts: tuple[Host, ...], role: Role) -> Failover:
    """Make ``r`` (attached to ``engine``) choose among ``hosts`` on every connect."""
    backend, driver = engine.url.get_backend_name(), getattr(engine.dialect, "driver", "")
    fo = Failover(r, backend, hosts, role, clock=r.clock, driver=driver)
    r.failover = fo
    r.monitor = None  # probes judge one server; a multi-host engine's breakers are per host
    return fo


def hosts_of(engine: EngineLike) -> tuple[HostStatus, ...]:
    """The hosts of a multi-host engine with their last seen role and breaker.

    Raises :class:`~resilient_db.ConfigurationError` for a single-host engine.
    """
    fo = resilience_of(engine).failover
    if fo is None:
        raise ConfigurationError(
            "engine", "has a single host.", "Create it with hosts=[...] to use failover."
        )
    assert isinstance(fo, Failover)
    return fo.status()
