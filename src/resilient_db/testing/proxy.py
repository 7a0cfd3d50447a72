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
import contextlib
import enum
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from types import TracebackType
from typing import Any, TypeAlias, TypeVar

from ..config import _check_finite

__all__ = ["Fault", "FaultProxy", "ScheduleStep"]

_T = TypeVar("_T")

_CHUNK = 65536
_LINGER_RST = struct.pack("ii", 1, 0)
# A COMMIT statement at the start of a query text or after a ';'.  Control bytes
# are skipped so that MySQL query-attribute prefixes do not hide the keyword;
# the word boundary keeps ``SET AUTOCOMMIT = 0`` and ``READ COMMITTED`` out.
_COMMIT_RE = re.compile(rb"(?:^|;)[\x00-\x20]*(?:XA[\x00-\x20]+)?COMMIT\b", re.IGNORECASE)
_PG_QUERY = ord("Q")
_PG_PARSE = ord("P")
_MYSQL_COM_QUERY = 0x03


class Fault(str, enum.Enum):
    """Names of the faults a :class:`FaultProxy` can apply (usable in :meth:`FaultProxy.schedule`).

    ``PASSTHROUGH``, ``REFUSE`` and ``BLACKHOLE`` are also the values of
    :attr:`FaultProxy.mode`.
    """

    PASSTHROUGH = "passthrough"
    REFUSE = "refuse"
    BLACKHOLE = "blackhole"
    RESET_ALL = "reset_all"
    LATENCY = "latency"
    BANDWIDTH = "bandwidth"
    RESET_AFTER = "reset_after"
    DROP_COMMIT_REPLY = "drop_commit_reply"
    RESET_BEFORE_COMMIT = "reset_before_commit"


ScheduleStep: TypeAlias = (
    tuple[float, Fault | str]
    | tuple[float, Fault | str, float | None]
    | tuple[float, Fault | str, float, float]
)
"""One step of :meth:`FaultProxy.schedule`: ``(delay_s, fault, *args)``."""


def _query_texts(data: bytes) -> Iterator[bytes]:
    """Yield SQL texts found in a client->server chunk (PostgreSQL Q/P, MySQL COM_QUERY)."""
    n = len(data)
    # PostgreSQL frontend messages: tag byte + 4-byte big-endian length (incl. itself).
    pos = 0
    while pos + 5 <= n:
        tag = data[pos]
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if length < 4 or not (0x41 <= tag <= 0x5A or 0x61 <= tag <= 0x7A):
            break
        body = data[pos + 5 : pos + 1 + length]
        if tag == _PG_QUERY:
            yield body.split(b"\0", 1)[0]
        elif tag == _PG_PARSE:
            parts = body.split(b"\0", 2)
            if len(parts) >= 2:
                yield parts[1]
        pos += 1 + length
    # MySQL packets: 3-byte little-endian payload length + sequence id + payload.
    pos = 0
    while pos + 5 <= n:
        length = int.from_bytes(data[pos : pos + 3], "little")
        if length == 0:
            break
        if data[pos + 3] == 0 and data[pos + 4] == _MYSQL_COM_QUERY:
            yield data[pos + 5 : pos + 4 + length]
        pos += 4 + length


def _is_commit(data: bytes) -> bool:
    """Whether a client->server chunk carries a COMMIT statement."""
    if b"commit" not in data.lower():
        return False
    return any(_COMMIT_RE.search(text) for text in _query_texts(data))


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Close ``writer``'s socket with SO_LINGER (1, 0) so the peer receives a RST."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


def _write_eof(writer: asyncio.StreamWriter | None) -> None:
    """Half-close ``writer`` (forward a FIN) if it is still open."""
    if writer is None or writer.transport.is_closing():
        return
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()
    else:
        writer.close()


class _Conn:
    """State of one proxied client connection (loop thread only)."""

    __slots__ = (
        "blackholed",
        "client_reader",
        "client_writer",
        "dead",
        "down_budget",
        "server_reader",
        "server_writer",
        "swallowing",
        "task",
    )

    def __init__(self) -> None:
        self.client_reader: asyncio.StreamReader | None = None
        self.client_writer: asyncio.StreamWriter | None = None
        self.server_reader: asyncio.StreamReader | None = None
        self.server_writer: asyncio.StreamWriter | None = None
        # Data was dropped: the byte streams are out of sync, never forward again.
        self.blackholed = False
        # The connection was reset or shut down by the proxy.
        self.dead = False
        # Bytes still allowed server->client before a reset (None: unlimited).
        self.down_budget: int | None = None
        # drop_commit_reply fired: swallow the server's reply, then reset.
        self.swallowing = False
        self.task: asyncio.Task[None] | None = None

    def reset(self) -> None:
        """RST both sides."""
        self.dead = True
        _rst(self.client_writer)
        _rst(self.server_writer)

    def abort(self) -> None:
        """Close both sides at once, without the RST linger trick."""
        self.dead = True
        for writer in (self.client_writer, self.server_writer):
            if writer is not None:
                writer.transport.abort()

    def close(self) -> None:
        """Close both sides gracefully (abort if unsent data is pending)."""
        self.dead = True
        for writer in (self.client_writer, self.server_writer):
            if writer is None:
                continue
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()
            else:
                writer.close()


class FaultProxy:
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
        self._upstream_host = upstream_host
        self._upstream_port = upstream_port
        self._listen_host = listen_host
        self._port = listen_port
        self._connect_timeout = connect_timeout
        self._op_timeout = op_timeout

        self._state_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

        # Everything below is only touched from the loop thread.
        self._lsock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._conns: set[_Conn] = set()
        self._blackhole = False
        self._latency = 0.0
        self._jitter = 0.0
        self._bandwidth: float | None = None
        self._reset_after: int | None = None
        self._commit_fault: Fault | None = None
        self._rng = random.Random()
        self._errors: list[BaseException] = []

        self._connections_total = 0
        self._active_connections = 0
        self._bytes_up = 0
        self._bytes_down = 0
        self._commits_seen = 0

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
        }
        return simple[fault]

    def _run_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            self._errors.append(exc)

    # ------------------------------------------------------------------ loop-side actions

    async def _listen(self) -> None:
        if self._lsock is not None:
            return
        family, type_, proto, _, addr = socket.getaddrinfo(
            self._listen_host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        self._lsock = sock
        self._accept_task = self._spawn(self._accept_loop(sock))

    async def _unlisten(self) -> None:
        task, sock = self._accept_task, self._lsock
        self._accept_task = self._lsock = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if sock is not None:
            sock.close()

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(lsock)
            except OSError:
                if lsock.fileno() == -1:
                    return
                await asyncio.sleep(0.01)  # e.g. EMFILE: back off, keep serving
                continue
            self._connections_total += 1
            conn = _Conn()
            conn.task = self._spawn(self._handle(conn, sock))

    async def _do_passthrough(self) -> None:
        self._blackhole = False
        self._latency = self._jitter = 0.0
        self._bandwidth = None
        self._reset_after = None
        for conn in self._conns:
            conn.down_budget = None
        self._commit_fault = None
        await self._listen()

    async def _do_refuse(self) -> None:
        self._blackhole = False
        await self._unlisten()

    async def _do_blackhole(self) -> None:
        self._blackhole = True
        await self._listen()

    async def _do_latency(self, seconds: float, jitter: float) -> None:
        self._latency, self._jitter = seconds, jitter

    async def _do_bandwidth(self, bps: float | None) -> None:
        self._bandwidth = bps

    async def _do_reset_after(self, nbytes: int | None) -> None:
        self._reset_after = nbytes
        for conn in self._conns:
            conn.down_budget = nbytes

    async def _do_arm_commit(self, fault: Fault) -> None:
        self._commit_fault = fault

    async def _do_reset_counters(self) -> None:
        self._connections_total = self._bytes_up = self._bytes_down = self._commits_seen = 0

    async def _do_reset_all(self) -> int:
        conns = list(self._conns)
        for conn in conns:
            conn.reset()
        tasks = {c.task for c in conns if c.task is not None and not c.task.done()}
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        return len(conns)

    async def _run_schedule(
        self, start: float, plan: list[tuple[float, Callable[[], Coroutine[Any, Any, Any]]]]
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            for delay, action in plan:
                wait = start + delay - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await action()
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _shutdown(self) -> None:
        await self._unlisten()
        for conn in list(self._conns):
            conn.abort()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # Let the transports run their connection_lost callbacks (closing sockets).
        for _ in range(3):
            await asyncio.sleep(0)

    # ------------------------------------------------------------------ forwarding

    async def _handle(self, conn: _Conn, sock: socket.socket) -> None:
        self._conns.add(conn)
        self._active_connections += 1
        try:
            try:
                conn.client_reader, conn.client_writer = await asyncio.open_connection(
                    sock=sock, limit=_CHUNK
                )
            except OSError:
                sock.close()
                return
            if self._blackhole:
                conn.blackholed = True
                await self._discard_client(conn)
                return
            try:
                conn.server_reader, conn.server_writer = await asyncio.wait_for(
                    asyncio.open_connection(self._upstream_host, self._upstream_port, limit=_CHUNK),
                    self._connect_timeout,
                )
            except (OSError, asyncio.TimeoutError):
                conn.reset()
                return
            if conn.dead:  # reset while connecting upstream
                conn.reset()
                return
            conn.down_budget = self._reset_after
            up = asyncio.get_running_loop().create_task(self._pump_up(conn))
            down = asyncio.get_running_loop().create_task(self._pump_down(conn))
            try:
                await asyncio.gather(up, down)
            finally:
                for pump in (up, down):
                    pump.cancel()
                await asyncio.wait((up, down))
        finally:
            conn.close()
            self._conns.discard(conn)
            self._active_connections -= 1

    async def _discard_client(self, conn: _Conn) -> None:
        """Read and drop everything a blackholed client sends until it goes away."""
        assert conn.client_reader is not None
        with contextlib.suppress(OSError):
            while not conn.dead and await conn.client_reader.read(_CHUNK):
                pass

    def _silenced(self, conn: _Conn) -> bool:
        if self._blackhole or conn.blackholed:
            conn.blackholed = True
            return True
        return False

    async def _pump_up(self, conn: _Conn) -> None:
        reader, writer = conn.client_reader, conn.server_writer
        assert reader is not None and writer is not None
        while True:
            try:
                data = await reader.read(_CHUNK)
            except OSError:
                conn.reset()  # propagate the client's RST
                return
            if conn.dead:
                return
            if not data:
                if self._silenced(conn):
                    conn.close()
                else:
                    _write_eof(writer)
                return
            if self._silenced(conn) or conn.swallowing:
                continue
            if _is_commit(data):
                self._commits_seen += 1
                fault = self._commit_fault
                if fault is Fault.RESET_BEFORE_COMMIT:
                    self._commit_fault = None
                    conn.reset()
                    return
                if fault is Fault.DROP_COMMIT_REPLY:
                    self._commit_fault = None
                    conn.swallowing = True
            if not await self._forward(conn, data, writer, upstream=True):
                return

    async def _pump_down(self, conn: _Conn) -> None:
        reader, writer = conn.server_reader, conn.client_writer
        assert reader is not None and writer is not None
        while True:
            try:
                data = await reader.read(_CHUNK)
            except OSError:
                conn.reset()  # propagate the server's RST
                return
            if conn.dead:
                return
            if conn.swallowing:  # the reply to the COMMIT (or EOF): drop it, then RST
                conn.reset()
                return
            if not data:
                if not self._silenced(conn):
                    _write_eof(writer)
                return
            if self._silenced(conn):
                continue
            budget = conn.down_budget
            if budget is not None and len(data) >= budget:
                if budget:
                    await self._forward(conn, data[:budget], writer, upstream=False)
                conn.reset()
                return
            if budget is not None:
                conn.down_budget = budget - len(data)
            if not await self._forward(conn, data, writer, upstream=False):
                return

    async def _forward(
        self, conn: _Conn, data: bytes, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> bool:
        """Write ``data`` applying latency and bandwidth; False if the connection is gone."""
        delay = self._latency
        if self._jitter:
            delay += self._rng.uniform(0.0, self._jitter)
        if delay > 0:
            await asyncio.sleep(delay)
        bps = self._bandwidth
        step = max(1, int(bps / 20)) if bps else len(data)
        for offset in range(0, len(data), step):
            piece = data[offset : offset + step]
            if bps:
                await asyncio.sleep(len(piece) / bps)
            if conn.dead or writer.transport.is_closing():
                return False
            if self._silenced(conn):
                return True
            writer.write(piece)
            if upstream:
                self._bytes_up += len(piece)
            else:
                self._bytes_down += len(piece)
            try:
                await writer.drain()
            except OSError:
                conn.reset()
                return False
        return True
