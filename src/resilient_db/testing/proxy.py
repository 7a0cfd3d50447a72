"""A TCP fault-injection proxy for testing database clients.

:class:`FaultProxy` sits between a database client and a real database server.
It forwards bytes unchanged until told to misbehave: refuse connections, swallow
traffic, add latency, cap bandwidth, reset connections, or drop the reply to a
``COMMIT``.  It runs its own asyncio event loop in a background daemon thread,
so it can be driven from ordinary synchronous tests::

    with FaultProxy("127.0.0.1", 5432) as proxy:
        engine = create_engine(f"postgresql+psycopg://postgres@{proxy.host}:{proxy.port}/test")
        proxy.blackhole()
        ...
        proxy.passthrough()

Every fault method is thread-safe and returns only once the change is in effect
inside the proxy's event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any, TypeVar

from ..config import _check_finite
from ._faults import Fault, ScheduleStep
from ._proxy_loop import ProxyLoop

__all__ = ["Fault", "FaultProxy", "ScheduleStep"]

_T = TypeVar("_T")


class FaultProxy(ProxyLoop):
    """A TCP proxy between a database client and server that injects network faults.

    The proxy listens on ``listen_host:listen_port`` (an ephemeral port by
    default; read it from :attr:`port` after :meth:`start`) and forwards every
    accepted connection to ``upstream_host:upstream_port``.  Use it as a context
    manager, or call :meth:`start` and :meth:`close` yourself.

    Fault methods may be called from any thread except the proxy's own; each
    returns once the change is in effect.  :meth:`passthrough` restores a
    healthy network and clears every other fault.  :meth:`refuse` and
    :meth:`blackhole` change the mode (what happens to new connections and to
    forwarding); latency, bandwidth, :meth:`reset_after` and the one-shot
    commit faults are independent settings that stay until changed or cleared.

    Args:
        upstream_host: Address of the real server.
        upstream_port: Port of the real server.
        listen_host: Address to listen on.
        listen_port: Port to listen on; 0 picks a free port.
        connect_timeout: Seconds allowed to connect upstream; on failure the
            client connection is reset.
        op_timeout: Seconds a control call waits for the event loop.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        connect_timeout: float = 5.0,
        op_timeout: float = 10.0,
    ) -> None:
        super().__init__(upstream_host, upstream_port, listen_host, listen_port, connect_timeout)
        self._op_timeout = op_timeout

        self._state_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FaultProxy:
        """Start the event-loop thread and begin listening; return ``self``.

        Calling it again while running is a no-op.  A closed proxy cannot be
        restarted.
        """
        with self._state_lock:
            if self._closed:
                raise RuntimeError("FaultProxy has been closed and cannot be restarted")
            if self._loop is not None:
                return self
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=self._run_loop,
                args=(loop,),
                name=f"FaultProxy->{self._upstream_host}:{self._upstream_port}",
                daemon=True,
            )
            thread.start()
            self._loop, self._thread = loop, thread
        try:
            self._call(self._listen)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop listening, close every connection and join the loop thread.

        Idempotent; safe to call on a proxy that was never started.
        """
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if threading.current_thread() is thread:
            raise RuntimeError("FaultProxy.close() cannot be called from the proxy's own loop")
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(self._op_timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(self._op_timeout)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<FaultProxy {self._listen_host}:{self._port} -> "
            f"{self._upstream_host}:{self._upstream_port} mode={self.mode.value}>"
        )

    # ------------------------------------------------------------------ properties

    @property
    def host(self) -> str:
        """The address clients should connect to."""
        return self._listen_host

    @property
    def port(self) -> int:
        """The port clients should connect to (fixed for the proxy's lifetime once started)."""
        return self._port

    @property
    def upstream(self) -> tuple[str, int]:
        """The ``(host, port)`` of the real server."""
        return (self._upstream_host, self._upstream_port)

    @property
    def running(self) -> bool:
        """Whether the proxy has been started and not yet closed."""
        return self._loop is not None and not self._closed

    @property
    def mode(self) -> Fault:
        """The current mode: ``Fault.PASSTHROUGH``, ``Fault.REFUSE`` or ``Fault.BLACKHOLE``."""
        if self._blackhole:
            return Fault.BLACKHOLE
        if self._lsock is None and self._loop is not None:
            return Fault.REFUSE
        return Fault.PASSTHROUGH

    @property
    def commit_fault_armed(self) -> bool:
        """Whether a one-shot commit fault is waiting for the next COMMIT."""
        return self._commit_fault is not None

    @property
    def connections_total(self) -> int:
        """Client connections accepted since start (or :meth:`reset_counters`)."""
        return self._connections_total

    @property
    def active_connections(self) -> int:
        """Client connections currently open through the proxy."""
        return self._active_connections

    @property
    def bytes_up(self) -> int:
        """Bytes forwarded client -> server."""
        return self._bytes_up

    @property
    def bytes_down(self) -> int:
        """Bytes forwarded server -> client."""
        return self._bytes_down

    @property
    def commits_seen(self) -> int:
        """Client chunks recognised as carrying a COMMIT statement."""
        return self._commits_seen

    @property
    def errors(self) -> tuple[BaseException, ...]:
        """Unexpected exceptions raised inside the proxy's tasks (should stay empty)."""
        return tuple(self._errors)

    def reset_counters(self) -> None:
        """Zero :attr:`connections_total`, :attr:`bytes_up`, :attr:`bytes_down` and
        :attr:`commits_seen`."""
        self._call(self._do_reset_counters)

    # ------------------------------------------------------------------ faults

    def passthrough(self) -> None:
        """Restore a healthy network: listen, forward, and clear every other fault.

        Connections that already lost data to :meth:`blackhole` stay silent
        (their byte streams can no longer be resynchronised).
        """
        self._apply(Fault.PASSTHROUGH, ())

    def refuse(self) -> None:
        """Close the listening socket so new connects fail with ECONNREFUSED.

        Existing connections keep forwarding; :meth:`passthrough` or
        :meth:`blackhole` listen again on the same port.
        """
        self._apply(Fault.REFUSE, ())

    def blackhole(self) -> None:
        """Accept new connections but never send them a byte; stop all forwarding.

        Data arriving on existing connections, in either direction, is silently
        dropped.  A connection that had data dropped stays silent for good.
        """
        self._apply(Fault.BLACKHOLE, ())

    def latency(self, seconds: float, jitter: float = 0.0) -> None:
        """Delay each forwarded chunk by ``seconds`` plus a uniform ``[0, jitter]`` extra.

        ``latency(0)`` removes the delay.
        """
        self._apply(Fault.LATENCY, (seconds, jitter))

    def bandwidth(self, bytes_per_second: float | None) -> None:
        """Cap each direction of each connection to ``bytes_per_second``; ``None`` removes it."""
        self._apply(Fault.BANDWIDTH, (bytes_per_second,))

    def reset_all(self) -> int:
        """RST every open connection now (both client and server sides).

        Returns:
            The number of connections reset.
        """
        return self._call(self._do_reset_all)

    def reset_after(self, nbytes: int | None) -> None:
        """Reset each connection once ``nbytes`` have been forwarded server -> client.

        Applies to new connections and, counting from now, to existing ones;
        ``None`` removes the limit.
        """
        self._apply(Fault.RESET_AFTER, (nbytes,))

    def drop_commit_reply(self) -> None:
        """One-shot: forward the next COMMIT, swallow the server's reply, then RST the client.

        The transaction is committed on the server but the client sees a
        connection failure.  Fires once (on any connection), then disarms.
        """
        self._apply(Fault.DROP_COMMIT_REPLY, ())

    def lose_commit_reply(self) -> None:
        """One-shot: forward the next COMMIT, then drop that connection's traffic, keeping it open.

        The server commits and replies; the reply never arrives and the client's
        socket stays open and silent, as when a NAT, firewall or load balancer
        drops one flow while new connections get through. Fires once (on any
        connection), then disarms.
        """
        self._apply(Fault.LOSE_COMMIT_REPLY, ())

    def reset_before_commit(self) -> None:
        """One-shot: RST the connection as soon as the client sends COMMIT, without forwarding it.

        The server never sees the COMMIT, so the transaction is rolled back.
        Fires once, then disarms.
        """
        self._apply(Fault.RESET_BEFORE_COMMIT, ())

    def schedule(self, steps: Iterable[ScheduleStep]) -> concurrent.futures.Future[None]:
        """Apply faults at times relative to this call, inside the proxy's loop.

        Each step is ``(delay_s, fault, *args)`` where ``fault`` is a
        :class:`Fault` or its string value and ``args`` are the arguments of
        the matching method, e.g.
        ``[(0, "blackhole"), (2.5, "passthrough"), (3, "latency", 0.1)]``.
        Steps run in order of delay.  Arguments are validated before this
        returns.

        Returns:
            A future that completes when the last step has been applied; cancel
            it to abandon the remaining steps.
        """
        start = time.monotonic()
        plan: list[tuple[float, Callable[[], Coroutine[Any, Any, Any]]]] = []
        for step in steps:
            delay = float(step[0])
            if delay < 0:
                raise ValueError(f"schedule delay must be >= 0, got {delay!r}")
            plan.append((delay, self._bind(Fault(step[1]), tuple(step[2:]))))
        plan.sort(key=lambda item: item[0])
        loop = self._require_loop()
        return asyncio.run_coroutine_threadsafe(self._run_schedule(start, plan), loop)

    # ------------------------------------------------------------------ plumbing

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or self._closed:
            raise RuntimeError("FaultProxy is not running; call start() first")
        if threading.current_thread() is self._thread:
            raise RuntimeError("FaultProxy methods cannot be called from the proxy's own loop")
        return loop

    def _call(self, fn: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        loop = self._require_loop()
        future = asyncio.run_coroutine_threadsafe(fn(), loop)
        try:
            return future.result(self._op_timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def _apply(self, fault: Fault, args: tuple[Any, ...]) -> None:
        self._call(self._bind(fault, args))

    def _bind(self, fault: Fault, args: tuple[Any, ...]) -> Callable[[], Coroutine[Any, Any, Any]]:
        """Validate ``args`` for ``fault`` and return a coroutine factory applying it."""

        def arity(low: int, high: int) -> None:
            if not low <= len(args) <= high:
                raise TypeError(f"{fault.value} takes {low}..{high} arguments, got {len(args)}")

        if fault is Fault.LATENCY:
            arity(1, 2)
            seconds = _check_finite("seconds", args[0])
            jitter = _check_finite("jitter", args[1] if len(args) > 1 else 0.0)
            return lambda: self._do_latency(seconds, jitter)
        if fault is Fault.BANDWIDTH:
            arity(1, 1)
            bps = None if args[0] is None else _check_finite("bytes_per_second", args[0], minimum=0)
            return lambda: self._do_bandwidth(bps)
        if fault is Fault.RESET_AFTER:
            arity(1, 1)
            nbytes = None if args[0] is None else int(args[0])
            if nbytes is not None and nbytes < 0:
                raise ValueError("nbytes must be >= 0 (or None to remove the limit)")
            return lambda: self._do_reset_after(nbytes)
        arity(0, 0)
        simple: dict[Fault, Callable[[], Coroutine[Any, Any, Any]]] = {
            Fault.PASSTHROUGH: self._do_passthrough,
            Fault.REFUSE: self._do_refuse,
            Fault.BLACKHOLE: self._do_blackhole,
            Fault.RESET_ALL: self._do_reset_all,
            Fault.DROP_COMMIT_REPLY: lambda: self._do_arm_commit(Fault.DROP_COMMIT_REPLY),
            Fault.RESET_BEFORE_COMMIT: lambda: self._do_arm_commit(Fault.RESET_BEFORE_COMMIT),
            Fault.LOSE_COMMIT_REPLY: lambda: self._do_arm_commit(Fault.LOSE_COMMIT_REPLY),
        }
        return simple[fault]
