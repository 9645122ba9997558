"""The researcher's workbench: the data directory over the API, and the pages in a real browser."""

from __future__ import annotations

import csv
import io
import os
import re
import threading
import zipfile
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, GatedDataServer, Server, submit, wait_for, wait_job
from playwright.sync_api import expect

import persona

# Its subject is not the store: it runs on SQLite alone.
pytestmark = pytest.mark.sqlite_only

SURVEY = b"participant_id,team,response\nA1,Sales,I need the rota a week ahead.\nA2,Support,The app logs me out.\n"


# -- the data directory over the API -----------------------------------------


def test_a_jobs_page_opens_on_its_personas_titled_by_its_source_with_warnings_counted_after(
    client: httpx.Client,
) -> None:
    job = wait_job(client, submit(client, data="interviews.csv", count=3))
    page = client.get(f"/jobs/{job['job_id']}").text
    assert "<title>Personas from interviews.csv (3 personas, local)</title>" in page  # its source and settings
    assert page.index('<article class="card"') < page.index("<h2>Next</h2>")
    warnings = job["result"]["metadata"]["warnings"]
    if warnings:
        summary = f"<details><summary>{len(warnings)} warning{'s' if len(warnings) != 1 else ''}</summary>"
        assert page.index('<article class="card"') < page.index(summary)


def test_the_refine_form_adds_files_and_refines_with_them(
    server: Server, client: httpx.Client, page, tmp_path: Path
) -> None:
    parent = wait_job(client, submit(client, data="interviews.csv", count=3))
    more = tmp_path / "follow up.csv"
    more.write_bytes(SURVEY)
    page.goto(f"{server.url}/jobs/{parent['job_id']}")
    page.locator("#refine").get_by_label("Add files").set_input_files(more)
    expect(page.locator("#refine-data")).to_have_value("uploads/follow-up.csv")
    page.locator("#refine").get_by_role("button", name="Refine").click()
    page.wait_for_url(re.compile(r"/jobs/job-[0-9a-f]{12}$"))
    expect(page.get_by_text("Refined from")).to_be_visible()


def test_a_refined_jobs_page_says_what_changed(client: httpx.Client, server: Server) -> None:
    (server.workdir / "data" / "more.csv").write_bytes(SURVEY)
    parent = wait_job(client, submit(client, data="interviews.csv", count=3))
    refined = client.post(f"/api/v1/generate/{parent['job_id']}/refine", json={"data": "more.csv"})
    child = wait_job(client, refined.json()["job_id"])
    changes = child["result"]["changes"]
    page = client.get(f"/jobs/{child['job_id']}").text
    count = len(changes["personas"]) + len(changes["new"]) + len(changes["gone"])
    assert f"<summary>What changed ({count})</summary>" in page
    for persona_ in changes["personas"]:
        assert f"{persona_['name']} continued" in page.replace("&#x27;", "'")
    assert "share: 0." not in page  # the size and share a card shows are no raw demographics here


def test_a_refinement_with_other_people_names_them_apart_pairs_them_by_exact_ids_and_files_by_its_data(
    client: httpx.Client,
) -> None:
    # The transcripts' p01 ... p12 are other people than the interviews' P01 ... P16.
    parent = wait_job(client, submit(client, data="interviews.csv", count=4))
    refined = client.post(f"/api/v1/generate/{parent['job_id']}/refine", json={"data": "transcripts"})
    child = wait_job(client, refined.json()["job_id"])
    names = [item["name"] for item in child["result"]["personas"]]
    assert len(set(names)) == len(names), names
    compared = client.get("/api/v1/compare", params={"a": parent["job_id"], "b": child["job_id"]}).json()
    members = {
        side: {item["id"]: set(item["evidence"]["participants"]) for item in job["result"]["personas"]}
        for side, job in (("a", parent), ("b", child))
    }
    for pair in compared["pairs"]:
        ours, theirs = members["a"][pair["a"]["id"]], members["b"][pair["b"]["id"]]
        assert pair["fields"]["participants"]["shared"] == sorted(ours & theirs)
        assert pair["fields"]["participants"]["only_b"] == sorted(theirs - ours)
    download = client.get(f"/api/v1/generate/{child['job_id']}/export", params={"format": "csv"})
    assert 'filename="personas-interviews-' in download.headers["content-disposition"]


def test_a_new_persona_never_takes_a_name_a_continued_or_a_gone_persona_has() -> None:
    def made(pid: str, name: str, *ids: str) -> dict:
        return {"id": pid, "name": name, "summary": f"{name} says.", "evidence": {"participants": list(ids)}}

    parent = [made("persona-001", "Ana", "P1", "P2"), made("persona-002", "Ben", "P3")]
    personas = [made("persona-001", "Cleo", "P1"), made("persona-002", "Ana", "P9"), made("persona-003", "Ben", "P8")]
    named = persona.continued_personas(parent, personas, keep_names=True)
    names = [item["name"] for item in named]
    assert names[0] == "Ana" and len(set(names)) == 3 and "Ben" not in names  # Ben is gone: no new one is Ben
    assert all(item["summary"] == f"{item['name']} says." for item in named[1:])


def test_the_job_list_shows_times_in_the_browsers_time_zone_and_the_experiment(
    server: Server, client: httpx.Client, browser
) -> None:
    job = wait_job(client, submit(client, data="interviews.csv", count=3, config={"experiment": "pilot"}))
    context = browser.new_context(timezone_id="Asia/Tokyo", locale="en-GB")
    try:
        tab = context.new_page()
        tab.goto(f"{server.url}/jobs")
        row = tab.locator(f'tr:has(a[href="/jobs/{job["job_id"]}"])')
        expect(row).to_contain_text("pilot")
        shown = row.locator("time").inner_text()
        expected = tab.evaluate("iso => new Date(iso).toLocaleString()", job["created_at"])
        assert shown == expected and shown != job["created_at"]
    finally:
        context.close()


def test_the_job_list_says_which_job_a_refinement_refines(client: httpx.Client) -> None:
    config = {"name": "Ward study", "experiment": "pilot"}
    parent = wait_job(client, submit(client, data="interviews.csv", count=3, config=config))["job_id"]
    child = client.post(f"/api/v1/generate/{parent}/refine", json={"data": "interviews.csv"}).json()["job_id"]
    listing = client.get("/jobs").text
    row = listing[listing.index(f'<a href="/jobs/{child}">') :].split("</tr>")[0]
    assert f'pilot · refines <a href="/jobs/{parent}">{parent}</a>' in row  # its parent's experiment, joined
    assert row.startswith(f'<a href="/jobs/{child}">Ward study (refined)</a>')
    assert f'<a href="/jobs/{parent}">Ward study</a>' in listing


def test_the_instruction_box_appears_only_where_a_model_is_configured(
    start_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    offline = start_server("--rate-limit", "0")
    with offline.client() as http:
        job = wait_job(http, submit(http, data="interviews.csv", count=3))
        assert 'id="instruction"' not in http.get(f"/jobs/{job['job_id']}").text
    with_model = start_server("--rate-limit", "0", db="other.db", env={"OPENAI_API_KEY": "sk-test-not-used"})
    with with_model.client() as http:
        job = wait_job(http, submit(http, data="interviews.csv", count=3, provider="local"))
        assert 'id="instruction"' in http.get(f"/jobs/{job['job_id']}").text
    for spec in persona.PROVIDER_SPECS.values():
        for variable in spec.key_variables:
            monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("PERSONA_PROVIDER", raising=False)
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert persona.model_configured() is False
    monkeypatch.setenv("OLLAMA_HOST", "http://127.0.0.1:9")
    assert persona.model_configured() is True


def test_a_named_job_is_listed_and_titled_by_its_name(client: httpx.Client) -> None:
    job = wait_job(client, submit(client, data="interviews.csv", count=3, config={"name": "Ward study"}))
    assert job["result"]["metadata"]["name"] == "Ward study"
    assert f'<a href="/jobs/{job["job_id"]}">Ward study</a>' in client.get("/jobs").text
    assert "<title>Ward study: personas from interviews.csv" in client.get(f"/jobs/{job['job_id']}").text


def test_a_compared_pair_is_labelled_by_its_titles_and_the_participants_it_shares(client: httpx.Client) -> None:
    job = wait_job(client, submit(client, data="interviews.csv", count=3))
    first = job["result"]["personas"][0]
    page = client.get("/compare", params={"a": job["job_id"], "b": job["job_id"]}).text
    size = len(first["evidence"]["participants"])
    title = first["title"].replace("&", "&amp;").replace("'", "&#x27;").replace('"', "&quot;")
    assert f"A: {title} and B: {title} · {size} participants in both · similarity 1.00" in page


def test_the_compare_page_opens_on_a_summary_of_pairs_and_of_who_moved(client: httpx.Client) -> None:
    first = wait_job(client, submit(client, data="interviews.csv", count=3))
    second = wait_job(client, submit(client, data="interviews.csv", count=4))
    page = client.get("/compare", params={"a": first["job_id"], "b": second["job_id"]}).text
    summary = re.search(
        r'<section id="summary"><p>(\d+) pairs · (\d+) only in A · (\d+) only in B · (\d+) of (\d+)', page
    )
    assert summary is not None and page.index('id="summary"') < page.index('class="pair"')
    pairs, only_a, only_b, moved, both = map(int, summary.groups())
    assert pairs + only_a == 3 and pairs + only_b == 4 and both == 16 and 0 <= moved <= both
    same = client.get("/compare", params={"a": first["job_id"], "b": first["job_id"]}).text
    assert "3 pairs · 0 only in A · 0 only in B · 0 of 16 participants" in same


def test_the_data_listing_gives_a_coded_attributes_question_in_full() -> None:
    raw = (ROOT / "tests" / "data" / "qualtrics_sample.csv").read_bytes()
    listed = persona.attributes_of(raw, "csv", "qualtrics_sample.csv")
    assert listed is not None and listed["questions"]["q1"] == "This is a multiple choice question."
    grid = b"id,How often do you... [Re-run the build.],Comment\n" + b"".join(
        f"P{n},{'Often' if n % 2 else 'Never'},I rerun it until it passes number {n} of many.\n".encode()
        for n in range(12)
    )
    listed = persona.attributes_of(grid, "csv", "grid.csv")
    assert listed is not None and "Re-run the build. (How often do you...)" in listed["questions"].values()


def test_the_data_listing_is_paged_with_a_total_and_a_next_link(client: httpx.Client) -> None:
    everything = client.get("/api/v1/data")
    total = int(everything.headers["X-Total-Count"])
    assert total == len(everything.json()) > 3 and "Link" not in everything.headers
    first = client.get("/api/v1/data?limit=2")
    assert [s["name"] for s in first.json()] == [s["name"] for s in everything.json()[:2]]
    assert first.headers["X-Total-Count"] == str(total) and "offset=2" in first.headers["Link"]
    rest = client.get("/api/v1/data?limit=1000&offset=2").json()
    assert [s["name"] for s in rest] == [s["name"] for s in everything.json()[2:]]
    assert client.get("/api/v1/data?limit=0").status_code == 422


async def test_a_data_directory_of_more_files_than_a_source_may_hold_is_still_listed(tmp_path: Path) -> None:
    folder = tmp_path / "uploads"
    folder.mkdir()
    for number in range(persona.MAX_SOURCE_FILES + 5):
        (folder / f"{number:05d}.txt").write_bytes(b"")
    page, total = await persona.data_sources(tmp_path, limit=3, offset=0)
    assert total == persona.MAX_SOURCE_FILES + 5 + 1  # every file, and their folder
    assert [source["name"] for source in page] == ["uploads", "uploads/00000.txt", "uploads/00001.txt"]


def test_the_data_listing_names_files_folders_formats_and_a_tables_attributes(client: httpx.Client) -> None:
    sources = {source["name"]: source for source in client.get("/api/v1/data").json()}
    assert sources["interviews.csv"]["format"] == "csv" and sources["interviews.csv"]["kind"] == "file"
    assert sources["interviews.csv"]["attributes"][:2] == ["role", "age"]
    folder = sources["transcripts"]
    assert {key: folder[key] for key in ("name", "kind", "format", "files")} == {
        "name": "transcripts",
        "kind": "folder",
        "format": "folder",
        "files": 12,
    }
    assert folder["attributes"][0] == "role" and folder["groups"]["role"] == 4  # its transcripts' `Role:` headers
    assert sources["transcripts/p01.txt"]["attributes"] is None
    assert "people" not in folder and "people" not in sources["interviews.csv"]


def test_an_upload_is_stored_under_uploads_and_becomes_a_source_a_job_can_read(
    client: httpx.Client, server: Server
) -> None:
    response = client.put("/api/v1/data/team survey.csv", content=SURVEY)
    assert response.status_code == 201, response.text
    assert response.json() == {"name": "uploads/team-survey.csv", "format": "csv", "size": len(SURVEY)}
    assert (server.workdir / "data" / "uploads" / "team-survey.csv").read_bytes() == SURVEY
    listed = {source["name"]: source for source in client.get("/api/v1/data").json()}
    assert listed["uploads/team-survey.csv"]["attributes"] == ["team"]
    assert listed["uploads/team-survey.csv"]["groups"] == {"team": 2}
    job = wait_job(client, submit(client, data="uploads/team-survey.csv", count=2))
    assert job["status"] == "completed", job["error"]


def test_an_upload_never_overwrites_another(client: httpx.Client, server: Server) -> None:
    names = [client.put("/api/v1/data/notes.csv", content=SURVEY + bytes([n])).json()["name"] for n in range(3)]
    assert names == ["uploads/notes.csv", "uploads/notes-2.csv", "uploads/notes-3.csv"]
    folder = server.workdir / "data" / "uploads"
    assert [(folder / name.split("/")[1]).read_bytes()[-1] for name in names] == [0, 1, 2]


def test_an_upload_replaces_its_owners_own_file_of_that_name_when_asked_and_no_one_elses(start_server) -> None:
    server = start_server("--auth-token", "alpha,beta", "--rate-limit", "0")
    with server.client("alpha") as alpha, server.client("beta") as beta:
        assert alpha.put("/api/v1/data/notes.csv", content=SURVEY).json()["name"] == "uploads/notes.csv"
        again = alpha.put("/api/v1/data/notes.csv?replace=true", content=SURVEY + b"A3,Ops,I plan on paper.\n")
        assert again.status_code == 201 and again.json()["name"] == "uploads/notes.csv"
        assert (server.workdir / "data" / "uploads" / "notes.csv").read_bytes().endswith(b"I plan on paper.\n")
        assert beta.put("/api/v1/data/notes.csv?replace=true", content=SURVEY).json()["name"] == "uploads/notes-2.csv"
        assert (server.workdir / "data" / "uploads" / "notes.csv").read_bytes().endswith(b"I plan on paper.\n")
        for query in ("replace=null", "replace=yes", "replace=true&replace=true"):
            assert alpha.put(f"/api/v1/data/notes.csv?{query}", content=SURVEY).status_code == 422


TRANSCRIPTS = sorted((ROOT / "examples" / "transcripts").glob("*.txt"))
TRANSCRIPT = TRANSCRIPTS[0].read_text()


def test_a_folder_of_files_uploads_into_one_folder_a_job_reads_as_one_source(
    client: httpx.Client, server: Server
) -> None:
    for n, transcript in enumerate(TRANSCRIPTS[:3], 1):
        stored = client.put(f"/api/v1/data/ward interviews/p{n}.txt", content=transcript.read_bytes())
        assert stored.status_code == 201, stored.text
        assert stored.json()["name"] == f"uploads/ward-interviews/p{n}.txt"
    listed = {source["name"]: source for source in client.get("/api/v1/data").json()}
    assert listed["uploads/ward-interviews"]["kind"] == "folder" and listed["uploads/ward-interviews"]["files"] == 3
    job = wait_job(client, submit(client, data="uploads/ward-interviews", count=2))
    assert job["status"] == "completed", job["error"]
    assert job["result"]["metadata"]["source"]["participants"] == 3
    for n in (1, 2, 3):
        assert client.delete(f"/api/v1/data/ward-interviews/p{n}.txt").status_code == 204
    assert not (server.workdir / "data" / "uploads" / "ward-interviews").exists()  # it went with its last file
    assert not (server.workdir / "data" / "uploads" / persona.UPLOAD_OWNERS / "ward-interviews").exists()


def test_a_folder_of_uploads_is_its_uploader_s_alone(start_server) -> None:
    server = start_server("--auth-token", "alpha,beta", "--private", "--rate-limit", "0")
    with server.client("alpha") as alpha, server.client("beta") as beta:
        assert alpha.put("/api/v1/data/mine/p1.txt", content=TRANSCRIPT.encode()).status_code == 201
        taken = beta.put("/api/v1/data/mine/p2.txt", content=TRANSCRIPT.encode())
        assert taken.status_code == 409 and "uploads/mine is another upload" in taken.json()["message"]
        assert not (server.workdir / "data" / "uploads" / "mine" / "p2.txt").exists()
        assert beta.post("/api/v1/generate", json={"data": "uploads/mine"}).status_code == 400
        assert beta.post("/api/v1/generate", json={"data": "uploads/mine/p1.txt"}).status_code == 400
        assert beta.delete("/api/v1/data/mine/p1.txt").status_code == 404
        listed = {source["name"] for source in beta.get("/api/v1/data").json()}
        assert not {name for name in listed if name.startswith("uploads")}
        assert {"uploads/mine", "uploads/mine/p1.txt"} <= {
            source["name"] for source in alpha.get("/api/v1/data").json()
        }
        assert alpha.put("/api/v1/data/notes.csv", content=SURVEY).status_code == 201
        assert alpha.put("/api/v1/data/notes.csv/p1.txt", content=TRANSCRIPT.encode()).status_code == 409


def test_a_folder_s_files_count_to_its_owner_s_quota_and_age_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(persona, "MAX_UPLOADS_PER_OWNER", 2)
    (tmp_path / "data").mkdir()
    for n in (1, 2):
        persona.store_upload(tmp_path / "data", f"p{n}.txt", TRANSCRIPT.encode(), "key:a", folder="ward")
    with pytest.raises(persona.APIError, match="You keep 2 uploads"):
        persona.store_upload(tmp_path / "data", "p3.txt", TRANSCRIPT.encode(), "key:a", folder="ward")
    for file in (tmp_path / "data" / "uploads" / "ward").iterdir():
        os.utime(file, (0, 0))
    assert persona.remove_old_uploads(tmp_path / "data", 30) == 2
    assert not (tmp_path / "data" / "uploads" / "ward").exists()


def test_another_client_s_upload_named_from_the_root_is_still_missing(start_server) -> None:
    server = start_server("--auth-token", "alpha,beta", "--rate-limit", "0")
    with server.client("alpha") as alpha, server.client("beta") as beta:
        assert alpha.put("/api/v1/data/mine/p1.txt", content=TRANSCRIPT.encode()).status_code == 201
        root = (server.workdir / "data").resolve()
        for data in (f"{root}/uploads/mine", f"{root}/uploads/mine/p1.txt", f"{root}/uploads/../uploads/mine"):
            refused = beta.post("/api/v1/generate", json={"data": data})
            assert refused.status_code == 400 and "does not exist" in refused.json()["message"], data


def test_a_client_over_its_quota_makes_no_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(persona, "MAX_UPLOADS_PER_OWNER", 1)
    (tmp_path / "data").mkdir()
    persona.store_upload(tmp_path / "data", "p1.txt", TRANSCRIPT.encode(), "key:a")
    with pytest.raises(persona.APIError, match="You keep 1 uploads"):
        persona.store_upload(tmp_path / "data", "p2.txt", TRANSCRIPT.encode(), "key:a", folder="spare")
    assert not (tmp_path / "data" / "uploads" / "spare").exists()
    assert not (tmp_path / "data" / "uploads" / persona.UPLOAD_OWNERS / "spare").exists()


def test_a_folder_name_cut_to_its_length_can_still_be_deleted_from(client: httpx.Client) -> None:
    long_name = "a" * 99 + ".b"
    stored = client.put(f"/api/v1/data/{long_name}/p1.txt", content=TRANSCRIPT.encode()).json()["name"]
    folder = stored.split("/")[1]
    assert not folder.endswith((".", "-")) and len(folder) <= 100
    assert client.delete(f"/api/v1/data/{folder}/p1.txt").status_code == 204


def test_the_client_uploads_a_local_folder_as_one_source(server: Server, tmp_path: Path) -> None:
    local = tmp_path / "round one"
    (local / "site b").mkdir(parents=True)
    (local / "p1.txt").write_text(TRANSCRIPT)
    (local / "site b" / "p2.txt").write_text(TRANSCRIPTS[1].read_text())
    (local / "p #3.txt").write_text(TRANSCRIPTS[2].read_text())
    (local / "._p1.txt").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (local / "consent.pdf").write_bytes(b"%PDF-1.4")
    with persona.PersonaClient(server.url) as api:
        assert api.upload_folder(local) == "uploads/round-one"
        names = {source["name"] for source in api.list_data()}
    assert {"uploads/round-one/p1.txt", "uploads/round-one/p2.txt", "uploads/round-one/p-3.txt"} <= names
    assert not any(name.endswith(".pdf") or "_p1" in name for name in names)


def test_an_upload_is_its_uploaders_to_run_and_on_a_private_server_to_list(start_server) -> None:
    shared = start_server("--auth-token", "alpha,beta", "--rate-limit", "0")
    with shared.client("alpha") as alpha, shared.client("beta") as beta:
        assert alpha.put("/api/v1/data/notes.csv", content=SURVEY).status_code == 201
        for path in ("/api/v1/generate", "/api/v1/estimate"):
            refused = beta.post(path, json={"data": "uploads/notes.csv"})
            assert refused.status_code == 400 and "does not exist" in refused.json()["message"]
            assert "other clients' uploads" in beta.post(path, json={"data": "."}).json()["message"]
            assert beta.post(path, json={"data": "interviews.csv"}).status_code == 200
        assert alpha.post("/api/v1/generate", json={"data": "uploads/notes.csv"}).status_code == 200
        assert "uploads/notes.csv" in {source["name"] for source in beta.get("/api/v1/data").json()}  # reads open
    private = start_server("--auth-token", "alpha,beta", "--private", "--rate-limit", "0", db="private.db")
    with private.client("alpha") as alpha, private.client("beta") as beta:
        assert alpha.put("/api/v1/data/mine.csv", content=SURVEY).status_code == 201
        listed = {source["name"] for source in beta.get("/api/v1/data").json()}
        assert "interviews.csv" in listed and not {"uploads", "uploads/mine.csv", "uploads/notes.csv"} & listed
        assert {"uploads", "uploads/mine.csv"} <= {source["name"] for source in alpha.get("/api/v1/data").json()}


def test_several_files_upload_at_once_and_a_taken_name_is_replaced_when_the_researcher_says_so(
    server: Server, page, tmp_path: Path
) -> None:
    first, second = tmp_path / "ward a.csv", tmp_path / "ward b.csv"
    for path in (first, second):
        path.write_bytes(SURVEY)
    page.goto(f"{server.url}/jobs")
    page.get_by_label("Upload").set_input_files([first, second])
    expect(page.get_by_label("Data")).to_have_value("uploads/ward-b.csv")
    expect(page.locator("#new-job-error")).to_contain_text("Uploaded 2 files, each a source of its own")
    expect(page.locator("#data option[value='uploads/ward-a.csv']")).to_have_count(1)
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_label("Upload", exact=True).set_input_files(first)
    expect(page.get_by_label("Data")).to_have_value("uploads/ward-a.csv")
    expect(page.locator("#data option[value='uploads/ward-a-2.csv']")).to_have_count(0)


def test_a_researcher_uploads_a_folder_and_it_becomes_the_data(server: Server, page, tmp_path: Path) -> None:
    folder = tmp_path / "ward interviews"
    folder.mkdir()
    for n in (1, 2):
        (folder / f"p{n}.txt").write_text(TRANSCRIPTS[n].read_text())
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    (folder / "._p1.txt").write_bytes(b"\x00\x05\x16\x07 a Mac's resource fork")  # hidden: no one's data
    page.goto(f"{server.url}/jobs")
    page.get_by_label("A whole folder").set_input_files(folder)
    expect(page.get_by_label("Data")).to_have_value("uploads/ward-interviews")
    expect(page.get_by_role("alert").first).to_contain_text("Left out 1 file(s) of a format Persona does not read")
    assert sorted(p.name for p in (server.workdir / "data" / "uploads" / "ward-interviews").iterdir()) == [
        "p1.txt",
        "p2.txt",
    ]


DROP_A_FOLDER = """([folder, files]) => {
  // What Chromium hands a drop of a folder: one item whose entry is a directory, read a batch at a time.
  const fileEntry = ([name, text]) => ({
    isFile: true, isDirectory: false, fullPath: `/${folder}/${name}`,
    file: (done) => done(new File([text], name.split("/").pop(), {type: "text/plain"})),
  });
  const directory = (entries) => {
    const batches = [entries.slice(0, 1), entries.slice(1), []];
    return {isFile: false, isDirectory: true, createReader: () => ({readEntries: (done) => done(batches.shift())})};
  };
  const root = directory(files.map(fileEntry));
  const drop = new Event("drop", {bubbles: true, cancelable: true});
  Object.defineProperty(drop, "dataTransfer", {value: {items: [{webkitGetAsEntry: () => root}], files: []}});
  document.getElementById("new-job").dispatchEvent(drop);
}"""


def test_a_folder_dropped_on_the_form_is_uploaded_as_one_source(server: Server, page) -> None:
    texts = [[f"p{n}.txt", TRANSCRIPTS[n].read_text()] for n in (1, 2)] + [["notes.pdf", "%PDF-1.4"]]
    page.goto(f"{server.url}/jobs")
    page.evaluate(DROP_A_FOLDER, ["ward visits", texts])
    expect(page.get_by_label("Data")).to_have_value("uploads/ward-visits")
    expect(page.get_by_role("alert").first).to_contain_text("Left out 1 file(s) of a format Persona does not read")
    stored = server.workdir / "data" / "uploads" / "ward-visits"
    assert sorted(p.name for p in stored.iterdir()) == ["p1.txt", "p2.txt"]
    assert (stored / "p2.txt").read_text() == TRANSCRIPTS[2].read_text()


@pytest.mark.parametrize(("name", "status"), [("notes.exe", 422), ("..csv", 422), (".hidden", 422), ("%2e%2e", 422)])
def test_an_upload_of_an_unknown_format_or_an_odd_name_is_refused(
    client: httpx.Client, server: Server, name: str, status: int
) -> None:
    response = client.put(f"/api/v1/data/{name}", content=SURVEY)
    assert response.status_code == status, response.text
    assert response.json()["success"] is False
    assert not (server.workdir / "data" / "uploads").exists() or not any(
        (server.workdir / "data" / "uploads").iterdir()
    )


def test_an_upload_over_the_source_cap_is_a_413_and_stores_nothing(start_server) -> None:
    server = start_server("--rate-limit", "0", "--max-source-mb", "1")
    with server.client() as http:
        response = http.put("/api/v1/data/big.csv", content=b"x" * (1024 * 1024 + 1))
    assert response.status_code == 413 and "1 MiB" in response.json()["message"]
    assert not any((server.workdir / "data" / "uploads").glob("big*"))


def test_with_auth_on_listing_and_uploading_need_a_token(start_server) -> None:
    server = start_server("--rate-limit", "0", "--auth-token", "t0ken")
    with server.client() as anonymous:
        assert anonymous.get("/api/v1/data").status_code == 401
        assert anonymous.put("/api/v1/data/a.csv", content=SURVEY).status_code == 401
    with persona.PersonaClient(server.url, token="t0ken") as api:
        assert api.upload("a.csv", SURVEY)["name"] == "uploads/a.csv"
        assert "uploads/a.csv" in {source["name"] for source in api.list_data()}


def test_ollama_is_offered_only_where_the_server_is_told_it_is_there(start_server) -> None:
    plain = start_server("--rate-limit", "0")
    told = start_server("--rate-limit", "0", env={"OLLAMA_HOST": "http://127.0.0.1:9"}, db="told.db")
    with plain.client() as http:
        assert 'value="ollama"' not in http.get("/jobs").text and 'value="local"' in http.get("/jobs").text
    with told.client() as http:
        assert 'value="ollama"' in http.get("/jobs").text


# -- in a real browser -------------------------------------------------------


def test_a_researcher_uploads_a_csv_generates_and_reads_the_cards(server: Server, page, tmp_path: Path) -> None:
    survey = tmp_path / "shift survey.csv"
    survey.write_text((ROOT / "examples" / "interviews.csv").read_text())
    page.goto(f"{server.url}/jobs")
    page.get_by_label("Upload").set_input_files(survey)
    expect(page.get_by_label("Data")).to_have_value("uploads/shift-survey.csv")
    page.get_by_label("Group by").select_option("role")
    expect(page.get_by_label("Personas")).to_have_value("8")  # a persona per group, as the listing counts them
    expect(page.locator("#groups-hint")).to_be_hidden()
    page.get_by_label("Personas").fill("2")
    expect(page.locator("#groups-hint")).to_have_text("8 groups: personas for the 2 largest. Ask for all 8")
    page.get_by_role("button", name="Ask for all 8").click()
    expect(page.get_by_label("Personas")).to_have_value("8")
    expect(page.locator("#groups-hint")).to_be_hidden()
    page.get_by_label("Personas").fill("2")
    expect(page.get_by_label("Provider")).to_have_value("local")
    page.get_by_role("button", name="Generate personas").click()
    page.wait_for_url(re.compile(r"/jobs/job-[0-9a-f]{12}$"))
    expect(page.locator("article.card")).to_have_count(2)
    expect(page.locator("#progress")).to_have_attribute("value", "100")
    expect(page.locator("#stage")).to_have_text("done")


def test_a_running_job_is_followed_to_the_end_without_a_reload(
    server: Server, client: httpx.Client, page, gated_data: GatedDataServer
) -> None:
    job_id = submit(client, data=gated_data.url, count=3)
    page.goto(f"{server.url}/jobs/{job_id}")
    expect(page.locator("#stage")).not_to_have_text("done")
    page.evaluate("window.sameDocument = true")
    gated_data.gate.set()
    expect(page.locator("#progress")).to_have_attribute("value", "100")
    expect(page.locator("article.card")).to_have_count(3)
    assert page.evaluate("window.sameDocument") is True  # the page changed under it, it did not load again
    page.goto(f"{server.url}/jobs")
    expect(page.locator(f'#jobs a[href="/jobs/{job_id}"]')).to_be_visible()


def held_job(client: httpx.Client, gated_data: GatedDataServer) -> str:
    """A job running on data the gate holds, until the test opens it: it has said it is fetching, and waits."""
    job_id = submit(client, data=gated_data.url, count=3)
    fetching = persona.PROGRESS["fetching"]
    wait_for(lambda: client.get(f"/api/v1/generate/{job_id}").json()["progress"] == fetching, what="the fetch")
    return job_id


def shown_version(page: str) -> str:
    found = re.search(r'data-version="([^"]+)"', page)
    assert found, page[:500]
    return found[1]


def test_a_followed_page_is_answered_when_its_job_changes_not_before(
    server: Server, client: httpx.Client, gated_data: GatedDataServer
) -> None:
    job_id = held_job(client, gated_data)  # fetching its data, which the gate holds: nothing changes
    shown = shown_version(client.get(f"/jobs/{job_id}").text)
    answered: list[str] = []

    def follow() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as follower:
            answered.append(follower.get(f"/jobs/{job_id}", params={"wait": shown}).text)

    following = threading.Thread(target=follow)
    following.start()
    following.join(1)  # the job cannot move, so its page is not answered
    assert following.is_alive() and not answered
    gated_data.gate.set()  # the job can go on only now: an answer that shows it further came after this
    following.join(30)
    progress = re.search(r'<progress id="progress" max="100" value="(\d+)"', answered[0])
    assert shown_version(answered[0]) != shown and progress and int(progress[1]) > 0


def test_a_hidden_tab_follows_its_job_without_holding_a_connection(
    server: Server, client: httpx.Client, page, gated_data: GatedDataServer
) -> None:
    job_id = held_job(client, gated_data)
    page.goto(f"{server.url}/jobs/{job_id}")
    with page.expect_request(lambda request: "wait=" in request.url):
        pass  # a seen tab's request waits at the server
    page.evaluate("Object.defineProperty(document, 'visibilityState', {value: 'hidden'})")
    with page.expect_request(lambda request: f"/jobs/{job_id}" in request.url and "wait=" not in request.url):
        pass  # once hidden, it asks without waiting
    gated_data.gate.set()


def test_a_page_that_cannot_change_is_answered_at_once(server: Server, client: httpx.Client) -> None:
    job_id = wait_job(client, submit(client, data="interviews.csv", count=2))["job_id"]
    shown = shown_version(client.get(f"/jobs/{job_id}").text)
    with httpx.Client(base_url=server.url, timeout=2) as quick:  # a held request would take 5 s
        assert quick.get(f"/jobs/{job_id}", params={"wait": shown}).status_code == 200
        assert quick.get("/jobs/job-000000000000", params={"wait": "gone"}).status_code == 404


def test_a_followed_job_page_waits_out_a_429_and_then_follows_the_job_to_its_end(
    server: Server, client: httpx.Client, page, gated_data: GatedDataServer
) -> None:
    job_id = submit(client, data=gated_data.url, count=3)
    refused: list[str] = []

    def slow_down_once(route) -> None:  # type: ignore[no-untyped-def]
        if refused:
            route.continue_()
            return
        refused.append(route.request.url)
        body = '{"success": false, "error": "rate_limited", "message": "Rate limit exceeded.", "details": {}}'
        route.fulfill(status=429, headers={"Retry-After": "1", "Content-Type": "application/json"}, body=body)

    page.goto(f"{server.url}/jobs/{job_id}")
    page.route(re.compile(rf"/jobs/{job_id}(\?|$)"), slow_down_once)
    expect(page.locator("#waiting")).to_contain_text("the server asked to slow down")
    gated_data.gate.set()
    expect(page.locator("#progress")).to_have_attribute("value", "100")
    expect(page.locator("article.card")).to_have_count(3)
    expect(page.locator("#waiting")).to_be_hidden()
    assert [url.split("?")[0] for url in refused] == [f"{server.url}/jobs/{job_id}"]


def test_a_running_job_shows_how_long_it_has_run_and_its_cancel_button_cancels_it(
    server: Server, client: httpx.Client, page, gated_data: GatedDataServer
) -> None:
    job_id = held_job(client, gated_data)
    page.goto(f"{server.url}/jobs/{job_id}")
    expect(page.locator("#elapsed")).to_contain_text("running for")
    expect(page.locator("#stage")).to_have_text("fetching the data")  # a URL's download is the job's first stage
    expect(page).to_have_title(re.compile(r"^Personas from http://127\.0\.0\.1:\d+/"))  # by its source, running
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#stage")).to_have_text("failed")
    expect(page.get_by_text("Error: cancelled")).to_be_visible()
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    assert client.get(f"/api/v1/generate/{job_id}").json()["error"] == "cancelled"


@pytest.mark.parametrize(("progress", "words"), [(35, "grouping"), (46, "1 of 4 done"), (68, "3 of 4 done")])
def test_a_job_whose_model_writes_a_persona_a_segment_says_how_many_it_has_written(progress: int, words: str) -> None:
    # The segmented strategy reports 35 + 45 × written // count after each persona.
    running = {"status": "running", "progress": progress}
    assert words in persona.stage_words(running, 4)
    assert "checking the personas" in persona.stage_words({**running, "progress": 80}, 4)
    assert persona.stage_words({**running, "progress": 46}, None) == "writing the personas"  # group_by: not known


def test_cancel_on_a_job_that_ended_first_says_so_and_the_page_shows_how_it_ended(
    server: Server, client: httpx.Client, page, gated_data: GatedDataServer
) -> None:
    job_id = held_job(client, gated_data)
    page.goto(f"{server.url}/jobs/{job_id}")
    held = threading.Event()

    def hold_the_page(route) -> None:  # type: ignore[no-untyped-def]
        if held.is_set():
            route.continue_()
            return
        body = '{"success": false, "error": "rate_limited", "message": "Rate limit exceeded.", "details": {}}'
        route.fulfill(status=429, headers={"Retry-After": "1", "Content-Type": "application/json"}, body=body)

    page.route(re.compile(rf"/jobs/{job_id}(\?|$)"), hold_the_page)  # the page still shows it running when it has ended
    gated_data.gate.set()
    wait_job(client, job_id)
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#cancelling")).to_have_text("The job ended before it could be cancelled.")
    held.set()
    expect(page.locator("article.card")).to_have_count(3)
    assert client.get(f"/api/v1/generate/{job_id}").json()["status"] == "completed"


def pdf_pages(pdf: bytes) -> int:
    return len(re.findall(rb"/Type\s*/Page\b(?!s)", pdf))


def test_printed_cards_give_each_persona_a_page_of_its_own(server: Server, client: httpx.Client, page) -> None:
    job = wait_job(client, submit(client, data="interviews.csv", count=4))
    exported = client.get(f"/api/v1/generate/{job['job_id']}/export", params={"format": "html"}).text
    for path in (f"/jobs/{job['job_id']}", "the exported cards page"):
        if path.startswith("/"):
            page.goto(f"{server.url}{path}")
        else:
            page.goto("about:blank")  # a file opened on its own, not under the server's page and its policy
            page.set_content(exported)
        page.emulate_media(media="print")
        breaks = page.eval_on_selector_all("article.card", "cards => cards.map(c => getComputedStyle(c).breakAfter)")
        assert breaks == ["page"] * 3 + ["auto"]  # no blank page after the last
        expect(page.locator(".ids").first).to_be_hidden()  # counted on paper too, not listed
        assert pdf_pages(page.pdf(format="A4")) == 4, path  # "Save as PDF": each persona on one page
    page.goto(f"{server.url}/jobs/{job['job_id']}")
    page.emulate_media(media="print")
    expect(page.locator("#refine")).to_be_hidden()


def test_export_refine_and_compare_from_a_jobs_page(server: Server, client: httpx.Client, page, tmp_path: Path) -> None:
    (server.workdir / "data" / "more.csv").write_bytes(SURVEY)
    parent = wait_job(client, submit(client, data="interviews.csv", count=3))
    page.goto(f"{server.url}/jobs/{parent['job_id']}")
    with page.expect_download() as download:
        page.get_by_role("link", name="Export CSV").click()
    saved = tmp_path / "exported.csv"
    download.value.save_as(saved)
    with page.expect_download() as project:
        page.get_by_role("link", name="Export QDA project (.qdpx)").click()
    assert project.value.suggested_filename.endswith(".qdpx")
    project.value.save_as(tmp_path / "personas.qdpx")
    assert "project.qde" in zipfile.ZipFile(tmp_path / "personas.qdpx").namelist()
    rows = list(csv.DictReader(io.StringIO(saved.read_text("utf-8-sig"))))
    assert [row["name"] for row in rows] == [p["name"] for p in parent["result"]["personas"]]
    wait_job(client, submit(client, data="interviews.csv", count=2))  # newer than the parent
    page.locator("#refine").get_by_label("Data").select_option("more.csv")
    page.get_by_role("button", name="Refine").click()
    page.wait_for_url(re.compile(r"/jobs/job-[0-9a-f]{12}$"))
    expect(page.get_by_text("Refined from")).to_be_visible()
    expect(page.locator("article.card")).to_have_count(3)
    child_id = page.url.rsplit("/", 1)[1]
    assert child_id != parent["job_id"]
    expect(page.get_by_role("link", name=parent["job_id"]).first).to_be_visible()  # the experiment's other job
    expect(page.get_by_label("Compare with")).to_have_value(parent["job_id"])  # its parent, not the newest job
    page.get_by_role("button", name="Compare").click()
    page.wait_for_url(re.compile(r"/compare\?"))
    assert page.url.endswith(f"/compare?a={parent['job_id']}&b={child_id}")  # before, then after
    expect(page.locator("section.pair").first).to_contain_text("similarity")
    assert page.locator("section.pair article.card").count() >= 2


def test_with_auth_on_the_page_asks_for_a_token_once_and_reads_stay_open(start_server, page) -> None:
    server = start_server("--rate-limit", "0", "--auth-token", "t0ken")
    with server.client("t0ken") as http:
        done = wait_job(http, submit(http, data="interviews.csv", count=2))
    page.goto(f"{server.url}/jobs/{done['job_id']}")  # reading needs no token
    expect(page.locator("article.card")).to_have_count(2)
    page.goto(f"{server.url}/jobs")
    page.get_by_label("API token").fill("t0ken")
    page.get_by_role("button", name="Use token").click()
    page.get_by_label("Data").select_option("interviews.csv")
    page.get_by_role("button", name="Generate personas").click()
    page.wait_for_url(re.compile(r"/jobs/job-[0-9a-f]{12}$"))
    expect(page.locator("article.card")).to_have_count(3)
    page.goto(f"{server.url}/jobs")
    expect(page.get_by_label("Data")).to_contain_text("interviews.csv")  # no second prompt in this tab
    expect(page.locator("#token-dialog")).not_to_be_visible()


def test_a_private_servers_pages_ask_for_a_token_and_show_its_own_jobs_alone(start_server, page) -> None:
    server = start_server("--rate-limit", "0", "--auth-token", "alpha,beta", "--private")
    with server.client("alpha") as alpha, server.client("beta") as beta:
        mine = wait_job(alpha, submit(alpha, data="interviews.csv", count=2))["job_id"]
        theirs = wait_job(beta, submit(beta, data="interviews.csv", count=2))["job_id"]
    assert httpx.get(f"{server.url}/jobs/{mine}").status_code == 401
    page.goto(f"{server.url}/jobs")
    page.get_by_label("API token").fill("alpha")
    page.get_by_role("button", name="Use token").click()
    expect(page.get_by_role("link", name=mine)).to_be_visible()
    expect(page.get_by_role("link", name=theirs)).to_have_count(0)
    page.goto(f"{server.url}/jobs/{mine}")
    expect(page.locator("article.card")).to_have_count(2)
    with page.expect_download() as download:
        page.get_by_role("link", name="Export CSV").click()
    assert download.value.suggested_filename.endswith(f"{mine}.csv")
    assert page.goto(f"{server.url}/jobs/{theirs}").status == 404
    assert page.goto(f"{server.url}/api/v1/generate/{theirs}").status == 404


def test_an_unknown_job_is_a_readable_page_not_json(server: Server, page) -> None:
    response = page.goto(f"{server.url}/jobs/job-000000000000")
    assert response.status == 404 and response.headers["content-type"].startswith("text/html")
    expect(page.get_by_text("Job job-000000000000 was not found.")).to_be_visible()
    expect(page.get_by_role("link", name="All jobs")).to_be_visible()


def test_the_pages_fit_400_pixels_and_run_no_script_of_the_datas(server: Server, client: httpx.Client, page) -> None:
    job = wait_job(
        client,
        submit(
            client,
            data=[
                {"id": "x1", "text": "I want <script>window.ran=1</script> offline rotas."},
                {"id": "x2", "text": "The rota app <img src=x onerror=window.ran=1> is slow."},
            ],
            count=2,
        ),
    )
    page.set_viewport_size({"width": 400, "height": 900})
    failed: list[str] = []
    page.on("response", lambda response: failed.append(response.url) if response.status >= 400 else None)
    for path in ("/jobs", f"/jobs/{job['job_id']}", f"/compare?a={job['job_id']}&b={job['job_id']}"):
        response = page.goto(server.url + path)
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert page.evaluate("document.documentElement.scrollWidth") <= 400, path
        if path.startswith("/jobs/"):  # the first persona is in a phone's first screen
            assert page.evaluate("document.querySelector('article.card').getBoundingClientRect().top") < 800
        assert page.evaluate("window.ran") is None
        icon = page.evaluate("document.querySelector('link[rel=icon]').href")
        assert httpx.get(icon).headers["content-type"] == "image/svg+xml"
    assert failed == []  # no asset, icon or request of the script's is refused
    assert "<script>" not in client.get(f"/jobs/{job['job_id']}").text


def test_an_upload_is_its_uploader_s_to_delete(start_server) -> None:
    server = start_server("--auth-token", "tok-a,tok-b")
    with server.client() as http:
        a, b = ({"Authorization": f"Bearer {token}"} for token in ("tok-a", "tok-b"))
        assert http.put("/api/v1/data/mine.csv", content=SURVEY, headers=a).status_code == 201
        refused = http.delete("/api/v1/data/mine.csv", headers=b)
        assert refused.status_code == 404 and refused.json()["error"] == "not_found"
        assert (server.workdir / "data" / "uploads" / "mine.csv").exists()
        with persona.PersonaClient(server.url, "tok-a") as client:
            client.delete_upload("uploads/mine.csv")
        assert not (server.workdir / "data" / "uploads" / "mine.csv").exists()
        assert "uploads/mine.csv" not in {s["name"] for s in http.get("/api/v1/data", headers=a).json()}
        assert http.delete("/api/v1/data/mine.csv", headers=a).status_code == 404
        assert http.put("/api/v1/data/again.csv", content=SURVEY, headers=b).status_code == 201
        assert http.delete("/api/v1/data/again.csv", headers=b).status_code == 204


def test_one_client_s_uploads_stop_at_its_quota(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(persona, "MAX_UPLOADS_PER_OWNER", 2)
    (tmp_path / "data").mkdir()
    for _ in range(2):
        persona.store_upload(tmp_path / "data", "survey.csv", SURVEY, "key:a")
    with pytest.raises(persona.APIError, match="You keep 2 uploads, the most one client may"):
        persona.store_upload(tmp_path / "data", "survey.csv", SURVEY, "key:a")
    assert persona.store_upload(tmp_path / "data", "survey.csv", SURVEY, "key:b")["name"] == "uploads/survey-3.csv"
    old = tmp_path / "data" / "uploads" / "survey.csv"
    os.utime(old, (0, 0))
    assert persona.remove_old_uploads(tmp_path / "data", 30) == 1 and not old.exists()
    assert not (tmp_path / "data" / "uploads" / persona.UPLOAD_OWNERS / "survey.csv").exists()
