"""The REST API as the reference shows it, driven over HTTP against a real server."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest
from conftest import GatedDataServer, Server, submit, wait_for, wait_job

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
JOB_FIELDS = {"job_id", "status", "progress", "created_at", "started_at", "completed_at", "error", "result"}


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"success", "error", "message", "details"}
    assert body["success"] is False
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["details"], dict)
    return body


# -- root and health ---------------------------------------------------------


def test_root_describes_the_api(client: httpx.Client) -> None:
    body = client.get("/").json()
    assert body == {"name": "Persona API", "version": body["version"], "docs": "/docs", "health": "/api/v1/health"}
    assert re.match(r"^\d+\.\d+\.\d+$", body["version"])


def test_a_browser_asking_for_the_root_is_sent_to_the_workbench(client: httpx.Client) -> None:
    html_first = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
    response = client.get("/", headers=html_first, follow_redirects=False)
    assert response.status_code == 303 and response.headers["Location"] == "/jobs"
    api = client.get("/", headers={"Accept": "application/json"})
    assert api.json()["name"] == "Persona API"
    assert response.headers["Vary"] == api.headers["Vary"] == "Accept"  # no cache mixes the two answers


def test_health_reports_healthy_with_a_utc_timestamp(client: httpx.Client) -> None:
    response = client.get("/api/v1/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert ISO_Z.match(body["timestamp"])


# -- generation --------------------------------------------------------------


def test_generate_answers_like_the_reference_and_the_job_completes(client: httpx.Client) -> None:
    response = client.post("/api/v1/generate", json={"data": "./interviews.csv", "count": 4})
    assert response.status_code == 200
    body = response.json()
    assert re.match(r"^job-[0-9a-f]{12}$", body["job_id"])
    assert body == {
        "job_id": body["job_id"],
        "status": "pending",
        "message": "Generation job created successfully",
        "status_url": f"/api/v1/generate/{body['job_id']}",
    }
    job = wait_job(client, body["job_id"])
    assert set(job) == JOB_FIELDS
    assert job["status"] == "completed", job["error"]
    assert job["progress"] == 100 and job["error"] is None
    assert all(ISO_Z.match(job[key]) for key in ("created_at", "started_at", "completed_at"))
    result = job["result"]
    assert {"personas", "experiment_id", "output_path", "metadata"} <= set(result)
    assert re.match(r"^exp-[0-9a-f]{12}$", result["experiment_id"])
    assert len(result["personas"]) == 4
    for persona in result["personas"]:
        assert {"id", "name", "title", "demographics", "goals", "pain_points", "behaviours", "quotes"} <= set(persona)
        assert persona["title"] and persona["title"] != persona["name"]


def test_a_pending_job_shows_the_reference_fields_with_nulls(client: httpx.Client, gated_data: GatedDataServer) -> None:
    job_id = submit(client, data=gated_data.url)
    job = client.get(f"/api/v1/generate/{job_id}").json()
    assert set(job) == JOB_FIELDS
    assert job["status"] in ("pending", "running")
    assert job["completed_at"] is None and job["error"] is None and job["result"] is None
    gated_data.gate.set()
    assert wait_job(client, job_id)["status"] == "completed"


def test_progress_only_rises_while_a_job_runs(client: httpx.Client, gated_data: GatedDataServer) -> None:
    job_id = submit(client, data=gated_data.url, count=3)
    running = wait_job(client, job_id, until=("running",))
    seen = [running["progress"]]
    gated_data.gate.set()

    def finished() -> bool:
        job = client.get(f"/api/v1/generate/{job_id}").json()
        seen.append(job["progress"])
        return job["status"] in ("completed", "failed")

    wait_for(finished, what="the job to finish")
    assert seen == sorted(seen)
    assert seen[-1] == 100


def test_an_unknown_job_is_a_404_envelope(refusing_client: httpx.Client) -> None:
    assert_envelope(refusing_client.get("/api/v1/generate/job-000000000000"), 404, "not_found")
    assert_envelope(refusing_client.get("/api/v1/generate/not-an-id"), 404, "not_found")


def test_a_data_source_with_fewer_participants_than_count_fails_saying_how_many(client: httpx.Client) -> None:
    job = wait_job(client, submit(client, data=["I want a faster app.", "I need offline mode."], count=3))
    assert job["status"] == "failed"
    assert "2 participant" in job["error"]
    assert job["result"] is None


def test_jobs_with_the_same_experiment_name_share_an_experiment_id(client: httpx.Client) -> None:
    jobs = [submit(client, data="interviews.csv", config={"experiment": "q3-study"}) for _ in range(2)]
    other = submit(client, data="interviews.csv")
    ids = [wait_job(client, job)["result"]["experiment_id"] for job in [*jobs, other]]
    assert ids[0] == ids[1]
    assert ids[2] != ids[0]


# -- listing -------------------------------------------------------------------


def test_listing_jobs_is_a_bare_array_oldest_first_without_results(client: httpx.Client) -> None:
    job_ids = [submit(client, data="interviews.csv") for _ in range(3)]
    for job_id in job_ids:
        wait_job(client, job_id)
    response = client.get("/api/v1/generate")
    assert response.status_code == 200
    jobs = response.json()
    assert isinstance(jobs, list)
    assert [job["job_id"] for job in jobs] == job_ids
    assert all(set(job) == JOB_FIELDS - {"result"} for job in jobs)
    assert response.headers["X-Total-Count"] == "3"
    assert "Link" not in response.headers


def test_listing_pages_with_limit_offset_and_a_next_link(client: httpx.Client) -> None:
    job_ids = [submit(client, data="interviews.csv") for _ in range(5)]
    first = client.get("/api/v1/generate", params={"limit": 2})
    assert [job["job_id"] for job in first.json()] == job_ids[:2]
    assert first.headers["X-Total-Count"] == "5"
    link = re.match(r'^<([^>]+)>; rel="next"$', first.headers["Link"])
    assert link is not None
    second = client.get(link.group(1))
    assert [job["job_id"] for job in second.json()] == job_ids[2:4]
    last = client.get("/api/v1/generate", params={"limit": 2, "offset": 4})
    assert [job["job_id"] for job in last.json()] == job_ids[4:]
    assert "Link" not in last.headers


def test_listing_filters_by_status(client: httpx.Client) -> None:
    done = submit(client, data="interviews.csv")
    failed = submit(client, data=["only one participant said this"], count=2)
    wait_job(client, done), wait_job(client, failed)
    assert [job["job_id"] for job in client.get("/api/v1/generate?status=failed").json()] == [failed]
    assert [job["job_id"] for job in client.get("/api/v1/generate?status=completed").json()] == [done]


@pytest.mark.parametrize("query", ["status=done", "limit=0", "limit=1001", "limit=abc", "offset=-1"])
def test_listing_refuses_bad_query_parameters(refusing_client: httpx.Client, query: str) -> None:
    assert_envelope(refusing_client.get(f"/api/v1/generate?{query}"), 422, "validation_error")


# -- validation ----------------------------------------------------------------


@pytest.mark.parametrize("count", [True, 3.5, "3", 0, 21, -1, None])
def test_count_must_be_an_integer_from_1_to_20(refusing_client: httpx.Client, count: object) -> None:
    body = {"data": "interviews.csv", "count": count}
    if count is None:
        body = {"data": "interviews.csv", "count": [3]}
    error = assert_envelope(refusing_client.post("/api/v1/generate", json=body), 422, "validation_error")
    assert "count" in error["details"]


@pytest.mark.parametrize("count", [1, 20])
def test_count_accepts_its_bounds(client: httpx.Client, count: int) -> None:
    assert client.post("/api/v1/generate", json={"data": "interviews.csv", "count": count}).status_code == 200


def test_an_unknown_field_is_named_not_ignored(refusing_client: httpx.Client) -> None:
    error = assert_envelope(
        refusing_client.post("/api/v1/generate", json={"data": "interviews.csv", "cout": 3}), 422, "validation_error"
    )
    assert "cout" in error["details"]
    assert "cout" in error["message"]


def test_every_offending_field_is_named_in_details(refusing_client: httpx.Client) -> None:
    body = {"count": "many", "provider": "skynet", "config": {"complexity": "extreme", "colour": "red"}}
    error = assert_envelope(refusing_client.post("/api/v1/generate", json=body), 422, "validation_error")
    assert {"data", "count", "provider", "config.complexity", "config.colour"} <= set(error["details"])


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "not a url", "http://", "https://user:pw@example.com/x"])
def test_a_webhook_url_must_be_an_absolute_http_url(refusing_client: httpx.Client, url: str) -> None:
    error = assert_envelope(
        refusing_client.post("/api/v1/generate", json={"data": "interviews.csv", "webhook_url": url}),
        422,
        "validation_error",
    )
    assert "webhook_url" in error["details"]


@pytest.mark.parametrize(
    ("content", "headers", "fragment"),
    [
        (b"{not json", {"Content-Type": "application/json"}, "not valid JSON"),
        (b"[1, 2]", {"Content-Type": "application/json"}, "JSON object"),
        (b'{"data": "interviews.csv"}', {"Content-Type": "text/plain"}, "Content-Type"),
        (b"[" * 100000 + b"]" * 100000, {"Content-Type": "application/json"}, "nested"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_a_400(
    refusing_client: httpx.Client, content: bytes, headers: dict, fragment: str
) -> None:
    error = assert_envelope(
        refusing_client.post("/api/v1/generate", content=content, headers=headers), 400, "invalid_input"
    )
    assert fragment in error["message"]


def test_an_oversized_body_is_refused_with_413_pointing_to_paths(refusing_client: httpx.Client) -> None:
    body = {"data": ["x" * 1000] * 1100}
    error = assert_envelope(refusing_client.post("/api/v1/generate", json=body), 413, "invalid_input")
    assert "path or URL" in error["message"]


def test_an_oversized_chunked_body_is_refused_with_413(refusing_client: httpx.Client) -> None:
    def chunks():
        yield b'{"data": "'
        for _ in range(1100):
            yield b"x" * 1024
        yield b'"}'

    response = refusing_client.post("/api/v1/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert_envelope(response, 413, "invalid_input")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ("missing.csv", "does not exist"),
        ("../outside.csv", "outside the data directory"),
        ("/etc/passwd", "outside the data directory"),
        ("transcripts/../../outside.csv", "outside the data directory"),
        ("notes.pdf", "unsupported format"),
        ("file:///etc/passwd", "not supported"),
    ],
)
def test_a_bad_data_source_is_a_400_saying_why(
    refusing_client: httpx.Client, shared_server: Server, data: str, fragment: str
) -> None:
    (shared_server.workdir / "outside.csv").write_text("participant_id,response\n1,I want to escape.\n")
    (shared_server.workdir / "data" / "notes.pdf").write_bytes(b"%PDF-1.4")
    error = assert_envelope(refusing_client.post("/api/v1/generate", json={"data": data}), 400, "invalid_input")
    assert fragment in error["message"]


def test_a_symlink_out_of_the_data_directory_is_refused(client: httpx.Client, server: Server) -> None:
    secret = server.workdir / "secret.csv"
    secret.write_text("participant_id,response\n1,Top secret words that must never be read.\n")
    os.symlink(secret, server.workdir / "data" / "innocent.csv")
    error = assert_envelope(client.post("/api/v1/generate", json={"data": "innocent.csv"}), 400, "invalid_input")
    assert "outside the data directory" in error["message"]


@pytest.mark.parametrize("text", ["interviews\x00.csv", "\ud800.csv"])
def test_text_that_cannot_be_stored_is_a_validation_error(refusing_client: httpx.Client, text: str) -> None:
    import json

    content = json.dumps({"data": text}).encode()
    response = refusing_client.post("/api/v1/generate", content=content, headers={"Content-Type": "application/json"})
    assert "data" in assert_envelope(response, 422, "validation_error")["details"]


# -- routing errors --------------------------------------------------------------


def test_an_unknown_route_is_a_404_envelope(refusing_client: httpx.Client) -> None:
    assert_envelope(refusing_client.get("/api/v2/nothing"), 404, "not_found")


def test_a_wrong_method_is_a_405_envelope_with_allow(refusing_client: httpx.Client) -> None:
    response = refusing_client.put("/api/v1/generate")
    assert_envelope(response, 405, "invalid_input")
    assert set(response.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


# -- cancel --------------------------------------------------------------------


def test_cancelling_a_running_job_fails_it_as_cancelled(client: httpx.Client, gated_data: GatedDataServer) -> None:
    job_id = submit(client, data=gated_data.url)
    wait_job(client, job_id, until=("running",))
    response = client.delete(f"/api/v1/generate/{job_id}")
    assert response.status_code == 200
    assert response.json()["status"] == "failed"
    assert response.json()["error"] == "cancelled"
    gated_data.gate.set()
    job = client.get(f"/api/v1/generate/{job_id}").json()
    assert job["status"] == "failed" and job["error"] == "cancelled" and job["completed_at"]


def test_cancelling_a_pending_job_means_it_never_runs(start_server, gated_data: GatedDataServer) -> None:
    import persona

    client = start_server("--rate-limit", "0", "--max-concurrent-jobs", "100").client()
    blockers = [submit(client, data=gated_data.url) for _ in range(persona.JOBS_PER_PROCESS)]
    for job_id in blockers:
        wait_job(client, job_id, until=("running",))
    waiting = submit(client, data="interviews.csv")
    assert client.get(f"/api/v1/generate/{waiting}").json()["status"] == "pending"
    assert client.delete(f"/api/v1/generate/{waiting}").json()["error"] == "cancelled"
    gated_data.gate.set()
    for job_id in blockers:
        assert wait_job(client, job_id)["status"] == "completed"
    job = client.get(f"/api/v1/generate/{waiting}").json()
    assert job["status"] == "failed" and job["started_at"] is None and job["result"] is None


def test_cancelling_a_finished_job_is_a_409(client: httpx.Client) -> None:
    job_id = submit(client, data="interviews.csv")
    wait_job(client, job_id)
    body = assert_envelope(client.delete(f"/api/v1/generate/{job_id}"), 409, "invalid_input")
    assert "completed" in body["message"]


# -- keys and teams ----------------------------------------------------------------


def test_a_key_cancels_and_refines_only_its_own_teams_jobs(start_server, gated_data: GatedDataServer) -> None:
    server = start_server("--auth-token", "team-a:tok1,team-a:tok2,team-b:tok3,loner", "--rate-limit", "0")
    with (
        server.client("tok1") as first,
        server.client("tok2") as teammate,
        server.client("tok3") as other_team,
        server.client("loner") as other_key,
    ):
        done = wait_job(first, submit(first, data="interviews.csv"))["job_id"]
        for stranger in (other_team, other_key):
            refused = stranger.post(f"/api/v1/generate/{done}/refine", json={"data": "interviews.csv"})
            assert_envelope(refused, 404, "not_found")
            assert stranger.get(f"/api/v1/generate/{done}").status_code == 200  # reads stay open
        assert teammate.post(f"/api/v1/generate/{done}/refine", json={"data": "interviews.csv"}).status_code == 200
        running = submit(first, data=gated_data.url)
        wait_job(first, running, until=("running",))
        for stranger in (other_team, other_key):
            assert_envelope(stranger.delete(f"/api/v1/generate/{running}"), 404, "not_found")
        assert teammate.delete(f"/api/v1/generate/{running}").json()["error"] == "cancelled"


def test_an_admin_token_cancels_and_refines_any_keys_job(start_server, gated_data: GatedDataServer) -> None:
    server = start_server("--auth-token", "alpha,beta", "--admin-token", "root", "--rate-limit", "0")
    with server.client("alpha") as alpha, server.client("beta") as beta, server.client("root") as admin:
        done = wait_job(alpha, submit(alpha, data="interviews.csv"))["job_id"]
        assert_envelope(beta.post(f"/api/v1/generate/{done}/refine", json={"data": "interviews.csv"}), 404, "not_found")
        assert admin.post(f"/api/v1/generate/{done}/refine", json={"data": "interviews.csv"}).status_code == 200
        running = submit(beta, data=gated_data.url)
        wait_job(beta, running, until=("running",))
        assert admin.delete(f"/api/v1/generate/{running}").json()["error"] == "cancelled"
    assert "auth on (3 keys, 1 admin)" in server.log()


def test_a_team_shares_one_concurrent_jobs_quota_and_its_token_is_the_part_after_the_colon(
    start_server, gated_data: GatedDataServer
) -> None:
    server = start_server("--auth-token", "team-a:tok1,team-a:tok2,tok3", "--max-concurrent-jobs", "1")
    with server.client("tok1") as first, server.client("tok2") as teammate, server.client("tok3") as other:
        submit(first, data=gated_data.url)
        assert_envelope(teammate.post("/api/v1/generate", json={"data": "interviews.csv"}), 429, "rate_limited")
        assert other.post("/api/v1/generate", json={"data": "interviews.csv"}).status_code == 200
    with server.client("team-a:tok1") as whole_entry:
        assert_envelope(whole_entry.post("/api/v1/generate", json={"data": "interviews.csv"}), 401, "unauthorised")
    gated_data.gate.set()


# -- private servers -------------------------------------------------------------


def test_a_private_server_shows_each_team_its_own_jobs_results_and_experiments(start_server) -> None:
    server = start_server(
        "--auth-token", "team-a:tok1,team-a:tok2,team-b:tok3", "--admin-token", "root", "--private", "--rate-limit", "0"
    )
    with (
        server.client() as anonymous,
        server.client("tok1") as first,
        server.client("tok2") as teammate,
        server.client("tok3") as other_team,
        server.client("root") as admin,
    ):
        mine = wait_job(first, submit(first, data="interviews.csv", config={"experiment": "pilot"}))["job_id"]
        theirs = wait_job(other_team, submit(other_team, data="interviews.csv"))["job_id"]
        for path in ("/api/v1/generate", f"/api/v1/generate/{mine}", "/api/v1/experiments", "/api/v1/providers"):
            assert_envelope(anonymous.get(path), 401, "unauthorised")
        assert anonymous.get("/api/v1/health").status_code == 200
        listing = teammate.get("/api/v1/generate")
        assert [job["job_id"] for job in listing.json()] == [mine] and listing.headers["X-Total-Count"] == "1"
        assert [job["job_id"] for job in other_team.get("/api/v1/generate").json()] == [theirs]
        assert admin.get("/api/v1/generate").headers["X-Total-Count"] == "2"
        for path in (f"/api/v1/generate/{mine}", f"/api/v1/generate/{mine}/export?format=csv"):
            assert_envelope(other_team.get(path), 404, "not_found")
            assert teammate.get(path).status_code == 200
        assert_envelope(other_team.get("/api/v1/compare", params={"a": theirs, "b": mine}), 404, "not_found")
        assert admin.get("/api/v1/compare", params={"a": theirs, "b": mine}).status_code == 200
        pilot = teammate.get("/api/v1/experiments").json()
        assert [experiment["name"] for experiment in pilot] == ["pilot"]
        assert "pilot" not in {experiment["name"] for experiment in other_team.get("/api/v1/experiments").json()}
        assert_envelope(other_team.get(f"/api/v1/experiments/{pilot[0]['experiment_id']}"), 404, "not_found")
        document = anonymous.get("/openapi.json").json()
        assert "401" in document["paths"]["/api/v1/generate"]["get"]["responses"]
    assert "auth on (4 keys, 1 admin, private)" in server.log()


def test_a_private_server_shows_each_team_its_own_webhooks_and_deliveries(start_server, receiver) -> None:
    server = start_server("--auth-token", "tok1,tok2", "--private", "--rate-limit", "0")
    with server.client("tok1") as first, server.client("tok2") as second:
        webhook = first.post("/api/v1/webhooks", json={"url": receiver.url}).json()
        assert [hook["webhook_id"] for hook in first.get("/api/v1/webhooks").json()] == [webhook["webhook_id"]]
        assert second.get("/api/v1/webhooks").json() == []
        for path in (
            f"/api/v1/webhooks/{webhook['webhook_id']}",
            f"/api/v1/webhooks/{webhook['webhook_id']}/deliveries",
        ):
            assert_envelope(second.get(path), 404, "not_found")
            assert first.get(path).status_code == 200


def test_private_needs_api_keys_and_is_off_by_default() -> None:
    import persona

    with pytest.raises(persona.ConfigError, match="--private / PERSONA_PRIVATE needs API keys"):
        persona.load_settings(env={"PERSONA_PRIVATE": "1"})
    assert persona.load_settings(env={"PERSONA_PRIVATE": "1", "PERSONA_API_AUTH_TOKEN": "t"}).private is True
    assert persona.load_settings(env={}).private is False


# -- idempotency -----------------------------------------------------------------


def test_the_same_idempotency_key_and_body_return_the_same_job(client: httpx.Client) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = client.post("/api/v1/generate", json={"data": "interviews.csv"}, headers=headers)
    second = client.post("/api/v1/generate", json={"data": "interviews.csv"}, headers=headers)
    assert first.status_code == second.status_code == 200
    assert first.json()["job_id"] == second.json()["job_id"]
    assert len(client.get("/api/v1/generate").json()) == 1


def test_the_same_idempotency_key_with_another_body_is_a_422(client: httpx.Client) -> None:
    headers = {"Idempotency-Key": "order-43"}
    assert client.post("/api/v1/generate", json={"data": "interviews.csv"}, headers=headers).status_code == 200
    response = client.post("/api/v1/generate", json={"data": "interviews.csv", "count": 4}, headers=headers)
    assert "Idempotency-Key" in assert_envelope(response, 422, "validation_error")["message"]


def test_idempotency_keys_are_scoped_per_api_key(start_server) -> None:
    server = start_server("--auth-token", "alpha,beta", "--rate-limit", "0")
    with server.client("alpha") as alpha, server.client("beta") as beta:
        headers = {"Idempotency-Key": "shared"}
        a = alpha.post("/api/v1/generate", json={"data": "interviews.csv"}, headers=headers).json()["job_id"]
        b = beta.post("/api/v1/generate", json={"data": "interviews.csv"}, headers=headers).json()["job_id"]
        assert a != b


# -- webhooks --------------------------------------------------------------------


def test_a_webhook_is_registered_read_listed_and_deleted(client: httpx.Client) -> None:
    response = client.post("/api/v1/webhooks", json={"url": "https://example.com/hook", "secret": "s3cret-value"})
    assert response.status_code == 200
    webhook = response.json()
    assert set(webhook) == {"webhook_id", "url", "events", "created_at"}
    assert re.match(r"^webhook-[0-9a-f]{12}$", webhook["webhook_id"])
    assert webhook["events"] == ["generation.completed", "generation.failed"]
    assert ISO_Z.match(webhook["created_at"])
    webhook_url = f"/api/v1/webhooks/{webhook['webhook_id']}"
    assert client.get(webhook_url).json() == webhook
    assert client.get("/api/v1/webhooks").json() == [webhook]
    assert "s3cret-value" not in client.get("/api/v1/webhooks").text
    deleted = client.delete(webhook_url)
    assert deleted.json() == {"success": True, "message": f"Webhook {webhook['webhook_id']} deleted successfully"}
    assert_envelope(client.get(webhook_url), 404, "not_found")
    assert_envelope(client.delete(webhook_url), 404, "not_found")


def test_a_webhook_keeps_the_events_it_subscribed_to(client: httpx.Client) -> None:
    webhook = client.post(
        "/api/v1/webhooks", json={"url": "http://example.com/h", "events": ["generation.failed"]}
    ).json()
    assert webhook["events"] == ["generation.failed"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"events": ["generation.completed"]}, "url"),
        ({"url": "mailto:me@example.com"}, "url"),
        ({"url": "https://example.com", "events": ["job.done"]}, "events[0]"),
        ({"url": "https://example.com", "events": []}, "events"),
        ({"url": "https://example.com", "secret": 12}, "secret"),
        ({"url": "https://example.com", "extra": 1}, "extra"),
    ],
)
def test_a_bad_webhook_registration_names_the_field(refusing_client: httpx.Client, body: dict, field: str) -> None:
    assert (
        field
        in assert_envelope(refusing_client.post("/api/v1/webhooks", json=body), 422, "validation_error")["details"]
    )


# -- authentication ----------------------------------------------------------------


@pytest.fixture
def secured(start_server) -> Server:
    return start_server("--auth-token", "first-token,second-token", "--rate-limit", "0")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v1/generate", {"data": "interviews.csv"}),
        ("DELETE", "/api/v1/generate/job-000000000000", None),
        ("POST", "/api/v1/webhooks", {"url": "https://example.com/h"}),
        ("DELETE", "/api/v1/webhooks/webhook-000000000000", None),
    ],
)
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer wrong",
        "bearer first-token",
        "Bearer  first-token",
        "Basic Zmlyc3Q=",
        "Bearer first-token,second-token",
    ],
)
def test_write_endpoints_refuse_a_missing_or_wrong_token(
    shared_secured_server: Server, method: str, path: str, body: dict | None, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = httpx.request(method, shared_secured_server.url + path, json=body, headers=headers)
    assert_envelope(response, 401, "unauthorised")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_any_configured_token_opens_the_write_endpoints(secured: Server) -> None:
    for token in ("first-token", "second-token"):
        with secured.client(token) as http:
            assert http.post("/api/v1/webhooks", json={"url": "https://example.com/h"}).status_code == 200


def test_a_token_with_non_ascii_characters_works_when_sent_as_utf8(start_server) -> None:
    from persona import PersonaClient

    server = start_server("--auth-token", "clé-secrète", "--rate-limit", "0")
    url, body = server.url + "/api/v1/webhooks", {"url": "https://example.com/h"}
    accepted = httpx.post(url, json=body, headers={"Authorization": "Bearer clé-secrète".encode()})
    assert accepted.status_code == 200, accepted.text
    refused = httpx.post(url, json=body, headers={"Authorization": "Bearer clé-secrète".encode("latin-1")})
    assert_envelope(refused, 401, "unauthorised")
    with PersonaClient(server.url, token="clé-secrète") as client:
        assert client.create_webhook("https://example.com/h2")["url"] == "https://example.com/h2"


def test_spaces_around_the_authorization_value_are_not_part_of_it(secured: Server) -> None:
    """RFC 9110 section 5.5; httpx will not send them, so the request is written by hand."""
    import socket

    body = b'{"url": "https://example.com/h"}'
    request = (
        b"POST /api/v1/webhooks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer first-token \t\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )
    with socket.create_connection(("127.0.0.1", secured.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


def test_a_token_in_the_query_string_is_not_accepted(secured: Server) -> None:
    response = httpx.post(secured.url + "/api/v1/webhooks?token=first-token", json={"url": "https://example.com/h"})
    assert_envelope(response, 401, "unauthorised")


def test_reads_stay_open_when_auth_is_on(secured: Server) -> None:
    for path in ("/", "/api/v1/health", "/api/v1/generate", "/api/v1/webhooks"):
        assert httpx.get(secured.url + path).status_code == 200


def test_the_token_never_appears_in_the_server_log(secured: Server) -> None:
    with secured.client("first-token") as http:
        http.post("/api/v1/webhooks", json={"url": "https://example.com/h"})
    httpx.post(secured.url + "/api/v1/webhooks", headers={"Authorization": "Bearer second-token-typo"}, json={})
    log = secured.log()
    assert "auth on" in log
    assert "first-token" not in log and "second-token" not in log


# -- limits ----------------------------------------------------------------------------


def test_rate_limit_headers_count_down_and_429_carries_retry_after(start_server) -> None:
    server = start_server("--rate-limit", "5")
    with server.client() as http:
        answers = [http.get("/api/v1/generate") for _ in range(6)]
    assert [r.status_code for r in answers] == [200] * 5 + [429]
    assert [int(r.headers["X-RateLimit-Remaining"]) for r in answers[:5]] == [4, 3, 2, 1, 0]
    assert all(r.headers["X-RateLimit-Limit"] == "5" for r in answers)
    reset = int(answers[0].headers["X-RateLimit-Reset"])
    assert abs(reset - (int(answers[0].headers["X-RateLimit-Reset"]))) == 0 and reset > 1_700_000_000
    refused = answers[-1]
    body = assert_envelope(refused, 429, "rate_limited")
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert body["details"] == {"retry_after": retry_after}
    assert body["message"] == f"Rate limit exceeded. Retry after {retry_after} seconds."


def test_health_is_never_rate_limited(start_server) -> None:
    server = start_server("--rate-limit", "2")
    with server.client() as http:
        assert [http.get("/api/v1/health").status_code for _ in range(5)] == [200] * 5
        assert "X-RateLimit-Limit" not in http.get("/api/v1/health").headers


def test_concurrent_jobs_are_limited_per_api_key(start_server, gated_data: GatedDataServer) -> None:
    server = start_server("--max-concurrent-jobs", "2", "--rate-limit", "0", "--auth-token", "one,two")
    with server.client("one") as one, server.client("two") as two:
        assert one.post("/api/v1/generate", json={"data": gated_data.url}).status_code == 200
        assert one.post("/api/v1/generate", json={"data": gated_data.url}).status_code == 200
        refused = one.post("/api/v1/generate", json={"data": gated_data.url})
        body = assert_envelope(refused, 429, "rate_limited")
        assert "concurrent jobs" in body["message"] and "API key" in body["message"]
        assert body["details"]["retry_after"] == int(refused.headers["Retry-After"]) > 0  # as the reference's 429
        assert two.post("/api/v1/generate", json={"data": "interviews.csv"}).status_code == 200
        gated_data.gate.set()
        for job in one.get("/api/v1/generate").json():
            wait_job(one, job["job_id"])
        assert one.post("/api/v1/generate", json={"data": "interviews.csv"}).status_code == 200


# -- data sources through the API ---------------------------------------------------------


@pytest.mark.parametrize("data", ["survey.json", "transcripts", "./transcripts/"])
def test_the_bundled_formats_all_generate(client: httpx.Client, data: str) -> None:
    job = wait_job(client, submit(client, data=data, count=3))
    assert job["status"] == "completed", job["error"]
    assert len(job["result"]["personas"]) == 3


def test_inline_records_generate_personas(client: httpx.Client) -> None:
    records = [
        {"id": f"u{i}", "role": role, "feedback": text}
        for i, (role, text) in enumerate(
            [
                ("admin", "I need bulk user import because adding people one by one takes hours."),
                ("admin", "It's frustrating that permissions are hidden three menus deep."),
                ("admin", "I usually export the audit log every Friday for compliance."),
                ("viewer", "I want the dashboard to load faster on my phone during meetings."),
                ("viewer", "The charts are too small to read on a phone screen."),
                ("viewer", "I always check the dashboard on my commute in the morning."),
            ]
        )
    ]
    job = wait_job(client, submit(client, data=records, count=2))
    assert job["status"] == "completed", job["error"]
    assert job["result"]["metadata"]["source"]["kind"] == "inline"


def test_a_data_url_is_fetched_and_used(client: httpx.Client, gated_data: GatedDataServer) -> None:
    gated_data.gate.set()
    job = wait_job(client, submit(client, data=gated_data.url, count=4))
    assert job["status"] == "completed", job["error"]
    assert job["result"]["metadata"]["source"]["kind"] == "url"


def test_a_csv_excel_saved_on_windows_is_read_with_a_warning_naming_its_encoding(
    client: httpx.Client, server: Server
) -> None:
    (server.workdir / "data" / "latin1.csv").write_bytes(
        "participant_id;response\n1;Caf\xe9 au lait before the night shift\n".encode("cp1252")
    )
    job = wait_job(client, submit(client, data="latin1.csv", count=1))
    assert job["status"] == "completed", job["error"]
    assert "Café au lait before the night shift" in job["result"]["personas"][0]["quotes"][0]
    assert any("latin1.csv is not UTF-8" in w and "Windows-1252" in w for w in job["result"]["metadata"]["warnings"])


def test_a_transcript_that_is_not_utf8_fails_its_job_naming_the_file(client: httpx.Client, server: Server) -> None:
    (server.workdir / "data" / "latin1.txt").write_bytes("Interviewer: Hi?\nAna: Caf\xe9 au lait.\n".encode("latin-1"))
    job = wait_job(client, submit(client, data="latin1.txt", count=1))
    assert job["status"] == "failed"
    assert "latin1.txt" in job["error"] and "UTF-8" in job["error"]


def test_the_output_folder_holds_json_metadata_and_a_card_per_persona(client: httpx.Client, server: Server) -> None:
    job = wait_job(client, submit(client, data="interviews.csv", count=3))
    output = Path(job["result"]["output_path"])
    folder = output if output.is_absolute() else server.workdir / output
    assert re.match(r"^\d{8}_\d{6}_job-[0-9a-f]{12}$", folder.name)
    assert {p.name for p in folder.iterdir()} == {
        "personas.json",
        "personas.csv",
        "metadata.json",
        "personas.html",
        "persona-001.md",
        "persona-002.md",
        "persona-003.md",
    }


# -- failures inside the server ------------------------------------------------------


@pytest.fixture
def app_client(tmp_path: Path):
    """The app in process, for failures no outside request can cause."""
    from starlette.testclient import TestClient

    import persona

    settings = persona.Settings(db=tmp_path / "p.db", data_dir=tmp_path, output_dir=tmp_path / "out", rate_limit=0)
    with TestClient(persona.create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def test_an_unexpected_error_is_a_500_envelope_without_a_traceback(app_client, monkeypatch) -> None:
    async def explode() -> list:
        raise RuntimeError("secret internals at line 42")

    monkeypatch.setattr(app_client.app.state.store, "list_webhooks", explode)
    response = app_client.get("/api/v1/webhooks")
    body = assert_envelope(response, 500, "internal_error")
    assert "secret internals" not in response.text and "Traceback" not in response.text
    assert body["message"]


def test_health_is_503_with_a_reason_when_the_job_runner_stopped(app_client) -> None:
    import asyncio

    runner = app_client.app.state.runner

    async def stop_runner() -> None:
        runner.loop_task.cancel()
        await asyncio.gather(runner.loop_task, return_exceptions=True)

    app_client.portal.call(stop_runner)
    response = app_client.get("/api/v1/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy" and "job runner" in body["reason"]


def test_health_is_503_with_a_reason_when_the_database_cannot_answer(app_client) -> None:
    store = app_client.app.state.store
    app_client.portal.call(store.reader.close)
    response = app_client.get("/api/v1/health")
    assert response.status_code == 503
    assert "database" in response.json()["reason"]


def test_the_garbage_collector_is_as_it_was_once_the_app_stops(tmp_path: Path) -> None:
    import gc

    from starlette.testclient import TestClient

    import persona

    before = gc.get_threshold(), gc.get_freeze_count()
    settings = persona.Settings(db=tmp_path / "p.db", data_dir=tmp_path, output_dir=tmp_path / "out")
    with TestClient(persona.create_app(settings)):
        assert gc.get_threshold()[0] == persona.GC_YOUNG_THRESHOLD and gc.get_freeze_count() > 0
    assert (gc.get_threshold(), gc.get_freeze_count()) == before


def test_requests_in_flight_do_not_set_off_garbage_collections(app_client) -> None:
    """At Python's default threshold this burst sets off dozens (on a busy server, 15% of the CPU)."""
    import asyncio
    import gc

    started: list[int] = []

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(info["generation"])

    async def burst() -> list[int]:
        transport = httpx.ASGITransport(app=app_client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://persona") as http:

            async def reads(n: int) -> list[int]:
                return [(await http.get("/api/v1/generate/job-000000000000")).status_code for _ in range(n)]

            gc.callbacks.append(count)
            try:
                codes = await asyncio.gather(*(reads(20) for _ in range(50)))
            finally:
                gc.callbacks.remove(count)
        return [code for batch in codes for code in batch]

    assert app_client.portal.call(burst) == [404] * 1000
    assert len(started) <= 3, f"{len(started)} collections, generations {sorted(set(started))}"


@pytest.mark.parametrize("data", ["0" * 4000, "a/" * 2000 + "x.csv"])
def test_a_path_the_filesystem_cannot_take_is_a_400_not_a_server_error(
    refusing_client: httpx.Client, data: str
) -> None:
    assert_envelope(refusing_client.post("/api/v1/generate", json={"data": data}), 400, "invalid_input")
