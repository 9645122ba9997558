"""Recovery: what a crash, a stop or a cancel leaves behind is cleaned up, and limits hold across servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Receiver, Server, submit, wait_for, wait_job
from fake_providers import FakeProvider, participants_in
from test_generation import write_many_participants

import persona

# Enough participants that the engine computes for many seconds in its own process, far
# longer than the deadlines below: a computation that outlives its job or its server shows.
LONG_COMPUTATION = 40_000
INVENTED = "I have never said anything like this sentence."
RETENTION_DAYS = 0.00001  # under a second


# -- processes ---------------------------------------------------------------


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting to be reaped."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def cpu_seconds(pid: int) -> float:
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def is_engine_process(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def engine_children(parent: int) -> list[int]:
    """The parent's child processes that multiprocessing spawned (not its resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == parent and is_engine_process(int(entry.name)):
                found.append(int(entry.name))
    return found


@pytest.fixture
def engine_pids() -> Iterator[list[int]]:
    """Engine processes the test saw; any still alive at the end (a failed test) are killed."""
    seen: list[int] = []
    yield seen
    for pid in seen:
        if running(pid) and is_engine_process(pid):
            os.kill(pid, signal.SIGKILL)


def computing_child(server: Server, seen: list[int]) -> int | None:
    """An engine process of the server that is well into its computation (a second of CPU)."""
    assert server.process is not None
    for pid in engine_children(server.process.pid):
        if pid not in seen:
            seen.append(pid)
        if cpu_seconds(pid) >= 1.0:
            return pid
    return None


def many(workdir: Path, count: int) -> str:
    write_many_participants(workdir / "data" / "many.csv", count)
    return "many.csv"


def dead_pid() -> int:
    return max(int(p) for p in os.listdir("/proc") if p.isdigit()) + 100000


def folders_of(output: Path, job_id: str) -> list[Path]:
    return sorted(path for path in output.iterdir() if job_id in path.name)


def new_job(db: str, request: dict[str, Any]) -> tuple[str, str]:
    """A pending job put in the database in-process, as an earlier server would have: (job id, created_at)."""

    async def create() -> tuple[str, str]:
        store = persona.open_store(persona.Settings(db=persona.parse_setting("db", db)))
        await store.open()
        try:
            job_id = (await store.create_job("ip:127.0.0.1", request, 10, None)).job_id
            return job_id, (await store.get_job(job_id))["created_at"]
        finally:
            await store.close()

    return asyncio.run(create())


# -- output folders ----------------------------------------------------------


def test_a_complete_folder_left_by_a_crash_before_the_result_was_recorded_is_replaced_by_the_rerun(
    start_server, workdir: Path, database: Callable[..., str]
) -> None:
    job_id, created_at = new_job(database(), {"data": "interviews.csv", "count": 3})
    output = workdir / "output"
    folder = persona.output_folder(output, job_id, created_at)
    folder.mkdir(parents=True)  # renamed into place, then the crash: the database still says pending
    (folder / "from-the-crashed-run.txt").write_text("an earlier run's file")
    server = start_server("--rate-limit", "0")
    with server.client() as http:
        job = wait_job(http, job_id)
    assert job["status"] == "completed", job["error"]
    assert folders_of(output, job_id) == [folder]
    assert Path(job["result"]["output_path"]) == folder
    assert not (folder / "from-the-crashed-run.txt").exists()
    assert json.loads((folder / "personas.json").read_text())["personas"] == job["result"]["personas"]


def test_start_up_removes_half_written_folders_only_of_dead_processes_of_this_host(start_server, workdir: Path) -> None:
    output = workdir / "output"
    host = persona.this_host()  # the host name and the process namespace
    dead = output / f".20260101_000000_job-x~{host}~{dead_pid()}~abcd.partial"
    live = output / f".20260101_000000_job-y~{host}~{os.getpid()}~abcd.partial"
    elsewhere = output / f".20260101_000000_job-z~not-{host}~{dead_pid()}~abcd.partial"
    other_container = output / f".20260101_000000_job-v~{socket.gethostname()}~1~{dead_pid()}~abcd.partial"
    long_left = output / f".20260101_000000_job-w~not-{host}~{dead_pid()}~abcd.partial"
    for folder in (dead, live, elsewhere, other_container, long_left):
        folder.mkdir(parents=True)
        (folder / "personas.json").write_text("{}")
    two_hours_ago = time.time() - 2 * persona.PARTIAL_MAX_AGE_S
    os.utime(long_left, (two_hours_ago, two_hours_ago))
    start_server("--rate-limit", "0")
    wait_for(lambda: not dead.exists(), timeout=5, what="the dead process's half-written folder to go")
    wait_for(lambda: not long_left.exists(), timeout=5, what="a folder no writer has touched for hours to go")
    assert (live / "personas.json").exists()  # a live process may still be writing it
    assert (elsewhere / "personas.json").exists()  # whether that host's process lives cannot be told here
    assert (other_container / "personas.json").exists()  # nor a process in another container of this name


# -- engine processes --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "how", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["killed", "terminated", "interrupted"]
)
def test_an_engine_process_ends_with_its_server_however_the_server_ends(
    start_server, workdir: Path, engine_pids: list[int], how: int
) -> None:
    data = many(workdir, LONG_COMPUTATION)
    server = start_server("--rate-limit", "0")
    assert server.process is not None
    with server.client() as http:
        submit(http, data=data, count=3)
    child = wait_for(lambda: computing_child(server, engine_pids), timeout=60, what="the engine process to compute")
    os.kill(server.process.pid, how)  # the server alone, as a crash or `docker stop` does: not its process group
    wait_for(lambda: not running(child), timeout=5, what="the engine process to end with its server")
    server.process.wait(15)
    assert not [pid for pid in engine_pids if running(pid)]


@pytest.mark.slow
def test_cancelling_a_job_stops_its_computation(start_server, workdir: Path, engine_pids: list[int]) -> None:
    data = many(workdir, LONG_COMPUTATION)
    server = start_server("--rate-limit", "0")
    with server.client() as http:
        job_id = submit(http, data=data, count=3)
        child = wait_for(lambda: computing_child(server, engine_pids), timeout=60, what="the engine process to compute")
        cancelled = http.delete(f"/api/v1/generate/{job_id}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "failed"
        wait_for(lambda: not running(child), timeout=5, what="the cancelled job's computation to stop")
        assert wait_job(http, submit(http, data="interviews.csv"))["status"] == "completed"  # its engine slot is free
        job = http.get(f"/api/v1/generate/{job_id}").json()
    assert (job["status"], job["error"], job["result"]) == ("failed", "cancelled", None)
    assert folders_of(workdir / "output", job_id) == []
    assert not [pid for pid in engine_pids if running(pid)]


@pytest.mark.slow
def test_jobs_waiting_for_an_engine_slot_spend_no_attempts_when_the_server_is_killed_again_and_again(
    start_server, workdir: Path
) -> None:
    data = many(workdir, persona.ENGINE_PROCESS_FROM + 500)  # large enough for a process, quick to compute
    server = start_server("--rate-limit", "0", "--max-concurrent-jobs", "100")
    assert server.process is not None
    with server.client() as http:
        # Two compute at a time and seven wait: by the third kill six are done, two compute and one has
        # waited through all three kills, which would have spent its every attempt.
        job_ids = [submit(http, data=data, count=3) for _ in range(9)]

    def completed(http: httpx.Client) -> int:
        return int(http.get("/api/v1/generate", params={"status": "completed"}).headers["X-Total-Count"])

    for kill in range(1, 4):
        with server.client() as http:
            # Each life of the server finishes a couple of jobs, then dies with others computing and the rest waiting.
            wait_for(
                lambda kill=kill: completed(http) >= 2 * kill and engine_children(server.process.pid),
                timeout=60,
                what=f"two more jobs to complete and more to compute before kill {kill}",
            )
        server.kill()
        server.start()
    with server.client() as http:
        jobs = [wait_job(http, job_id, timeout=60) for job_id in job_ids]
    assert [job["error"] for job in jobs if job["status"] != "completed"] == []


# -- retention ---------------------------------------------------------------


@pytest.mark.slow
def test_finished_jobs_past_the_retention_go_with_their_deliveries_and_folders(
    start_server, workdir: Path, receiver: Receiver
) -> None:
    server = start_server("--rate-limit", "0", "--retention-days", str(RETENTION_DAYS))
    with server.client() as http:
        webhook_id = http.post("/api/v1/webhooks", json={"url": receiver.url}).json()["webhook_id"]
        job = wait_job(http, submit(http, data="interviews.csv"))
        assert job["status"] == "completed", job["error"]
        deliveries = f"/api/v1/webhooks/{webhook_id}/deliveries"
        wait_for(lambda: [d["status"] for d in http.get(deliveries).json()] == ["delivered"], what="the delivery")
    folder = Path(job["result"]["output_path"])
    assert folder.is_dir()
    server.stop()
    # Times are kept to the second: the job is past its retention once a whole second more has gone by.
    finished = datetime.fromisoformat(job["completed_at"].replace("Z", "+00:00")).timestamp()
    wait_for(lambda: time.time() > finished + 1 + RETENTION_DAYS * 86400, what="the job to pass its retention")
    server.start()
    with server.client() as http:
        wait_for(
            lambda: http.get(f"/api/v1/generate/{job['job_id']}").status_code == 404,
            timeout=10,
            what="the expired job to be deleted",
        )
        assert http.get(deliveries).json() == []
        assert http.get(f"/api/v1/webhooks/{webhook_id}").status_code == 200  # the webhook itself stays
    assert not folder.exists()
    assert folders_of(workdir / "output", job["job_id"]) == []


# -- limits across servers ---------------------------------------------------


@pytest.mark.slow
def test_two_servers_on_one_database_share_one_rate_limit(start_server) -> None:
    first = start_server("--rate-limit", "10")
    second = start_server("--rate-limit", "10")
    statuses = []
    with first.client() as a, second.client() as b:
        for n in range(30):
            statuses.append((a if n % 2 == 0 else b).get("/api/v1/generate").status_code)
    assert statuses.count(200) == 10
    assert statuses.count(429) == 20


# -- LLM evidence ------------------------------------------------------------


def with_personas(change: Callable[[str, dict[str, Any]], None]) -> Callable[[str, Any], Any]:
    """A scripted answer: the fake's usual one, each persona changed by `change(prompt, persona)`."""

    def answer(prompt: str, usual: Any) -> Any:
        for item in usual["personas"]:
            change(prompt, item)
        return usual

    return answer


def run_openai_job(start_server, fake: FakeProvider, count: int) -> dict[str, Any]:
    server = start_server("--rate-limit", "0", env=fake.environment("openai"))
    with server.client() as http:
        job = wait_job(http, submit(http, data="interviews.csv", count=count, provider="openai"))
    assert job["status"] == "completed", job["error"]
    return job


def test_a_persona_that_stands_for_nobody_in_the_data_goes_back_for_repair(start_server, fake: FakeProvider) -> None:
    def nobody(_: str, item: dict[str, Any]) -> None:
        item["participants"], item["quotes"] = [], [INVENTED]

    fake.script = [with_personas(nobody)]
    job = run_openai_job(start_server, fake, 2)
    exchanges = json.loads((Path(job["result"]["output_path"]) / "exchanges.json").read_text())
    assert [exchange["purpose"] for exchange in exchanges] == ["personas", "personas (repair)"]
    assert "names no participant id" in exchanges[1]["prompt"]
    assert all(p["evidence"]["participants"] for p in job["result"]["personas"])


def test_a_persona_quoting_a_participant_verbatim_counts_them_in_its_evidence(start_server, fake: FakeProvider) -> None:
    def quoting_p02(prompt: str, item: dict[str, Any]) -> None:
        if item["name"] == "Model Person 1":
            said = dict(participants_in(prompt))["P02"]
            item["participants"], item["quotes"] = ["P99-nobody"], [said[0]]

    fake.script = [with_personas(quoting_p02)]
    job = run_openai_job(start_server, fake, 2)
    first = job["result"]["personas"][0]
    assert first["name"] == "Model Person 1" and len(first["quotes"]) == 1 and "unverified_quotes" not in first
    assert first["evidence"]["participants"] == ["P02"]
    assert first["evidence"]["share"] == round(1 / 16, 4)
    assert len(fake.requests) == 1  # grounded by its quote, so no repair was needed
