"""How well personas stand for the data: balanced segments, readable titles, grounded lists, the researcher's groups."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, Server, clean_environment, submit, wait_job

import persona

# Its subject is not the store: it runs on SQLite alone (tests/test_store.py and the API,
# webhook, durability and recovery tests run on both stores).
pytestmark = pytest.mark.sqlite_only


EXAMPLES = ROOT / "examples"
LISTS = ("goals", "pain_points", "behaviours")


def examples(data: str) -> persona.Dataset:
    return persona.load_path(data, EXAMPLES)


def inline(records: list[dict[str, str]]) -> persona.Dataset:
    return persona.load_inline(records)


def segment_sizes(personas: list[dict]) -> list[int]:
    return [len(item["evidence"]["participants"]) for item in personas]


def assert_balanced(sizes: list[int], total: int) -> None:
    assert sum(sizes) == total
    assert max(sizes) <= total // 2, sizes
    assert min(sizes) >= max(2, math.ceil(0.02 * total)), sizes


def near_duplicates(total: int = 60, share: float = 0.8) -> persona.Dataset:
    """`share` of the participants say nearly the same thing; the rest say three different things."""
    same = round(total * share)
    endings = ["on the train", "at lunch", "after work", "on Sundays", "at night", "in the queue"]
    records = [
        {"id": f"S{n:02d}", "text": f"It keeps crashing when I upload a photo of my receipt {endings[n % 6]}."}
        for n in range(same)
    ]
    others = [
        "I want a shared budget with my partner so we can plan the rent together.",
        "I usually check my savings goal every morning before I leave for work.",
        "Please add an export to spreadsheets so my accountant can read my expenses.",
    ]
    records += [{"id": f"O{n:02d}", "text": others[n % 3]} for n in range(total - same)]
    return inline(records)


# -- segments ----------------------------------------------------------------------


@pytest.mark.parametrize("count", [3, 4, 5])
def test_no_segment_of_the_example_interviews_holds_more_than_half_or_too_few(count: int) -> None:
    dataset = examples("interviews.csv")
    personas, _ = persona.offline_personas(dataset, count, {})
    assert_balanced(segment_sizes(personas), len(dataset.participants))


@pytest.mark.parametrize("count", [3, 4])
def test_when_most_people_say_the_same_thing_no_segment_swallows_more_than_half(count: int) -> None:
    dataset = near_duplicates()
    personas, _ = persona.offline_personas(dataset, count, {})
    assert_balanced(segment_sizes(personas), 60)


# -- titles ------------------------------------------------------------------------


FILLER_AND_FOREIGN = {"uh", "um", "cuz", "super", "perhaps", "de", "des", "du", "la", "le", "les", "et", "pour"}


def chatty_reviews() -> persona.Dataset:
    english = [
        "Uh the app keeps crashing cuz the photo upload is super slow, perhaps fix the photo upload.",
        "Um the photo upload is super slow and uh it keeps crashing cuz of the camera.",
        "I want a dark mode cuz the white screen is super bright at night, perhaps add dark mode.",
        "Please add dark mode, uh the bright screen hurts my eyes at night.",
        "Budget categories are confusing to set up, uh I gave up on budget categories.",
        "Perhaps the budget categories could be simpler, they are super confusing.",
        "I check my spending every morning cuz the daily summary is super handy.",
        "The daily summary of spending is uh really handy every morning.",
    ]
    french = [
        "L'application plante des fois quand je charge une photo de mon ticket.",
        "Le mode sombre manque, la lumière de l'écran est trop forte la nuit.",
        "Les catégories de budget sont difficiles à configurer pour moi.",
        "Je consulte le résumé de mes dépenses tous les matins avec plaisir.",
    ]
    records = [{"id": f"E{n:02d}", "text": text} for n, text in enumerate(english * 2)]
    records += [{"id": f"F{n:02d}", "text": text} for n, text in enumerate(french * 2)]
    return inline(records)


@pytest.mark.parametrize(
    ("dataset", "count"),
    [(chatty_reviews, 3), (chatty_reviews, 4), (lambda: examples("interviews.csv"), 5), (near_duplicates, 3)],
    ids=["chatty-3", "chatty-4", "interviews-5", "near-duplicates-3"],
)
def test_titles_are_several_real_words_without_digits_fillers_or_french_function_words(dataset, count: int) -> None:
    personas, _ = persona.offline_personas(dataset(), count, {})
    for item in personas:
        title = item["title"]
        words = re.findall(r"[\w'’-]+", title.lower())
        assert len(words) >= 2, title
        assert not re.search(r"\d", title), title
        assert not set(words) & FILLER_AND_FOREIGN, title
        assert any(word not in persona.STOPWORDS for word in words), title


# -- what goes in each list --------------------------------------------------------


@pytest.mark.parametrize(
    ("sentence", "kind"),
    [
        ("I trust that my students cannot cheat.", None),
        ("It keeps crashing when I upload a photo.", "pain_points"),
        ("Please add dark mode.", "goals"),
        ("I usually check the rota every morning before work.", "behaviours"),
        ("Why does the rota change at night?", None),
    ],
)
def test_a_sentence_lands_in_the_list_its_words_mean(sentence: str, kind: str | None) -> None:
    assert persona.list_kind(sentence) == kind


def test_a_persona_keeps_trust_out_of_pain_points_and_puts_requests_in_goals() -> None:
    said = [
        "I trust that my students cannot cheat.",
        "It keeps crashing when I upload a photo.",
        "Please add dark mode.",
        "I usually mark the essays every evening after dinner.",
    ]
    dataset = inline([{"id": f"T{n}", "text": text} for n, text in enumerate(said)])
    (item,), _ = persona.offline_personas(dataset, 1, {})
    assert "It keeps crashing when I upload a photo." in item["pain_points"]
    assert "I trust that my students cannot cheat." not in item["pain_points"]
    assert "Please add dark mode." in item["goals"]
    assert not any("trust" in entry for key in LISTS for entry in item[key])


@pytest.mark.parametrize(("data", "count"), [("interviews.csv", 4), ("survey.json", 3), ("transcripts", 3)])
def test_every_list_item_is_backed_by_one_sentence_and_quotes_are_verbatim(data: str, count: int) -> None:
    dataset = examples(data)
    personas, _ = persona.offline_personas(dataset, count, {})
    report = persona.quality_report(dataset.participants, personas)
    assert report["coverage"] == 1.0 and report["unrepresented"] == []
    assert [entry["support"] for entry in report["personas"]] == [1.0] * count
    texts = {person.id: person.texts for person in dataset.participants}
    for item in personas:
        own = [text for pid in item["evidence"]["participants"] for text in texts[pid]]
        assert item["quotes"]
        for quote in item["quotes"]:
            assert any(quote in text for text in own), quote


def test_the_quality_report_gives_each_persona_its_size_support_and_overlap() -> None:
    dataset = examples("interviews.csv")
    personas, _ = persona.offline_personas(dataset, 4, {})
    report = persona.quality_report(dataset.participants, personas)
    assert [entry["id"] for entry in report["personas"]] == [item["id"] for item in personas]
    assert [entry["participants"] for entry in report["personas"]] == segment_sizes(personas)
    assert all(0.0 <= entry["overlap"] < 1.0 for entry in report["personas"])
    twin = persona.quality_report(dataset.participants, [personas[0], dict(personas[0], id="persona-copy")])
    assert twin["personas"][0]["overlap"] == pytest.approx(1.0)


def test_personas_that_share_only_the_data_set_s_topic_are_little_alike() -> None:
    said = ["break the nightly build", "waste our review time", "hide real bugs", "slow every release"]
    people = [persona.Participant(f"P{n}", [f"Flaky tests {said[n % 4]}."], {}) for n in range(12)]
    items = [{"id": f"persona-{n}", "goals": [], "pain_points": [f"Flaky tests {said[n]}"]} for n in range(2)]
    personas = [{**item, "evidence": {"participants": [f"P{n}"]}} for n, item in enumerate(items)]
    report = persona.quality_report(people, personas)
    assert all(entry["overlap"] < 0.3 for entry in report["personas"])  # "flaky tests", said by all, weighs little


# -- demographics ------------------------------------------------------------------


def test_demographics_show_at_most_ten_informative_attributes_as_shares_and_ranges() -> None:
    records = []
    for n in range(12):
        record = {
            "id": f"P{n:02d}",
            "role": ["Nurse", "Nurse", "Nurse", "Driver", "Clerk"][n % 5],
            "age": str(25 + 3 * n),
            "text": [
                "I need the rota offline on night shifts in the basement.",
                "It's frustrating when overtime is missing from my payslip.",
            ][n % 2],
            "note": "This is a long free sentence about nothing in particular that goes on and on.",
        }
        record.update({f"extra_{k}": ["yes", "no"][(n + k) % 2] for k in range(12)})
        records.append(record)
    personas, _ = persona.offline_personas(inline(records), 2, {})
    for item in personas:
        demographics = dict(item["demographics"])
        assert demographics.pop("participants") == len(item["evidence"]["participants"])
        assert demographics.pop("share") == item["evidence"]["share"]
        assert 1 <= len(demographics) <= 10, demographics
        assert "note" not in demographics
        assert re.fullmatch(r"(Nurse|Driver|Clerk) \(\d+%\)", demographics["role"]), demographics
        assert re.fullmatch(r"median \d+(\.5)?, range \d+–\d+", demographics["age"]), demographics


def test_a_share_and_a_range_read_as_a_researcher_writes_them() -> None:
    roles = ["Nurse", "Nurse", "Nurse", "Driver", "Clerk"]
    assert persona.summarise_values(roles, 5, persona.column_options(roles)) == "Nurse (60%)"
    assert persona.summarise_values(["25", "34", "58"], 3, set()) == "median 34, range 25–58"


# -- the researcher's grouping -----------------------------------------------------


def test_group_by_gives_one_persona_per_value_for_the_largest_groups() -> None:
    dataset = examples("interviews.csv")
    roles = {person.id: person.attributes["role"] for person in dataset.participants}
    personas, _ = persona.offline_personas(dataset, 2, {"group_by": "role"})
    assert len(personas) == 2
    groups = [item["evidence"]["participants"] for item in personas]
    assert [{roles[pid] for pid in group} for group in groups] == [{"Nurse"}, {"Assistant Manager"}]
    assert groups[0] == [pid for pid, role in roles.items() if role == "Nurse"]
    everyone, _ = persona.offline_personas(dataset, 20, {"group_by": "role"})
    assert sorted(item["demographics"]["role"] for item in everyone) == sorted(
        f"{role} (100%)" for role in set(roles.values())
    )


def test_group_by_an_attribute_the_data_lacks_names_the_attributes_it_has() -> None:
    with pytest.raises(persona.GenerationError, match="shoe_size") as error:
        persona.offline_personas(examples("interviews.csv"), 3, {"group_by": "shoe_size"})
    for attribute in ("role", "age", "experience_years", "location"):
        assert attribute in str(error.value)


def test_named_groups_give_personas_titled_by_name_with_exactly_their_participants() -> None:
    dataset = examples("interviews.csv")
    groups = {"Night nurses": ["P01", "P02", "P03", "P04"], "Drivers": ["P09", "P10", "P11", "P12"]}
    personas, _ = persona.offline_personas(dataset, 3, {"groups": groups})
    assert [item["title"] for item in personas] == ["Night nurses", "Drivers"]
    assert [item["evidence"]["participants"] for item in personas] == list(groups.values())


def test_named_groups_with_unknown_ids_fail_naming_them() -> None:
    with pytest.raises(persona.GenerationError, match="P99") as error:
        persona.offline_personas(examples("interviews.csv"), 2, {"groups": {"A": ["P01", "P99"], "B": ["nobody"]}})
    assert "nobody" in str(error.value) and "'P01'" not in str(error.value).split("include")[0]


def test_quality_shows_who_named_groups_leave_out() -> None:
    dataset = examples("interviews.csv")
    personas, _ = persona.offline_personas(dataset, 2, {"groups": {"A": ["P01", "P02"], "B": ["P05", "P06"]}})
    report = persona.quality_report(dataset.participants, personas)
    assert report["coverage"] == pytest.approx(4 / 16, abs=1e-4)
    assert report["unrepresented"] == [
        person.id for person in dataset.participants if person.id not in {"P01", "P02", "P05", "P06"}
    ]


# -- through the API ---------------------------------------------------------------


def output_folder(server: Server, job: dict) -> Path:
    path = Path(job["result"]["output_path"])
    return path if path.is_absolute() else server.workdir / path


def test_the_api_refuses_groupings_that_cannot_work(client: httpx.Client) -> None:
    bodies = [
        {"group_by": "role", "groups": {"A": ["P01"]}},
        {"groups": {"A": []}},
        {"groups": {"A": "P01"}},
        {"groups": {}},
    ]
    for config in bodies:
        response = client.post("/api/v1/generate", json={"data": "interviews.csv", "config": config})
        assert response.status_code == 422, (config, response.text)
        assert response.json()["error"] == "validation_error"


def test_a_grouped_job_reports_its_quality_in_the_result_page_and_cards(client: httpx.Client, server: Server) -> None:
    job = wait_job(client, submit(client, data="interviews.csv", count=3, config={"group_by": "role"}))
    assert job["status"] == "completed", job["error"]
    quality = job["result"]["metadata"]["quality"]
    assert quality["coverage"] < 1 and quality["unrepresented"]
    assert [entry["id"] for entry in quality["personas"]] == [item["id"] for item in job["result"]["personas"]]
    folder = output_folder(server, job)
    page = (folder / "personas.html").read_text()
    assert f"personas cover {16 - len(quality['unrepresented'])} of 16 respondents" in page
    for entry in quality["personas"]:
        line = persona.quality_line(entry)
        assert persona.escape(line) in page
        assert line in (folder / f"{entry['id']}.md").read_text()


def test_a_card_says_so_when_nothing_reads_as_one_of_its_lists(client: httpx.Client, server: Server) -> None:
    records = [
        {"id": f"N{n}", "text": text}
        for n, text in enumerate(
            [
                "It keeps crashing when I upload a photo of my receipt.",
                "The export is broken and full of errors.",
                "It keeps crashing when I open the settings page.",
                "The sync is broken since the last update.",
            ]
        )
    ]
    job = wait_job(client, submit(client, data=records, count=1))
    assert job["status"] == "completed", job["error"]
    (item,) = job["result"]["personas"]
    assert item["pain_points"] and not item["behaviours"]
    card = (output_folder(server, job) / f"{item['id']}.md").read_text()
    assert "Nothing in this persona's data reads as a behaviour." in card
    assert "Nothing in this persona's data reads as a pain point." not in card


# -- the command line --------------------------------------------------------------


def run_persona(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "persona", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean_environment(), "PYTHONPATH": str(ROOT)},
    )


def test_the_command_line_groups_by_an_attribute_and_prints_notes_and_coverage(tmp_path: Path) -> None:
    result = run_persona(
        "generate",
        str(EXAMPLES / "interviews.csv"),
        "-n",
        "10",
        "--config",
        "group_by=role",
        "--output-dir",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("note: ") and "fewer than the 10 personas" in line for line in lines), result.stdout
    assert "Personas cover 16 of 16 respondents (100%)" in lines, result.stdout
    assert result.stdout.count("quality: its goals, pain points and behaviours") == 8


def test_the_command_line_makes_a_persona_per_group_when_grouping_without_a_count(tmp_path: Path) -> None:
    result = run_persona(
        "generate",
        str(EXAMPLES / "interviews.csv"),
        "--config",
        "group_by=role",
        "--output-dir",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("quality: its goals, pain points and behaviours") == 8
    assert not any(
        line.startswith("note: ") and "groups, personas for the" in line for line in result.stdout.splitlines()
    )


def test_the_command_line_reads_named_groups_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "groups.json").write_text(json.dumps({"Night nurses": ["P01", "P02"], "Drivers": ["P09", "P10"]}))
    result = run_persona(
        "generate",
        str(EXAMPLES / "interviews.csv"),
        "--groups",
        str(tmp_path / "groups.json"),
        "--output-dir",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    titles = [line.split(" — ", 1)[1] for line in result.stdout.splitlines() if re.match(r"^\S.* — .*\(\d+% of", line)]
    assert [re.sub(r" \(\d+% of participants\)$", "", title) for title in titles] == ["Night nurses", "Drivers"]
    assert "Personas cover 4 of 16 respondents (25%); 12 in no persona" in result.stdout.splitlines()
    assert not any(line.startswith("note:") for line in result.stdout.splitlines())


def test_the_command_line_names_a_groups_file_it_cannot_read(tmp_path: Path) -> None:
    (tmp_path / "groups.json").write_text("{not json")
    result = run_persona("generate", str(EXAMPLES / "interviews.csv"), "--groups", "groups.json", cwd=tmp_path)
    assert result.returncode == 2
    assert "groups.json" in result.stderr and "Traceback" not in result.stderr


def test_a_persona_title_is_said_by_at_least_a_quarter_of_its_participants() -> None:
    # Balancing moves near-duplicates into other segments; their titles must still be their members' words.
    from test_quality import near_duplicates

    dataset = near_duplicates()
    texts = {person.id: " ".join(person.texts).lower() for person in dataset.participants}
    personas, _ = persona.offline_personas(dataset, 3, {})
    for item in personas:
        words = [w for w, _ in persona.content_words(item["title"])]
        members = item["evidence"]["participants"]
        saying = sum(all(w in {t for t, _ in persona.content_words(texts[pid])} for w in words) for pid in members)
        assert saying >= len(members) / 4, (item["title"], saying, len(members))


def test_the_survey_example_titles_are_several_words() -> None:
    import re

    personas, _ = persona.offline_personas(persona.load_path("survey.json", Path("/work/main/examples")), 3, {})
    for item in personas:
        assert len(re.findall(r"[\w'’-]+", item["title"].lower())) >= 2, item["title"]
