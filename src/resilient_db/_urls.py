"""Database URLs: secrets in the query string, the Heroku scheme, missing drivers.

libpq and several drivers accept a password in the query string
(``postgresql://app@db/shop?password=...``, ``sslpassword``, tokens), where
SQLAlchemy's ``hide_password`` does not look. :func:`mask_url` hides those
too, :func:`secret_values` lists them for scrubbing, and :func:`masked` gives
an engine a URL whose ``repr`` and ``str`` hide them. :func:`scheme_problem`
and :func:`missing_driver` explain the two commonest first-hour mistakes.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy.engine import URL

__all__ = [
    "DRIVER_PACKAGES",
    "is_secret_key",
    "mask_text",
    "mask_url",
    "masked",
    "missing_driver",
    "port_problem",
    "scheme_problem",
    "secret_values",
]

#: the pip requirement that provides each driver
DRIVER_PACKAGES = {
    "psycopg": "psycopg[binary]",
    "psycopg_async": "psycopg[binary]",
    "psycopg2": "psycopg2-binary",
    "asyncpg": "asyncpg",
    "pg8000": "pg8000",
    "pymysql": "PyMySQL",
    "aiomysql": "aiomysql",
    "mysqldb": "mysqlclient",
    "asyncmy": "asyncmy",
    "aiosqlite": "aiosqlite",
}

# the resilient-db extra that installs each driver
_EXTRAS = {
    "psycopg": "postgres",
    "psycopg_async": "postgres",
    "pymysql": "mysql",
    "asyncpg": "async",
    "aiomysql": "async",
    "aiosqlite": "async",
}

_SECRET_KEY = re.compile(
    r"pass|pwd|secret|token|credential|api_?key|private_?key|access_?key", re.IGNORECASE
)
_MASK = "***"
_PLACEHOLDER = "RDBMASKEDQUERYVALUE"
# user:password@ in any URL, and secret-looking query parameters, in free text
_TEXT_USERINFO = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_TEXT_QUERY = re.compile(
    r"([?&][^=&\s]*(?:pass|pwd|secret|token|credential|api_?key|private_?key|access_?key)"
    r"[^=&\s]*=)[^&\s\"']*",
    re.IGNORECASE,
)


def is_secret_key(key: str) -> bool:
    """True for a query parameter named like a password, token or key."""
    return bool(_SECRET_KEY.search(key))


def secret_values(url: URL) -> list[str]:
    """The password and every secret query value of ``url`` (for scrubbing text)."""
    values = [url.password] if isinstance(url.password, str) and url.password else []
    for key, value in url.query.items():
        if is_secret_key(key):
            values += [v for v in ((value,) if isinstance(value, str) else value) if v]
    return values


def mask_url(url: URL) -> str:
    """``url`` as a string with its password and secret query values shown as ``***``."""
    secret = [k for k in url.query if is_secret_key(k)]
    plain = URL.create(
        url.drivername, url.username, url.password, url.host, url.port, url.database, url.query
    )
    if secret:
        plain = plain.update_query_dict({k: _PLACEHOLDER for k in secret})
    return URL.render_as_string(plain, hide_password=True).replace(_PLACEHOLDER, _MASK)


def mask_text(text: str) -> str:
    """``text`` with any URL password and secret query value masked."""
    return _TEXT_QUERY.sub(rf"\1{_MASK}", _TEXT_USERINFO.sub(rf"\1{_MASK}@", text))


class _MaskedURL(URL):
    """A URL whose ``str``/``repr`` (``render_as_string()``) hide secret query values too."""

    __slots__ = ()

    def render_as_string(self, hide_password: bool = True) -> str:
        if hide_password:
            return mask_url(self)
        return super().render_as_string(hide_password=False)


def masked(url: URL) -> URL:
    """``url`` itself, or, when its query string holds a secret, a copy that never shows it.

    The copy is a genuine :class:`~sqlalchemy.engine.URL` with the same
    values: only its rendering with ``hide_password`` (``str``, ``repr``,
    an engine's ``repr``) changes.
    """
    if isinstance(url, _MaskedURL) or not any(is_secret_key(k) for k in url.query):
        return url
    return _MaskedURL.create(
        url.drivername, url.username, url.password, url.host, url.port, url.database, url.query
    )


_PORT = re.compile(r"^[\w+.-]+://(?:[^@/?#]*@)?(?:\[[^\]]*\]|[^:/?#@]*):([^/?#]*)")


def port_problem(text: str) -> str | None:
    """What is wrong with the port of a URL string that did not parse, or None."""
    m = _PORT.match(text)
    if m is None:
        return None
    port = m.group(1)
    if not port.isdigit():
        return f"has the port {port!r}, which is not a number."
    if not 0 < int(port) < 65536:
        return f"has the port {port}, outside 1-65535."
    return None


def scheme_problem(url: URL) -> tuple[str, str] | None:
    """``(problem, fix)`` for a ``postgres://`` URL, which SQLAlchemy does not know."""
    name = url.drivername
    backend, _, driver = name.partition("+")
    if backend != "postgres":
        return None
    fixed = "postgresql" + (f"+{driver}" if driver else "+psycopg")
    return (
        f"uses the scheme '{name}://', which SQLAlchemy does not know (Heroku and other "
        "platforms hand out postgres:// URLs).",
        f"Use '{fixed}://...': replace the scheme before passing the URL on.",
    )


def missing_driver(url: URL, exc: BaseException) -> tuple[str, str]:
    """``(problem, fix)`` for a driver that is not installed."""
    driver = url.get_driver_name()
    pkg = DRIVER_PACKAGES.get(driver, driver)
    extra = _EXTRAS.get(driver)
    also = f" (or pip install 'resilient-db[{extra}]')" if extra else ""
    detail: Any = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
    return (
        f"names the driver '{driver}', which is not installed ({detail}).",
        f"pip install '{pkg}'{also}.",
    )
