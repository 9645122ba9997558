"""Faults: crashes with work in flight, many workers at once, and clients that misbehave."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import socket
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import GatedDataServer, Receiver, Server, submit, wait_for, wait_job

import persona

pytestmark = pytest.mark.slow


def statuses(server: Server) -> Counter:
    return Counter(dict(server.query("SELECT status, COUNT(*) FROM jobs GROUP BY status")))


def test_a_kill_with_20_jobs_in_flight_and_deliveries_queued_loses_nothing(
    start_server, workdir: Path, gated_data: GatedDataServer, receiver: Receiver
) -> None:
    receiver.answers = [503, 200]  # the first deliveries fail, so some are queued for retry at the kill
    server = start_server("--rate-limit", "0", "--max-concurrent-jobs", "100", "--webhook-retry-schedule", "1,1,1")
    with server.client() as http:
        webhook_id = http.post("/api/v1/webhooks", json={"url": receiver.url}).json()["webhook_id"]
        quick = [submit(http, data="interviews.csv") for _ in range(10)]
        slow = [submit(http, data=gated_data.url) for _ in range(10)]
        for job_id in quick:
            wait_job(http, job_id)
        wait_for(lambda: receiver.requests, what="a first delivery attempt")
        wait_for(
            lambda: all(http.get(f"/api/v1/generate/{j}").json()["status"] == "running" for j in slow),
            what="the gated jobs to run",
        )
    server.crash_and_restart(meanwhile=gated_data.gate.set)
    with server.client() as http:
        for job_id in quick + slow:
            assert wait_job(http, job_id)["status"] == "completed"

        def all_delivered() -> list | None:
            log = http.get(f"/api/v1/webhooks/{webhook_id}/deliveries").json()
            return log if len(log) == 20 and all(d["status"] == "delivered" for d in log) else None

        log = wait_for(all_delivered, timeout=60, what="every delivery")
    assert statuses(server) == Counter({"completed": 20})
    delivered = {json.loads(r["body"])["data"]["job_id"] for r in receiver.requests}
    assert delivered == set(quick + slow)
    assert {d["job_id"] for d in log} == set(quick + slow)
    assert server.query("SELECT COUNT(*) FROM deliveries") == [(20,)]


def test_four_workers_run_200_jobs_once_and_send_each_delivery_attempt_once(
    start_server, workdir: Path, receiver: Receiver
) -> None:
    server = start_server("--workers", "4", "--rate-limit", "0", "--max-concurrent-jobs", "1000")
    with server.client() as http:
        http.post("/api/v1/webhooks", json={"url": receiver.url})

    def post(_: int) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            return http.post("/api/v1/generate", json={"data": "interviews.csv", "count": 3})

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(post, range(200)))
    assert Counter(a.status_code for a in answers) == Counter({200: 200})
    assert not any("locked" in a.text for a in answers)
    job_ids = {a.json()["job_id"] for a in answers}
    with server.client() as http:
        for job_id in job_ids:
            assert wait_job(http, job_id, timeout=180)["status"] == "completed"
    wait_for(lambda: len(receiver.requests) >= 200, timeout=60, what="200 deliveries")
    sent = Counter(json.loads(r["body"])["data"]["job_id"] for r in receiver.requests)
    assert set(sent) == job_ids
    # Each delivery is claimed by one worker and each attempt sent once. On a machine this loaded the
    # receiver may answer an attempt after the webhook timeout: then, and only then, it is sent again.
    attempts = server.query(
        "SELECT d.job_id, a.error FROM deliveries d JOIN delivery_attempts a ON a.delivery_id = d.delivery_id "
        "ORDER BY a.attempted_at"
    )
    for job_id, times in sent.items():
        errors = [error for job, error in attempts if job == job_id]
        assert times <= len(errors), (job_id, times, errors)
        assert all(error and error.startswith("no answer within") for error in errors[: times - 1]), errors
    assert server.query("SELECT MAX(attempts) FROM jobs") == [(1,)]
    assert "database is locked" not in server.log()


def raw_connection(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def test_a_client_that_disconnects_mid_request_changes_nothing(server: Server, workdir: Path) -> None:
    for _ in range(20):
        sock = raw_connection(server)
        body = b'{"data": "interviews.csv", "count": 3}'
        sock.sendall(
            b"POST /api/v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body[:10]
        )
        sock.close()
    with server.client() as http:
        assert http.get("/api/v1/health").status_code == 200
        assert http.get("/api/v1/generate").json() == []


def test_a_body_that_trickles_in_holds_up_no_one_else(server: Server) -> None:
    body = b'{"data": "interviews.csv", "count": 3}'
    sock = raw_connection(server)
    sock.sendall(
        b"POST /api/v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    with server.client() as http:
        for index, byte in enumerate(body):
            sock.sendall(bytes([byte]))
            if index % 8 == 0:
                assert http.get("/api/v1/health").status_code == 200
    answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200")


def test_a_thousand_idle_connections_leave_the_server_responsive(start_server) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    try:
        server = start_server("--rate-limit", "0")
        idle = [raw_connection(server) for _ in range(1000)]
        try:
            with server.client() as http:
                for _ in range(20):
                    assert http.get("/api/v1/health").status_code == 200
                assert wait_job(http, submit(http, data="interviews.csv"))["status"] == "completed"
        finally:
            for sock in idle:
                sock.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.sqlite_only
def test_a_vanished_database_path_is_reported_and_recovered_from(start_server, workdir: Path) -> None:
    server = start_server("--rate-limit", "0", db="state/persona.db")
    with server.client() as http:
        job_id = wait_job(http, submit(http, data="interviews.csv"))["job_id"]
        os.rename(workdir / "state", workdir / "state-away")
        health = http.get("/api/v1/health")
        assert health.status_code == 503
        assert health.json()["status"] == "unhealthy" and "persona.db" in health.json()["reason"]
        assert str(workdir) not in health.text  # health answers anyone: the file by name, not its path
        refused = http.post("/api/v1/generate", json={"data": "interviews.csv"})
        assert refused.status_code == 503 and refused.json()["error"] == "internal_error"
        assert "database" in refused.json()["message"]
        os.rename(workdir / "state-away", workdir / "state")
        assert http.get("/api/v1/health").status_code == 200
        assert http.get(f"/api/v1/generate/{job_id}").json()["status"] == "completed"
        assert wait_job(http, submit(http, data="interviews.csv"))["status"] == "completed"


needs_mount_namespace = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare to give the server a small disk of its own (CI has both)",
)


def on_small_disk(folder: Path, size: str = "8m") -> list[str]:
    """A command prefix that runs the server with `folder` on a tmpfs of `size`, seen only by the server."""
    script = 'mount -t tmpfs -o size="$1" persona-test "$2" && shift 2 && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", size, str(folder)]


def fill(path: Path) -> None:
    """Write zeros to `path` until its filesystem has no room left."""
    chunk = bytes(64 * 1024)
    with open(path, "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def unhealthy(http: httpx.Client) -> dict | None:
    response = http.get("/api/v1/health")
    return response.json() if response.status_code == 503 else None


async def test_a_job_that_begins_while_the_database_refuses_writes_waits_and_then_begins() -> None:
    class RefusingOnce:
        calls = 0

        async def begin_attempt(self, job_id: str, worker: str) -> bool:
            self.calls += 1
            if self.calls == 1:
                raise persona.StorageUnavailable("database or disk is full")
            return True

    store = RefusingOnce()
    runner = persona.JobRunner(store, persona.Settings(), lambda: None)  # type: ignore[arg-type]
    await runner._begin("job-0123456789ab")
    assert store.calls == 2 and "job-0123456789ab" in runner.begun


@needs_mount_namespace
@pytest.mark.sqlite_only
def test_a_full_disk_is_reported_refuses_writes_and_loses_nothing_once_space_returns(
    start_server, workdir: Path, gated_data: GatedDataServer, receiver: Receiver
) -> None:
    state = workdir / "state"
    state.mkdir()
    server = start_server("--rate-limit", "0", db="state/persona.db", prefix=on_small_disk(state))
    assert server.process is not None
    disk = Path(f"/proc/{server.process.pid}/root") / state.relative_to("/")  # the server's view of its tmpfs
    assert (disk / "persona.db").exists() and not (state / "persona.db").exists()
    with server.client() as http:
        http.post("/api/v1/webhooks", json={"url": receiver.url, "events": ["generation.completed"]}).raise_for_status()
        finished = wait_job(http, submit(http, data="interviews.csv"))["job_id"]
        running = submit(http, data=gated_data.url)
        wait_job(http, running, until=("running",))
        wait_for(lambda: gated_data.requests == 1, what="the job to have begun, fetching its data")

        fill(disk / "filler")
        health = wait_for(lambda: unhealthy(http), what="health to report the full disk")
        assert health["status"] == "unhealthy" and "database or disk is full" in health["reason"]
        refused = http.post("/api/v1/generate", json={"data": "interviews.csv"})
        assert refused.status_code == 503 and refused.json()["error"] == "internal_error"
        assert (
            "database or disk is full" in refused.json()["message"] and "nothing was saved" in refused.json()["message"]
        )
        gated_data.gate.set()  # the running job finishes while its result cannot be written
        wait_for(lambda: f"cannot save job {running}" in server.log(), what="the runner to hold the unsaved result")
        assert http.get(f"/api/v1/generate/{running}").json()["status"] == "running"
        assert http.get(f"/api/v1/generate/{finished}").json()["status"] == "completed"  # reads go on

        (disk / "filler").unlink()
        wait_for(lambda: http.get("/api/v1/health").status_code == 200, what="health to recover by itself")
        assert wait_job(http, running)["status"] == "completed"
        assert http.get("/api/v1/generate").headers["X-Total-Count"] == "2"  # the refused job never got in
        wait_for(lambda: len(receiver.requests) >= 2, what="both completions to be delivered")
        delivered = sorted(json.loads(request["body"])["data"]["job_id"] for request in receiver.requests)
        assert delivered == sorted([finished, running])
        assert wait_job(http, submit(http, data="interviews.csv"))["status"] == "completed"
