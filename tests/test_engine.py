"""create_engine / wrap: genuine SQLAlchemy engines, safe defaults, clear bad-input errors."""

from __future__ import annotations

import pickle
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db
from resilient_db import aio
from resilient_db.engine import driver_defaults, resilience_of
from resilient_db.testing import ManualClock


@pytest.fixture
def dispose() -> Iterator[Callable[[sa.Engine], sa.Engine]]:
    """Register an engine; it is disposed when the test ends, passed or failed."""
    engines: list[sa.Engine] = []

    def track(engine: sa.Engine) -> sa.Engine:
        engines.append(engine)
        return engine

    yield track
    for engine in engines:
        engine.dispose()


def _item_model() -> tuple[type[DeclarativeBase], Any]:
    """A fresh declarative base and mapped class on a table named uniquely for this test."""

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = f"rdb_engine_items_{uuid.uuid4().hex[:12]}"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(sa.String(50))

    return Base, Item


def test_create_engine_returns_a_real_engine(
    sqlite_url: str, dispose: Callable[[sa.Engine], sa.Engine]
) -> None:
    """The object handed back is a sqlalchemy.Engine, not a proxy."""
    engine = dispose(resilient_db.create_engine(sqlite_url, validate="off"))
    assert isinstance(engine, sa.Engine)
    assert type(engine) is sa.Engine


def test_core_and_orm_round_trips(any_url: str) -> None:
    """Core and ORM round-trips work unchanged on SQLite, PostgreSQL and MariaDB."""
    Base, Item = _item_model()
    table = Item.__tablename__
    engine = resilient_db.create_engine(any_url, validate="off")
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as session, session.begin():
            session.add_all([Item(id=1, name="a"), Item(id=2, name="b")])
        with engine.begin() as conn:
            names = conn.execute(sa.select(Item.name).order_by(Item.id)).scalars().all()
        assert ["a", "b"] == names
        assert table in sa.inspect(engine).get_table_names()
        engine.dispose()  # the resilient pool survives dispose()
        with engine.connect() as conn:
            assert 2 == conn.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar()
        assert type(engine.pool).__name__.startswith("Resilient")
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()


def test_wrap_returns_the_same_engine(
    sqlite_url: str, dispose: Callable[[sa.Engine], sa.Engine]
) -> None:
    """wrap() attaches resilience to the engine it is given and returns it."""
    raw = dispose(sa.create_engine(sqlite_url))
    assert raw is resilient_db.wrap(raw, name="orders")
    assert "orders" == resilience_of(raw).name
    with raw.connect() as conn:
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()


def test_wrap_twice_is_an_error(sqlite_url: str, dispose: Callable[[sa.Engine], sa.Engine]) -> None:
    """Wrapping an engine twice is refused with a ConfigurationError."""
    raw = dispose(resilient_db.wrap(sa.create_engine(sqlite_url)))
    with pytest.raises(resilient_db.ConfigurationError) as info:
        resilient_db.wrap(raw)
    assert "engine" == info.value.field


def test_policy_of_returns_the_policy(
    sqlite_url: str, dispose: Callable[[sa.Engine], sa.Engine]
) -> None:
    """policy_of() exposes the policy the engine runs with."""
    policy = resilient_db.Policy(pool=resilient_db.PoolPolicy(size=3))
    engine = dispose(resilient_db.create_engine(sqlite_url, policy=policy, validate="off"))
    assert policy == resilient_db.policy_of(engine)
    assert 3 == engine.pool.size()  # type: ignore[attr-defined]
    assert policy == resilient_db.policy_of(engine.execution_options(isolation_level="AUTOCOMMIT"))


def test_postgres_defaults_applied(pg_url: str, dispose: Callable[[sa.Engine], sa.Engine]) -> None:
    """psycopg gets a finite connect timeout, statement timeout and application_name."""
    policy = resilient_db.Policy(timeouts=resilient_db.Timeouts(connect=3, statement=12))
    engine = dispose(resilient_db.create_engine(pg_url, policy=policy, validate="off"))
    with engine.connect() as conn:
        assert "12s" == conn.execute(sa.text("SHOW statement_timeout")).scalar()
        assert "resilient-db" == conn.execute(sa.text("SHOW application_name")).scalar()
    assert 3 == driver_defaults(engine.url, policy)["connect_timeout"]
    assert engine.hide_parameters is True
    assert 3.0 == engine.pool.timeout()  # type: ignore[attr-defined]


def test_mysql_defaults_applied(
    mariadb_url: str, dispose: Callable[[sa.Engine], sa.Engine]
) -> None:
    """PyMySQL gets a connect timeout and pool_recycle below wait_timeout.

    No read or write timeout: the watchdog enforces the call deadline, so the
    ``resilient_db_call_timeout`` option can lift it, and reads stay blocking.
    """
    engine = dispose(resilient_db.create_engine(mariadb_url, validate="off"))
    args = driver_defaults(engine.url, resilient_db.DEFAULT_POLICY)
    assert (2, None, None) == (
        args["connect_timeout"],
        args.get("read_timeout"),
        args.get("write_timeout"),
    )
    assert 1800 == engine.pool._recycle  # type: ignore[attr-defined]
    with engine.connect() as conn:
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()


def test_caller_kwargs_win(pg_url: str, dispose: Callable[[sa.Engine], sa.Engine]) -> None:
    """Explicit SQLAlchemy arguments and connect_args override the defaults."""
    engine = dispose(
        resilient_db.create_engine(
            pg_url,
            validate="off",
            pool_size=2,
            connect_args={"application_name": "billing"},
        )
    )
    assert 2 == engine.pool.size()  # type: ignore[attr-defined]
    with engine.connect() as conn:
        assert "billing" == conn.execute(sa.text("SHOW application_name")).scalar()


def test_caller_libpq_options_win_over_the_policy(
    pg_url: str, dispose: Callable[[sa.Engine], sa.Engine]
) -> None:
    """A statement_timeout in the caller's libpq options overrides the policy's."""
    engine = dispose(
        resilient_db.create_engine(
            pg_url,
            validate="off",
            connect_args={"options": "-c statement_timeout=120000"},
        )
    )
    with engine.connect() as conn:
        assert "2min" == conn.execute(sa.text("SHOW statement_timeout")).scalar()


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("not a url", "url"),
        ("nosuchdialect://x/y", "url"),
        (42, "url"),
    ],
)
def test_bad_urls_raise_configuration_error(url: object, field: str) -> None:
    """Malformed URLs and unknown dialects raise one typed error naming the field."""
    with pytest.raises(resilient_db.ConfigurationError) as info:
        resilient_db.create_engine(url, validate="off")  # type: ignore[arg-type]
    assert field == info.value.field
    assert isinstance(info.value, sa.exc.ArgumentError)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: resilient_db.Timeouts(connect=-1), "Timeouts.connect"),
        (lambda: resilient_db.Timeouts(checkout=0), "Timeouts.checkout"),
        (lambda: resilient_db.Timeouts(call="5"), "Timeouts.call"),
        (lambda: resilient_db.PoolPolicy(size=0), "PoolPolicy.size"),
        (lambda: resilient_db.PoolPolicy(max_overflow=-1), "PoolPolicy.max_overflow"),
        (lambda: resilient_db.PoolPolicy(size=2.5), "PoolPolicy.size"),
        (lambda: resilient_db.RetryPolicy(attempts=0), "RetryPolicy.attempts"),
        (lambda: resilient_db.BreakerPolicy(failure_rate=1.5), "BreakerPolicy.failure_rate"),
        (
            lambda: resilient_db.BreakerPolicy(reset_timeout=float("nan")),
            "BreakerPolicy.reset_timeout",
        ),
        (lambda: resilient_db.Policy(instances=0), "Policy.instances"),
        (lambda: resilient_db.Policy(pool=3), "Policy.pool"),  # type: ignore[arg-type]
        (lambda: resilient_db.Policy(validate="sometimes"), "Policy.validate"),  # type: ignore[arg-type]
    ],
)
def test_nonsensical_policies_name_the_field(build: object, field: str) -> None:
    """Negative or zero timeouts, pool_size < 1 and wrong types raise ConfigurationError."""
    with pytest.raises(resilient_db.ConfigurationError) as info:
        build()  # type: ignore[operator]
    assert field == info.value.field
    assert info.value.fix  # every error says what to do


@pytest.mark.parametrize("make", [resilient_db.create_engine, resilient_db.create_async_engine])
def test_bad_validate_mode_is_refused_before_any_engine_exists(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """validate='sometimes' raises before an engine is built or a host is asked for its role."""
    built: list[object] = []
    monkeypatch.setattr(sa, "create_engine", lambda *a, **k: built.append(a))
    monkeypatch.setattr(aio, "_sa_create_async_engine", lambda *a, **k: built.append(a))
    driver = "asyncpg" if make is resilient_db.create_async_engine else "psycopg"
    url = f"postgresql+{driver}://u@db1:5432/app"
    with pytest.raises(resilient_db.ConfigurationError) as info:
        make(url, hosts=["db1:5432", "db2:5432"], validate="sometimes")
    assert ("validate", []) == (info.value.field, built)


def test_policy_argument_type_checked(sqlite_url: str) -> None:
    """Passing something that is not a Policy is a ConfigurationError."""
    with pytest.raises(resilient_db.ConfigurationError) as info:
        resilient_db.create_engine(sqlite_url, policy={"pool": 1}, validate="off")  # type: ignore[arg-type]
    assert "policy" == info.value.field


def test_unknown_sqlalchemy_kwarg_is_a_configuration_error(sqlite_url: str) -> None:
    """A misspelt SQLAlchemy argument does not escape as a bare TypeError."""
    with pytest.raises(resilient_db.ConfigurationError):
        resilient_db.create_engine(sqlite_url, validate="off", pool_sizee=3)


def test_from_env_reads_grouped_and_top_level_settings() -> None:
    """Policy.from_env maps RESILIENT_DB_<GROUP>_<FIELD> and top-level names."""
    env = {
        "RESILIENT_DB_TIMEOUTS_CONNECT": "3",
        "RESILIENT_DB_POOL_SIZE": "7",
        "RESILIENT_DB_POOL_MAX_WAITERS": "none",
        "RESILIENT_DB_BREAKER_ENABLED": "false",
        "RESILIENT_DB_INSTANCES": "4",
        "UNRELATED": "x",
    }
    policy = resilient_db.Policy.from_env(env)
    assert 3.0 == policy.timeouts.connect
    assert 7 == policy.pool.size
    assert policy.pool.max_waiters is None
    assert policy.breaker.enabled is False
    assert 4 == policy.instances


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"RESILIENT_DB_POOL_SIZ": "3"}, "RESILIENT_DB_POOL_SIZ"),
        ({"RESILIENT_DB_NOPE": "3"}, "RESILIENT_DB_NOPE"),
        ({"RESILIENT_DB_POOL_SIZE": "many"}, "RESILIENT_DB_POOL_SIZE"),
        ({"RESILIENT_DB_TIMEOUTS_CONNECT": "-2"}, "RESILIENT_DB_TIMEOUTS_CONNECT"),
    ],
)
def test_from_env_rejects_unknown_and_bad_values(env: dict[str, str], field: str) -> None:
    """Unknown keys and unparsable values in the environment name the variable."""
    with pytest.raises(resilient_db.ConfigurationError) as info:
        resilient_db.Policy.from_env(env)
    assert field == info.value.field


def test_errors_pickle_with_their_context() -> None:
    """resilient_db exceptions survive pickling with their context."""
    ctx = resilient_db.ErrorContext(engine="e", kind="circuit_open", diagnosis="open")
    for exc in (
        resilient_db.CircuitOpenError("open", ctx),
        resilient_db.PoolExhaustedError("full", ctx),
        resilient_db.AmbiguousCommitError("lost", ctx),
    ):
        clone = pickle.loads(pickle.dumps(exc))
        assert (type(exc), str(exc), ctx) == (type(clone), str(clone), clone.context)
    cfg = pickle.loads(pickle.dumps(resilient_db.ConfigurationError("f", "bad.", "fix it")))
    assert ("f", "f: bad. Fix: fix it") == (cfg.field, str(cfg))


def test_exception_tree_keeps_sqlalchemy_types() -> None:
    """New exceptions are also the SQLAlchemy exceptions users already catch."""
    assert issubclass(resilient_db.CircuitOpenError, sa.exc.OperationalError)
    assert issubclass(resilient_db.AmbiguousCommitError, sa.exc.OperationalError)
    assert issubclass(resilient_db.PoolExhaustedError, sa.exc.TimeoutError)
    assert issubclass(resilient_db.ConfigurationError, sa.exc.ArgumentError)


def test_refused_connect_carries_context_and_note(
    dispose: Callable[[sa.Engine], sa.Engine],
) -> None:
    """A refused connection keeps its SQLAlchemy type and gains context and a note."""
    engine = dispose(
        resilient_db.create_engine(
            "postgresql+psycopg://app@127.0.0.1:1/shop", name="shop", validate="off"
        )
    )
    with pytest.raises(sa.exc.OperationalError) as info:
        engine.connect()
    ctx = resilient_db.error_context(info.value)
    assert ctx is not None
    assert ("shop", "127.0.0.1", 1, "shop", "app", "connect", "refused") == (
        ctx.engine,
        ctx.host,
        ctx.port,
        ctx.database,
        ctx.user,
        ctx.phase,
        ctx.kind,
    )
    assert 3 == ctx.attempt  # the default policy's attempts
    assert ("refused",) * 3 == ctx.history
    if sys.version_info >= (3, 11):
        assert any("Nothing is accepting connections" in n for n in info.value.__notes__)


def _isort_key(name: str) -> tuple[int, str]:
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_public_api_is_sorted_and_importable() -> None:
    """__all__ is sorted (constants, classes, functions) and every name in it exists."""
    assert sorted(resilient_db.__all__, key=_isort_key) == resilient_db.__all__
    assert len(set(resilient_db.__all__)) == len(resilient_db.__all__)
    for name in resilient_db.__all__:
        assert hasattr(resilient_db, name), name


def test_rejection_is_rendered_on_first_access(sqlite_url: str) -> None:
    """A rejected checkout builds its message and context only when someone reads them."""
    clock = ManualClock()
    engine = resilient_db.create_engine(sqlite_url, name="lazy", validate="off", clock=clock)
    r = resilience_of(engine)
    b = resilient_db.breaker_of(engine)
    for _ in range(b.policy.failure_threshold):
        b.record_failure("db down")
    built: list[str] = []
    context = r.context

    def counted(*args: Any, **kwargs: Any) -> resilient_db.ErrorContext:
        built.append(kwargs["phase"])
        return context(*args, **kwargs)

    r.context = counted  # type: ignore[method-assign]
    clock.advance(1.0)
    errors = []
    for _ in range(100):
        try:
            engine.connect()
        except resilient_db.CircuitOpenError as e:
            errors.append(e)
    assert (100, []) == (len(errors), built)
    clock.advance(3.0)  # rendered later: the values are those of the rejection
    e = errors[-1]
    found = resilient_db.error_context(e)
    assert found is not None
    diagnosis = found.diagnosis
    assert diagnosis.endswith("Next probe in 4.00s. Last failure: db down")
    ctx = e.context
    assert ctx is not None
    assert ("circuit_open", "checkout", "open", 4.0) == (
        ctx.kind,
        ctx.phase,
        ctx.breaker_state,
        ctx.retry_in,
    )
    where = r.target.where
    assert f"Circuit breaker 'lazy' is open: not connecting to {where}. {diagnosis}" == str(e)
    assert [f"resilient_db: [circuit_open] {diagnosis}"] == e.__notes__
    assert ["checkout"] == built
    clone = pickle.loads(pickle.dumps(errors[0]))
    assert (str(errors[0]), errors[0].context) == (str(clone), clone.context)
    assert (None, None) == (errors[1].statement, errors[1].params)
    assert str(errors[1]) in str(errors[1].orig)
    engine.dispose()


def test_wrapping_twice_is_refused(sqlite_url: str) -> None:
    """A second wrap() of the same engine is a ConfigurationError, nothing attached twice."""
    engine = resilient_db.wrap(sa.create_engine(sqlite_url))
    with pytest.raises(resilient_db.ConfigurationError, match="already wrapped"):
        resilient_db.wrap(engine)
    with engine.connect() as conn:
        assert 1 == conn.execute(sa.text("SELECT 1")).scalar()
    engine.dispose()
