"""Several hosts on one PostgreSQL database: jobs, deliveries and limits hold when a host dies.

Each server runs in a UTS namespace of its own with its own host name, so that it is, to
the others, a server on another machine: a claim it leaves behind is recovered through
its lease, never through a check of its process.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pg_cluster
import pytest
from conftest import GatedDataServer, Receiver, Server, submit, wait_for, wait_job

import persona

pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgres_only,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None,
        reason="needs root and unshare to give each server a host name of its own (CI has both)",
    ),
]


def on_host(name: str) -> list[str]:
    """A command prefix that runs the server under its own host name."""
    return ["unshare", "--uts", "sh", "-c", 'hostname "$1" && shift && exec "$@"', "sh", name]


def three_hosts(start_server: Callable[..., Server], *args: str) -> dict[str, Server]:
    """Three servers on one database, by host name."""
    return {name: start_server(*args, prefix=on_host(name)) for name in ("host-a", "host-b", "host-c")}


def claimers(server: Server, job_ids: list[str]) -> dict[str, str]:
    """Which host runs each of these jobs, from the claims in the database."""
    listed = ", ".join(f"'{job_id}'" for job_id in job_ids)
    rows = server.query(f"SELECT job_id, claimed_by FROM jobs WHERE job_id IN ({listed}) AND claimed_by IS NOT NULL")
    return {job_id: claimed_by.split(":")[0].split("~")[0] for job_id, claimed_by in rows}


def attempts_of(server: Server, job_ids: list[str]) -> dict[str, int]:
    listed = ", ".join(f"'{job_id}'" for job_id in job_ids)
    return dict(server.query(f"SELECT job_id, attempts FROM jobs WHERE job_id IN ({listed})"))


def test_a_host_killed_mid_run_loses_nothing_and_runs_each_job_and_delivery_once(
    start_server: Callable[..., Server], workdir: Path, gated_data: GatedDataServer, receiver: Receiver
) -> None:
    hosts = three_hosts(start_server, "--rate-limit", "0", "--max-concurrent-jobs", "100")
    servers = list(hosts.values())
    with servers[0].client() as http:
        http.post("/api/v1/webhooks", json={"url": receiver.url}).raise_for_status()
    job_ids = []
    for n in range(12):
        with servers[n % 3].client() as http:
            job_ids.append(submit(http, data=gated_data.url, count=3))
    held = wait_for(
        lambda: (found := claimers(servers[0], job_ids)) and len(found) == 12 and found, what="every job to be claimed"
    )
    victim_name = Counter(held.values()).most_common(1)[0][0]
    victims = [job_id for job_id, host in held.items() if host == victim_name]
    # A job fetches its data URL before it takes an engine slot, so every claimed one has begun.
    wait_for(lambda: sum(attempts_of(servers[0], victims).values()) == len(victims), what="the victim's jobs to begin")
    begun_there = {job_id for job_id, spent in attempts_of(servers[0], victims).items() if spent}
    hosts.pop(victim_name).kill()
    gated_data.gate.set()
    survivor = next(iter(hosts.values()))
    with survivor.client() as http:
        jobs = [wait_job(http, job_id, timeout=persona.LEASE_S * 3) for job_id in job_ids]
    assert [job["status"] for job in jobs] == ["completed"] * 12, [job["error"] for job in jobs]
    assert attempts_of(survivor, job_ids) == {job_id: 2 if job_id in begun_there else 1 for job_id in job_ids}
    for job_id in job_ids:
        assert len([path for path in (workdir / "output").iterdir() if job_id in path.name]) == 1
    wait_for(lambda: len(receiver.requests) >= 12, timeout=30, what="12 deliveries")
    delivered = Counter(json.loads(request["body"])["data"]["job_id"] for request in receiver.requests)
    assert set(delivered) == set(job_ids) and set(delivered.values()) == {1}


def test_the_rate_limit_and_the_job_limit_hold_for_three_hosts_together(
    start_server: Callable[..., Server], gated_data: GatedDataServer
) -> None:
    hosts = list(three_hosts(start_server, "--rate-limit", "12", "--max-concurrent-jobs", "4").values())

    def post(n: int) -> httpx.Response:
        with hosts[n % 3].client() as http:
            return http.post("/api/v1/generate", json={"data": gated_data.url})

    with ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(post, range(9)))
    assert Counter(answer.status_code for answer in answers) == Counter({200: 4, 429: 5})
    assert all(answer.json()["details"]["limit"] == 4 for answer in answers if answer.status_code == 429)
    statuses = []
    for n in range(9):
        with hosts[n % 3].client() as http:
            statuses.append(http.get("/api/v1/generate").status_code)
    assert statuses.count(200) == 3 and statuses.count(429) == 6  # 12 a minute for the three, 9 spent above


def test_a_cancel_sent_to_one_host_stops_the_job_running_on_another(
    start_server: Callable[..., Server], gated_data: GatedDataServer
) -> None:
    hosts = three_hosts(start_server, "--rate-limit", "0")
    with hosts["host-a"].client() as http:
        job_id = submit(http, data=gated_data.url)
    runner = wait_for(lambda: claimers(hosts["host-a"], [job_id]).get(job_id), what="the job to be claimed")
    wait_for(lambda: gated_data.requests, what="the job to fetch its data")
    elsewhere = next(server for name, server in hosts.items() if name != runner)
    with elsewhere.client() as http:
        assert http.delete(f"/api/v1/generate/{job_id}").json()["error"] == "cancelled"
    # The heartbeat would find it within HEARTBEAT_S; the notification stops it at once.
    wait_for(lambda: gated_data.abandoned, timeout=persona.HEARTBEAT_S * 0.6, what="the running host to drop the job")


def test_a_postgresql_restart_mid_run_is_reported_then_recovered_from_losing_nothing(
    start_server: Callable[..., Server], workdir: Path, gated_data: GatedDataServer
) -> None:
    with pg_cluster.Cluster(synchronous_commit="on") as cluster:  # it is crashed: commits must be on disk
        url = cluster.create_database("persona")
        hosts = [start_server("--rate-limit", "0", "--db", url, prefix=on_host(f"host-{n}")) for n in "ab"]
        with hosts[0].client() as http:
            running = submit(http, data=gated_data.url)
            wait_job(http, running, until=("running",))
            done = wait_job(http, submit(http, data="interviews.csv"))["job_id"]
        cluster.stop_now()
        with hosts[1].client() as http:
            health = wait_for(
                lambda: (answer := http.get("/api/v1/health")).status_code == 503 and answer.json(),
                what="health to report the database",
            )
            assert health["status"] == "unhealthy" and "PostgreSQL" in health["reason"]
            refused = http.post("/api/v1/generate", json={"data": "interviews.csv"})
            assert refused.status_code == 503 and refused.json()["error"] == "internal_error"
        gated_data.gate.set()  # the running job finishes while its result cannot be written
        cluster.start_again()
        with hosts[1].client() as http:
            wait_for(lambda: http.get("/api/v1/health").status_code == 200, what="health to recover")
            assert wait_job(http, running, timeout=60)["status"] == "completed"
            assert http.get(f"/api/v1/generate/{done}").json()["status"] == "completed"
            assert wait_job(http, submit(http, data="interviews.csv"))["status"] == "completed"
        for server in hosts:
            server.kill()
