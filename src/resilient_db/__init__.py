"""resilient_db: SQLAlchemy engines that survive database trouble.

``create_engine()`` returns a genuine :class:`sqlalchemy.engine.Engine` with
validated configuration, classified and explained errors, a circuit breaker,
safe connect retries and a bounded pool.
"""

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
from .engine import breaker_of, breaker_state, create_engine, policy_of, wrap
from .errors import (
    AmbiguousCommitError,
    CircuitOpenError,
    ConfigurationError,
    ErrorContext,
    PoolExhaustedError,
    ResilientDBError,
    error_context,
)

__all__ = [
    "DEFAULT_POLICY",
    "AmbiguousCommitError",
    "BreakerPolicy",
    "BreakerSnapshot",
    "CircuitBreaker",
    "CircuitOpenError",
    "Classification",
    "ConfigurationError",
    "ErrorContext",
    "Kind",
    "Policy",
    "PoolExhaustedError",
    "PoolPolicy",
    "ResilientDBError",
    "RetryLevel",
    "RetryPolicy",
    "Target",
    "Timeouts",
    "breaker_of",
    "breaker_state",
    "classify",
    "create_engine",
    "error_context",
    "policy_of",
    "set_testing",
    "wrap",
]

__version__ = "0.1.0"
