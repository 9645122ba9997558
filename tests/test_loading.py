"""Data sources: formats, participants, attributes, and the data directory's walls."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import persona

# Its subject is not the store: it runs on SQLite alone (tests/test_store.py and the API,
# webhook, durability and recovery tests run on both stores).
pytestmark = pytest.mark.sqlite_only


ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def load(data: str, root: Path = EXAMPLES) -> persona.Dataset:
    return persona.load_path(data, root)


def test_csv_rows_sharing_a_participant_id_are_one_participant_with_attributes() -> None:
    dataset = load("interviews.csv")
    assert len(dataset.participants) == 16
    first = dataset.participants[0]
    assert first.id == "P01"
    assert len(first.texts) >= 3
    assert {"role", "age", "experience_years", "location"} <= set(first.attributes)
    assert dataset.source["participants"] == 16
    import hashlib

    assert dataset.source["sha256"] == hashlib.sha256((EXAMPLES / "interviews.csv").read_bytes()).hexdigest()


def test_a_consent_question_left_out_is_named_up_to_a_whole_word(tmp_path: Path) -> None:
    consent = "We are trying to better understand flaky tests and we would like your consent to use your answers"
    rows = [["id", consent, "answer"], ["r1", "Yes", "Retries hide real bugs."], ["r2", "Yes", "I rerun the build."]]
    (tmp_path / "survey.csv").write_text("\n".join(",".join(row) for row in rows) + "\n", encoding="utf-8")
    warnings = " ".join(persona.load_path("survey.csv", tmp_path).warnings)
    assert "'We are trying to better understand flaky tests and we…'" in warnings


def test_a_survey_export_object_is_read_through_its_responses_array() -> None:
    dataset = load("survey.json")
    assert len(dataset.participants) == 14
    person = dataset.participants[0]
    assert person.id == "R01"
    assert "segment" in person.attributes
    assert len(person.texts) == 3


def test_a_folder_of_transcripts_gives_one_participant_per_file_with_header_attributes() -> None:
    dataset = load("transcripts")
    assert [p.id for p in dataset.participants] == [f"p{i:02d}" for i in range(1, 13)]
    person = dataset.participants[0]
    assert person.attributes["role"] == "Student"
    assert "Interviewer" not in person.texts[0] and "How do you" not in person.texts[0]
    assert not person.texts[0].startswith("Participant:")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        (
            "semi.csv",
            "participant_id;role;response\n1;Nurse;I need the rota to load offline in the basement.\n"
            "2;Driver;I want overtime to be paid correctly every single week.\n",
        ),
        (
            "tabs.tsv",
            "participant_id\trole\tresponse\n1\tNurse\tI need the rota to load offline in the basement.\n"
            "2\tDriver\tI want overtime to be paid correctly every single week.\n",
        ),
        (
            "bom.csv",
            "\ufeffparticipant_id,role,response\n1,Nurse,I need the rota to load offline in the basement.\n"
            "2,Driver,I want overtime to be paid correctly every single week.\n",
        ),
        (
            "lines.jsonl",
            '{"user_id": "1", "role": "Nurse", "comment": "I need the rota to load offline in the basement."}\n'
            '{"user_id": "2", "role": "Driver", '
            '"comment": "I want overtime to be paid correctly every single week."}\n',
        ),
        (
            "strings.json",
            json.dumps(
                [
                    "I need the rota to load offline in the basement.",
                    "I want overtime to be paid correctly every single week.",
                ]
            ),
        ),
    ],
)
def test_each_supported_format_yields_its_participants(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content, encoding="utf-8")
    dataset = load(name, tmp_path)
    assert len(dataset.participants) == 2
    assert "rota" in dataset.participants[0].texts[0]
    if "role" in content:
        assert dataset.participants[0].attributes["role"] == "Nurse"


def test_short_one_line_answers_still_count_as_what_people_said(tmp_path: Path) -> None:
    (tmp_path / "short.csv").write_text("id,answer\n1,Too slow\n2,Love it\n")
    assert [p.texts for p in load("short.csv", tmp_path).participants] == [["Too slow"], ["Love it"]]


def test_hidden_files_in_a_folder_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("I want the app to work offline when I travel.")
    (tmp_path / "notes" / ".draft.txt").write_text("Secret draft that must not count as a participant.")
    assert [p.id for p in load("notes", tmp_path).participants] == ["a"]


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("empty.csv", b"", "empty"),
        ("header.csv", b"participant_id,response\n", "no rows"),
        ("broken.json", b"{nope", "not valid JSON"),
        ("latin.txt", "Caf\xe9 talk".encode("latin-1"), "not UTF-8"),
        ("numbers.json", b'{"a": 1}', "no array"),
    ],
)
def test_an_unreadable_source_fails_naming_the_file(tmp_path: Path, name: str, content: bytes, fragment: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(persona.GenerationError, match=fragment) as error:
        load(name, tmp_path)
    assert name in str(error.value)


@pytest.mark.parametrize(
    ("content", "encoding"),
    [
        ("participant_id;team;response\n1;Sales;Café at eight – before the rota.\n".encode("cp1252"), "Windows-1252"),
        ("participant_id\tteam\tresponse\n1\tSales\tCafé at eight – before the rota.\n".encode("utf-16"), "UTF-16"),
    ],
)
def test_a_csv_as_excel_saves_it_is_read_with_a_warning_naming_its_encoding(
    tmp_path: Path, content: bytes, encoding: str
) -> None:
    (tmp_path / "export.csv").write_bytes(content)
    dataset = load("export.csv", tmp_path)
    [person] = dataset.participants
    assert person.attributes == {"team": "Sales"} and person.texts == ["Café at eight – before the rota."]
    assert any(f"is {'not UTF-8' if encoding == 'Windows-1252' else 'UTF-16 text'}" in w for w in dataset.warnings)
    assert any(encoding in warning for warning in dataset.warnings)


def test_paths_outside_the_data_directory_are_refused(tmp_path: Path) -> None:
    inside = tmp_path / "data"
    inside.mkdir()
    (tmp_path / "secret.csv").write_text("id,response\n1,This must never be read by the server.\n")
    os.symlink(tmp_path / "secret.csv", inside / "link.csv")
    os.symlink(tmp_path, inside / "up")
    for data in ("../secret.csv", str(tmp_path / "secret.csv"), "link.csv", "up/secret.csv", "up"):
        with pytest.raises(persona.APIError, match="outside the data directory"):
            persona.resolve_data_path(data, inside)


def test_a_folder_never_reads_files_linked_from_outside(tmp_path: Path) -> None:
    inside = tmp_path / "data" / "notes"
    inside.mkdir(parents=True)
    (inside / "a.txt").write_text("I want my rota on my phone before every shift starts.")
    (tmp_path / "secret.txt").write_text("A secret transcript outside the data directory.")
    os.symlink(tmp_path / "secret.txt", inside / "b.txt")
    dataset = persona.load_path("notes", tmp_path / "data")
    assert [p.id for p in dataset.participants] == ["a"]


def test_an_absolute_path_inside_the_data_directory_is_accepted() -> None:
    assert (
        persona.resolve_data_path(str(EXAMPLES / "interviews.csv"), EXAMPLES) == (EXAMPLES / "interviews.csv").resolve()
    )


def test_inline_records_and_strings_become_participants() -> None:
    dataset = persona.load_inline(
        [
            {"id": "a", "role": "Nurse", "text": "I want the rota offline on every shift."},
            {"id": "a", "role": "Nurse", "text": "It's frustrating when the app logs me out."},
            {"id": "b", "role": "Driver", "text": "I need my overtime paid correctly."},
        ]
    )
    assert [(p.id, len(p.texts)) for p in dataset.participants] == [("a", 2), ("b", 1)]
    assert dataset.source["kind"] == "inline" and len(dataset.source["sha256"]) == 64
