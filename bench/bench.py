"""Persona's benchmark: Persona against the fastest its stack can go, side by side.

    python bench/bench.py            # everything, about six minutes
    python bench/bench.py --quick    # shorter rounds, for a first look

Server on core 0, load generator (wrk) on core 1. For each endpoint the ceiling (a bare
Starlette app under the same uvicorn settings, returning from memory the same bytes
Persona returns) and Persona run alternately for several rounds; the report gives
medians and the ratio. wrk comes from Debian: `apt-get install wrk`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import persona  # noqa: E402

TOKEN = "bench-token"
SERVER_CORE, LOAD_CORE = "0", "1"

CEILING_APP = textwrap.dedent('''
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
''')


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
    def __init__(self, command: list[str], env: dict[str, str], cwd: Path) -> None:
        self.popen = subprocess.Popen(["taskset", "-c", SERVER_CORE, *command], env=env, cwd=cwd,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

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


def wrk(url: str, seconds: int, connections: int = 50, script: Path | None = None) -> dict[str, float]:
    command = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if script is not None:
        command[5:5] = ["-s", str(script)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    latency = {p: to_ms(v) for p, v in re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.MULTILINE)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": latency.get("50", 0.0), "p99_ms": latency.get("99", 0.0),
            "non2xx": int(errors.group(1)) if errors else 0}


def to_ms(value: str) -> float:
    number, unit = re.match(r"([\d.]+)(\w+)", value).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def post_script(folder: Path, body: dict[str, Any]) -> Path:
    script = folder / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = {json.dumps(json.dumps(body))}\n'
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
    templates = ["I want {a} to work better, because {b} takes too long.", "It's frustrating when {a} breaks before {b}.",
                 "I usually check {a} first thing, then {b}.", "I need {a} and {b} in one place."]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["participant_id", "role", "age", "response"])
        for n in range(participants):
            role, topics = kinds[n % len(kinds)]
            for _ in range(3):
                a, b = rng.sample(topics, 2)
                writer.writerow([f"P{n:06d}", role, rng.randint(20, 65), rng.choice(templates).format(a=a, b=b)])


class Bench:
    def __init__(self, seconds: int, rounds: int) -> None:
        self.seconds, self.rounds = seconds, rounds
        self.work = Path(tempfile.mkdtemp(prefix="persona-bench-"))
        (self.work / "data").mkdir()
        shutil.copy(ROOT / "examples" / "interviews.csv", self.work / "data" / "interviews.csv")
        self.slow = SlowProvider(delay=5.0)
        self.results: list[dict[str, Any]] = []
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "OLLAMA_HOST": self.slow.url}

    def persona(self, db: str) -> tuple[Process, str]:
        port = free_port()
        command = [sys.executable, "-m", "persona", "serve", "--port", str(port), "--db", str(self.work / db),
                   "--data-dir", str(self.work / "data"), "--output-dir", str(self.work / "output"),
                   "--auth-token", TOKEN, "--rate-limit", "1000000000", "--max-concurrent-jobs", "1000000",
                   "--log-level", "warning"]
        process = Process(command, self.env, self.work)
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

    def compare(self, name: str, db: str, path: str, target: float, script: Path | None = None,
                body: bytes | None = None) -> None:
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
        row = {"benchmark": name, "ceiling_rps": round(ceiling_rps), "persona_rps": round(persona_rps),
               "ratio": round(persona_rps / ceiling_rps, 3), "target": target,
               "persona_p50_ms": round(statistics.median(r["p50_ms"] for r in runs["persona"]), 2),
               "persona_p99_ms": round(statistics.median(r["p99_ms"] for r in runs["persona"]), 2),
               "persona_non2xx": sum(r["non2xx"] for r in runs["persona"])}
        self.results.append(row)
        print(json.dumps(row), flush=True)

    def completed_job(self, db: str) -> str:
        server, url = self.persona(db)
        try:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            job_id = httpx.post(f"{url}/api/v1/generate", headers=headers,
                                json={"data": "interviews.csv", "count": 5}).json()["job_id"]
            while httpx.get(f"{url}/api/v1/generate/{job_id}").json()["status"] not in ("completed", "failed"):
                time.sleep(0.05)
        finally:
            server.stop()
        return job_id

    def fill_jobs(self, db: str, count: int) -> None:
        """100,000 finished jobs written straight into the database, as a long-lived server would have."""
        server, _ = self.persona(db)
        server.stop()
        rows = [(persona.new_id("job"), "key:bench", json.dumps({"data": "interviews.csv"}), "exp-000000000000",
                 "2026-01-01T00:00:00Z", "completed", 100) for _ in range(count)]
        with sqlite3.connect(self.work / db) as conn:
            conn.executemany("INSERT INTO jobs (job_id, owner, request, experiment_id, created_at, status, progress) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def run_http(self) -> None:
        job_id = self.completed_job("reads.db")
        self.compare("GET /api/v1/generate/{job_id} (completed, 5 personas)", "reads.db", f"/api/v1/generate/{job_id}", 0.50)
        self.compare("GET /api/v1/health", "reads.db", "/api/v1/health", 0.50)
        self.fill_jobs("many.db", 100_000)
        self.compare("GET /api/v1/generate?limit=100 (100,000 jobs)", "many.db", "/api/v1/generate?limit=100", 0.20)
        body = {"data": "interviews.csv", "count": 3, "provider": "ollama"}
        accepted = json.dumps({"job_id": "job-000000000000", "status": "pending",
                               "message": "Generation job created successfully",
                               "status_url": "/api/v1/generate/job-000000000000"}, separators=(",", ":")).encode()
        self.compare("POST /api/v1/generate (jobs wait on a slow provider)", "writes.db", "/api/v1/generate", 0.30,
                     script=post_script(self.work, body), body=accepted)

    def run_responsiveness(self) -> None:
        """p99 of a job read while 100 jobs wait on a slow provider and 4 engine jobs compute."""
        interviews(self.work / "data" / "big.csv", 10_000)
        job_id = self.completed_job("busy.db")
        server, url = self.persona("busy.db")
        headers = {"Authorization": f"Bearer {TOKEN}"}
        try:
            engine_jobs = [httpx.post(f"{url}/api/v1/generate", headers=headers,
                                      json={"data": "big.csv", "count": 5}).json()["job_id"] for _ in range(4)]
            for _ in range(100):
                httpx.post(f"{url}/api/v1/generate", headers=headers, json={"data": "interviews.csv", "provider": "ollama"})
            result = wrk(f"{url}/api/v1/generate/{job_id}", self.seconds * 2, connections=10)
            statuses = [httpx.get(f"{url}/api/v1/generate/{j}").json()["status"] for j in engine_jobs]
        finally:
            server.stop()
        row = {"benchmark": "GET job while 100 jobs wait and 4 engine jobs run on 10,000 participants",
               "persona_rps": round(result["rps"]), "persona_p50_ms": result["p50_ms"],
               "persona_p99_ms": result["p99_ms"], "target_p99_ms": 50, "engine_jobs_during_load": statuses}
        self.results.append(row)
        print(json.dumps(row), flush=True)

    def run_engine(self, sizes: list[int]) -> None:
        """Time and peak memory of the offline engine, each size in a fresh process."""
        for size in sizes:
            data = self.work / "data" / f"engine-{size}.csv"
            interviews(data, size)
            code = textwrap.dedent(f'''
                import json, resource, time, persona
                from pathlib import Path
                started = time.perf_counter()
                dataset = persona.load_path("{data.name}", Path("{data.parent}"))
                personas, _ = persona.offline_personas(dataset, 5, {{}})
                print(json.dumps({{"seconds": round(time.perf_counter() - started, 2),
                                  "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                                  "personas": len(personas)}}))
            ''')
            out = subprocess.run(["taskset", "-c", SERVER_CORE, sys.executable, "-c", code], env=self.env,
                                 capture_output=True, text=True, check=True).stdout
            row = {"benchmark": f"offline engine, {size:,} participants, 5 personas", **json.loads(out)}
            self.results.append(row)
            print(json.dumps(row), flush=True)

    def run_startup(self) -> None:
        port = free_port()
        command = [sys.executable, "-m", "persona", "serve", "--port", str(port), "--db", str(self.work / "start.db"),
                   "--data-dir", str(self.work / "data"), "--output-dir", str(self.work / "output"), "--log-level", "warning"]
        process = Process(command, self.env, self.work)
        seconds = wait_until_up(f"http://127.0.0.1:{port}/api/v1/health")
        time.sleep(2)  # let it settle before reading idle memory
        rss = process.rss_mb()
        process.stop()
        row = {"benchmark": "start-up and idle footprint", "seconds_to_health": round(seconds, 3),
               "idle_rss_mb": round(rss, 1)}
        self.results.append(row)
        print(json.dumps(row), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 s instead of 5 rounds of 5 s")
    parser.add_argument("--only", choices=["http", "responsiveness", "engine", "startup"], help="one part only")
    parser.add_argument("--sizes", default="1000,10000,50000", help="participant counts for the engine")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install wrk", file=sys.stderr)
        return 2
    bench = Bench(seconds=3 if args.quick else 5, rounds=2 if args.quick else 5)
    parts = {"startup": bench.run_startup, "http": bench.run_http, "responsiveness": bench.run_responsiveness,
             "engine": lambda: bench.run_engine([int(s) for s in args.sizes.split(",")])}
    for name, part in parts.items():
        if args.only in (None, name):
            part()
    (ROOT / "bench" / "results.json").write_text(json.dumps(bench.results, indent=2) + "\n")
    shutil.rmtree(bench.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
