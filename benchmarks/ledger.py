"""Ledger soak: money moves between accounts while faults rain down; nothing is lost or doubled.

``python -m benchmarks.ledger --seconds 10 --db pg|mariadb|both [--threads 6] [--repeat N]``

Worker threads transfer random amounts between a few accounts for a fixed time,
each transfer a unit of work run by ``resilient_db.run_transaction`` with an
idempotency key and a row in a ``transfers`` table written in the same
transaction, on an engine with the **default policy**. Random account order
makes real deadlocks. Meanwhile, twice a second, a fault injector, through a
:class:`~resilient_db.testing.FaultProxy` and a second, direct connection,
applies one blip of issue 13's mix:

- kills every session of the engine (``pg_terminate_backend`` / ``KILL``),
- resets every proxied connection (``reset_all``),
- drops the reply to the next COMMIT (``drop_commit_reply``: an ambiguous commit),
- stalls the network for 0.4 s: ``latency(0.4)`` for 0.4 s, then ``latency(0)``
  (a chunk sent meanwhile waits up to 0.4 s each way; nothing is lost: a
  ``blackhole()`` would leave the connections that lost data silent for good).

The benchmark runs the same soak on two engines at once, each through its own
proxy and on its own tables, with the same faults applied to both at the same
moments: one with the default policy, one with ``BreakerPolicy(enabled=False)``,
and reports the goodput (committed transfers) of each and their ratio. Each blip
meets the two engines in a random order, and repeated runs alternate which engine
starts first: with one policy on both engines, the engine always met first by a
blip committed 0.67-0.79x the other's in three of three runs.

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
import statistics
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

#: The soak's engine: the default policy (the startup check off).
SOAK_POLICY = Policy(validate="off")
#: The reference: the same, with the breaker disabled.
NO_BREAKER = Policy(breaker=BreakerPolicy(enabled=False), validate="off")
#: Seconds between two faults ("twice a second").
FAULT_EVERY = 0.5
#: How long a network stall lasts.
STALL = 0.4


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
    """Counts resilient_db log events by engine and name (unit_retry, already_committed, ...)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        data = getattr(record, "resilient_db", {})
        name = data.get("event")
        if name:
            with self._lock2:
                self.counts[(str(data.get("engine")), name)] += 1


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


def _engine(
    url: str,
    proxy: FaultProxy,
    backends: list[int],
    lock: threading.Lock,
    *,
    name: str = "ledger-soak",
    policy: Policy = SOAK_POLICY,
) -> Engine:
    backend = sa.make_url(url).get_backend_name()
    if backend == "postgresql":
        connect_args: dict[str, Any] = {"options": "-c lock_timeout=1500"}
    else:
        connect_args = {"init_command": "SET SESSION innodb_lock_wait_timeout=1"}
    engine = resilient_db.create_engine(
        _proxied_url(url, proxy),
        name=name,
        policy=policy,
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


@dataclass
class _Lane:
    """One engine of the soak: its proxy, sessions, tables and results."""

    name: str
    policy: Policy
    proxy: FaultProxy
    engine: Engine
    run_id: str
    tables: tuple[str, str]
    result: SoakResult
    backends: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    outs: list[list[_Transfer]] = field(default_factory=list)


#: The first faults, in order, so that even a short run meets each of them once.
_FIRST = (0.1, 0.3, 0.6, 0.9)


def _blip(stop: threading.Event, lanes: list[_Lane], admin: Engine, roll: float) -> None:
    """Apply one fault of the mix to every lane at once."""
    if roll < 0.25:  # an operator (or a failover) kills the engine's sessions
        for lane in lanes:
            live = _live(admin, lane.backends, lane.lock)
            killed = sum(_kill(admin, ident) for ident in live)
            lane.result.faults["sessions_killed"] += killed
            lane.result.faults["kill_burst"] += 1
    elif roll < 0.5:
        for lane in lanes:
            lane.proxy.reset_all()
            lane.result.faults["reset_all"] += 1
    elif roll < 0.75:
        for lane in lanes:
            lane.proxy.drop_commit_reply()
        deadline = time.monotonic() + 1.0
        while any(x.proxy.commit_fault_armed for x in lanes) and time.monotonic() < deadline:
            time.sleep(0.005)
        for lane in lanes:
            fired = not lane.proxy.commit_fault_armed
            lane.result.faults["drop_commit_reply" if fired else "drop_unfired"] += 1
            lane.proxy.passthrough()  # disarm an unfired one
    else:  # a stall: nothing moves for a moment, nothing is lost
        for lane in lanes:
            lane.proxy.latency(STALL)
        stop.wait(STALL)
        for lane in lanes:
            lane.proxy.latency(0)
            lane.result.faults["stall"] += 1


def _inject(stop: threading.Event, lanes: list[_Lane], admin: Engine, rng: random.Random) -> None:
    n = 0
    t0 = time.monotonic()
    while not stop.wait(max(0.0, t0 + (n + 1) * FAULT_EVERY - time.monotonic())):
        roll = _FIRST[n] if n < len(_FIRST) else rng.random()
        n += 1
        try:
            # the lanes in a new order each time: one always met first by a blip did
            # measurably worse (an A/A run, one policy on both lanes: 0.67-0.79x)
            _blip(stop, rng.sample(lanes, len(lanes)), admin, roll)
        except Exception:
            for lane in lanes:
                lane.result.faults["injector_error"] += 1
    for lane in lanes:
        lane.proxy.passthrough()


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


def _create_tables(admin: Engine, db: str, run_id: str, n_accounts: int) -> tuple[str, str]:
    accounts, transfers = f"rdb_{run_id}_accounts", f"rdb_{run_id}_transfers"
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
    return accounts, transfers


def _drop_tables(admin: Engine, lane: _Lane) -> None:
    key = resilient_db.idempotency_table.c.idempotency_key
    with admin.connect() as c:
        for table in lane.tables:
            c.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        c.execute(resilient_db.idempotency_table.delete().where(key.like(lane.run_id + "%")))


def _run_lanes(
    lanes: list[_Lane], admin: Engine, seconds: float, threads: int, n: int, rng: random.Random
) -> None:
    """Run every lane's workers for ``seconds`` under one fault injector."""
    stop_work, stop_faults = threading.Event(), threading.Event()
    workers = []
    for lane in lanes:
        lane.outs = [[] for _ in range(threads)]
        for i in range(threads):
            args = (lane.engine, lane.run_id, i, *lane.tables, n, stop_work, lane.outs[i])
            workers.append(
                threading.Thread(target=_work, args=args, name=f"{lane.name}-{i}", daemon=True)
            )
    injector = threading.Thread(
        target=_inject, args=(stop_faults, lanes, admin, rng), name="ledger-faults", daemon=True
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
    for lane in lanes:
        mine = [name for name in stuck if name.startswith(lane.name + "-")]
        if mine:
            lane.result.violations.append(f"workers still running after 60 s: {mine}")
        lane.engine.dispose()


def _finish(
    lane: _Lane, done: list[_Transfer], counts: collections.Counter[tuple[str, str]]
) -> None:
    res = lane.result
    res.attempted = len(done)
    res.committed = sum(1 for t in done if t.outcome == "committed")
    res.ambiguous = sum(1 for t in done if t.outcome == "ambiguous")
    res.failed = sum(1 for t in done if t.outcome == "failed")
    res.retried = sum(1 for t in done if t.runs > 1)
    res.failed_kinds.update(t.kind for t in done if t.outcome == "failed")
    res.reruns = counts[(lane.name, "unit_retry")]
    res.settled_by_key = counts[(lane.name, "already_committed")]
    res.faults["breaker_opened"] = counts[(lane.name, "breaker_opened")]


def soak(
    url: str,
    seconds: float,
    policies: dict[str, Policy],
    *,
    threads: int = 6,
    n_accounts: int = 8,
    seed: int | None = None,
) -> dict[str, SoakResult]:
    """The soak on one engine per policy at once (each through its own proxy, on its own
    tables), the same faults applied to all at the same moments; results by name."""
    u = sa.make_url(url)
    db = "pg" if u.get_backend_name() == "postgresql" else "mariadb"
    rng = random.Random(seed)
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", pool_size=2)
    resilient_db.ensure_idempotency_table(admin)
    counter = _EventCounter()
    rdb_logger = logging.getLogger("resilient_db")
    old_level = rdb_logger.level
    rdb_logger.addHandler(counter)
    rdb_logger.setLevel(logging.INFO)
    lanes: list[_Lane] = []
    port = u.port or (5432 if db == "pg" else 3306)
    try:
        for name, policy in policies.items():
            run_id = f"soak{uuid.uuid4().hex[:8]}"
            tables = _create_tables(admin, db, run_id, n_accounts)
            proxy = FaultProxy(u.host or "127.0.0.1", port).start()
            backends: list[int] = []
            lock = threading.Lock()
            engine = _engine(url, proxy, backends, lock, name=name, policy=policy)
            result = SoakResult(db, seconds)
            lanes.append(_Lane(name, policy, proxy, engine, run_id, tables, result, backends, lock))
        _run_lanes(lanes, admin, seconds, threads, n_accounts, rng)
        for lane in lanes:
            lane.proxy.close()
            done = [t for out in lane.outs for t in out]
            _check(admin, lane.result, done, lane.tables, n_accounts, lane.run_id)
            _finish(lane, done, counter.counts)
    finally:
        rdb_logger.removeHandler(counter)
        rdb_logger.setLevel(old_level)
        for lane in lanes:
            lane.proxy.close()
            _drop_tables(admin, lane)
        admin.dispose()
    return {lane.name: lane.result for lane in lanes}


def run_soak(
    url: str,
    seconds: float,
    *,
    threads: int = 6,
    n_accounts: int = 8,
    seed: int | None = None,
    policy: Policy = SOAK_POLICY,
) -> SoakResult:
    """Run the soak on one engine (default policy) at ``url`` for ``seconds``."""
    res = soak(url, seconds, {"ledger-soak": policy}, threads=threads, n_accounts=n_accounts,
               seed=seed)  # fmt: skip
    return res["ledger-soak"]


#: The two engines of the goodput comparison.
PAIR = {"default": SOAK_POLICY, "breaker off": NO_BREAKER}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; non-zero when a ledger check failed."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.ledger", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--seconds", type=float, default=10.0, help="soak duration per database")
    ap.add_argument("--db", choices=["pg", "mariadb", "both"], default="both")
    ap.add_argument("--threads", type=int, default=6, help="workers per engine")
    ap.add_argument("--accounts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1, help="runs per database")
    ap.add_argument("--smoke", action="store_true", help="3 s per database, for CI")
    args = ap.parse_args(argv)
    # rollbacks on connections the injector just reset are logged at ERROR by the pool
    logging.getLogger("sqlalchemy.pool").addHandler(logging.NullHandler())
    seconds = 3.0 if args.smoke else args.seconds
    targets = {"pg": PG_URL, "mariadb": MARIADB_URL}
    names = ["pg", "mariadb"] if args.db == "both" else [args.db]
    rc = 0
    ratios: dict[str, list[float]] = {}
    for rnd in range(args.repeat):
        for name in names:
            u = sa.make_url(targets[name])
            if not reachable(u.host or "127.0.0.1", u.port or (5432 if name == "pg" else 3306)):
                print(f"{name}: server not reachable, skipped")
                continue
            seed = None if args.seed is None else args.seed + rnd
            pair = PAIR if rnd % 2 == 0 else dict(reversed(PAIR.items()))  # who starts first
            res = soak(targets[name], seconds, pair, threads=args.threads,
                       n_accounts=args.accounts, seed=seed)  # fmt: skip
            for label, r in res.items():
                print(f"[{label}] " + r.summary(), flush=True)
                rc |= not r.ok
            on, off = res["default"].committed, res["breaker off"].committed
            ratio = on / off if off else float("nan")
            ratios.setdefault(name, []).append(ratio)
            verdict = "ok" if ratio >= 0.9 else "MISS"
            print(f"  goodput {name}: {on} committed (default) vs {off} (breaker disabled): "
                  f"{ratio:.2f}x  [{verdict} >= 0.9x]", flush=True)  # fmt: skip
    for name, rs in ratios.items():
        if len(rs) > 1:
            print(f"goodput ratio {name}: median {statistics.median(rs):.2f} over {len(rs)} runs "
                  f"({', '.join(f'{x:.2f}' for x in rs)})")  # fmt: skip
    return int(rc)


if __name__ == "__main__":
    raise SystemExit(main())
