"""The event-loop side of the :class:`~resilient_db.testing.FaultProxy`.

Everything here runs in the proxy's own loop thread: the fault settings, the
listening socket and accept loop, the actions that change the faults, the
shutdown, and the pumps that forward each connection's bytes applying the
faults. :class:`~resilient_db.testing.FaultProxy` (the thread-safe control side)
is built on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ._faults import Fault
from ._proxy_conn import Conn, write_eof
from ._wire import is_commit

_CHUNK = 65536


class ProxyLoop:
    """The loop-thread state and work of a :class:`~resilient_db.testing.FaultProxy`."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        listen_host: str,
        port: int,
        connect_timeout: float,
    ) -> None:
        self._upstream_host = upstream_host
        self._upstream_port = upstream_port
        self._listen_host = listen_host
        self._port = port
        self._connect_timeout = connect_timeout

        # Everything below is only touched from the loop thread.
        self._lsock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._conns: set[Conn] = set()
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
            conn = Conn()
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

    async def _handle(self, conn: Conn, sock: socket.socket) -> None:
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

    async def _discard_client(self, conn: Conn) -> None:
        """Read and drop everything a blackholed client sends until it goes away."""
        assert conn.client_reader is not None
        with contextlib.suppress(OSError):
            while not conn.dead and await conn.client_reader.read(_CHUNK):
                pass

    def _silenced(self, conn: Conn) -> bool:
        if self._blackhole or conn.blackholed:
            conn.blackholed = True
            return True
        return False

    async def _pump_up(self, conn: Conn) -> None:
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
                    write_eof(writer)
                return
            if self._silenced(conn) or conn.swallowing:
                continue
            if is_commit(data):
                self._commits_seen += 1
                fault = self._commit_fault
                if fault is Fault.RESET_BEFORE_COMMIT:
                    self._commit_fault = None
                    conn.reset()
                    return
                if fault is Fault.DROP_COMMIT_REPLY:
                    self._commit_fault = None
                    conn.swallowing = True
                if fault is Fault.LOSE_COMMIT_REPLY:
                    self._commit_fault = None
                    conn.deaf = True  # before the COMMIT leaves: its reply may come at once
                    await self._forward(conn, data, writer, upstream=True)
                    conn.blackholed = True  # the flow is dead both ways, and stays open
                    continue
            if not await self._forward(conn, data, writer, upstream=True):
                return

    async def _pump_down(self, conn: Conn) -> None:
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
                if not self._silenced(conn) and not conn.deaf:
                    write_eof(writer)
                return
            if self._silenced(conn) or conn.deaf:
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
        self, conn: Conn, data: bytes, writer: asyncio.StreamWriter, *, upstream: bool
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
