"""Hostile and broken input: each gets the reference's envelope and the right status, and changes nothing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import httpx
import pytest
from conftest import Receiver, Server, submit, table_counts, wait_job

import persona


@pytest.fixture
def guarded(shared_server: Server) -> Iterator[tuple[httpx.Client, Server]]:
    """A client of the module's server, and a check at the end that the database did not change."""
    before = table_counts(shared_server)
    with shared_server.client() as http:
        yield http, shared_server
    assert table_counts(shared_server) == before


def refused(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"success", "error", "message", "details"} and body["success"] is False
    assert body["error"] == persona.ERROR_CODES[status]
    return body


@pytest.mark.parametrize(
    "data",
    [
        "../persona.db",
        "../../etc/passwd",
        "/etc/passwd",
        "/dev/null",
        "/dev/zero",
        "/proc/self/environ",
        "transcripts/../../persona.db",
        "%2e%2e%2fpersona.db",
        "..%2fpersona.db",
        "..\\persona.db",
        "./.././persona.db",
        "~/.ssh/id_rsa",
        "transcripts/../../../",
    ],
)
def test_path_traversal_in_data_is_refused(guarded, data: str) -> None:
    http, _ = guarded
    refused(http.post("/api/v1/generate", json={"data": data}), 400)


def test_a_symlink_to_a_device_or_outside_is_refused(guarded) -> None:
    http, server = guarded
    os.symlink("/dev/zero", server.workdir / "data" / "zero.csv")
    os.symlink(server.workdir, server.workdir / "data" / "escape")
    for data in ("zero.csv", "escape/persona.db", "escape"):
        refused(http.post("/api/v1/generate", json={"data": data}), 400)


@pytest.mark.parametrize("depth", [200, 5000, 100_000])
def test_deeply_nested_json_is_refused(guarded, depth: int) -> None:
    http, _ = guarded
    body = '{"data": ' + "[" * depth + "]" * depth + "}"
    response = http.post("/api/v1/generate", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 413, 422)
    refused(response, response.status_code)


def test_a_number_too_long_to_read_is_a_plain_400(guarded) -> None:
    http, _ = guarded
    body = '{"data": "interviews.csv", "count": ' + "9" * 5000 + "}"
    response = http.post("/api/v1/generate", content=body, headers={"Content-Type": "application/json"})
    message = refused(response, 400)["message"]
    assert "digits" in message and "sys." not in message


GENERATE_FIELDS = {
    "data": [5, True, {"a": 1}, [], None],
    "count": ["3", 3.5, True, [3], {"n": 3}],
    "provider": [1, ["local"], {"p": "local"}, True],
    "model": [1, ["m"], {}, False],
    "config": ["simple", 1, ["x"], True],
    "webhook_url": [1, ["http://x.example"], {}, True],
}


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, values in GENERATE_FIELDS.items() for v in values])
def test_a_wrong_type_in_any_generate_field_is_a_422_naming_it(guarded, field: str, value: object) -> None:
    http, _ = guarded
    body = {"data": "interviews.csv", field: value}
    response = http.post("/api/v1/generate", json=body)
    assert field in refused(response, 422)["details"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("url", 1),
        ("url", ["https://x.example"]),
        ("events", "generation.completed"),
        ("events", [1]),
        ("events", ["generation.completed", "generation.completed"]),
        ("secret", 1),
        ("secret", ["s"]),
        ("secret", ""),
    ],
)
def test_a_wrong_type_in_any_webhook_field_is_a_422_naming_it(guarded, field: str, value: object) -> None:
    http, _ = guarded
    body = {"url": "https://hooks.example/h", field: value}
    details = refused(http.post("/api/v1/webhooks", json=body), 422)["details"]
    assert any(key.startswith(field) for key in details)


STRING_FIELDS = [
    ("/api/v1/generate", {"data": "interviews.csv"}, "model"),
    ("/api/v1/generate", {"data": "interviews.csv"}, "data"),
    ("/api/v1/generate", {"data": "interviews.csv"}, "webhook_url"),
    ("/api/v1/generate", {"data": "interviews.csv", "config": {}}, "config.experiment"),
    ("/api/v1/webhooks", {"url": "https://hooks.example/h"}, "url"),
    ("/api/v1/webhooks", {"url": "https://hooks.example/h"}, "secret"),
]


@pytest.mark.parametrize("bad", ["x\x00y", "x\ud800y", "\udfff"])
@pytest.mark.parametrize(("path", "base", "field"), STRING_FIELDS)
def test_nul_and_lone_surrogates_in_any_string_field_are_a_422(
    guarded, path: str, base: dict, field: str, bad: str
) -> None:
    http, _ = guarded
    body = json.loads(json.dumps(base))
    target, key = (body["config"], "experiment") if field == "config.experiment" else (body, field)
    target[key] = ("https://hooks.example/" + bad) if key in ("url", "webhook_url") else bad
    response = http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert field in refused(response, 422)["details"]


def test_right_to_left_marks_are_text_not_trouble(client: httpx.Client) -> None:
    job = wait_job(client, submit(client, data="interviews.csv", config={"experiment": "\u202eevil\u202c study"}))
    assert job["status"] == "completed"
    refused(client.post("/api/v1/generate", json={"data": "\u202einterviews.csv"}), 400)


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/generate/..%2F..%2Fetc%2Fpasswd",
        "/api/v1/generate/job-",
        "/api/v1/generate/JOB-0123456789AB",
        "/api/v1/generate/job-0123456789abc",
        "/api/v1/generate/%00",
        "/api/v1/generate/" + "a" * 5000,
        "/api/v1/webhooks/webhook-zzzzzzzzzzzz",
        "/api/v1/webhooks/job-0123456789ab",
        "/api/v1/webhooks/1 OR 1=1",
        "/api/v1/webhooks/webhook-0123456789ab/deliveries",
    ],
)
def test_ids_that_are_not_ids_are_a_404(guarded, path: str) -> None:
    http, _ = guarded
    assert len(refused(http.get(path), 404)["message"]) < 200  # a long "id" is not echoed whole


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example/h\r\nX-Injected: 1",
        "https://hooks.example/h\nX: 1",
        "https://hooks.example\r\n/h",
        "https://hooks.example/h\t",
    ],
)
def test_header_injection_through_a_webhook_url_is_refused(guarded, url: str) -> None:
    http, _ = guarded
    refused(http.post("/api/v1/webhooks", json={"url": url}), 422)
    refused(http.post("/api/v1/generate", json={"data": "interviews.csv", "webhook_url": url}), 422)


def test_a_secret_never_reaches_a_header_however_it_is_written(server: Server, receiver: Receiver) -> None:
    with server.client() as http:
        http.post("/api/v1/webhooks", json={"url": receiver.url, "secret": "s3cret\r\nX-Injected: yes"})
        wait_job(http, submit(http, data="interviews.csv"))
        from conftest import wait_for

        wait_for(lambda: receiver.requests, what="a delivery")
    headers = {key.lower() for key in receiver.requests[0]["headers"]}
    assert "x-injected" not in headers
    assert all("s3cret" not in value for value in receiver.requests[0]["headers"].values())


@pytest.mark.slow
def test_webhook_registrations_are_capped_with_a_clear_error(server: Server) -> None:
    with server.client() as http:
        for n in range(persona.MAX_WEBHOOKS):
            assert http.post("/api/v1/webhooks", json={"url": f"https://hooks.example/{n}"}).status_code == 200
        before = table_counts(server)
        body = refused(http.post("/api/v1/webhooks", json={"url": "https://hooks.example/one-more"}), 400)
        assert str(persona.MAX_WEBHOOKS) in body["message"] and "delete" in body["message"]
        assert table_counts(server) == before
