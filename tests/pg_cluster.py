"""A private, throwaway PostgreSQL cluster for tests: its own folder, reachable only through a Unix socket there."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

SUPERUSER = "postgres"
NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# Only the socket in the cluster's folder, and no durability: a test database is thrown away anyway.
SETTINGS = {
    "listen_addresses": "''",
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "off",
    "max_connections": "200",
}


class ClusterError(RuntimeError):
    """A cluster command failed; the message carries its output and the tail of the server log."""


def find_bindir() -> Path | None:
    """Debian keeps initdb and pg_ctl off PATH, so find the folder that holds them; None when not installed."""
    if pg_config := shutil.which("pg_config"):
        found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        bindir = Path(found.stdout.strip())
        if found.returncode == 0 and (bindir / "initdb").is_file():
            return bindir

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    candidates = [path for path in Path("/usr/lib/postgresql").glob("*/bin") if (path / "initdb").is_file()]
    return max(candidates, key=version, default=None)


def as_root() -> bool:
    """PostgreSQL refuses to run as root, so then the server runs as the postgres system user."""
    return os.geteuid() == 0


def available() -> bool:
    """Whether a cluster can be started here, so tests that need one can skip instead of failing."""
    if find_bindir() is None:
        return False
    return not as_root() or (SUPERUSER in {user.pw_name for user in pwd.getpwall()} and bool(shutil.which("runuser")))


class Cluster:
    """One throwaway cluster; start() makes it, stop() removes every trace of it."""

    def __init__(self, **settings: str) -> None:
        """`settings` override SETTINGS, e.g. synchronous_commit="on" for a cluster that will be crashed."""
        self.settings = {**SETTINGS, **settings}
        bindir = find_bindir()
        if bindir is None:
            raise ClusterError("no PostgreSQL server binaries (initdb, pg_ctl) found")
        self.bindir = bindir
        self.folder: Path | None = None

    @property
    def socket_dir(self) -> Path:
        """The cluster's folder: it holds the socket, the data directory and the server log."""
        if self.folder is None:
            raise ClusterError("the cluster is not started")
        return self.folder

    @property
    def data(self) -> Path:
        """The data directory, next to the socket and the log."""
        return self.socket_dir / "data"

    def start(self) -> None:
        """Create the cluster in a fresh folder and start it, waiting until it accepts connections."""
        self.folder = Path(tempfile.mkdtemp(prefix="pg-"))
        if as_root():
            shutil.chown(self.folder, SUPERUSER, SUPERUSER)
        self._run(
            "initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"
        )
        settings = {**self.settings, "unix_socket_directories": f"'{self.folder}'"}
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        self.start_again()

    def start_again(self) -> None:
        """Start the server on the existing data directory, e.g. after stop_now(); pg_ctl -w waits for readiness."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.socket_dir / "log"), "-w", "start")

    def restart(self) -> None:
        """A clean database restart on the same socket and data: clients lose their connections, data survives."""
        self._pg_stop("fast")
        self.start_again()

    def stop_now(self) -> None:
        """Kill the server without a clean shutdown, as when the database goes away under its clients."""
        self._pg_stop("immediate")

    def stop(self) -> None:
        """Stop the server if it runs and remove the folder; safe to call twice and after a failed start."""
        if self.folder is None:
            return
        try:
            if (self.data / "postmaster.pid").exists():
                self._pg_stop("fast")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def url(self, database: str) -> str:
        """The host stays empty because asyncpg reads host= from the query (the socket folder) only then."""
        return f"postgresql://{SUPERUSER}@/{database}?host={quote(str(self.socket_dir))}"

    def create_database(self, name: str) -> str:
        """Create a database and return its URL, so each test can have a clean one."""
        self._psql(f"CREATE DATABASE {self._checked(name)}")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting anyone still using it."""
        self._psql(f"DROP DATABASE IF EXISTS {self._checked(name)} WITH (FORCE)")

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    @staticmethod
    def _checked(name: str) -> str:
        """Names go into SQL unquoted, so only plain lower-case identifiers are let through."""
        if not NAME.fullmatch(name):
            raise ValueError(f"not a plain database name: {name!r}")
        return name

    def _pg_stop(self, mode: str) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def _psql(self, sql: str) -> None:
        self._run(
            "psql",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.socket_dir),
            "-U",
            SUPERUSER,
            "-d",
            "postgres",
            "-c",
            sql,
            server=False,
        )

    def _run(self, program: str, *arguments: str, server: bool = True) -> None:
        """Run one of the cluster's programs, as the postgres user when root; fail with its output and the log tail."""
        command = [str(self.bindir / program), *arguments]
        if server and as_root():
            command = ["runuser", "-u", SUPERUSER, "--", *command]
        # cwd is the folder because the postgres user may not be able to enter the caller's working directory.
        done = subprocess.run(command, cwd=self.folder, capture_output=True, text=True)
        if done.returncode != 0:
            log = self.folder / "log" if self.folder else None
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log and log.exists() else ""
            raise ClusterError(
                f"{program} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
                f"\n--- server log tail ---\n{tail}"
            )
