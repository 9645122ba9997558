"""Persona cards as HTML: in each output folder and served at /jobs."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from conftest import Server, submit, wait_job

# Its subject is not the store: it runs on SQLite alone (tests/test_store.py and the API,
# webhook, durability and recovery tests run on both stores).
pytestmark = pytest.mark.sqlite_only


HOSTILE = "<script>alert('x')</script>"


def hostile_records() -> list[dict]:
    return [
        {"id": "a1", "role": "Nurse", "text": f"I want the rota offline {HOSTILE} before every night shift starts."},
        {
            "id": "a2",
            "role": "Nurse",
            "text": "It's frustrating when the rota changes at 3am without any notice at all.",
        },
        {"id": "b1", "role": "Driver", "text": "I need my overtime paid correctly every single week without disputes."},
        {"id": "b2", "role": "Driver", "text": "I usually clock in from the van before the first delivery of the day."},
    ]


def output_folder(server: Server, job: dict) -> Path:
    path = Path(job["result"]["output_path"])
    return path if path.is_absolute() else server.workdir / path


def test_each_output_folder_has_a_self_contained_cards_page(client: httpx.Client, server: Server) -> None:
    job = wait_job(client, submit(client, data="interviews.csv", count=4))
    page = (output_folder(server, job) / "personas.html").read_text()
    assert page.count('<article class="card"') == 4
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "<style>" in page
    for persona in job["result"]["personas"]:
        assert persona["name"] in page


def test_html_from_the_data_is_shown_as_text_never_run(client: httpx.Client, server: Server) -> None:
    job = wait_job(client, submit(client, data=hostile_records(), count=2))
    assert job["status"] == "completed", job["error"]
    served = client.get(f"/jobs/{job['job_id']}")
    assert served.status_code == 200 and served.headers["content-type"].startswith("text/html")
    for page in (served.text, (output_folder(server, job) / "personas.html").read_text()):
        assert "<script>" not in page
        assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page


def test_the_jobs_page_lists_jobs_with_status_and_links(client: httpx.Client) -> None:
    done = wait_job(client, submit(client, data="interviews.csv"))["job_id"]
    failed = wait_job(client, submit(client, data=["a lone voice"], count=2))["job_id"]
    page = client.get("/jobs")
    assert page.status_code == 200
    assert f'href="/jobs/{done}"' in page.text and f'href="/jobs/{failed}"' in page.text
    assert page.text.index(failed) < page.text.index(done)
    assert "completed" in page.text and "failed" in page.text
    unfinished = client.get(f"/jobs/{failed}")
    assert "Error:" in unfinished.text and re.search(r"failed · \d+%", unfinished.text)
