"""resilient_db: SQLAlchemy engines that survive database trouble.

``create_engine()`` returns a genuine :class:`sqlalchemy.engine.Engine` with
validated configuration, classified and explained errors, a circuit breaker,
safe connect retries and a bounded pool.
"""

from typing import TYPE_CHECKING, Any

from . import events
from ._backoff import set_testing
from .breaker import BreakerSnapshot, CircuitBreaker
from .classify import Classification, Kind, RetryLevel, Target, classify
from .config import (
    DEFAULT_POLICY,
    BreakerPolicy,
    Policy,
    PoolPolicy,
    RetryPolicy,
    Timeouts,
)
from .engine import (
    breaker_of,
    breaker_state,
    create_engine,
    engine_options,
    policy_of,
    wrap,
)
from .errors import (
    AmbiguousCommitError,
    CircuitOpenError,
    ConfigurationError,
    ErrorContext,
    NoPrimaryError,
    PoolExhaustedError,
    PortableOperationalError,
    ResilientDBError,
    error_context,
    portable_error,
)
from .failover import HostStatus, hosts_of
from .health import HealthSnapshot, PoolStats, health, health_async

__all__ = [
    "ALREADY_COMMITTED",
    "DEFAULT_POLICY",
    "AlreadyCommitted",
    "AmbiguousCommitError",
    "BreakerPolicy",
    "BreakerSnapshot",
    "CircuitBreaker",
    "CircuitOpenError",
    "Classification",
    "ConfigurationError",
    "ErrorContext",
    "Finding",
    "HealthSnapshot",
    "HostStatus",
    "Kind",
    "NoPrimaryError",
    "Policy",
    "PoolExhaustedError",
    "PoolPolicy",
    "PoolStats",
    "PortableOperationalError",
    "RedisBreakerStore",
    "Report",
    "ResilientDBError",
    "RetryLevel",
    "RetryPolicy",
    "Target",
    "Timeouts",
    "breaker_of",
    "breaker_state",
    "classify",
    "create_async_engine",
    "create_engine",
    "engine_options",
    "ensure_idempotency_table",
    "error_context",
    "events",
    "health",
    "health_async",
    "hosts_of",
    "idempotency_table",
    "policy_of",
    "portable_error",
    "purge_idempotency_keys",
    "run_transaction",
    "run_transaction_async",
    "set_testing",
    "share_breaker",
    "transactional",
    "transactional_async",
    "validate",
    "wrap",
    "wrap_async",
]

if TYPE_CHECKING:
    from .aio import create_async_engine, wrap_async
    from .fleet import RedisBreakerStore, share_breaker
    from .idempotency import (
        ensure_idempotency_table,
        idempotency_table,
        purge_idempotency_keys,
    )
    from .retry import (
        ALREADY_COMMITTED,
        AlreadyCommitted,
        run_transaction,
        run_transaction_async,
        transactional,
        transactional_async,
    )
    from .validation import Finding, Report, validate

    __version__: str

# Imported on first use, so ``import resilient_db`` loads only what every engine
# needs: sync-only services never load sqlalchemy.ext.asyncio, and the startup
# checks, the unit-of-work retry, the fleet store and the idempotency helpers (and
# importlib.metadata, for __version__) cost nothing until asked for. (Not health: the
# submodule resilient_db.health, once imported, would hide a lazy health().)
_LAZY = {
    "create_async_engine": "aio",
    "wrap_async": "aio",
    "RedisBreakerStore": "fleet",
    "share_breaker": "fleet",
    "ensure_idempotency_table": "idempotency",
    "idempotency_table": "idempotency",
    "purge_idempotency_keys": "idempotency",
    "ALREADY_COMMITTED": "retry",
    "AlreadyCommitted": "retry",
    "run_transaction": "retry",
    "run_transaction_async": "retry",
    "transactional": "retry",
    "transactional_async": "retry",
    "Finding": "validation",
    "Report": "validation",
    "validate": "validation",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("resilient-db")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _version()
    else:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'resilient_db' has no attribute {name!r}")
        from importlib import import_module

        value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"__version__"})
