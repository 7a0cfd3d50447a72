"""The rule tables of :mod:`resilient_db.classify`: pure data, no logic.

Kinds and retry levels are spelled as the values of ``classify.Kind`` and
``classify.RetryLevel`` (``"refused"``, ``"connect"``), so this module imports
nothing. Each kind has one diagnosis, in three parts: what happened, what to do,
and what the engine does about it (only the runtime says the last). The runtime
diagnosis is the three joined; the startup checks (``validation/connect.py``)
report the first two as a finding's message and fix. Placeholders: ``{where}``,
``{host}``, ``{user}``, ``{database}`` (from the target) and ``{within}`` (the
connect timeout, or the seconds a check waited).
"""

from __future__ import annotations

from typing import Final

#: kind -> (retry level, counts for the breaker, what happened, what to do, what the engine does)
RULES: Final[dict[str, tuple[str, bool, str, str, str]]] = {
    "refused": (
        "connect",
        True,
        "Nothing is accepting connections at {where}: the server is down or restarting, "
        "the port is wrong, or it listens on another address.",
        "Check the host and port in DATABASE_URL, and that the server runs and listens on "
        "that address (PostgreSQL listen_addresses, MariaDB bind-address).",
        "",
    ),
    "dns": (
        "never",
        False,
        "Host name '{host}' does not resolve.",
        "Check the host in DATABASE_URL (a typo, a missing DNS record, or a name that only "
        "resolves inside another network or VPN) and this machine's resolver.",
        "Configuration error, not an outage.",
    ),
    "connect_timeout": (
        "connect",
        True,
        "{where} accepted no connection or sent no database greeting within {within}: "
        "a firewall dropping packets, a proxy swallowing traffic, another service on "
        "that port, or a hung server.",
        "Check the host and port, the firewall rules, and that the port belongs to the "
        "database and the server responds.",
        "",
    ),
    "tls": (
        "never",
        False,
        "TLS mismatch with {where}: the client requires TLS and the server does not offer "
        "it, or the server requires TLS ('no encryption') and the client does not use it.",
        "Make both sides agree: enable TLS on the server, or change sslmode (PostgreSQL) "
        "or the ssl_* parameters (MariaDB) in DATABASE_URL.",
        "",
    ),
    "authentication": (
        "never",
        False,
        "Authentication failed for user '{user}' at {where}: the password is wrong or the "
        "user does not exist.",
        "Check the user and password in DATABASE_URL (special characters must be "
        "%-encoded) and the server's authentication rules (pg_hba.conf, MariaDB GRANTs "
        "and host part of the account).",
        "Configuration error, not an outage; not retrying.",
    ),
    "unknown_user": (
        "never",
        False,
        "Authentication failed for '{user}' at {where}: the user does not exist, or the "
        "password is wrong.",
        "Fix the user name in DATABASE_URL, or create the user.",
        "",
    ),
    "unknown_database": (
        "never",
        False,
        "Database '{database}' does not exist on {where}, or '{user}' may not access it.",
        "Fix the database name in DATABASE_URL, or create it and grant the user access.",
        "",
    ),
    "too_many_connections": (
        "connect",
        True,
        "{where} refused a new connection because its connection limit is reached.",
        "Find who holds the connections (pg_stat_activity / SHOW PROCESSLIST), lower "
        "pool_size x instances, or raise max_connections.",
        "Retrying with backoff.",
    ),
    "disconnect": (
        "transaction",
        True,
        "The connection to {where} was lost: the server restarted or failed over, the "
        "session was killed (KILL / pg_terminate_backend) or timed out idle "
        "(idle_session_timeout, wait_timeout), or a proxy, load balancer or firewall reset "
        "it.",
        "",
        "The transaction was not committed; the pool was refreshed, so the next "
        "checkout gets a new connection.",
    ),
    "read_timeout": (
        "transaction",
        True,
        "{where} sent no reply within the per-call deadline, so the connection was discarded: "
        "the network went silent (blackhole), the server hangs, or the query is slower "
        "than the deadline.",
        "",
        "",
    ),
    "server_shutdown": (
        "connect",
        True,
        "The database at {where} is shutting down or restarting (or still starting up, or "
        "in recovery).",
        "Wait for the server to finish starting; read its log if this persists.",
        "Any in-flight transaction was lost; connecting will be retried until the server is back.",
    ),
    "admin_terminated": (
        "transaction",
        True,
        "The server ended the session on {where}: a restart or shutdown (a pooled connection "
        "that died in a fast restart fails like this on its first statement), or an "
        "administrator or another process (pg_terminate_backend / KILL).",
        "",
        "The open transaction was rolled back; the pool was refreshed, so the next checkout "
        "gets a new connection.",
    ),
    "idle_timeout": (
        "connect",
        True,
        "{where} closed a connection that sat idle longer than its timeout.",
        "Set pool_recycle below that timeout, or enable pool_pre_ping.",
        "",
    ),
    "read_only": (
        "never",
        False,
        "{where} is read-only (a standby/replica, or read_only is set). DATABASE_URL points "
        "at a replica, or a failover demoted this node.",
        "Writes must go to the primary: point DATABASE_URL at it, or set "
        "Policy.access='read-only' for an engine that only reads.",
        "",
    ),
    "serialization_failure": (
        "transaction",
        False,
        "Serialization conflict (40001) with a concurrent transaction.",
        "Nothing was committed; replay the whole transaction.",
        "",
    ),
    "deadlock": (
        "transaction",
        False,
        "Deadlock with a concurrent transaction. It was rolled back and can be replayed.",
        "Frequent deadlocks mean lock ordering is inconsistent.",
        "",
    ),
    "lock_timeout": (
        "transaction",
        False,
        # classify's lock-wait detail (_lock_wait.lock_template) edits this text: it
        # names the relation after "a lock", and replaces what follows the last "; "
        "Gave up waiting for a lock held by another transaction (often one left idle in a "
        "transaction): a lock wait, not a slow query.",
        "A replay after rollback may succeed; find the blocker in pg_stat_activity / "
        "information_schema.innodb_trx.",
        "",
    ),
    "statement_timeout": (
        "never",
        False,
        "A query exceeded the server's statement timeout and was cancelled.",
        "Optimise it or raise the timeout; a retry will probably time out again.",
        "",
    ),
    "query_canceled": (
        "transaction",
        False,
        "The statement was cancelled by another session (pg_cancel_backend / KILL QUERY).",
        "On PostgreSQL the transaction is aborted; replay the whole unit of work.",
        "",
    ),
    "disk_full": (
        "never",
        True,
        "The database server is out of disk space (or over a temp-space limit).",
        "Writes will keep failing until space is freed; an ops problem, not a code bug.",
        "",
    ),
    "pool_exhausted": (
        "connect",
        False,
        "All local pool connections stayed busy until the checkout timeout: likely leaked "
        "connections, an undersized pool or a slow database, not a network problem.",
        "",
        "",
    ),
    "ambiguous_commit": (
        "never",
        True,
        "The connection to {where} was lost while COMMIT was in flight, so the transaction "
        "may or may not have committed.",
        "",
        "It won't be retried automatically. Verify before re-running.",
    ),
    "circuit_open": (
        "never",
        False,
        "The circuit breaker for {where} is open: calls fail fast without reaching the database.",
        "",
        "",
    ),
    "configuration": (
        "never",
        False,
        "{where} rejected the connection settings (a parameter the user may not set, a "
        "missing file or directory, or a bad option).",
        "Fix or remove the option in DATABASE_URL or connect_args (e.g. a parameter only a "
        "superuser may set), or the database path.",
        "",
    ),
    "cancelled": (
        "never",
        False,
        "The call was cancelled by the caller; this is not a database failure.",
        "",
        "",
    ),
    "application": (
        "never",
        False,
        "The database rejected the statement (constraint, syntax, permission or data error).",
        "Fix the query or the data; retrying will not help.",
        "",
    ),
    "unknown": (
        "never",
        False,
        "Unrecognised database error; not retried.",
        "See the original error above.",
        "",
    ),
}

#: what a failed connect says when more is known than its kind
#: -> (what happened, what to do, what the engine does). classify tells them from the
#: driver's code, message and the phase; the startup checks also from their own probes.
CONNECT_VARIANTS: Final[dict[str, tuple[str, str, str]]] = {
    # dns, but the resolver failed for now (EAI_AGAIN): an outage, retried at connect
    "dns_temporary": (
        "The DNS lookup of '{host}' failed temporarily: the resolver is unreachable or overloaded.",
        "Check this machine's resolver and the network path to its DNS servers.",
        "An outage, not a configuration error: connecting is retried.",
    ),
    # connect_timeout, and the TCP connect itself got no answer (startup checks only:
    # PyMySQL's 2003 "timed out" says so, aiomysql's bounded connect raises it for both)
    "tcp_timeout": (
        "{where} did not answer the TCP connection: the host is down or unreachable, or a "
        "firewall drops the packets (blackholed).",
        "Check the host and port in DATABASE_URL, routing, and firewall or security-group "
        "rules between this machine and the database.",
        "",
    ),
    # connect_timeout after the TCP connect succeeded (MySQL 2013 at connect)
    "no_greeting": (
        "{where} accepted the TCP connection but sent no database greeting within "
        "{within}: a proxy or firewall swallowing traffic, another service on that port, "
        "or a hung server.",
        "Check that the port belongs to the database (not a proxy or another service) and "
        "that the server responds; raise Policy.timeouts.connect only if the network is "
        "really that slow.",
        "",
    ),
    # disconnect while connecting: there was no transaction to lose
    "handshake_closed": (
        "{where} closed the connection during the handshake.",
        "Read the server log: a proxy, the server's connection limits or a crash may drop it.",
        "",
    ),
}

#: kinds that mean the connection is gone (at COMMIT: an ambiguous commit)
CONNECTION_LOSS: Final = frozenset(
    {"disconnect", "read_timeout", "admin_terminated", "server_shutdown", "idle_timeout"}
)

#: the modules whose errors are a database driver's (MySQL's: read by errno, not SQLSTATE)
MYSQL_MODULES: Final = ("pymysql", "aiomysql", "MySQLdb", "mysql.connector", "asyncmy")
PG_SQLITE_MODULES: Final = ("psycopg", "psycopg2", "asyncpg", "sqlite3", "aiosqlite")

#: PostgreSQL SQLSTATE -> kind (exact codes first, then classes)
PG_CODES: Final[dict[str, str]] = {
    "28P01": "authentication",
    "28000": "authentication",
    "3D000": "unknown_database",
    "53300": "too_many_connections",
    "57P01": "admin_terminated",
    "57P02": "admin_terminated",
    "57P03": "server_shutdown",
    "57P05": "idle_timeout",
    "25P03": "idle_timeout",
    "25006": "read_only",
    "40001": "serialization_failure",
    "40P01": "deadlock",
    "55P03": "lock_timeout",
    "53100": "disk_full",
    "53400": "disk_full",
    "53200": "disk_full",
    "08001": "refused",
    "08004": "too_many_connections",
    "42501": "application",
}
PG_CLASSES: Final[dict[str, str]] = {
    "08": "disconnect",
    "22": "application",
    "23": "application",
    "42": "application",
    "0A": "application",
    "21": "application",
    "44": "application",
    "P0": "application",
}

#: MySQL / MariaDB errno -> kind
MY_CODES: Final[dict[int, str]] = {
    1045: "authentication",
    1698: "unknown_user",
    1044: "unknown_database",
    1049: "unknown_database",
    2026: "tls",
    3159: "tls",
    1040: "too_many_connections",
    1203: "too_many_connections",
    1226: "too_many_connections",
    2005: "dns",
    2006: "disconnect",
    2013: "disconnect",
    2055: "disconnect",
    1927: "admin_terminated",
    1053: "server_shutdown",
    1205: "lock_timeout",
    1213: "deadlock",
    1969: "statement_timeout",
    3024: "statement_timeout",
    1317: "query_canceled",
    1290: "read_only",
    1792: "read_only",
    1836: "read_only",
    1114: "disk_full",
    1021: "disk_full",
    1041: "disk_full",
}
#: server-side statement errors that are the application's fault
# fmt: off
MY_APPLICATION: Final = frozenset({
    1022, 1048, 1051, 1054, 1062, 1064, 1065, 1091, 1110, 1136, 1142, 1143, 1146, 1149,
    1166, 1169, 1216, 1217, 1264, 1292, 1364, 1366, 1406, 1451, 1452, 1690, 3819, 4025,
    1050, 1060, 1061, 1068, 1072, 1075, 1171, 1227, 1265,
})
# fmt: on
#: message fragments of MySQL's 2003 ("Can't connect") that mean DNS, not a refusal
MY_DNS_FRAGMENTS: Final = (
    "name or service not known",
    "errno -2]",
    "errno -3]",
    "getaddrinfo",
    "nodename nor servname",
)

#: message fragments (lower case) -> kind, for errors without a code (libpq at connect)
TEXT_RULES: Final[tuple[tuple[str, str], ...]] = (
    ("temporary failure in name resolution", "dns"),
    ("could not translate host name", "dns"),
    ("failed to resolve host", "dns"),
    ("name or service not known", "dns"),
    ("nodename nor servname", "dns"),
    ("no address associated with hostname", "dns"),
    ("errno -2]", "dns"),
    ("errno -3]", "dns"),
    ("errno -5]", "dns"),
    ("server does not support ssl", "tls"),
    ("ssl was required", "tls"),
    ("rejected ssl upgrade", "tls"),
    ("no encryption", "tls"),
    ("ssl is required", "tls"),
    ("certificate verify failed", "tls"),
    ("password authentication failed", "authentication"),
    ("authentication failed", "authentication"),
    ("no password supplied", "authentication"),
    ("pg_hba.conf rejects", "authentication"),
    ("no pg_hba.conf entry", "authentication"),
    ("access denied for user", "authentication"),
    ("does not exist", "unknown_database"),  # refined in classify for roles
    ("too many clients already", "too_many_connections"),
    ("remaining connection slots are reserved", "too_many_connections"),
    ("too many connections", "too_many_connections"),
    ("the database system is shutting down", "server_shutdown"),
    ("the database system is starting up", "server_shutdown"),
    ("not yet accepting connections", "server_shutdown"),
    ("the database system is in recovery mode", "server_shutdown"),
    ("terminating connection due to administrator command", "admin_terminated"),
    ("terminating connection due to idle-session timeout", "idle_timeout"),
    ("permission denied to set parameter", "configuration"),
    ("connection refused", "refused"),
    ("errno 111]", "refused"),
    ("timeout expired", "connect_timeout"),
    ("timed out", "read_timeout"),
    ("server closed the connection unexpectedly", "disconnect"),
    ("consuming input failed", "disconnect"),
    ("connection already closed", "disconnect"),
    ("the connection is closed", "disconnect"),
    ("connection was closed", "disconnect"),
    ("connection reset by peer", "disconnect"),
    ("broken pipe", "disconnect"),
    ("ssl syscall error", "disconnect"),
    ("lost connection", "disconnect"),
    ("gone away", "disconnect"),
    # sqlite3
    ("database is locked", "lock_timeout"),
    ("database table is locked", "lock_timeout"),
    ("database or disk is full", "disk_full"),
    ("attempt to write a readonly database", "read_only"),
    ("unable to open database file", "configuration"),
)
