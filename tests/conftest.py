"""Shared fixtures: real server processes on loopback, temporary directories, data servers."""

from __future__ import annotations

import asyncio
import os
import secrets
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pg_cluster
import pytest
from fake_providers import FakeProvider
from loopback import serve_on_loopback

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("sqlite", "postgresql")
EXAMPLES = ROOT / "examples"
TERMINAL = ("completed", "failed")


PROVIDER_VARIABLES = (
    "ANTHROPIC_API_KEY",
    "OPENAI_API_KEY",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "PERSONA_PROVIDER",
    "ANTHROPIC_BASE_URL",
    "OPENAI_BASE_URL",
    "GOOGLE_GEMINI_BASE_URL",
    "OLLAMA_HOST",
)


def clean_environment() -> dict[str, str]:
    """This environment without provider keys or PERSONA_* settings, so tests choose their own."""
    return {
        key: value
        for key, value in os.environ.items()
        if key not in PROVIDER_VARIABLES and not key.startswith("PERSONA_")
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(
    condition: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll until `condition()` is truthy and return its value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def postgres_query(url: str, sql: str) -> list[tuple[Any, ...]]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await conn.fetch(sql)]
    finally:
        await conn.close()


class Server:
    """`python -m persona serve` as a child process on a free loopback port."""

    def __init__(self, workdir: Path, args: list[str], env: dict[str, str], prefix: list[str] | None = None) -> None:
        self.workdir = workdir
        self.prefix = prefix or []  # a command that runs the server, such as one giving it its own mounts
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args
        self.env = env
        self.log_path = workdir / f"server-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.db = args[args.index("--db") + 1] if "--db" in args else str(workdir / "persona.db")

    def start(self, timeout: float = 20.0) -> Server:
        command = [*self.prefix, sys.executable, "-m", "persona", "serve", "--port", str(self.port), *self.args]
        # Its temporary files (the host's engine slots among them) are the test's own: tests run in parallel.
        env = {**clean_environment(), "PYTHONPATH": str(ROOT), "TMPDIR": str(self.workdir), **self.env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for(self._healthy, timeout, what=f"server on port {self.port} to answer health")
        return self

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
        try:
            return httpx.get(f"{self.url}/api/v1/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown code runs, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> Server:
        """A new process on the same port, database and directories."""
        self.stop()
        return self.start()

    def crash_and_restart(self, meanwhile: Callable[[], Any] | None = None) -> Server:
        """Kill the server as a crash would, do `meanwhile` while it is down, and start it again."""
        self.kill()
        if meanwhile is not None:
            meanwhile()
        return self.start()

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """A statement on the server's database, through a connection of the test's own."""
        if not self.db.startswith("postgresql://"):
            with sqlite3.connect(self.db) as conn:
                return [tuple(row) for row in conn.execute(sql)]
        return asyncio.run(postgres_query(self.db, sql))

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    """Fake Anthropic, OpenAI and Gemini servers on loopback, for the real SDKs to talk to."""
    server = FakeProvider()
    yield server
    server.close()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A working directory whose data folder holds the bundled examples."""
    data = tmp_path / "data"
    shutil.copytree(EXAMPLES, data)
    return tmp_path


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: two workers more than cores. Many tests wait on servers, receivers and clusters rather
    than compute, so two spare workers keep the cores busy; the regular-expression timing counts the
    worker's CPU time, which others' work does not stretch."""
    return (os.cpu_count() or 1) + 2


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that starts a server runs on both stores, unless it is about one of them."""
    if "backend" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker
        backends = BACKENDS[:1] if marker("sqlite_only") else BACKENDS[1:] if marker("postgres_only") else BACKENDS
        metafunc.parametrize("backend", backends)


@pytest.fixture(scope="session")
def postgres() -> Iterator[pg_cluster.Cluster]:
    """One throwaway PostgreSQL cluster for the session; each test gets databases of its own in it.

    Without PostgreSQL installed the tests that need it skip, except under CI, where they must run.
    """
    if not pg_cluster.available():
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL is not installed, and CI must test both stores")
        pytest.skip("PostgreSQL is not installed here (Debian: apt-get install postgresql)")
    with pg_cluster.Cluster() as cluster:
        yield cluster


@pytest.fixture
def database(request: pytest.FixtureRequest, backend: str, workdir: Path) -> Callable[[str], str]:
    """The --db value for a name: a SQLite file in the working directory, or a fresh PostgreSQL database."""
    if backend == "sqlite":
        return lambda name="persona.db": str(workdir / name)
    cluster = request.getfixturevalue("postgres")
    made: dict[str, str] = {}

    def url(name: str = "persona.db") -> str:
        if name not in made:
            made[name] = cluster.create_database(f"t_{secrets.token_hex(6)}")
        return made[name]

    return url


@pytest.fixture
def start_server(workdir: Path, database: Callable[[str], str]) -> Iterator[Callable[..., Server]]:
    """Start servers with a temporary database, data and output directory; all stop at teardown."""
    servers: list[Server] = []

    def start(
        *args: str, env: dict[str, str] | None = None, db: str = "persona.db", prefix: list[str] | None = None
    ) -> Server:
        base = ["--db", database(db), "--data-dir", str(workdir / "data"), "--output-dir", str(workdir / "output")]
        server = Server(workdir, [*base, *args], env or {}, prefix)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def server(start_server: Callable[..., Server]) -> Server:
    return start_server("--rate-limit", "0")


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http


def module_server(tmp_path_factory: pytest.TempPathFactory, *args: str) -> Iterator[Server]:
    """A server on SQLite for all of a module's tests that use it, with the examples as its data."""
    workdir = tmp_path_factory.mktemp("shared")
    shutil.copytree(EXAMPLES, workdir / "data")
    base = ["--db", str(workdir / "persona.db"), "--data-dir", str(workdir / "data")]
    server = Server(workdir, [*base, "--output-dir", str(workdir / "output"), "--rate-limit", "0", *args], {})
    yield server.start()
    server.kill()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for a module's tests whose subject is the request (validation, auth), not the store:
    they run on SQLite alone, and those that must change nothing check that they did not."""
    yield from module_server(tmp_path_factory)


@pytest.fixture(scope="module")
def shared_secured_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`shared_server` with two API tokens, `first-token` and `second-token`."""
    yield from module_server(tmp_path_factory, "--auth-token", "first-token,second-token")


def table_counts(server: Server) -> dict[str, int]:
    """Rows in each table that a request could add to."""
    tables = ("jobs", "webhooks", "experiments", "idempotency_keys", "deliveries")
    return {table: server.query(f"SELECT COUNT(*) FROM {table}")[0][0] for table in tables}


@pytest.fixture
def refusing_client(shared_server: Server) -> Iterator[httpx.Client]:
    """A client of the shared server, and a check at the end that the test's requests changed no table."""
    before = table_counts(shared_server)
    with shared_server.client() as http:
        yield http
    assert table_counts(shared_server) == before


def wait_job(
    http: httpx.Client, job_id: str, timeout: float = 30.0, until: tuple[str, ...] = TERMINAL
) -> dict[str, Any]:
    def status() -> dict[str, Any] | None:
        job = http.get(f"/api/v1/generate/{job_id}").json()
        return job if job["status"] in until else None

    return wait_for(status, timeout, interval=0.05, what=f"job {job_id} to reach {until}")


def submit(http: httpx.Client, **body: Any) -> str:
    response = http.post("/api/v1/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()["job_id"]


def hung_up(connection: socket.socket) -> bool:
    """Whether the peer closed this connection: readable, with nothing to read."""
    readable, _, _ = select.select([connection], [], [], 0)
    return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""


class GatedDataServer:
    """An HTTP data source on loopback that holds every answer until it is opened.

    A job reading from it stays `running` for as long as the test needs, with no
    sleeps: the test opens the gate when it wants the job to go on.
    """

    def __init__(self, body: bytes, content_type: str = "text/csv") -> None:
        self.gate = threading.Event()
        self.requests = 0
        self.abandoned = 0  # requests whose client hung up while held
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                outer.requests += 1
                deadline = time.monotonic() + 60
                while not outer.gate.wait(0.05) and time.monotonic() < deadline:
                    if hung_up(self.connection):
                        outer.abandoned += 1
                        return
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd, base = serve_on_loopback(Handler)
        self.url = f"{base}/interviews.csv"

    def close(self) -> None:
        self.gate.set()
        self.httpd.shutdown()


@pytest.fixture
def gated_data() -> Iterator[GatedDataServer]:
    server = GatedDataServer((EXAMPLES / "interviews.csv").read_bytes())
    yield server
    server.close()


class Receiver:
    """A webhook receiver on loopback that records every request and answers as told.

    `answers` is consumed one status per request (the last one repeats); a status of
    None holds the request until `release` is set.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answers: list[int | None] = [200]
        self.redirect_to = ""
        self.release = threading.Event()
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keeps connections open, as most receivers do

            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    outer.requests.append(
                        {
                            "headers": dict(self.headers.items()),
                            "body": body,
                            "path": self.path,
                            "peer": self.client_address,
                        }
                    )
                    answer = outer.answers.pop(0) if len(outer.answers) > 1 else outer.answers[0]
                if answer is None:
                    outer.release.wait(60)
                    answer = 200
                self.send_response(answer)
                if answer in (429, 503):
                    self.send_header("Retry-After", "1")
                if 300 <= answer < 400:
                    self.send_header("Location", outer.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd, base = serve_on_loopback(Handler)
        self.url = f"{base}/hook"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[[], Receiver]]:
    made: list[Receiver] = []

    def make() -> Receiver:
        made.append(Receiver())
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


@pytest.fixture
def receiver(receivers: Callable[[], Receiver]) -> Receiver:
    return receivers()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that drive the browser run last, in their order: once Playwright's sync API runs, this
    thread has an event loop for the rest of the session, and asyncio.run() cannot start another."""
    items.sort(key=lambda item: "browser" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (no browser download); skipped where it is not installed, except in CI."""
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed, and CI must run the browser tests")
        pytest.skip("needs Debian's chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh tab (its own session storage) at the workbench's width."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    tab = context.new_page()
    tab.set_default_timeout(20_000)
    yield tab
    context.close()
