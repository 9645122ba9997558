"""REFI-QDA projects (.qdpx) as data: a researcher's cases, variables, codes and coded passages.

The projects here are written by the tests, each with a quirk real tools' files show (NVivo's
`Sources/` and byte order mark, ATLAS.ti's `Project.qde`, paths without `internal://`, PDFs beside
the text); they are the project's own, so they can ship.
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import httpx
import pytest
import xmlschema
from conftest import Server, wait_job

import persona

pytestmark = pytest.mark.sqlite_only

NURSE = (
    "Interviewer: How do you plan the week?\nNurse: I need the rota a week ahead.\n"
    "Nurse: The app logs me out on night shifts.\n"
)
DRIVER = (
    "Interviewer: And you?\nDriver: I plan my routes on paper every morning.\n"
    "Driver: Fuel cards get declined at the pump.\n"
)
PORTER = (
    "Interviewer: Anything else?\nPorter: I want the rota on my phone.\nPorter: The handover sheet is always missing.\n"
)


def project_xml(sources: str, cases: str = "", origin: str = "NVivo for Windows 12.6", sets: str = "") -> str:
    codes = (
        '<CodeBook><Codes><Code guid="c-barriers" name="Barriers" isCodable="true">'
        '<Code guid="c-tech" name="Technology" isCodable="true"/><Code guid="c-time" name="Time" isCodable="true"/>'
        '</Code><Code guid="c-wish" name="Wishes" isCodable="true"/></Codes></CodeBook>'
    )
    variables = '<Variables><Variable guid="v-site" name="Site" typeOfVariable="Text"/></Variables>'
    return (
        f'<?xml version="1.0" encoding="utf-8"?><Project xmlns="urn:QDA-XML:project:1.0" name="Rota study" '
        f'origin="{origin}">{codes}{variables}{cases}<Sources>{sources}</Sources>{sets}</Project>'
    )


def text_source(guid: str, name: str, text: str, path: str, codes: dict[str, str]) -> str:
    """A TextSource whose selections cover, for each code guid, the line that holds its phrase."""
    selections = []
    for code, phrase in codes.items():
        start = text.index(phrase)
        selections.append(
            f'<PlainTextSelection guid="s-{guid}-{code}" name="" startPosition="{start}" '
            f'endPosition="{start + len(phrase)}"><Coding guid="k-{guid}-{code}"><CodeRef targetGUID="{code}"/>'
            "</Coding></PlainTextSelection>"
        )
    return f'<TextSource guid="{guid}" name="{name}" plainTextPath="{path}">{"".join(selections)}</TextSource>'


def qdpx(project: str, files: dict[str, bytes], project_name: str = "project.qde") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(project_name, project)
        for name, body in files.items():
            archive.writestr(name, body)
    return buffer.getvalue()


def study(folder: Path) -> Path:
    """Three interviews of three cases (two at one site), coded, written as NVivo writes them."""
    sources = "".join(  # offsets in the text as stored: Windows line ends, as NVivo writes them
        text_source(guid, name, text.replace("\n", "\r\n"), f"internal://{guid}.txt", codes)
        for guid, name, text, codes in (
            ("src-1", "Nurse interview", NURSE, {"c-time": "I need the rota a week ahead.", "c-wish": "rota"}),
            ("src-2", "Driver interview", DRIVER, {"c-tech": "Fuel cards get declined at the pump."}),
            ("src-3", "Porter interview", PORTER, {"c-time": "The handover sheet is always missing."}),
        )
    )
    sources += '<PDFSource guid="pdf-1" name="Consent form" path="internal://pdf-1.pdf"/>'
    cases = (
        "<Cases>"
        + "".join(
            f'<Case guid="case-{n}" name="{name}"><VariableValue><VariableRef targetGUID="v-site"/>'
            f'<TextValue>{site}</TextValue></VariableValue><SourceRef targetGUID="src-{n}"/></Case>'
            for n, name, site in ((1, "P01", "North"), (2, "P02", "South"), (3, "P03", "North"))
        )
        + "</Cases>"
    )
    files = {
        f"Sources/src-{n}.txt": "\ufeff".encode() + text.replace("\n", "\r\n").encode()
        for n, text in ((1, NURSE), (2, DRIVER), (3, PORTER))
    }
    sets = (
        '<Sets><Set guid="set-1" name="Pilot"><MemberSource targetGUID="src-1"/><MemberSource targetGUID="src-3"/>'
        '</Set><Set guid="set-2" name="shift: nights"><MemberSource targetGUID="src-2"/></Set></Sets>'
    )
    path = folder / "rota study.qdpx"
    path.write_bytes(qdpx(project_xml(sources, cases, sets=sets), files))
    return path


def test_a_project_s_cases_are_its_participants_with_their_variables_and_codes(tmp_path: Path) -> None:
    study(tmp_path)
    dataset = persona.load_path("rota study.qdpx", tmp_path)
    people = {person.id: person for person in dataset.participants}
    assert set(people) == {"P01", "P02", "P03"}
    assert people["P01"].attributes["site"] == "North" and people["P02"].attributes["site"] == "South"
    assert people["P01"].attributes["code"] == "Time" and people["P02"].attributes["code"] == "Technology"
    assert people["P02"].attributes["code:barriers"] == "Technology"
    assert people["P01"].attributes["set"] == "Pilot" and people["P02"].attributes["shift"] == "nights"
    assert dataset.labels["code:barriers"] == "Coded under Barriers"
    assert not any("How do you plan" in text for text in people["P01"].texts)  # the interviewer is context
    assert any("rota a week ahead" in text for text in people["P01"].texts)
    warnings = " ".join(dataset.warnings)
    assert "written by NVivo for Windows 12.6: 3 text source(s), 3 case(s), 4 code(s)" in warnings
    assert "did not read 1 source(s) that are not text" in warnings and "'Consent form'" in warnings


def test_a_project_as_other_tools_write_it_is_read_the_same(tmp_path: Path) -> None:
    sources = text_source("a1", "Nurse", NURSE, "a1.txt", {"c-wish": "rota"}) + text_source(
        "a2", "Driver", DRIVER, "internal://missing.txt", {}
    )
    (tmp_path / "atlas.qdpx").write_bytes(
        qdpx(project_xml(sources, origin="ATLAS.ti 8.4"), {"sources/a1.txt": NURSE.encode()}, "Project.qde")
    )
    dataset = persona.load_path("atlas.qdpx", tmp_path)
    assert [person.id for person in dataset.participants] == ["Nurse"]  # without cases, each source speaks
    assert dataset.participants[0].attributes == {"code": "Wishes"}
    assert any("did not find the text of 1 source(s) in the file: 'Driver'" in w for w in dataset.warnings)


@pytest.mark.parametrize(
    ("project", "message"),
    [
        ('<!DOCTYPE p [<!ENTITY a "aaaa">]><Project xmlns="urn:QDA-XML:project:1.0"/>', "declares a document type"),
        ("<Project", "has a broken part"),
        ("<Project>" + "<Codes>" * 300 + "</Codes>" * 300 + "</Project>", "deeper than 256 levels"),
    ],
)
def test_a_hostile_or_broken_project_file_is_refused_naming_the_file(
    tmp_path: Path, project: str, message: str
) -> None:
    (tmp_path / "bad.qdpx").write_bytes(qdpx(project, {}))
    with pytest.raises(persona.GenerationError, match=message) as refused:
        persona.load_path("bad.qdpx", tmp_path)
    assert "bad.qdpx" in str(refused.value)


def test_a_zip_without_a_project_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "empty.qdpx").write_bytes(qdpx("", {}, "notes.txt"))
    with pytest.raises(persona.GenerationError, match="holds no project file"):
        persona.load_path("empty.qdpx", tmp_path)


def test_personas_are_grouped_by_the_researcher_s_codes_over_the_api(server: Server, client: httpx.Client) -> None:
    study(server.workdir / "data")
    listed = {source["name"]: source for source in client.get("/api/v1/data").json()}
    assert {"code", "site", "code:barriers"} <= set(listed["rota study.qdpx"]["attributes"])
    response = client.post("/api/v1/generate", json={"data": "rota study.qdpx", "config": {"group_by": "code"}})
    job = wait_job(client, response.json()["job_id"])
    assert job["status"] == "completed", job["error"]
    members = sorted(sorted(p["evidence"]["participants"]) for p in job["result"]["personas"])
    assert members == [["P01", "P03"], ["P02"]]


def utf16_units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


@pytest.mark.parametrize("unit", ["code points", "UTF-16 units", "a line end as one"])
def test_a_coded_passage_is_found_however_the_tool_counted_its_offsets(unit: str) -> None:
    text = "Angry 😡😡 again.\r\n\r\nFuel cards get declined at the pump today."
    passage = "Fuel cards get declined"
    start = text.index(passage)
    if unit == "UTF-16 units":  # as NVivo counts: each emoji before the passage is two
        start = utf16_units(text[:start])
    if unit == "a line end as one":  # as ATLAS.ti counts a Windows line end
        start -= text[:start].count("\r\n")
    selections = [(start, start + len(passage), ["c"]), (0, 5, ["c"])]
    assert persona.coded_passages(text, selections) == {passage: ["c"], "Angry": ["c"]}


def test_a_span_written_once_per_code_is_one_passage_with_every_code() -> None:
    text = "The handover sheet is always missing."
    selections = [(0, len(text), ["c-time"]), (0, len(text), ["c-wish"]), (4, 18, ["c-tech"])]
    assert persona.coded_passages(text, selections) == {text: ["c-time", "c-wish"], "handover sheet": ["c-tech"]}


def test_quotes_come_from_the_passages_the_researcher_coded_first() -> None:
    said = [
        persona.Sentence("P1", "I always print the rota and pin it by the door at home.", 0.9),
        persona.Sentence("P2", "I keep asking my manager for the rota a week ahead.", 0.5),
    ]
    assert [s.participant for s in persona.pick_quotes(said, set(), 1)] == ["P1"]
    coded = {persona.squash("I keep asking my manager for the rota a week ahead.")}
    assert [s.participant for s in persona.pick_quotes(said, set(), 1, coded)] == ["P2"]


def test_each_participant_carries_the_passages_coded_in_its_sources(tmp_path: Path) -> None:
    study(tmp_path)
    people = {person.id: person for person in persona.load_path("rota study.qdpx", tmp_path).participants}
    assert people["P01"].coded == {"I need the rota a week ahead.": ["Time"], "rota": ["Wishes"]}
    assert people["P03"].coded == {"The handover sheet is always missing.": ["Time"]}


def test_a_persona_says_which_of_her_codes_its_participants_and_its_quotes_carry(
    server: Server, client: httpx.Client
) -> None:
    study(server.workdir / "data")
    response = client.post("/api/v1/generate", json={"data": "rota study.qdpx", "config": {"group_by": "site"}})
    job = wait_job(client, response.json()["job_id"])
    assert job["status"] == "completed", job["error"]
    north = next(p for p in job["result"]["personas"] if sorted(p["evidence"]["participants"]) == ["P01", "P03"])
    assert north["evidence"]["codes"] == [
        {"code": "Time", "count": 2, "of": 2},
        {"code": "Wishes", "count": 1, "of": 2},
    ]
    cards = client.get(f"/api/v1/generate/{job['job_id']}/export", params={"format": "html"}).text
    assert "Her codes" in cards and "Time: 2 of 2 participants (100%)." in cards
    assert dict(zip(north["quotes"], north["evidence"]["quote_codes"], strict=True)) == {
        "I need the rota a week ahead.": ["Time", "Wishes"],  # coded Time, and its "rota" coded Wishes
        "The app logs me out on night shifts.": [],
    }


# -- export: the personas back into her tool ------------------------------------------

SCHEMAS = Path(__file__).resolve().parent / "data" / "refi-qda"
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "interviews.csv"
QDA = "{urn:QDA-XML:project:1.0}"


@pytest.fixture(scope="module")
def project_schema() -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(SCHEMAS / "Project-mrt2019.xsd")


@pytest.fixture(scope="module")
def interviews_job(shared_server: Server) -> dict:
    """One job on the examples' interviews, for the tests that only read its exports."""
    with shared_server.client() as http:
        return completed(http, "interviews.csv")


@pytest.fixture
def reader(shared_server: Server) -> Iterator[httpx.Client]:
    with shared_server.client() as http:
        yield http


def completed(client: httpx.Client, data: str, **body: object) -> dict:
    response = client.post("/api/v1/generate", json={"data": data, "count": 3, **body})
    job = wait_job(client, response.json()["job_id"])
    assert job["status"] == "completed", job["error"]
    return job


def exported_project(client: httpx.Client, job_id: str) -> tuple[zipfile.ZipFile, ElementTree.Element]:
    response = client.get(f"/api/v1/generate/{job_id}/export", params={"format": "qdpx"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert re.search(r'filename="personas-[\w.-]+\.qdpx"', response.headers["content-disposition"])
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    return archive, ElementTree.fromstring(archive.read("project.qde"))


def selections(project: ElementTree.Element, archive: zipfile.ZipFile) -> list[tuple[str, str, set[str]]]:
    """Each selection as (its name, the text its offsets cover in the stored source, its codes' guids)."""
    found = []
    for source in project.iter(f"{QDA}TextSource"):
        stored = archive.read(source.get("plainTextPath", "").replace("internal://", "sources/"))
        assert not stored.startswith(b"\xef\xbb\xbf") and b"\r" not in stored  # UTF-8, no BOM, \n line ends
        text = stored.decode("utf-8")
        for selection in source.iter(f"{QDA}PlainTextSelection"):
            covered = text[int(selection.get("startPosition", "")) : int(selection.get("endPosition", ""))]
            codes = {ref.get("targetGUID", "") for ref in selection.iter(f"{QDA}CodeRef")}
            found.append((selection.get("name", ""), covered, codes))
    return found


def test_a_job_exports_as_a_project_the_published_schema_accepts(
    reader: httpx.Client, interviews_job: dict, project_schema: xmlschema.XMLSchema
) -> None:
    job = interviews_job
    archive, project = exported_project(reader, job["job_id"])
    project_schema.validate(io.BytesIO(archive.read("project.qde")))
    guids = [element.get("guid") for element in project.iter() if element.get("guid")]
    assert len(guids) == len(set(guids))
    targets = {element.get("targetGUID") for element in project.iter() if element.get("targetGUID")}
    assert targets <= set(guids) | {project.get("creatingUserGUID")}  # every reference resolves
    users = list(project.iter(f"{QDA}User"))
    assert len(users) == 1 and "local" in users[0].get("name", "")
    codes = {code.get("guid"): code.get("name", "") for code in project.find(f"{QDA}CodeBook").iter(f"{QDA}Code")}
    personas = job["result"]["personas"]
    persona_codes = {f"{p['name']} — {p['title']}" for p in personas}
    assert persona_codes <= set(codes.values())
    cases = {case.get("name") for case in project.iter(f"{QDA}Case")}
    assert cases == {pid for p in personas for pid in p["evidence"]["participants"]}
    variables = {variable.get("name") for variable in project.iter(f"{QDA}Variable")}
    assert {"role", "location"} <= variables


def test_every_quote_and_item_is_a_selection_on_its_own_words_coded_with_its_persona(
    reader: httpx.Client, interviews_job: dict
) -> None:
    job = interviews_job
    archive, project = exported_project(reader, job["job_id"])
    codes = {code.get("name"): code.get("guid") for code in project.iter(f"{QDA}Code")}
    found = selections(project, archive)
    for name, covered, _ in found:  # the name is the text it covers, or its first 100 characters and "…"
        assert name == covered or (len(covered) > 100 and name == covered[:100] + "…")
    for p in job["result"]["personas"]:
        code = codes[f"{p['name']} — {p['title']}"]
        coded = [covered for _, covered, refs in found if code in refs]
        assert all(any(quote == text for text in coded) for quote in p["quotes"])
        items = p["goals"] + p["pain_points"] + p["behaviours"]
        assert len(coded) == len(set(p["quotes"] + items))


def test_offsets_count_code_points_of_the_stored_text(server: Server, client: httpx.Client) -> None:
    rows = ["participant_id,response"] + [
        f'P{n},"😀 Emoji first. I keep the rota pinned by the door, {word} week. It takes ages to find a swap."'
        for n, word in enumerate(["every", "each", "every", "each"], 1)
    ]
    (server.workdir / "data" / "emoji.csv").write_text("\n".join(rows), encoding="utf-8")
    job = completed(client, "emoji.csv", count=2)
    archive, project = exported_project(client, job["job_id"])
    quotes = {quote for p in job["result"]["personas"] for quote in p["quotes"] + p["pain_points"]}
    covered = {text for _, text, _ in selections(project, archive)}
    assert quotes and quotes <= covered


def test_an_exported_project_reads_back_with_every_quote_on_its_text(
    reader: httpx.Client, interviews_job: dict, tmp_path: Path
) -> None:
    job = interviews_job
    response = reader.get(f"/api/v1/generate/{job['job_id']}/export", params={"format": "qdpx"})
    (tmp_path / "back.qdpx").write_bytes(response.content)
    people = {person.id: person for person in persona.load_path("back.qdpx", tmp_path).participants}
    for p in job["result"]["personas"]:
        for quote in p["quotes"]:
            speakers = [
                pid for pid in p["evidence"]["participants"] if quote in people.get(pid, persona.Participant("")).coded
            ]
            assert len(speakers) == 1, quote
    assert people["P01"].attributes["role"] == "Nurse"


def test_a_source_changed_since_the_job_exports_the_personas_own_words(
    server: Server, client: httpx.Client, project_schema: xmlschema.XMLSchema
) -> None:
    (server.workdir / "data" / "interviews.csv").write_bytes(EXAMPLE.read_bytes())
    job = completed(client, "interviews.csv")
    (server.workdir / "data" / "interviews.csv").write_text(
        "participant_id,response\nP9,Something else entirely now.\n"
    )
    archive, project = exported_project(client, job["job_id"])
    project_schema.validate(io.BytesIO(archive.read("project.qde")))
    assert "could not be read again" in project.findtext(f"{QDA}Description", "")
    covered = {text for _, text, _ in selections(project, archive)}
    assert {quote for p in job["result"]["personas"] for quote in p["quotes"]} <= covered


def test_the_personas_export_as_a_codebook_the_published_schema_accepts(
    reader: httpx.Client, interviews_job: dict
) -> None:
    job = interviews_job
    response = reader.get(f"/api/v1/generate/{job['job_id']}/export", params={"format": "qdc"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/xml"
    xmlschema.XMLSchema(SCHEMAS / "Codebook-mrt2019.xsd").validate(io.BytesIO(response.content))
    names = [
        code.get("name") for code in ElementTree.fromstring(response.content).iter("{urn:QDA-XML:codebook:1.0}Code")
    ]
    themes = [theme for p in job["result"]["personas"] for theme in p["themes"]]
    assert len(names) == len(job["result"]["personas"]) + len(themes)


def test_coded_segments_give_a_row_per_quote_or_item_with_its_participant_and_persona(
    reader: httpx.Client, interviews_job: dict
) -> None:
    job = interviews_job
    response = reader.get(f"/api/v1/generate/{job['job_id']}/export", params={"format": "segments"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    assert re.search(r'filename="personas-[\w.-]+\.segments\.csv"', response.headers["content-disposition"])
    rows = list(csv.DictReader(io.StringIO(response.text.lstrip("\ufeff"))))
    personas = {f"{p['name']} — {p['title']}": p for p in job["result"]["personas"]}
    roles = {row["participant_id"]: row["role"] for row in csv.DictReader(io.StringIO(EXAMPLE.read_text()))}
    assert rows and {row["kind"] for row in rows} <= {"Quote", "Goal", "Pain point", "Behaviour"}
    for row in rows:
        owner = personas[row["persona"]]
        assert row["participant"] in owner["evidence"]["participants"] and row["source"] == "interviews.csv"
        assert row["role"] == roles[row["participant"]]
    assert sum(row["kind"] == "Quote" for row in rows) == sum(len(p["quotes"]) for p in personas.values())


def test_a_job_made_from_a_project_exports_its_quotes_with_her_codes(server: Server, client: httpx.Client) -> None:
    study(server.workdir / "data")
    job = completed(client, "rota study.qdpx", count=2, config={"group_by": "site"})
    response = client.get(f"/api/v1/generate/{job['job_id']}/export", params={"format": "segments"})
    rows = list(csv.DictReader(io.StringIO(response.text.lstrip("\ufeff"))))
    assert {"participant": "P01", "text": "I need the rota a week ahead.", "codes": "Time; Wishes"}.items() <= next(
        row for row in rows if row["text"] == "I need the rota a week ahead."
    ).items()


def test_the_command_line_exports_a_project(shared_server: Server, interviews_job: dict, tmp_path: Path) -> None:
    server, job = shared_server, interviews_job
    target = tmp_path / "personas.qdpx"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "persona",
            "export",
            job["job_id"],
            "--server",
            server.url,
            "--format",
            "qdpx",
            "--output",
            str(target),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    with persona.PersonaClient(server.url) as api:
        assert api.export(job["job_id"], "qdpx") == target.read_bytes()
    assert "project.qde" in zipfile.ZipFile(target).namelist()


# -- codebooks: the themes she names ---------------------------------------------------------


def code(number: int, name: str, inner: str = "") -> str:
    guid = f"00000000-0000-4000-8000-00000000000{number}"
    return f'<Code guid="{guid}" name="{name}" isCodable="true">{inner}</Code>'


CODEBOOK = (
    '<?xml version="1.0" encoding="utf-8"?><CodeBook xmlns="urn:QDA-XML:codebook:1.0" origin="MAXQDA 24"><Codes>'
    + code(
        1,
        "Scheduling",
        "<Description>Planning shifts, rotas and time off</Description>" + code(2, "Rota") + code(3, "Overtime"),
    )
    + code(4, "Payroll")
    + code(5, "Teleportation")
    + "</Codes></CodeBook>"
)


def test_a_qdc_codebook_gives_every_code_a_theme_with_its_description() -> None:
    themes = persona.read_codebook(CODEBOOK.encode(), "codes.qdc")
    assert [t.name for t in themes] == ["Scheduling", "Rota", "Overtime", "Payroll", "Teleportation"]
    assert themes[0].description == "Planning shifts, rotas and time off"
    assert [t.parent for t in themes] == [None, "Scheduling", "Scheduling", None, None]
    xmlschema.XMLSchema(SCHEMAS / "Codebook-mrt2019.xsd").validate(io.BytesIO(CODEBOOK.encode()))


def test_a_csv_codebook_is_read_as_taguette_exports_it() -> None:
    raw = b"tag,description,number of highlights\nbarriers.rota,When the rota changes,4\nPayroll,,2\n"
    assert [(t.name, t.description, t.parent) for t in persona.read_codebook(raw, "tags.csv")] == [
        ("rota", "When the rota changes", "barriers"),
        ("Payroll", "", None),
    ]
    with pytest.raises(persona.GenerationError, match="has no column named tag, name, path, code; its columns: a, b"):
        persona.read_codebook(b"a,b\n1,2\n", "odd.csv")
    with pytest.raises(persona.GenerationError, match="declares a document type"):
        persona.read_codebook(b'<!DOCTYPE c [<!ENTITY x "y">]><CodeBook/>', "evil.qdc")


def test_each_persona_is_reported_against_the_codebook_s_themes(server: Server, client: httpx.Client) -> None:
    (server.workdir / "data" / "interviews.csv").write_bytes(EXAMPLE.read_bytes())
    uploaded = client.put("/api/v1/data/codes.qdc", content=CODEBOOK.encode())
    assert uploaded.status_code == 201 and uploaded.json()["format"] == "codebook"
    job = completed(client, "interviews.csv", config={"codebook": "uploads/codes.qdc"})
    words: dict[str, str] = {}
    for row in csv.DictReader(io.StringIO(EXAMPLE.read_text())):
        words[row["participant_id"]] = words.get(row["participant_id"], "") + " " + row["response"].lower()
    said = {theme: {pid for pid, text in words.items() if theme in text} for theme in ("rota", "overtime", "payroll")}
    for p in job["result"]["personas"]:
        members = set(p["evidence"]["participants"])
        for finding in p["evidence"]["codebook"]:
            assert finding["of"] == len(members) and 0 < finding["count"] <= len(members)
        found = {f["theme"].lower(): f["count"] for f in p["evidence"]["codebook"]}
        assert "teleportation" not in found
        assert found.get("rota", 0) <= len(said["rota"] & members)
    for p in job["result"]["personas"]:  # who speaks of a sub-code speaks of its parent
        found = {f["theme"]: f["count"] for f in p["evidence"]["codebook"]}
        assert found.get("Scheduling", 0) >= max(found.get("Rota", 0), found.get("Overtime", 0))
    assert any(f["theme"] == "Rota" for p in job["result"]["personas"] for f in p["evidence"]["codebook"])
    assert any("Teleportation" in w for w in job["result"]["metadata"]["warnings"])
    markdown = client.get(f"/api/v1/generate/{job['job_id']}/export", params={"format": "markdown"}).text
    assert "Her codebook's themes" in markdown and re.search(r"Rota: said by \d+ of \d+", markdown)


@pytest.mark.parametrize(
    ("codebook", "message"),
    [
        ("missing.qdc", "is not a codebook file"),
        ("interviews.json", "is not a codebook file"),
        ("../outside.qdc", "lies outside the data directory"),
    ],
)
def test_a_codebook_that_is_not_there_is_refused_at_submission(
    server: Server, client: httpx.Client, codebook: str, message: str
) -> None:
    (server.workdir / "data" / "interviews.csv").write_bytes(EXAMPLE.read_bytes())
    response = client.post("/api/v1/generate", json={"data": "interviews.csv", "config": {"codebook": codebook}})
    assert response.status_code == 400 and message in response.json()["message"]


def test_a_codebook_that_cannot_be_read_fails_its_job_saying_why(server: Server, client: httpx.Client) -> None:
    (server.workdir / "data" / "interviews.csv").write_bytes(EXAMPLE.read_bytes())
    response = client.post(
        "/api/v1/generate", json={"data": "interviews.csv", "config": {"codebook": "interviews.csv"}}
    )
    job = wait_job(client, response.json()["job_id"])
    assert job["status"] == "failed" and "has no column named tag" in job["error"]


def test_another_client_s_codebook_is_as_missing_as_one_that_is_not_there(start_server) -> None:
    server = start_server("--auth-token", "alpha,beta", "--rate-limit", "0")
    (server.workdir / "data" / "interviews.csv").write_bytes(EXAMPLE.read_bytes())
    with server.client("alpha") as alpha, server.client("beta") as beta:
        assert alpha.put("/api/v1/data/codes.qdc", content=CODEBOOK.encode()).status_code == 201
        answers = [
            beta.post("/api/v1/generate", json={"data": "interviews.csv", "config": {"codebook": wanted}}).json()
            for wanted in ("uploads/codes.qdc", "uploads/other.qdc")
        ]
    assert [answer["message"].split("'")[2] for answer in answers] == [answers[0]["message"].split("'")[2]] * 2


def test_a_blank_line_in_a_csv_codebook_is_no_code() -> None:
    assert [t.name for t in persona.read_codebook(b"tag,description\nRota,x\n\nPay\n", "tags.csv")] == ["Rota", "Pay"]


def test_a_model_is_shown_the_codebook_s_themes() -> None:
    themes = persona.read_codebook(CODEBOOK.encode(), "codes.qdc")
    prompt = persona.persona_prompt(2, "[P1] I plan the rota.", {"codebook": themes})
    assert "- Scheduling: Planning shifts, rotas and time off" in prompt and "- Payroll" in prompt


def test_the_example_codebook_is_valid_and_names_its_sub_codes_parents() -> None:
    path = ROOT / "examples" / "codebook.qdc"
    xmlschema.XMLSchema(SCHEMAS / "Codebook-mrt2019.xsd").validate(str(path))
    themes = persona.read_codebook(path.read_bytes(), path.name)
    assert ("Rota", "Scheduling") in [(t.name, t.parent) for t in themes]


def uuid_of(label: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, label))


def her_project(folder: Path) -> Path:
    """The study as a schema-valid NVivo export: UUIDs, Windows line ends and a byte order mark in its texts."""
    code_names = {"c-barriers": "Barriers", "c-tech": "Technology", "c-time": "Time", "c-wish": "Wishes"}
    project = study(folder).read_bytes()
    archive = zipfile.ZipFile(io.BytesIO(project))
    qde = archive.read("project.qde").decode()
    for label in [*code_names, "v-site", "set-1", "set-2", "pdf-1"] + [
        f"{k}-{n}" for k in ("src", "case") for n in (1, 2, 3)
    ]:
        qde = qde.replace(f'"{label}"', f'"{uuid_of(label)}"')
    qde = re.sub(r'guid="([sk]-[^"]+)"', lambda m: f'guid="{uuid_of(m.group(1))}"', qde)
    files = {name: archive.read(name) for name in archive.namelist() if name != "project.qde"}
    path = folder / "her study.qdpx"
    path.write_bytes(qdpx(qde, files))
    return path


def test_a_job_made_from_her_project_exports_onto_her_own_sources_with_her_codes_kept(
    server: Server, client: httpx.Client, project_schema: xmlschema.XMLSchema
) -> None:
    her = her_project(server.workdir / "data")
    before = zipfile.ZipFile(her)
    project_schema.validate(io.BytesIO(before.read("project.qde")))
    job = completed(client, "her study.qdpx", count=2, config={"group_by": "site"})
    archive, project = exported_project(client, job["job_id"])
    project_schema.validate(io.BytesIO(archive.read("project.qde")))
    for name in before.namelist():  # her files as they were
        if name != "project.qde":
            assert archive.read(name) == before.read(name)
    codes = {code.get("name"): code.get("guid") for code in project.iter(f"{QDA}Code")}
    assert {"Barriers", "Technology", "Time", "Wishes"} <= set(codes)
    personas = job["result"]["personas"]
    assert {f"{p['name']} — {p['title']}" for p in personas} <= set(codes)
    assert [u.get("name") for u in project.iter(f"{QDA}User")][-1].startswith("Persona ")
    theirs = {p["name"]: codes[f"{p['name']} — {p['title']}"] for p in personas}
    for case in project.iter(f"{QDA}Case"):
        owner = next(p for p in personas if case.get("name") in p["evidence"]["participants"])
        assert theirs[owner["name"]] in {ref.get("targetGUID") for ref in case.findall(f"{QDA}CodeRef")}
    texts = {}
    for source in project.iter(f"{QDA}TextSource"):
        raw = archive.read(source.get("plainTextPath", "").replace("internal://", "Sources/"))
        texts[source.get("guid")] = raw.decode("utf-8-sig")  # offsets count code points after the byte order mark
    ours = [
        (texts[source.get("guid")][int(s.get("startPosition")) : int(s.get("endPosition"))], s)
        for source in project.iter(f"{QDA}TextSource")
        for s in source.findall(f"{QDA}PlainTextSelection")
        if {ref.get("targetGUID") for ref in s.iter(f"{QDA}CodeRef")} & set(theirs.values())
    ]
    quotes = [quote for p in personas for quote in p["quotes"]]
    assert quotes and all(any(covered == quote for covered, _ in ours) for quote in quotes)
    assert len(list(project.iter(f"{QDA}PlainTextSelection"))) == len(ours) + 4  # her four selections kept


def test_every_selection_and_coding_has_its_own_guid_when_spans_start_together() -> None:
    text = "I need the rota a week ahead. Then I plan."
    passages = [persona.Passage(0, "quotes", 0, "P1", 0, 29), persona.Passage(0, "goals", 0, "P1", 0, 42)]
    personas = [{"name": "Ann", "title": "Planner", "themes": ["rota"]}]
    selections = persona.qda_selections(text, passages, "P1", personas, "job-1", {})
    guids = [element.get("guid") for selection in selections for element in selection.iter() if element.get("guid")]
    assert len(selections) == 2 and len(guids) == len(set(guids))


def test_personas_of_one_name_keep_their_own_words_when_the_source_is_gone() -> None:
    personas = [
        {
            "id": f"persona-00{n}",
            "name": "Ann",
            "title": t,
            "quotes": [q],
            "goals": [],
            "pain_points": [],
            "behaviours": [],
        }
        for n, t, q in ((1, "Nurse", "A long first quote of the first persona."), (2, "Porter", "Short one."))
    ]
    found = persona.evidence_sources(personas, None)
    assert len(found.texts) == 2
    for passage in found.passages:
        covered = found.texts[passage.source][passage.start : passage.end]
        assert covered == personas[passage.persona]["quotes"][passage.index]


def test_whole_words_exports_are_the_job_s_maker_s_on_a_server_with_keys(start_server) -> None:
    server = start_server("--auth-token", "alpha,beta", "--rate-limit", "0")
    (server.workdir / "data" / "interviews.csv").write_bytes(EXAMPLE.read_bytes())
    with server.client("alpha") as alpha, server.client("beta") as beta, server.client() as anyone:
        job = completed(alpha, "interviews.csv")
        path = f"/api/v1/generate/{job['job_id']}/export"
        for form in ("qdpx", "segments"):
            assert alpha.get(path, params={"format": form}).status_code == 200
            assert beta.get(path, params={"format": form}).status_code == 404
            assert anyone.get(path, params={"format": form}).status_code == 401
        assert anyone.get(path, params={"format": "csv"}).status_code == 200  # what personas quote stays open


def test_one_job_exports_one_project_byte_for_byte_whatever_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    people = [persona.Participant("P1", ["I need the rota a week ahead, every single week."])]
    dataset = persona.Dataset(people, {"kind": "inline"})
    personas = [
        {
            "name": "Ann",
            "title": "Planner",
            "demographics": {},
            "quotes": [people[0].texts[0]],
            "evidence": {"participants": ["P1"]},
        }
    ]
    metadata = {"job_id": "job-000000000001", "provider": "local"}
    exports = []
    for clock in (0.0, 86400.0 * 400):
        monkeypatch.setattr("time.time", lambda clock=clock: clock)
        monkeypatch.setattr("time.localtime", lambda *_, clock=clock: __import__("time").gmtime(clock))
        exports.append(persona.personas_qdpx(personas, metadata, dataset, "2026-12-07T11:41:25Z"))
    assert exports[0] == exports[1]
