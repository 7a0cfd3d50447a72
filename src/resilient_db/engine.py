"""``create_engine`` and ``wrap``: real SQLAlchemy engines with resilience attached."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url

from ._attach import install
from ._driver_args import driver_defaults, engine_kwargs
from ._fork import track_engine
from ._state import (
    Resilience,
    breaker_of,
    breaker_state,
    default_name,
    is_registered,
    policy_of,
    register,
    resilience_of,
)
from ._urls import masked, port_problem, scheme_problem
from .config import DEFAULT_POLICY, VALIDATE_MODES, Policy, ValidateMode
from .errors import ConfigurationError
from .failover import Host, Role, split_url
from .failover import attach as attach_failover

if TYPE_CHECKING:
    pass

__all__ = [
    "breaker_of",
    "breaker_state",
    "create_engine",
    "driver_defaults",
    "engine_options",
    "policy_of",
    "resilience_of",
    "wrap",
]


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
        parsed = make_url(url)
    except (sa_exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        port = port_problem(url)
        raise ConfigurationError(
            "url",
            port
            or "is not a valid database URL (expected dialect+driver://user:password@host:port/db).",
            "Give the port as a number, e.g. :5432."
            if port
            else "Check DATABASE_URL; special characters in the password must be %-encoded.",
        ) from None
    scheme = scheme_problem(parsed)
    if scheme is not None:
        raise ConfigurationError("url", *scheme)
    return parsed


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
    policy's defaults; the pool's (``pool_size``, ``max_overflow``,
    ``pool_timeout``, ``pool_recycle``) are folded into the engine's policy, so
    :func:`policy_of` describes the pool that runs. ``validate`` (default: the
    policy's, ``"config"``) runs the startup checks: ``"config"`` raises
    :class:`ConfigurationError` when a setting is wrong (bad URL, missing
    driver, unknown host, wrong password, unknown user or database) and logs a
    short warning when the database is merely unreachable, so the service
    starts not ready during an outage; ``"strict"`` raises on any error,
    ``"warn"`` only logs, ``"off"`` skips the checks. ``clock``
    (default :func:`time.monotonic`) is for tests: the breaker, retry deadline
    and idle timing read it.

    ``hosts`` (``["db1:5432", "db2:5432"]``, or libpq-style ``?host=a:5432&host=b:5432``
    in the URL) makes one logical database of several servers, and ``role``
    (``"primary"``, the default, ``"any"`` or ``"prefer-standby"``; in the URL
    ``target_session_attrs``) says which one to use: see :mod:`resilient_db.failover`.
    """
    policy = _check_policy(policy)
    mode = _validate_mode(policy, validate)  # before anything is built or connected
    _check_clock(clock)
    u, host_list, role = split_url(_parse_url(url), hosts, role)
    policy = _fold_pool_kwargs(policy, kwargs)
    kw = engine_kwargs(u, policy, kwargs)
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
        hide_parameters=bool(kw["hide_parameters"]),
    )
    fo = resilience_of(engine).failover
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
    if mode not in VALIDATE_MODES:
        raise ConfigurationError(
            "validate",
            f"must be 'config', 'strict', 'warn' or 'off', got {mode!r}.",
            "Pick one (the default, 'config', refuses bad settings and warns of an outage).",
        )
    return mode


def _startup_validate(engine: Engine, policy: Policy, validate: ValidateMode | None) -> None:
    mode = _validate_mode(policy, validate)
    if mode == "off":
        return
    from .validation import startup_check

    startup_check(engine, mode=mode)


def _check_clock(clock: object) -> None:
    if clock is not None and not callable(clock):
        raise ConfigurationError(
            "clock",
            f"must be a callable returning seconds, got {type(clock).__name__}.",
            "Pass e.g. time.monotonic or a test clock, or leave it out.",
        )


# SQLAlchemy's pool arguments and the policy field each one sets
_POOL_KWARGS = {
    "pool_size": ("pool", "size"),
    "max_overflow": ("pool", "max_overflow"),
    "pool_recycle": ("pool", "recycle"),
    "pool_timeout": ("timeouts", "checkout"),
}


def _fold_pool_kwargs(policy: Policy, kwargs: dict[str, Any]) -> Policy:
    """``policy`` with SQLAlchemy's pool arguments folded in: it describes what runs."""
    given = {k: kwargs[k] for k in _POOL_KWARGS if k in kwargs}
    if not given or "poolclass" in kwargs or "pool" in kwargs:
        return policy
    groups: dict[str, dict[str, Any]] = {"pool": {}, "timeouts": {}}
    for key, value in given.items():
        group, fname = _POOL_KWARGS[key]
        if key == "pool_recycle" and isinstance(value, (int, float)) and value < 0:
            value = None  # SQLAlchemy's "never recycle"
        groups[group][fname] = value
    try:
        return dataclasses.replace(
            policy,
            pool=dataclasses.replace(policy.pool, **groups["pool"]),
            timeouts=dataclasses.replace(policy.timeouts, **groups["timeouts"]),
        )
    except ConfigurationError as exc:
        arg = next(k for k, (g, f) in _POOL_KWARGS.items() if exc.field.endswith(f".{f}"))
        raise ConfigurationError(
            arg, f"{exc.problem.rstrip('.')} (it sets {exc.field}).", exc.fix
        ) from None


def wrap(
    engine: Engine,
    *,
    name: str | None = None,
    policy: Policy | None = None,
    clock: Callable[[], float] | None = None,
    hosts: Sequence[str | tuple[str, int] | Host] | None = None,
    role: Role | None = None,
    hide_parameters: bool = True,
) -> Engine:
    """Attach resilience to an existing engine and return the same object.

    Everything that can be added to a built engine is: the breaker, bulkhead,
    retries, per-call deadline and classified errors; the driver defaults of
    :func:`driver_defaults` (connect and read timeouts, statement timeout,
    keepalives, ``application_name``) for every new connection, where the
    engine's ``connect_args`` or URL set none; and hidden bind parameters
    (``hide_parameters=False`` shows them, for debugging). The pool's size,
    overflow, checkout timeout and recycle are fixed when a pool is built: pass
    :func:`engine_options` to :func:`sqlalchemy.create_engine` for those, or use
    :func:`create_engine`. ``clock`` replaces :func:`time.monotonic` for the
    breaker and retry timing (tests). ``hosts`` and ``role``: as for
    :func:`create_engine`.
    """
    if not isinstance(engine, Engine):
        raise ConfigurationError(
            "engine",
            f"must be a sqlalchemy.engine.Engine, got {type(engine).__name__}.",
            "For an AsyncEngine use resilient_db.wrap_async().",
        )
    if is_registered(engine):
        raise ConfigurationError(
            "engine", "is already wrapped by resilient_db.", "Wrap each engine once."
        )
    policy = _check_policy(policy)
    if name is not None and not isinstance(name, str):
        raise ConfigurationError("name", "must be a string.", "Pass a short engine name.")
    url, host_list, host_role = split_url(engine.url, hosts, role)
    _check_clock(clock)
    # a ?host= list: the first host, so diagnostics name a real one; secrets in the query hidden
    engine.url = masked(url)
    label = name or default_name(engine.url)
    r = Resilience(engine, label, policy, clock=clock or time.monotonic)
    # SQLAlchemy reads it at every error and INFO echo: [parameters: ...] lines hidden
    engine.hide_parameters = hide_parameters
    # before install(): dialect events run in order, resilient_db's do_connect connects
    event.listen(engine, "do_connect", _connect_defaults(driver_defaults(engine.url, policy)))
    install(engine, r)
    if host_list is not None:
        attach_failover(engine, r, host_list, host_role)
    register(engine, r)
    track_engine(engine)  # a forked child gets a fresh pool (_fork.py)
    return engine


def _connect_defaults(defaults: dict[str, Any]) -> Callable[..., None]:
    """A ``do_connect`` listener giving each connect ``defaults`` the caller did not set.

    The caller's ``connect_args`` and URL query are in ``cparams`` already and
    win; libpq ``options`` and asyncpg ``server_settings`` are merged, ours first.
    """

    def add_defaults(dialect: Any, rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        for key, value in defaults.items():
            given = cparams.get(key)
            if given is None:
                cparams[key] = value
            elif key == "options" and "statement_timeout" not in str(given):
                cparams[key] = f"{value} {given}"
            elif key == "server_settings" and isinstance(given, dict):
                cparams[key] = {**value, **given}

    return add_defaults


def engine_options(url: str | URL, policy: Policy | None = None, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments :func:`create_engine` gives :func:`sqlalchemy.create_engine`.

    For engines another library builds from options (Flask-SQLAlchemy's
    ``SQLALCHEMY_ENGINE_OPTIONS`` / ``engine_options``): the pool size, overflow,
    checkout timeout and recycle of ``policy``, :func:`driver_defaults` as
    ``connect_args`` and ``hide_parameters=True``. ``kwargs`` win. Then
    :func:`wrap` the engine with the same policy.
    """
    return engine_kwargs(_parse_url(url), _check_policy(policy), kwargs)
