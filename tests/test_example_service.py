"""The Flask example service (examples/flask_service/app.py) with Flask's test client."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from resilient_db.testing import FaultInjector

pytest.importorskip("flask")

APP = Path(__file__).resolve().parents[1] / "examples" / "flask_service" / "app.py"


def load_app_module() -> ModuleType:
    """Import the example by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("flask_service_app", APP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def app(sqlite_url: str) -> Any:
    """The service on a fresh SQLite file, configured from an environment mapping."""
    environ = {
        "DATABASE_URL": sqlite_url,
        "SERVICE_NAME": "notes-test",
        "RESILIENT_DB_POOL_SIZE": "3",
        "RESILIENT_DB_BREAKER_FAILURE_THRESHOLD": "1",
        "RESILIENT_DB_BREAKER_RESET_TIMEOUT": "30",
        "RESILIENT_DB_RETRY_ATTEMPTS": "1",
        "RESILIENT_DB_VALIDATE": "off",
    }
    application = load_app_module().create_app(environ)
    yield application
    application.extensions["resilient_db.engine"].dispose()


def test_live(app: Any) -> None:
    """/live answers without touching the database."""
    r = app.test_client().get("/live")
    assert (200, {"status": "alive"}) == (r.status_code, r.get_json())


def test_ready_reports_health(app: Any) -> None:
    """/ready: 200 with the health snapshot; the policy came from the environment."""
    r = app.test_client().get("/ready")
    body = r.get_json()
    assert (200, "ok", True) == (r.status_code, body["status"], body["ping_ok"])
    assert ("notes-test", 3) == (body["engine"], body["pool"]["size"])


def test_notes_round_trip(app: Any) -> None:
    """POST then GET /notes through run_transaction."""
    client = app.test_client()
    created = client.post("/notes", json={"text": "hello"})
    assert (201, {"id": 1}) == (created.status_code, created.get_json())
    assert {"notes": [{"id": 1, "text": "hello"}]} == client.get("/notes").get_json()
    assert 400 == client.post("/notes", json={}).status_code


def test_metrics_endpoint(app: Any) -> None:
    """/metrics serves the exporter's Prometheus names for the engine."""
    pytest.importorskip("opentelemetry.exporter.prometheus")
    client = app.test_client()
    client.get("/notes")
    r = client.get("/metrics")
    text = r.get_data(as_text=True)
    assert 200 == r.status_code
    for series in (
        'db_client_connection_count{db_client_connection_pool_name="notes-test",'
        'db_client_connection_state="idle"',
        'resilient_db_breaker_state{db_client_connection_pool_name="notes-test"',
        "db_client_operation_duration_seconds_bucket{",
        "db_client_connection_create_time_seconds_count{",
        'service_name="notes-test"',  # target_info: the Resource names the service
    ):
        assert series in text, series


def test_database_down(app: Any) -> None:
    """Refused connects: /ready 503 down, requests 503 with Retry-After, /live still 200."""
    engine = app.extensions["resilient_db.engine"]
    engine.dispose()  # drop the pooled connection so the next request must connect
    FaultInjector(engine).fail_connects(None, lambda: ConnectionRefusedError(111, "refused"))
    client = app.test_client()
    first = client.get("/notes")
    assert (503, "refused") == (first.status_code, first.get_json()["error"])
    rejected = client.post("/notes", json={"text": "x"})
    assert (503, "circuit_open") == (rejected.status_code, rejected.get_json()["error"])
    assert 1 <= int(rejected.headers["Retry-After"]) <= 30
    ready = client.get("/ready")
    assert (503, "down") == (ready.status_code, ready.get_json()["status"])
    assert 200 == client.get("/live").status_code
