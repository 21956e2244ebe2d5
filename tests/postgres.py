"""A private PostgreSQL for the tests (and scripts/bench_lib/store_cost.py), from the host's binaries.

`PgServer()` runs initdb and pg_ctl from /usr/lib/postgresql/*/bin (the newest version there;
as the `postgres` user via runuser when we are root) on a data directory in a fresh temporary
directory, listening on 127.0.0.1 only, on a free port, with its unix socket in that directory
and trust authentication for local and 127.0.0.1 connections. `stop()` is `pg_ctl stop -m
immediate` and removes the directory. Every wait is bounded.

The fixtures: `pg_server` (one server for the test session) and `pg_url` (a fresh database
of its own for each test: CREATE DATABASE with a unique name). A test module uses them by
importing them. Without the binaries the fixtures FAIL (a test of the PostgreSQL store that
does not run is not a pass): install the Debian package postgresql-15 (or another version).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "postgresql-15"
START_TIMEOUT = 60  # seconds pg_ctl waits for the server to accept connections
COMMAND_TIMEOUT = 120  # seconds any command of ours may take


class PgUnavailable(RuntimeError):
    pass


def bin_dir() -> Path:
    """The newest /usr/lib/postgresql/VERSION/bin that has initdb, pg_ctl and postgres."""
    found = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        if all(os.access(os.path.join(d, exe), os.X_OK) for exe in ("initdb", "pg_ctl", "postgres")):
            try:
                found.append((int(Path(d).parent.name), Path(d)))
            except ValueError:
                continue
    if not found:
        raise PgUnavailable(f"PostgreSQL's server binaries are not installed (no /usr/lib/postgresql/*/bin with "
                            f"initdb, pg_ctl and postgres): install the Debian package {PACKAGE} "
                            f"(apt-get install {PACKAGE})")
    return max(found)[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgServer:
    """A throwaway PostgreSQL server on 127.0.0.1; `url(dbname)` names a database on it."""

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.bin = bin_dir()
        self.dir = Path(tempfile.mkdtemp(prefix="arcp-pg-"))
        self.data = self.dir / "data"
        self.logfile = self.dir / "server.log"
        self.port = free_port()
        self.settings = {"fsync": "off", "full_page_writes": "off", "max_connections": "50",
                         "shared_buffers": "32MB"} if settings is None else settings
        self.running = False
        try:
            self._as_postgres_prepare()
            self._run("initdb", "-D", str(self.data), "--auth=trust", "--username=postgres", "--encoding=UTF8",
                      "--no-locale", "--no-sync")
            (self.data / "pg_hba.conf").write_text(
                "local all all trust\nhost all all 127.0.0.1/32 trust\n")
            self.start()
        except BaseException:
            self.stop()
            raise

    def _as_postgres_prepare(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        os.chmod(self.dir, 0o700)

    def _run(self, exe: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin / exe), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=self.dir,
                              timeout=COMMAND_TIMEOUT)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{exe} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
                               f"{self.log_tail()}")
        return proc

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return ""
        return "\nserver log:\n" + "\n".join(lines)

    def start(self) -> None:
        opts = [f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir}"]
        opts += [f"-c {k}={v}" for k, v in self.settings.items()]
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", str(START_TIMEOUT),
                  "-o", " ".join(opts), "start")
        self.running = True

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server; with the default mode, also remove its directory."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-w", "-t", str(START_TIMEOUT), "-m", mode, "stop",
                      check=False)
            self.running = False
        if mode == "immediate":
            shutil.rmtree(self.dir, ignore_errors=True)

    def halt(self) -> None:
        """Stop the server (fast shutdown: every connection is cut) but keep its data, to start() again."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", str(START_TIMEOUT), "-m", "fast", "stop")
        self.running = False

    def url(self, dbname: str = "postgres", **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"connect_timeout": "5", **params}.items())
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}?{query}"

    def create_database(self) -> str:
        """A fresh database; its name."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    try:
        server = PgServer()
    except PgUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """The URL of a fresh database of this test's own."""
    if not pg_server.running:  # a test that stopped it and failed before starting it again
        pg_server.start()
    name = pg_server.create_database()
    yield pg_server.url(name)
    if pg_server.running:
        pg_server.drop_database(name)
