"""The host list of a multi-host engine: :class:`Host`, the role names, and the
``hosts=`` / libpq-style URL configuration parsed into them (:func:`split_url`).

Pure values and parsing; host selection is in :mod:`resilient_db.failover`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from sqlalchemy.engine import URL

from .errors import ConfigurationError

Role = Literal["primary", "any", "prefer-standby"]
#: The roles an engine can ask for.
ROLES: tuple[str, ...] = ("primary", "any", "prefer-standby")

# libpq's target_session_attrs values we honour, and the role each means
_LIBPQ_ROLES = {
    "any": "any",
    "read-write": "primary",
    "primary": "primary",
    "prefer-standby": "prefer-standby",
}
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}


@dataclass(frozen=True, slots=True)
class Host:
    """One server of a multi-host engine."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _parse_host(entry: object, default_port: int | None, field: str) -> Host:
    if isinstance(entry, Host):
        return entry
    if isinstance(entry, tuple) and len(entry) == 2:
        name, port = entry
    elif isinstance(entry, str):
        text = entry.strip()
        port = None
        if text.startswith("["):  # [::1]:5432
            name, _, rest = text[1:].partition("]")
            if rest.startswith(":"):
                port = rest[1:]
        elif text.count(":") == 1:
            name, port = text.split(":")
        else:
            name = text
    else:
        raise ConfigurationError(
            field,
            f"entries must be 'host', 'host:port' or (host, port), got {entry!r}.",
            "Pass e.g. hosts=['db1:5432', 'db2:5432'].",
        )
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(field, f"has an empty host name in {entry!r}.", "Remove it.")
    if port is None or port == "":
        port = default_port
    try:
        number = int(port) if port is not None else None
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(port, bool) or not 0 < number < 65536:
        raise ConfigurationError(
            field, f"has no valid port for {entry!r}.", "Give host:port with a port 1-65535."
        )
    return Host(name.strip(), number)


def parse_hosts(
    hosts: Iterable[object] | str, default_port: int | None, field: str = "hosts"
) -> tuple[Host, ...]:
    """Turn ``["a:5432", ("b", 5433), "c"]`` (or ``"a,b:5433"``) into hosts."""
    if isinstance(hosts, str):
        hosts = [h for h in hosts.split(",") if h.strip()]
    try:
        entries = list(hosts)
    except TypeError:
        raise ConfigurationError(
            field, f"must be a list of hosts, got {type(hosts).__name__}.", "Pass a list."
        ) from None
    if not entries:
        raise ConfigurationError(field, "is empty.", "Give at least one host, or omit it.")
    parsed = tuple(_parse_host(e, default_port, field) for e in entries)
    if len(set(parsed)) != len(parsed):
        raise ConfigurationError(field, "names a host twice.", "List each host:port once.")
    return parsed


def check_role(role: object, field: str = "role") -> Role:
    """Validate a role name; return it."""
    if role not in ROLES:
        raise ConfigurationError(
            field, f"must be one of {', '.join(ROLES)}, got {role!r}.", "Pick one."
        )
    return role  # type: ignore[return-value]


def split_url(
    url: URL, hosts: Iterable[object] | str | None, role: str | None
) -> tuple[URL, tuple[Host, ...] | None, Role]:
    """Take the host list and role out of ``url`` (libpq style) or the keywords.

    Returns the URL for the first host (without ``host``, ``port`` and
    ``target_session_attrs`` in its query), the hosts (None for a single-host
    engine) and the role.
    """
    backend = url.get_backend_name()
    query = dict(url.query)
    in_query = "host" in query
    if role is not None:
        check_role(role)
    if not in_query and hosts is None:
        if role is not None:
            raise ConfigurationError(
                "role", "needs several hosts.", "Pass hosts=[...] or list them in the URL."
            )
        return url, None, "primary"
    if backend not in _DEFAULT_PORTS:
        raise ConfigurationError(
            "hosts",
            f"is only supported for PostgreSQL and MariaDB/MySQL, not {backend}.",
            "Remove hosts.",
        )
    default_port = url.port or _DEFAULT_PORTS[backend]
    if in_query:
        if hosts is not None:
            raise ConfigurationError(
                "hosts", "is given both in the URL and as a keyword.", "Give the list once."
            )
        if url.host:
            raise ConfigurationError(
                "url",
                "names a host before '/' and more in ?host=.",
                "Use postgresql+psycopg://user@/db?host=a:5432&host=b:5432.",
            )
        raw = query.pop("host")
        names = [p for item in _as_tuple(raw) for p in item.split(",") if p.strip()]
        ports = [p for item in _as_tuple(query.pop("port", ())) for p in item.split(",")]
        if ports and len(ports) not in (1, len(names)):
            raise ConfigurationError(
                "url", "lists a different number of ports and hosts.", "Give one port per host."
            )
        if ports:  # libpq: host=a,b&port=1,2 (names are bare, IPv6 ones too)
            spec: list[object] = [
                (n.strip().strip("[]"), ports[0] if len(ports) == 1 else ports[i])
                for i, n in enumerate(names)
            ]
        else:
            spec = list(names)
        parsed = parse_hosts(spec, default_port, "url ?host=")
    else:
        assert hosts is not None
        parsed = parse_hosts(hosts, default_port)
    tsa = query.pop("target_session_attrs", None)
    if tsa is not None:
        value = _as_tuple(tsa)[-1]
        if value not in _LIBPQ_ROLES:
            raise ConfigurationError(
                "url ?target_session_attrs=",
                f"{value!r} is not supported.",
                f"Use one of {', '.join(_LIBPQ_ROLES)}.",
            )
        if role is not None and role != _LIBPQ_ROLES[value]:
            raise ConfigurationError(
                "role", "contradicts target_session_attrs in the URL.", "Give the role once."
            )
        role = _LIBPQ_ROLES[value]
    first = parsed[0]
    return (
        url.set(host=first.host, port=first.port, query=query),
        parsed,
        check_role(role or "primary"),
    )


def _as_tuple(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)
