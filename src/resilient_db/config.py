"""Policies: frozen, validated values that say how an engine behaves under trouble.

Change a policy with :func:`dataclasses.replace`; every field is checked on
construction and a bad one raises :class:`~resilient_db.ConfigurationError`
naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigurationError

__all__ = [
    "DEFAULT_POLICY",
    "BreakerPolicy",
    "Policy",
    "PoolPolicy",
    "RetryPolicy",
    "Timeouts",
]

ValidateMode = Literal["config", "strict", "warn", "off"]
#: The startup-check modes, in the order the docs explain them.
VALIDATE_MODES: tuple[str, ...] = ("config", "strict", "warn", "off")

# Upper bounds: far beyond any sane setting, low enough that every driver and
# server accepts the value (PostgreSQL's statement_timeout and libpq's
# tcp_user_timeout are 32-bit milliseconds: about 24.8 days).
_MAX_SECONDS = 86400.0  # one day
_MAX_CONNECTIONS = 10_000
_MAX_ATTEMPTS = 100
_MAX_CALLS = 100_000
AccessMode = Literal["read-write", "read-only"]


def _check_number(
    obj: object,
    name: str,
    *,
    optional: bool = False,
    integer: bool = False,
    minimum: float = 0.0,
    strict: bool = True,
    maximum: float | None = None,
) -> None:
    value = getattr(obj, name)
    qual = f"{type(obj).__name__}.{name}"
    if value is None:
        if optional:
            return
        raise ConfigurationError(qual, "must be set, got None.", "Give a number.")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(
            qual, f"must be a number, got {type(value).__name__} {value!r}.", "Give a number."
        )
    if integer and not isinstance(value, int):
        raise ConfigurationError(qual, f"must be a whole number, got {value!r}.", "Use an int.")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigurationError(qual, f"must be finite, got {value!r}.", "Give a finite number.")
    if (value <= minimum) if strict else (value < minimum):
        rel = ">" if strict else ">="
        raise ConfigurationError(
            qual,
            f"must be {rel} {minimum:g}, got {value!r}.",
            f"Use a value {rel} {minimum:g}" + (" or None to disable." if optional else "."),
        )
    if maximum is not None and value > maximum:
        raise ConfigurationError(
            qual,
            f"must be <= {maximum:g}, got {value!r}.",
            f"Use a value <= {maximum:g}" + (" or None to disable." if optional else "."),
        )


def _check_finite(name: str, value: object, *, minimum: float | None = None) -> float:
    """``value`` as a float: finite and >= 0 (> ``minimum`` when given), or a ConfigurationError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (minimum is not None and value <= minimum):  # type: ignore[operator]
        rel = f"> {minimum:g}" if minimum is not None else ">= 0"
        raise ConfigurationError(
            name, f"must be a finite number {rel}, got {value!r}.", "Pass e.g. 0.5."
        )
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Time limits in seconds. ``None`` disables a limit (validation warns about it).

    - ``connect``: one connection attempt, including the server's greeting.
    - ``checkout``: getting a connection: the wait for a pooled one
      (SQLAlchemy's ``pool_timeout``), and the connect sequence, which starts
      no new attempt after this long (so ``engine.connect()`` gives up within
      ``checkout + connect`` seconds, 5 s by default).
    - ``statement``: the server-side statement timeout (PostgreSQL
      ``statement_timeout``, MariaDB ``max_statement_time``, SQLite busy timeout).
    - ``call``: the client-side deadline for one call on an established
      connection, the backstop behind the statement timeout. A silent database
      is found out sooner, by the breaker's probe (``BreakerPolicy.probe_after``).

    The defaults stay under the usual worker and probe limits (gunicorn's 30 s
    worker timeout); long work raises them per connection (docs/resilience.md).
    """

    connect: float | None = 2.0
    checkout: float = 3.0
    statement: float | None = 25.0
    call: float | None = 28.0

    def __post_init__(self) -> None:
        _check_number(self, "connect", optional=True, maximum=_MAX_SECONDS)
        _check_number(self, "checkout", maximum=_MAX_SECONDS)
        _check_number(self, "statement", optional=True, maximum=_MAX_SECONDS)
        _check_number(self, "call", optional=True, maximum=_MAX_SECONDS)


@dataclass(frozen=True, slots=True)
class PoolPolicy:
    """Pool sizing and connection hygiene.

    - ``size`` / ``max_overflow``: as SQLAlchemy's ``pool_size`` / ``max_overflow``.
    - ``max_waiters``: callers allowed to wait for a connection at once; more are
      rejected at once with :class:`~resilient_db.PoolExhaustedError` (the bulkhead).
      Nobody waits while the breaker is open or a probe is out. The database layer
      holds at most ``size + max_overflow + max_waiters`` threads: keep that below
      the service's worker count.
    - ``recycle``: replace connections older than this (below MySQL's idle timeout).
    - ``ping_after_idle``: ping a pooled connection on checkout only when it sat
      idle longer than this (``None``: never; ``0``: on every checkout).
    - ``adaptive``: an adaptive concurrency limit (off by default): when the
      engine's calls get slower than its own baseline (a brownout), it lowers
      the connections allowed in use below ``size + max_overflow`` and refuses
      checkouts beyond it at once, and raises it again as latency recovers
      (docs/resilience.md, "Adaptive concurrency limit").
    """

    size: int = 5
    max_overflow: int = 5
    max_waiters: int | None = 2
    recycle: float | None = 1800.0
    ping_after_idle: float | None = 1.0
    adaptive: bool = False

    def __post_init__(self) -> None:
        conns: dict[str, Any] = {"integer": True, "strict": False, "maximum": _MAX_CONNECTIONS}
        _check_number(self, "size", minimum=1, **conns)
        _check_number(self, "max_overflow", minimum=0, **conns)
        _check_number(self, "max_waiters", minimum=0, optional=True, **conns)
        _check_number(self, "recycle", optional=True, maximum=7 * _MAX_SECONDS)
        _check_number(self, "ping_after_idle", optional=True, strict=False, maximum=_MAX_SECONDS)
        if not isinstance(self.adaptive, bool):
            raise ConfigurationError(
                "PoolPolicy.adaptive",
                f"must be True or False, got {self.adaptive!r}.",
                "Pass adaptive=True to shed load when the database gets slow, else False.",
            )


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of the connect phase and of whole units of work.

    Exponential backoff with full jitter: the n-th sleep is uniform in
    ``[0, min(max_backoff, initial * 2**n)]``. ``attempts`` counts the first try;
    ``deadline`` caps the whole sequence, including the next sleep.
    """

    attempts: int = 3
    initial: float = 0.05
    max_backoff: float = 1.0
    deadline: float = 10.0

    def __post_init__(self) -> None:
        _check_number(
            self, "attempts", integer=True, minimum=1, strict=False, maximum=_MAX_ATTEMPTS
        )
        _check_number(self, "initial", minimum=0, strict=False, maximum=_MAX_SECONDS)
        _check_number(self, "max_backoff", minimum=0, strict=False, maximum=_MAX_SECONDS)
        _check_number(self, "deadline", maximum=_MAX_SECONDS)


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When the circuit breaker opens and how it probes the database back.

    It judges whether the database can be *reached*: it counts failed attempts
    to reach it (fresh connections that fail), never a lost session or an
    application error. It opens after ``failure_threshold`` consecutive counted
    failures, or, when ``failure_rate`` is set, when that share of the last
    ``window`` counted outcomes failed (after at least ``minimum_calls``). A call
    slower than ``slow_call`` seconds counts as a failure (off by default).

    A call silent for ``probe_after`` seconds makes the engine probe the
    database on a fresh connection; no answer within ``probe_timeout`` opens the
    breaker at once and cuts the calls in flight. After ``reset_timeout`` it
    lets ``half_open_max_calls`` probes through at a time;
    ``success_threshold`` successful probes close it.
    """

    enabled: bool = True
    failure_threshold: int = 5
    failure_rate: float | None = None
    window: int = 20
    minimum_calls: int = 10
    slow_call: float | None = None
    probe_after: float | None = 1.0
    probe_timeout: float = 1.5
    reset_timeout: float = 5.0
    half_open_max_calls: int = 1
    success_threshold: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigurationError(
                "BreakerPolicy.enabled", f"must be True or False, got {self.enabled!r}.", ""
            )
        calls: dict[str, Any] = {
            "integer": True,
            "minimum": 1,
            "strict": False,
            "maximum": _MAX_CALLS,
        }
        _check_number(self, "failure_threshold", **calls)
        _check_number(self, "failure_rate", optional=True, maximum=1.0)
        _check_number(self, "window", **calls)
        _check_number(self, "minimum_calls", **calls)
        _check_number(self, "slow_call", optional=True, maximum=_MAX_SECONDS)
        _check_number(self, "probe_after", optional=True, maximum=_MAX_SECONDS)
        _check_number(self, "probe_timeout", maximum=_MAX_SECONDS)
        _check_number(self, "reset_timeout", maximum=_MAX_SECONDS)
        _check_number(self, "half_open_max_calls", **calls)
        _check_number(self, "success_threshold", **calls)
        if self.failure_rate is not None and self.minimum_calls > self.window:
            raise ConfigurationError(
                "BreakerPolicy.minimum_calls",
                f"is {self.minimum_calls}, more than window={self.window}: the window never "
                "holds that many calls, so the failure rate could never open the breaker.",
                "Use minimum_calls <= window (or a larger window).",
            )


@dataclass(frozen=True, slots=True)
class Policy:
    """Everything resilient_db applies to one engine.

    ``instances`` is how many processes of the service share the database; the
    validator compares ``(pool.size + pool.max_overflow) * instances`` with the
    server's ``max_connections``. ``application_name`` is shown to DBAs
    (``pg_stat_activity``, MariaDB connection attributes). ``access`` is what the
    service expects of the database: validation reports a read-only server or a
    user without write privileges when it is ``"read-write"``.
    """

    timeouts: Timeouts = field(default_factory=Timeouts)
    pool: PoolPolicy = field(default_factory=PoolPolicy)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    instances: int = 1
    application_name: str | None = "resilient-db"
    validate: ValidateMode = "config"
    access: AccessMode = "read-write"

    def __post_init__(self) -> None:
        for name, cls in (
            ("timeouts", Timeouts),
            ("pool", PoolPolicy),
            ("retry", RetryPolicy),
            ("breaker", BreakerPolicy),
        ):
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise ConfigurationError(
                    f"Policy.{name}",
                    f"must be a {cls.__name__}, got {type(value).__name__}.",
                    f"Pass resilient_db.{cls.__name__}(...).",
                )
        _check_number(
            self, "instances", integer=True, minimum=1, strict=False, maximum=_MAX_CONNECTIONS
        )
        if self.validate not in VALIDATE_MODES:
            raise ConfigurationError(
                "Policy.validate",
                f"must be 'config', 'strict', 'warn' or 'off', got {self.validate!r}.",
                "Pick one of the four ('config', the default, refuses bad settings).",
            )
        if self.access not in ("read-write", "read-only"):
            raise ConfigurationError(
                "Policy.access",
                f"must be 'read-write' or 'read-only', got {self.access!r}.",
                "Pick one of the two.",
            )
        if self.application_name is not None and not isinstance(self.application_name, str):
            raise ConfigurationError(
                "Policy.application_name", "must be a string or None.", "Pass a short name."
            )

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, prefix: str = "RESILIENT_DB_"
    ) -> Policy:
        """Build a policy from environment variables (12-factor configuration).

        Names are ``{prefix}{GROUP}_{FIELD}`` for grouped fields, e.g.
        ``RESILIENT_DB_TIMEOUTS_CONNECT=3``, ``RESILIENT_DB_POOL_SIZE=10``,
        ``RESILIENT_DB_BREAKER_RESET_TIMEOUT=2``, and ``{prefix}{FIELD}`` for
        top-level ones (``RESILIENT_DB_INSTANCES``). ``none`` disables an
        optional limit. An unknown variable with the prefix is an error, so a
        typo never silently falls back to a default.
        """
        env = os.environ if environ is None else environ
        if not isinstance(env, Mapping):
            raise ConfigurationError(
                "environ",
                f"must be a mapping of variable names to values, got {type(env).__name__}.",
                "Pass os.environ, a dict, or nothing.",
            )
        if not isinstance(prefix, str):
            raise ConfigurationError("prefix", "must be a string.", "Pass e.g. 'RESILIENT_DB_'.")
        groups: dict[str, dict[str, Any]] = {name: {} for name in _GROUPS}
        top: dict[str, Any] = {}
        # "Timeouts.connect" -> "RESILIENT_DB_TIMEOUTS_CONNECT", to name what the user set
        names: dict[str, str] = {}
        top_fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _GROUPS}
        for key, raw in env.items():
            if not isinstance(key, str) or not key.startswith(prefix):
                continue
            rest = key[len(prefix) :].lower()
            for gname, gcls in _GROUPS.items():
                if rest.startswith(gname + "_"):
                    fname = rest[len(gname) + 1 :]
                    gfields = {f.name: f for f in dataclasses.fields(gcls)}
                    if fname not in gfields:
                        raise ConfigurationError(
                            key,
                            f"is not a known setting of {gcls.__name__}.",
                            f"Use one of: {', '.join(prefix + gname.upper() + '_' + n.upper() for n in gfields)}.",  # noqa: E501
                        )
                    groups[gname][fname] = _parse(key, raw, gfields[fname].type)
                    names[f"{gcls.__name__}.{fname}"] = key
                    break
            else:
                if rest not in top_fields:
                    raise ConfigurationError(
                        key,
                        "is not a known resilient_db setting.",
                        "Check the spelling; see docs/configuration.md for the list.",
                    )
                top[rest] = _parse(key, raw, top_fields[rest].type)
                names[f"Policy.{rest}"] = key
        try:
            return cls(
                **{gname: gcls(**groups[gname]) for gname, gcls in _GROUPS.items()},
                **top,
            )
        except ConfigurationError as exc:
            var = names.get(exc.field)
            if var is None:
                raise
            problem = f"{exc.problem.rstrip('.')} (it sets {exc.field})."
            raise ConfigurationError(var, problem, exc.fix) from None


_GROUPS: dict[str, Any] = {
    "timeouts": Timeouts,
    "pool": PoolPolicy,
    "retry": RetryPolicy,
    "breaker": BreakerPolicy,
}


def _parse(key: str, raw: str, annotation: Any) -> Any:
    text = str(annotation)
    if not isinstance(raw, str):
        raise ConfigurationError(
            key, f"must be a string, got {type(raw).__name__}.", "Environment values are text."
        )
    value = raw.strip()
    if not value:
        # a blank `VAR=` (compose, Kubernetes) must not switch a limit off
        raise ConfigurationError(
            key,
            "is set but empty.",
            "Give a value, write 'none' to disable an optional limit, or unset the variable.",
        )
    if "None" in text and value.lower() in ("none", "null"):
        return None
    try:
        if text.startswith("bool"):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if text.startswith("int"):
            return int(value)
        if text.startswith("float"):
            return float(value)
    except ValueError:
        raise ConfigurationError(
            key, f"cannot be parsed from {value!r}.", f"Give a value of type {text}."
        ) from None
    return value


DEFAULT_POLICY = Policy()
