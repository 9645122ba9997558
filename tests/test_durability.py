"""Nothing accepted is lost: crashes, restarts and several workers on one database."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import GatedDataServer, Server, submit, wait_for, wait_job

import persona

pytestmark = pytest.mark.slow


def attempts(server: Server, job_id: str) -> int:
    return server.query(f"SELECT attempts FROM jobs WHERE job_id = '{job_id}'")[0][0]


def test_a_job_running_when_the_server_is_killed_runs_again_after_restart(
    start_server, workdir: Path, gated_data: GatedDataServer
) -> None:
    server = start_server("--rate-limit", "0")
    with server.client() as http:
        job_id = submit(http, data=gated_data.url, count=4)
        wait_job(http, job_id, until=("running",))
    wait_for(lambda: gated_data.requests, what="the job's work to begin (its attempt counted)")
    server.crash_and_restart(meanwhile=gated_data.gate.set)
    with server.client() as http:
        job = wait_job(http, job_id)
    assert job["status"] == "completed", job["error"]
    assert len(job["result"]["personas"]) == 4
    assert attempts(server, job_id) == 2


def test_pending_jobs_and_webhooks_survive_a_kill(start_server, gated_data: GatedDataServer) -> None:
    server = start_server("--rate-limit", "0", "--max-concurrent-jobs", "100")
    with server.client() as http:
        blockers = [submit(http, data=gated_data.url) for _ in range(persona.JOBS_PER_PROCESS)]
        for job_id in blockers:
            wait_job(http, job_id, until=("running",))
        queued = [submit(http, data="interviews.csv") for _ in range(3)]
        webhook = http.post("/api/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"}).json()
        assert all(http.get(f"/api/v1/generate/{j}").json()["status"] == "pending" for j in queued)
    server.crash_and_restart(meanwhile=gated_data.gate.set)
    with server.client() as http:
        for job_id in blockers + queued:
            assert wait_job(http, job_id)["status"] == "completed"
        assert http.get(f"/api/v1/webhooks/{webhook['webhook_id']}").json() == webhook


def test_a_job_interrupted_three_times_fails_saying_so(
    start_server, workdir: Path, gated_data: GatedDataServer
) -> None:
    server = start_server("--rate-limit", "0")
    with server.client() as http:
        job_id = submit(http, data=gated_data.url)
    for attempt in range(1, 4):
        with server.client() as http:
            wait_for(lambda attempt=attempt: attempts(server, job_id) == attempt, what=f"attempt {attempt}")
            wait_job(http, job_id, until=("running",))
        server.kill()
        server.start()
    with server.client() as http:
        job = wait_job(http, job_id)
    assert job["status"] == "failed"
    assert "interrupted 3 times" in job["error"]


def test_a_graceful_stop_hands_running_jobs_back_without_spending_an_attempt(
    start_server, workdir: Path, gated_data: GatedDataServer
) -> None:
    server = start_server("--rate-limit", "0")
    with server.client() as http:
        job_id = submit(http, data=gated_data.url)
        wait_job(http, job_id, until=("running",))
    server.stop()
    assert server.query(f"SELECT status, attempts FROM jobs WHERE job_id = '{job_id}'") == [("pending", 0)]
    gated_data.gate.set()
    server.start()
    with server.client() as http:
        assert wait_job(http, job_id)["status"] == "completed"


def test_two_workers_share_one_database_and_run_each_job_once(start_server, workdir: Path) -> None:
    server = start_server("--workers", "2", "--rate-limit", "0", "--max-concurrent-jobs", "100")
    with server.client() as http:
        job_ids = [submit(http, data="interviews.csv", count=3) for _ in range(24)]
        for job_id in job_ids:
            assert wait_job(http, job_id, timeout=60)["status"] == "completed"
        assert http.get("/api/v1/generate").headers["X-Total-Count"] == "24"
    assert server.query("SELECT attempts, COUNT(*) FROM jobs GROUP BY attempts") == [(1, 24)]
    assert len([path for path in (workdir / "output").iterdir() if path.is_dir()]) == 24  # a folder per job


def test_two_servers_on_one_database_see_each_others_jobs(start_server) -> None:
    first = start_server("--rate-limit", "0")
    second = start_server("--rate-limit", "0")
    with first.client() as a, second.client() as b:
        job_id = submit(a, data="interviews.csv")
        assert wait_job(b, job_id)["status"] == "completed"


def test_the_rate_limit_holds_across_workers_as_a_whole(start_server) -> None:
    server = start_server("--workers", "3", "--rate-limit", "12")
    statuses = []
    for _ in range(24):
        # A fresh connection each time, so the kernel spreads requests over the workers.
        with httpx.Client(base_url=server.url) as http:
            statuses.append(http.get("/api/v1/generate").status_code)
    assert statuses.count(200) == 12
    assert statuses.count(429) == 12
