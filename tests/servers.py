"""Throw-away PostgreSQL and MariaDB servers for the test suite.

Each server lives in its own temporary directory (data dir, socket, log, pid file) and
listens on a free port on 127.0.0.1, so tests can stop, kill, restart and reconfigure it
without ever touching the shared services on ports 5432 and 3306.

Both servers come with a password-protected application account so that authentication
failures are real:

* PostgreSQL: role ``app`` / ``app-secret`` owning database ``app``; ``postgres`` is a
  trusted superuser over 127.0.0.1, every other role must pass scram-sha-256.
* MariaDB: ``app``@``127.0.0.1`` and ``app``@``localhost`` / ``app-secret`` with ALL on
  ``test.*``; ``root`` has no password.

Use the session fixtures ``throwaway_pg`` and ``throwaway_mariadb`` (re-export them from
``tests/conftest.py``), or call :func:`start_postgres` / :func:`start_mariadb` directly and
``destroy()`` the result when done.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn
from urllib.parse import quote

import pytest

__all__ = [
    "APP_PASSWORD",
    "APP_USER",
    "MariaServer",
    "PgServer",
    "ServerUnavailable",
    "free_port",
    "skip_or_fail",
    "start_mariadb",
    "start_postgres",
    "throwaway_mariadb",
    "throwaway_pg",
]

APP_USER = "app"
APP_PASSWORD = "app-secret"
PG_APP_DATABASE = "app"
MARIA_APP_DATABASE = "test"

#: Non-root OS user that owns throw-away PostgreSQL clusters (initdb refuses to run as root).
PG_OS_USER = "rdbtest"
#: How long a server may take to accept TCP connections before we give up.
START_TIMEOUT = 30.0

MARIADB_INSTALL_DB = "/usr/bin/mariadb-install-db"
MARIADBD = "/usr/sbin/mariadbd"
MARIADB_CLIENT = "/usr/bin/mariadb"

_live_servers: list[PgServer | MariaServer] = []


class ServerUnavailable(RuntimeError):
    """The server binaries are not installed on this machine."""


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not path.exists():
        return "<no log>"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _is_root() -> bool:
    return os.geteuid() == 0


def _ensure_os_user(name: str) -> str:
    """Create the system user *name* if missing (only when root); return it."""
    try:
        pwd.getpwnam(name)
        return name
    except KeyError:
        pass
    proc = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        check=False,
    )
    try:  # another process may have created it concurrently
        pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(f"could not create OS user {name!r}: {proc.stderr.strip()}") from None
    return name


def _pg_bindir() -> Path:
    """Newest ``/usr/lib/postgresql/*/bin`` that has initdb, pg_ctl, postgres and psql."""

    def version(p: str) -> int:
        m = re.search(r"/postgresql/(\d+)", p)
        return int(m.group(1)) if m else 0

    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        bindir = Path(cand)
        if all((bindir / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres", "psql")):
            return bindir
    raise ServerUnavailable("PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin")


def _wait_for_port(host: str, port: int, deadline: float, alive: object = None) -> bool:
    """Poll until *host*:*port* accepts TCP connections or *deadline* passes.

    *alive* may be a :class:`subprocess.Popen`; polling stops early if it exits.
    """
    while time.monotonic() < deadline:
        if _port_open(host, port):
            return True
        if isinstance(alive, subprocess.Popen) and alive.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _sql_literal(value: object) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


def _cleanup_all() -> None:
    for server in list(_live_servers):
        with contextlib.suppress(Exception):
            server.destroy()


atexit.register(_cleanup_all)


# ------------------------------------------------------------------------ PostgreSQL


@dataclass
class PgServer:
    """A throw-away PostgreSQL cluster; ``postgres`` is a trusted superuser over TCP."""

    port: int
    datadir: Path
    host: str = "127.0.0.1"
    root: Path | None = None  # temp dir holding datadir, socket and log; removed by destroy()
    bindir: Path = field(default_factory=lambda: Path("/usr/lib/postgresql/15/bin"))
    os_user: str | None = None  # run pg_ctl as this user (via runuser) when we are root
    log_file: Path | None = None

    # -- connection helpers
    def url(
        self,
        user: str = "postgres",
        password: str | None = None,
        database: str = "postgres",
        driver: str | None = "psycopg",
    ) -> str:
        """SQLAlchemy URL, e.g. ``postgresql+psycopg://app:app-secret@127.0.0.1:5433/app``."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"{scheme}://{auth}@{self.host}:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run *sql* as superuser via psql over TCP; return stdout, raise on any error.

        The script is fed on stdin, so each statement runs in its own transaction
        (``ALTER SYSTEM`` and ``CREATE DATABASE`` work).
        """
        cmd = [
            str(self.bindir / "psql"),
            "-X", "-q", "-A", "-t",
            "-v", "ON_ERROR_STOP=1",
            "-h", self.host, "-p", str(self.port), "-U", "postgres", "-d", database,
            "-f", "-",
        ]  # fmt: skip
        env = {**os.environ, "PGCONNECT_TIMEOUT": "10"}
        env.pop("PGPASSWORD", None)
        proc = subprocess.run(
            cmd, input=sql, capture_output=True, text=True, env=env, check=False, timeout=60
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"psql failed ({proc.returncode}): {proc.stderr.strip()}\nSQL: {sql}"
            )
        return proc.stdout

    # -- lifecycle
    def _pg_ctl(
        self, *args: str, timeout: float = START_TIMEOUT + 10
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args]
        if self.os_user is not None:
            cmd = ["runuser", "-u", self.os_user, "--", *cmd]
        return subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=self.root or self.datadir,
            check=False,
            timeout=timeout,
        )

    def is_running(self) -> bool:
        """True if pg_ctl reports a live postmaster for this data dir."""
        return self._pg_ctl("status").returncode == 0

    def start(self) -> None:
        """Start the server and wait until it accepts TCP connections; no-op if running."""
        if self.is_running():
            return
        deadline = time.monotonic() + START_TIMEOUT
        proc = self._pg_ctl("-l", str(self.log_file), "-w", "-t", str(int(START_TIMEOUT)), "start")
        ok = proc.returncode == 0 and _wait_for_port(self.host, self.port, deadline)
        if not ok:
            raise RuntimeError(
                f"PostgreSQL on port {self.port} did not start: {proc.stdout}{proc.stderr}\n"
                f"--- log tail ({self.log_file}) ---\n{_tail(self.log_file)}"
            )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (*mode*: ``smart``, ``fast`` or ``immediate``); no-op if stopped."""
        if not self.is_running():
            return
        proc = self._pg_ctl("-m", mode, "-w", "-t", "60", "stop", timeout=90)
        if proc.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed: {proc.stdout}{proc.stderr}")

    def restart(self, mode: str = "fast") -> None:
        """Stop (with *mode*) and start again; picks up restart-only settings."""
        self.stop(mode)
        self.start()

    def set_config(self, **settings: object) -> None:
        """``ALTER SYSTEM SET`` each setting, then ``pg_reload_conf()``.

        Restart-only parameters (e.g. ``max_connections``) need a :meth:`restart` after.
        """
        stmts = [f"ALTER SYSTEM SET {name} = {_sql_literal(v)};" for name, v in settings.items()]
        self.psql("\n".join([*stmts, "SELECT pg_reload_conf();"]))

    def destroy(self) -> None:
        """Stop the server immediately and delete its temp directory."""
        try:
            with contextlib.suppress(Exception):
                self.stop("immediate")
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
            if self in _live_servers:
                _live_servers.remove(self)


_PG_HBA = """\
# throw-away cluster made by tests/servers.py
local all all                trust
host  all postgres 127.0.0.1/32 trust
host  all postgres ::1/128      trust
host  all all      127.0.0.1/32 scram-sha-256
host  all all      ::1/128      scram-sha-256
"""


def start_postgres(**server_settings: object) -> PgServer:
    """initdb + start a throw-away PostgreSQL cluster on a free port and create ``app``.

    *server_settings* (e.g. ``max_connections="6"``) are written to ``postgresql.conf``
    before the first start, so they apply from boot; a later :meth:`PgServer.set_config`
    (``postgresql.auto.conf``) still overrides them.
    Raises :class:`ServerUnavailable` if PostgreSQL is not installed and
    :class:`RuntimeError` (with the log tail) if it does not come up within 30 s.
    """
    bindir = _pg_bindir()
    os_user = _ensure_os_user(PG_OS_USER) if _is_root() else None
    root = Path(tempfile.mkdtemp(prefix="rdb-pg-"))
    try:
        if os_user is not None:
            pw = pwd.getpwnam(os_user)
            os.chown(root, pw.pw_uid, pw.pw_gid)
        root.chmod(0o755)
        datadir = root / "data"
        initdb = [
            str(bindir / "initdb"),
            "-D", str(datadir),
            "-U", "postgres",
            "--auth=trust",
            "-E", "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]  # fmt: skip
        if os_user is not None:
            initdb = ["runuser", "-u", os_user, "--", *initdb]
        proc = subprocess.run(
            initdb, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            cwd=root, check=False, timeout=120,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed: {proc.stdout}\n{proc.stderr}")
        (datadir / "pg_hba.conf").write_text(_PG_HBA)

        server = PgServer(
            port=0, datadir=datadir, root=root, bindir=bindir, os_user=os_user,
            log_file=root / "postgres.log",
        )  # fmt: skip
        base_conf = (datadir / "postgresql.conf").read_text()
        settings: dict[str, object] = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(root),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "16MB",
            "max_wal_size": "64MB",
            "log_min_messages": "warning",
            **server_settings,
        }
        last_error: Exception | None = None
        for _attempt in range(3):  # retry if another process grabs our free port
            server.port = free_port()
            conf = "\n".join(
                f"{k} = {_sql_literal(v)}" for k, v in {"port": server.port, **settings}.items()
            )
            (datadir / "postgresql.conf").write_text(f"{base_conf}\n# tests/servers.py\n{conf}\n")
            if server.log_file is not None and server.log_file.exists():
                server.log_file.unlink()
            if os_user is not None:  # the config files are ours (root) now; hand them back
                for name in ("pg_hba.conf", "postgresql.conf"):
                    shutil.chown(datadir / name, os_user, os_user)
            try:
                server.start()
                break
            except RuntimeError as exc:
                last_error = exc
                if "already in use" not in _tail(server.log_file, 200):
                    raise
        else:
            raise RuntimeError(f"PostgreSQL could not get a free port: {last_error}")
        _live_servers.append(server)
        server.psql(
            f"CREATE ROLE {APP_USER} LOGIN PASSWORD {_sql_literal(APP_PASSWORD)};\n"
            f"CREATE DATABASE {PG_APP_DATABASE} OWNER {APP_USER};\n"
        )
        return server
    except BaseException:
        # best-effort stop of a half-started cluster, then remove everything
        if (root / "data" / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                PgServer(0, root / "data", root=root, bindir=bindir, os_user=os_user).stop(
                    "immediate"
                )
        shutil.rmtree(root, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- MariaDB


@dataclass
class MariaServer:
    """A throw-away MariaDB server; ``root`` has no password."""

    port: int
    datadir: Path
    host: str = "127.0.0.1"
    root: Path | None = None  # temp dir holding datadir, socket, pid and log; removed by destroy()
    options: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        """Unix socket of this server."""
        return (self.root or self.datadir) / "mysql.sock"

    @property
    def pid_file(self) -> Path:
        """Pid file of this server."""
        return (self.root or self.datadir) / "mariadbd.pid"

    @property
    def log_file(self) -> Path:
        """Error log of this server."""
        return (self.root or self.datadir) / "mariadbd.err"

    # -- connection helpers
    def url(
        self,
        user: str = "root",
        password: str | None = None,
        database: str = "test",
        driver: str | None = "pymysql",
    ) -> str:
        """SQLAlchemy URL, e.g. ``mysql+pymysql://app:app-secret@127.0.0.1:3307/test``."""
        scheme = f"mysql+{driver}" if driver else "mysql"
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"{scheme}://{auth}@{self.host}:{self.port}/{database}"

    def _client(self, stmt: str, *, tcp: bool) -> str:
        conn = (
            ["--protocol=tcp", f"-h{self.host}", f"-P{self.port}"]
            if tcp
            else ["--protocol=socket", f"--socket={self.socket_path}"]
        )
        cmd = [MARIADB_CLIENT, "--no-defaults", *conn, "-uroot", "--batch", "--skip-column-names",
               "--connect-timeout=10", "-e", stmt]  # fmt: skip
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False, timeout=60
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"mariadb failed ({proc.returncode}): {proc.stderr.strip()}\nSQL: {stmt}"
            )
        return proc.stdout

    def sql(self, stmt: str) -> str:
        """Run *stmt* (may hold several ``;``-separated statements) as root over TCP."""
        return self._client(stmt, tcp=True)

    # -- lifecycle
    def _command(self) -> list[str]:
        opts = {
            "datadir": str(self.datadir),
            "port": str(self.port),
            "socket": str(self.socket_path),
            "pid-file": str(self.pid_file),
            "log-error": str(self.log_file),
            **_MARIA_BASE_OPTIONS,
            **self.options,
        }
        if _is_root():
            opts.setdefault("user", "root")
        return [MARIADBD, "--no-defaults", *(f"--{k}={v}" for k, v in opts.items())]

    def is_running(self) -> bool:
        """True if the server process we started is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start mariadbd and wait until it accepts TCP connections (30 s deadline)."""
        if self.is_running():
            return
        deadline = time.monotonic() + START_TIMEOUT
        self.process = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if not _wait_for_port(self.host, self.port, deadline, alive=self.process):
            self._kill()
            raise RuntimeError(
                f"MariaDB on port {self.port} did not start within {START_TIMEOUT:.0f}s\n"
                f"--- log tail ({self.log_file}) ---\n{_tail(self.log_file)}"
            )

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self, mode: str = "term") -> None:
        """Stop the server: ``term`` (SIGTERM, clean shutdown) or ``kill`` (SIGKILL, crash)."""
        if mode not in ("term", "kill"):
            raise ValueError(f"mode must be 'term' or 'kill', not {mode!r}")
        if not self.is_running():
            return
        assert self.process is not None
        if mode == "kill":
            self._kill()
        else:
            self.process.send_signal(signal.SIGTERM)
            try:
                # an idle server stops in well under a second; in one full run a clean
                # stop took the whole 60 s (a connection thread waiting out
                # net_write_timeout on a client that stopped reading, most likely)
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill()
        # make sure the port is really released before a restart
        deadline = time.monotonic() + 10
        while _port_open(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self, mode: str = "term") -> None:
        """Stop (with *mode*) and start again."""
        self.stop(mode)
        self.start()

    def set_global(self, **variables: object) -> None:
        """``SET GLOBAL name = value`` for each variable (ints and ON/OFF unquoted)."""
        parts = []
        for name, value in variables.items():
            text = str(value)
            bare = isinstance(value, (int, float)) or re.fullmatch(
                r"-?\d+(\.\d+)?|ON|OFF", text, re.I
            )
            parts.append(f"SET GLOBAL {name} = {text if bare else _sql_literal(text)};")
        self.sql("\n".join(parts))

    def destroy(self) -> None:
        """Kill the server and delete its temp directory."""
        try:
            with contextlib.suppress(Exception):
                self._kill()
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
            if self in _live_servers:
                _live_servers.remove(self)


_MARIA_BASE_OPTIONS: dict[str, str] = {
    "bind-address": "127.0.0.1",
    "skip-networking": "0",
    "skip-name-resolve": "1",
    "innodb-buffer-pool-size": "16M",
    "innodb-log-file-size": "8M",
    "innodb-log-buffer-size": "1M",
    "innodb-flush-log-at-trx-commit": "0",
    "innodb-use-native-aio": "0",
    "innodb-doublewrite": "0",
    "performance-schema": "0",
    "skip-log-bin": "1",
    "key-buffer-size": "1M",
    "character-set-server": "utf8mb4",
}


def start_mariadb(**server_options: object) -> MariaServer:
    """Install a data dir and start a throw-away MariaDB on a free port.

    *server_options* become ``--name=value`` mariadbd options (underscores in names are
    turned into dashes), e.g. ``max_connections="10"``. Creates database ``test`` and
    ``app``@``127.0.0.1`` / ``app``@``localhost`` identified by ``app-secret`` with ALL on
    ``test.*``. Raises :class:`ServerUnavailable` if MariaDB is not installed and
    :class:`RuntimeError` (with the log tail) if it does not come up within 30 s.
    """
    for exe in (MARIADB_INSTALL_DB, MARIADBD, MARIADB_CLIENT):
        if not os.access(exe, os.X_OK):
            raise ServerUnavailable(f"MariaDB binary {exe} not found")
    root = Path(tempfile.mkdtemp(prefix="rdb-maria-"))
    root.chmod(0o755)
    options = {k.replace("_", "-"): str(v) for k, v in server_options.items()}
    try:
        datadir = root / "data"
        install = [
            MARIADB_INSTALL_DB,
            "--no-defaults",
            f"--datadir={datadir}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=16M",
            "--innodb-log-file-size=8M",
            "--innodb-use-native-aio=0",
        ]
        if _is_root():
            install.append("--user=root")
        proc = subprocess.run(
            install, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            cwd=root, check=False, timeout=120,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {proc.stdout}\n{proc.stderr}")

        server = MariaServer(port=0, datadir=datadir, root=root, options=options)
        _live_servers.append(server)
        last_error: Exception | None = None
        for _attempt in range(3):  # retry if another process grabs our free port
            server.port = free_port()
            server.log_file.unlink(missing_ok=True)
            try:
                server.start()
                break
            except RuntimeError as exc:
                last_error = exc
                if "already in use" not in _tail(server.log_file, 200):
                    raise
        else:
            raise RuntimeError(f"MariaDB could not get a free port: {last_error}")
        # root@localhost (socket) exists after install-db; add root@127.0.0.1 for TCP.
        pw = _sql_literal(APP_PASSWORD)
        server._client(
            "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1';"
            "GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;"
            f"CREATE DATABASE IF NOT EXISTS `{MARIA_APP_DATABASE}`;"
            f"CREATE USER '{APP_USER}'@'127.0.0.1' IDENTIFIED BY {pw};"
            f"CREATE USER '{APP_USER}'@'localhost' IDENTIFIED BY {pw};"
            f"GRANT ALL ON `{MARIA_APP_DATABASE}`.* TO '{APP_USER}'@'127.0.0.1';"
            f"GRANT ALL ON `{MARIA_APP_DATABASE}`.* TO '{APP_USER}'@'localhost';",
            tcp=False,
        )
        return server
    except BaseException:
        for s in list(_live_servers):
            if s.root == root:
                s.destroy()
        shutil.rmtree(root, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- fixtures


def skip_or_fail(exc: ServerUnavailable) -> NoReturn:
    """Skip locally, but fail on CI (CI=true) where the servers must be installed."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{exc} (required on CI)")
    pytest.skip(str(exc))


# One server per kind and process, shared by every registration of the fixtures (a
# conftest re-export plus a module-level one would otherwise start two servers).
_shared: dict[str, tuple[PgServer | MariaServer, int]] = {}


def _acquire(kind: str, factory: Callable[[], PgServer | MariaServer]) -> PgServer | MariaServer:
    if kind in _shared:
        server, users = _shared[kind]
    else:
        try:
            server, users = factory(), 0
        except ServerUnavailable as exc:
            skip_or_fail(exc)
    _shared[kind] = (server, users + 1)
    return server


def _release(kind: str) -> None:
    server, users = _shared[kind]
    if users > 1:
        _shared[kind] = (server, users - 1)
    else:
        del _shared[kind]
        server.destroy()


@pytest.fixture(scope="session")
def throwaway_pg() -> Iterator[PgServer]:
    """A session-wide throw-away PostgreSQL server, destroyed at teardown.

    Tests that stop it must start it again (in a ``finally``) for the tests after them.
    """
    server = _acquire("pg", start_postgres)
    assert isinstance(server, PgServer)
    try:
        yield server
    finally:
        _release("pg")


@pytest.fixture(scope="session")
def throwaway_mariadb() -> Iterator[MariaServer]:
    """A session-wide throw-away MariaDB server, destroyed at teardown.

    Tests that stop it must start it again (in a ``finally``) for the tests after them.
    """
    server = _acquire("mariadb", start_mariadb)
    assert isinstance(server, MariaServer)
    try:
        yield server
    finally:
        _release("mariadb")
