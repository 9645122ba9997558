"""Two versions of Persona side by side: fresh servers of each in turn, the same requests.

    git worktree add /tmp/before <rev>
    python bench/ab.py /tmp/before .                 # 10 rounds of 5 s per endpoint
    python bench/ab.py /tmp/before . --rounds 6 --seconds 3

On a noisy machine a whole `bench.py` run of one version and then of the other differs as
much as two runs of one version. Here each round starts a fresh server of each version in
turn (server on core 0, wrk on core 1, as bench.py does) and measures the endpoints on
it, so both versions meet the same noise; the report gives each version's median requests
per second per endpoint and every round's figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench import TOKEN, Process, SlowProvider, free_port, post_script, wait_until_up, wrk

ENDPOINTS = ("GET /api/v1/health", "GET /api/v1/generate/{job_id}", "POST /api/v1/generate")


def start(tree: Path, work: Path, slow: SlowProvider) -> tuple[Process, str, str]:
    """A fresh server of the version in `tree`, with one completed job of 5 personas."""
    folder = Path(tempfile.mkdtemp(dir=work))
    (folder / "data").mkdir()
    shutil.copy(tree / "examples" / "interviews.csv", folder / "data" / "interviews.csv")
    port = free_port()
    command = [sys.executable, "-m", "persona", "serve", "--port", str(port), "--db", str(folder / "ab.db")]
    command += ["--data-dir", str(folder / "data"), "--output-dir", str(folder / "output"), "--auth-token", TOKEN]
    command += ["--rate-limit", "1000000000", "--max-concurrent-jobs", "1000000", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(tree), "OLLAMA_HOST": slow.url}
    server, url = Process(command, env, folder), f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/api/v1/health")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    job_id = httpx.post(f"{url}/api/v1/generate", headers=headers, json={"data": "interviews.csv", "count": 5}).json()[
        "job_id"
    ]
    while httpx.get(f"{url}/api/v1/generate/{job_id}").json()["status"] not in ("completed", "failed"):
        time.sleep(0.05)
    return server, url, job_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs=2, type=Path, help="two checkouts of Persona (folders holding persona.py)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.trees]
    work, slow = Path(tempfile.mkdtemp(prefix="persona-ab-")), SlowProvider(delay=5.0)
    script = post_script(work, {"data": "interviews.csv", "count": 3, "provider": "ollama"})
    runs: dict[tuple[Path, str], list[float]] = {(tree, name): [] for tree in trees for name in ENDPOINTS}
    try:
        for _ in range(args.rounds):
            for tree in trees:
                server, url, job_id = start(tree, work, slow)
                try:
                    paths = {
                        "GET /api/v1/health": "/api/v1/health",
                        "GET /api/v1/generate/{job_id}": f"/api/v1/generate/{job_id}",
                    }
                    wrk(url + "/api/v1/health", 1)  # warm
                    for name, path in paths.items():
                        runs[(tree, name)].append(wrk(url + path, args.seconds)["rps"])
                    runs[(tree, "POST /api/v1/generate")].append(
                        wrk(url + "/api/v1/generate", args.seconds, script=script)["rps"]
                    )
                finally:
                    server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name in ENDPOINTS:
        print(name)
        for tree in trees:
            figures = runs[(tree, name)]
            print(f"  {statistics.median(figures):8,.0f} req/s  {tree}  {[round(x) for x in figures]}")


if __name__ == "__main__":
    main()
