"""Glue for the frameworks services already run on: one small module each.

Each module imports its framework, so import only the one you use:

- :mod:`resilient_db.integrations.http`: ``unavailable(exc)``, the 503 response
  (status, JSON body with the diagnosis, ``Retry-After``) for any web framework;
- :mod:`resilient_db.integrations.flask_sqlalchemy`: ``init_app(db, app, policy=)``
  gives Flask-SQLAlchemy's engines ``create_engine``'s settings and resilience;
- :mod:`resilient_db.integrations.fastapi`: ``add_exception_handlers(app)``;
- :mod:`resilient_db.integrations.celery`: ``DatabaseTask``, whose database errors
  reach the caller through the result backend with their context.

Recipes and their tests: docs/integrations.md.
"""
