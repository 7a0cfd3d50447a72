"""Server-side checks: read the server's settings, then compare them with the policy.

The probes (PostgreSQL, MariaDB/MySQL, SQLite) fill a :class:`_Facts` over the
validation's own connection; the checks (RDB305/306, RDB4xx, RDB504-506,
RDB605) turn those facts into findings.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection

from .context import _as_float, _ConnectFailed, _Facts, _first_line, _Run, _secs

# Oldest server versions still maintained upstream; older ones get RDB405.
_MIN_VERSIONS = {"PostgreSQL": (13,), "MariaDB": (10, 6), "MySQL": (8, 0)}


def _server_codes(run: _Run) -> tuple[str, ...]:
    """The codes of the checks that need a connection to this backend."""
    if run.backend == "postgresql":
        return ("RDB305", "RDB306", "RDB400", "RDB402", "RDB505", "RDB506")
    if run.backend in ("mysql", "mariadb"):
        return ("RDB305", "RDB306", "RDB400", "RDB402", "RDB504")
    if run.backend == "sqlite":
        return ("RDB605",)
    return ()


# --------------------------------------------------------------------------- probes


def _probe(conn: Connection, facts: _Facts) -> None:
    name = conn.dialect.name
    if name == "postgresql":
        _probe_pg(conn, facts)
    elif name in ("mysql", "mariadb"):
        _probe_mysql(conn, facts)
    elif name == "sqlite":
        _probe_sqlite(conn, facts)


def _query(conn: Connection, facts: _Facts, what: str, sql: str) -> list[Any] | None:
    try:
        return list(conn.exec_driver_sql(sql).fetchall())
    except sa_exc.DBAPIError as exc:
        facts.errors[what] = _first_line(exc)
        return None


_PG_MAIN = """
SELECT version(),
       current_setting('server_version_num')::int,
       current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int
         + coalesce(current_setting('reserved_connections', true), '0')::int,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int,
       pg_is_in_recovery(),
       current_setting('default_transaction_read_only'),
       current_setting('transaction_read_only'),
       r.rolsuper, r.rolconnlimit, d.datconnlimit,
       current_user::text, current_database()::text
FROM pg_roles r, pg_database d
WHERE r.rolname = current_user AND d.datname = current_database()
"""
_PG_SETTINGS = """
SELECT name, setting FROM pg_settings
WHERE name IN ('idle_session_timeout', 'idle_in_transaction_session_timeout')
"""
_PG_WRITE = """
SELECT coalesce(has_schema_privilege(current_schema(), 'CREATE'), false),
       EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE c.relkind IN ('r', 'p')
                 AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                 AND n.nspname !~ '^pg_toast'
                 AND has_table_privilege(c.oid, 'INSERT')),
       coalesce(current_schema()::text, '')
"""


def _probe_pg(conn: Connection, facts: _Facts) -> None:
    facts.product = "PostgreSQL"
    rows = _query(conn, facts, "server", _PG_MAIN)
    if rows:
        (version, num, maxc, reserved, current, recovery, dtro, tro, su, rlim, dlim, u, d) = rows[0]
        facts.version = str(version).split(" on ")[0].replace("PostgreSQL ", "")
        facts.version_tuple = (int(num) // 10000, int(num) % 10000)
        facts.max_connections, facts.reserved, facts.current = int(maxc), int(reserved), current
        facts.superuser = bool(su)
        facts.user_limit = int(rlim) if rlim is not None and int(rlim) >= 0 else None
        facts.database_limit = int(dlim) if dlim is not None and int(dlim) >= 0 else None
        facts.user, facts.database = u, d
        facts.read_only = tro == "on"
        if recovery:
            facts.read_only_reason = "it is a hot standby (pg_is_in_recovery() is true)"
        elif dtro == "on":
            facts.read_only_reason = (
                "default_transaction_read_only is on (set on the server, the database or the role)"
            )
        elif tro == "on":
            facts.read_only_reason = "transaction_read_only is on"
    settings = _query(conn, facts, "settings", _PG_SETTINGS) or []
    values = {str(n): _as_float(v) for n, v in settings}
    ist, iit = values.get("idle_session_timeout"), values.get("idle_in_transaction_session_timeout")
    facts.idle_session_timeout = ist / 1000 if ist else None
    facts.idle_in_tx_timeout = iit / 1000 if iit else None
    if facts.superuser:
        facts.can_write, facts.write_reason = True, "superuser"
        return
    priv = _query(conn, facts, "privileges", _PG_WRITE)
    if priv:
        create, insert, schema = priv[0]
        facts.can_write = bool(create or insert)
        if insert:
            facts.write_reason = "INSERT on at least one table"
        elif create:
            facts.write_reason = f"CREATE on schema {schema}"
        else:
            facts.write_reason = (
                f"no INSERT on any table and no CREATE on schema {schema or '(none)'}"
            )


_GRANT_RE = re.compile(
    r"^GRANT (?P<privs>.+?) ON (?:(?:TABLE|FUNCTION|PROCEDURE|PACKAGE BODY|PACKAGE) )?"
    r"(?P<obj>\S+) TO ",
    re.IGNORECASE,
)
_MAX_USER_RE = re.compile(r"MAX_USER_CONNECTIONS (\d+)", re.IGNORECASE)
_WRITE_PRIVS = {"ALL", "ALL PRIVILEGES", "INSERT", "UPDATE", "DELETE"}
_BYPASS_PRIVS = {"ALL", "ALL PRIVILEGES", "SUPER", "READ_ONLY ADMIN"}


def _db_matches(pattern: str, database: str | None) -> bool:
    if pattern == "*":
        return True
    if database is None:
        return False
    rx = ""
    i = 0
    while i < len(pattern):  # MySQL db patterns: % and _ wildcards, \ escapes
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            rx += re.escape(pattern[i + 1])
            i += 2
            continue
        rx += ".*" if ch == "%" else "." if ch == "_" else re.escape(ch)
        i += 1
    return re.fullmatch(rx, database) is not None


def _parse_grants(lines: list[str], database: str | None, facts: _Facts) -> None:
    write_on: list[str] = []
    roles = False
    for line in lines:
        m = _MAX_USER_RE.search(line)
        if m and int(m.group(1)) > 0:
            facts.user_limit = int(m.group(1))
        g = _GRANT_RE.match(line)
        if g is None:
            roles = roles or line.upper().startswith("GRANT `")
            continue
        privs = {p.strip().split(" (")[0].upper() for p in g.group("privs").split(",")}
        obj = g.group("obj")
        db_part = obj.split(".", 1)[0].strip("`").replace("``", "`")
        if obj == "*.*" and privs & _BYPASS_PRIVS:
            facts.bypasses_read_only = True
        if privs & _WRITE_PRIVS and _db_matches(db_part, database):
            write_on.append(obj)
    if write_on:
        facts.can_write, facts.write_reason = True, f"write privileges on {write_on[0]}"
    elif roles:
        facts.can_write, facts.write_reason = None, "privileges come through roles (not inspected)"
    else:
        facts.can_write = False
        facts.write_reason = f"no INSERT/UPDATE/DELETE grant covering database {database}"


def _probe_mysql(conn: Connection, facts: _Facts) -> None:
    rows = _query(
        conn,
        facts,
        "server",
        "SELECT VERSION(), @@global.max_connections, @@global.max_user_connections, "
        "@@global.read_only, @@session.wait_timeout, @@global.interactive_timeout, "
        "CURRENT_USER(), DATABASE()",
    )
    if rows:
        version, maxc, max_user, ro, wait, interactive, user, database = rows[0]
        facts.version = str(version)
        facts.product = "MariaDB" if "mariadb" in facts.version.lower() else "MySQL"
        facts.version_tuple = tuple(int(x) for x in re.findall(r"\d+", facts.version)[:3])
        facts.max_connections = int(maxc)
        facts.user_limit = int(max_user) if max_user else None
        facts.read_only = bool(int(ro))
        if facts.read_only:
            facts.read_only_reason = "read_only is ON (a replica, or set by an operator)"
        facts.wait_timeout, facts.interactive_timeout = int(wait), int(interactive)
        facts.user, facts.database = str(user), database
    status = _query(conn, facts, "status", "SHOW GLOBAL STATUS LIKE 'Threads_connected'")
    if status:
        facts.current = int(status[0][1])
    grants = _query(conn, facts, "privileges", "SHOW GRANTS")
    if grants is not None:
        _parse_grants([str(r[0]) for r in grants], facts.database, facts)


def _probe_sqlite(conn: Connection, facts: _Facts) -> None:
    facts.product = "SQLite"
    facts.version = sqlite3.sqlite_version
    try:  # SQLite opens lazily: this reads the header ("file is not a database")
        conn.exec_driver_sql("PRAGMA schema_version").fetchall()
    except sa_exc.DBAPIError as exc:
        raise _ConnectFailed(exc) from None
    mode = _query(conn, facts, "journal", "PRAGMA journal_mode")
    if mode:
        facts.journal_mode = str(mode[0][0]).lower()


# --------------------------------------------------------------------------- server checks


def _need_facts(run: _Run, code: str) -> _Facts | None:
    if code not in _server_codes(run) or run.facts is None:
        return None
    return run.facts


def _check_read_only(run: _Run) -> None:
    """RDB305: a read-write service is connected to a server that accepts writes."""
    f = _need_facts(run, "RDB305")
    if f is None:
        return
    where = run.target.where
    if f.read_only is None:
        run.ok("RDB305", f"Could not tell whether {where} is read-only: {f.errors}.")
    elif f.read_only and run.policy.access == "read-write":
        extra = (
            " This user bypasses read_only (SUPER / READ_ONLY ADMIN), which hides the problem "
            "until a write reaches a real replica."
            if f.bypasses_read_only
            else ""
        )
        run.add(
            "RDB305",
            "error",
            f"{where} is read-only: {f.read_only_reason}. The policy expects read-write "
            f"(Policy.access), so every write will fail.{extra}",
            "Point the URL at the primary (or the read-write endpoint), or set "
            "Policy.access='read-only' if this service only reads.",
            "url",
            reason=f.read_only_reason,
        )
    elif f.read_only:
        run.ok("RDB305", f"{where} is read-only ({f.read_only_reason}), as expected.")
    else:
        run.ok("RDB305", f"{where} accepts writes (a primary).", access=run.policy.access)


def _check_write_privilege(run: _Run) -> None:
    """RDB306: the user may write, when the policy says the service writes."""
    f = _need_facts(run, "RDB306")
    if f is None:
        return
    user = f.user or run.target.user
    if run.policy.access == "read-only":
        run.ok("RDB306", "Write privileges are not needed (Policy.access='read-only').")
    elif f.can_write is None:
        why = f.write_reason or f.errors.get("privileges", "unknown")
        run.ok("RDB306", f"Could not tell whether '{user}' may write: {why}.")
    elif not f.can_write:
        run.add(
            "RDB306",
            "warning",
            f"User '{user}' seems unable to write in database '{f.database or run.target.database}'"
            f" ({f.write_reason}), but the policy expects read-write.",
            "GRANT INSERT, UPDATE, DELETE (or ownership) to the user, or set "
            "Policy.access='read-only'.",
            "url",
        )
    else:
        run.ok("RDB306", f"User '{user}' may write ({f.write_reason}).")


def _check_version(run: _Run) -> None:
    """RDB400 / RDB405: the server's version, and whether it is still maintained."""
    f = _need_facts(run, "RDB400")
    if f is None:
        return
    if not f.version:
        run.ok("RDB400", f"Could not read the server version: {f.errors}.")
        return
    run.ok("RDB400", f"{f.product} {f.version}.", version=f.version)
    minimum = _MIN_VERSIONS.get(f.product)
    if minimum is not None and f.version_tuple and f.version_tuple < minimum:
        run.add(
            "RDB405",
            "warning",
            f"{f.product} {f.version} is older than {'.'.join(map(str, minimum))}, the oldest "
            "release still maintained upstream: no more security or bug fixes.",
            f"Plan an upgrade of {f.product}.",
        )


def _check_capacity(run: _Run) -> None:
    """RDB402-RDB404: the pools fit in the server's connection limits."""
    f = _need_facts(run, "RDB402")
    if f is None:
        return
    where = run.target.where
    demand, how = run.demand()
    if f.max_connections is None:
        run.ok("RDB402", f"Could not read max_connections: {f.errors}.")
        return
    reserved = 0 if f.superuser else f.reserved
    limit = f.max_connections - reserved
    limit_how = f"max_connections {f.max_connections}" + (
        f" - {reserved} reserved for superusers" if reserved else ""
    )
    if demand is None:
        run.add(
            "RDB402",
            "warning",
            f"The pool size is unbounded ({how}): it can open connections until {where} "
            f"refuses them ({limit_how}).",
            "Use a QueuePool with a finite max_overflow (resilient_db.create_engine does).",
            "pool.max_overflow",
        )
        return
    if demand > limit:
        run.add(
            "RDB402",
            "error",
            f"The pools may open {demand} connections {how}, but {where} accepts at most "
            f"{limit} for this user ({limit_how}).",
            "Lower Policy.pool.size / max_overflow or Policy.instances, raise the server's "
            "max_connections, or put a connection pooler (PgBouncer, MaxScale) in front.",
            "pool.size",
            demand=demand,
            limit=limit,
        )
    else:
        in_use = run.others_in_use(f.current)
        now = f", {in_use} in use now by other sessions" if in_use is not None else ""
        run.ok(
            "RDB402",
            f"The pools may open {demand} connections {how}; {where} allows {limit}{now}.",
            demand=demand,
            limit=limit,
            in_use=in_use,
        )
        if in_use is not None:
            free = limit - in_use
            if demand > free:
                run.add(
                    "RDB403",
                    "warning",
                    f"Only {max(free, 0)} connection slots are free on {where} now "
                    f"({in_use} in use by others, {limit} allowed); the pools may need "
                    f"{demand}.",
                    "Find what holds the connections (pg_stat_activity / SHOW PROCESSLIST: "
                    "other services, leaks, idle sessions) before scaling out.",
                    "instances",
                    free=free,
                    current=f.current,
                )
    for label, lim in (("user", f.user_limit), ("database", f.database_limit)):
        if lim is not None and demand > lim:
            name = f.user if label == "user" else f.database
            run.add(
                "RDB404",
                "error",
                f"The pools may open {demand} connections, but the {label} '{name}' is limited "
                f"to {lim} connections on {where}.",
                "Raise the limit (ALTER ROLE/DATABASE ... CONNECTION LIMIT, or GRANT ... WITH "
                "MAX_USER_CONNECTIONS / max_user_connections) or lower the pool.",
                "pool.size",
                limit=lim,
            )


def _recycle_too_long(run: _Run, code: str, limit: float, setting: str, shown: str) -> str | None:
    """How pool_recycle reads (``off``, ``30s``) when it is not below the server's ``limit``.

    When it is below, reports ``code`` as passed and returns None.
    """
    recycle = run.recycle()
    if recycle is None or recycle >= limit:
        return "off" if recycle is None else _secs(recycle)
    run.ok(code, f"pool_recycle {_secs(recycle)} < {setting} {shown}.")
    return None


def _check_wait_timeout(run: _Run) -> None:
    """RDB504: pooled MariaDB connections are recycled before the server drops them."""
    f = _need_facts(run, "RDB504")
    if f is None:
        return
    wt = f.wait_timeout
    if wt is None:
        run.ok("RDB504", f"Could not read wait_timeout: {f.errors}.")
        return
    shown = _recycle_too_long(run, "RDB504", wt, "wait_timeout", f"{wt}s")
    if shown is not None:
        run.add(
            "RDB504",
            "error",
            f"pool_recycle ({shown}) is not below the server's wait_timeout ({wt}s; "
            f"interactive_timeout {f.interactive_timeout}s): the server closes connections idle "
            f"longer than {wt}s, so pooled connections die in the pool (error 2006 'MySQL "
            "server has gone away', or an extra reconnect on checkout).",
            f"Set Policy.pool.recycle below {wt} (e.g. {max(1, int(wt * 0.8))}), or raise "
            "wait_timeout on the server.",
            "pool.recycle",
            wait_timeout=wt,
            interactive_timeout=f.interactive_timeout,
        )


def _check_idle_session(run: _Run) -> None:
    """RDB505: pooled PostgreSQL connections outlive no idle_session_timeout."""
    f = _need_facts(run, "RDB505")
    if f is None:
        return
    ist = f.idle_session_timeout
    if ist is None:
        run.ok("RDB505", "idle_session_timeout is off.")
        return
    shown = _recycle_too_long(run, "RDB505", ist, "idle_session_timeout", _secs(ist))
    if shown is not None:
        run.add(
            "RDB505",
            "error",
            f"pool_recycle ({shown}) is not below the server's idle_session_timeout "
            f"({_secs(ist)}): the server terminates pooled connections that sit idle "
            "(SQLSTATE 57P05).",
            f"Set Policy.pool.recycle below {ist:g}, or raise idle_session_timeout.",
            "pool.recycle",
            idle_session_timeout=ist,
        )


def _check_idle_in_transaction(run: _Run) -> None:
    """RDB506: what idle_in_transaction_session_timeout does to slow units of work."""
    f = _need_facts(run, "RDB506")
    if f is None:
        return
    iit = f.idle_in_tx_timeout
    if iit is None:
        run.ok("RDB506", "idle_in_transaction_session_timeout is off.")
    else:
        run.ok(
            "RDB506",
            f"Transactions left idle longer than {_secs(iit)} between statements are "
            "terminated by the server (SQLSTATE 25P03).",
            idle_in_transaction_session_timeout=iit,
        )


def _check_journal_mode(run: _Run) -> None:
    """RDB605: SQLite's journal mode."""
    f = _need_facts(run, "RDB605")
    if f is None or f.journal_mode is None:
        return
    if f.journal_mode == "wal":
        run.ok("RDB605", "journal_mode=wal: readers work while a writer writes.")
    else:
        run.ok(
            "RDB605",
            f"journal_mode={f.journal_mode}: a writer blocks readers; PRAGMA journal_mode=WAL "
            "lets them work concurrently.",
        )


_SERVER_CHECKS: tuple[Callable[[_Run], None], ...] = (
    _check_read_only,
    _check_write_privilege,
    _check_version,
    _check_capacity,
    _check_wait_timeout,
    _check_idle_session,
    _check_idle_in_transaction,
    _check_journal_mode,
)
