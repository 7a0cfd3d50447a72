"""``create_engine`` and ``wrap``: real SQLAlchemy engines with resilience attached."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url

from ._attach import install
from ._driver_args import driver_defaults, engine_kwargs
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
from .config import DEFAULT_POLICY, Policy, ValidateMode
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
        return make_url(url)
    except sa_exc.ArgumentError:
        raise ConfigurationError(
            "url",
            "is not a valid database URL (expected dialect+driver://user:password@host:port/db).",
            "Check DATABASE_URL; special characters in the password must be %-encoded.",
        ) from None


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
    if is_registered(engine):
        raise ConfigurationError(
            "engine", "is already wrapped by resilient_db.", "Wrap each engine once."
        )
    policy = _check_policy(policy)
    if name is not None and not isinstance(name, str):
        raise ConfigurationError("name", "must be a string.", "Pass a short engine name.")
    url, host_list, host_role = split_url(engine.url, hosts, role)
    engine.url = url  # a ?host= list: the first host, so diagnostics name a real one
    label = name or default_name(engine.url)
    r = Resilience(engine, label, policy, clock=clock or time.monotonic)
    install(engine, r)
    if host_list is not None:
        attach_failover(engine, r, host_list, host_role)
    register(engine, r)
    return engine
