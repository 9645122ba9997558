"""Peak memory of a server under a full job quota: every job at once on one large CSV.

    python bench/memory.py                    # 10 jobs (the default quota) on 20,000 participants
    python bench/memory.py --jobs 10 --participants 50000

Starts `persona serve` with default settings (rate limit off, for the polling) in a temporary folder, submits `--jobs`
offline jobs at once on one generated CSV, and samples the resident memory of the server
and every process below it (engine children) until all jobs have ended. Prints one JSON
line: the peak of the sum, the most engine children seen at once, and how long it took.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench import interviews  # noqa: E402  (bench.py beside this file writes the data)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree(pid: int) -> list[int]:
    """The process and all processes below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(children.get(current, []))
    return found


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10, help="jobs at once (default 10, the default quota)")
    parser.add_argument("--participants", type=int, default=20000, help="participants in the CSV (default 20,000)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="persona-memory-"))
    (work / "data").mkdir()
    interviews(work / "data" / "large.csv", args.participants)
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "persona",
            "serve",
            "--port",
            str(port),
            "--db",
            str(work / "p.db"),
            "--data-dir",
            str(work / "data"),
            "--output-dir",
            str(work / "out"),
            "--rate-limit",
            "0",
        ],  # only the polling here would meet the limit
        cwd=work,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)
        started = time.monotonic()
        ids = [
            httpx.post(f"{url}/api/v1/generate", json={"data": "large.csv", "count": 5}).json()["job_id"]
            for _ in range(args.jobs)
        ]
        peak, children = 0.0, 0
        while True:
            pids = tree(server.pid)
            peak = max(peak, sum(rss_mb(pid) for pid in pids))
            children = max(children, len(pids) - 1)
            statuses = [httpx.get(f"{url}/api/v1/generate/{job_id}").json()["status"] for job_id in ids]
            if all(status in ("completed", "failed") for status in statuses):
                break
            time.sleep(0.2)
        print(
            json.dumps(
                {
                    "jobs": args.jobs,
                    "participants": args.participants,
                    "csv_mb": round((work / "data" / "large.csv").stat().st_size / 2**20, 1),
                    "peak_rss_mb": round(peak),
                    "most_processes_below_server": children,
                    "completed": statuses.count("completed"),
                    "seconds": round(time.monotonic() - started, 1),
                }
            )
        )
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
