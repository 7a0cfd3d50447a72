"""A small Flask service on resilient_db: readiness, liveness, metrics, one resource.

Configuration comes from the environment only (12-factor):

- ``DATABASE_URL``: the SQLAlchemy URL, e.g. ``postgresql+psycopg://app:pw@db/app``;
- ``RESILIENT_DB_*``: the policy (``Policy.from_env()``), e.g.
  ``RESILIENT_DB_POOL_SIZE=10``, ``RESILIENT_DB_BREAKER_RESET_TIMEOUT=10``;
- ``SERVICE_NAME``: the engine's name in metrics and logs (default ``notes``).

Endpoints:

- ``GET /live``: the process is up. Never touches the database: a database
  outage must not make an orchestrator restart healthy processes.
- ``GET /ready``: ``resilient_db.health(engine, ping=True)``; 503 when the
  status is ``down`` (breaker open, or the ping failed), 200 otherwise, with
  the snapshot as JSON.
- ``GET /metrics``: Prometheus text from the OpenTelemetry Prometheus exporter
  (if ``opentelemetry-exporter-prometheus`` is installed).
- ``POST /notes`` ``{"text": ...}`` and ``GET /notes``: a unit of work run by
  ``resilient_db.run_transaction`` (replayed on deadlocks and lost
  connections).

Errors resilient_db raises become 503 with ``Retry-After`` (an open breaker
says when its next probe is due), never a stack trace.

Run it::

    DATABASE_URL=sqlite:///notes.db flask --app examples/flask_service/app.py run
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from flask import Flask, Response, jsonify, request

import resilient_db
from resilient_db import telemetry

#: Seconds a readiness ping may take (keep it below the orchestrator's probe timeout).
READY_TIMEOUT = 1.0

metadata = sa.MetaData()
notes = sa.Table(
    "notes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("text", sa.String(200), nullable=False),
)


def _prometheus(service: str) -> tuple[Any, Any] | None:
    """A MeterProvider exporting to a private Prometheus registry, if the exporter is installed.

    Its Resource names the service (``service.name``): without one every series says
    ``service_name="unknown_service:python3"``.
    """
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource
        from prometheus_client import CollectorRegistry
    except ImportError:
        return None
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry)
    resource = Resource.create({"service.name": service})
    return MeterProvider(resource=resource, metric_readers=[reader]), registry


def create_app(environ: Mapping[str, str] | None = None) -> Flask:
    """Build the service: engine from DATABASE_URL and Policy.from_env(), metrics, routes."""
    env = os.environ if environ is None else environ
    policy = resilient_db.Policy.from_env(
        {k: v for k, v in env.items() if k.startswith("RESILIENT_DB_")}
    )
    service = env.get("SERVICE_NAME", "notes")
    engine = resilient_db.create_engine(env["DATABASE_URL"], name=service, policy=policy)
    prom = _prometheus(service)
    if prom is not None:
        telemetry.instrument(engine, meter_provider=prom[0])

    app = Flask(__name__)
    app.extensions["resilient_db.engine"] = engine
    try:
        metadata.create_all(engine)  # a real service runs migrations instead
    except sa.exc.OperationalError as e:
        app.logger.warning("notes table not created: %s", resilient_db.error_context(e))

    @app.get("/live")
    def live() -> Response:
        return jsonify(status="alive")

    @app.get("/ready")
    def ready() -> tuple[Response, int]:
        snap = resilient_db.health(engine, ping=True, timeout=READY_TIMEOUT)
        return jsonify(snap.to_dict()), 503 if snap.status == "down" else 200

    @app.get("/metrics")
    def metrics() -> Response:
        if prom is None:
            return Response("opentelemetry-exporter-prometheus is not installed\n", 501)
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(prom[1]), mimetype=CONTENT_TYPE_LATEST)

    @app.post("/notes")
    def add_note() -> tuple[Response, int]:
        text = str((request.get_json(silent=True) or {}).get("text", ""))[:200]
        if not text:
            return jsonify(error="text is required"), 400

        def insert(conn: sa.Connection) -> int:
            key = conn.execute(notes.insert().values(text=text)).inserted_primary_key
            assert key is not None
            return int(key[0])

        return jsonify(id=resilient_db.run_transaction(engine, insert)), 201

    @app.get("/notes")
    def list_notes() -> Response:
        def read(conn: sa.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(sa.select(notes).order_by(notes.c.id)).mappings()
            return [dict(r) for r in rows]

        return jsonify(notes=resilient_db.run_transaction(engine, read, read_only=True))

    @app.errorhandler(resilient_db.ResilientDBError)
    def unavailable(e: resilient_db.ResilientDBError) -> tuple[Response, int, dict[str, str]]:
        return _unavailable(e)

    @app.errorhandler(sa.exc.OperationalError)
    def db_error(e: sa.exc.OperationalError) -> tuple[Response, int, dict[str, str]]:
        return _unavailable(e)

    return app


def _unavailable(e: BaseException) -> tuple[Response, int, dict[str, str]]:
    """503 with the diagnosis (no password or parameter: ErrorContext never has one)."""
    ctx = resilient_db.error_context(e)
    retry_in = ctx.retry_in if ctx is not None and ctx.retry_in is not None else 1.0
    body = {
        "error": ctx.kind if ctx is not None else "database_unavailable",
        "diagnosis": ctx.diagnosis if ctx is not None else "The database is unavailable.",
    }
    return jsonify(body), 503, {"Retry-After": str(max(1, math.ceil(retry_in)))}


if __name__ == "__main__":  # pragma: no cover - manual run
    create_app().run()
