"""Bind values echoed by the server never reach the exception's str() or repr()."""

from __future__ import annotations

import logging
import traceback
import uuid

import pytest
import sqlalchemy as sa

import resilient_db
from tests.conftest import SENTINEL


def _texts(exc: BaseException) -> str:
    chain = []
    e: BaseException | None = exc
    while e is not None:
        chain += [str(e), repr(e), *getattr(e, "__notes__", ())]
        e = e.__cause__ or e.__context__
    ctx = resilient_db.error_context(exc)
    chain.append(repr(ctx.to_dict()) if ctx else "")
    chain.append("".join(traceback.format_exception(exc)))
    return "\n".join(chain)


def test_cast_error_redacts_the_bind_value(pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL quotes a bad integer literal; the sentinel is redacted."""
    engine = resilient_db.create_engine(pg_url, validate="off")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(sa.exc.DataError) as info, engine.connect() as conn:
        conn.execute(sa.text("SELECT CAST(:v AS integer)"), {"v": SENTINEL})
    text = _texts(info.value)
    assert SENTINEL not in text
    assert "[redacted]" in str(info.value)
    assert SENTINEL not in caplog.text


def test_unique_violation_redacts_the_key(server_url: str) -> None:
    """Unique violations quote the duplicate key on both servers; it is redacted."""
    engine = resilient_db.create_engine(server_url, validate="off")
    table = f"rdb_secret_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {table} (email VARCHAR(100) PRIMARY KEY)"))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"INSERT INTO {table} VALUES (:e)"), {"e": SENTINEL})
        with pytest.raises(sa.exc.IntegrityError) as info, engine.begin() as conn:
            conn.execute(sa.text(f"INSERT INTO {table} VALUES (:e)"), {"e": SENTINEL})
        assert SENTINEL not in _texts(info.value)
        ctx = resilient_db.error_context(info.value)
        assert ctx is not None
        assert "application" == ctx.kind
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE {table}"))
        engine.dispose()


def test_unique_violation_redacts_a_uuid_key(pg_url: str) -> None:
    """A duplicate UUID key quoted in PostgreSQL's DETAIL is redacted like a string."""
    engine = resilient_db.create_engine(pg_url, validate="off")
    table = f"rdb_secret_{uuid.uuid4().hex[:8]}"
    key = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {table} (id UUID PRIMARY KEY)"))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"INSERT INTO {table} VALUES (:k)"), {"k": key})
        with pytest.raises(sa.exc.IntegrityError) as info, engine.begin() as conn:
            conn.execute(sa.text(f"INSERT INTO {table} VALUES (:k)"), {"k": key})
        assert (False, True) == (str(key) in _texts(info.value), "[redacted]" in str(info.value))
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE {table}"))
        engine.dispose()
