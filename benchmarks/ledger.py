"""Ledger soak: money moves between accounts while faults rain down; nothing is lost or doubled.

``python -m benchmarks.ledger --seconds 10 --db pg|mariadb|both [--threads 4]``

Worker threads transfer random amounts between a few accounts for a fixed time,
each transfer a unit of work run by ``resilient_db.run_transaction`` with an
idempotency key and a row in a ``transfers`` table written in the same
transaction. Random account order makes real deadlocks. Meanwhile a fault
injector, through a :class:`~resilient_db.testing.FaultProxy` and a second,
direct connection, randomly

- kills one of the engine's backends (``pg_terminate_backend`` / ``KILL``),
- resets every proxied connection (``reset_all``),
- drops the reply to the next COMMIT (``drop_commit_reply``: an ambiguous commit),
- blackholes the proxy for a short spell.

At the end, read directly from the server: the total balance is unchanged;
every acknowledged transfer is present exactly once; no transfer reported as
failed is present; ambiguous ones (reported as such) are listed; every account
balance equals its opening balance plus its transfers; a transfer row exists
exactly when its idempotency key does.
"""

from __future__ import annotations

import argparse
import collections
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

import resilient_db
from resilient_db import (
    AmbiguousCommitError,
    BreakerPolicy,
    CircuitOpenError,
    Policy,
    RetryPolicy,
    Timeouts,
    classify,
    error_context,
    run_transaction,
)
from resilient_db.testing import FaultProxy

try:
    from benchmarks._util import MARIADB_URL, PG_URL, reachable
except ImportError:  # pragma: no cover - run as a file
    from _util import MARIADB_URL, PG_URL, reachable  # type: ignore[no-redef]

OPENING_BALANCE = 1_000_000

#: Short limits so a blackhole is noticed within about two seconds.
SOAK_POLICY = Policy(
    timeouts=Timeouts(connect=1, call=2, checkout=2),
    retry=RetryPolicy(attempts=8, deadline=10),
    breaker=BreakerPolicy(failure_threshold=10, reset_timeout=0.5),
)


@dataclass
class SoakResult:
    """What a soak run did and what the final check found."""

    db: str
    seconds: float
    attempted: int = 0
    committed: int = 0
    retried: int = 0  # transfers whose unit ran more than once
    reruns: int = 0  # replays scheduled in total (from the unit_retry log events)
    ambiguous: int = 0  # AmbiguousCommitError reported to the caller
    ambiguous_landed: int = 0  # ... of which the transfer did commit
    failed: int = 0
    settled_by_key: int = 0  # retries that found the key and did not re-run
    failed_kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the ledger is consistent."""
        return not self.violations

    def summary(self) -> str:
        """A few lines for humans."""
        lines = [
            f"{self.db}: {self.seconds:.0f}s  attempted {self.attempted}  committed "
            f"{self.committed}  retried {self.retried} (replays {self.reruns}, settled by key "
            f"{self.settled_by_key})  ambiguous {self.ambiguous} ({self.ambiguous_landed} "
            f"landed)  failed {self.failed}",
            f"  faults injected: {dict(sorted(self.faults.items()))}",
            f"  failures by kind: {dict(sorted(self.failed_kinds.items()))}",
            "  ledger: " + ("consistent" if self.ok else "VIOLATIONS"),
        ]
        lines += [f"    - {v}" for v in self.violations[:20]]
        return "\n".join(lines)


class _EventCounter(logging.Handler):
    """Counts resilient_db log events by name (unit_retry, already_committed, ...)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        name = getattr(record, "resilient_db", {}).get("event")
        if name:
            with self._lock2:
                self.counts[name] += 1


@dataclass
class _Transfer:
    tid: str
    src: int
    dst: int
    amount: int
    outcome: str = "pending"
    runs: int = 0
    kind: str = ""


def _proxied_url(url: str, proxy: FaultProxy) -> str:
    return sa.make_url(url).set(host=proxy.host, port=proxy.port).render_as_string(False)


def _engine(url: str, proxy: FaultProxy, backends: list[int], lock: threading.Lock) -> Engine:
    backend = sa.make_url(url).get_backend_name()
    if backend == "postgresql":
        connect_args: dict[str, Any] = {"options": "-c lock_timeout=1500"}
    else:
        connect_args = {"init_command": "SET SESSION innodb_lock_wait_timeout=1"}
    engine = resilient_db.create_engine(
        _proxied_url(url, proxy),
        name="ledger-soak",
        policy=SOAK_POLICY,
        validate="off",
        connect_args=connect_args,
    )

    @event.listens_for(engine, "connect")
    def remember(dbapi_connection: Any, record: Any) -> None:
        # from the handshake, no round trip (a query here would hang in a blackhole)
        info = getattr(dbapi_connection, "info", None)
        pid = getattr(info, "backend_pid", None)
        ident = int(pid if pid is not None else dbapi_connection.thread_id())
        with lock:
            backends.append(ident)
            del backends[:-20]

    return engine


def _kill(admin: Engine, ident: int) -> bool:
    """Terminate one backend from a direct connection; False when it was already gone."""
    with admin.connect() as c:
        if admin.dialect.name == "postgresql":
            return bool(c.scalar(sa.text("SELECT pg_terminate_backend(:p)"), {"p": ident}))
        try:
            c.exec_driver_sql(f"KILL {int(ident)}")
        except sa.exc.DBAPIError:  # 1094 unknown thread id
            return False
        return True


def _live(admin: Engine, backends: list[int], lock: threading.Lock) -> list[int]:
    """Those of the engine's backends that still exist on the server."""
    with lock:
        ids = list(backends)
    if not ids:
        return []
    table = (
        "pg_stat_activity"
        if admin.dialect.name == "postgresql"
        else "information_schema.processlist"
    )
    column = "pid" if admin.dialect.name == "postgresql" else "id"
    query = sa.text(f"SELECT {column} FROM {table} WHERE {column} IN :ids").bindparams(
        sa.bindparam("ids", expanding=True)
    )
    with admin.connect() as c:
        return [int(i) for i in c.scalars(query, {"ids": ids}).all()]


#: The first faults, in order, so that even a short run meets each of them once.
_FIRST = (0.1, 0.4, 0.6, 0.9)


def _inject(
    stop: threading.Event,
    proxy: FaultProxy,
    admin: Engine,
    backends: list[int],
    lock: threading.Lock,
    faults: collections.Counter[str],
    rng: random.Random,
) -> None:
    n = 0
    while not stop.wait(rng.uniform(0.15, 0.5)):
        roll = _FIRST[n] if n < len(_FIRST) else rng.random()
        n += 1
        try:
            if roll < 0.3:
                live = _live(admin, backends, lock)
                if live:
                    faults["kill" if _kill(admin, rng.choice(live)) else "kill_missed"] += 1
            elif roll < 0.5:
                proxy.reset_all()
                faults["reset_all"] += 1
            elif roll < 0.85:
                proxy.drop_commit_reply()
                deadline = time.monotonic() + 1.0
                while proxy.commit_fault_armed and time.monotonic() < deadline:
                    time.sleep(0.005)
                faults["drop_commit_reply" if not proxy.commit_fault_armed else "drop_unfired"] += 1
            else:
                proxy.blackhole()
                faults["blackhole"] += 1
                stop.wait(rng.uniform(0.3, 1.0))
                proxy.passthrough()
        except Exception:
            faults["injector_error"] += 1
    proxy.passthrough()


def _work(
    engine: Engine,
    run_id: str,
    worker: int,
    accounts: str,
    transfers: str,
    n_accounts: int,
    stop: threading.Event,
    out: list[_Transfer],
) -> None:
    rng = random.Random(f"{run_id}-{worker}")
    debit = sa.text(f"UPDATE {accounts} SET balance = balance - :a WHERE id = :i")
    credit = sa.text(f"UPDATE {accounts} SET balance = balance + :a WHERE id = :i")
    record = sa.text(
        f"INSERT INTO {transfers} (transfer_id, src, dst, amount) VALUES (:t, :s, :d, :a)"
    )
    n = 0
    while not stop.is_set():
        n += 1
        src, dst = rng.sample(range(n_accounts), 2)
        tr = _Transfer(f"{run_id}-{worker}-{n}", src, dst, rng.randint(1, 100))
        out.append(tr)

        def unit(conn: Any, tr: _Transfer = tr) -> str:
            tr.runs += 1
            conn.execute(debit, {"a": tr.amount, "i": tr.src})
            conn.execute(credit, {"a": tr.amount, "i": tr.dst})
            conn.execute(record, {"t": tr.tid, "s": tr.src, "d": tr.dst, "a": tr.amount})
            return tr.tid

        try:
            run_transaction(engine, unit, idempotency_key=tr.tid)
            tr.outcome = "committed"
        except AmbiguousCommitError:
            tr.outcome = "ambiguous"
        except Exception as e:
            ctx = error_context(e)
            tr.outcome = "failed"
            tr.kind = ctx.kind if ctx is not None else classify(e).kind.value
            if isinstance(e, CircuitOpenError):  # a client backs off while the circuit is open
                stop.wait(ctx.retry_in if ctx is not None and ctx.retry_in else 0.1)


def _check(
    admin: Engine,
    result: SoakResult,
    done: list[_Transfer],
    tables: tuple[str, str],
    n: int,
    prefix: str,
) -> None:
    accounts, transfers = tables
    key = resilient_db.idempotency_table.c.idempotency_key
    with admin.connect() as c:
        balances = dict(c.execute(sa.text(f"SELECT id, balance FROM {accounts}")).all())
        rows = c.execute(sa.text(f"SELECT transfer_id, src, dst, amount FROM {transfers}")).all()
        keys = set(c.scalars(sa.select(key).where(key.like(prefix + "%"))).all())
    present = collections.Counter(r[0] for r in rows)
    v = result.violations
    total = sum(balances.values())
    if total != n * OPENING_BALANCE:
        v.append(f"total balance {total} != {n * OPENING_BALANCE}")
    expected = {i: OPENING_BALANCE for i in range(n)}
    for _, src, dst, amount in rows:
        expected[src] -= amount
        expected[dst] += amount
    if expected != balances:
        v.append(f"balances {balances} differ from opening + transfers {expected}")
    for tid, k in present.items():
        if k > 1:
            v.append(f"transfer {tid} present {k} times")
    if set(present) != keys:
        v.append(f"transfers and idempotency keys differ: {sorted(set(present) ^ keys)[:5]}")
    by_id = {t.tid: t for t in done}
    for tid in present:
        if tid not in by_id:
            v.append(f"transfer {tid} present but never attempted")
    for t in done:
        there = present.get(t.tid, 0)
        if t.outcome == "committed" and there != 1:
            v.append(f"acknowledged transfer {t.tid} present {there} times")
        elif t.outcome == "failed" and there:
            v.append(f"transfer {t.tid} reported failed ({t.kind}) but present")
        elif t.outcome == "pending":
            v.append(f"transfer {t.tid} never finished (stuck worker)")
    result.ambiguous_landed = sum(
        1 for t in done if t.outcome == "ambiguous" and present.get(t.tid)
    )


def run_soak(
    url: str,
    seconds: float,
    *,
    threads: int = 4,
    n_accounts: int = 8,
    seed: int | None = None,
) -> SoakResult:
    """Run the soak against the server at ``url`` for ``seconds``; return counts and findings."""
    u = sa.make_url(url)
    db = "pg" if u.get_backend_name() == "postgresql" else "mariadb"
    run_id = f"soak{uuid.uuid4().hex[:8]}"
    accounts, transfers = f"rdb_{run_id}_accounts", f"rdb_{run_id}_transfers"
    result = SoakResult(db=db, seconds=seconds)
    rng = random.Random(seed)
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", pool_size=2)
    resilient_db.ensure_idempotency_table(admin)
    with admin.connect() as c:
        c.execute(
            sa.text(f"CREATE TABLE {accounts} (id INTEGER PRIMARY KEY, balance BIGINT NOT NULL)")
        )
        c.execute(
            sa.text(
                f"CREATE TABLE {transfers} (seq INTEGER PRIMARY KEY "
                + ("GENERATED ALWAYS AS IDENTITY" if db == "pg" else "AUTO_INCREMENT")
                + ", transfer_id VARCHAR(64) NOT NULL, src INTEGER NOT NULL,"
                " dst INTEGER NOT NULL, amount INTEGER NOT NULL)"
            )
        )
        c.execute(
            sa.text(f"INSERT INTO {accounts} (id, balance) VALUES (:i, :b)"),
            [{"i": i, "b": OPENING_BALANCE} for i in range(n_accounts)],
        )
    counter = _EventCounter()
    rdb_logger = logging.getLogger("resilient_db")
    old_level = rdb_logger.level
    rdb_logger.addHandler(counter)
    rdb_logger.setLevel(logging.INFO)
    done: list[_Transfer] = []
    try:
        with FaultProxy(u.host or "127.0.0.1", u.port or (5432 if db == "pg" else 3306)) as proxy:
            backends: list[int] = []
            lock = threading.Lock()
            engine = _engine(url, proxy, backends, lock)
            stop_work, stop_faults = threading.Event(), threading.Event()
            outs: list[list[_Transfer]] = [[] for _ in range(threads)]
            workers = [
                threading.Thread(
                    target=_work,
                    args=(engine, run_id, i, accounts, transfers, n_accounts, stop_work, outs[i]),
                    name=f"ledger-{i}",
                    daemon=True,
                )
                for i in range(threads)
            ]
            injector = threading.Thread(
                target=_inject,
                args=(stop_faults, proxy, admin, backends, lock, result.faults, rng),
                name="ledger-faults",
                daemon=True,
            )
            for w in workers:
                w.start()
            injector.start()
            time.sleep(seconds)
            stop_faults.set()
            injector.join(15)
            stop_work.set()
            for w in workers:
                w.join(60)
            stuck = [w.name for w in workers if w.is_alive()]
            if stuck:
                result.violations.append(f"workers still running after 60 s: {stuck}")
            engine.dispose()
            done = [t for out in outs for t in out]
        _check(admin, result, done, (accounts, transfers), n_accounts, run_id)
    finally:
        rdb_logger.removeHandler(counter)
        rdb_logger.setLevel(old_level)
        key = resilient_db.idempotency_table.c.idempotency_key
        with admin.connect() as c:
            c.execute(sa.text(f"DROP TABLE IF EXISTS {accounts}"))
            c.execute(sa.text(f"DROP TABLE IF EXISTS {transfers}"))
            c.execute(resilient_db.idempotency_table.delete().where(key.like(run_id + "%")))
        admin.dispose()
    result.attempted = len(done)
    result.committed = sum(1 for t in done if t.outcome == "committed")
    result.ambiguous = sum(1 for t in done if t.outcome == "ambiguous")
    result.failed = sum(1 for t in done if t.outcome == "failed")
    result.retried = sum(1 for t in done if t.runs > 1)
    result.failed_kinds.update(t.kind for t in done if t.outcome == "failed")
    result.reruns = counter.counts["unit_retry"]
    result.settled_by_key = counter.counts["already_committed"]
    result.faults["breaker_opened"] = counter.counts["breaker_opened"]
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; non-zero when a ledger check failed."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.ledger", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--seconds", type=float, default=10.0, help="soak duration per database")
    ap.add_argument("--db", choices=["pg", "mariadb", "both"], default="both")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--accounts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="3 s per database, for CI")
    args = ap.parse_args(argv)
    # rollbacks on connections the injector just reset are logged at ERROR by the pool
    logging.getLogger("sqlalchemy.pool").addHandler(logging.NullHandler())
    seconds = 3.0 if args.smoke else args.seconds
    targets = {"pg": PG_URL, "mariadb": MARIADB_URL}
    names = ["pg", "mariadb"] if args.db == "both" else [args.db]
    rc = 0
    for name in names:
        u = sa.make_url(targets[name])
        if not reachable(u.host or "127.0.0.1", u.port or (5432 if name == "pg" else 3306)):
            print(f"{name}: server not reachable, skipped")
            continue
        res = run_soak(
            targets[name], seconds, threads=args.threads, n_accounts=args.accounts, seed=args.seed
        )
        print(res.summary(), flush=True)
        if not res.ok:
            rc = 1
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
