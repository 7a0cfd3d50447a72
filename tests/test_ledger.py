"""Ledger soak (benchmarks/ledger.py): transfers stay exactly-once while faults rain down."""

from __future__ import annotations

import os

import pytest
from benchmarks.ledger import run_soak

import resilient_db

#: Seconds per database; CI runs the default.
SOAK_SECONDS = float(os.environ.get("RDB_SOAK_SECONDS", "10"))


@pytest.mark.slow
@pytest.mark.parametrize("db", ["postgresql", "mariadb"])
def test_ledger_is_consistent_under_faults(db: str, request: pytest.FixtureRequest) -> None:
    """Kills, resets, lost COMMIT replies and blackholes: no money lost, no transfer doubled."""
    url = str(request.getfixturevalue("pg_url" if db == "postgresql" else "mariadb_url"))
    resilient_db.set_testing(False)  # real backoff, as in production
    result = run_soak(url, SOAK_SECONDS, seed=7)
    print(result.summary())
    lost_replies = result.faults["drop_commit_reply"]
    assert ([], True, True, True) == (
        result.violations,
        result.committed > 0,
        result.reruns > 0,
        result.settled_by_key + result.ambiguous >= lost_replies,
    )
