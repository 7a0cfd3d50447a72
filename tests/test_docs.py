"""Every ```python block of README.md and docs/*.md runs, as written, against the test servers.

Each block runs on its own (complete imports, no undefined names) in a fresh
interpreter (a subprocess, so global state such as OpenTelemetry's providers
stays out of the test process). Placeholder database URLs in a block are
pointed at the throw-away servers: a ``postgresql+DRIVER://...`` or
``mysql+DRIVER://...`` literal keeps its driver and query string and gets the
server's user, host, port and database; the placeholder hosts ``db``,
``db.internal`` and ``db1`` are the live server and ``db2``/``db3`` ports where
nothing listens (failover examples). ``DATABASE_URL`` (PostgreSQL, psycopg)
and ``REDIS_URL`` are set for blocks that read them. An HTML comment on the
line before a block, ``<!-- docs-test: requires MODULE -->``, runs it only
where MODULE is installed (it is still compiled).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.servers import MariaServer, PgServer, free_port

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(
    r"^(?:<!-- docs-test: (?P<marker>[^>]*) -->\n)?```python\n(?P<code>.*?)^```", re.S | re.M
)
_URL = re.compile(r"\b(?P<scheme>postgresql|mysql|mariadb)\+(?P<driver>\w+)://(?P<rest>[^\"'\s]*)")
_HOST = re.compile(r"\b(?P<host>db\.internal|db[1-3]?)(?::(?P<port>\d+))?\b(?![.\w-])")


@dataclass(frozen=True)
class Block:
    """One ```python block: where it is, its marker comment and its code."""

    path: Path
    line: int
    marker: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    """Every ```python block of the README and the docs, in order."""
    found = []
    for path in FILES:
        text = path.read_text(encoding="utf-8")
        for m in _BLOCK.finditer(text):
            line = text[: m.start("code")].count("\n")
            found.append(Block(path, line, (m.group("marker") or "").strip(), m.group("code")))
    return found


def _point_at(code: str, pg: PgServer, maria: MariaServer, dead: int) -> str:
    """``code`` with its placeholder URLs and hosts pointed at the test servers."""

    def live(scheme: str) -> tuple[str, int]:
        server: PgServer | MariaServer = pg if scheme == "postgresql" else maria
        return server.host, server.port

    def url(m: re.Match[str]) -> str:
        scheme, driver, rest = m.group("scheme"), m.group("driver"), m.group("rest")
        _, _, query = rest.partition("?")
        base = (
            pg.url(driver=driver)
            if scheme == "postgresql"
            else maria.url(driver=driver).replace("mysql+", f"{scheme}+")
        )
        if "@/" in rest:  # libpq-style ?host= list: keep it, hosts are replaced below
            u = sa.make_url(base)._replace(host=None, port=None)
            base = u.render_as_string(hide_password=False)
        host, port = live(scheme)
        query = _HOST.sub(lambda h: _host(h, host, port, dead), query)
        return base + (f"?{query}" if query else "")

    code = _URL.sub(url, code)
    host, port = live("postgresql")
    return re.sub(r"\"(db[1-3]?):\d+\"", lambda h: f'"{_host(h, host, port, dead)}"', code)


def _host(m: re.Match[str], host: str, port: int, dead: int) -> str:
    name = m.group(1)
    if name in ("db", "db.internal", "db1"):
        return f"{host}:{port}"
    return f"127.0.0.{name[-1]}:{dead}"  # db2, db3: distinct loopback hosts, nothing listens


@pytest.mark.postgres
@pytest.mark.parametrize("block", blocks(), ids=lambda b: b.id)
def test_docs_block_runs(
    block: Block,
    throwaway_pg: PgServer,
    throwaway_mariadb: MariaServer,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """The block runs without an error against the test servers."""
    if block.marker.startswith("requires "):
        module = block.marker.split()[1]
        if importlib.util.find_spec(module) is None:
            compile(block.code, block.id, "exec")  # at least valid Python
            pytest.skip(f"{block.id} needs {module}, which is not installed")
    env = {
        **os.environ,
        "DATABASE_URL": throwaway_pg.url(),
        "REDIS_URL": redis_url,
        "PYTHONPATH": str(ROOT / "src"),
    }
    code = _point_at(block.code, throwaway_pg, throwaway_mariadb, free_port())
    argv = [sys.executable, "-c", code]
    if block.marker == "alembic env.py":
        argv = _alembic_project(tmp_path, code, throwaway_pg.url())
        env["RESILIENT_DB_TIMEOUTS_CALL"] = "1"  # the migration takes longer than this
    done = subprocess.run(
        argv,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert 0 == done.returncode, f"{block.id} failed:\n{done.stderr[-3000:]}"


def _alembic_project(root: Path, env_py: str, url: str) -> list[str]:
    """An Alembic project whose env.py is the block, with one 1.5 s migration."""
    (root / "migrations" / "versions").mkdir(parents=True)
    (root / "migrations" / "env.py").write_text(env_py)
    (root / "migrations" / "script.py.mako").write_text("")
    (root / "migrations" / "versions" / "0001_slow.py").write_text(
        'revision = "0001"\ndown_revision = None\n'
        "from alembic import op\n\n\n"
        "def upgrade():\n"
        '    op.execute("SELECT pg_sleep(1.5)")  # a long CREATE INDEX\n'
    )
    ini = f"[alembic]\nscript_location = migrations\nsqlalchemy.url = {url}\n"
    (root / "alembic.ini").write_text(ini)
    return [sys.executable, "-m", "alembic", "upgrade", "head"]


def test_every_block_is_collected() -> None:
    """The extractor finds the blocks of the README and of several docs pages."""
    found = {b.path.name for b in blocks()}
    assert {"README.md", "configuration.md", "errors.md", "transactions.md"} <= found
