"""Retry whole units of work: :func:`run_transaction`, :func:`transactional` and async twins.

A unit of work is a function that does its reads and writes on the Connection
(or Session) it is given and does not commit. The runner gives every attempt a
fresh transaction (and a fresh Session), commits it, and re-runs the whole
function only when the error's classification (the engine's
:class:`~resilient_db.ErrorContext` when it attached one, else
:func:`~resilient_db.classify`) says the transaction was lost and nothing was
committed: serialization failures, deadlocks, lock timeouts (after a rollback),
disconnects and terminated sessions before COMMIT, failed connects.
Application errors, statement timeouts, configuration errors, an open circuit
breaker, an exhausted pool and cancellation are raised at once.

Connect attempts the engine already made count against the unit's attempts,
so a refused connection is tried ``attempts`` times, not ``attempts**2``. A
unit is never re-run once its work may have been committed: an engine in
AUTOCOMMIT isolation is refused up front (unless ``read_only=True``), and an
attempt in which ``fn`` committed or rolled back the runner's transaction
itself is not retried.

An ambiguous commit (the connection died while COMMIT was in flight) is never
re-run blindly: it raises :class:`~resilient_db.AmbiguousCommitError` unless the
unit carries an ``idempotency_key`` (see :mod:`resilient_db.idempotency`) or a
``verify`` callback that settles whether the earlier attempt committed.

The first attempt runs plainly; tenacity's ``Retrying`` is built only after a
failure worth retrying, so the happy path costs what ``engine.begin()`` costs.

The package, one responsibility a module:

- ``_unit``: the unit of work, one attempt's progress, the result markers;
- ``_binds``: argument checks, and the binds that cannot be re-run safely;
- ``_control``: the decisions (pure, synchronous, shared by both runners): what
  is retryable, attempts and deadline, ambiguity rules, the final error;
- ``_sync`` and ``_async``: the twin call paths and the public functions.
"""

from __future__ import annotations

from ._async import run_transaction_async, transactional_async
from ._sync import run_transaction, transactional
from ._unit import ALREADY_COMMITTED, AlreadyCommitted

__all__ = [
    "ALREADY_COMMITTED",
    "AlreadyCommitted",
    "run_transaction",
    "run_transaction_async",
    "transactional",
    "transactional_async",
]
