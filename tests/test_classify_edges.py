"""classify() edge cases that no server produces: cancellation, unknown errors, odd objects."""

from __future__ import annotations

import asyncio
import importlib
import socket

import pymysql
import pytest
from sqlalchemy import exc as sa_exc

from resilient_db import (
    CircuitOpenError,
    Classification,
    Kind,
    RetryLevel,
    Target,
    classify,
)
from resilient_db import _classify_rules as _table
from resilient_db.classify import _RULES, explain

PHASES = [None, "connect", "checkout", "execute", "commit", "rollback"]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize(
    "exc",
    [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(1)],
    ids=["CancelledError", "KeyboardInterrupt", "SystemExit"],
)
def test_cancellation_is_never_a_failure(exc: BaseException, phase: str | None) -> None:
    """Cancellation is CANCELLED, never retried and never counted, in every phase."""
    c = classify(exc, phase=phase)
    assert (Kind.CANCELLED, RetryLevel.NEVER, False) == (c.kind, c.retry, c.counts_for_breaker)


def test_cancellation_under_a_driver_error_is_cancelled() -> None:
    """A DBAPIError whose cause is a CancelledError (an interrupted await) is CANCELLED."""
    wrapped = sa_exc.OperationalError("SELECT 1", None, Exception("interrupted"))
    wrapped.__cause__ = asyncio.CancelledError()
    c = classify(wrapped, phase="execute")
    assert (Kind.CANCELLED, RetryLevel.NEVER, False) == (c.kind, c.retry, c.counts_for_breaker)


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize(
    "exc",
    [
        ValueError("boom"),
        RuntimeError(),
        Exception(),
        ZeroDivisionError("division by zero"),
        # application errors whose text happens to look like a database fault
        ValueError("user 'bob' does not exist in database 'crm'"),
        KeyError("timed out"),
        RuntimeError("connection refused by the payment API"),
        LookupError("too many connections to the cache"),
        sa_exc.InvalidRequestError("This result object is closed"),
    ],
    ids=lambda e: type(e).__name__ + (f"({e.args[0]})" if e.args else ""),
)
def test_unknown_errors_are_unknown(exc: BaseException, phase: str | None) -> None:
    """Errors not from a driver, the OS or the DBAPI layer are UNKNOWN, NEVER, uncounted."""
    c = classify(exc, phase=phase)
    assert (Kind.UNKNOWN, RetryLevel.NEVER, False) == (c.kind, c.retry, c.counts_for_breaker)


def test_unrecognised_dbapi_error_is_unknown() -> None:
    """A DBAPI error with no code and no known text is UNKNOWN, not retried, not counted."""
    err = sa_exc.DBAPIError("SELECT 1", None, Exception("the flux capacitor overheated"))
    c = classify(err, phase="execute")
    assert (Kind.UNKNOWN, RetryLevel.NEVER, False) == (c.kind, c.retry, c.counts_for_breaker)


def test_broken_str_does_not_break_classify() -> None:
    """An exception whose __str__ raises is still classified (UNKNOWN)."""

    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    wrapped = sa_exc.OperationalError("SELECT 1", None, Broken())
    assert Kind.UNKNOWN == classify(wrapped).kind


def test_cyclic_cause_chain_terminates() -> None:
    """A cause chain with a cycle is walked once."""
    a, b = ValueError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a
    assert Kind.UNKNOWN == classify(a).kind


def test_mysql_errno_wins_over_its_sqlstate() -> None:
    """PyMySQL >= 1.2 sets sqlstate; 1213 says 40001 and 1044 says 42000, yet the errno rules."""
    deadlock = pymysql.err.OperationalError(1213, "Deadlock found", sqlstate="40001")
    denied = pymysql.err.OperationalError(1044, "Access denied ... 'x'", sqlstate="42000")
    got = [
        (c.kind, c.code)
        for c in (classify(deadlock, phase="execute"), classify(denied, phase="connect"))
    ]
    assert [(Kind.DEADLOCK, "1213"), (Kind.UNKNOWN_DATABASE, "1044")] == got


def test_pool_timeout_is_pool_exhausted() -> None:
    """sqlalchemy.exc.TimeoutError (not builtins.TimeoutError) is POOL_EXHAUSTED, not counted."""
    c = classify(sa_exc.TimeoutError("QueuePool limit of size 1 overflow 0 reached"))
    assert (Kind.POOL_EXHAUSTED, RetryLevel.CONNECT, False) == (
        c.kind,
        c.retry,
        c.counts_for_breaker,
    )


def test_builtin_timeout_depends_on_phase() -> None:
    """A bare TimeoutError (asyncpg) is a connect timeout at connect, a read timeout later."""
    kinds = [classify(TimeoutError(), phase=p).kind for p in ("connect", "execute")]
    assert [Kind.CONNECT_TIMEOUT, Kind.READ_TIMEOUT] == kinds


def test_lost_connection_during_commit_is_ambiguous() -> None:
    """A connection lost while COMMIT is in flight is AMBIGUOUS_COMMIT, never retried."""
    lost = sa_exc.OperationalError(
        "COMMIT", None, ConnectionResetError(104, "Connection reset by peer")
    )
    got = [
        (classify(lost, phase=p).kind, classify(lost, phase=p).retry) for p in ("execute", "commit")
    ]
    assert [
        (Kind.DISCONNECT, RetryLevel.TRANSACTION),
        (Kind.AMBIGUOUS_COMMIT, RetryLevel.NEVER),
    ] == got


def test_circuit_open_error() -> None:
    """resilient_db's own CircuitOpenError classifies as CIRCUIT_OPEN, not counted again."""
    c = classify(CircuitOpenError("open"))
    assert (Kind.CIRCUIT_OPEN, RetryLevel.NEVER, False) == (c.kind, c.retry, c.counts_for_breaker)


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.value)
def test_every_kind_has_a_rule_and_a_diagnosis(kind: Kind) -> None:
    """Each kind has a retry level and a diagnosis that formats with and without a target."""
    retry, _counts, template = _RULES[kind]
    target = Target("postgresql", "psycopg", "db.example", 5432, "app", "svc")
    with_target = template.format(
        where=target.where, host=target.host, user=target.user, database=target.database
    )
    assert isinstance(retry, RetryLevel)
    assert "{" not in with_target
    assert with_target.strip() != ""


def test_diagnosis_without_target_is_neutral() -> None:
    """Without a target the diagnosis names 'the database server', never 'None'."""
    c = classify(ConnectionRefusedError(111, "Connection refused"), phase="connect")
    assert "the database server" in c.diagnosis
    assert "None" not in c.diagnosis


def test_transient_follows_retry_level() -> None:
    """Classification.transient is True exactly when some retry is allowed."""
    verdicts = [
        Classification(k, r, False, None, "").transient
        for k, r in ((Kind.REFUSED, RetryLevel.CONNECT), (Kind.DEADLOCK, RetryLevel.TRANSACTION))
    ] + [Classification(Kind.UNKNOWN, RetryLevel.NEVER, False, None, "").transient]
    assert [True, True, False] == verdicts


def test_python_level_error_is_typed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown socket error is looked at by type once, and stays UNKNOWN."""
    classify_module = importlib.import_module("resilient_db.classify")
    calls: list[BaseException] = []
    by_type = classify_module._kind_from_type

    def counting(exc: BaseException, phase: str | None) -> Kind | None:
        calls.append(exc)
        return by_type(exc, phase)

    monkeypatch.setattr(classify_module, "_kind_from_type", counting)
    c = classify(OSError(5, "odd"), phase="execute")
    assert (Kind.UNKNOWN, 1) == (c.kind, len(calls))


def test_mysql_2003_reset_during_handshake_is_a_disconnect() -> None:
    """PyMySQL reports a reset during the handshake as 2003; it is not 'refused'."""
    orig = pymysql.err.OperationalError(
        2003, "Can't connect to MySQL server on '127.0.0.1' ([Errno 104] Connection reset by peer)"
    )
    c = classify(sa_exc.OperationalError(None, None, orig), phase="connect")
    assert (Kind.DISCONNECT, RetryLevel.CONNECT) == (c.kind, c.retry)


@pytest.mark.parametrize("rule", [*Kind, *_table.CONNECT_VARIANTS], ids=str)
def test_startup_checks_say_what_the_runtime_says(rule: Kind | str) -> None:
    """explain() gives the startup checks the runtime diagnosis's words, minus the engine's part."""
    target = Target("postgresql", "psycopg", "db.example", 5432, "app", "svc")
    what, fix = explain(rule, target)
    assert what.strip() != "" and "{" not in what + fix
    if isinstance(rule, Kind):
        template = _RULES[rule][2].format(
            where=target.where, host=target.host, user=target.user, database=target.database
        )
        assert template.startswith(f"{what} {fix}".strip())


def test_temporary_dns_failure_is_not_called_a_configuration_error() -> None:
    """EAI_AGAIN is retried at connect, and its diagnosis says it is an outage."""
    c = classify(socket.gaierror(-3, "Temporary failure in name resolution"), phase="connect")
    assert (Kind.DNS, RetryLevel.CONNECT) == (c.kind, c.retry)
    assert "failed temporarily" in c.diagnosis
    assert "Configuration error" not in c.diagnosis


def test_a_connection_closed_while_connecting_lost_no_transaction() -> None:
    """A disconnect at connect is a closed handshake; no transaction was lost."""
    c = classify(ConnectionResetError(104, "Connection reset by peer"), phase="connect")
    assert (Kind.DISCONNECT, RetryLevel.CONNECT) == (c.kind, c.retry)
    assert "closed the connection during the handshake" in c.diagnosis
    assert "transaction" not in c.diagnosis
