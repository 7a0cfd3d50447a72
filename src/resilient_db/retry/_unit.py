"""The unit of work and one attempt's progress, shared by the sync and async call paths.

Also the result markers an attempt returns instead of ``fn``'s result, and the
few things both attempt twins use: the dialects that begin a read-only
transaction with a statement, the idempotency-key claim verdict, and the warning
for a unit that ended its own transaction.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Any, Final

from sqlalchemy import exc as sa_exc

from .. import idempotency as _idem

# one logger for the whole runner: its name is documented (docs/transactions.md)
logger = logging.getLogger("resilient_db.retry")


class AlreadyCommitted(enum.Enum):
    """Type of :data:`ALREADY_COMMITTED`."""

    ALREADY_COMMITTED = "already_committed"

    def __repr__(self) -> str:
        return "resilient_db.ALREADY_COMMITTED"


#: Returned instead of the function's result when the unit's idempotency key
#: was already recorded by an earlier call: the work is done and was not re-run.
ALREADY_COMMITTED: Final = AlreadyCommitted.ALREADY_COMMITTED


class _Marker(enum.Enum):
    MISSING = 0  # no result recorded
    DUPLICATE = 1  # the idempotency key exists: committed earlier
    VERIFIED = 2  # verify() said the ambiguous attempt committed


_MISSING: Final = _Marker.MISSING
_DUPLICATE: Final = _Marker.DUPLICATE
_VERIFIED: Final = _Marker.VERIFIED

# read-only units begin with START TRANSACTION READ ONLY on these dialects
_MYSQL = ("mysql", "mariadb")


class _Unit:
    """What to run, and how; built once per call."""

    __slots__ = ("fn", "isolation_level", "key", "read_only", "verify")

    def __init__(
        self,
        fn: Callable[[Any], Any],
        read_only: bool,
        key: str | None,
        verify: Callable[[Any], Any] | None,
        isolation_level: str | None,
    ) -> None:
        self.fn = fn
        self.read_only = read_only
        self.key = key
        self.verify = verify
        self.isolation_level = isolation_level

    def options(self, dialect_name: str) -> dict[str, Any] | None:
        """Execution options to set on the attempt's connection before BEGIN."""
        if self.isolation_level is None and not self.read_only:
            return None
        opts: dict[str, Any] = {}
        if self.isolation_level is not None:
            opts["isolation_level"] = self.isolation_level
        if self.read_only and dialect_name == "postgresql":
            opts["postgresql_readonly"] = True
        return opts or None


class _Try:
    """One attempt's progress: where it failed and what ``fn`` returned."""

    __slots__ = ("claimed", "escaped", "phase", "result")

    def __init__(self) -> None:
        self.phase = "connect"
        self.result: Any = _MISSING
        self.claimed = False
        # fn committed or rolled back the runner's transaction: its work may be committed
        self.escaped = False


def _warn_escaped() -> None:
    logger.warning(
        "A unit of work committed or rolled back the runner's transaction itself; the "
        "runner committed what it left, and will not re-run such an attempt after a failure. "
        "Let the runner commit.",
        extra={"resilient_db": {"event": "unit_ended_transaction"}},
    )


def _claim_failed(exc: BaseException) -> bool:
    """True when the key insert failed because the key exists; re-raise otherwise."""
    if isinstance(exc, sa_exc.IntegrityError):
        return True
    if isinstance(exc, sa_exc.DBAPIError) and _idem.is_missing_table(exc):
        raise _idem.missing_table_error() from exc
    return False
