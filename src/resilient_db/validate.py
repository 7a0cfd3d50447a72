"""Startup validation (filled in by the validation work)."""

from __future__ import annotations

from sqlalchemy.engine import Engine

__all__ = ["startup_check"]


def startup_check(engine: Engine, *, strict: bool) -> None:
    """Run the startup checks for ``engine``."""
    return None
