"""Flask-SQLAlchemy 3.1 on resilient_db, served by gunicorn (threads, ``--preload``).

The engines are built by Flask-SQLAlchemy from ``resilient_db.engine_options()`` and
wrapped by ``resilient_db.integrations.flask_sqlalchemy.init_app`` (public API of both
libraries). Database failures become an explained 503; ``/live`` never touches the
database. Fork safety is built in: with ``--preload`` every worker gets its own pool.

Run it::

    DATABASE_URL=postgresql+psycopg://app@db/app \\
    gunicorn --preload --workers 2 --threads 4 --timeout 30 \\
        --chdir examples/integrations 'flask_sqlalchemy_app:create_app()'
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import sqlalchemy as sa
from flask import Flask, Response, jsonify, request
from flask_sqlalchemy import SQLAlchemy

import resilient_db
from resilient_db.integrations.flask_sqlalchemy import init_app
from resilient_db.integrations.http import UNAVAILABLE_ERRORS, unavailable

db = SQLAlchemy()


class Order(db.Model):  # type: ignore[name-defined,misc]
    """One table, created at startup (a real service runs migrations)."""

    __tablename__ = "example_orders"
    id = sa.Column(sa.Integer, primary_key=True)


def create_app(environ: Mapping[str, str] | None = None) -> Flask:
    """The application factory: configuration from the environment only."""
    env = os.environ if environ is None else environ
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = env["DATABASE_URL"]
    policy = resilient_db.Policy.from_env(
        {k: v for k, v in env.items() if k.startswith("RESILIENT_DB_")}
    )
    init_app(db, app, policy=policy, name=env.get("SERVICE_NAME", "orders"))
    with app.app_context():
        try:
            db.create_all()  # with --preload: in the master, before the workers fork
        except UNAVAILABLE_ERRORS as e:
            app.logger.warning("tables not created: %s", resilient_db.error_context(e))

    @app.get("/live")
    def live() -> Response:
        return jsonify(status="alive", worker=os.getpid())

    @app.get("/db")
    def backend() -> Response:
        """This worker's PostgreSQL backend pid; ``?hold=S`` keeps the connection S seconds."""
        hold = min(float(request.args.get("hold", 0)), 5.0)
        query = sa.text("SELECT pg_backend_pid() FROM pg_sleep(:hold)")
        pid = db.session.execute(query, {"hold": hold}).scalar_one()
        return jsonify(backend_pid=pid, worker=os.getpid())

    def database_unavailable(e: Exception) -> tuple[Response, int, dict[str, str]]:
        status, body, headers = unavailable(e)
        return jsonify(body), status, headers

    for cls in UNAVAILABLE_ERRORS:
        app.register_error_handler(cls, database_unavailable)
    return app
