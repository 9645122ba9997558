"""After generation: exports, experiments, comparisons, refinements and estimates, against a real server."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, GatedDataServer, Server, submit, wait_job

import persona


def run_persona(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "persona", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def completed_job(client: httpx.Client, **body: object) -> dict:
    job = wait_job(client, submit(client, **{"data": "./interviews.csv", "count": 3, **body}))
    assert job["status"] == "completed", job["error"]
    return job


def csv_rows(document: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(document.decode("utf-8-sig"), newline="")))


# -- export ------------------------------------------------------------------


@pytest.mark.sqlite_only
def test_a_csv_export_is_one_row_per_persona_with_list_fields_on_lines(client: httpx.Client) -> None:
    job = completed_job(client)
    response = client.get(f"/api/v1/generate/{job['job_id']}/export", params={"format": "csv"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"] == f'attachment; filename="personas-{job["job_id"]}.csv"'
    assert response.content.startswith("\ufeff".encode())  # Excel reads UTF-8 only with its mark
    rows = csv_rows(response.content)
    personas = job["result"]["personas"]
    assert [row["name"] for row in rows] == [p["name"] for p in personas]
    for row, persona_ in zip(rows, personas):
        assert row["goals"].split("\n") == persona_["goals"]
        assert row["quotes"].split("\n") == persona_["quotes"]
        assert row["participants"].split("\n") == persona_["evidence"]["participants"]
        assert row["role"] == persona_["demographics"]["role"]


@pytest.mark.sqlite_only
def test_the_output_folder_holds_the_same_csv_the_export_sends(client: httpx.Client) -> None:
    job = completed_job(client)
    exported = client.get(f"/api/v1/generate/{job['job_id']}/export?format=csv").content
    assert (Path(job["result"]["output_path"]) / "personas.csv").read_bytes() == exported


@pytest.mark.sqlite_only
def test_json_markdown_and_html_exports_hold_every_persona(client: httpx.Client) -> None:
    job = completed_job(client)
    personas = job["result"]["personas"]
    url = f"/api/v1/generate/{job['job_id']}/export"
    as_json = client.get(url, params={"format": "json"})
    assert as_json.headers["content-type"] == "application/json"
    assert as_json.json() == {"personas": personas}
    markdown = client.get(url, params={"format": "markdown"})
    assert markdown.headers["content-type"] == "text/markdown; charset=utf-8"
    assert markdown.headers["content-disposition"].endswith('.md"')
    headings = [line for line in markdown.text.splitlines() if line.startswith("## ") and ": " in line]
    assert len(headings) == len(personas) and markdown.text.startswith("# Personas\n")
    page = client.get(url, params={"format": "html"})
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.text.count("<article") == len(personas)


@pytest.mark.sqlite_only
def test_an_export_without_a_format_is_json(client: httpx.Client) -> None:
    job = completed_job(client)
    response = client.get(f"/api/v1/generate/{job['job_id']}/export")
    assert response.json() == {"personas": job["result"]["personas"]}


def test_an_unknown_format_is_a_422_listing_the_formats(client: httpx.Client) -> None:
    job = completed_job(client)
    response = client.get(f"/api/v1/generate/{job['job_id']}/export", params={"format": "xlsx"})
    assert response.status_code == 422
    assert response.json()["error"] == "validation_error"
    assert "csv, json, markdown, html" in response.json()["message"]


def test_exporting_an_unfinished_job_is_a_409_and_an_unknown_one_a_404(client: httpx.Client,
                                                                        gated_data: GatedDataServer) -> None:
    job_id = submit(client, data=gated_data.url)
    response = client.get(f"/api/v1/generate/{job_id}/export", params={"format": "csv"})
    assert response.status_code == 409
    assert response.json()["details"]["status"] in ("pending", "running")
    gated_data.gate.set()
    assert client.get("/api/v1/generate/job-000000000000/export").status_code == 404


def test_a_spreadsheet_never_runs_a_participants_words_as_a_formula() -> None:
    document = persona.personas_csv([{"id": "persona-001", "name": "=cmd|' /C calc'!A0", "title": "+1", "summary": "",
                                      "demographics": {}, "goals": ["-2+3"], "pain_points": [], "behaviours": [],
                                      "quotes": ["@SUM(A1)"], "evidence": {"participants": ["P1"], "share": 1.0}}])
    row = csv_rows(document.encode())[0]
    assert (row["name"], row["title"], row["goals"], row["quotes"]) == ("'=cmd|' /C calc'!A0", "'+1", "'-2+3", "'@SUM(A1)")


@pytest.mark.sqlite_only
def test_the_command_line_and_the_client_export_a_job(client: httpx.Client, server: Server, tmp_path: Path) -> None:
    job = completed_job(client)
    target = tmp_path / "personas.csv"
    result = run_persona("export", job["job_id"], "--server", server.url, "--format", "csv", "--output", str(target))
    assert result.returncode == 0, result.stderr
    with persona.PersonaClient(server.url) as api:
        assert api.export(job["job_id"], "csv") == target.read_bytes()
        assert json.loads(api.export(job["job_id"], "json")) == {"personas": job["result"]["personas"]}
    missing = run_persona("export", "job-000000000000", "--server", server.url)
    assert missing.returncode == 2 and "not found" in missing.stderr


# -- experiments -------------------------------------------------------------


def test_experiments_list_named_and_own_experiments_newest_first(client: httpx.Client) -> None:
    first = completed_job(client, config={"experiment": "Onboarding study"})
    second = completed_job(client, config={"experiment": "Onboarding study"})
    alone = completed_job(client)
    response = client.get("/api/v1/experiments")
    assert response.status_code == 200
    assert response.headers["x-total-count"] == "2"
    own, named = response.json()
    assert own == {"experiment_id": alone["result"]["experiment_id"], "name": None, "jobs": 1,
                   "created_at": alone["created_at"], "updated_at": alone["completed_at"]}
    assert named["name"] == "Onboarding study" and named["jobs"] == 2
    assert named["experiment_id"] == first["result"]["experiment_id"] == second["result"]["experiment_id"]
    assert named["created_at"] == first["created_at"] and named["updated_at"] == second["completed_at"]


def test_an_experiment_shows_its_jobs_as_the_job_list_does(client: httpx.Client) -> None:
    first = completed_job(client, config={"experiment": "Diary study"})
    second = completed_job(client, config={"experiment": "Diary study"})
    completed_job(client, config={"experiment": "Another study"})
    experiment_id = first["result"]["experiment_id"]
    body = client.get(f"/api/v1/experiments/{experiment_id}").json()
    assert body["experiment_id"] == experiment_id and body["name"] == "Diary study"
    listed = {job["job_id"]: job for job in client.get("/api/v1/generate").json()}
    assert body["jobs"] == [listed[first["job_id"]], listed[second["job_id"]]]
    assert "result" not in body["jobs"][0]


def test_an_unknown_experiment_is_a_404_in_the_envelope(client: httpx.Client) -> None:
    for experiment_id in ("exp-000000000000", "not-an-id"):
        response = client.get(f"/api/v1/experiments/{experiment_id}")
        assert response.status_code == 404
        assert response.json()["error"] == "not_found" and experiment_id in response.json()["message"]


def test_experiments_are_paged_like_the_job_list(client: httpx.Client) -> None:
    made = [submit(client, data="./interviews.csv", count=2) for _ in range(3)]
    for job_id in made:
        wait_job(client, job_id)
    page = client.get("/api/v1/experiments", params={"limit": 2})
    assert page.headers["x-total-count"] == "3"
    assert page.headers["link"] == '</api/v1/experiments?limit=2&offset=2>; rel="next"'
    rest = client.get("/api/v1/experiments", params={"limit": 2, "offset": 2})
    assert "link" not in rest.headers
    ids = [e["experiment_id"] for e in page.json() + rest.json()]
    assert ids == [persona.own_experiment(job_id) for job_id in reversed(made)]
    assert client.get("/api/v1/experiments", params={"limit": 0}).status_code == 422


@pytest.mark.sqlite_only
def test_the_command_line_and_the_client_list_experiments(client: httpx.Client, server: Server) -> None:
    job = completed_job(client, config={"experiment": "Pricing interviews"})
    experiment_id = job["result"]["experiment_id"]
    listed = run_persona("experiments", "--server", server.url)
    assert listed.returncode == 0, listed.stderr
    assert experiment_id in listed.stdout and "Pricing interviews" in listed.stdout
    shown = run_persona("experiments", experiment_id, "--server", server.url)
    assert shown.returncode == 0 and job["job_id"] in shown.stdout
    with persona.PersonaClient(server.url) as api:
        assert [e["experiment_id"] for e in api.list_experiments()] == [experiment_id]
        assert api.get_experiment(experiment_id)["jobs"][0]["job_id"] == job["job_id"]
