"""Connecting: a throw-away connection, and what its failure means.

The connection uses the engine's connect arguments with every timeout capped
to the time left; a failure is classified and mapped to the code of the layer
that failed (TLS, greeting, handshake, login, database, capacity...).
"""

from __future__ import annotations

import asyncio
from typing import Any

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from ..classify import Classification, Kind, classify, explain
from .context import _MARGIN, _as_float, _ConnectFailed, _Facts, _first_line, _Run, _secs
from .report import Detail
from .server import _probe, _server_codes

# --------------------------------------------------------------------------- the connection


def _bounded_args(run: _Run, step: float) -> dict[str, Any]:
    """The connect args with every timeout capped to ``step`` seconds."""
    a = dict(run.args)

    def cap(key: str, default: float | None = None) -> float:
        cur = _as_float(a.get(key, run.opt(key)))
        if cur is None or cur <= 0:
            cur = default if default is not None else step
        return min(cur, step)

    if run.backend == "postgresql":
        if run.driver == "asyncpg":
            a["timeout"] = cap("timeout")
            a["command_timeout"] = cap("command_timeout")
        else:
            a["connect_timeout"] = max(2, int(cap("connect_timeout")))
            ms = max(1, int(step * 1000))
            a["options"] = f"{a.get('options', '')} -c statement_timeout={ms}".strip()
    elif run.backend in ("mysql", "mariadb"):
        a["connect_timeout"] = cap("connect_timeout")
        if run.driver == "pymysql":
            a["read_timeout"] = cap("read_timeout")
            a["write_timeout"] = cap("write_timeout")
    elif run.backend == "sqlite" and run.driver != "aiosqlite":
        a["timeout"] = cap("timeout", 1.0)
    return a


def _throwaway(run: _Run, args: dict[str, Any]) -> Engine:
    """A ``NullPool`` engine with the engine's creator or ``args`` and its listeners."""
    assert run.url is not None
    if run.creator is not None:
        eng = sqlalchemy.create_engine(
            run.url, creator=run.creator, poolclass=NullPool, hide_parameters=True
        )
    else:
        eng = sqlalchemy.create_engine(
            run.url, poolclass=NullPool, connect_args=args, hide_parameters=True
        )
    for fn in run.listeners:
        event.listen(eng, "do_connect", fn)
    return eng


def _open_and_probe(run: _Run, args: dict[str, Any], step: float) -> _Facts:
    """Connect once and read the server; a failed connect raises :class:`_ConnectFailed`."""
    if run.is_async:
        return asyncio.run(_aopen_and_probe(run, args, step))
    eng = _throwaway(run, args)
    try:
        t = run.clock()
        try:
            conn = eng.connect()
        except Exception as exc:
            raise _ConnectFailed(exc) from None
        facts = _Facts(connect_ms=(run.clock() - t) * 1000)
        run.step = f"reading server settings from {run.target.where}"
        with conn:
            _probe(conn.execution_options(isolation_level="AUTOCOMMIT"), facts)
        return facts
    finally:
        eng.dispose()


async def _aopen_and_probe(run: _Run, args: dict[str, Any], step: float) -> _Facts:
    from sqlalchemy.ext.asyncio import create_async_engine

    assert run.url is not None
    eng = create_async_engine(run.url, poolclass=NullPool, connect_args=args, hide_parameters=True)
    try:
        t = run.clock()
        try:
            conn = eng.connect()
            await asyncio.wait_for(conn.start(), timeout=step + _MARGIN / 2)
        except Exception as exc:
            raise _ConnectFailed(exc) from None
        facts = _Facts(connect_ms=(run.clock() - t) * 1000)
        run.step = f"reading server settings from {run.target.where}"
        try:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await asyncio.wait_for(conn.run_sync(_probe, facts), timeout=max(0.1, run.remaining()))
        finally:
            await conn.close()
        return facts
    finally:
        await eng.dispose()


# --------------------------------------------------------------------------- the failure


_KIND_CODES: dict[Kind, str] = {
    Kind.DNS: "RDB201",
    Kind.REFUSED: "RDB202",
    Kind.TLS: "RDB204",
    Kind.CONNECT_TIMEOUT: "RDB205",
    Kind.READ_TIMEOUT: "RDB205",
    Kind.DISCONNECT: "RDB206",
    Kind.ADMIN_TERMINATED: "RDB206",
    Kind.IDLE_TIMEOUT: "RDB206",
    Kind.AUTHENTICATION: "RDB301",
    Kind.UNKNOWN_USER: "RDB302",
    Kind.UNKNOWN_DATABASE: "RDB303",
    Kind.CONFIGURATION: "RDB304",
    Kind.READ_ONLY: "RDB305",
    Kind.TOO_MANY_CONNECTIONS: "RDB401",
    Kind.SERVER_SHUTDOWN: "RDB406",
}


def _code_for(run: _Run, exc: BaseException, c: Classification) -> str:
    code = _KIND_CODES.get(c.kind, "RDB399")
    text = _first_line(exc).lower()
    if c.code == "2003" and any(w in text for w in ("timed out", "unreachable", "no route")):
        return "RDB203"  # PyMySQL: the TCP connect itself failed
    if code == "RDB205" and run.tcp_ok is False:
        return "RDB203"
    if run.backend == "sqlite" and code == "RDB304":
        return "RDB399"
    return code


#: check code -> the diagnosis (a classify kind or connect variant) whose words it reports
_CODE_RULES: dict[str, Kind | str] = {
    "RDB201": Kind.DNS,
    "RDB202": Kind.REFUSED,
    "RDB203": "tcp_timeout",
    "RDB204": Kind.TLS,
    "RDB205": Kind.CONNECT_TIMEOUT,
    "RDB206": "handshake_closed",
    "RDB301": Kind.AUTHENTICATION,
    "RDB302": Kind.UNKNOWN_USER,
    "RDB303": Kind.UNKNOWN_DATABASE,
    "RDB304": Kind.CONFIGURATION,
    "RDB305": Kind.READ_ONLY,
    "RDB401": Kind.TOO_MANY_CONNECTIONS,
    "RDB406": Kind.SERVER_SHUTDOWN,
}


def _connect_message(run: _Run, code: str, words: str, step: float) -> tuple[str, str, str]:
    """(message, fix, field) for a failed connection attempt: classify's diagnosis words."""
    said = f" The driver said: {words}"
    fld = "pool.size" if code == "RDB401" else "url"
    rule = _CODE_RULES.get(code)
    if rule is None:
        return (
            f"Connecting to {run.target.where} failed.{said}",
            "Read the driver's message; see docs/checks.md (RDB399).",
            fld,
        )
    if code == "RDB205" and (run.tcp_ok is not None or run.driver == "pymysql"):
        rule = "no_greeting"  # the TCP connect succeeded (PyMySQL: else it were RDB203)
    elif code == "RDB201" and "temporar" in words.lower():
        rule = "dns_temporary"  # the resolver failed for now: an outage, not a typo
    what, fix = explain(rule, run.target, within=_secs(round(step, 2)))
    return what + said, fix, fld


def _check_connect(run: _Run) -> None:
    """RDB301 (and every code a failed connect maps to): connect and read the server."""
    server_codes = _server_codes(run)
    blocked = run.blocked.get("connection") or run.blocked.get("network")
    if blocked is not None:
        if run.backend != "sqlite":
            run.skip("RDB301", blocked)
        for code in server_codes:
            run.skip(code, blocked)
        return
    step = run.step_timeout()
    if step is None:
        run.abandon()
        return
    try:
        facts = _open_and_probe(run, _bounded_args(run, step), step)
    except _ConnectFailed as failed:
        exc = failed.exc
        c = classify(exc, phase="connect", target=run.target)
        code = _code_for(run, exc, c)
        message, fix, fld = _connect_message(run, code, _first_line(exc), step)
        if run.backend != "sqlite" and run.tcp_ok is None and code[:4] != "RDB2":
            run.ok("RDB202", f"{run.target.where} accepts connections.")
        elif run.backend != "sqlite" and run.tcp_ok is None and code == "RDB204":
            run.ok("RDB202", f"{run.target.where} accepts TCP connections.")
        extra: dict[str, Detail] = {}
        if code == "RDB201" and "temporar" in _first_line(exc).lower():
            extra["temporary"] = True  # as the message says (_connect_message)
        run.add(code, "error", message, fix, fld, kind=c.kind.value, driver_code=c.code, **extra)
        run.block(code, "connection")
        if code.startswith("RDB2") and run.backend != "sqlite":
            run.skip("RDB301", code)
        for other in server_codes:
            if other != code:
                run.skip(other, code)
        return
    run.facts = facts
    if run.backend == "sqlite":
        return
    if run.tcp_ok is None:
        run.ok("RDB202", f"{run.target.where} accepts connections.")
    run.ok(
        "RDB301",
        f"Logged in as '{facts.user or run.target.user}' to database "
        f"'{facts.database or run.target.database}' in {facts.connect_ms:.0f} ms.",
    )
