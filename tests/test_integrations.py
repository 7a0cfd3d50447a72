"""The recipes of docs/integrations.md, run for real against PostgreSQL and a FaultProxy.

gunicorn (``--preload``, 2 workers, threads) serving Flask-SQLAlchemy; uvicorn with
2 workers serving FastAPI + SQLModel on asyncpg; a Celery prefork worker with the
Redis result backend. Each runs the outage drill of tests/outage.py.
"""

from __future__ import annotations

import importlib
import json
import pickle
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa

import resilient_db
from resilient_db import ErrorContext, PortableOperationalError
from resilient_db.engine import resilience_of
from tests.outage import (
    EXAMPLES,
    POLICY_ENV,
    Answer,
    drill,
    free_port,
    proxied,
    python,
    server,
)

pytest.importorskip("flask_sqlalchemy")
pytest.importorskip("fastapi")
pytest.importorskip("sqlmodel")
pytest.importorskip("gunicorn")
pytest.importorskip("uvicorn")
pytest.importorskip("celery")


def http(url: str) -> Callable[[], Answer]:
    """A call of ``url`` as an Answer: 200, or the 503's kind and diagnosis."""

    def call() -> Answer:
        try:
            with urllib.request.urlopen(url, timeout=15) as r:
                return Answer(ok=r.status == 200, detail=json.loads(r.read()))
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
            ok = False
            if e.code != 503 or "Retry-After" not in e.headers:
                return Answer(ok=ok, detail=(e.code, body))
            return Answer(ok=ok, kind=body.get("error"), diagnosis=body.get("diagnosis"))

    return call


def answers(url: str) -> Callable[[], bool]:
    """True once ``url`` answers 200."""

    def ready() -> bool:
        try:
            return http(url)().ok
        except OSError:
            return False

    return ready


@contextmanager
def gunicorn(url: str, *options: str) -> Iterator[str]:
    """gunicorn --preload with 2 workers serving the Flask-SQLAlchemy example; its base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv = [python(), "-m", "gunicorn", "--preload", "--workers", "2", *options]
    argv += ["--bind", f"127.0.0.1:{port}", "flask_sqlalchemy_app:create_app()"]
    with server(argv, {"DATABASE_URL": url, **POLICY_ENV}, answers(f"{base}/live")):
        yield base


def test_flask_sqlalchemy_engines_get_create_engine_settings(pg_url: str) -> None:
    """init_app: Flask-SQLAlchemy builds the engine with the policy's pool and connect_args."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        module = importlib.import_module("flask_sqlalchemy_app")
    finally:
        sys.path.remove(str(EXAMPLES))
    app = module.create_app({"DATABASE_URL": pg_url, "RESILIENT_DB_TIMEOUTS_CHECKOUT": "3"})
    with app.app_context():
        engine = module.db.engine
        with engine.connect() as conn:
            params = conn.connection.dbapi_connection.info.get_parameters()
        policy = resilient_db.policy_of(engine)
        facts = (engine.pool.timeout(), engine.pool.size(), engine.hide_parameters)
        assert (3.0, policy.pool.size, True) == facts
        assert ("2", "orders") == (params.get("connect_timeout"), engine.pool._rdb.name)
        engine.dispose()


def test_flask_sqlalchemy_binds_are_resilient_too(pg_url: str) -> None:
    """Every bind of SQLALCHEMY_BINDS gets the policy's pool, its own name and resilience."""
    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy

    from resilient_db.integrations.flask_sqlalchemy import init_app

    app, db = Flask(__name__), SQLAlchemy()
    app.config.update(
        SQLALCHEMY_DATABASE_URI=pg_url,
        SQLALCHEMY_BINDS={"reports": pg_url, "audit": {"url": pg_url, "pool_size": 2}},
    )
    policy = resilient_db.Policy(timeouts=resilient_db.Timeouts(checkout=4), validate="off")
    engines = init_app(db, app, policy=policy, name="shop")
    try:
        seen = {
            key: (resilience_of(e).name, e.pool.size(), e.pool.timeout())
            for key, e in engines.items()
        }
        assert {
            None: ("shop", 5, 4.0),
            "reports": ("shop:reports", 5, 4.0),
            "audit": ("shop:audit", 2, 4.0),
        } == seen
    finally:
        for e in engines.values():
            e.dispose()


def test_gunicorn_preload_workers_never_share_a_connection(pg_url: str) -> None:
    """Each forked worker uses its own backend; the master's pooled connection is not shared."""
    backends: dict[int, set[int]] = {}
    with proxied(pg_url) as (_, url), gunicorn(url) as base, ThreadPoolExecutor(2) as pool:
        for _ in range(5):  # sync workers serve one request at a time: two held at once
            seen = list(pool.map(lambda _: http(f"{base}/db?hold=0.3")(), range(2)))
            assert [True, True] == [a.ok for a in seen], seen
            for a in seen:
                backends.setdefault(a.detail["worker"], set()).add(a.detail["backend_pid"])
            if len(backends) == 2:
                break
    first, second = backends.values()
    assert set() == first & second


@pytest.mark.slow  # a whole-service scenario: skipped by the SQLAlchemy 2.0 pass
def test_gunicorn_flask_sqlalchemy_outage(pg_url: str) -> None:
    """gunicorn --preload --threads 4 + Flask-SQLAlchemy: /live fast, explained 503s, back."""
    with proxied(pg_url) as (proxy, url), gunicorn(url, "--threads", "4") as base:
        drill(proxy, http(f"{base}/db"), http(f"{base}/live"))


@pytest.mark.slow  # a whole-service scenario: skipped by the SQLAlchemy 2.0 pass
def test_uvicorn_fastapi_sqlmodel_outage(pg_url: str) -> None:
    """uvicorn --workers 2, FastAPI lifespan + SQLModel on asyncpg: the same drill."""
    async_url = sa.make_url(pg_url).set(drivername="postgresql+asyncpg")
    with proxied(async_url.render_as_string(False)) as (proxy, url):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        argv = [python(), "-m", "uvicorn", "--workers", "2", "--port", str(port)]
        argv += ["--log-level", "warning", "fastapi_sqlmodel_app:app"]
        with server(argv, {"DATABASE_URL": url, **POLICY_ENV}, answers(f"{base}/live")):
            assert answers(f"{base}/db")()
            drill(proxy, http(f"{base}/db"), http(f"{base}/live"))


def test_portable_errors_rebuild_from_json_and_pickle() -> None:
    """A database error with its context is rebuilt from type(*args) and from pickle."""
    ctx = ErrorContext(engine="jobs", kind="disconnect", diagnosis="lost", extra=(("n", 1),))
    plain = sa.exc.OperationalError("SELECT 1", None, Exception("server closed"))
    resilient_db.errors.attach(plain, ctx)
    for exc in (
        resilient_db.portable_error(plain),
        resilient_db.CircuitOpenError("open", ctx),
        resilient_db.PoolExhaustedError("full", ctx),
    ):
        rebuilt = type(exc)(*json.loads(json.dumps(exc.args)))
        unpickled = pickle.loads(pickle.dumps(exc))
        assert (str(exc), ctx) == (str(rebuilt), resilient_db.error_context(rebuilt))
        assert (str(exc), ctx) == (str(unpickled), resilient_db.error_context(unpickled))
    assert isinstance(resilient_db.portable_error(plain), PortableOperationalError)
    cfg = resilient_db.ConfigurationError("pool.size", "must be positive.", "Use 5.")
    assert str(cfg) == str(type(cfg)(*json.loads(json.dumps(cfg.args))))


@pytest.fixture
def celery_app(
    pg_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ModuleType, Any]]:
    """The Celery example, imported as a producer, and a prefork worker through a FaultProxy."""
    queue = f"rdb-test-{free_port()}"
    with proxied(pg_url) as (proxy, url):
        env = {"DATABASE_URL": url, "CELERY_BROKER": redis_url, "CELERY_QUEUE": queue}
        for k, v in {**env, **POLICY_ENV}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.syspath_prepend(str(EXAMPLES))
        sys.modules.pop("celery_app", None)
        module = importlib.import_module("celery_app")
        assert module._engine is None  # importing the tasks did no database work

        def ready() -> bool:  # both prefork children answer: their start-up is over
            try:
                calls = [module.ping.delay() for _ in range(6)]
                return 2 == len({c.get(timeout=2) for c in calls})
            except Exception:
                return False

        argv = [python(), "-m", "celery", "-A", "celery_app", "worker", "--pool", "prefork"]
        argv += ["--concurrency", "2", "--loglevel", "warning", "--without-gossip"]
        argv += ["--without-mingle", "--without-heartbeat"]
        try:
            with server(argv, {**env, **POLICY_ENV}, ready, stop=signal.SIGQUIT):  # cold stop
                yield module, proxy
        finally:
            sys.modules.pop("celery_app", None)


def task(result: Callable[[], Any]) -> Callable[[], Answer]:
    """A Celery task call as an Answer: its value, or the rebuilt error's context."""

    def call() -> Answer:
        pending = result()
        deadline = time.monotonic() + 30  # a loaded CI machine runs prefork workers slowly
        while not pending.ready():  # polls the backend: its pub/sub reader is one thread's
            assert time.monotonic() < deadline, "the task did not finish"
            time.sleep(0.01)
        try:
            return Answer(ok=True, detail=pending.get(timeout=1))
        except sa.exc.OperationalError as e:  # the rebuilt error is still one
            ctx = resilient_db.error_context(e)
            assert ctx is not None, f"{type(e).__name__} lost its context: {e}"
            return Answer(ok=False, kind=ctx.kind, diagnosis=ctx.diagnosis, detail=e)

    return call


@pytest.mark.slow  # a whole-service scenario: skipped by the SQLAlchemy 2.0 pass
def test_celery_errors_cross_the_result_backend_with_context(
    celery_app: tuple[ModuleType, Any],
) -> None:
    """Celery prefork + Redis backend: the drill, with errors rebuilt with their context."""
    module, proxy = celery_app
    assert isinstance(task(module.backend_pid.delay)().detail, int)
    drill(proxy, task(module.backend_pid.delay), task(module.ping.delay))
