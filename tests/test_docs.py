"""The API description, the offline docs pages, and the cards as a browser shows them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, Server, submit, wait_job
from test_pages import hostile_records

import persona

# Its subject is not the store: it runs on SQLite alone (tests/test_store.py and the API,
# webhook, durability and recovery tests run on both stores).
pytestmark = pytest.mark.sqlite_only


def test_the_openapi_document_describes_every_route(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    api_routes = {
        (route.path, method.lower())
        for route in persona.routes_of(persona.ENDPOINTS, private=False)
        for method in route.methods or []
        if route.path.startswith("/api/") or route.path == "/"
    }
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert {(p, m) for p, m in api_routes if m != "head"} == documented


def test_the_route_table_is_the_one_place_an_endpoint_is_written() -> None:
    routed = {
        (route.path, method)
        for route in persona.routes_of(persona.ENDPOINTS, private=False)
        for method in route.methods or []
        if method != "HEAD"
    }
    assert routed == {(endpoint.path, endpoint.method) for endpoint in persona.ENDPOINTS}
    document = persona.openapi_document()
    operations = [spec for item in document["paths"].values() for spec in item.values()]
    documented = [endpoint for endpoint in persona.ENDPOINTS if endpoint.operation_id]
    assert sorted(spec["operationId"] for spec in operations) == sorted(e.operation_id for e in documented)
    assert len({e.operation_id for e in documented}) == len(documented)
    tags = [tag["name"] for tag in document["tags"]]
    assert tags == ["jobs", "workflow", "data", "webhooks", "service"]
    assert {spec["tags"][0] for spec in operations} == set(tags)


def test_request_schemas_are_the_ones_the_server_validates_with(client: httpx.Client) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    import json

    assert schemas["GenerateRequest"] == json.loads(json.dumps(persona.GENERATE_SCHEMA))
    assert schemas["WebhookRequest"] == json.loads(json.dumps(persona.WEBHOOK_SCHEMA))


def test_write_endpoints_carry_bearer_security_and_every_error_uses_the_envelope(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    writes = {
        ("/api/v1/generate", "post"),
        ("/api/v1/generate/{job_id}", "delete"),
        ("/api/v1/webhooks", "post"),
        ("/api/v1/webhooks/{webhook_id}", "delete"),
        ("/api/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/retry", "post"),
        ("/api/v1/estimate", "post"),
        ("/api/v1/generate/{job_id}/refine", "post"),
        ("/api/v1/data", "get"),
        ("/api/v1/data/{name}", "put"),
        ("/api/v1/data/{name}", "delete"),
        ("/api/v1/data/{folder}/{name}", "put"),
        ("/api/v1/data/{folder}/{name}", "delete"),
    }
    for path, item in document["paths"].items():
        for method, spec in item.items():
            assert (spec.get("security") == [{"bearerAuth": []}]) == ((path, method) in writes), (path, method)
            for status, response in spec["responses"].items():
                if int(status) >= 400 and path != "/api/v1/health":
                    assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
            if "429" in spec["responses"]:
                assert "Retry-After" in spec["responses"]["429"]["headers"]
    generate = document["paths"]["/api/v1/generate"]["post"]
    examples = generate["requestBody"]["content"]["application/json"]["examples"]
    assert list(examples) == ["offline", "reference"]
    assert examples["reference"]["value"]["data"] == "./interviews.csv"
    assert "X-RateLimit-Remaining" in generate["responses"]["200"]["headers"]


def test_the_request_that_try_it_out_prefills_completes_on_a_fresh_server(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    media = document["paths"]["/api/v1/generate"]["post"]["requestBody"]["content"]["application/json"]
    first = next(iter(media["examples"].values()))["value"]
    assert "webhook_url" not in first
    job = wait_job(client, client.post("/api/v1/generate", json=first).json()["job_id"])
    assert job["status"] == "completed", job["error"]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_load_nothing_from_outside(client: httpx.Client, page: str) -> None:
    html = client.get(page).text
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources and all(source.startswith("/docs/assets/") for source in sources)
    for source in sources:
        asset = client.get(source)
        assert asset.status_code == 200 and len(asset.content) > 10000


@pytest.mark.parametrize(("path", "marker"), [("/docs", "opblock"), ("/redoc", "operation")])
def test_the_docs_render_every_operation_in_a_browser(server: Server, page: Any, path: str, marker: str) -> None:
    page.goto(server.url + path)
    page.wait_for_function("marker => document.documentElement.outerHTML.includes(marker)", arg=marker)
    dom = page.content()
    assert marker in dom
    for api_path in ("/api/v1/generate", "/api/v1/webhooks", "/api/v1/health"):
        assert api_path in dom
    assert "Start a persona generation job" in dom


def test_the_cards_page_renders_with_data_html_as_text(
    client: httpx.Client, server: Server, page: Any, tmp_path: Path
) -> None:
    job = wait_job(client, submit(client, data=hostile_records(), count=2))
    page.set_viewport_size({"width": 1280, "height": 1400})
    page.goto(f"{server.url}/jobs/{job['job_id']}")
    dom = page.content()
    assert dom.count('<article class="card"') == 2
    assert "&lt;script&gt;alert('x')&lt;/script&gt;" in dom
    assert "<script>" not in dom
    shot = tmp_path / "cards.png"
    page.screenshot(path=str(shot))
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1280, 1400)


@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs root and unshare to run in its own network namespace (CI has both)",
)
def test_schemathesis_finds_nothing_with_all_of_its_checks() -> None:
    result = subprocess.run(
        ["unshare", "-n", sys.executable, str(ROOT / "tests" / "run_schemathesis.py")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "FAILURES" not in result.stdout
    assert "No issues found" in result.stdout or only_missing_test_data(result.stdout), result.stdout[-3000:]


def only_missing_test_data(output: str) -> bool:
    """Coverage warnings, not findings: under load, a stateful run may reach a job's cancel or a delivery's
    retry before the ids it needs exist, and says "missing test data". A refinement of the offline jobs the
    stateful run makes is mostly refused for their state (an instruction needs an LLM provider), and a
    generation or an estimate, now and then, for data files that do not exist (the reference's 400): it calls
    that a "schema validation mismatch", accepted for these three operations alone. Every other warning still fails."""
    warnings = output.partition("WARNINGS")[2].partition("SUMMARY")[0]
    kinds = set(re.findall(r"^([A-Z][A-Za-z ]+): \d+ operations?", warnings, re.MULTILINE))
    mismatched = re.findall(
        r"^  - (.+)$", warnings.partition("Schema validation mismatch")[2].partition("💡")[0], re.MULTILINE
    )
    state_bound = {"POST /api/v1/generate/{job_id}/refine", "POST /api/v1/generate", "POST /api/v1/estimate"}
    return kinds <= {"Missing test data", "Schema validation mismatch"} and (
        "Schema validation mismatch" not in kinds or (bool(mismatched) and set(mismatched) <= state_bound)
    )


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_carry_a_content_security_policy_and_cannot_be_framed(client: httpx.Client, page: str) -> None:
    response = client.get(page)
    policy = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy and "unsafe-eval" not in policy
    assert response.headers["x-frame-options"] == "DENY"
