"""Shared breaker state in Redis (resilient_db.fleet): one breaker for a fleet of replicas.

In-process tests drive two or three breakers with injected clocks and call
``store.sync()`` themselves (no background thread); Redis-side expiry, which
no clock of ours controls, is simulated by deleting the key that would have
expired. The multi-process tests run three real replicas against PostgreSQL
through one FaultProxy, and against a throwaway Redis that they kill.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import resilient_db
from resilient_db import BreakerPolicy, CircuitBreaker, Policy, RetryPolicy, telemetry
from resilient_db.breaker import Rejected
from resilient_db.fleet import RedisBreakerStore, share_breaker
from resilient_db.testing import FaultInjector, FaultProxy, ManualClock
from tests.conftest import SENTINEL
from tests.servers import ServerUnavailable, skip_or_fail

redis = pytest.importorskip("redis")

ROOT = Path(__file__).resolve().parents[1]


def unique(prefix: str = "fleet") -> str:
    """A breaker name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def fleet_name(redis_url: str) -> Iterator[str]:
    """A unique shared-breaker name; its keys are deleted afterwards."""
    name = unique()
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"*{{{name}}}*"))
    if keys:
        client.delete(*keys)
    client.close()


def replicas(
    redis_url: str, name: str, n: int, policy: BreakerPolicy
) -> tuple[list[CircuitBreaker], list[RedisBreakerStore], list[ManualClock]]:
    """``n`` breakers, each with its own clock and store (no background thread)."""
    breakers, stores, clocks = [], [], []
    for i in range(n):
        clock = ManualClock()
        b = CircuitBreaker(f"r{i}", policy, clock=clock)
        stores.append(RedisBreakerStore(redis_url, name).attach(b, start=False))
        breakers.append(b)
        clocks.append(clock)
    return breakers, stores, clocks


def sync_all(stores: list[RedisBreakerStore]) -> None:
    """One sync cycle on every replica, in order."""
    for s in stores:
        assert s.sync()


def admitted(b: CircuitBreaker) -> int:
    """A probe token, or 0 when the call was rejected."""
    try:
        return b.before_call()
    except Rejected:
        return 0


POLICY = BreakerPolicy(failure_threshold=2, reset_timeout=5.0)


def trip(b: CircuitBreaker) -> None:
    """Count enough failures to open ``b``."""
    for _ in range(POLICY.failure_threshold):
        b.record_failure("connection refused")


def expire_open(store: RedisBreakerStore, clocks: list[ManualClock]) -> None:
    """Let reset_timeout pass: for every local clock, and for Redis (the key's expiry)."""
    store.client.delete(store.key_open)
    for c in clocks:
        c.now += POLICY.reset_timeout


# -- one state for the fleet ---------------------------------------------------------


def test_one_replica_tripping_opens_the_others(redis_url: str, fleet_name: str) -> None:
    """A trips; after one sync B and C are open too, with the fleet's time left and reason."""
    (a, b, c), stores, _ = replicas(redis_url, fleet_name, 3, POLICY)
    trip(a)
    sync_all(stores)
    assert ["open", "open", "open"] == [x.state for x in (a, b, c)]
    retry_in = b.retry_in()
    assert retry_in is not None and POLICY.reset_timeout - 1.0 < retry_in <= POLICY.reset_timeout
    assert "open" == stores[2].shared_state
    assert f"connection refused [replica {stores[0].replica}]" == c.last_failure
    with pytest.raises(Rejected):
        c.before_call()


def test_half_open_admits_one_probe_across_the_fleet(redis_url: str, fleet_name: str) -> None:
    """Half-open, three replicas calling again and again get one probe between them."""
    breakers, stores, clocks = replicas(redis_url, fleet_name, 3, POLICY)
    trip(breakers[0])
    sync_all(stores)
    expire_open(stores[0], clocks)
    sync_all(stores)
    tokens = [admitted(b) for _ in range(5) for b in breakers]
    assert 1 == sum(1 for t in tokens if t)
    assert 1 == sum(stores[0].client.exists(k) for k in stores[0].key_leases)


def test_half_open_max_calls_is_fleet_wide(redis_url: str, fleet_name: str) -> None:
    """half_open_max_calls=2: two probes for the fleet, not two per replica."""
    policy = BreakerPolicy(failure_threshold=2, reset_timeout=5.0, half_open_max_calls=2)
    breakers, stores, clocks = replicas(redis_url, fleet_name, 3, policy)
    trip(breakers[0])
    sync_all(stores)
    expire_open(stores[0], clocks)
    tokens = [admitted(b) for _ in range(3) for b in breakers]
    assert 2 == sum(1 for t in tokens if t)


def test_probe_success_closes_every_replica(redis_url: str, fleet_name: str) -> None:
    """The lease holder's successful probe closes the fleet and clears the keys."""
    (a, b, c), stores, clocks = replicas(redis_url, fleet_name, 3, POLICY)
    trip(a)
    sync_all(stores)
    expire_open(stores[0], clocks)
    token = admitted(b)
    assert token and 0 == admitted(a) and 0 == admitted(c)
    b.record_success(token)
    sync_all([stores[1], stores[0], stores[2]])  # b publishes, a and c follow
    assert ["closed", "closed", "closed"] == [x.state for x in (a, b, c)]
    assert [] == list(stores[0].client.scan_iter(match=f"*{{{fleet_name}}}*"))


def test_failed_probe_reopens_the_fleet(redis_url: str, fleet_name: str) -> None:
    """A failed probe opens every replica for another reset_timeout and frees the lease."""
    (a, b), stores, clocks = replicas(redis_url, fleet_name, 2, POLICY)
    trip(a)
    sync_all(stores)
    expire_open(stores[0], clocks)
    token = admitted(a)
    assert token
    with pytest.raises(Rejected) as rejected:
        b.before_call()
    assert "half-open" == rejected.value.state
    a.record_failure("connection refused", probe=token)
    sync_all(stores)
    assert ("open", "open") == (a.state, b.state)
    retry_in = b.retry_in()
    assert retry_in is not None and retry_in > POLICY.reset_timeout - 1.0
    assert [] == [k for k in stores[0].key_leases if stores[0].client.exists(k)]


def test_success_threshold_counts_fleet_wide(redis_url: str, fleet_name: str) -> None:
    """success_threshold=2: probes of two replicas add up; the fleet closes on the second."""
    policy = BreakerPolicy(failure_threshold=2, reset_timeout=5.0, success_threshold=2)
    (a, b), stores, clocks = replicas(redis_url, fleet_name, 2, policy)
    trip(a)
    sync_all(stores)
    expire_open(stores[0], clocks)
    first = admitted(a)
    a.record_success(first)
    sync_all(stores)
    assert ("half-open", "half-open") == (a.state, b.state)
    second = admitted(b)
    assert second
    b.record_success(second)
    sync_all([stores[1], stores[0]])  # b's success closes the fleet, a follows
    assert ("closed", "closed") == (a.state, b.state)


def test_holder_renews_its_lease_while_probing(redis_url: str, fleet_name: str) -> None:
    """The probe's lease is renewed by each sync and released when the probe ends."""
    (a,), stores, clocks = replicas(redis_url, fleet_name, 1, POLICY)
    store = stores[0]
    trip(a)
    store.sync()
    expire_open(store, clocks)
    token = admitted(a)
    key = store.key_leases[0]
    store.client.pexpire(key, 50)
    store.sync()
    ttl = store.client.pttl(key)
    assert store.lease_ttl * 1000 - 500 < ttl <= store.lease_ttl * 1000
    a.release(token)
    store.sync()
    assert 0 == store.client.exists(key)


def test_refused_lease_is_not_asked_again_at_once(redis_url: str, fleet_name: str) -> None:
    """A replica refused a lease rejects locally (no Redis call) until staleness passes."""
    (a, b), stores, clocks = replicas(redis_url, fleet_name, 2, POLICY)
    trip(a)
    sync_all(stores)
    expire_open(stores[0], clocks)
    assert admitted(a)
    assert 0 == admitted(b)
    calls = count_commands(stores[1].client)
    assert [0, 0, 0] == [admitted(b) for _ in range(3)]
    assert 0 == calls()
    clocks[1].now += stores[1].staleness
    assert 0 == admitted(b)
    assert 1 == calls()


def test_new_replica_starts_with_the_fleets_state(redis_url: str, fleet_name: str) -> None:
    """A replica attaching while the fleet is open starts open."""
    (a,), (store,), _ = replicas(redis_url, fleet_name, 1, POLICY)
    trip(a)
    store.sync()
    (late,), _, _ = replicas(redis_url, fleet_name, 1, POLICY)
    assert "open" == late.state


def test_forced_breaker_is_left_alone(redis_url: str, fleet_name: str) -> None:
    """An operator's force_open is shared as an open, but the fleet never closes it."""
    (a, b), stores, clocks = replicas(redis_url, fleet_name, 2, POLICY)
    a.force_open()
    sync_all(stores)
    assert "open" == b.state
    expire_open(stores[0], clocks)
    token = admitted(b)
    b.record_success(token)
    sync_all(stores)
    assert ("open", True, "closed") == (a.state, a.snapshot().forced, b.state)


def test_adopt_skips_a_breaker_that_changed_meanwhile() -> None:
    """adopt(..., unless_changed=n) does nothing once the breaker made its own transition."""
    b = CircuitBreaker("x", POLICY, clock=ManualClock())
    before = b.transitions
    trip(b)
    assert False is b.adopt("closed", unless_changed=before)
    assert "open" == b.state
    assert True is b.adopt("closed", unless_changed=b.transitions)
    assert "closed" == b.state


# -- the happy path never waits on Redis ---------------------------------------------


def count_commands(client: Any) -> Callable[[], int]:
    """Count the Redis commands ``client`` sends from now on."""
    box = [0]
    original = client.execute_command

    def counted(*args: Any, **kwargs: Any) -> Any:
        box[0] += 1
        return original(*args, **kwargs)

    client.execute_command = counted
    return lambda: box[0]


def test_happy_path_sends_no_redis_command(
    redis_url: str, fleet_name: str, sqlite_url: str
) -> None:
    """200 calls through a shared engine send no Redis command at all."""
    engine = resilient_db.create_engine(sqlite_url, validate="off")
    store = share_breaker(engine, redis_url, name=fleet_name, start=False)
    calls = count_commands(store.client)
    for _ in range(200):
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    assert 0 == calls()
    store.close()


# -- Redis unreachable: the local breaker alone --------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refused() -> BaseException:
    """A refused connect, as the driver raises it."""
    return ConnectionRefusedError(111, "Connection refused")


def test_unreachable_redis_falls_back_to_local_breaker(sqlite_url: str) -> None:
    """No Redis: the engine serves, trips and probes on its own; health says so, no secret."""
    clock = ManualClock()
    policy = Policy(breaker=POLICY, retry=RetryPolicy(attempts=1))
    engine = resilient_db.create_engine(sqlite_url, policy=policy, validate="off", clock=clock)
    url = f"redis://:{SENTINEL}@127.0.0.1:{free_port()}/0"
    t0 = time.monotonic()
    store = share_breaker(engine, url, name=unique(), start=False)
    assert time.monotonic() - t0 < 1.0
    assert False is store.available
    with engine.connect() as conn:
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()
    snap = resilient_db.health(engine)
    assert ("degraded", False) == (snap.status, snap.breaker_store["ok"])  # type: ignore[index]
    assert any("running on the local circuit breaker" in r for r in snap.reasons)
    text = json.dumps(snap.to_dict())
    assert "ConnectionError" in text
    assert SENTINEL not in text
    injector = FaultInjector(engine)
    injector.fail_connects(2, refused)
    engine.dispose()
    for _ in range(2):
        with pytest.raises(sa.exc.OperationalError):
            engine.connect()
    with pytest.raises(resilient_db.CircuitOpenError):
        engine.connect()
    clock.now += POLICY.reset_timeout
    with engine.connect() as conn:  # the probe runs without a lease
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()
    assert "closed" == resilient_db.breaker_of(engine).state
    store.close()


class ThrowawayRedis:
    """A redis-server on a free port, no persistence; stop() kills it, start() restarts it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--daemonize", "no"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=0.2, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 5.0
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def throwaway_redis() -> Iterator[ThrowawayRedis]:
    """Our own Redis, which a test may kill (never the shared one on 6379)."""
    if subprocess.run(["which", "redis-server"], capture_output=True).returncode:
        skip_or_fail(ServerUnavailable("redis-server is not installed"))
    server = ThrowawayRedis()
    server.start()
    yield server
    server.stop()


def test_outage_then_recovery_publishes_what_happened_meanwhile(
    throwaway_redis: ThrowawayRedis,
) -> None:
    """Redis dies, A trips alone; Redis returns: A publishes its open, B follows."""
    name = unique()
    clock_a = ManualClock()
    a = CircuitBreaker("a", POLICY, clock=clock_a)
    store_a = RedisBreakerStore(throwaway_redis.url, name).attach(a, start=False)
    assert store_a.sync()
    throwaway_redis.stop()
    assert False is store_a.sync()
    assert (False, "ConnectionError") == (store_a.available, (store_a.error or "").split(":")[0])
    trip(a)
    assert "open" == a.state
    throwaway_redis.start()
    assert store_a.sync()
    assert (True, None, "open") == (store_a.available, store_a.error, store_a.shared_state)
    b = CircuitBreaker("b", POLICY, clock=ManualClock())
    RedisBreakerStore(throwaway_redis.url, name).attach(b, start=False)
    assert "open" == b.state


def test_store_metric_reads_availability(sqlite_url: str, throwaway_redis: ThrowawayRedis) -> None:
    """resilient_db.breaker.store.available: 1 while Redis answers, 0 after it went away."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    fleet_name = unique()
    engine = resilient_db.create_engine(sqlite_url, name=fleet_name, validate="off")
    telemetry.instrument(engine, meter_provider=provider)
    store = share_breaker(engine, throwaway_redis.url, start=False)

    def value() -> list[tuple[str, int]]:
        data = reader.get_metrics_data()
        assert data is not None
        return [
            (p.attributes["db.client.connection.pool.name"], p.value)
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == "resilient_db.breaker.store.available"
            for p in m.data.data_points
        ]

    assert [(fleet_name, 1)] == value()
    throwaway_redis.stop()
    store.sync()
    assert [(fleet_name, 0)] == value()
    store.close()
    provider.shutdown()


def test_configuration_errors(redis_url: str) -> None:
    """A bad name or staleness is refused naming the field."""
    with pytest.raises(resilient_db.ConfigurationError, match=r"RedisBreakerStore\.name"):
        RedisBreakerStore(redis_url, "a{b}")
    with pytest.raises(resilient_db.ConfigurationError, match=r"RedisBreakerStore\.staleness"):
        RedisBreakerStore(redis_url, "ok", staleness=0)
    b = CircuitBreaker("x", POLICY)
    store = RedisBreakerStore(redis_url, unique()).attach(b, start=False)
    with pytest.raises(resilient_db.ConfigurationError, match="already shared"):
        RedisBreakerStore(redis_url, unique()).attach(b, start=False)
    store.close()
    assert None is b.shared


# -- three real replicas -----------------------------------------------------------

WORKER = r"""
import json, sys, time
import sqlalchemy as sa
import resilient_db
from resilient_db import BreakerPolicy, Policy, RetryPolicy, Timeouts
from resilient_db.engine import resilience_of
from resilient_db.testing import ManualClock

cfg = json.loads(sys.argv[1])
policy = Policy(
    breaker=BreakerPolicy(failure_threshold=2, reset_timeout=cfg["reset"]),
    retry=RetryPolicy(attempts=1),
    timeouts=Timeouts(connect=2),
)
engine = resilient_db.create_engine(
    cfg["db"], name="replica", policy=policy, validate="off", poolclass=sa.pool.NullPool
)
store = resilient_db.share_breaker(
    engine, cfg["redis"], name=cfg["name"], staleness=cfg["staleness"]
)


def call():
    t0 = time.monotonic()
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        out = "ok"
    except resilient_db.CircuitOpenError:
        out = "open"
    except Exception as e:
        out = "error"
    return out, round(time.monotonic() - t0, 4)


def state():
    return {
        "state": resilient_db.breaker_of(engine).state,
        "store": store.status(),
        "connects": resilience_of(engine).connect_attempts,
    }


print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    if op == "call":
        reply = [call() for _ in range(cmd.get("n", 1))]
    elif op == "loop":  # call every `pause` s for `seconds`, or until `until` came back
        reply, end = [], time.monotonic() + cmd["seconds"]
        while time.monotonic() < end:
            reply.append(call())
            if reply[-1][0] == cmd.get("until"):
                break
            time.sleep(cmd["pause"])
    elif op == "wait":  # until the breaker (or the store's `ok`) reads `want`
        end, reply = time.monotonic() + cmd["seconds"], state()
        key = cmd.get("key", "state")
        while time.monotonic() < end and (
            reply["state"] if key == "state" else reply["store"]["ok"]
        ) != cmd["want"]:
            time.sleep(0.01)
            reply = state()
    elif op == "health":
        reply = resilient_db.health(engine).to_dict()
    else:
        break
    print(json.dumps(reply), flush=True)
store.close()
"""


class Replica:
    """One replica process, driven by JSON commands on stdin."""

    def __init__(self, script: Path, cfg: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )

    def ready(self) -> None:
        assert self.proc.stdout is not None
        assert {"ready": True} == json.loads(self.proc.stdout.readline())

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "replica exited"
        return json.loads(line)

    def ask(self, **cmd: Any) -> Any:
        self.send(**cmd)
        return self.reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # the replica's command loop ends
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def start_replicas(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], list[Replica]]]:
    """Start three replica processes with one config; they are stopped afterwards."""
    script = tmp_path / "replica.py"
    script.write_text(WORKER)
    started: list[Replica] = []

    def start(cfg: dict[str, Any]) -> list[Replica]:
        group = [Replica(script, cfg) for _ in range(3)]
        started.extend(group)
        for r in group:
            r.ready()
        return group

    yield start
    for r in started:
        r.close()


def everyone(group: list[Replica], **cmd: Any) -> list[Any]:
    """Send ``cmd`` to every replica at once, then collect the replies."""
    for r in group:
        r.send(**cmd)
    return [r.reply() for r in group]


def outcomes(calls: list[list[Any]]) -> list[str]:
    """The outcome names of a list of (outcome, seconds) pairs."""
    return [c[0] for c in calls]


@pytest.mark.slow  # several seconds: skipped by the SQLAlchemy 2.0 pass
def test_three_replicas_share_one_breaker(
    pg_url: str,
    redis_url: str,
    fleet_name: str,
    start_replicas: Callable[[dict[str, Any]], list[Replica]],
) -> None:
    """Three processes: one trips, all reject; half-open probes are bounded; all close."""
    reset = 1.0
    u = sa.make_url(pg_url)
    with FaultProxy(u.host or "127.0.0.1", u.port or 5432) as proxy:
        db = u.set(host=proxy.host, port=proxy.port).render_as_string(hide_password=False)
        cfg = {"db": db, "redis": redis_url, "name": fleet_name, "reset": reset}
        group = start_replicas({**cfg, "staleness": 0.1})
        assert [["ok"]] * 3 == [outcomes(r) for r in everyone(group, op="call")]

        proxy.refuse()  # the database goes away
        assert ["error", "error", "open"] == outcomes(group[0].ask(op="call", n=3))
        before = [r.ask(op="wait", want="open", seconds=2.0) for r in group[1:]]
        assert [("open", 1), ("open", 1)] == [(b["state"], b["connects"]) for b in before]
        # the others reject without trying to connect
        assert [["open"], ["open"]] == [outcomes(r.ask(op="call")) for r in group[1:]]
        after = [r.ask(op="wait", want="open", seconds=0)["connects"] for r in group[1:]]
        assert [b["connects"] for b in before] == after

        # half-open: the database accepts connections but resets them (each is one probe)
        proxy.passthrough()
        proxy.reset_after(0)
        proxy.reset_counters()
        window = 3.0
        t0 = time.monotonic()
        calls = everyone(group, op="loop", seconds=window, pause=0.01)
        elapsed = time.monotonic() - t0
        probes = proxy.connections_total
        failed = sum(outcomes(c).count("error") for c in calls)
        rejected = sum(outcomes(c).count("open") for c in calls)
        print(f"half-open window {elapsed:.2f}s: {probes} probes, {rejected} rejected")
        assert probes == failed
        assert 1 <= probes <= int(elapsed / reset) + 1
        assert rejected > 100

        proxy.passthrough()  # the database is back
        finals = everyone(group, op="loop", seconds=4 * reset, pause=0.01, until="ok")
        assert ["ok"] * 3 == [outcomes(c)[-1] for c in finals]
        assert ["closed"] * 3 == [
            r.ask(op="wait", want="closed", seconds=1.0)["state"] for r in group
        ]


def test_replicas_keep_serving_when_redis_dies(
    throwaway_redis: ThrowawayRedis,
    sqlite_url: str,
    start_replicas: Callable[[dict[str, Any]], list[Replica]],
) -> None:
    """Redis killed: the three replicas serve on their local breakers, and health says so."""
    cfg = {"db": sqlite_url, "redis": throwaway_redis.url, "name": unique(), "reset": 1.0}
    group = start_replicas({**cfg, "staleness": 0.1})
    assert [True] * 3 == [
        r.ask(op="wait", key="ok", want=True, seconds=1)["store"]["ok"] for r in group
    ]
    throwaway_redis.stop()
    states = everyone(group, op="wait", key="ok", want=False, seconds=2.0)
    assert [False] * 3 == [s["store"]["ok"] for s in states]
    for r in group:
        calls = r.ask(op="call", n=20)
        assert ["ok"] * 20 == outcomes(calls)
        h = r.ask(op="health")
        assert ("degraded", False, "closed") == (
            h["status"],
            h["breaker_store"]["ok"],
            h["breaker"]["state"],
        )
        assert any("shared breaker state unavailable" in reason for reason in h["reasons"])
