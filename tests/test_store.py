"""The stores, SQLite and PostgreSQL: one schema each, atomic claims, quotas, recovery of interrupted jobs."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import persona

ROOT = Path(__file__).resolve().parent.parent
OpenStore = Callable[[], Awaitable[persona.Store]]


@pytest.fixture
async def open_store(database: Callable[..., str]) -> AsyncIterator[OpenStore]:
    """Open stores on one fresh database of the test's backend; all close at teardown."""
    opened: list[persona.Store] = []

    async def open_one() -> persona.Store:
        store = persona.open_store(persona.Settings(db=persona.parse_setting("db", database())))
        await store.open()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


async def execute(store: persona.Store, statement: str) -> list[tuple[Any, ...]]:
    """A statement run beside the store, on a connection of the test's own, as an operator would."""
    if isinstance(store, persona.SQLiteStore):
        with sqlite3.connect(store.path) as conn:
            return [tuple(row) for row in conn.execute(statement)]
    import asyncpg

    conn = await asyncpg.connect(store.url)
    try:
        return [tuple(row) for row in await conn.fetch(statement)]
    finally:
        await conn.close()


async def create(
    store: persona.Store,
    owner: str = "ip:x",
    request: dict[str, Any] | None = None,
    limit: int = 100,
    idempotency: tuple[str, str] | None = None,
) -> str:
    admission = await store.create_job(owner, request or {"data": "a.csv"}, limit, idempotency)
    assert admission.job_id is not None, admission
    return admission.job_id


def public_methods(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_") and callable(getattr(cls, name))}


# -- schema ------------------------------------------------------------------


def test_the_schema_files_are_the_schemas_the_module_applies() -> None:
    assert (ROOT / "persona_store.sql").read_text() == persona.SCHEMA
    assert (ROOT / "persona_store_pg.sql").read_text() == persona.PG_SCHEMA
    check = "CHECK (status IN ({}))".format(", ".join(f"'{status}'" for status in persona.DELIVERY_STATUSES))
    assert check in persona.SCHEMA and check in persona.PG_SCHEMA


def test_both_stores_offer_the_methods_the_store_interface_declares() -> None:
    assert public_methods(persona.SQLiteStore) == public_methods(persona.PostgresStore) == public_methods(persona.Store)
    assert not persona.SQLiteStore.__abstractmethods__ and not persona.PostgresStore.__abstractmethods__
    assert {"claim_job", "requeue_orphans", "claim_deliveries", "rate_hit", "listen"} <= public_methods(
        persona.SQLiteStore
    )


@pytest.mark.sqlite_only
async def test_a_new_sqlite_database_gets_the_schema_its_version_and_wal(open_store: OpenStore, backend: str) -> None:
    store = await open_store()
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == persona.SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"jobs", "webhooks", "experiments", "idempotency_keys", "rate_limits"} <= tables


async def test_a_database_from_a_newer_persona_is_refused(
    open_store: OpenStore, database: Callable[..., str], backend: str
) -> None:
    store = await open_store()
    if backend == "sqlite":
        await execute(store, f"PRAGMA user_version = {persona.SCHEMA_VERSION + 1}")
    else:
        await execute(store, f"UPDATE persona_schema SET version = {persona.PG_SCHEMA_VERSION + 1}")
    with pytest.raises(persona.ConfigError, match="newer Persona"):
        await open_store()


async def test_a_database_of_the_version_before_is_upgraded_keeping_its_jobs(
    open_store: OpenStore, backend: str
) -> None:
    store = await open_store()
    job_id = await create(store)
    await execute(store, "DROP TABLE webhook_owners")  # the latest version of each store added it
    if backend == "sqlite":
        await execute(store, f"PRAGMA user_version = {persona.SCHEMA_VERSION - 1}")
        added = "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'webhook_owners'"
    else:
        await execute(store, f"UPDATE persona_schema SET version = {persona.PG_SCHEMA_VERSION - 1}")
        added = "SELECT tablename FROM pg_tables WHERE tablename = 'webhook_owners'"
    upgraded = await open_store()
    assert len(await execute(upgraded, added)) == 1
    assert (await upgraded.get_job(job_id))["status"] == "pending"
    assert (await upgraded.create_job("ip:x", {"data": "b.csv"}, 100, None)).job_id


async def test_opening_twice_keeps_the_data(open_store: OpenStore, backend: str) -> None:
    job_id = await create(await open_store())
    assert (await (await open_store()).get_job(job_id))["status"] == "pending"


def test_a_database_url_is_shown_without_its_password() -> None:
    shown = persona.shown_db("postgresql://persona:s3cret-pw@db.internal:5432/persona")
    assert "s3cret-pw" not in shown and shown == "postgresql://persona:***@db.internal:5432/persona"
    assert "s3cret-pw" not in persona.shown_db("postgresql://persona@db/persona?sslmode=require&password=s3cret-pw")
    for written in (
        "postgresql://bob:s3cr#t-pw@db.example/persona",
        "postgresql://bob:a/b?s3cr@db.example/persona",
        "postgresql://bob@db/persona?sslpassword=s3cret-pw",
    ):
        assert "s3cr" not in persona.shown_db(written), written


def test_a_postgresql_url_without_its_driver_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    with pytest.raises(persona.ConfigError, match=r"pip install 'persona\[postgres\]'"):
        persona.open_store(persona.Settings(db="postgresql://persona@localhost/persona"))


# -- claims and recovery -----------------------------------------------------


async def test_each_pending_job_is_claimed_by_exactly_one_of_several_stores(
    open_store: OpenStore, backend: str
) -> None:
    stores = [await open_store() for _ in range(3)]
    created = [await create(stores[0]) for _ in range(30)]

    async def claim_all(store: persona.Store, worker: str) -> list[str]:
        claimed = []
        while job := await store.claim_job(worker):
            claimed.append(job["job_id"])
        return claimed

    results = await asyncio.gather(*(claim_all(store, f"w{i}") for i, store in enumerate(stores)))
    assert sorted(job for result in results for job in result) == sorted(created)


async def test_an_interrupted_job_is_requeued_then_failed_after_three_attempts_that_began(
    open_store: OpenStore, backend: str
) -> None:
    store = await open_store()
    job_id = await create(store)
    for _ in range(3):
        job = await store.claim_job("gone-host:1:dead")
        assert job is not None and job["job_id"] == job_id and job["request"] == {"data": "a.csv"}
        assert await store.begin_attempt(job_id, "gone-host:1:dead")
        await store.requeue_orphans("here:2:alive", lambda claimed_by, idle: claimed_by.startswith("gone-host"))
    job = await store.get_job(job_id)
    assert job["status"] == "failed"
    assert "interrupted 3 times" in job["error"]


async def test_a_job_claimed_but_never_begun_spends_no_attempt_when_its_server_dies(
    open_store: OpenStore, backend: str
) -> None:
    store = await open_store()
    job_id = await create(store)
    for _ in range(5):  # claimed, waiting for an engine slot, and the server dies: five times over
        assert (await store.claim_job("gone-host:1:dead"))["job_id"] == job_id
        assert await store.requeue_orphans("here:2:alive", lambda claimed_by, idle: True) == [(job_id, "pending")]
    assert (await store.get_job(job_id))["status"] == "pending"
    assert await execute(store, f"SELECT attempts FROM jobs WHERE job_id = '{job_id}'") == [(0,)]


async def test_orphans_are_told_apart_by_the_time_since_their_claimer_was_heard(
    open_store: OpenStore, backend: str
) -> None:
    store = await open_store()
    job_id = await create(store)
    await store.claim_job("elsewhere:1:x")
    heard: list[float | None] = []
    assert await store.requeue_orphans("here:2:y", lambda claimed_by, idle: heard.append(idle) or False) == []
    assert len(heard) == 1 and heard[0] is not None and 0 <= heard[0] < persona.LEASE_S
    assert await store.heartbeat("elsewhere:1:x", [job_id]) == {job_id}
    assert await store.heartbeat("here:2:y", [job_id]) == set()


async def test_a_heartbeat_renews_only_the_jobs_whose_work_still_runs(open_store: OpenStore, backend: str) -> None:
    store = await open_store()
    running, dead = await create(store), await create(store)
    await store.claim_job("w:1:x")
    await store.claim_job("w:1:x")
    await execute(store, "UPDATE jobs SET heartbeat_at = heartbeat_at - 100")  # both last heard 100 s ago
    assert await store.heartbeat("w:1:x", [running]) == {running}  # the other's task has died
    requeued = await store.requeue_orphans("v:2:y", lambda claimed_by, idle: idle > 50)
    assert requeued == [(dead, "pending")]


def test_a_claimer_is_gone_when_its_lease_lapsed_or_its_local_process_died() -> None:
    host = persona.this_host()
    assert persona.claimer_is_gone(f"{host}:{os.getpid()}:x", persona.LEASE_S + 1)
    assert persona.claimer_is_gone(f"{host}:{os.getpid()}:x", None)
    assert not persona.claimer_is_gone(f"{host}:{os.getpid()}:x", 1.0)
    assert not persona.claimer_is_gone(f"elsewhere:{os.getpid()}:x", 1.0)
    # The same host name in another process namespace (a container on the host's network) is another host.
    assert not persona.claimer_is_gone(f"{socket.gethostname()}~1:{dead_pid()}:x", 1.0)
    assert persona.claimer_is_gone(f"{host}:{dead_pid()}:x", 1.0)


def dead_pid() -> int:
    return max(int(p) for p in os.listdir("/proc") if p.isdigit()) + 100000


# -- submissions -------------------------------------------------------------


async def test_the_quota_holds_for_submissions_through_several_stores_at_once(
    open_store: OpenStore, backend: str
) -> None:
    stores = [await open_store() for _ in range(4)]
    outcomes = await asyncio.gather(*(stores[i % 4].create_job("key:a", {"data": "a.csv"}, 5, None) for i in range(20)))
    refused = [outcome for outcome in outcomes if outcome.job_id is None]
    assert len(outcomes) - len(refused) == 5
    assert all(outcome.active == 5 for outcome in refused)
    assert await execute(stores[0], "SELECT COUNT(*) FROM jobs") == [(5,)]


async def test_one_idempotency_key_makes_one_job_however_many_stores_it_reaches_at_once(
    open_store: OpenStore, backend: str
) -> None:
    stores = [await open_store() for _ in range(3)]
    outcomes = await asyncio.gather(
        *(stores[i % 3].create_job("key:a", {"data": "a.csv"}, 10, ("k1", "h" * 64)) for i in range(9))
    )
    assert len({outcome.job_id for outcome in outcomes}) == 1
    assert sum(not outcome.replayed for outcome in outcomes) == 1
    conflict = await stores[1].create_job("key:a", {"data": "b.csv"}, 10, ("k1", "g" * 64))
    assert conflict.conflict and conflict.job_id is None
    assert await execute(stores[0], "SELECT COUNT(*) FROM jobs") == [(1,)]


async def test_idempotency_keys_expire_after_a_day(open_store: OpenStore, backend: str) -> None:
    store = await open_store()
    body_hash = "h" * 64
    first = await create(store, idempotency=("k", body_hash))
    again = await store.create_job("ip:x", {"data": "a.csv"}, 10, ("k", body_hash))
    assert (again.job_id, again.replayed) == (first, True)
    await execute(store, f"UPDATE idempotency_keys SET created_at = created_at - {persona.IDEMPOTENCY_TTL_S + 1}")
    fresh = await store.create_job("ip:x", {"data": "a.csv"}, 10, ("k", body_hash))
    assert fresh.job_id != first and fresh.replayed is False
    assert (await store.get_job(fresh.job_id))["status"] == "pending"


async def test_jobs_of_one_named_experiment_share_its_id_and_others_have_their_own(
    open_store: OpenStore, backend: str
) -> None:
    store = await open_store()
    named = await asyncio.gather(
        *(create(store, request={"data": "a.csv", "config": {"experiment": "study-1"}}) for _ in range(3))
    )
    alone = await create(store)
    rows = dict(await execute(store, "SELECT job_id, experiment_id FROM jobs"))
    assert len({rows[job_id] for job_id in named}) == 1
    assert rows[alone] == persona.own_experiment(alone) != rows[named[0]]


async def test_a_burst_of_submissions_is_inserted_in_batches_within_each_owners_limit(
    open_store: OpenStore, backend: str
) -> None:
    store = await open_store()
    batches = []
    original = store._admit_batch

    async def counting(jobs: dict[str, Any], ids: dict[str, str]) -> dict[str, Any]:
        batches.append(len(jobs))
        return await original(jobs, ids)

    store._admit_batch = counting  # type: ignore[method-assign]
    owners = ["key:a", "key:b"] * 15
    outcomes = await asyncio.gather(*(store.create_job(owner, {"data": "a.csv"}, 7, None) for owner in owners))
    accepted = [owner for owner, outcome in zip(owners, outcomes) if outcome.job_id]
    assert sorted(accepted) == ["key:a"] * 7 + ["key:b"] * 7
    assert len(batches) < len(owners) / 2


def test_job_ids_made_later_sort_after_earlier_ones_and_still_look_like_job_ids() -> None:
    first = persona.new_job_id()
    later = persona.new_job_id()
    while later[4:12] == first[4:12]:
        later = persona.new_job_id()
    assert persona.JOB_ID.match(first) and persona.JOB_ID.match(later)
    assert first[4:12] < later[4:12]


@pytest.mark.parametrize("idempotency", [None, ("key-1", "h" * 64)], ids=["plain", "idempotent"])
async def test_a_new_job_whose_id_is_taken_goes_in_under_another(
    open_store: OpenStore, backend: str, monkeypatch: pytest.MonkeyPatch, idempotency: tuple[str, str] | None
) -> None:
    store = await open_store()
    taken = await create(store, owner="key:a")
    fresh = persona.new_job_id
    handed_out = iter([taken, taken])
    monkeypatch.setattr(persona, "new_job_id", lambda: next(handed_out, None) or fresh())
    job_id = await create(store, owner="key:a", request={"data": "b.csv"}, idempotency=idempotency)
    assert job_id != taken and persona.JOB_ID.match(job_id)
    rows = dict(await execute(store, "SELECT job_id, request FROM jobs"))
    assert json.loads(rows[taken]) == {"data": "a.csv"} and json.loads(rows[job_id]) == {"data": "b.csv"}


async def test_the_job_counters_follow_every_change_of_status(open_store: OpenStore, backend: str) -> None:
    store = await open_store()
    jobs = [await create(store, owner=owner) for owner in ("key:a", "key:a", "key:b")]
    await store.claim_job("w")
    await store.cancel_job(jobs[1])
    await store.complete_job(jobs[0], "w", {"personas": [], "experiment_id": "exp-x", "output_path": "o/"})
    counted = set(await execute(store, "SELECT owner, status, n FROM job_counts WHERE n > 0"))
    actual = set(await execute(store, "SELECT owner, status, COUNT(*) FROM jobs GROUP BY owner, status"))
    assert counted == actual == {("key:a", "completed", 1), ("key:a", "failed", 1), ("key:b", "pending", 1)}
    assert await store.active_jobs("key:b") == 1


@pytest.mark.sqlite_only
async def test_an_older_database_gets_its_counters_when_upgraded(open_store: OpenStore, backend: str) -> None:
    store = await open_store()
    for _ in range(3):
        await create(store, owner="key:a")
    await execute(store, "DELETE FROM job_counts")
    await execute(store, "PRAGMA user_version = 2")
    upgraded = await open_store()
    assert await execute(upgraded, "SELECT owner, status, n FROM job_counts") == [("key:a", "pending", 3)]


# -- webhooks, deliveries and limits ---------------------------------------------


async def test_a_finished_job_queues_one_delivery_per_subscribed_webhook_in_its_transaction(
    open_store: OpenStore, backend: str
) -> None:
    store = await open_store()
    completed = await store.create_webhook("http://127.0.0.1:9/a", ["generation.completed"], "s")
    await store.create_webhook("http://127.0.0.1:9/b", ["generation.failed"], None)
    job_id = await create(store, request={"data": "a.csv", "webhook_url": "http://127.0.0.1:9/own"})
    await store.claim_job("w")
    assert await store.complete_job(job_id, "w", {"personas": [{}], "experiment_id": "exp-x", "output_path": "o/"})
    assert not await store.complete_job(job_id, "w", {"personas": [], "experiment_id": "exp-x", "output_path": "o/"})
    claimed = await store.claim_deliveries("w", 10)
    assert sorted(delivery["url"] for delivery in claimed) == ["http://127.0.0.1:9/a", "http://127.0.0.1:9/own"]
    assert all(persona.re.fullmatch(r"delivery-[0-9a-f]{12}", delivery["delivery_id"]) for delivery in claimed)
    payload = json.loads(claimed[0]["payload"])
    assert payload["event"] == "generation.completed" and payload["data"]["personas_count"] == 1
    assert await store.claim_deliveries("w2", 10) == []
    [listed] = await store.list_deliveries(completed["webhook_id"], 10)
    assert listed["status"] == "delivering" and listed["attempts"] == []


async def test_the_webhook_cap_holds_for_registrations_through_several_stores_at_once(
    open_store: OpenStore, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(persona, "MAX_WEBHOOKS", 5)
    stores = [await open_store() for _ in range(3)]
    made = await asyncio.gather(
        *(stores[i % 3].create_webhook(f"http://127.0.0.1:9/{i}", ["generation.completed"], None) for i in range(12))
    )
    assert sum(webhook is not None for webhook in made) == 5
    assert len(await stores[0].list_webhooks()) == 5


async def test_trimming_attempts_keeps_the_newest_of_each_delivery(open_store: OpenStore, backend: str) -> None:
    store = await open_store()
    webhook = await store.create_webhook("http://127.0.0.1:9/hook", ["generation.completed"], None)
    job_id = await create(store)
    await store.claim_job("w")
    await store.complete_job(job_id, "w", {"personas": [], "experiment_id": "exp-x", "output_path": "o/"})
    for n in range(30):
        [delivery] = await store.claim_deliveries("w", 1)
        attempt = {"attempted_at": f"2026-01-01T00:00:{n:02d}Z", "http_status": 503, "error": None, "duration_ms": n}
        await store.settle_delivery(delivery["delivery_id"], "w", attempt, "pending", 0.0)
    [before] = await store.list_deliveries(webhook["webhook_id"], 10)
    assert len(before["attempts"]) == 30
    await store.trim_attempts(5)
    [after] = await store.list_deliveries(webhook["webhook_id"], 10)
    assert [a["duration_ms"] for a in after["attempts"]] == [25, 26, 27, 28, 29]


async def test_stores_on_one_database_share_each_clients_request_count(open_store: OpenStore, backend: str) -> None:
    stores = [await open_store() for _ in range(2)]
    counts = [(await stores[n % 2].rate_hit("ip:1"))[0] for n in range(5)]
    assert counts == [1, 2, 3, 4, 5]
    assert (await stores[1].rate_hit("ip:2"))[0] == 1


def test_a_source_missing_on_the_host_that_runs_its_job_fails_naming_that_host(tmp_path: Path) -> None:
    with pytest.raises(persona.GenerationError) as caught:
        persona.load_path("only-on-another-host.csv", tmp_path)
    message = str(caught.value)
    assert "only-on-another-host.csv" in message and socket.gethostname() in message
    assert "same data directory" in message and "by URL or inline" in message


async def test_requests_counted_together_each_get_their_own_count(open_store: OpenStore, backend: str) -> None:
    stores = [await open_store() for _ in range(2)]
    counts = await asyncio.gather(*(stores[n % 2].rate_hit("ip:3") for n in range(40)))
    assert sorted(count for count, _ in counts) == list(range(1, 41))
    assert (await stores[0].rate_hit("ip:3"))[0] == 41


# -- several hosts on one PostgreSQL ---------------------------------------------


async def side_transaction(store: persona.Store, statement: str) -> Any:
    """A connection of the test's own, in a transaction that has run `statement` and is left open."""
    import asyncpg

    conn = await asyncpg.connect(store.url)
    transaction = conn.transaction()
    await transaction.start()
    await conn.execute(statement)
    return conn, transaction


async def until_a_session_waits_on_a_lock(store: persona.Store, kind: str) -> None:
    """Until one of the store's own sessions waits on a lock of this kind."""
    deadline = asyncio.get_running_loop().time() + 20
    waiting = f"""SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid)
                  WHERE NOT granted AND locktype = '{kind}' AND application_name = '{store.session_name}'"""
    while not (await execute(store, waiting))[0][0]:
        assert asyncio.get_running_loop().time() < deadline, f"no session came to wait on a lock of kind {kind}"
        await asyncio.sleep(0.02)  # polling the condition, with a deadline


@pytest.mark.postgres_only
async def test_a_jobs_times_come_from_the_databases_clock_not_the_hosts(
    open_store: OpenStore, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store()
    monkeypatch.setattr(persona, "utc_now", lambda: "2001-01-01T00:00:00Z")  # a host whose clock is far off
    webhook = await store.create_webhook("http://127.0.0.1:9/hook", ["generation.completed"], None)
    job_id = await create(store)
    await store.claim_job("w")
    await store.complete_job(job_id, "w", {"personas": [], "experiment_id": "exp-x", "output_path": "o/"})
    job = await store.get_job(job_id)
    [(delivered_at, payload)] = await execute(store, "SELECT created_at, payload FROM deliveries")
    [(database_now,)] = await execute(store, "SELECT extract(epoch FROM now())::float8")
    times = [
        job["created_at"],
        job["started_at"],
        job["completed_at"],
        webhook["created_at"],
        delivered_at,
        json.loads(payload)["timestamp"],
    ]
    for shown in times:
        clock = datetime.strptime(shown, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
        assert abs(clock - database_now) < 60, times
    assert job["created_at"] <= job["started_at"] <= job["completed_at"]


async def test_a_finished_job_s_bytes_are_made_once_and_gone_with_the_job(open_store: OpenStore, backend: str) -> None:
    store = await open_store()
    job_id = await create(store)
    await store.claim_job("w")
    running = await store.get_job_json(job_id)
    assert running is not None and json.loads(running)["status"] == "running"
    await store.complete_job(job_id, "w", {"personas": [], "experiment_id": "exp-x", "output_path": "o/"})
    first, second = await store.get_job_json(job_id), await store.get_job_json(job_id)
    assert first is second and json.loads(first)["status"] == "completed"  # kept, not made again
    assert await store.purge_finished_jobs("9999-12-31T00:00:00Z", 100) == (1, ["o/"])  # its output folder
    assert await store.get_job_json(job_id) is None


@pytest.mark.postgres_only
async def test_retention_keeps_a_job_whose_delivery_a_retry_makes_pending_meanwhile(
    open_store: OpenStore, backend: str
) -> None:
    store = await open_store()
    await store.create_webhook("http://127.0.0.1:9/hook", ["generation.completed"], None)
    job_id = await create(store)
    await store.claim_job("w")
    await store.complete_job(job_id, "w", {"personas": [], "experiment_id": "exp-x", "output_path": "o/"})
    [delivery] = await store.claim_deliveries("w", 1)
    attempt = {"attempted_at": "2026-01-01T00:00:00Z", "http_status": 500, "error": None, "duration_ms": 1}
    await store.settle_delivery(delivery["delivery_id"], "w", attempt, "failed", 0.0)
    conn, retry = await side_transaction(
        store, f"UPDATE deliveries SET status = 'pending' WHERE delivery_id = '{delivery['delivery_id']}'"
    )
    try:
        purge = asyncio.create_task(store.purge_finished_jobs("9999-12-31T00:00:00Z", 100))
        await until_a_session_waits_on_a_lock(store, "transactionid")
        await retry.commit()
    finally:
        await conn.close()
    assert await purge == (0, [])
    assert (await store.get_job(job_id))["status"] == "completed"
    assert await execute(store, "SELECT status FROM deliveries") == [("pending",)]


@pytest.mark.postgres_only
async def test_a_submission_waits_for_another_hosts_admission_to_commit(open_store: OpenStore, backend: str) -> None:
    """Every batch takes one shared lock, so jobs are numbered in the order they commit: a listing
    paged by offset never has an earlier-numbered job appear behind a page already read."""
    store = await open_store()
    conn, other = await side_transaction(
        store, "SELECT pg_advisory_xact_lock(hashtextextended('persona:admission', 0))"
    )
    try:
        submission = asyncio.create_task(store.create_job("ip:x", {"data": "a.csv"}, 100, None))
        await until_a_session_waits_on_a_lock(store, "advisory")
        assert not submission.done()
        await other.commit()
    finally:
        await conn.close()
    assert (await submission).job_id


@pytest.mark.postgres_only
async def test_the_stores_sessions_read_committed_whatever_the_databases_default(
    open_store: OpenStore, backend: str
) -> None:
    first = await open_store()
    [(name,)] = await execute(first, "SELECT current_database()")
    await execute(first, f"ALTER DATABASE \"{name}\" SET default_transaction_isolation = 'serializable'")
    assert await execute(first, "SHOW transaction_isolation") == [("serializable",)]  # a session of its own
    store = await open_store()
    assert [tuple(row) for row in await store._read("SHOW transaction_isolation")] == [("read committed",)]
    assert (await store.create_job("ip:x", {"data": "a.csv"}, 100, None)).job_id
