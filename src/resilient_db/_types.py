"""Type aliases shared by the public API."""

from __future__ import annotations

from typing import TypeAlias

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["EngineLike"]

#: What the engine-taking functions (``policy_of``, ``health``, ``instrument``...) accept:
#: a resilient_db engine, or a connection of one, sync or async.
EngineLike: TypeAlias = Engine | Connection | AsyncEngine | AsyncConnection
