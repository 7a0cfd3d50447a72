"""Metrics, spans and logs of resilient_db engines, against real databases.

Each test reports to its own MeterProvider (in-memory reader) and
TracerProvider (in-memory exporter) through ``telemetry.instrument``: the
global providers can be set only once per process.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    InMemoryMetricReader,
    Metric,
    Sum,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import resilient_db
from resilient_db import telemetry
from resilient_db.classify import Kind
from resilient_db.config import BreakerPolicy, Policy, PoolPolicy, RetryPolicy, Timeouts
from resilient_db.engine import resilience_of
from resilient_db.health import health
from resilient_db.telemetry._deferred import DeferredCount
from resilient_db.telemetry.metrics import METRICS, is_real_provider
from resilient_db.testing import FaultInjector, FaultProxy, ManualClock
from tests.conftest import SENTINEL

ROOT = Path(__file__).resolve().parents[1]
SPECS = {m.name: m for m in METRICS}
POOL = "db.client.connection.pool.name"


# -- helpers ------------------------------------------------------------------------


@dataclass
class Otel:
    """An SDK MeterProvider and TracerProvider with in-memory readers."""

    reader: InMemoryMetricReader = field(default_factory=InMemoryMetricReader)
    exporter: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)
    meter_provider: MeterProvider = field(init=False)
    tracer_provider: TracerProvider = field(init=False)

    def __post_init__(self) -> None:
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def metrics(self) -> dict[str, Metric]:
        """Collect now: every resilient_db metric by name."""
        data = self.reader.get_metrics_data()
        found: dict[str, Metric] = {}
        if data is None:
            return found
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                if sm.scope.name == "resilient_db":
                    for m in sm.metrics:
                        found[m.name] = m
        return found

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        """Finished spans, optionally only those called ``name``."""
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]


@pytest.fixture
def otel() -> Iterator[Otel]:
    """Per-test OTel SDK providers."""
    o = Otel()
    yield o
    o.meter_provider.shutdown()
    o.tracer_provider.shutdown()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLite, then the shared PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tel.db'}"
    return str(request.getfixturevalue("pg_url"))


def make_engine(url: str, otel: Otel, policy: Policy | None = None, **kw: Any) -> sa.Engine:
    """A resilient engine reporting to ``otel``."""
    name = kw.pop("name", f"e-{uuid.uuid4().hex[:6]}")
    engine = resilient_db.create_engine(url, name=name, policy=policy, validate="off")
    telemetry.instrument(
        engine, meter_provider=otel.meter_provider, tracer_provider=otel.tracer_provider, **kw
    )
    return engine


_KIND_DATA = {
    "Counter": (Sum, True),
    "ObservableCounter": (Sum, True),
    "ObservableUpDownCounter": (Sum, False),
    "UpDownCounter": (Sum, False),
    "ObservableGauge": (Gauge, None),
    "Histogram": (Histogram, None),
}


def check_spec(metric: Metric) -> None:
    """Unit, instrument kind and attribute keys of ``metric`` match its MetricSpec."""
    spec = SPECS[metric.name]
    assert (metric.name, spec.unit) == (metric.name, metric.unit)
    data_type, monotonic = _KIND_DATA[spec.kind]
    assert (metric.name, data_type) == (metric.name, type(metric.data))
    if monotonic is not None:
        assert isinstance(metric.data, Sum)
        assert (metric.name, monotonic) == (metric.name, metric.data.is_monotonic)
    assert metric.data.data_points, metric.name
    for point in metric.data.data_points:
        keys = set(point.attributes or {})
        required = set(spec.attributes) - set(spec.optional)
        assert required <= keys, (metric.name, keys)
        assert keys <= set(spec.attributes) | set(spec.optional), (metric.name, keys)


def points(metric: Metric) -> dict[tuple[tuple[str, Any], ...], Any]:
    """Data points keyed by their sorted attributes; value, or count for histograms."""
    out: dict[tuple[tuple[str, Any], ...], Any] = {}
    for p in metric.data.data_points:
        key = tuple(sorted((p.attributes or {}).items()))
        out[key] = p.count if isinstance(metric.data, Histogram) else p.value
    return out


def by(metric: Metric, want: dict[str, Any]) -> Any:
    """The value (or histogram count) of the one data point having the ``want`` attributes."""
    found = [v for k, v in points(metric).items() if want.items() <= dict(k).items()]
    assert 1 == len(found), (metric.name, want, points(metric))
    return found[0]


def run_happy_path(engine: sa.Engine, checkouts: int = 3) -> None:
    """``checkouts`` checkouts of two statements each."""
    for _ in range(checkouts):
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1")).scalar()
            conn.execute(sa.text("SELECT 2")).scalar()


def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    """Poll a cross-thread condition (nothing to inject a clock into)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


# -- the catalogue ------------------------------------------------------------------


SEMCONV = {
    # name: (instrument kind per the semantic conventions, unit)
    "db.client.connection.count": ("UpDownCounter", "{connection}"),
    "db.client.connection.max": ("UpDownCounter", "{connection}"),
    "db.client.connection.idle.max": ("UpDownCounter", "{connection}"),
    "db.client.connection.pending_requests": ("UpDownCounter", "{request}"),
    "db.client.connection.timeouts": ("Counter", "{timeout}"),
    "db.client.connection.create_time": ("Histogram", "s"),
    "db.client.connection.wait_time": ("Histogram", "s"),
    "db.client.connection.use_time": ("Histogram", "s"),
    "db.client.operation.duration": ("Histogram", "s"),
}


def test_catalogue_follows_the_semantic_conventions() -> None:
    """Every semconv metric has the spec's kind (sync or observable) and unit."""
    for name, (kind, unit) in SEMCONV.items():
        spec = SPECS[name]
        assert (name, kind, unit) == (name, spec.kind.removeprefix("Observable"), spec.unit)
    pool_metrics = [m for m in METRICS if m.name != "db.client.operation.duration"]
    assert all(POOL in m.attributes for m in pool_metrics)
    assert len(METRICS) == len(SPECS)


def test_prometheus_names() -> None:
    """The exporter's naming: dots to underscores, _seconds for "s", _total for counters."""
    names = {m.name: m.prometheus_name for m in METRICS}
    assert "db_client_connection_count" == names["db.client.connection.count"]
    assert "db_client_connection_timeouts_total" == names["db.client.connection.timeouts"]
    assert "db_client_operation_duration_seconds" == names["db.client.operation.duration"]
    assert "resilient_db_breaker_rejections_total" == names["resilient_db.breaker.rejections"]
    assert "resilient_db_breaker_state" == names["resilient_db.breaker.state"]


# -- happy path -----------------------------------------------------------------------


def test_happy_path_metrics(db_url: str, otel: Otel) -> None:
    """Pool, timing and breaker metrics of a healthy engine: names, kinds, units, values."""
    engine = make_engine(db_url, otel, name="happy", pool_timings=True)
    with engine.connect():  # the first connect: the dialect runs its own set-up queries
        pass
    warm = otel.metrics().get("db.client.operation.duration")  # SQLite runs none
    setup_queries = sum(points(warm).values()) if warm is not None else 0
    run_happy_path(engine, checkouts=3)
    m = otel.metrics()
    expected = {
        "db.client.connection.count",
        "db.client.connection.max",
        "db.client.connection.idle.max",
        "db.client.connection.pending_requests",
        "db.client.connection.timeouts",
        "db.client.connection.create_time",
        "db.client.connection.wait_time",
        "db.client.connection.use_time",
        "db.client.operation.duration",
        "resilient_db.breaker.state",
        "resilient_db.breaker.rejections",
    }
    assert expected == set(m)
    for metric in m.values():
        check_spec(metric)
    pool = {POOL: "happy"}
    assert {
        ((POOL, "happy"), ("db.client.connection.state", "idle")): 1,
        ((POOL, "happy"), ("db.client.connection.state", "used")): 0,
    } == points(m["db.client.connection.count"])
    assert 10 == by(m["db.client.connection.max"], pool)
    assert 5 == by(m["db.client.connection.idle.max"], pool)
    assert 0 == by(m["db.client.connection.pending_requests"], pool)
    assert 0 == by(m["db.client.connection.timeouts"], pool)
    assert 1 == by(m["db.client.connection.create_time"], pool)
    assert 4 == by(m["db.client.connection.wait_time"], pool)
    assert 4 == by(m["db.client.connection.use_time"], pool)
    assert 0 == by(m["resilient_db.breaker.state"], pool)
    assert 0 == by(m["resilient_db.breaker.rejections"], pool)
    u = sa.make_url(db_url)
    op_attrs: dict[str, Any] = {"db.system.name": u.get_backend_name(), "db.namespace": u.database}
    if u.get_backend_name() != "sqlite":
        op_attrs.update({"server.address": u.host, "server.port": u.port or 5432})
    assert {tuple(sorted(op_attrs.items())): setup_queries + 6} == points(
        m["db.client.operation.duration"]
    )


def test_happy_path_spans(db_url: str, otel: Otel) -> None:
    """One connect span (the pool's only connection), no per-statement spans."""
    engine = make_engine(db_url, otel, name="spans")
    run_happy_path(engine)
    spans = otel.spans()
    assert ["resilient_db.connect"] == [s.name for s in spans]
    span = spans[0]
    assert StatusCode.UNSET == span.status.status_code
    attrs = dict(span.attributes or {})
    assert 1 == attrs["resilient_db.attempts"]
    assert "spans" == attrs[POOL]
    assert sa.make_url(db_url).get_backend_name() == attrs["db.system.name"]
    assert [] == list(span.events)


def test_happy_path_logs_nothing_at_warning(
    db_url: str, otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    """A healthy engine writes no record at WARNING or above."""
    caplog.set_level(logging.DEBUG, logger="resilient_db")
    engine = make_engine(db_url, otel)
    run_happy_path(engine)
    health(engine)
    assert [] == [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# -- pool saturation --------------------------------------------------------------------


def test_pool_saturation_metrics(db_url: str, otel: Otel) -> None:
    """A full pool: used == max, one waiter pending, one rejected checkout counted."""
    policy = Policy(
        pool=PoolPolicy(size=1, max_overflow=0, max_waiters=1),
        timeouts=Timeouts(checkout=10.0),
    )
    engine = make_engine(db_url, otel, policy, name="sat", pool_timings=True)
    r = resilience_of(engine)
    held = engine.connect()
    waiter_done = threading.Event()

    def waiter() -> None:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        waiter_done.set()

    t = threading.Thread(target=waiter)
    t.start()
    try:
        wait_until(lambda: r.waiting == 1)
        with pytest.raises(resilient_db.PoolExhaustedError):
            engine.connect()
        m = otel.metrics()
        for name in (
            "db.client.connection.count",
            "db.client.connection.max",
            "db.client.connection.pending_requests",
            "db.client.connection.timeouts",
            "resilient_db.errors",
        ):
            check_spec(m[name])
        assert 1 == by(m["db.client.connection.count"], {"db.client.connection.state": "used"})
        assert 0 == by(m["db.client.connection.count"], {"db.client.connection.state": "idle"})
        assert 1 == by(m["db.client.connection.max"], {POOL: "sat"})
        assert 1 == by(m["db.client.connection.idle.max"], {POOL: "sat"})
        assert 1 == by(m["db.client.connection.pending_requests"], {POOL: "sat"})
        assert 1 == by(m["db.client.connection.timeouts"], {POOL: "sat"})
        assert {
            ((POOL, "sat"), ("error.type", "pool_exhausted"), ("resilient_db.phase", "checkout")): 1
        } == points(m["resilient_db.errors"])
        snap = health(engine)
        assert ("degraded", True) == (snap.status, snap.pool.saturated)
    finally:
        held.close()
        t.join(10)
    assert waiter_done.is_set()
    m = otel.metrics()
    assert 0 == by(m["db.client.connection.pending_requests"], {POOL: "sat"})
    assert 2 == by(m["db.client.connection.use_time"], {POOL: "sat"})


# -- breaker trip ------------------------------------------------------------------------

TRIP = Policy(
    breaker=BreakerPolicy(failure_threshold=2, reset_timeout=1000.0),
    retry=RetryPolicy(attempts=3),
)


def refused() -> BaseException:
    """The error a closed port gives (SQLite has no port to close)."""
    return ConnectionRefusedError(111, "Connection refused")


def failing_engine(db_url: str, otel: Otel, policy: Policy = TRIP, **kw: Any) -> sa.Engine:
    """An engine whose connects are refused: a closed port, or injected on SQLite."""
    u = sa.make_url(db_url)
    if u.get_backend_name() == "sqlite":
        engine = make_engine(db_url, otel, policy, **kw)
        FaultInjector(engine).fail_connects(1000, refused)
        return engine
    down = u.set(host="127.0.0.1", port=1, password=SENTINEL)
    return make_engine(down.render_as_string(hide_password=False), otel, policy, **kw)


def test_breaker_trip_metrics(db_url: str, otel: Otel) -> None:
    """Refused connects: failures, one retry, breaker open, rejections counted."""
    engine = failing_engine(db_url, otel, name="trip")
    with pytest.raises(sa.exc.OperationalError) as first:
        engine.connect()
    assert not isinstance(first.value, resilient_db.CircuitOpenError)
    for _ in range(3):
        with pytest.raises(resilient_db.CircuitOpenError):
            engine.connect()
    m = otel.metrics()
    for name in (
        "resilient_db.connect.failures",
        "resilient_db.retry.attempts",
        "resilient_db.errors",
        "resilient_db.breaker.state",
        "resilient_db.breaker.transitions",
        "resilient_db.breaker.rejections",
    ):
        check_spec(m[name])
    pool = ("db.client.connection.pool.name", "trip")
    assert {(pool, ("error.type", "refused")): 2} == points(m["resilient_db.connect.failures"])
    assert {
        (pool, ("error.type", "refused"), ("resilient_db.retry.level", "connect")): 1
    } == points(m["resilient_db.retry.attempts"])
    assert {
        (pool, ("error.type", "refused"), ("resilient_db.phase", "connect")): 1,
        (pool, ("error.type", "circuit_open"), ("resilient_db.phase", "checkout")): 3,
    } == points(m["resilient_db.errors"])
    assert 2 == by(m["resilient_db.breaker.state"], {POOL: "trip"})
    assert {(pool, ("resilient_db.breaker.to_state", "open")): 1} == points(
        m["resilient_db.breaker.transitions"]
    )
    assert 3 == by(m["resilient_db.breaker.rejections"], {POOL: "trip"})
    assert "db.client.connection.create_time" not in m


def test_breaker_trip_spans(db_url: str, otel: Otel) -> None:
    """The connect span fails with the classification; rejections are events."""
    engine = failing_engine(db_url, otel, name="trip-spans")
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("request"):
        for _ in range(3):
            with pytest.raises(sa.exc.OperationalError):
                engine.connect()
    (connect,) = otel.spans("resilient_db.connect")
    assert StatusCode.ERROR == connect.status.status_code
    attrs = dict(connect.attributes or {})
    assert ("refused", 2) == (attrs["error.type"], attrs["resilient_db.attempts"])
    assert "Nothing is accepting connections" in str(attrs["resilient_db.diagnosis"])
    assert ["resilient_db.retry"] == [e.name for e in connect.events]
    event = dict(connect.events[0].attributes or {})
    assert (1, "refused") == (event["resilient_db.attempt"], event["error.type"])
    (request,) = otel.spans("request")
    names = [e.name for e in request.events]
    assert ["resilient_db.error"] + ["resilient_db.breaker.rejected"] * 2 == names
    rejected = dict(request.events[1].attributes or {})
    assert ("trip-spans", "open") == (rejected[POOL], rejected["resilient_db.breaker.state"])


def test_breaker_trip_logs(db_url: str, otel: Otel, caplog: pytest.LogCaptureFixture) -> None:
    """One record when the breaker opens, one per failed connect, none per rejection."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    engine = failing_engine(db_url, otel, name="trip-logs")
    for _ in range(20):
        with pytest.raises(sa.exc.OperationalError):
            engine.connect()
    records = [r for r in caplog.records if r.name == "resilient_db"]
    events = [(r.levelname, r.resilient_db["event"]) for r in records]  # type: ignore[attr-defined]
    assert [("WARNING", "breaker_opened"), ("WARNING", "connect_failed")] == events
    context = records[1].resilient_db["context"]  # type: ignore[attr-defined]
    assert ("refused", "connect", 2) == (context["kind"], context["phase"], context["attempt"])
    json.dumps(records[0].resilient_db)  # type: ignore[attr-defined]


def test_rejections_are_summarised(
    sqlite_url: str, otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    """While open: a summary at most once a minute; the total when the breaker closes."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    policy = replace(TRIP, breaker=replace(TRIP.breaker, reset_timeout=300.0))
    engine = make_engine(sqlite_url, otel, policy, name="summary")
    r = resilience_of(engine)
    clock = ManualClock()
    r.clock = clock
    assert r.breaker is not None
    r.breaker.clock = clock
    injector = FaultInjector(engine)
    injector.fail_connects(2, refused)
    with pytest.raises(sa.exc.OperationalError):
        engine.connect()
    for step in range(10):  # 10 rejections over 90 s
        clock.now += 10.0 if step else 0.0
        with pytest.raises(resilient_db.CircuitOpenError):
            engine.connect()
    clock.now += 300.0  # past reset_timeout: the next call is the probe, and succeeds
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    events = [r.resilient_db for r in caplog.records if r.name == "resilient_db"]  # type: ignore[attr-defined]
    assert ["breaker_opened", "connect_failed", "breaker_rejections", "breaker_half_open",
            "breaker_closed"] == [e["event"] for e in events]  # fmt: skip
    assert 7 == events[2]["rejected"]  # the first 7 (0..60 s), summarised once
    assert 10 == events[3]["rejected_while_open"]
    m = otel.metrics()
    transitions = {
        dict(k)["resilient_db.breaker.to_state"]: v
        for k, v in points(m["resilient_db.breaker.transitions"]).items()
    }
    assert {"open": 1, "half-open": 1, "closed": 1} == transitions
    assert 0 == by(m["resilient_db.breaker.state"], {POOL: "summary"})


# -- validation failures and ambiguous commits (PostgreSQL) ------------------------


def test_validation_failure_counted(pg_url: str, otel: Otel) -> None:
    """A pooled connection killed while idle fails its ping on checkout: counted."""
    policy = Policy(pool=PoolPolicy(ping_after_idle=0.0))
    engine = make_engine(pg_url, otel, policy, name="ping")
    with engine.connect() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
    killer = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with killer.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    killer.dispose()
    wait_until(lambda: not _backend_alive(pg_url, pid))
    with engine.connect() as conn:
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()
    m = otel.metrics()
    check_spec(m["resilient_db.validation.failures"])
    assert {((POOL, "ping"), ("resilient_db.validation.check", "idle_ping")): 1} == points(
        m["resilient_db.validation.failures"]
    )
    assert 2 == by(m["db.client.connection.create_time"], {POOL: "ping"})


def _backend_alive(pg_url: str, pid: int) -> bool:
    e = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        with e.connect() as conn:
            q = sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p")
            return bool(conn.execute(q, {"p": pid}).scalar())
    finally:
        e.dispose()


def test_ambiguous_commit_counted(pg_url: str, otel: Otel) -> None:
    """A COMMIT whose reply is lost counts resilient_db.commit.ambiguous."""
    table = f"tel_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {table} (id int)"))
    u = sa.make_url(pg_url)
    try:
        with FaultProxy(u.host or "127.0.0.1", u.port or 5432) as proxy:
            url = u.set(host=proxy.host, port=proxy.port)
            policy = Policy(pool=PoolPolicy(ping_after_idle=None))
            engine = make_engine(
                url.render_as_string(hide_password=False), otel, policy, name="amb"
            )
            conn = engine.connect()
            conn.execute(sa.text(f"INSERT INTO {table} VALUES (1)"))
            proxy.drop_commit_reply()
            with pytest.raises(resilient_db.AmbiguousCommitError):
                conn.commit()
            conn.close()
            engine.dispose()
        m = otel.metrics()
        check_spec(m["resilient_db.commit.ambiguous"])
        assert 1 == by(m["resilient_db.commit.ambiguous"], {POOL: "amb"})
        assert 1 == by(m["resilient_db.errors"], {"error.type": "ambiguous_commit"})
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        admin.dispose()


def test_ambiguous_commit_in_a_unit_of_work_counted_once(pg_url: str, otel: Otel) -> None:
    """A unit of work whose verify() fails after an ambiguous commit counts it once."""
    table = f"tel_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {table} (id int)"))
    u = sa.make_url(pg_url)

    def verify(conn: sa.Connection) -> bool:
        raise RuntimeError("verify failed")

    try:
        with FaultProxy(u.host or "127.0.0.1", u.port or 5432) as proxy:
            url = u.set(host=proxy.host, port=proxy.port)
            policy = Policy(pool=PoolPolicy(ping_after_idle=None))
            engine = make_engine(
                url.render_as_string(hide_password=False), otel, policy, name="amb-uow"
            )
            proxy.drop_commit_reply()
            with pytest.raises(resilient_db.AmbiguousCommitError):
                resilient_db.run_transaction(
                    engine,
                    lambda c: c.execute(sa.text(f"INSERT INTO {table} VALUES (1)")),
                    verify=verify,
                )
            engine.dispose()
        m = otel.metrics()
        assert 1 == by(m["resilient_db.commit.ambiguous"], {POOL: "amb-uow"})
        assert 1 == by(m["resilient_db.errors"], {"error.type": "ambiguous_commit"})
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        admin.dispose()


# -- per-call timings: when they are on ---------------------------------------------


def test_no_sdk_means_no_per_call_work(sqlite_url: str) -> None:
    """With the global no-op provider, no checkout or statement hook is installed."""
    from opentelemetry import metrics

    if is_real_provider(metrics.get_meter_provider()):
        pytest.skip("a global MeterProvider was set in this process")
    engine = resilient_db.create_engine(sqlite_url, validate="off")
    tel = telemetry.telemetry_of(engine)
    run_happy_path(engine, 1)
    assert (None, False) == (resilience_of(engine).timing, tel._listening)
    assert "do_execute" not in vars(engine.dialect)  # the dialect's own method, unwrapped


def test_timings_start_on_first_collection(sqlite_url: str, otel: Otel) -> None:
    """A provider set after the engine was made: timings start when it first collects."""
    from opentelemetry.metrics._internal import _ProxyMeterProvider

    proxy = _ProxyMeterProvider()  # what the global provider is before set_meter_provider()
    engine = resilient_db.create_engine(sqlite_url, name="late", validate="off")
    telemetry.instrument(engine, meter_provider=proxy, pool_timings=True)
    run_happy_path(engine, 1)
    assert resilience_of(engine).timing is None
    proxy.on_set_meter_provider(otel.meter_provider)  # what set_meter_provider() does
    first = otel.metrics()
    assert "db.client.connection.wait_time" not in first
    assert 1 == by(first["db.client.connection.count"], {"db.client.connection.state": "idle"})
    run_happy_path(engine, 2)
    m = otel.metrics()
    assert 2 == by(m["db.client.connection.wait_time"], {POOL: "late"})
    assert 4 == sum(points(m["db.client.operation.duration"]).values())


def test_default_times_operations_not_checkouts(sqlite_url: str, otel: Otel) -> None:
    """With an SDK, the default records operation.duration but not wait_time/use_time."""
    engine = make_engine(sqlite_url, otel, name="ops")
    run_happy_path(engine, 3)
    m = otel.metrics()
    assert 6 == sum(points(m["db.client.operation.duration"]).values())
    assert set() == {"db.client.connection.wait_time", "db.client.connection.use_time"} & set(m)
    assert 1 == by(m["db.client.connection.create_time"], {POOL: "ops"})
    assert (None, True) == (resilience_of(engine).timing, telemetry.telemetry_of(engine)._listening)


def test_timings_false_records_no_histograms(sqlite_url: str, otel: Otel) -> None:
    """timings=False keeps the observable metrics and drops every per-call histogram."""
    engine = make_engine(sqlite_url, otel, timings=False, pool_timings=True, name="quiet")
    run_happy_path(engine)
    m = otel.metrics()
    per_call = {
        "db.client.connection.wait_time",
        "db.client.connection.use_time",
        "db.client.operation.duration",
    }
    assert set() == per_call & set(m)
    assert 1 == by(m["db.client.connection.count"], {"db.client.connection.state": "idle"})


def test_durations_wait_for_the_next_collection(sqlite_url: str, otel: Otel) -> None:
    """Per-call values are held by the engine until a reader collects, then all reported."""
    engine = make_engine(sqlite_url, otel, pool_timings=True, name="held")
    tel = telemetry.telemetry_of(engine)
    run_happy_path(engine, 3)
    held = (len(tel.operations.values), len(tel.waits.values), len(tel.uses.values))
    assert (6, 3, 3) == held
    m = otel.metrics()
    assert (0, 0, 0) == (len(tel.operations.values), len(tel.waits.values), len(tel.uses.values))
    assert 6 == sum(points(m["db.client.operation.duration"]).values())
    assert (3, 3) == (
        by(m["db.client.connection.wait_time"], {POOL: "held"}),
        by(m["db.client.connection.use_time"], {POOL: "held"}),
    )
    run_happy_path(engine, 1)  # the next collection reports the values since (cumulative)
    assert 8 == sum(points(otel.metrics()["db.client.operation.duration"]).values())


@pytest.mark.parametrize(("buffer", "held"), [(0, 0), (4, 4)])
def test_a_full_buffer_records_at_once(sqlite_url: str, otel: Otel, buffer: int, held: int) -> None:
    """timing_buffer=0 records every value at once; a full buffer records the overflow."""
    engine = make_engine(sqlite_url, otel, timing_buffer=buffer, name=f"buf{buffer}")
    tel = telemetry.telemetry_of(engine)
    run_happy_path(engine, 3)
    assert held == len(tel.operations.values)
    assert 6 == sum(points(otel.metrics()["db.client.operation.duration"]).values())


def test_concurrent_calls_and_collections_lose_nothing(sqlite_url: str, otel: Otel) -> None:
    """Four threads time statements while a reader collects in a loop: every value arrives."""
    engine = make_engine(sqlite_url, otel, name="busy")
    done = threading.Event()
    collections = 0

    def collect() -> None:
        nonlocal collections
        while not done.is_set():
            otel.metrics()
            collections += 1

    collector = threading.Thread(target=collect)
    collector.start()
    workers = [threading.Thread(target=run_happy_path, args=(engine, 150)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done.set()
    collector.join()
    assert collections > 1
    assert 4 * 150 * 2 == sum(points(otel.metrics()["db.client.operation.duration"]).values())


def test_reinstrumenting_reports_held_values_to_the_old_provider(
    sqlite_url: str, otel: Otel
) -> None:
    """instrument() again: what the old telemetry held goes to its own provider first."""
    other = Otel()
    engine = make_engine(sqlite_url, other, name="moved")
    run_happy_path(engine, 2)
    telemetry.instrument(engine, meter_provider=otel.meter_provider)
    run_happy_path(engine, 1)
    assert 4 == sum(points(other.metrics()["db.client.operation.duration"]).values())
    assert 2 == sum(points(otel.metrics()["db.client.operation.duration"]).values())


@pytest.mark.parametrize("bad", [-1, 1.5, "1000", True, None])
def test_timing_buffer_must_be_a_count(sqlite_url: str, bad: Any) -> None:
    """A nonsensical timing_buffer is one typed error naming the field and the fix."""
    engine = resilient_db.create_engine(sqlite_url, validate="off")
    with pytest.raises(resilient_db.ConfigurationError) as e:
        telemetry.instrument(engine, timing_buffer=bad)
    assert "instrument(timing_buffer=)" == e.value.field
    assert "Use 0 to record every value at once" in str(e.value)


def test_reinstrument_replaces_previous(sqlite_url: str, otel: Otel) -> None:
    """instrument() twice: only the last providers receive data."""
    other = Otel()
    engine = make_engine(sqlite_url, other, name="twice")
    telemetry.instrument(
        engine,
        meter_provider=otel.meter_provider,
        tracer_provider=otel.tracer_provider,
        pool_timings=True,
    )
    run_happy_path(engine, 1)
    assert {} == other.metrics()
    assert 1 == by(otel.metrics()["db.client.connection.use_time"], {POOL: "twice"})
    assert 1 == len(otel.spans("resilient_db.connect"))


def test_error_events_and_operation_errors(sqlite_url: str, otel: Otel) -> None:
    """A failed statement: error.type on operation.duration, an event on the current span."""
    engine = make_engine(sqlite_url, otel, capture_statement=True, name="err")
    tracer = otel.tracer_provider.get_tracer("test")
    with (
        tracer.start_as_current_span("request"),
        engine.connect() as conn,
        pytest.raises(sa.exc.OperationalError),
    ):
        conn.execute(sa.text("SELECT * FROM no_such_table WHERE x = :x"), {"x": SENTINEL})
    (request,) = otel.spans("request")
    (event,) = request.events
    attrs = dict(event.attributes or {})
    assert ("resilient_db.error", "execute") == (event.name, attrs["resilient_db.phase"])
    assert "SELECT * FROM no_such_table WHERE x = ?" == attrs["db.query.text"]
    m = otel.metrics()
    failed = [dict(k) for k in points(m["db.client.operation.duration"]) if "error.type" in dict(k)]
    assert 1 == len(failed)
    check_spec(m["db.client.operation.duration"])


def test_unit_of_work_span(sqlite_url: str, otel: Otel) -> None:
    """unit_of_work(): one span, a retry event per replay, ERROR when it gives up."""
    engine = make_engine(sqlite_url, otel, name="uow")
    deadlock = sa.exc.OperationalError("UPDATE t", {}, Exception("deadlock detected"))
    with pytest.raises(sa.exc.OperationalError), telemetry.unit_of_work(engine, "transfer") as uow:
        uow.retry(deadlock, 0.05)
        raise deadlock
    (span,) = otel.spans("resilient_db.unit_of_work")
    attrs = dict(span.attributes or {})
    assert ("transfer", 2) == (attrs["resilient_db.unit_of_work"], attrs["resilient_db.attempts"])
    assert StatusCode.ERROR == span.status.status_code
    assert ["resilient_db.retry"] == [e.name for e in span.events]
    m = otel.metrics()
    check_spec(m["resilient_db.retry.attempts"])
    assert 1 == by(m["resilient_db.retry.attempts"], {"resilient_db.retry.level": "transaction"})


def test_with_opentelemetry_instrumentation_sqlalchemy(sqlite_url: str, otel: Otel) -> None:
    """With the SQLAlchemy instrumentation: its statement spans, our connect span, no twins."""
    instr = pytest.importorskip("opentelemetry.instrumentation.sqlalchemy")
    engine = make_engine(sqlite_url, otel, name="both")
    instr.SQLAlchemyInstrumentor().instrument(
        engine=engine, tracer_provider=otel.tracer_provider, skip_dep_check=True
    )
    try:
        run_happy_path(engine, 2)
    finally:
        instr.SQLAlchemyInstrumentor().uninstrument()
    spans = otel.spans()
    statements = [s for s in spans if s.name.startswith("SELECT")]
    checkouts = [s for s in spans if s.name == "connect"]  # theirs: one per engine.connect()
    (ours,) = otel.spans("resilient_db.connect")  # ours: one per DBAPI connection made
    assert (4, 2, 7) == (len(statements), len(checkouts), len(spans))
    assert ours.parent is not None
    assert checkouts[0].context.span_id == ours.parent.span_id


# -- secrets ------------------------------------------------------------------------------


def test_sentinel_never_leaks(pg_url: str, otel: Otel, caplog: pytest.LogCaptureFixture) -> None:
    """The password and bind values appear in no span, metric, log record or health output."""
    caplog.set_level(logging.DEBUG)
    u = sa.make_url(pg_url).set(password=SENTINEL)  # trust auth: any password works
    good = make_engine(
        u.render_as_string(hide_password=False), otel, capture_statement=True, name="s-good"
    )
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("request"):
        with good.connect() as conn:
            conn.execute(sa.text("SELECT :x"), {"x": SENTINEL})
            with pytest.raises(sa.exc.DBAPIError):
                conn.execute(sa.text("SELECT CAST(:x AS int)"), {"x": SENTINEL})
        bad = failing_engine(pg_url, otel, name="s-bad")
        for _ in range(4):
            with pytest.raises(sa.exc.OperationalError):
                bad.connect()
    outputs: list[str] = []
    for span in otel.spans():
        outputs.append(repr(dict(span.attributes or {})))
        outputs.append(str(span.status.description))
        outputs.extend(repr(dict(e.attributes or {})) for e in span.events)
    data = otel.reader.get_metrics_data()
    assert data is not None
    outputs.append(data.to_json())
    for record in caplog.records:
        outputs.append(record.getMessage())
        outputs.append(repr(record.__dict__))
    for engine in (good, bad):
        outputs.append(json.dumps(health(engine).to_dict()))
        outputs.append(json.dumps(health(engine, ping=True, timeout=2.0).to_dict()))
    assert len(otel.spans("resilient_db.connect")) >= 2
    assert [] == [o for o in outputs if SENTINEL in o]


# -- alert rules against the exporter's names ------------------------------------------


def _exported_names(registry: Any) -> set[str]:
    from prometheus_client import generate_latest

    return {
        line.split("{")[0].split(" ")[0]
        for line in generate_latest(registry).decode().splitlines()
        if line and not line.startswith("#")
    }


def test_prometheus_exporter_names(sqlite_url: str, otel: Otel) -> None:
    """The OTel Prometheus exporter produces exactly MetricSpec.prometheus_name."""
    pytest.importorskip("opentelemetry.exporter.prometheus")
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry, disable_target_info=True)
    provider = MeterProvider(metric_readers=[reader])
    try:
        ok = resilient_db.create_engine(sqlite_url, name="prom", validate="off")
        telemetry.instrument(ok, meter_provider=provider, pool_timings=True)
        run_happy_path(ok, 1)
        bad = resilient_db.create_engine(sqlite_url, name="prom-bad", policy=TRIP, validate="off")
        telemetry.instrument(bad, meter_provider=provider)
        FaultInjector(bad).fail_connects(1000, refused)
        for _ in range(3):
            with pytest.raises(sa.exc.OperationalError):
                bad.connect()
        telemetry.telemetry_of(bad).validation_failed("idle_ping")
        from prometheus_client import generate_latest

        text = generate_latest(registry).decode()
        exported = _exported_names(registry)
    finally:
        provider.shutdown()
    for label in (
        'db_client_connection_pool_name="prom"',
        'db_client_connection_state="idle"',
        'error_type="refused"',
        'resilient_db_breaker_to_state="open"',
        'resilient_db_validation_check="idle_ping"',
        'resilient_db_retry_level="connect"',
        'resilient_db_phase="checkout"',
    ):
        assert label in text, label
    for spec in METRICS:
        if spec.name == "resilient_db.commit.ambiguous":
            continue  # needs a lost COMMIT reply: see test_ambiguous_commit_counted
        if spec.name == "resilient_db.breaker.store.available":
            continue  # needs a shared breaker: see tests/test_fleet_breaker.py
        series = {spec.prometheus_name}
        if spec.kind == "Histogram":
            series = {f"{spec.prometheus_name}_{s}" for s in ("bucket", "count", "sum")}
        assert series <= exported, (spec.name, sorted(n for n in exported if spec.name[:8] in n))


RULES = ROOT / "docs" / "alerts.rules.yml"


def test_alert_rules_schema() -> None:
    """Every rule: a known metric, a severity, a summary and a runbook section that exists."""
    doc = yaml.safe_load(RULES.read_text())
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    anchors = {_anchor(line) for line in runbook.splitlines() if line.startswith("#")}
    known = {m.prometheus_name for m in METRICS}
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    assert len(rules) >= 5
    for group in doc["groups"]:
        assert {"name", "rules"} <= set(group)
    for rule in rules:
        assert {"alert", "expr", "for", "labels", "annotations"} <= set(rule), rule.get("alert")
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("docs/runbook.md#"), url
        section = url.split("#", 1)[1]
        if section == "{{ $labels.error_type }}":  # one section per classification kind
            assert "error_type" in rule["expr"], rule["alert"]
        else:
            assert section in anchors, (rule["alert"], url)
        used = _metric_names(rule["expr"])
        assert used, rule["alert"]
        assert used <= known, (rule["alert"], used - known)


def test_runbook_has_a_section_per_kind() -> None:
    """Each classification kind has a runbook section with meaning, confirm, fix, owner."""
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    sections = {_anchor(part.splitlines()[0]): part for part in runbook.split("\n### ")[1:]}
    for kind in Kind:
        assert kind.value in sections, kind
        for field_name in ("**Meaning.**", "**Confirm.**", "**Fix.**", "**Owner.**"):
            assert field_name in sections[kind.value], (kind, field_name)


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression, histogram series mapped to their family."""
    import re

    labels = {a.replace(".", "_") for m in METRICS for a in m.attributes + m.optional}
    out = set()
    for name in re.findall(r"\b((?:db_client|resilient_db)_[a-z_]+)\b", expr):
        for suffix in ("_bucket", "_count", "_sum"):
            if name.endswith("_seconds" + suffix):
                name = name.removesuffix(suffix)
        if name not in labels:
            out.add(name)
    return out


def _anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    import re

    text = heading.lstrip("#").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_alert_rules_promtool() -> None:
    """promtool accepts the rules and their unit tests pass."""
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        import os

        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing on CI (.ci/run installs the prometheus package)")
        pytest.skip("promtool is not installed")
    check = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert 0 == check.returncode, check.stdout + check.stderr
    tests = ROOT / "docs" / "alerts.tests.yml"
    run = subprocess.run(
        [promtool, "test", "rules", str(tests)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tests.parent,
    )
    assert 0 == run.returncode, run.stdout + run.stderr


def test_mariadb_system_name(mariadb_url: str, otel: Otel) -> None:
    """A MariaDB server behind a mysql:// URL reports db.system.name "mariadb"."""
    engine = make_engine(mariadb_url, otel, name="maria")
    run_happy_path(engine, 1)
    (attrs,) = [dict(k) for k in points(otel.metrics()["db.client.operation.duration"])]
    assert ("mariadb", "test", 3306) == (
        attrs["db.system.name"],
        attrs["db.namespace"],
        attrs["server.port"],
    )


def test_held_values_get_no_exemplar_from_the_collecting_request(
    sqlite_url: str, otel: Otel
) -> None:
    """A collection inside a traced request (/metrics) does not tie held values to it."""
    engine = make_engine(sqlite_url, otel, name="exemplars")
    run_happy_path(engine, 2)
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("GET /metrics"):
        m = otel.metrics()
    (point,) = m["db.client.operation.duration"].data.data_points
    assert (4, []) == (point.count, list(point.exemplars))


def _wrapped_original(fn: Any) -> Any:
    free, cells_ = fn.__code__.co_freevars, fn.__closure__ or ()
    cells = dict(zip(free, (c.cell_contents for c in cells_), strict=True))
    return cells.get("original")


@pytest.mark.parametrize("early", [True, False])
def test_one_dialect_wrapper_whatever_the_order(db_url: str, early: bool) -> None:
    """Telemetry times executes in the engine's one dialect wrapper, instrumented early or late."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    engine = resilient_db.create_engine(db_url, validate="off")
    if early:
        telemetry.instrument(engine, meter_provider=provider, timings=True)
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    telemetry.instrument(engine, meter_provider=provider, timings=True)  # again: re-wired
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    fn = engine.dialect.__dict__["do_execute"]
    assert "guard_calls.<locals>.guard.<locals>.guarded" == fn.__qualname__
    assert "guarded" not in _wrapped_original(fn).__qualname__  # wrapped once, not twice
    data = reader.get_metrics_data()
    counts = [
        point.count
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "db.client.operation.duration"
        for point in m.data.data_points
    ]
    # early: the first connection's set-up queries are timed too; late: only the one after
    assert (sum(counts) >= 2) if early else (1 == sum(counts)), counts
    engine.dispose()


def test_deferred_count_adds_each_rejection_once() -> None:
    """Counts taken from many threads while flushes run reach the counter exactly once."""

    class Counter:
        def __init__(self) -> None:
            self.added: list[tuple[int, dict[str, Any]]] = []

        def add(self, n: int, attributes: dict[str, Any]) -> None:
            self.added.append((n, attributes))

    counter = Counter()
    attrs = {"error.type": "circuit_open"}
    count = DeferredCount(counter, attrs)
    threads = [
        threading.Thread(target=lambda: [count.add_one() for _ in range(5000)]) for _ in range(4)
    ]
    for t in threads:
        t.start()
    flushed = 0
    while any(t.is_alive() for t in threads):
        flushed += count.flush()
    for t in threads:
        t.join()
    flushed += count.flush()
    assert (20_000, 20_000, 0) == (flushed, sum(n for n, _ in counter.added), count.flush())
    assert {id(attrs)} == {id(a) for _, a in counter.added}
