"""The Python client, the reference's own snippets, and the CLI against a running server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Server, clean_environment
from loopback import serve_on_loopback

import persona

REFERENCE_CLIENT = """
import httpx

class PersonaClient:
    def __init__(self, base_url: str = "http://localhost:8000", token: str = None):
        self.base_url = base_url
        self.headers = {"Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    def generate(self, data: str, count: int = 3, **kwargs) -> dict:
        response = httpx.post(
            f"{self.base_url}/api/v1/generate",
            headers=self.headers,
            json={"data": data, "count": count, **kwargs}
        )
        response.raise_for_status()
        return response.json()

    def get_job(self, job_id: str) -> dict:
        response = httpx.get(
            f"{self.base_url}/api/v1/generate/{job_id}",
            headers=self.headers
        )
        response.raise_for_status()
        return response.json()

    def wait_for_job(self, job_id: str, timeout: int = 300) -> dict:
        import time
        start = time.time()
        while time.time() - start < timeout:
            job = self.get_job(job_id)
            if job["status"] in ("completed", "failed"):
                return job
            time.sleep(2)
        raise TimeoutError(f"Job {job_id} did not complete within {timeout}s")
"""

REFERENCE_CURL = """
# Generate personas
JOB=$(curl -s -X POST http://localhost:8000/api/v1/generate \\
  -H "Authorization: Bearer secret123" \\
  -H "Content-Type: application/json" \\
  -d '{"data": "./data.csv", "count": 3}' | jq -r '.job_id')

# Poll for completion
while true; do
  STATUS=$(curl -s http://localhost:8000/api/v1/generate/$JOB | jq -r '.status')
  echo "Status: $STATUS"
  if [ "$STATUS" = "completed" ] || [ "$STATUS" = "failed" ]; then
    break
  fi
  sleep 2
done

# Get results
curl -s http://localhost:8000/api/v1/generate/$JOB | jq '.result.personas'
"""


@pytest.fixture
def secured(start_server, workdir: Path) -> Server:
    shutil.copy(workdir / "data" / "interviews.csv", workdir / "data" / "data.csv")
    return start_server("--auth-token", "secret123", "--rate-limit", "0")


def test_the_client_covers_jobs_and_webhooks(secured: Server) -> None:
    with persona.PersonaClient(secured.url, token="secret123") as client:
        created = client.generate("interviews.csv", count=3, config={"detail_level": "minimal"})
        job = client.wait_for_job(created["job_id"], interval=0.1)
        assert job["status"] == "completed" and len(job["result"]["personas"]) == 3
        assert [j["job_id"] for j in client.list_jobs(status="completed")] == [created["job_id"]]
        webhook = client.create_webhook("http://127.0.0.1:9/hook", events=["generation.failed"], secret="s")
        assert client.get_webhook(webhook["webhook_id"]) == webhook
        assert client.list_webhooks() == [webhook]
        assert client.delete_webhook(webhook["webhook_id"])["success"] is True


def test_an_error_answer_raises_with_the_envelope_fields(secured: Server) -> None:
    with persona.PersonaClient(secured.url, token="secret123") as client:
        with pytest.raises(persona.PersonaAPIError) as error:
            client.generate("interviews.csv", count=99)
        assert error.value.status_code == 422 and error.value.error == "validation_error"
        assert "count" in error.value.details and error.value.message
        with pytest.raises(persona.PersonaAPIError) as error:
            client.cancel_job("job-000000000000")
        assert error.value.error == "not_found"
    with persona.PersonaClient(secured.url) as anonymous, pytest.raises(persona.PersonaAPIError) as error:
        anonymous.generate("interviews.csv")
    assert error.value.status_code == 401


class Throttled:
    """A server answering 429 (Retry-After: 0) a set number of times, then 200."""

    def __init__(self, refusals: int) -> None:
        self.calls = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                outer.calls += 1
                limited = outer.calls <= refusals
                body = json.dumps(
                    {
                        "success": False,
                        "error": "rate_limited",
                        "message": "Rate limit exceeded.",
                        "details": {"retry_after": 0},
                    }
                    if limited
                    else []
                ).encode()
                self.send_response(429 if limited else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd, self.url = serve_on_loopback(Handler)


def test_a_429_is_retried_after_retry_after_a_bounded_number_of_times() -> None:
    recovering, stubborn = Throttled(2), Throttled(100)
    with persona.PersonaClient(recovering.url, max_retries=3) as client:
        assert client.list_jobs() == []
    assert recovering.calls == 3
    with persona.PersonaClient(stubborn.url, max_retries=3) as client, pytest.raises(persona.PersonaAPIError) as error:
        client.list_jobs()
    assert stubborn.calls == 4 and error.value.error == "rate_limited"
    recovering.httpd.shutdown(), stubborn.httpd.shutdown()


def test_the_reference_client_snippet_runs_unchanged(secured: Server) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(REFERENCE_CLIENT, "reference-client", "exec"), namespace)  # noqa: S102 - the published snippet
    client = namespace["PersonaClient"](base_url=secured.url, token="secret123")
    result = client.generate("./interviews.csv", count=5)
    job = client.wait_for_job(result["job_id"])
    assert job["status"] == "completed"
    assert len(job["result"]["personas"]) == 5


@pytest.mark.skipif(
    shutil.which("jq") is None or shutil.which("curl") is None, reason="needs curl and jq (.ci/run installs them)"
)
def test_the_reference_curl_loop_runs_unchanged(secured: Server) -> None:
    script = REFERENCE_CURL.replace("http://localhost:8000", secured.url)
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Status: completed" in result.stdout
    personas = json.loads(result.stdout[result.stdout.index("[") :])
    assert len(personas) == 3


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "persona", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean_environment(), "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )


def test_the_cli_generates_on_a_server_and_lists_its_jobs(secured: Server) -> None:
    result = run_cli("generate", "interviews.csv", "--count", "4", "--server", secured.url, "--auth-token", "secret123")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("quote:") == 4 and "Output: " in result.stdout
    assert "[100%] completed" in result.stderr
    listing = run_cli("jobs", "--server", secured.url)
    assert listing.returncode == 0
    assert listing.stdout.splitlines()[0].split()[:3] == ["JOB", "STATUS", "PROGRESS"]
    assert "completed" in listing.stdout.splitlines()[1]


def test_the_cli_reports_a_refused_submission_as_bad_usage(secured: Server) -> None:
    result = run_cli("generate", "missing.csv", "--server", secured.url, "--auth-token", "secret123")
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_the_cli_exits_1_when_a_server_job_fails(secured: Server) -> None:
    (secured.workdir / "data" / "two.csv").write_text(
        "id,response\n1,I want offline maps.\n2,I need faster payslips.\n"
    )
    result = run_cli(
        "generate", "two.csv", "--count", "3", "--server", secured.url, "--auth-token", "secret123", "--json"
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("persona: generation failed: the data has 2 participant")
    assert result.stdout == ""
