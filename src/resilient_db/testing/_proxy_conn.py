"""One connection through the :class:`~resilient_db.testing.FaultProxy`: its two
sides' streams, its fault state, and the ways it ends (RST, abort, close).

Used from the proxy's event-loop thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

_LINGER_RST = struct.pack("ii", 1, 0)


def rst(writer: asyncio.StreamWriter | None) -> None:
    """Close ``writer``'s socket with SO_LINGER (1, 0) so the peer receives a RST."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


def write_eof(writer: asyncio.StreamWriter | None) -> None:
    """Half-close ``writer`` (forward a FIN) if it is still open."""
    if writer is None or writer.transport.is_closing():
        return
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()
    else:
        writer.close()


class Conn:
    """State of one proxied client connection (loop thread only)."""

    __slots__ = (
        "blackholed",
        "client_reader",
        "client_writer",
        "dead",
        "deaf",
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
        # lose_commit_reply fired: drop whatever the server sends, keep both sides open.
        self.deaf = False
        self.task: asyncio.Task[None] | None = None

    def reset(self) -> None:
        """RST both sides."""
        self.dead = True
        rst(self.client_writer)
        rst(self.server_writer)

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
