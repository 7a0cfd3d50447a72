"""Server probes: read a server's settings into a :class:`_Facts`.

PostgreSQL, MariaDB/MySQL (grants parsed from ``SHOW GRANTS``) and SQLite, over
the validation's own connection. The checks that judge the facts are in
:mod:`.server`.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection

from .context import _as_float, _ConnectFailed, _Facts, _first_line


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
