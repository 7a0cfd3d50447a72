"""PyMySQL connections without a CA bundle loaded per connection.

Recent PyMySQL (2.2 here) tries TLS by default ("preferred": TLS if the server offers it,
without verifying the certificate) and builds a fresh ``ssl.create_default_context()``
for every connection, which loads the system's CA bundle: about 45 ms of CPU with
the GIL held, on this machine, for a context that verifies nothing. A pool that
reconnects after an outage, or grows during a brownout, then stalls every other
thread of the service for tens of milliseconds per connection.

:class:`Connection` is PyMySQL's own connection class with one difference: the
"preferred" context (no TLS option given) is built once per process and shared, as
an ``ssl.SSLContext`` may be. Explicit TLS options (``ssl=``, ``ssl_ca=``, ...) go
through PyMySQL unchanged. Used for the engine's own connects and the probe's login;
``isinstance(conn, pymysql.connections.Connection)`` still holds.
"""

from __future__ import annotations

import threading
from typing import Any

import pymysql.connections

__all__ = ["Connection"]

_lock = threading.Lock()
_preferred: Any = None


class Connection(pymysql.connections.Connection):  # type: ignore[misc]
    """PyMySQL's connection, sharing one "preferred TLS" context per process."""

    def _create_ssl_ctx(self, sslp: Any) -> Any:
        if isinstance(sslp, dict) and not sslp:  # PyMySQL's "preferred" mode
            global _preferred
            with _lock:
                if _preferred is None:
                    _preferred = super()._create_ssl_ctx(sslp)
                return _preferred
        return super()._create_ssl_ctx(sslp)
