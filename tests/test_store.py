"""The SQLite store: one schema, atomic claims, recovery of interrupted jobs."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

import persona

ROOT = Path(__file__).resolve().parent.parent


async def open_store(path: Path) -> persona.Store:
    store = persona.Store(path)
    await store.open()
    return store


def test_the_schema_file_is_the_schema_the_module_applies() -> None:
    assert (ROOT / "persona_store.sql").read_text() == persona.SCHEMA


async def test_a_new_database_gets_the_schema_its_version_and_wal(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "p.db")
    await store.close()
    with sqlite3.connect(tmp_path / "p.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == persona.SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"jobs", "webhooks", "experiments", "idempotency_keys", "rate_limits"} <= tables


async def test_a_database_from_a_newer_persona_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "p.db") as conn:
        conn.execute(f"PRAGMA user_version = {persona.SCHEMA_VERSION + 1}")
    with pytest.raises(persona.ConfigError, match="newer Persona"):
        await open_store(tmp_path / "p.db")


async def test_opening_twice_keeps_the_data(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "p.db")
    job_id, _ = await store.create_job("ip:x", {"data": "a.csv"}, 10, None)
    await store.close()
    store = await open_store(tmp_path / "p.db")
    assert (await store.get_job(job_id))["status"] == "pending"
    await store.close()


async def test_each_pending_job_is_claimed_by_exactly_one_of_several_stores(tmp_path: Path) -> None:
    stores = [await open_store(tmp_path / "p.db") for _ in range(3)]
    created = [(await stores[0].create_job("ip:x", {"data": "a.csv"}, 100, None))[0] for _ in range(30)]

    async def claim_all(store: persona.Store, worker: str) -> list[str]:
        claimed = []
        while rows := await store.write(persona.SQL_CLAIM_JOB, {"worker": worker, "now": persona.utc_now(), "clock": 0.0}):
            claimed.append(rows[0][0])
        return claimed

    results = await asyncio.gather(*(claim_all(store, f"w{i}") for i, store in enumerate(stores)))
    claimed = [job for result in results for job in result]
    assert sorted(claimed) == sorted(created)
    for store in stores:
        await store.close()


async def test_an_interrupted_job_is_requeued_then_failed_after_three_attempts_that_began(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "p.db")
    job_id, _ = await store.create_job("ip:x", {"data": "a.csv"}, 10, None)
    runner = persona.JobRunner(store, persona.Settings(db=tmp_path / "p.db"), lambda: None)
    for _ in range(3):
        rows = await store.write(persona.SQL_CLAIM_JOB, {"worker": "gone-host:1:dead", "now": persona.utc_now(), "clock": 0.0})
        assert rows and rows[0][0] == job_id
        assert await store.write(persona.SQL_BEGIN_ATTEMPT, (job_id, "gone-host:1:dead"))
        await runner._requeue(job_id, "gone-host:1:dead")
    job = await store.get_job(job_id)
    assert job["status"] == "failed"
    assert "interrupted 3 times" in job["error"]
    await store.close()


async def test_a_job_claimed_but_never_begun_spends_no_attempt_when_its_server_dies(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "p.db")
    job_id, _ = await store.create_job("ip:x", {"data": "a.csv"}, 10, None)
    runner = persona.JobRunner(store, persona.Settings(db=tmp_path / "p.db"), lambda: None)
    for _ in range(5):  # claimed, waiting for an engine slot, and the server dies: five times over
        rows = await store.write(persona.SQL_CLAIM_JOB, {"worker": "gone-host:1:dead", "now": persona.utc_now(), "clock": 0.0})
        assert rows and rows[0][0] == job_id
        await runner._requeue(job_id, "gone-host:1:dead")
    assert (await store.get_job(job_id))["status"] == "pending"
    assert (await store.read("SELECT attempts FROM jobs WHERE job_id = ?", (job_id,)))[0][0] == 0
    await store.close()


def test_a_claimer_is_gone_when_its_lease_lapsed_or_its_local_process_died() -> None:
    import os
    import socket

    host = socket.gethostname()
    now = 1000.0
    assert persona.claimer_is_gone(f"{host}:{os.getpid()}:x", now - persona.LEASE_S - 1, now)
    assert not persona.claimer_is_gone(f"{host}:{os.getpid()}:x", now - 1, now)
    assert not persona.claimer_is_gone(f"elsewhere:{os.getpid()}:x", now - 1, now)
    dead = max(int(p) for p in os.listdir("/proc") if p.isdigit()) + 100000
    assert persona.claimer_is_gone(f"{host}:{dead}:x", now - 1, now)


async def test_the_concurrency_limit_and_insert_share_one_transaction(tmp_path: Path) -> None:
    stores = [await open_store(tmp_path / "p.db") for _ in range(4)]

    async def try_create(store: persona.Store) -> bool:
        try:
            await store.create_job("key:a", {"data": "a.csv"}, 5, None)
        except persona.APIError as exc:
            assert exc.status == 429
            return False
        return True

    outcomes = await asyncio.gather(*(try_create(stores[i % 4]) for i in range(20)))
    assert sum(outcomes) == 5
    with sqlite3.connect(tmp_path / "p.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 5
    for store in stores:
        await store.close()


async def test_idempotency_keys_expire_after_a_day(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "p.db")
    body_hash = "h" * 64
    first, _ = await store.create_job("ip:x", {"data": "a.csv"}, 10, ("k", body_hash))
    again, replayed = await store.create_job("ip:x", {"data": "a.csv"}, 10, ("k", body_hash))
    assert (again, replayed) == (first, True)
    await store.write("UPDATE idempotency_keys SET created_at = created_at - ?", (persona.IDEMPOTENCY_TTL_S + 1,))
    fresh, replayed = await store.create_job("ip:x", {"data": "a.csv"}, 10, ("k", body_hash))
    assert fresh != first and replayed is False
    assert json.loads((await store.read("SELECT request FROM jobs WHERE job_id = ?", (fresh,)))[0][0]) == {"data": "a.csv"}
    await store.close()


async def test_a_burst_of_submissions_is_inserted_in_batches_within_each_owners_limit(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "p.db")
    statements = []
    original = store.write

    async def counting_write(sql: str, params: object = ()) -> list:
        statements.append(sql)
        return await original(sql, params)

    store.write = counting_write  # type: ignore[method-assign]

    async def submit(owner: str) -> bool:
        try:
            await store.create_job(owner, {"data": "a.csv"}, 7, None)
        except persona.APIError as exc:
            assert exc.status == 429 and exc.details["limit"] == 7
            return False
        return True

    owners = ["key:a", "key:b"] * 15
    outcomes = await asyncio.gather(*(submit(owner) for owner in owners))
    accepted = [owner for owner, ok in zip(owners, outcomes) if ok]
    assert sorted(accepted) == ["key:a"] * 7 + ["key:b"] * 7
    assert len(statements) < len(owners) / 2
    await store.close()


def test_job_ids_made_later_sort_after_earlier_ones_and_still_look_like_job_ids() -> None:
    first = persona.new_job_id()
    later = wait_for_next_millisecond(first)
    assert persona.JOB_ID.match(first) and persona.JOB_ID.match(later)
    assert first[4:12] < later[4:12]


def wait_for_next_millisecond(job_id: str) -> str:
    later = persona.new_job_id()
    while later[4:12] == job_id[4:12]:
        later = persona.new_job_id()
    return later


@pytest.mark.parametrize("idempotency", [None, ("key-1", "h" * 64)], ids=["plain", "idempotent"])
async def test_a_new_job_whose_id_is_taken_goes_in_under_another(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  idempotency: tuple[str, str] | None) -> None:
    store = await open_store(tmp_path / "p.db")
    taken, _ = await store.create_job("key:a", {"data": "a.csv"}, 10, None)
    fresh = persona.new_job_id
    handed_out = iter([taken, taken])
    monkeypatch.setattr(persona, "new_job_id", lambda: next(handed_out, None) or fresh())
    job_id, replayed = await store.create_job("key:a", {"data": "b.csv"}, 10, idempotency)
    assert job_id != taken and persona.JOB_ID.match(job_id) and not replayed
    rows = dict(await store.read("SELECT job_id, request FROM jobs"))
    assert json.loads(rows[taken]) == {"data": "a.csv"} and json.loads(rows[job_id]) == {"data": "b.csv"}
    await store.close()


async def test_the_job_counters_follow_every_change_of_status(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "p.db")
    jobs = [(await store.create_job(owner, {"data": "a.csv"}, 100, None))[0] for owner in ("key:a", "key:a", "key:b")]
    await store.write(persona.SQL_CLAIM_JOB, {"worker": "w", "now": persona.utc_now(), "clock": 0.0})
    await store.cancel_job(jobs[1])
    await store.complete_job(jobs[0], "w", {"personas": [], "experiment_id": "exp-x", "output_path": "o/"})
    with sqlite3.connect(tmp_path / "p.db") as conn:
        counted = set(conn.execute("SELECT owner, status, n FROM job_counts WHERE n > 0"))
        actual = set(conn.execute("SELECT owner, status, COUNT(*) FROM jobs GROUP BY owner, status"))
    assert counted == actual == {("key:a", "completed", 1), ("key:a", "failed", 1), ("key:b", "pending", 1)}
    await store.close()


async def test_an_older_database_gets_its_counters_when_upgraded(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "p.db")
    for _ in range(3):
        await store.create_job("key:a", {"data": "a.csv"}, 100, None)
    await store.close()
    with sqlite3.connect(tmp_path / "p.db") as conn:
        conn.execute("DELETE FROM job_counts")
        conn.execute("PRAGMA user_version = 2")
    store = await open_store(tmp_path / "p.db")
    assert await store.read("SELECT owner, status, n FROM job_counts") == [("key:a", "pending", 3)]
    await store.close()
