"""``create_engine`` and ``wrap``: real SQLAlchemy engines with resilience attached."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import QueuePool

from ._hooks import Resilience, install
from .breaker import BreakerSnapshot, CircuitBreaker
from .config import DEFAULT_POLICY, Policy, ValidateMode
from .errors import ConfigurationError
from .failover import Host, Role, split_url
from .failover import attach as attach_failover

if TYPE_CHECKING:
    from ._types import EngineLike

__all__ = [
    "breaker_of",
    "create_engine",
    "driver_defaults",
    "policy_of",
    "resilience_of",
    "wrap",
]

_REGISTRY: weakref.WeakKeyDictionary[Engine, Resilience] = weakref.WeakKeyDictionary()


def _parse_url(url: str | URL) -> URL:
    if isinstance(url, URL):
        return url
    if not isinstance(url, str):
        raise ConfigurationError(
            "url",
            f"must be a string or sqlalchemy.engine.URL, got {type(url).__name__}.",
            "Pass e.g. 'postgresql+psycopg://user@host/db'.",
        )
    try:
        return make_url(url)
    except sa_exc.ArgumentError:
        raise ConfigurationError(
            "url",
            "is not a valid database URL (expected dialect+driver://user:password@host:port/db).",
            "Check DATABASE_URL; special characters in the password must be %-encoded.",
        ) from None


def _load_dialect(url: URL) -> Any:
    try:
        return url.get_dialect()
    except sa_exc.NoSuchModuleError:
        raise ConfigurationError(
            "url",
            f"names an unknown dialect or driver '{url.drivername}'.",
            "Use postgresql+psycopg, postgresql+asyncpg, mysql+pymysql, mysql+aiomysql or sqlite.",
        ) from None


def driver_defaults(url: URL, policy: Policy) -> dict[str, Any]:
    """The ``connect_args`` resilient_db applies for ``url``'s driver.

    Finite connect timeouts (libpq and PyMySQL wait for ever or very long), a
    read timeout where the driver has a cheap one (PyMySQL; the watchdog bounds
    the calls of the others), a server-side statement timeout, TCP keepalives
    and ``application_name``. Anything the caller set wins.
    """
    t = policy.timeouts
    backend, driver = url.get_backend_name(), url.get_driver_name()
    args: dict[str, Any] = {}
    if backend == "postgresql" and driver in ("psycopg", "psycopg2", "psycopg_async"):
        if t.connect is not None:
            args["connect_timeout"] = max(2, round(t.connect))
        if policy.application_name:
            args["application_name"] = policy.application_name
        args.update(keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3)
        if t.call is not None:
            args["tcp_user_timeout"] = int(t.call * 1000)
        if t.statement is not None:
            args["options"] = f"-c statement_timeout={int(t.statement * 1000)}"
    elif backend == "postgresql" and driver == "asyncpg":
        if t.connect is not None:
            args["timeout"] = t.connect
        # Timeouts.call: the watchdog, not command_timeout (a loop timer per protocol
        # exchange); a command_timeout given in connect_args still wins (_hooks.py)
        settings: dict[str, str] = {}
        if policy.application_name:
            settings["application_name"] = policy.application_name
        if t.statement is not None:
            settings["statement_timeout"] = str(int(t.statement * 1000))
        if settings:
            args["server_settings"] = settings
    elif backend in ("mysql", "mariadb"):
        if t.connect is not None:
            args["connect_timeout"] = max(1, round(t.connect))
        if driver == "pymysql" and t.call is not None:
            args["read_timeout"] = max(1, round(t.call))
            args["write_timeout"] = max(1, round(t.call))
        if policy.application_name and driver in ("pymysql", "aiomysql"):
            args["program_name"] = policy.application_name
    elif backend == "sqlite" and t.statement is not None:
        args["timeout"] = min(t.statement, 5.0)
    return args


def _merge_connect_args(url: URL, policy: Policy, given: dict[str, Any]) -> dict[str, Any]:
    merged = driver_defaults(url, policy)
    query = set(url.query)
    for key in list(merged):
        if key in query:  # set in the URL's query string: the URL wins
            merged.pop(key)
    if "options" in merged and "options" in given:
        # libpq applies repeated -c settings in order: the caller's come last and win
        merged["options"] = f"{merged['options']} {given['options']}"
        given = {k: v for k, v in given.items() if k != "options"}
    if "server_settings" in merged and "server_settings" in given:
        merged["server_settings"] = {**merged["server_settings"], **given["server_settings"]}
        given = {k: v for k, v in given.items() if k != "server_settings"}
    merged.update(given)
    return merged


def _engine_kwargs(url: URL, policy: Policy, kwargs: dict[str, Any]) -> dict[str, Any]:
    dialect_cls = _load_dialect(url)
    kw = dict(kwargs)
    kw["connect_args"] = _merge_connect_args(url, policy, dict(kw.get("connect_args") or {}))
    kw.setdefault("hide_parameters", True)
    poolclass = kw.get("poolclass")
    if poolclass is None and "pool" not in kw:
        try:
            poolclass = dialect_cls.get_pool_class(url)
        except Exception:
            poolclass = None
    if isinstance(poolclass, type) and issubclass(poolclass, QueuePool):
        p = policy.pool
        kw.setdefault("pool_size", p.size)
        kw.setdefault("max_overflow", p.max_overflow)
        kw.setdefault("pool_timeout", policy.timeouts.checkout)
        if p.recycle is not None and url.get_backend_name() != "sqlite":
            # SQLite has no server to time idle connections out
            kw.setdefault("pool_recycle", p.recycle)
    return kw


def _check_policy(policy: Policy | None) -> Policy:
    if policy is None:
        return DEFAULT_POLICY
    if not isinstance(policy, Policy):
        raise ConfigurationError(
            "policy",
            f"must be a resilient_db.Policy, got {type(policy).__name__}.",
            "Build one with resilient_db.Policy(...) or Policy.from_env().",
        )
    return policy


def create_engine(
    url: str | URL,
    *,
    name: str | None = None,
    policy: Policy | None = None,
    validate: ValidateMode | None = None,
    clock: Callable[[], float] | None = None,
    hosts: Sequence[str | tuple[str, int]] | None = None,
    role: Role | None = None,
    **kwargs: Any,
) -> Engine:
    """Create a genuine :class:`sqlalchemy.engine.Engine` with resilience attached.

    ``kwargs`` go to :func:`sqlalchemy.create_engine` and win over the
    policy's defaults. ``validate`` (default: the policy's, ``"warn"``) runs
    the startup checks: ``"strict"`` raises :class:`ConfigurationError` with
    the whole report, ``"warn"`` logs it, ``"off"`` skips them. ``clock``
    (default :func:`time.monotonic`) is for tests: the breaker, retry deadline
    and idle timing read it.

    ``hosts`` (``["db1:5432", "db2:5432"]``, or libpq-style ``?host=a:5432&host=b:5432``
    in the URL) makes one logical database of several servers, and ``role``
    (``"primary"``, the default, ``"any"`` or ``"prefer-standby"``; in the URL
    ``target_session_attrs``) says which one to use: see :mod:`resilient_db.failover`.
    """
    policy = _check_policy(policy)
    mode = _validate_mode(policy, validate)  # before anything is built or connected
    u, host_list, role = split_url(_parse_url(url), hosts, role)
    kw = _engine_kwargs(u, policy, kwargs)
    try:
        engine = sqlalchemy.create_engine(u, **kw)
    except TypeError as e:
        raise ConfigurationError(
            "create_engine", f"an argument was rejected by SQLAlchemy: {e}.", "Remove or fix it."
        ) from None
    except sa_exc.ArgumentError as e:
        raise ConfigurationError("create_engine", str(e), "Fix the argument.") from None
    engine = wrap(
        engine,
        name=name,
        policy=policy,
        clock=clock,
        hosts=host_list,
        role=role if host_list is not None else None,
    )
    fo = _REGISTRY[engine].failover
    if fo is not None and mode != "off":
        # validate the server the engine picks, not whichever host is listed first
        chosen = fo.select(engine, kw["connect_args"])
        if chosen != fo.hosts[0]:
            check = sqlalchemy.create_engine(u.set(host=chosen.host, port=chosen.port), **kw)
            try:
                _startup_validate(wrap(check, name=name, policy=policy), policy, validate)
            finally:
                check.dispose()
            return engine
    _startup_validate(engine, policy, validate)
    return engine


def _validate_mode(policy: Policy, validate: ValidateMode | None) -> ValidateMode:
    """The startup-check mode: ``validate`` if given, else the policy's; checked."""
    mode = validate if validate is not None else policy.validate
    if mode not in ("strict", "warn", "off"):
        raise ConfigurationError(
            "validate", f"must be 'strict', 'warn' or 'off', got {mode!r}.", "Pick one."
        )
    return mode


def _startup_validate(engine: Engine, policy: Policy, validate: ValidateMode | None) -> None:
    mode = _validate_mode(policy, validate)
    if mode == "off":
        return
    from .validation import startup_check

    startup_check(engine, strict=mode == "strict")


def wrap(
    engine: Engine,
    *,
    name: str | None = None,
    policy: Policy | None = None,
    clock: Callable[[], float] | None = None,
    hosts: Sequence[str | tuple[str, int] | Host] | None = None,
    role: Role | None = None,
) -> Engine:
    """Attach resilience to an existing engine and return the same object.

    The pool and driver settings the engine was created with are kept; use
    :func:`create_engine` to also get resilient_db's safe defaults. ``clock``
    replaces :func:`time.monotonic` for the breaker and retry timing (tests).
    ``hosts`` and ``role``: as for :func:`create_engine`.
    """
    if not isinstance(engine, Engine):
        raise ConfigurationError(
            "engine",
            f"must be a sqlalchemy.engine.Engine, got {type(engine).__name__}.",
            "For an AsyncEngine use resilient_db.wrap_async().",
        )
    if engine in _REGISTRY:
        raise ConfigurationError(
            "engine", "is already wrapped by resilient_db.", "Wrap each engine once."
        )
    policy = _check_policy(policy)
    if name is not None and not isinstance(name, str):
        raise ConfigurationError("name", "must be a string.", "Pass a short engine name.")
    url, host_list, host_role = split_url(engine.url, hosts, role)
    engine.url = url  # a ?host= list: the first host, so diagnostics name a real one
    label = name or _default_name(engine.url)
    r = Resilience(engine, label, policy, clock=clock or time.monotonic)
    install(engine, r)
    if host_list is not None:
        attach_failover(engine, r, host_list, host_role)
    _REGISTRY[engine] = r
    return engine


def _default_name(url: URL) -> str:
    t = url.get_backend_name()
    if t == "sqlite":
        return f"sqlite:{url.database or 'memory'}"
    return f"{t}:{url.host or 'localhost'}/{url.database or ''}"


def resilience_of(engine: EngineLike) -> Resilience:
    """The resilience state of a wrapped engine (Engine, AsyncEngine or Connection)."""
    inner: Any = getattr(engine, "sync_engine", engine)
    e: Any = getattr(inner, "engine", inner)  # a Connection's engine
    r = _REGISTRY.get(e)
    if r is None:
        proxied = getattr(e, "_proxied", None)  # Engine.execution_options() copies
        r = _REGISTRY.get(proxied) if proxied is not None else None
    if r is None:
        raise ConfigurationError(
            "engine",
            "is not a resilient_db engine.",
            "Create it with resilient_db.create_engine() or wrap it with resilient_db.wrap().",
        )
    return r


def policy_of(engine: EngineLike) -> Policy:
    """The :class:`Policy` an engine runs with."""
    return resilience_of(engine).policy


def breaker_of(engine: EngineLike) -> CircuitBreaker:
    """The engine's circuit breaker: ``snapshot()``, ``force_open()``, ``reset()``..."""
    b = resilience_of(engine).breaker
    if b is None:
        raise ConfigurationError(
            "policy.breaker.enabled", "is False for this engine.", "Enable the breaker."
        )
    return b


def breaker_state(engine: EngineLike) -> BreakerSnapshot | None:
    """A snapshot of the engine's breaker, or None when it has none."""
    b = resilience_of(engine).breaker
    return b.snapshot() if b is not None else None
