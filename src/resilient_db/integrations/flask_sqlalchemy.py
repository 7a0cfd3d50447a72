"""Flask-SQLAlchemy 3.1: engines with ``create_engine``'s settings and resilience.

Flask-SQLAlchemy builds its engines itself. :func:`init_app` replaces
``db.init_app(app)``: it puts :func:`resilient_db.engine_options` (bounded pool,
checkout timeout, recycle, driver connect/read/statement timeouts, hidden bind
parameters) under the app's own ``SQLALCHEMY_ENGINE_OPTIONS`` and per-bind
options (which win), lets Flask-SQLAlchemy build the engines, then
:func:`resilient_db.wrap` s each one (breaker, retries, call deadline, classified
errors, telemetry) and runs the startup checks. Public API of both libraries only::

    db = SQLAlchemy(model_class=Base)

    def create_app():
        app = Flask(__name__)
        app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["DATABASE_URL"]
        init_app(db, app, policy=resilient_db.Policy.from_env())
        return app
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine

from ..config import Policy, ValidateMode
from ..engine import _check_policy, _startup_validate, engine_options, wrap

__all__ = ["init_app"]


def init_app(
    db: Any,
    app: Any,
    *,
    policy: Policy | None = None,
    validate: ValidateMode | None = None,
    name: str | None = None,
) -> dict[str | None, Engine]:
    """``db.init_app(app)`` with resilient engines; returns them by bind key.

    ``name`` names the default engine (binds are named ``name:bind``; default:
    ``dialect:host/database``). ``validate`` as for :func:`resilient_db.create_engine`.
    """
    policy = _check_policy(policy)
    config = app.config
    uri = config.get("SQLALCHEMY_DATABASE_URI")
    if uri is not None:
        config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options(
            uri, policy, **dict(config.get("SQLALCHEMY_ENGINE_OPTIONS") or {})
        )
    binds = dict(config.get("SQLALCHEMY_BINDS") or {})
    for key, value in binds.items():
        options = {"url": value} if not isinstance(value, dict) else dict(value)
        url = options.pop("url")
        binds[key] = {"url": url, **engine_options(url, policy, **options)}
    if binds:
        config["SQLALCHEMY_BINDS"] = binds
    db.init_app(app)
    with app.app_context():
        engines: dict[str | None, Engine] = dict(db.engines)
    for key, engine in engines.items():
        label = name if key is None else (f"{name}:{key}" if name else None)
        wrap(engine, name=label, policy=policy)
        _startup_validate(engine, policy, validate)
    return engines
