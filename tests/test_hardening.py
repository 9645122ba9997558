"""Hardening: tokens kept out of reads and logs, addresses judged by what they carry, deadlines, caps and depths."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Receiver, Server, submit, wait_for, wait_job
from fake_providers import FakeProvider
from loopback import serve_on_loopback

import persona

# Its subject is not the store: it runs on SQLite alone (tests/test_store.py and the API,
# webhook, durability and recovery tests run on both stores).
pytestmark = pytest.mark.sqlite_only


TOKEN = "hardening-token-1"


def refused(response: httpx.Response, status: int) -> dict[str, Any]:
    """The error envelope with this status."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"success", "error", "message", "details"} and body["success"] is False
    assert body["error"] == persona.ERROR_CODES[status] and body["message"]
    return body


def register(http: httpx.Client, url: str, **body: object) -> str:
    response = http.post("/api/v1/webhooks", json={"url": url, **body})
    assert response.status_code == 200, response.text
    return response.json()["webhook_id"]


def output_folder(server: Server, job: dict[str, Any]) -> Path:
    output = Path(job["result"]["output_path"])
    return output if output.is_absolute() else server.workdir / output


def records(sentences: list[str]) -> list[dict[str, str]]:
    """Inline records, one participant each."""
    return [{"participant_id": f"P{n:02d}", "response": text} for n, text in enumerate(sentences, start=1)]


OFFLINE_RECORDS = records(
    [
        "I need to swap night shifts quickly when my kids get sick.",
        "It's frustrating when the rota changes and nobody tells me.",
        "I want my overtime to be paid correctly every single week.",
        "I usually keep my own notes of my start and finish times.",
    ]
)


# -- 1. webhook URLs show their query only to a token holder -------------------------


def shown_urls(http: httpx.Client, webhook_id: str) -> list[str]:
    listed = http.get("/api/v1/webhooks")
    one = http.get(f"/api/v1/webhooks/{webhook_id}")
    assert listed.status_code == 200 and one.status_code == 200, (listed.text, one.text)
    return [hook["url"] for hook in listed.json() if hook["webhook_id"] == webhook_id] + [one.json()["url"]]


def test_a_webhook_url_shows_its_query_only_to_a_request_with_a_valid_token(start_server, receiver: Receiver) -> None:
    server = start_server("--rate-limit", "0", "--auth-token", TOKEN)
    with server.client(TOKEN) as http:
        webhook_id = register(http, receiver.url + "?token=s3cret")
        assert shown_urls(http, webhook_id) == [receiver.url + "?token=s3cret"] * 2
    for token in (None, "not-the-token"):
        with server.client(token) as http:
            assert shown_urls(http, webhook_id) == [receiver.url] * 2


def test_with_auth_off_a_webhook_url_never_shows_its_query(client: httpx.Client, receiver: Receiver) -> None:
    webhook_id = register(client, receiver.url + "?token=s3cret")
    assert shown_urls(client, webhook_id) == [receiver.url] * 2
    with_bearer = client.get("/api/v1/webhooks", headers={"Authorization": "Bearer anything"})
    assert "s3cret" not in with_bearer.text


# -- 2. no trailing-slash redirect --------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/generate/", "/api/v1/health/"])
def test_a_trailing_slash_is_a_404_envelope_never_a_redirect_to_the_host_header(
    client: httpx.Client, path: str
) -> None:
    response = client.get(path, headers={"Host": "localhost:9"})  # a name the loopback server answers, on another port
    refused(response, 404)
    assert "location" not in response.headers
    assert "localhost:9" not in response.text


# -- 3. IPv6 clients by /64 ---------------------------------------------------------------


def test_ipv6_clients_are_counted_by_their_64_and_ipv4_ones_by_their_address() -> None:
    def key(host: str) -> str:
        return persona.client_ip({"type": "http", "client": (host, 50000)})

    assert key("2001:db8:1:2::1") == key("2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert key("2001:db8:1:2::1") != key("2001:db8:1:3::1")
    assert key("::ffff:1.2.3.4") == "1.2.3.4"
    assert key("1.2.3.4") == "1.2.3.4"


# -- 4. nothing said and no secret in the log at debug ------------------------------------


def test_at_debug_the_log_holds_no_participants_words_and_no_webhook_secret(
    start_server, fake: FakeProvider, receiver: Receiver
) -> None:
    """SDKs log requests at DEBUG: Anthropic's logs its request options, the prompt and so the data included."""
    words = "My zebra-striped umbrella keeps flooding the marmalade cupboard."
    secret = "debug-signing-secret-777"
    data = records([words, *(record["response"] for record in OFFLINE_RECORDS)])
    providers = ("openai", "anthropic")
    env = {key: value for provider in providers for key, value in fake.environment(provider).items()}
    server = start_server("--rate-limit", "0", "--log-level", "debug", env=env)
    with server.client() as http:
        webhook_id = register(http, receiver.url, secret=secret)
        for provider in providers:
            job = wait_job(http, submit(http, data=data, count=2, provider=provider))
            assert job["status"] == "completed", (provider, job["error"])
        wait_for(
            lambda: (
                len(
                    [
                        d
                        for d in http.get(f"/api/v1/webhooks/{webhook_id}/deliveries").json()
                        if d["status"] == "delivered"
                    ]
                )
                == 2
            ),
            what="both deliveries",
        )
    assert len(fake.requests) == 2
    assert all(words in json.dumps(request["body"]) for request in fake.requests)  # the words did go out
    log = server.log()
    assert "debug" in log.lower()  # the level took effect, so a leak would show
    for leak in ("zebra-striped", "marmalade", secret):
        assert leak not in log


# -- 5. addresses judged by what they are and what they carry -----------------------------


@pytest.mark.parametrize(
    "address",
    [
        "::7f00:1",
        "64:ff9b::7f00:1",
        "2002:7f00:1::",
        "2002:c0a8:101::",
        "fec0::1",
        "192.0.0.1",
        "192.0.0.8",
        "198.18.0.1",
        "192.0.2.1",
        "198.51.100.1",
        "203.0.113.1",
        "::ffff:0:7f00:1",
        "2001:db8::1",
    ],
)
def test_an_address_that_is_not_globally_reachable_is_refused_however_it_is_written(address: str) -> None:
    reason = persona.address_refusal(address, private_allowed=False)
    assert reason and "--allow-private-urls" in reason


def test_an_ipv6_address_carrying_an_ipv4_one_is_judged_by_the_one_inside() -> None:
    for address in ("8.8.8.8", "2606:4700::1", "64:ff9b::808:808", "2002:808:808::"):
        assert persona.address_refusal(address, private_allowed=False) is None, address
    for address in ("64:ff9b::7f00:1", "2002:7f00:1::"):  # the same forms around loopback
        assert persona.address_refusal(address, private_allowed=False), address
    for address in (
        "169.254.169.254",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",
        "2002:a9fe:a9fe::",
        "64:ff9b:1::a9fe:a9fe",
    ):  # local-use NAT64 may translate to the metadata address
        assert "never allowed" in (persona.address_refusal(address, private_allowed=True) or ""), address


def test_a_webhook_to_an_address_that_is_not_global_is_a_422_with_private_urls_off(start_server) -> None:
    server = start_server("--rate-limit", "0", "--no-allow-private-urls")
    with server.client() as http:
        for url in ("http://[::7f00:1]/hook", "http://198.18.0.1/hook"):
            body = refused(http.post("/api/v1/webhooks", json={"url": url}), 422)
            assert "url" in body["details"], url
        assert http.get("/api/v1/webhooks").json() == []


# -- 6. integral numbers as integers ------------------------------------------------------


def test_a_count_written_as_2_point_0_is_the_integer_2_and_2_point_5_is_a_422(client: httpx.Client) -> None:
    job = wait_job(client, submit(client, data=OFFLINE_RECORDS, count=2.0))
    assert job["status"] == "completed", job["error"]
    assert len(job["result"]["personas"]) == 2
    body = refused(client.post("/api/v1/generate", json={"data": OFFLINE_RECORDS, "count": 2.5}), 422)
    assert "count" in body["details"]


# -- 7. Markdown cards escape the data ----------------------------------------------------


def test_a_markdown_card_escapes_html_from_the_data(server: Server) -> None:
    hostile = "<script>alert(1)</script> and <img src=x onerror=alert(1)>"
    data = records(
        [
            f"I need the export to keep {hostile} exactly as I typed it.",
            f"It's frustrating when the editor mangles {hostile} in my notes.",
            f"I want to paste {hostile} into the report without it breaking.",
            f"I usually check that {hostile} survives the round trip.",
        ]
    )
    with server.client() as http:
        job = wait_job(http, submit(http, data=data, count=2))
    assert job["status"] == "completed", job["error"]
    cards = [path.read_text("utf-8") for path in output_folder(server, job).glob("*.md")]
    assert len(cards) == 2
    text = "\n".join(cards)
    assert "&lt;script>" in text
    assert "<script" not in text and "<img" not in text


# -- 8. a data URL has a deadline for the whole fetch -------------------------------------


class TricklingDataServer:
    """A data URL that sends its headers, then one byte every two seconds, until closed."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                self.send_response(200)
                self.send_header("Content-Type", "text/csv")
                self.send_header("Content-Length", str(10**6))
                self.end_headers()
                self.wfile.write(b"participant_id,response\n")
                self.wfile.flush()
                try:
                    while not outer.closed.wait(2):  # the pace of the trickle, not a wait for anything
                        self.wfile.write(b"a")
                        self.wfile.flush()
                except OSError:  # the client gave up
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd, base = serve_on_loopback(Handler)
        self.url = f"{base}/trickle.csv"

    def close(self) -> None:
        self.closed.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.slow
def test_a_data_url_that_trickles_fails_the_job_at_the_deadline(client: httpx.Client) -> None:
    trickle = TricklingDataServer()
    try:
        started = time.monotonic()
        job = wait_job(client, submit(client, data=trickle.url), timeout=persona.URL_TIMEOUT_S + 15)
        took = time.monotonic() - started
    finally:
        trickle.close()
    assert job["status"] == "failed"
    assert f"took longer than {persona.URL_TIMEOUT_S:g} s" in job["error"]
    assert persona.URL_TIMEOUT_S - 1 < took < persona.URL_TIMEOUT_S + 15


# -- 9. a webhook attempt has a deadline for the whole attempt -----------------------------


class TricklingReceiver:
    """A raw socket receiver that reads a request, then writes its status line a byte every half second."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.trickle, args=(conn,), daemon=True).start()

    def trickle(self, conn: socket.socket) -> None:
        with conn:
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                received += chunk
            answer = b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * 1000  # never finishes before the test does
            try:
                for byte in answer:
                    if self.closed.wait(0.5):  # the pace of the trickle, not a wait for anything
                        return
                    conn.sendall(bytes([byte]))
            except OSError:  # the sender gave up
                pass

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


def test_a_receiver_that_trickles_its_answer_fails_the_attempt_at_the_timeout(start_server) -> None:
    trickle = TricklingReceiver()
    try:
        server = start_server("--rate-limit", "0", "--webhook-timeout", "1")
        with server.client() as http:
            webhook_id = register(http, trickle.url)
            wait_job(http, submit(http, data=OFFLINE_RECORDS, count=2))
            [delivery] = wait_for(
                lambda: [d for d in http.get(f"/api/v1/webhooks/{webhook_id}/deliveries").json() if d["attempts"]],
                timeout=15,
                what="an attempt to be recorded",
            )
    finally:
        trickle.close()
    assert trickle.connections >= 1
    attempt = delivery["attempts"][0]
    assert attempt["error"] == "no answer within 1 s"
    assert attempt["http_status"] is None
    assert delivery["status"] != "delivered"


# -- 10. a local source has a size cap ----------------------------------------------------


def big_csv(path: Path, size: int) -> None:
    row = b"P%06d,I need the app to keep my notes safe when the connection drops on the train.\n"
    lines = [b"participant_id,response\n"]
    total, n = len(lines[0]), 0
    while total < size:
        line = row % n
        lines.append(line)
        total += len(line)
        n += 1
    path.write_bytes(b"".join(lines))


def test_a_local_source_over_the_size_cap_fails_naming_the_cap_and_the_option(start_server, workdir: Path) -> None:
    data = workdir / "data"
    big_csv(data / "big.csv", 2 * 1024 * 1024)
    (data / "halves").mkdir()
    big_csv(data / "halves" / "one.csv", 600 * 1024)
    big_csv(data / "halves" / "two.csv", 600 * 1024)
    server = start_server("--rate-limit", "0", "--max-source-mb", "1")
    with server.client() as http:
        for source in ("big.csv", "halves"):
            job = wait_job(http, submit(http, data=source))
            assert job["status"] == "failed", source
            assert "1 MiB cap" in job["error"] and "--max-source-mb" in job["error"], job["error"]
        assert wait_job(http, submit(http, data="interviews.csv"))["status"] == "completed"


# -- 11. depth: folders, JSON files, request bodies ----------------------------------------


@pytest.fixture
def deep_folder(workdir: Path) -> Iterator[Path]:
    """`data/deep/d/d/…/d/p01.txt`, 1,200 levels, made and removed one level at a time.

    Neither os.makedirs nor shutil.rmtree (nor pytest's cleanup, which uses it) survives
    such depth, and the whole path is longer than some calls take, so each step is relative.
    """
    top = workdir / "data" / "deep"
    transcript = (workdir / "data" / "transcripts" / "p01.txt").read_text()
    here = os.getcwd()
    top.mkdir()
    os.chdir(top)
    try:
        for _ in range(1200):
            os.mkdir("d")
            os.chdir("d")
        Path("p01.txt").write_text(transcript)
    finally:
        os.chdir(here)
    yield top
    os.chdir(top)
    try:
        depth = 0
        while os.path.isdir("d"):
            os.chdir("d")
            depth += 1
        for name in os.listdir("."):
            os.unlink(name)
        for _ in range(depth):
            os.chdir("..")
            os.rmdir("d")
    finally:
        os.chdir(here)
    top.rmdir()


def test_a_folder_nested_1200_deep_is_accepted_and_the_job_ends_clearly(server: Server, deep_folder: Path) -> None:
    with server.client() as http:
        job = wait_job(http, submit(http, data="deep", count=1))
    assert job["status"] in ("completed", "failed")
    if job["status"] == "failed":
        assert job["error"] and "internal" not in job["error"].lower()
    assert "Traceback" not in server.log()


def test_a_json_file_nested_600_deep_fails_the_job_naming_it(server: Server) -> None:
    (server.workdir / "data" / "tree.json").write_text("[" * 600 + "]" * 600)
    with server.client() as http:
        job = wait_job(http, submit(http, data="tree.json"))
    assert job["status"] == "failed"
    assert "tree.json" in job["error"] and "nests deeper" in job["error"], job["error"]
    assert "Traceback" not in server.log()


def test_an_inline_body_nested_600_deep_is_a_400_saying_so(client: httpx.Client) -> None:
    nested = [{"participant_id": "P01", "response": json.loads("[" * 600 + "]" * 600)}]
    response = client.post(
        "/api/v1/generate", content=json.dumps({"data": nested}), headers={"Content-Type": "application/json"}
    )
    assert "nests deeper" in refused(response, 400)["message"]


# -- 12. a folder has a file cap ----------------------------------------------------------


def test_a_folder_of_more_than_10000_files_is_a_400_saying_so(client: httpx.Client, workdir: Path) -> None:
    many = workdir / "data" / "many"
    many.mkdir()
    for n in range(10_001):
        (many / f"{n:05d}.txt").write_bytes(b"")
    message = refused(client.post("/api/v1/generate", json={"data": "many"}), 400)["message"]
    assert "more than 10,000 files" in message


# -- 13. path checks: one walk per normal path, shared by concurrent submissions -----------


@pytest.fixture
def counted_walks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[list[str], Path]:
    """Every resolve_data_path call, recorded; a data dir with folders `many` and `other`."""
    walks: list[str] = []
    real = persona.resolve_data_path

    def counting(data: str, data_dir: Path) -> Path:
        walks.append(data)
        return real(data, data_dir)

    for name in ("many", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "p01.txt").write_text("Participant: I need this to work offline on the train.\n")
    monkeypatch.setattr(persona, "resolve_data_path", counting)
    monkeypatch.setattr(persona, "CHECKED_PATHS", {})
    return walks, tmp_path


async def test_one_path_written_three_ways_is_walked_once(counted_walks: tuple[list[str], Path]) -> None:
    walks, data_dir = counted_walks
    for data in ("many/.", "many/./.", "many"):
        await persona.check_data_source(data, data_dir)
    assert len(walks) == 1


async def test_twenty_concurrent_checks_of_one_path_share_one_walk(counted_walks: tuple[list[str], Path]) -> None:
    walks, data_dir = counted_walks
    await asyncio.gather(*(persona.check_data_source("other", data_dir) for _ in range(20)))
    assert walks == ["other"]


async def test_before_walking_runs_first_and_its_refusal_stops_the_walk(counted_walks: tuple[list[str], Path]) -> None:
    walks, data_dir = counted_walks
    seen: list[int] = []

    async def quota_ok() -> None:
        seen.append(len(walks))

    async def quota_full() -> None:
        raise persona.APIError(429, "quota full")

    with pytest.raises(persona.APIError, match="quota full"):
        await persona.check_data_source("many", data_dir, quota_full)
    assert walks == []
    await persona.check_data_source("many", data_dir, quota_ok)
    assert seen == [0] and walks == ["many"]


@pytest.mark.slow
def test_a_line_of_spaces_after_a_colon_leaves_health_answering_fast(server: Server) -> None:
    data = server.workdir / "data" / "spaces"
    data.mkdir()
    (data / "short.txt").write_text("a:" + " " * 60_000 + "x\n")
    (data / "long.txt").write_text("a:" + " " * 1_000_000 + "x\n")
    latencies: list[float] = []
    with server.client() as http:
        job_id = submit(http, data="spaces", count=2)

        def ended() -> dict[str, Any] | None:
            started = time.monotonic()
            assert http.get("/api/v1/health").status_code == 200
            latencies.append(time.monotonic() - started)
            job = http.get(f"/api/v1/generate/{job_id}").json()
            return job if job["status"] in ("completed", "failed") else None

        job = wait_for(ended, timeout=30, what="the job to end")
    assert max(latencies) < 1.0, latencies
    assert job["status"] == "completed" or (job["error"] and "internal" not in job["error"].lower())


# -- from review: odd input never becomes a traceback, secrets in paths stay hidden ---------------


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
        "https://discord.com/api/webhooks/123456789012345678/abcDEF123_ghiJKL456-mnoPQR789stuVWX",
        "https://hooks.example.com/in/eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",  # a JWT
        "https://hooks.example.com/in/session;token=s3cr3t",  # a path parameter
        "https://hooks.example.com/in/dG9rZW4rd2l0aC9zbGFzaGVz+cGFk==",  # base64
    ],
)
def test_a_webhook_secret_in_the_path_is_hidden_from_readers_without_a_token(url: str) -> None:
    shown = persona.webhook_for_reader({"url": url}, whole=False)["url"]
    assert url.rsplit("/", 1)[1] not in shown and shown.endswith("/…")
    assert persona.webhook_for_reader({"url": url}, whole=True)["url"] == url


def test_attributes_of_nothing_but_separators_neither_crash_loading_nor_the_demographics() -> None:
    records = [
        {
            "participant_id": f"P{i}",
            "answer": f"I keep my own notes of shift number {i} because the app loses them.",
            "role": role,
        }
        for i, role in enumerate([",", ";", ";", "Nurse", "Nurse", ",;"])
    ]
    dataset = persona.load_inline(records)
    personas, _ = persona.offline_personas(dataset, 1, {"group_by": "role"})
    assert personas and all(isinstance(value, (str, int, float)) for value in personas[0]["demographics"].values())


def test_json_lines_nested_too_deeply_fail_the_file_not_the_server(tmp_path: Path) -> None:
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(persona.GenerationError, match="deep.jsonl line 1"):
        persona.load_path("deep.jsonl", tmp_path)


def test_a_damaged_word_file_fails_naming_it(tmp_path: Path) -> None:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("word/document.xml", "<w:document>" + "Interviewer: how? " * 2000 + "</w:document>")
    raw = bytearray(buffer.getvalue())
    raw[120:124] = b"\xff\xff\xff\xff"  # inside the compressed part
    (tmp_path / "broken.docx").write_bytes(bytes(raw))
    with pytest.raises(persona.GenerationError, match="broken.docx"):
        persona.load_path("broken.docx", tmp_path)


@pytest.mark.parametrize(
    "question",
    [
        "Tell us about the last time you got paid",
        "How quickly did support reply to you?",
        "Did our emails help? Tell us why",
        "What went wrong with Android",
    ],
)
def test_a_question_that_merely_contains_id_reply_or_email_is_still_what_people_said(question: str) -> None:
    answers = [
        "The payment arrived two weeks late and nobody told me why it was delayed.",
        "I had to phone three times before anyone looked at my ticket properly.",
        "The reminder emails were useful but they arrived after the deadline had passed.",
        "The Android app crashed every time I opened the attachments from my manager.",
        "Support answered within an hour and fixed the problem with my account quickly.",
        "I could not find the export button until a colleague showed me the menu.",
    ]
    records = [
        {"participant_id": f"P{i}", "plan": "Free" if i % 2 else "Pro", question: answer}
        for i, answer in enumerate(answers)
    ]
    dataset = persona.load_inline(records)
    assert [person.texts for person in dataset.participants] == [[answer] for answer in answers]


def test_a_huge_column_reference_in_a_sheet_does_not_widen_every_row(tmp_path: Path) -> None:
    import zipfile

    ns = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    rows = "".join(
        f'<row r="{n}"><c r="A{n}" t="inlineStr"><is><t>P{n}</t></is></c>'
        f'<c r="B{n}" t="inlineStr"><is><t>I keep notes of every shift I work, row {n}.</t></is></c>'
        f'<c r="XFD{n}" t="inlineStr"><is><t>x</t></is></c></row>'
        for n in range(2, 400)
    )
    header = (
        '<row r="1"><c r="A1" t="inlineStr"><is><t>participant_id</t></is></c>'
        '<c r="B1" t="inlineStr"><is><t>comment</t></is></c></row>'
    )
    with zipfile.ZipFile(tmp_path / "wide.xlsx", "w") as archive:
        archive.writestr(
            "xl/worksheets/sheet1.xml", f'<worksheet xmlns="{ns}"><sheetData>{header}{rows}</sheetData></worksheet>'
        )
    table = persona.xlsx_rows((tmp_path / "wide.xlsx").read_bytes(), "wide.xlsx")[0]
    assert max(map(len, table)) == 2
    assert len(persona.load_path("wide.xlsx", tmp_path).participants) == 398


async def test_retention_goes_on_past_a_batch_of_failed_jobs_without_folders(tmp_path: Path) -> None:
    store = persona.SQLiteStore(tmp_path / "p.db")
    await store.open()
    for _ in range(5):
        job_id = (await store.create_job("ip:x", {"data": "a.csv"}, 100, None)).job_id
        await store.cancel_job(job_id)
    with sqlite3.connect(tmp_path / "p.db") as conn:
        conn.execute("UPDATE jobs SET completed_at = '2020-01-01T00:00:00Z'")
    runner = persona.JobRunner(
        store, persona.Settings(db=tmp_path / "p.db", retention_days=1, output_dir=tmp_path / "out"), lambda: None
    )
    original = persona.RETENTION_BATCH
    persona.RETENTION_BATCH = 2  # failed jobs have no folder: the loop must count jobs, not folders
    try:
        await runner.apply_retention()
    finally:
        persona.RETENTION_BATCH = original
    jobs, total = await store.list_jobs(None, 100, 0)
    assert jobs == [] and total == 0
    await store.close()


def test_what_persona_wrote_and_hidden_files_are_never_data(tmp_path: Path) -> None:
    (tmp_path / "survey.csv").write_text("id,comment\nP1,I plan my week on Sunday evening.\n")
    (tmp_path / ".secret.md").write_text("Interviewer: hi\nDana: my password is hunter2.\n")
    folder = persona.output_folder(tmp_path / "output", "job-0123456789ab", None)
    persona.mark_output_folder(tmp_path / "output")  # as a server does when it starts, and every job's writing
    folder.mkdir()
    (folder / "personas.md").write_text("> I plan my week on Sunday evening.\n")
    files, _ = persona.folder_files(tmp_path, tmp_path)
    assert [file.name for file in files] == ["survey.csv"]
    for data in (f"output/{folder.name}/personas.md", "output", ".secret.md"):
        with pytest.raises(persona.APIError, match="hidden file or lies in Persona's output folder"):
            persona.checked_data_path(data, tmp_path)


async def test_a_chain_of_refinements_reads_no_more_than_one_source_may_hold(tmp_path: Path) -> None:
    rows = "".join(f"P{n},I plan week {n} on Sunday evening with a paper diary and a pencil.\n" for n in range(8000))
    for name in ("a.csv", "b.csv", "c.csv"):  # 0.6 MiB each
        (tmp_path / name).write_text(f"id,comment\n{rows}")
    settings = persona.Settings(data_dir=tmp_path, max_source_mb=1)
    request = {"data": "a.csv", "refine": {"more_data": ["b.csv", "c.csv"]}}
    with pytest.raises(
        persona.GenerationError, match="its parent's sources and its own together is 1.7 MiB, over the 1 MiB cap"
    ):
        await persona.job_dataset(request, settings)
    dataset, _ = await persona.job_dataset({"data": "a.csv"}, settings)
    assert len(dataset.participants) == 8000


async def test_an_estimate_reads_its_data_holding_an_engine_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "survey.csv").write_text(
        "id,comment\n" + "".join(f"P{n},I plan week {n} on Sunday evening with a paper diary.\n" for n in range(6))
    )
    monkeypatch.setattr(persona, "ENGINE_WORKERS", 1)
    held: list[bool] = []
    real_load = persona.load_data

    async def watched(data, settings):  # type: ignore[no-untyped-def]
        held.append(persona.engine_slot().locked())
        return await real_load(data, settings)

    monkeypatch.setattr(persona, "load_data", watched)
    estimate = await persona.estimate_job(
        {"data": "survey.csv", "provider": "local", "count": 2}, persona.Settings(data_dir=tmp_path)
    )
    assert held == [True] and estimate["calls"] == 0


def test_an_estimate_being_made_counts_in_its_owners_concurrent_jobs_quota(start_server, gated_data) -> None:
    server = start_server("--rate-limit", "0", "--max-concurrent-jobs", "1")
    first: dict[str, httpx.Response] = {}
    with server.client() as http:
        making = threading.Thread(
            target=lambda: first.update(answer=http.post("/api/v1/estimate", json={"data": gated_data.url}))
        )
        making.start()
        wait_for(lambda: gated_data.requests == 1, what="the first estimate to fetch its data")
        refused = http.post("/api/v1/estimate", json={"data": "interviews.csv"})
        assert refused.status_code == 429 and "1 estimates are being made" in refused.json()["message"]
        assert http.post("/api/v1/generate", json={"data": "interviews.csv"}).status_code == 200  # counts jobs alone
        gated_data.gate.set()
        making.join(30)
        assert first["answer"].status_code == 200, first["answer"].text
        wait_for(lambda: http.get("/api/v1/generate?status=completed").json(), what="the job to complete")
        assert http.post("/api/v1/estimate", json={"data": "interviews.csv"}).status_code == 200


async def test_an_offline_job_fetching_its_url_holds_no_engine_slot(
    gated_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(persona, "ENGINE_WORKERS", 1)
    settings = persona.Settings(data_dir=tmp_path, output_dir=tmp_path / "out", allow_private_urls=True)

    async def report(progress: int, stage: str) -> None:
        pass

    slow = asyncio.create_task(
        persona.generate(
            "job-00000000000a", {"data": gated_data.url, "provider": "local", "count": 1}, "exp-1", settings, report
        )
    )
    records = [
        {"id": f"P{n}", "comment": f"I swap night shift {n} with a colleague when the rota changes."} for n in range(4)
    ]
    quick = await persona.generate(
        "job-00000000000b", {"data": records, "provider": "local", "count": 2}, "exp-2", settings, report
    )
    assert len(quick["personas"]) == 2 and not slow.done()  # the slot was free while the URL was held
    gated_data.gate.set()
    assert (await slow)["personas"]


def test_a_loopback_server_answers_only_its_own_host_names(start_server) -> None:
    server = start_server("--allowed-hosts", "persona.internal")
    port = server.url.rsplit(":", 1)[1]
    for host in (
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        f"[::1]:{port}",
        "persona.internal",
        f"PERSONA.internal:{port}",
    ):
        assert httpx.get(f"{server.url}/api/v1/health", headers={"Host": host}).status_code == 200, host
    for host in ("rebind.attacker.test", f"rebind.attacker.test:{port}", "127.0.0.1.nip.io"):
        body = refused(httpx.get(f"{server.url}/api/v1/data", headers={"Host": host}), 400)
        assert "--allowed-hosts" in body["message"] and body["details"]["host"] == host.split(":")[0]
