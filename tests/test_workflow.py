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
from fake_providers import FakeProvider

import persona


def run_persona(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "persona", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def completed_job(client: httpx.Client, **body: object) -> dict:
    job = wait_job(client, submit(client, **{"data": "./interviews.csv", "count": 3, **body}))
    assert job["status"] == "completed", job["error"]
    return job


def csv_rows(document: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(document.decode("utf-8-sig"), newline="")))


# -- export ------------------------------------------------------------------


@pytest.mark.sqlite_only
def test_an_excel_export_holds_a_sheet_of_personas_and_one_of_evidence(client: httpx.Client) -> None:
    import zipfile

    job = completed_job(client)
    response = client.get(f"/api/v1/generate/{job['job_id']}/export", params={"format": "xlsx"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    assert response.headers["content-disposition"].endswith('.xlsx"')
    workbook = zipfile.ZipFile(io.BytesIO(response.content))
    assert 'name="Personas"' in workbook.read("xl/workbook.xml").decode()
    personas_sheet = workbook.read("xl/worksheets/sheet1.xml").decode()
    for persona_ in job["result"]["personas"]:
        assert persona_["title"].replace("&", "&amp;") in personas_sheet
    rows, _ = persona.xlsx_rows(response.content, "export.xlsx")  # the longest sheet: the evidence
    assert rows[0] == ["persona", "name", "participant"]
    assert len(rows) - 1 == sum(len(p["evidence"]["participants"]) for p in job["result"]["personas"])


@pytest.mark.sqlite_only
def test_a_csv_export_is_one_row_per_persona_with_list_fields_on_lines(client: httpx.Client) -> None:
    job = completed_job(client)
    response = client.get(f"/api/v1/generate/{job['job_id']}/export", params={"format": "csv"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    day = job["completed_at"][:10]
    assert response.headers["content-disposition"] == (
        f'attachment; filename="personas-interviews-{day}-{job["job_id"]}.csv"'
    )
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
    response = client.get(f"/api/v1/generate/{job['job_id']}/export", params={"format": "pdf"})
    assert response.status_code == 422
    assert response.json()["error"] == "validation_error"
    assert "csv, json, markdown, html, xlsx" in response.json()["message"]


def test_exporting_an_unfinished_job_is_a_409_and_an_unknown_one_a_404(
    client: httpx.Client, gated_data: GatedDataServer
) -> None:
    job_id = submit(client, data=gated_data.url)
    response = client.get(f"/api/v1/generate/{job_id}/export", params={"format": "csv"})
    assert response.status_code == 409
    assert response.json()["details"]["status"] in ("pending", "running")
    gated_data.gate.set()
    assert client.get("/api/v1/generate/job-000000000000/export").status_code == 404


def test_a_spreadsheet_never_runs_a_participants_words_as_a_formula() -> None:
    document = persona.personas_csv(
        [
            {
                "id": "persona-001",
                "name": "=cmd|' /C calc'!A0",
                "title": "+1",
                "summary": "",
                "demographics": {},
                "goals": ["-2+3"],
                "pain_points": [],
                "behaviours": [],
                "quotes": ["@SUM(A1)"],
                "evidence": {"participants": ["P1"], "share": 1.0},
            }
        ]
    )
    row = csv_rows(document.encode())[0]
    assert (row["name"], row["title"], row["goals"], row["quotes"]) == (
        "'=cmd|' /C calc'!A0",
        "'+1",
        "'-2+3",
        "'@SUM(A1)",
    )


def test_a_spreadsheet_never_runs_a_column_header_as_a_formula() -> None:
    document = persona.personas_csv(
        [
            {
                "id": "persona-001",
                "name": "Ana",
                "title": "t",
                "summary": "",
                "demographics": {'=HYPERLINK("http://x.test","y")': "a (50%)"},
                "goals": [],
                "pain_points": [],
                "behaviours": [],
                "quotes": [],
                "evidence": {"participants": ["P1"], "share": 1.0},
            }
        ]
    )
    header = next(csv.reader(io.StringIO(document.lstrip("\ufeff"))))
    assert '\'=HYPERLINK("http://x.test","y")' in header and not any(cell.startswith("=") for cell in header)


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
    assert own == {
        "experiment_id": alone["result"]["experiment_id"],
        "name": None,
        "jobs": 1,
        "created_at": alone["created_at"],
        "updated_at": alone["completed_at"],
    }
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


# -- estimate ----------------------------------------------------------------


def test_an_offline_estimate_costs_nothing_and_creates_nothing(client: httpx.Client) -> None:
    response = client.post("/api/v1/estimate", json={"data": "./interviews.csv", "count": 4, "provider": "local"})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "participants": 16,
        "provider": "local",
        "model": persona.LOCAL_MODEL,
        "strategy": "offline",
        "calls": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "cost_usd": 0.0,
        "warnings": [],
    }
    assert client.get("/api/v1/generate").headers["x-total-count"] == "0"
    assert client.get("/api/v1/experiments").json() == []


@pytest.mark.sqlite_only
@pytest.mark.parametrize(
    "config", [{}, {"strategy": "segmented", "max_input_tokens": 1000}], ids=["holistic", "segmented and condensed"]
)
def test_an_estimate_counts_the_calls_the_job_then_makes(start_server, fake: FakeProvider, config: dict) -> None:
    server = start_server("--rate-limit", "0", env=fake.environment("openai"))
    body = {"data": "interviews.csv", "count": 2, "provider": "openai", "model": "gpt-4.1-mini", "config": config}
    with server.client() as http:
        estimate = http.post("/api/v1/estimate", json=body).json()
        assert fake.requests == []  # an estimate asks no provider
        job = wait_job(http, submit(http, **body))
    assert job["status"] == "completed", job["error"]
    assert estimate["strategy"] == job["result"]["metadata"]["engine"]["strategy"]
    assert estimate["calls"] == len(fake.requests) == job["result"]["metadata"]["usage"]["calls"]
    sent = sum(len(json.dumps(request["body"], ensure_ascii=False)) // 4 for request in fake.requests)
    assert 0.6 < estimate["input_tokens"] / sent < 1.5
    assert estimate["cost_usd"] == round((estimate["input_tokens"] * 0.4 + estimate["output_tokens"] * 1.6) / 1e6, 6)


def test_an_unknown_model_has_no_price_and_says_so(client: httpx.Client) -> None:
    body = {"data": "./interviews.csv", "count": 3, "provider": "ollama", "model": "llama3.1"}
    estimate = client.post("/api/v1/estimate", json=body).json()
    assert estimate["calls"] == 1 and estimate["input_tokens"] > 0
    assert estimate["cost_usd"] is None
    assert any("no price is known for model 'llama3.1'" in warning for warning in estimate["warnings"])


def test_a_dated_model_snapshot_is_priced_as_its_model() -> None:
    assert persona.model_price("anthropic", "claude-sonnet-4-20250514") == persona.MODEL_PRICES["claude-sonnet-4"]
    assert persona.model_price("openai", "gpt-4o-2024-08-06") == persona.MODEL_PRICES["gpt-4o"]
    assert persona.model_price("openai", "gpt-4o-audio-preview") is None


def test_an_estimate_checks_its_body_as_a_generation_does(start_server) -> None:
    server = start_server("--rate-limit", "0", "--auth-token", "t0ken")
    with server.client() as anonymous:
        assert anonymous.post("/api/v1/estimate", json={"data": "./interviews.csv"}).status_code == 401
    with server.client("t0ken") as http:
        assert http.post("/api/v1/estimate", json={"data": "./interviews.csv", "count": 0}).status_code == 422
        missing = http.post("/api/v1/estimate", json={"data": "./nowhere.csv"})
        assert missing.status_code == 400 and "nowhere.csv" in missing.json()["message"]
        few = http.post("/api/v1/estimate", json={"data": ["I want my rota a week ahead."], "count": 3}).json()
        assert any("fewer than the 3 personas" in warning for warning in few["warnings"])


@pytest.mark.sqlite_only
def test_generate_estimate_prints_the_estimate_here_or_from_a_server(server: Server) -> None:
    here = run_persona(
        "generate",
        str(ROOT / "examples" / "interviews.csv"),
        "--estimate",
        "--provider",
        "openai",
        "--model",
        "gpt-4.1",
        "--json",
    )
    assert here.returncode == 0, here.stderr
    estimate = json.loads(here.stdout)
    assert (estimate["participants"], estimate["calls"], estimate["strategy"]) == (16, 1, "holistic")
    there = run_persona("generate", "interviews.csv", "--estimate", "--server", server.url, "--provider", "local")
    assert there.returncode == 0, there.stderr
    assert "participants   16" in there.stdout and "cost (USD)     $0.0000" in there.stdout
    with persona.PersonaClient(server.url) as api:
        assert api.estimate("interviews.csv", count=2, provider="local")["participants"] == 16


# -- custom fields and an instruction ----------------------------------------

FIELDS = [
    {"name": "tech_savviness", "description": "How at ease they are with software, in a phrase"},
    {"name": "assistive_tools", "description": "The assistive technology they use", "type": "list"},
]


@pytest.mark.sqlite_only
@pytest.mark.parametrize("provider", ["anthropic", "openai", "gemini"])
def test_custom_fields_and_an_instruction_reach_the_model_and_the_personas(
    start_server, fake: FakeProvider, provider: str
) -> None:
    server = start_server("--rate-limit", "0", env=fake.environment(provider))
    config = {"fields": FIELDS, "instruction": "Focus on accessibility needs."}
    with server.client() as http:
        job = wait_job(http, submit(http, data="interviews.csv", count=2, provider=provider, config=config))
        assert job["status"] == "completed", job["error"]
        exported = csv_rows(http.get(f"/api/v1/generate/{job['job_id']}/export", params={"format": "csv"}).content)
        page = http.get(f"/jobs/{job['job_id']}").text
    prompt = json.dumps(fake.requests[0]["body"])
    assert "Focus on accessibility needs." in prompt and "tech_savviness" in prompt
    for number, persona_ in enumerate(job["result"]["personas"], 1):
        assert persona_["tech_savviness"] == f"tech_savviness of persona {number}"
        assert persona_["assistive_tools"] == [f"assistive_tools item of persona {number}"]
    assert [row["tech_savviness"] for row in exported] == ["tech_savviness of persona 1", "tech_savviness of persona 2"]
    assert "Tech savviness" in page and "assistive_tools item of persona 2" in page
    assert job["result"]["metadata"]["engine"]["instruction"] == "Focus on accessibility needs."


@pytest.mark.sqlite_only
def test_a_custom_field_the_model_leaves_out_is_asked_for_again(start_server, fake: FakeProvider) -> None:
    def drop_field(prompt: str, answer: dict) -> dict:
        del answer["personas"][0]["tech_savviness"]
        return answer

    fake.script = [drop_field]
    server = start_server("--rate-limit", "0", env=fake.environment("openai"))
    with server.client() as http:
        job = wait_job(http, submit(http, data="interviews.csv", count=2, provider="openai", config={"fields": FIELDS}))
    assert job["status"] == "completed", job["error"]
    assert "`tech_savviness` is missing" in fake.requests[1]["body"]["messages"][-1]["content"]


@pytest.mark.parametrize(
    ("config", "path"),
    [
        ({"instruction": "Focus on accessibility needs."}, "config.instruction"),
        ({"fields": FIELDS}, "config.fields"),
    ],
)
def test_the_offline_engine_refuses_an_instruction_or_custom_fields_by_name(
    client: httpx.Client, config: dict, path: str
) -> None:
    response = client.post("/api/v1/generate", json={"data": "./interviews.csv", "provider": "local", "config": config})
    assert response.status_code == 422
    assert path in response.json()["details"] and "LLM provider" in response.json()["message"]


@pytest.mark.sqlite_only
@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ([{"name": "goals", "description": "x"}], "config.fields[0].name"),
        ([{"name": "participants", "description": "x"}], "config.fields[0].name"),
        ([{"name": "tech savviness", "description": "x"}], "config.fields[0].name"),
        ([{"name": "mood", "description": "x"}, {"name": "mood", "description": "y"}], "config.fields[1].name"),
        ([{"name": f"field_{n}", "description": "x"} for n in range(11)], "config.fields"),
        ([{"name": "mood", "description": "x", "type": "number"}], "config.fields[0].type"),
    ],
)
def test_custom_fields_that_clash_or_are_not_identifiers_are_refused(
    start_server, fake: FakeProvider, fields: list, path: str
) -> None:
    server = start_server("--rate-limit", "0", env=fake.environment("anthropic"))
    with server.client() as http:
        response = http.post(
            "/api/v1/generate", json={"data": "./interviews.csv", "provider": "anthropic", "config": {"fields": fields}}
        )
    assert response.status_code == 422, response.text
    assert path in response.json()["details"]
    assert fake.requests == []


# -- compare -----------------------------------------------------------------


def test_a_job_compared_with_itself_pairs_each_persona_with_itself(client: httpx.Client) -> None:
    job = completed_job(client)
    response = client.get("/api/v1/compare", params={"a": job["job_id"], "b": job["job_id"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["a"], body["b"], body["unpaired"]) == (job["job_id"], job["job_id"], {"a": [], "b": []})
    assert [(pair["a"]["id"], pair["b"]["id"], pair["similarity"]) for pair in body["pairs"]] == [
        (p["id"], p["id"], 1.0) for p in job["result"]["personas"]
    ]
    for pair in body["pairs"]:
        assert all(not split["only_a"] and not split["only_b"] for split in pair["fields"].values())


@pytest.mark.sqlite_only
def test_runs_of_different_sizes_pair_by_shared_participants_and_list_the_rest(client: httpx.Client) -> None:
    three, four = completed_job(client, count=3), completed_job(client, count=4)
    body = client.get("/api/v1/compare", params={"a": three["job_id"], "b": four["job_id"]}).json()
    assert len(body["pairs"]) == 3 and len(body["unpaired"]["b"]) == 1 and body["unpaired"]["a"] == []
    by_id = {side: {p["id"]: p for p in job["result"]["personas"]} for side, job in (("a", three), ("b", four))}
    for pair in body["pairs"]:
        ours = set(by_id["a"][pair["a"]["id"]]["evidence"]["participants"])
        theirs = set(by_id["b"][pair["b"]["id"]]["evidence"]["participants"])
        assert pair["similarity"] == round(len(ours & theirs) / len(ours | theirs), 4) > 0
        assert pair["fields"]["participants"] == {
            "shared": sorted(ours & theirs),
            "only_a": sorted(ours - theirs),
            "only_b": sorted(theirs - ours),
        }
        goals = pair["fields"]["goals"]
        assert sorted(goals["shared"] + goals["only_a"]) == sorted(by_id["a"][pair["a"]["id"]]["goals"])
        assert sorted(goals["shared"] + goals["only_b"]) == sorted(by_id["b"][pair["b"]["id"]]["goals"])


def test_personas_sharing_no_participant_pair_on_their_words_only_when_alike() -> None:
    def one(pid: str, name: str, goal: str) -> dict:
        return {
            "id": f"persona-{pid}",
            "name": name,
            "title": name,
            "goals": [goal],
            "pain_points": [],
            "behaviours": [],
            "quotes": [],
            "demographics": {},
            "evidence": {"participants": [pid], "share": 1.0},
        }

    left = [one("A1", "Night nurse", "Swap night shifts quickly when the children are sick")]
    right = [
        one("B1", "Warehouse picker", "Scanner batteries die before the end of the shift in the cold store"),
        one("B2", "Ward nurse", "Swap night shifts quickly when my children are sick"),
    ]
    comparison = persona.compare_personas(left, right)
    assert [(pair["a"]["id"], pair["b"]["id"]) for pair in comparison["pairs"]] == [("persona-A1", "persona-B2")]
    assert 0.5 < comparison["pairs"][0]["similarity"] < 1
    assert comparison["unpaired"] == {
        "a": [],
        "b": [{"id": "persona-B1", "name": "Warehouse picker", "title": "Warehouse picker"}],
    }


def test_comparing_needs_two_completed_jobs(client: httpx.Client, gated_data: GatedDataServer) -> None:
    job = completed_job(client)
    missing = client.get("/api/v1/compare", params={"a": job["job_id"]})
    assert missing.status_code == 422 and "b" in missing.json()["details"]
    unknown = client.get("/api/v1/compare", params={"a": job["job_id"], "b": "job-000000000000"})
    assert unknown.status_code == 404 and "job-000000000000" in unknown.json()["message"]
    running = submit(client, data=gated_data.url)
    busy = client.get("/api/v1/compare", params={"a": job["job_id"], "b": running})
    assert busy.status_code == 409 and running in busy.json()["message"]
    gated_data.gate.set()


@pytest.mark.sqlite_only
def test_the_command_line_compares_two_output_folders_or_two_jobs_and_the_client_two_jobs(
    client: httpx.Client, server: Server
) -> None:
    three, four = completed_job(client, count=3), completed_job(client, count=4)
    folders = [job["result"]["output_path"] for job in (three, four)]
    offline = run_persona("compare", *folders, "--json")
    assert offline.returncode == 0, offline.stderr
    online = run_persona("compare", three["job_id"], four["job_id"], "--server", server.url, "--json")
    assert online.returncode == 0, online.stderr
    ours, theirs = json.loads(offline.stdout), json.loads(online.stdout)
    assert ours["pairs"] == theirs["pairs"] and ours["unpaired"] == theirs["unpaired"]
    readable = run_persona("compare", three["job_id"], four["job_id"], "--server", server.url)
    assert "similarity" in readable.stdout and "only in b:" in readable.stdout
    with persona.PersonaClient(server.url) as api:
        assert api.compare(three["job_id"], four["job_id"])["pairs"] == theirs["pairs"]


# -- refine ------------------------------------------------------------------

MORE_INTERVIEWS = [
    {
        "participant_id": "P17",
        "role": "Nurse",
        "response": "I need to swap night shifts from my phone when my son is ill.",
    },
    {
        "participant_id": "P17",
        "role": "Nurse",
        "response": "It's frustrating when the rota is changed without telling me.",
    },
    {"participant_id": "P18", "role": "Driver", "response": "I want my overtime hours counted right on every payslip."},
    {
        "participant_id": "P18",
        "role": "Driver",
        "response": "I keep my own log of start and finish times in a notebook.",
    },
    {
        "participant_id": "P01",
        "role": "Nurse",
        "response": "I always check the rota app before I leave the ward at night.",
    },
]


def refine(client: httpx.Client, job_id: str, **body: object) -> httpx.Response:
    return client.post(f"/api/v1/generate/{job_id}/refine", json=body)


def test_refining_with_more_data_continues_the_parents_personas(client: httpx.Client) -> None:
    parent = completed_job(client, count=3, config={"experiment": "Shift workers"})
    response = refine(client, parent["job_id"], data=MORE_INTERVIEWS)
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"job_id", "status", "message", "status_url"}
    child = wait_job(client, response.json()["job_id"])
    assert child["status"] == "completed", child["error"]
    result = child["result"]
    assert result["parent_job_id"] == parent["job_id"]
    assert result["experiment_id"] == parent["result"]["experiment_id"]
    before = {p["id"]: p for p in parent["result"]["personas"]}
    everyone = {pid for p in result["personas"] for pid in p["evidence"]["participants"]}
    assert {"P17", "P18", "P01"} <= everyone
    continued = [p for p in result["personas"] if p["id"] in before]
    assert continued, "a persona standing for the same participants continues its parent's"
    for persona_ in continued:
        assert persona_["name"] == before[persona_["id"]]["name"]
        assert set(persona_["evidence"]["participants"]) & set(before[persona_["id"]]["evidence"]["participants"])
    changes = result["changes"]
    assert [c["id"] for c in changes["personas"]] == [p["id"] for p in continued]
    for change in changes["personas"]:
        now = next(p for p in result["personas"] if p["id"] == change["id"])
        added = set(now["evidence"]["participants"]) - set(before[change["id"]]["evidence"]["participants"])
        assert set(change["fields"].get("participants", {"added": []})["added"]) == added
        for key in ("goals", "quotes"):
            if key in change["fields"]:
                assert set(change["fields"][key]["added"]) == set(now[key]) - set(before[change["id"]][key])
                assert set(change["fields"][key]["removed"]) == set(before[change["id"]][key]) - set(now[key])
    assert {c["id"] for c in changes["new"]} == {p["id"] for p in result["personas"]} - set(before)
    assert {c["id"] for c in changes["gone"]} == set(before) - {p["id"] for p in result["personas"]}
    experiment = client.get(f"/api/v1/experiments/{parent['result']['experiment_id']}").json()
    assert [job["job_id"] for job in experiment["jobs"]] == [parent["job_id"], child["job_id"]]


def test_a_refinement_of_a_job_in_its_own_experiment_joins_that_experiment(client: httpx.Client) -> None:
    parent = completed_job(client)
    child = wait_job(client, refine(client, parent["job_id"], data=MORE_INTERVIEWS, count=2).json()["job_id"])
    assert child["status"] == "completed", child["error"]
    assert child["result"]["experiment_id"] == parent["result"]["experiment_id"]
    assert len(child["result"]["personas"]) == 2
    listed = client.get("/api/v1/experiments").json()
    assert [(e["experiment_id"], e["jobs"]) for e in listed] == [(parent["result"]["experiment_id"], 2)]


def test_refining_needs_a_completed_job_and_something_to_refine_with(
    client: httpx.Client, gated_data: GatedDataServer
) -> None:
    parent = completed_job(client)
    empty = refine(client, parent["job_id"])
    assert empty.status_code == 422 and "data is required unless instruction is given" in empty.json()["message"]
    offline = refine(client, parent["job_id"], instruction="Focus on accessibility needs.")
    assert offline.status_code == 422 and "instruction" in offline.json()["details"]
    assert "LLM provider" in offline.json()["message"]
    assert refine(client, "job-000000000000", data=MORE_INTERVIEWS).status_code == 404
    running = submit(client, data=gated_data.url)
    busy = refine(client, running, data=MORE_INTERVIEWS)
    assert busy.status_code == 409 and busy.json()["details"]["status"] in ("pending", "running")
    gated_data.gate.set()
    failed = wait_job(client, submit(client, data=["I only said one thing here."], count=3))
    assert failed["status"] == "failed"
    assert refine(client, failed["job_id"], data=MORE_INTERVIEWS).status_code == 409
    missing = refine(client, parent["job_id"], data="./nowhere.csv")
    assert missing.status_code == 400 and "nowhere.csv" in missing.json()["message"]


def test_refining_is_a_write_endpoint(start_server) -> None:
    server = start_server("--rate-limit", "0", "--auth-token", "t0ken")
    with server.client("t0ken") as http:
        parent = completed_job(http)
    with server.client() as anonymous:
        response = refine(anonymous, parent["job_id"], data=MORE_INTERVIEWS)
    assert response.status_code == 401 and response.json()["error"] == "unauthorised"


@pytest.mark.sqlite_only
def test_refining_with_an_instruction_shows_the_model_the_personas_and_the_instruction(
    start_server, fake: FakeProvider
) -> None:
    server = start_server("--rate-limit", "0", env=fake.environment("anthropic"))
    with server.client() as http:
        parent = completed_job(http, count=2, provider="anthropic")
        calls = len(fake.requests)
        child = wait_job(
            http, refine(http, parent["job_id"], instruction="Split the nurses from the drivers.").json()["job_id"]
        )
    assert child["status"] == "completed", child["error"]
    prompt = fake.requests[calls]["body"]["messages"][-1]["content"]
    assert "Split the nurses from the drivers." in prompt and "<personas>" in prompt
    for persona_ in parent["result"]["personas"]:
        assert persona_["name"] in prompt
    assert child["result"]["parent_job_id"] == parent["job_id"]
    assert [p["id"] for p in child["result"]["personas"]] == [p["id"] for p in parent["result"]["personas"]]
    assert all(p["quotes"] for p in child["result"]["personas"])  # grounded as any generation


@pytest.mark.sqlite_only
def test_the_command_line_and_the_client_refine_a_job(client: httpx.Client, server: Server) -> None:
    parent = completed_job(client)
    (server.workdir / "data" / "more.json").write_text(json.dumps(MORE_INTERVIEWS))
    result = run_persona("refine", parent["job_id"], "--data", "more.json", "--server", server.url)
    assert result.returncode == 0, result.stderr
    assert "changed " in result.stdout and "Output:" in result.stdout
    with persona.PersonaClient(server.url) as api:
        job = api.wait_for_job(api.refine(parent["job_id"], data="more.json", count=2)["job_id"], interval=0.1)
    assert job["status"] == "completed" and job["result"]["parent_job_id"] == parent["job_id"]


# -- redaction ---------------------------------------------------------------

PLANTED = (
    "jo.bloggs@example.org",
    "07700 900461",
    "Joanna",
    "Bloggs",
    "https://intranet.example.com/rota?user=jb",
    "M60 1NW",
    "4539 1488 0343 6467",
    "Priyanka",
    "Oduya",
)


def planted_survey(workdir: Path) -> str:
    """A survey export whose answers hold an e-mail address, a phone number, a URL, a postcode, a card number
    and names."""
    rows = [["participant_id", "Name", "role", "response"]]
    for number in range(1, 9):
        name = "Joanna Bloggs" if number % 2 else "Priyanka Oduya"
        answer = (
            "I need my rota a week ahead, Joanna here. Write to jo.bloggs@example.org or ring 07700 900461. "
            "The old rota lives at https://intranet.example.com/rota?user=jb and my payslip goes to M60 1NW. "
            f"I once paid the parking with card 4539 1488 0343 6467. Priyanka and I swap shifts {number} times."
        )
        rows.append([f"R{number:02d}", name, "Nurse" if number % 2 else "Driver", answer])
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    (workdir / "data" / "planted.csv").write_text(out.getvalue())
    return "planted.csv"


@pytest.mark.sqlite_only
def test_redaction_keeps_planted_personal_data_from_the_provider_and_every_output(
    start_server, fake: FakeProvider, workdir: Path
) -> None:
    source = planted_survey(workdir)
    server = start_server("--rate-limit", "0", env=fake.environment("openai"))
    with server.client() as http:
        job = wait_job(http, submit(http, data=source, count=2, provider="openai", config={"redact": True}))
    assert job["status"] == "completed", job["error"]
    sent = json.dumps([request["body"] for request in fake.requests], ensure_ascii=False)
    for value in PLANTED:
        assert value not in sent, value
    assert "[email-1]" in sent and "[phone-1]" in sent and "[name-1]" in sent and "[url-1]" in sent
    folder = Path(job["result"]["output_path"])
    everything = json.dumps(job["result"], ensure_ascii=False) + "".join(p.read_text() for p in folder.iterdir())
    for value in PLANTED:
        assert value not in everything, value
    counts = job["result"]["metadata"]["redaction"]
    assert {
        kind: counts[kind] > 0 for kind in ("email", "phone", "url", "postal_code", "card", "name")
    } == dict.fromkeys(("email", "phone", "url", "postal_code", "card", "name"), True)
    quotes = [quote for p in job["result"]["personas"] for quote in p["quotes"]]
    assert quotes and not any(
        "unverified_quotes" in p for p in job["result"]["personas"]
    )  # checked on the redacted text


@pytest.mark.sqlite_only
def test_the_server_default_redacts_unless_a_request_says_otherwise(
    start_server, fake: FakeProvider, workdir: Path
) -> None:
    source = planted_survey(workdir)
    server = start_server("--rate-limit", "0", env={**fake.environment("anthropic"), "PERSONA_REDACT": "1"})
    with server.client() as http:
        assert wait_job(http, submit(http, data=source, count=2, provider="anthropic"))["status"] == "completed"
        redacted = json.dumps([request["body"] for request in fake.requests])
        calls = len(fake.requests)
        plain = wait_job(http, submit(http, data=source, count=2, provider="anthropic", config={"redact": False}))
    assert "jo.bloggs@example.org" not in redacted and "Joanna" not in redacted
    assert "jo.bloggs@example.org" in json.dumps([request["body"] for request in fake.requests[calls:]])
    assert "redaction" not in plain["result"]["metadata"]


@pytest.mark.sqlite_only
def test_speaker_names_in_transcripts_are_redacted(start_server, fake: FakeProvider, workdir: Path) -> None:
    folder = workdir / "data" / "calls"
    folder.mkdir()
    for number, (speaker, said) in enumerate(
        [
            ("Marguerite", "I book my shifts on the bus every Sunday night."),
            ("Tobiah", "The payslip app logs me out every single time I open it."),
            ("Marguerite", "My manager texts me the rota, which I then lose."),
        ],
        1,
    ):
        (folder / f"call-{number}.txt").write_text(
            f"Interviewer: How do you plan your week?\n{speaker}: {said} Ask {speaker} again next week.\n"
            f"Interviewer: Anything else?\n{speaker}: Call me on +44 161 496 0{number}21, thanks.\n"
        )
    server = start_server("--rate-limit", "0", env=fake.environment("gemini"))
    with server.client() as http:
        job = wait_job(http, submit(http, data="calls", count=2, provider="gemini", config={"redact": True}))
    assert job["status"] == "completed", job["error"]
    sent = json.dumps([request["body"] for request in fake.requests])
    for planted in ("Marguerite", "Tobiah", "marguerite", "496 0121"):
        assert planted not in sent, planted
    assert job["result"]["metadata"]["redaction"]["name"] == 3  # "Ask <speaker> again": labels are not text


def test_redaction_replaces_each_value_with_one_stable_placeholder() -> None:
    redactor = persona.Redactor({"Sarah Jones"})
    first = redactor.text("Sarah Jones wrote from sarah@example.com; Sarah said sarah@example.com is best.")
    assert first == "[name-1] wrote from [email-1]; [name-1] said [email-1] is best."
    assert redactor.text("Email other@example.com, not sarah@example.com.") == "Email [email-2], not [email-1]."
    assert redactor.counts["email"] == 4 and redactor.counts["name"] == 2


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("On 2024-01-15 we had 10000 users.", True),
        ("The 1999 model ran from 1999 to 2004.", True),
        ("Ring 0161 496 0000 after six.", False),
        ("Card 4111 1111 1111 1111 was declined.", False),
        ("Order 4111 1111 1111 1112 was late.", True),  # not a card number: it fails Luhn's check (nor is it a phone)
        ("Send it to SW1A 1AA today.", False),
    ],
)
def test_numbers_that_are_not_personal_data_are_kept(text: str, kept: bool) -> None:
    assert (persona.Redactor(()).text(text) == text) is kept


def test_a_refinement_of_a_refinement_keeps_the_data_each_one_added(client: httpx.Client) -> None:
    parent = completed_job(client)
    first = wait_job(client, refine(client, parent["job_id"], data=MORE_INTERVIEWS[:2]).json()["job_id"])
    second = wait_job(client, refine(client, first["job_id"], data=MORE_INTERVIEWS[2:4]).json()["job_id"])
    assert second["status"] == "completed", second["error"]
    everyone = {pid for p in second["result"]["personas"] for pid in p["evidence"]["participants"]}
    assert {"P17", "P18"} <= everyone
    assert second["result"]["metadata"]["source"]["participants"] == 18
    gone = {
        pid
        for change in second["result"]["changes"]["personas"]
        for pid in change["fields"].get("participants", {"removed": []})["removed"]
    }
    assert "P17" not in gone


@pytest.mark.sqlite_only
@pytest.mark.parametrize("how", [("--redact=required",), ("--redact", "required")])
def test_a_server_that_requires_redaction_redacts_whatever_a_request_says(
    start_server, fake: FakeProvider, workdir: Path, how: tuple[str, ...]
) -> None:
    source = planted_survey(workdir)
    server = start_server("--rate-limit", "0", *how, env=fake.environment("anthropic"))
    with server.client() as http:
        job = wait_job(http, submit(http, data=source, count=2, provider="anthropic", config={"redact": False}))
    assert job["status"] == "completed", job["error"]
    assert "redaction" in job["result"]["metadata"]
    sent = json.dumps([request["body"] for request in fake.requests])
    assert "jo.bloggs@example.org" not in sent and "Joanna" not in sent


@pytest.mark.sqlite_only
def test_a_refinement_of_a_redacted_job_stays_redacted_whatever_config_it_sends(
    client: httpx.Client, workdir: Path
) -> None:
    source = planted_survey(workdir)
    parent = completed_job(client, data=source, count=2, config={"redact": True})
    child = wait_job(
        client,
        refine(client, parent["job_id"], data=MORE_INTERVIEWS, config={"complexity": "simple", "redact": False}).json()[
            "job_id"
        ],
    )
    assert child["status"] == "completed", child["error"]
    assert "redaction" in child["result"]["metadata"]
    everything = json.dumps(child["result"], ensure_ascii=False)
    for value in PLANTED:
        assert value not in everything, value


def test_redaction_covers_warnings_and_the_source_and_keeps_participants_apart(tmp_path: Path) -> None:
    (tmp_path / "Interview_Sarah_Jones.txt").write_text(
        "Interviewer: How do you plan?\nSarah Jones: I plan on Sundays with a paper diary.\n"
        "Interviewer: And then?\nSarah Jones: Then I copy it into the app, which is slow.\n"
    )
    dataset = persona.load_path("Interview_Sarah_Jones.txt", tmp_path)
    redacted = persona.Redactor(dataset.names).dataset(dataset)
    shown = json.dumps([redacted.source, redacted.warnings, [p.id for p in redacted.participants]])
    assert "sarah" not in shown.lower() and "jones" not in shown.lower()
    twins = persona.Redactor({"Sarah"}).dataset(
        persona.Dataset(
            [
                persona.Participant("Sarah", ["I plan on Sundays."]),
                persona.Participant("sarah", ["I plan on Mondays."]),
            ],
            {"location": "inline"},
        )
    )
    assert len({p.id for p in twins.participants}) == 2


def test_words_the_data_uses_as_words_and_numbered_speakers_are_not_names() -> None:
    redactor = persona.Redactor({"Nurse Manager", "Speaker 2", "Maya Patel"})
    dataset = persona.Dataset(
        [
            persona.Participant(
                "P1",
                [
                    "As a nurse I check the rota.",
                    "Maya says the nurse app is slow.",
                    "Speaker 2 agrees with the Nurse Manager.",
                ],
            )
        ],
        {"location": "x"},
    )
    texts = redactor.dataset(dataset).participants[0].texts
    assert texts == [
        "As a nurse I check the rota.",
        "[name-1] says the nurse app is slow.",
        "Speaker 2 agrees with the [name-2].",
    ]


@pytest.mark.sqlite_only
def test_groups_name_participants_as_the_redacted_data_does(client: httpx.Client, workdir: Path) -> None:
    names = ["Ada Lovelace", "Alan Turing", "Grace Hopper"]
    rows = [["participant", "reviewer", "review"]] + [
        [name, name, f"The rota app is slow, says {name}, on day {n}."] for n, name in enumerate(names, 1)
    ]
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    (workdir / "data" / "reviews.csv").write_text(out.getvalue())
    job = completed_job(
        client,
        data="reviews.csv",
        count=2,
        config={"redact": True, "groups": {"First": names[:1], "Others": names[1:]}},
    )
    assert [p["title"] for p in job["result"]["personas"]] == ["First", "Others"]
    assert [p["evidence"]["participants"] for p in job["result"]["personas"]] == [
        ["[name-1]"],
        ["[name-2]", "[name-3]"],
    ]
    assert "Lovelace" not in json.dumps(job["result"])


@pytest.mark.sqlite_only
def test_the_command_line_shows_what_differs_and_refuses_what_is_neither_folder_nor_job(
    client: httpx.Client, server: Server
) -> None:
    three, four = completed_job(client, count=3), completed_job(client, count=4)
    shown = run_persona("compare", three["result"]["output_path"], four["result"]["output_path"])
    assert shown.returncode == 0, shown.stderr
    assert "    a: " in shown.stdout and "    b: " in shown.stdout
    wrong = run_persona("compare", "out/nope/", three["job_id"])
    assert wrong.returncode == 2 and "out/nope/ is neither an output folder nor a job id" in wrong.stderr
    malformed = client.get("/api/v1/compare", params={"a": "nope", "b": three["job_id"]})
    assert malformed.status_code == 422 and "a" in malformed.json()["details"]


def test_an_estimate_of_data_that_cannot_be_read_says_the_job_would_fail(client: httpx.Client) -> None:
    response = client.post("/api/v1/estimate", json={"data": ["", " "], "provider": "openai"})
    assert response.status_code == 200, response.text
    estimate = response.json()
    assert (estimate["participants"], estimate["calls"], estimate["input_tokens"]) == (0, 0, 0)
    assert any(warning.startswith("the job would fail: ") for warning in estimate["warnings"])


@pytest.mark.parametrize(
    ("kind", "said", "secret"),
    [
        ("email", "Write to renée.dubois@exämple.de if the export breaks again.", "renée.dubois@exämple.de"),
        ("ip_address", "The kiosk at 10.20.30.40 drops the connection every night.", "10.20.30.40"),
        ("ip_address", "Our gateway 2001:db8:85a3::8a2e:370:7334 blocks the upload.", "2001:db8:85a3::8a2e:370:7334"),
        ("iban", "Refunds go to GB82 WEST 1234 5698 7654 32 but arrive late.", "GB82 WEST 1234 5698 7654 32"),
        ("id_number", "They asked for my passport number X1234567 twice.", "X1234567"),
        ("id_number", "I typed my SSN 123-45-6789 into the form by mistake.", "123-45-6789"),
        ("birth_date", "I was born on 12/03/1985 and the app thinks I am a child.", "12/03/1985"),
        ("address", "Deliveries to 221B Baker Street always go to the wrong door.", "221B Baker Street"),
        ("address", "The courier never finds Hauptstraße 5 in the evening.", "Hauptstraße 5"),
        ("handle", "I complained to @acme_support on social media twice.", "@acme_support"),
        ("url", "The help page at help.acme-bank.com/reset never loads.", "help.acme-bank.com/reset"),
    ],
)
def test_each_kind_of_personal_data_is_redacted(kind: str, said: str, secret: str) -> None:
    redactor = persona.Redactor([])
    shown = redactor.text(said)
    assert secret not in shown and f"[{kind}-1]" in shown and redactor.counts[kind] == 1


def test_names_are_found_beside_their_address_in_ids_and_in_a_your_name_column() -> None:
    records = [
        {
            "participant": "zoom_Sarah_Jones",
            "Your name": "Priya Natarajan",
            "comment": "Sarah Jones (sarah.jones@example.org) says the rota app loses her shifts. Priya agrees.",
        },
        {
            "participant": "Interview-Ana-Lima",
            "Your name": "Tom Becker",
            "comment": "Ana keeps a paper diary because the rota app is slow to sync.",
        },
    ]
    dataset = persona.load_inline(records)
    redacted = persona.Redactor(dataset.names).dataset(dataset)
    shown = json.dumps([[p.id, p.texts, p.attributes] for p in redacted.participants], ensure_ascii=False)
    for secret in ("Sarah", "Jones", "sarah.jones", "Priya", "Natarajan", "Ana", "Lima", "Tom", "Becker"):
        assert secret not in shown, secret
    assert "your_name" not in {key for p in dataset.participants for key in p.attributes}  # nor shown on a persona
