"""The researcher's workbench: the data directory over the API, and the pages in a real browser."""

from __future__ import annotations

import httpx
import pytest
from conftest import Server, submit, wait_job

import persona

# Its subject is not the store: it runs on SQLite alone.
pytestmark = pytest.mark.sqlite_only

SURVEY = b"participant_id,team,response\nA1,Sales,I need the rota a week ahead.\nA2,Support,The app logs me out.\n"


# -- the data directory over the API -----------------------------------------


def test_the_data_listing_names_files_folders_formats_and_a_tables_attributes(client: httpx.Client) -> None:
    sources = {source["name"]: source for source in client.get("/api/v1/data").json()}
    assert sources["interviews.csv"]["format"] == "csv" and sources["interviews.csv"]["kind"] == "file"
    assert sources["interviews.csv"]["attributes"][:2] == ["role", "age"]
    assert sources["transcripts"] == {"name": "transcripts", "kind": "folder", "format": "folder", "files": 12,
                                      "attributes": None}
    assert sources["transcripts/p01.txt"]["attributes"] is None


def test_an_upload_is_stored_under_uploads_and_becomes_a_source_a_job_can_read(client: httpx.Client,
                                                                               server: Server) -> None:
    response = client.put("/api/v1/data/team survey.csv", content=SURVEY)
    assert response.status_code == 201, response.text
    assert response.json() == {"name": "uploads/team-survey.csv", "format": "csv", "size": len(SURVEY)}
    assert (server.workdir / "data" / "uploads" / "team-survey.csv").read_bytes() == SURVEY
    listed = {source["name"]: source for source in client.get("/api/v1/data").json()}
    assert listed["uploads/team-survey.csv"]["attributes"] == ["team"]
    job = wait_job(client, submit(client, data="uploads/team-survey.csv", count=2))
    assert job["status"] == "completed", job["error"]


def test_an_upload_never_overwrites_another(client: httpx.Client, server: Server) -> None:
    names = [client.put("/api/v1/data/notes.csv", content=SURVEY + bytes([n])).json()["name"] for n in range(3)]
    assert names == ["uploads/notes.csv", "uploads/notes-2.csv", "uploads/notes-3.csv"]
    folder = server.workdir / "data" / "uploads"
    assert [(folder / name.split("/")[1]).read_bytes()[-1] for name in names] == [0, 1, 2]


@pytest.mark.parametrize(("name", "status"), [("notes.exe", 422), ("..csv", 422), (".hidden", 422), ("%2e%2e", 422)])
def test_an_upload_of_an_unknown_format_or_an_odd_name_is_refused(client: httpx.Client, server: Server, name: str,
                                                                  status: int) -> None:
    response = client.put(f"/api/v1/data/{name}", content=SURVEY)
    assert response.status_code == status, response.text
    assert response.json()["success"] is False
    assert not (server.workdir / "data" / "uploads").exists() or not any((server.workdir / "data" / "uploads").iterdir())


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
