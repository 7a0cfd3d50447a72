"""Server-side checks: read the server's settings, then compare them with the policy.

The probes (PostgreSQL, MariaDB/MySQL, SQLite; in :mod:`._probes`) fill a
:class:`_Facts` over the validation's own connection; the checks here
(RDB305/306, RDB4xx, RDB504-506, RDB605) turn those facts into findings.
"""

from __future__ import annotations

from collections.abc import Callable

from ._probes import _db_matches as _db_matches
from ._probes import _parse_grants as _parse_grants
from ._probes import _probe as _probe
from .context import _Facts, _Run, _secs

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
