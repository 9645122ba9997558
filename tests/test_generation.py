"""The offline engine: personas grounded in the data, distinct, and the same every time."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from pathlib import Path

import pytest

import persona

# Its subject is not the store: it runs on SQLite alone (tests/test_store.py and the API,
# webhook, durability and recovery tests run on both stores).
pytestmark = pytest.mark.sqlite_only


ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# The four groups the example interviews were written around.
GROUPS = {
    f"P{i:02d}": group
    for group, ids in (
        ("nurses", range(1, 5)),
        ("managers", range(5, 9)),
        ("drivers", range(9, 13)),
        ("payroll", range(13, 17)),
    )
    for i in ids
}


def personas_for(data: str, count: int, config: dict | None = None) -> tuple[list[dict], persona.Dataset]:
    dataset = persona.load_path(data, EXAMPLES)
    personas, _ = persona.offline_personas(dataset, count, config or {})
    return personas, dataset


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize(("data", "count"), [("interviews.csv", 4), ("survey.json", 3), ("transcripts", 3)])
def test_every_sentence_in_a_persona_is_verbatim_from_its_own_participants(data: str, count: int) -> None:
    personas, dataset = personas_for(data, count)
    said = {p.id: squash(" ".join(p.texts)) for p in dataset.participants}
    for item in personas:
        own = " ".join(said[pid] for pid in item["evidence"]["participants"])
        for key in ("goals", "pain_points", "behaviours", "quotes"):
            for sentence in item[key]:
                assert squash(sentence) in own, (item["id"], key, sentence)
        assert item["quotes"], item["id"]


@pytest.mark.parametrize(("data", "count"), [("interviews.csv", 4), ("interviews.csv", 5), ("survey.json", 3)])
def test_evidence_partitions_the_participants_and_shares_add_up(data: str, count: int) -> None:
    personas, dataset = personas_for(data, count)
    ids = [pid for item in personas for pid in item["evidence"]["participants"]]
    assert sorted(ids) == sorted(p.id for p in dataset.participants)
    assert abs(sum(item["evidence"]["share"] for item in personas) - 1) < 0.01
    assert [item["id"] for item in personas] == [f"persona-{n:03d}" for n in range(1, count + 1)]


def test_names_and_titles_are_distinct_within_a_result() -> None:
    personas, _ = personas_for("interviews.csv", 5)
    assert len({item["name"] for item in personas}) == 5
    assert len({item["title"] for item in personas}) == 5
    assert all(len(item["title"].split()) >= 2 and not re.search(r"\d", item["title"]) for item in personas)


def test_the_four_groups_in_the_example_interviews_are_found() -> None:
    personas, _ = personas_for("interviews.csv", 4)
    majority = sum(
        Counter(GROUPS[pid] for pid in item["evidence"]["participants"]).most_common(1)[0][1] for item in personas
    )
    assert majority / len(GROUPS) >= 0.85
    assert {
        Counter(GROUPS[pid] for pid in item["evidence"]["participants"]).most_common(1)[0][0] for item in personas
    } == set(GROUPS.values())


def test_demographics_summarise_roles_ranges_and_share() -> None:
    personas, _ = personas_for("interviews.csv", 4)
    for item in personas:
        demographics = item["demographics"]
        assert re.fullmatch(r".+ \(\d+%\)", demographics["role"])
        assert re.fullmatch(r"median \d+(\.5)?, range \d+–\d+", demographics["age"])
        assert demographics["participants"] == len(item["evidence"]["participants"])
        assert demographics["share"] == item["evidence"]["share"]


def test_the_same_data_count_and_config_give_the_same_personas() -> None:
    first, _ = personas_for("interviews.csv", 4, {"detail_level": "detailed"})
    second, _ = personas_for("interviews.csv", 4, {"detail_level": "detailed"})
    assert first == second


def test_detail_level_and_complexity_change_how_much_each_persona_says() -> None:
    minimal, _ = personas_for("interviews.csv", 4, {"detail_level": "minimal", "complexity": "simple"})
    detailed, _ = personas_for("interviews.csv", 4, {"detail_level": "detailed", "complexity": "complex"})
    assert max(len(p["quotes"]) for p in minimal) == 1
    assert max(len(p["quotes"]) for p in detailed) > 1
    assert max(len(p["themes"]) for p in minimal) <= 2 < max(len(p["themes"]) for p in detailed)


def test_asking_for_more_personas_than_participants_fails_saying_how_many() -> None:
    dataset = persona.load_path("interviews.csv", EXAMPLES)
    with pytest.raises(persona.GenerationError, match="16 participant"):
        persona.offline_personas(dataset, 17, {})


def test_a_job_reports_each_real_stage_in_order_and_the_workbench_names_it(tmp_path: Path) -> None:
    stages: list[tuple[int, str]] = []

    async def report(progress: int, stage: str) -> None:
        stages.append((progress, stage))

    settings = persona.Settings(data_dir=EXAMPLES, output_dir=tmp_path)
    asyncio.run(persona.generate("job-0123456789ab", {"data": "interviews.csv", "count": 3}, "exp-x", settings, report))
    assert [stage for _, stage in stages] == [
        "loading data",
        "loaded 16 participants",
        "grouping the participants",
        *(f"segment {done} of 3 done" for done in range(3)),
        "measuring quality",
        "personas built",
        "outputs written",
    ]
    assert [progress for progress, _ in stages] == sorted(progress for progress, _ in stages)
    words = [persona.stage_words({"status": "running", "progress": progress}, 3) for progress, _ in stages]
    assert "measuring the personas' quality" in words and "grouping the participants and writing each persona" in words
    assert "writing the personas: 1 of 3 done" in words and "writing the personas: 2 of 3 done" in words


async def test_reports_told_while_the_work_runs_are_saved_in_order_before_it_returns() -> None:
    saved: list[int] = []
    reports = persona.InOrder()

    async def report(n: int) -> None:
        await asyncio.sleep(0.01 * (3 - n))  # the first takes longest: order comes from the chain, not timing
        saved.append(n)

    async def work() -> str:
        for n in range(3):
            reports.add(report(n))
        return "done"

    assert await reports.after(work()) == "done" and saved == [0, 1, 2]


async def test_a_report_that_fails_ends_the_work_with_its_error_and_later_reports_are_dropped() -> None:
    reports = persona.InOrder()
    release = asyncio.Event()

    async def refused() -> None:
        raise persona.JobCancelled("job-x")

    async def work() -> None:
        reports.add(refused())
        await release.wait()  # it would wait for ever: the failed report ends it

    with pytest.raises(persona.JobCancelled):
        await reports.after(work())
    late = refused()
    reports.add(late)  # told by a thread that cannot be stopped, after the job ended
    assert late.cr_frame is None  # closed, never scheduled


def test_the_offline_engine_in_a_child_process_tells_each_persona_it_writes() -> None:
    dataset = persona.load_path("interviews.csv", EXAMPLES)
    heard: list[tuple[int, int]] = []
    personas, _ = asyncio.run(persona.run_in_child(persona.offline_personas, dataset, 3, {}, news=heard.append))
    assert heard == [(0, 3), (1, 3), (2, 3)] and len(personas) == 3  # after the last, the quality report's stage


def test_a_job_writes_its_folder_with_personas_metadata_and_cards(tmp_path: Path) -> None:
    stages: list[tuple[int, str]] = []

    async def report(progress: int, stage: str) -> None:
        stages.append((progress, stage))

    request = {"data": "interviews.csv", "count": 3, "config": {"experiment": "pilot"}}
    settings = persona.Settings(data_dir=EXAMPLES, output_dir=tmp_path)
    result = asyncio.run(persona.generate("job-0123456789ab", request, "exp-0123456789ab", settings, report))
    folder = Path(result["output_path"])
    assert re.match(r"^\d{8}_\d{6}_job-0123456789ab$", folder.name)
    assert json.loads((folder / "personas.json").read_text())["personas"] == result["personas"]
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["provider"] == "local" and metadata["source"]["participants"] == 16
    assert len(metadata["source"]["sha256"]) == 64
    assert {"load_s", "generate_s"} <= set(metadata["timings"])
    cards = sorted(folder.glob("persona-*.md"))
    assert len(cards) == 3
    assert result["personas"][0]["name"] in cards[0].read_text()
    progress = [p for p, _ in stages]
    assert progress == sorted(progress) and progress[0] < progress[-1]
    assert not list(tmp_path.glob(".*partial"))


def write_many_participants(path: Path, count: int) -> None:
    """Interview rows for `count` participants in three clearly different groups."""
    groups = [
        ("Nurse", "I need the night rota offline in the basement ward."),
        ("Driver", "It's frustrating when overtime pay is missing from my payslip."),
        ("Student", "I usually book a quiet study room before exam season."),
    ]
    lines = ["participant_id,role,response"]
    for n in range(count):
        role, said = groups[n % 3]
        lines.append(f'P{n:05d},{role},"{said} Participant {n} adds that {role.lower()} work is tiring."')
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_large_data_is_computed_in_a_worker_process_by_the_server(client, server) -> None:
    from conftest import submit, wait_job

    write_many_participants(server.workdir / "data" / "many.csv", persona.ENGINE_PROCESS_FROM + 100)
    job = wait_job(client, submit(client, data="many.csv", count=3), timeout=120)
    assert job["status"] == "completed", job["error"]
    shares = sorted(p["evidence"]["share"] for p in job["result"]["personas"])
    assert abs(sum(shares) - 1) < 0.01 and shares[0] > 0.2


@pytest.mark.slow
def test_large_data_is_computed_in_a_worker_process_from_the_command_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import clean_environment

    write_many_participants(tmp_path / "many.csv", persona.ENGINE_PROCESS_FROM + 100)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "persona",
            "generate",
            str(tmp_path / "many.csv"),
            "-n",
            "3",
            "--json",
            "--output-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env={**clean_environment(), "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["personas"]) == 3
