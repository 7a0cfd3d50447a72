"""A :class:`FaultProxy` in front of the server a database URL names."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import URL, make_url

from ..errors import ConfigurationError
from .proxy import FaultProxy

__all__ = ["DatabaseProxy"]

_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}
# query parameters that would send the driver somewhere other than the proxy
_BYPASS = ("host", "hostaddr", "port", "unix_socket", "service", "dsn")


class DatabaseProxy(FaultProxy):
    """A fault proxy forwarding only to the host and port of ``url``.

    :attr:`url` is ``url`` rewritten to go through the proxy (a
    :class:`sqlalchemy.engine.URL`, whose ``str()`` hides the password): pass
    it to ``create_engine``. URLs that could reach another server (a host,
    port or socket in the query string, or SQLite, which has no network) are
    rejected with :class:`~resilient_db.ConfigurationError`.

    Example::

        with DatabaseProxy("postgresql+psycopg://app@db:5432/shop") as proxy:
            engine = resilient_db.create_engine(proxy.url)
            proxy.blackhole()
    """

    def __init__(self, url: str | URL, **kwargs: Any) -> None:
        target = make_url(url)
        backend = target.get_backend_name()
        if backend not in _DEFAULT_PORTS:
            raise ConfigurationError(
                "url",
                f"names a {backend} database, which has no network connection to break.",
                "Use a PostgreSQL or MySQL/MariaDB URL (SQLite: use FaultInjector).",
            )
        bypass = sorted(k for k in target.query if k.lower() in _BYPASS)
        if bypass:
            raise ConfigurationError(
                "url",
                f"sets {', '.join(bypass)} in its query string, which would bypass the proxy.",
                "Give the server as host:port in the URL itself.",
            )
        host = target.host or "localhost"
        port = target.port or _DEFAULT_PORTS[backend]
        super().__init__(host, port, **kwargs)
        self._target = target

    def start(self) -> DatabaseProxy:
        """Start the proxy; return ``self``."""
        super().start()
        return self

    def __enter__(self) -> DatabaseProxy:
        return self.start()

    @property
    def target_url(self) -> URL:
        """The URL of the real server, as given."""
        return self._target

    @property
    def url(self) -> URL:
        """The URL that connects through the proxy (available once started)."""
        if not self.running:
            raise RuntimeError("DatabaseProxy is not running; start() it or use it as a context")
        return self._target.set(host=self.host, port=self.port)
