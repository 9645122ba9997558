"""Persona's benchmark: Persona against the fastest its stack can go, side by side.

    python bench/bench.py                              # everything, about ten minutes
    python bench/bench.py --quick                      # shorter rounds, for a first look
    python bench/bench.py --db postgresql://u@host/db  # http and throughput on that PostgreSQL server
    python bench/bench.py --db pg                      # the same on a private throwaway cluster
    python bench/bench.py --only throughput --jobs 60  # end-to-end jobs/s with 1, 2 and 4 processes

Server on core 0, load generator (wrk) on core 1. For each endpoint the ceiling (a bare
Starlette app under the same uvicorn settings, returning from memory the same bytes
Persona returns) and Persona run alternately for several rounds; the report gives
medians and the ratio. wrk comes from Debian: `apt-get install wrk`.

With --db the http part runs on PostgreSQL: each SQLite file it would use becomes a fresh
database on that server (its user needs CREATE DATABASE), dropped at the end. The
throughput part runs on SQLite and on PostgreSQL (the --db server, else a private cluster
when PostgreSQL is installed here), and its servers share both cores with the load.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Condition, Thread
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import pg_cluster  # noqa: E402
from fake_providers import FakeProvider  # noqa: E402
from loopback import serve_on_loopback  # noqa: E402

import persona  # noqa: E402

TOKEN = "bench-token"
SERVER_CORE, LOAD_CORE = "0", "1"
JOB_COLUMNS = ["job_id", "owner", "request", "experiment_id", "created_at", "status", "progress"]
THROUGHPUT_JOB = {"data": "interviews.csv", "count": 3, "provider": "openai"}

CEILING_APP = textwrap.dedent("""
    import os
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    BODY = open(os.environ["BENCH_BODY"], "rb").read()

    async def answer(request: Request) -> Response:
        if request.method == "POST":
            await request.body()
        return Response(BODY, media_type="application/json")

    app = Starlette(routes=[Route("/{path:path}", answer, methods=["GET", "POST"])])
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, timeout: float = 30.0) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        try:
            httpx.get(url, timeout=0.5)
            return time.perf_counter() - started
        except httpx.HTTPError:
            time.sleep(0.01)
    raise SystemExit(f"{url} did not come up")


class Process:
    def __init__(self, command: list[str], env: dict[str, str], cwd: Path, cores: str = SERVER_CORE) -> None:
        self.popen = subprocess.Popen(
            ["taskset", "-c", cores, *command],
            env=env,
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def rss_mb(self) -> float:
        total = 0
        for pid in [self.popen.pid, *children(self.popen.pid)]:
            with open(f"/proc/{pid}/status") as status:
                total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
        return total / 1024

    def stop(self) -> None:
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class SlowProvider:
    """An OpenAI-compatible fake that answers after `delay` seconds (jobs wait on it)."""

    def __init__(self, delay: float) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(delay)
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        Thread(target=self.httpd.serve_forever, daemon=True).start()


class Receiver:
    """A webhook endpoint that answers 200 and notes each delivery's job, event and arrival time."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, str, str]] = []  # (perf_counter, job_id, event), in arrival order
        self.arrived = Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with outer.arrived:
                    outer.arrivals.append((time.perf_counter(), payload["data"]["job_id"], payload["event"]))
                    outer.arrived.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd, self.url = serve_on_loopback(Handler)

    def wait_for(self, count: int, timeout: float) -> float:
        """When the count-th delivery arrived: jobs queue their delivery as they finish, so all were done by then."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.arrivals) >= count, timeout):
                raise SystemExit(f"only {len(self.arrivals)} of {count} webhook deliveries arrived in {timeout:.0f} s")
            return self.arrivals[count - 1][0]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def on_postgres(url: str, method: str, *args: Any, **kwargs: Any) -> Any:
    """One asyncpg connection method on a connection of its own: the bench's few statements need no pool."""

    async def call() -> Any:
        conn = await asyncpg.connect(url)
        try:
            return await getattr(conn, method)(*args, **kwargs)
        finally:
            await conn.close()

    return asyncio.run(call())


class Postgres:
    """A PostgreSQL server that hands out fresh databases, so no run sees another's rows; drop_all() removes them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.created: list[str] = []

    def create(self, file_name: str) -> str:
        """A new database standing for the SQLite file `file_name`; returns its URL."""
        stem = re.sub(r"\W", "_", Path(file_name).stem)  # names go into SQL unquoted
        name = f"bench_{stem}_{secrets.token_hex(4)}"
        on_postgres(self.url, "execute", f"CREATE DATABASE {name}")
        self.created.append(name)
        return urlsplit(self.url)._replace(path=f"/{name}").geturl()

    def drop_all(self) -> None:
        for name in self.created:
            on_postgres(self.url, "execute", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.created.clear()


def store_of(db: str) -> str:
    return "postgresql" if persona.is_postgres_url(db) else "sqlite"


def wrk(url: str, seconds: int, connections: int = 50, script: Path | None = None) -> dict[str, float]:
    command = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if script is not None:
        command[5:5] = ["-s", str(script)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    latency = {p: to_ms(v) for p, v in re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.MULTILINE)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": latency.get("50", 0.0),
        "p99_ms": latency.get("99", 0.0),
        "non2xx": int(errors.group(1)) if errors else 0,
    }


def to_ms(value: str) -> float:
    number, unit = re.match(r"([\d.]+)(\w+)", value).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def post_script(folder: Path, body: dict[str, Any]) -> Path:
    script = folder / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {TOKEN}"\n'
    )
    return script


def interviews(path: Path, participants: int, seed: int = 7) -> None:
    """Generated interview data: five kinds of participant with their own vocabulary."""
    rng = random.Random(seed)
    kinds = [
        ("Nurse", ["night shifts", "swap requests", "offline rota", "rest hours", "ward handover"]),
        ("Store Manager", ["labour budget", "sick cover", "break rules", "weekly rota", "footfall forecast"]),
        ("Driver", ["van clock-in", "overtime pay", "GPS tracking", "payslip disputes", "route times"]),
        ("Payroll Administrator", ["timesheet export", "audit trail", "approvals", "spreadsheets", "reports"]),
        ("Student", ["study rooms", "exam season", "e-book loans", "late opening", "quiet floors"]),
    ]
    templates = [
        "I want {a} to work better, because {b} takes too long.",
        "It's frustrating when {a} breaks before {b}.",
        "I usually check {a} first thing, then {b}.",
        "I need {a} and {b} in one place.",
    ]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["participant_id", "role", "age", "response"])
        for n in range(participants):
            role, topics = kinds[n % len(kinds)]
            for _ in range(3):
                a, b = rng.sample(topics, 2)
                writer.writerow([f"P{n:06d}", role, rng.randint(20, 65), rng.choice(templates).format(a=a, b=b)])


class Bench:
    def __init__(self, seconds: int, rounds: int, postgres: Postgres | None, http_on_postgres: bool) -> None:
        self.seconds, self.rounds = seconds, rounds
        self.postgres, self.http_on_postgres = postgres, http_on_postgres
        self.work = Path(tempfile.mkdtemp(prefix="persona-bench-"))
        (self.work / "data").mkdir()
        shutil.copy(ROOT / "examples" / "interviews.csv", self.work / "data" / "interviews.csv")
        self.slow = SlowProvider(delay=5.0)
        self.results: list[dict[str, Any]] = []
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "OLLAMA_HOST": self.slow.url}

    def persona(
        self,
        db: str,
        *options: str,
        rate_limit: int = 1_000_000_000,
        env: dict[str, str] | None = None,
        cores: str = SERVER_CORE,
    ) -> tuple[Process, str]:
        """A `persona serve` on `db`: a SQLite file name in the work folder, or a postgresql:// URL."""
        port = free_port()
        location = db if persona.is_postgres_url(db) else str(self.work / db)
        command = [
            sys.executable,
            "-m",
            "persona",
            "serve",
            "--port",
            str(port),
            "--db",
            location,
            "--data-dir",
            str(self.work / "data"),
            "--output-dir",
            str(self.work / "output"),
            "--auth-token",
            TOKEN,
            "--rate-limit",
            str(rate_limit),
            "--max-concurrent-jobs",
            "1000000",
            "--log-level",
            "warning",
            *options,
        ]
        process = Process(command, env or self.env, self.work, cores)
        url = f"http://127.0.0.1:{port}"
        wait_until_up(f"{url}/api/v1/health")
        return process, url

    def ceiling(self, body: bytes) -> tuple[Process, str]:
        (self.work / "ceiling.py").write_text(CEILING_APP)
        (self.work / "body.json").write_bytes(body)
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", "ceiling:app", "--port", str(port), "--log-level", "warning"]
        process = Process(command, {**self.env, "BENCH_BODY": str(self.work / "body.json")}, self.work)
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url)
        return process, url

    def compare(
        self, name: str, db: str, path: str, target: float, script: Path | None = None, body: bytes | None = None
    ) -> None:
        """Alternate ceiling and Persona rounds; medians and their ratio."""
        server, url = self.persona(db)
        sample = httpx.get(url + path) if script is None else None
        body = body if body is not None else sample.content
        ceiling, ceiling_url = self.ceiling(body)
        runs: dict[str, list[dict[str, float]]] = {"ceiling": [], "persona": []}
        try:
            wrk(ceiling_url + path, 1, script=script), wrk(url + path, 1, script=script)  # warm both
            for _ in range(self.rounds):
                runs["ceiling"].append(wrk(ceiling_url + path, self.seconds, script=script))
                runs["persona"].append(wrk(url + path, self.seconds, script=script))
        finally:
            server.stop()
            ceiling.stop()
        ceiling_rps = statistics.median(r["rps"] for r in runs["ceiling"])
        persona_rps = statistics.median(r["rps"] for r in runs["persona"])
        row = {
            "benchmark": name,
            "db": store_of(db),
            "ceiling_rps": round(ceiling_rps),
            "persona_rps": round(persona_rps),
            "ratio": round(persona_rps / ceiling_rps, 3),
            "target": target,
            "persona_p50_ms": round(statistics.median(r["p50_ms"] for r in runs["persona"]), 2),
            "persona_p99_ms": round(statistics.median(r["p99_ms"] for r in runs["persona"]), 2),
            "persona_non2xx": sum(r["non2xx"] for r in runs["persona"]),
        }
        self.results.append(row)
        print(json.dumps(row), flush=True)

    def completed_job(self, db: str) -> str:
        server, url = self.persona(db)
        try:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            job_id = httpx.post(
                f"{url}/api/v1/generate", headers=headers, json={"data": "interviews.csv", "count": 5}
            ).json()["job_id"]
            while httpx.get(f"{url}/api/v1/generate/{job_id}").json()["status"] not in ("completed", "failed"):
                time.sleep(0.05)
        finally:
            server.stop()
        return job_id

    def fill_jobs(self, db: str, count: int) -> None:
        """100,000 finished jobs written straight into the database, as a long-lived server would have."""
        server, _ = self.persona(db)
        server.stop()
        rows = [
            (
                persona.new_id("job"),
                "key:bench",
                json.dumps({"data": "interviews.csv"}),
                "exp-000000000000",
                "2026-01-01T00:00:00Z",
                "completed",
                100,
            )
            for _ in range(count)
        ]
        if persona.is_postgres_url(db):  # the job_counts triggers fire for COPY too, so the counts stay right
            on_postgres(db, "copy_records_to_table", "jobs", records=rows, columns=JOB_COLUMNS)
            return
        with sqlite3.connect(self.work / db) as conn:
            conn.executemany(f"INSERT INTO jobs ({', '.join(JOB_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def http_db(self, file_name: str) -> str:
        """The database the http part uses for `file_name`: that SQLite file, or a fresh PostgreSQL database."""
        return self.postgres.create(file_name) if self.http_on_postgres else file_name

    def run_http(self) -> None:
        reads, many, writes = (self.http_db(name) for name in ("reads.db", "many.db", "writes.db"))
        job_id = self.completed_job(reads)
        self.compare("GET /api/v1/generate/{job_id} (completed, 5 personas)", reads, f"/api/v1/generate/{job_id}", 0.50)
        self.compare("GET /api/v1/health", reads, "/api/v1/health", 0.50)
        self.fill_jobs(many, 100_000)
        self.compare("GET /api/v1/generate?limit=100 (100,000 jobs)", many, "/api/v1/generate?limit=100", 0.20)
        body = {"data": "interviews.csv", "count": 3, "provider": "ollama"}
        accepted = json.dumps(
            {
                "job_id": "job-000000000000",
                "status": "pending",
                "message": "Generation job created successfully",
                "status_url": "/api/v1/generate/job-000000000000",
            },
            separators=(",", ":"),
        ).encode()
        self.compare(
            "POST /api/v1/generate (jobs wait on a slow provider)",
            writes,
            "/api/v1/generate",
            0.30,
            script=post_script(self.work, body),
            body=accepted,
        )

    def run_throughput(self, jobs: int) -> None:
        """End-to-end jobs/s on each store with 1, 2 and 4 processes, and the speed-up over 1 process."""
        stores = ["sqlite", "postgresql"]
        if self.postgres is None:
            print(
                "throughput: no --db and no PostgreSQL server binaries for a private cluster; SQLite only",
                file=sys.stderr,
                flush=True,
            )
            stores = ["sqlite"]
        provider = FakeProvider()
        try:
            for store in stores:
                one_process = 0.0
                for processes in (1, 2, 4):
                    row = self.throughput(store, processes, jobs, provider)
                    one_process = one_process or row["jobs_per_s"]
                    row["speedup_vs_1_process"] = round(row["jobs_per_s"] / one_process, 2)
                    self.results.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            provider.close()

    def throughput(self, store: str, processes: int, jobs: int, provider: FakeProvider) -> dict[str, Any]:
        """From the first submission until every job is completed and its webhook delivered, on a fresh database."""
        name = f"throughput-{processes}.db"
        db = self.postgres.create(name) if store == "postgresql" else name
        env = {**self.env, **provider.environment("openai", "sk-bench")}
        receiver = Receiver()
        servers: list[Process] = []
        try:
            urls: list[str] = []
            for _ in range(processes):  # not pinned to the server core: the processes and the load share both
                server, url = self.persona(
                    db, "--allow-private-urls", rate_limit=0, env=env, cores=f"{SERVER_CORE},{LOAD_CORE}"
                )
                servers.append(server)
                urls.append(url)
            httpx.post(
                f"{urls[0]}/api/v1/webhooks", headers={"Authorization": f"Bearer {TOKEN}"}, json={"url": receiver.url}
            ).raise_for_status()
            wal_before = self.wal_position(db)
            started = time.perf_counter()
            job_ids = submit_jobs(urls, jobs)
            finished = receiver.wait_for(jobs, timeout=60 + jobs)
            wal_growth = self.wal_position(db) - wal_before
            completed = int(
                httpx.get(f"{urls[0]}/api/v1/generate", params={"status": "completed", "limit": 1}).headers[
                    "X-Total-Count"
                ]
            )
        finally:
            for server in servers:
                server.stop()
            receiver.close()
        # Checked with every server stopped, so that no late duplicate can still arrive.
        delivered = Counter(job_id for _, job_id, event in receiver.arrivals if event == "generation.completed")
        row = {
            "benchmark": f"job throughput end to end ({jobs} jobs, fake OpenAI provider, 1 webhook)",
            "db": store,
            "processes": processes,
            "seconds": round(finished - started, 2),
            "jobs_per_s": round(jobs / (finished - started), 1),
            "completed": completed,
            "deliveries": len(receiver.arrivals),
            "exactly_once": completed == jobs and len(receiver.arrivals) == jobs and delivered == Counter(job_ids),
        }
        if store == "postgresql":
            row["wal_bytes_per_1000_jobs"] = round(wal_growth * 1000 / jobs)
            row["dead_tuples_per_1000_jobs"] = round(dead_tuples(db) * 1000 / jobs)
        else:  # the -wal file's growth, the nearest SQLite has to WAL bytes; see wal_position
            row["wal_file_growth_bytes_per_1000_jobs"] = round(wal_growth * 1000 / jobs)
        return row

    def wal_position(self, db: str) -> int:
        """PostgreSQL: bytes of WAL written so far. SQLite: the size of the -wal file beside the database.

        Not the same measure: SQLite writes its WAL file again from the start after each checkpoint, so the
        file's growth counts only what went past its previous size, and stays flat once it reached it.
        """
        if persona.is_postgres_url(db):
            return int(on_postgres(db, "fetchval", "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')"))
        wal = self.work / f"{db}-wal"
        return wal.stat().st_size if wal.exists() else 0

    def run_responsiveness(self) -> None:
        """p99 of a job read while 100 jobs wait on a slow provider and 4 engine jobs compute."""
        interviews(self.work / "data" / "big.csv", 10_000)
        job_id = self.completed_job("busy.db")
        server, url = self.persona("busy.db")
        headers = {"Authorization": f"Bearer {TOKEN}"}
        try:
            engine_jobs = [
                httpx.post(f"{url}/api/v1/generate", headers=headers, json={"data": "big.csv", "count": 5}).json()[
                    "job_id"
                ]
                for _ in range(4)
            ]
            for _ in range(100):
                httpx.post(
                    f"{url}/api/v1/generate", headers=headers, json={"data": "interviews.csv", "provider": "ollama"}
                )
            result = wrk(f"{url}/api/v1/generate/{job_id}", self.seconds * 2, connections=10)
            statuses = [httpx.get(f"{url}/api/v1/generate/{j}").json()["status"] for j in engine_jobs]
        finally:
            server.stop()
        row = {
            "benchmark": "GET job while 100 jobs wait and 4 engine jobs run on 10,000 participants",
            "persona_rps": round(result["rps"]),
            "persona_p50_ms": result["p50_ms"],
            "persona_p99_ms": result["p99_ms"],
            "target_p99_ms": 50,
            "engine_jobs_during_load": statuses,
        }
        self.results.append(row)
        print(json.dumps(row), flush=True)

    def run_engine(self, sizes: list[int]) -> None:
        """Time and peak memory of the offline engine with its quality report and stability.

        Each size runs in a fresh process."""
        for size in sizes:
            data = self.work / "data" / f"engine-{size}.csv"
            interviews(data, size)
            code = textwrap.dedent(f'''
                import json, resource, time, persona
                from pathlib import Path
                started = time.perf_counter()
                dataset = persona.load_path("{data.name}", Path("{data.parent}"))
                personas, _ = persona.offline_personas(dataset, 5, {{}})
                persona.quality_report(dataset.participants, personas, dataset.silent)
                stability = persona.grouping_stability(dataset.participants, 5, {{}}, personas, dataset.labels)
                print(json.dumps({{"seconds": round(time.perf_counter() - started, 2), "stability": stability,
                                  "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                                  "personas": len(personas)}}))
            ''')
            out = subprocess.run(
                ["taskset", "-c", SERVER_CORE, sys.executable, "-c", code],
                env=self.env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            row = {
                "benchmark": f"offline engine, {size:,} participants, 5 personas, quality and stability",
                **json.loads(out),
            }
            self.results.append(row)
            print(json.dumps(row), flush=True)

    def run_startup(self) -> None:
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "persona",
            "serve",
            "--port",
            str(port),
            "--db",
            str(self.work / "start.db"),
            "--data-dir",
            str(self.work / "data"),
            "--output-dir",
            str(self.work / "output"),
            "--log-level",
            "warning",
        ]
        process = Process(command, self.env, self.work)
        seconds = wait_until_up(f"http://127.0.0.1:{port}/api/v1/health")
        time.sleep(2)  # let it settle before reading idle memory
        rss = process.rss_mb()
        process.stop()
        row = {
            "benchmark": "start-up and idle footprint",
            "seconds_to_health": round(seconds, 3),
            "idle_rss_mb": round(rss, 1),
        }
        self.results.append(row)
        print(json.dumps(row), flush=True)


def submit_jobs(urls: list[str], jobs: int, threads: int = 8) -> list[str]:
    """Submit the jobs round-robin over the servers from plain threads, as independent clients would."""
    job_ids = [""] * jobs
    errors: list[Exception] = []

    def send(first: int) -> None:
        try:
            with ExitStack() as stack:
                clients = [
                    stack.enter_context(
                        httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"})
                    )
                    for url in urls
                ]
                for n in range(first, jobs, threads):
                    response = clients[n % len(urls)].post("/api/v1/generate", json=THROUGHPUT_JOB)
                    response.raise_for_status()
                    job_ids[n] = response.json()["job_id"]
        except (httpx.HTTPError, KeyError, ValueError) as error:  # reported by the caller, after join
            errors.append(error)

    workers = [Thread(target=send, args=(first,)) for first in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise SystemExit(f"submitting jobs failed: {errors[0]!r}")
    return job_ids


def dead_tuples(db: str) -> int:
    """Dead rows in the database's tables.

    Read once its servers' sessions have ended, and so flushed their statistics."""

    async def count() -> int:
        conn = await asyncpg.connect(db)
        try:
            deadline = time.monotonic() + 15
            while await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ):
                if time.monotonic() > deadline:
                    raise SystemExit("the servers' PostgreSQL sessions did not end")
                await asyncio.sleep(0.05)
            if await conn.fetchval("SELECT to_regproc('pg_stat_force_next_flush') IS NOT NULL"):  # PostgreSQL 15+
                await conn.execute("SELECT pg_stat_force_next_flush()")
            return await conn.fetchval("SELECT COALESCE(sum(n_dead_tup), 0) FROM pg_stat_user_tables")
        finally:
            await conn.close()

    return asyncio.run(count())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 s instead of 5 rounds of 5 s")
    parser.add_argument(
        "--only", choices=["http", "throughput", "responsiveness", "engine", "startup"], help="one part only"
    )
    parser.add_argument("--sizes", default="1000,10000,50000", help="participant counts for the engine")
    parser.add_argument(
        "--db",
        metavar="URL",
        help="run http and throughput on this PostgreSQL server "
        "(postgresql://..., its user may CREATE DATABASE), or 'pg' for a private throwaway cluster",
    )
    parser.add_argument("--jobs", type=int, default=400, help="jobs per throughput run (default 400)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install wrk", file=sys.stderr)
        return 2
    if args.db is not None and args.db != "pg" and not persona.is_postgres_url(args.db):
        parser.error("--db takes a postgresql:// URL or 'pg'")
    if args.db == "pg" and not pg_cluster.available():
        print("--db pg needs the PostgreSQL server binaries (apt-get install postgresql)", file=sys.stderr)
        return 2
    if args.db is None:  # throughput still measures PostgreSQL when a private cluster can be had here
        private = args.only in (None, "throughput") and pg_cluster.available()
    else:
        private = args.db == "pg" and args.only in (None, "http", "throughput")
    # Durable, as a real deployment runs it (the tests' clusters are not): every commit reaches the disk.
    cluster = pg_cluster.Cluster(fsync="on", full_page_writes="on", synchronous_commit="on") if private else None
    postgres: Postgres | None = None
    try:
        if cluster is not None:
            cluster.start()
            postgres = Postgres(cluster.url("postgres"))
        elif args.db not in (None, "pg"):
            postgres = Postgres(args.db)
        bench = Bench(
            seconds=3 if args.quick else 5,
            rounds=2 if args.quick else 5,
            postgres=postgres,
            http_on_postgres=args.db is not None,
        )
        parts = {
            "startup": bench.run_startup,
            "http": bench.run_http,
            "throughput": lambda: bench.run_throughput(args.jobs),
            "responsiveness": bench.run_responsiveness,
            "engine": lambda: bench.run_engine([int(s) for s in args.sizes.split(",")]),
        }
        for name, part in parts.items():
            if args.only in (None, name):
                part()
        (ROOT / "bench" / "results.json").write_text(json.dumps(bench.results, indent=2) + "\n")
        shutil.rmtree(bench.work, ignore_errors=True)
    finally:
        if postgres is not None:
            postgres.drop_all()
        if cluster is not None:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
