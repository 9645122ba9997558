"""Webhook delivery: the reference's payload, signed, retried, never lost, only where allowed."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import GatedDataServer, Receiver, Server, module_server, submit, wait_for, wait_job
from standardwebhooks import Webhook

import persona

FAST_RETRIES = ("--webhook-retry-schedule", "0.2,0.2,0.2")


def verify_signature(payload: bytes, signature: str, secret: str) -> bool:
    """The reference's own verification snippet, as published."""
    expected = hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
    return hmac.compare_digest(f"sha256={expected}", signature)


def verify_standard_webhook(headers: dict[str, str], body: bytes, secret: str) -> bool:
    """Standard Webhooks verification, as its specification describes it."""
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(f"v1,{expected}", part) for part in headers["webhook-signature"].split())


def register(http: httpx.Client, url: str, **body: object) -> str:
    response = http.post("/api/v1/webhooks", json={"url": url, **body})
    assert response.status_code == 200, response.text
    return response.json()["webhook_id"]


def deliveries(http: httpx.Client, webhook_id: str) -> list[dict]:
    return http.get(f"/api/v1/webhooks/{webhook_id}/deliveries").json()


def settled(http: httpx.Client, webhook_id: str, count: int = 1, status: str = "delivered") -> list[dict]:
    def done() -> list[dict] | None:
        found = deliveries(http, webhook_id)
        return found if len(found) >= count and all(d["status"] == status for d in found) else None

    return wait_for(done, what=f"{count} deliveries to be {status}")


def test_a_completed_job_is_posted_with_the_reference_payload_and_signatures(start_server, receiver: Receiver) -> None:
    server = start_server("--rate-limit", "0")
    with server.client() as http:
        webhook_id = register(http, receiver.url, secret="webhook-secret-123")
        job = wait_job(http, submit(http, data="interviews.csv", count=3))
        settled(http, webhook_id)
    request = receiver.requests[0]
    headers, body = request["headers"], request["body"]
    payload = json.loads(body)
    assert payload == {
        "event": "generation.completed",
        "timestamp": payload["timestamp"],
        "data": {
            "job_id": job["job_id"],
            "personas_count": 3,
            "experiment_id": job["result"]["experiment_id"],
            "output_path": job["result"]["output_path"],
        },
    }
    assert payload["timestamp"].endswith("Z")
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Persona-Event"] == "generation.completed"
    assert verify_signature(body, headers["X-Persona-Signature"], "webhook-secret-123")
    assert not verify_signature(body, headers["X-Persona-Signature"], "another-secret")
    assert verify_standard_webhook(headers, body, "webhook-secret-123")
    assert Webhook(base64.b64encode(b"webhook-secret-123").decode()).verify(body, headers) == payload
    assert headers["webhook-id"] == headers["X-Persona-Delivery"]
    assert headers["webhook-timestamp"] == headers["X-Persona-Timestamp"]
    assert headers["User-Agent"].startswith("Persona-Webhooks/")


def test_a_failed_job_sends_the_failed_payload_only_to_subscribers(start_server, receivers) -> None:
    failures, completions = receivers(), receivers()
    server = start_server("--rate-limit", "0")
    with server.client() as http:
        failed_hook = register(http, failures.url, events=["generation.failed"])
        done_hook = register(http, completions.url, events=["generation.completed"])
        bad = wait_job(http, submit(http, data=["just one voice here"], count=2))
        good = wait_job(http, submit(http, data="interviews.csv"))
        settled(http, failed_hook), settled(http, done_hook)
    assert [json.loads(r["body"]) for r in failures.requests] == [
        {
            "event": "generation.failed",
            "timestamp": bad["completed_at"],
            "data": {"job_id": bad["job_id"], "error": bad["error"]},
        }
    ]
    assert [json.loads(r["body"])["data"]["job_id"] for r in completions.requests] == [good["job_id"]]
    assert "X-Persona-Signature" not in failures.requests[0]["headers"]


def test_a_jobs_own_webhook_url_is_signed_with_the_server_secret(start_server, receiver: Receiver) -> None:
    server = start_server("--rate-limit", "0", env={"PERSONA_WEBHOOK_SECRET": "server-wide-secret"})
    with server.client() as http:
        job_id = submit(http, data="interviews.csv", webhook_url=receiver.url)
        wait_job(http, job_id)
        wait_for(lambda: receiver.requests, what="the job's webhook")
    request = receiver.requests[0]
    assert json.loads(request["body"])["data"]["job_id"] == job_id
    assert verify_signature(request["body"], request["headers"]["X-Persona-Signature"], "server-wide-secret")
    assert "server-wide-secret" not in server.log()


def test_each_delivery_has_a_connection_of_its_own(start_server, receiver: Receiver) -> None:
    """Requests go to a checked address, and a pool matches connections by address alone:
    a kept connection (a TLS session verified for one host name) would carry another name's requests.

    A guard: a shared client reuses a connection once it reads response bodies.
    """
    server = start_server("--rate-limit", "0")
    other_name = receiver.url.replace("127.0.0.1", "127.1")  # another host name for the same address
    with server.client() as http:
        for count, url in enumerate((receiver.url, other_name), start=1):
            wait_job(http, submit(http, data="interviews.csv", webhook_url=url))
            wait_for(lambda count=count: len(receiver.requests) == count, what=f"delivery {count}")
    first, second = receiver.requests
    assert first["peer"] != second["peer"]


def test_secrets_in_urls_and_webhook_secrets_never_reach_the_log_even_at_debug(
    start_server, receiver: Receiver, gated_data: GatedDataServer
) -> None:
    server = start_server("--rate-limit", "0", "--log-level", "debug")
    gated_data.gate.set()
    with server.client() as http:
        webhook_id = register(http, receiver.url + "?token=hook-secret-in-url", secret="signing-secret-123")
        job = wait_job(http, submit(http, data=gated_data.url + "?signature=data-secret-in-url"))
        settled(http, webhook_id)
    assert job["status"] == "completed", job
    assert receiver.requests[0]["path"].endswith("hook-secret-in-url")
    log = server.log()
    assert "debug" in log.lower()  # the level took effect, so a leak would show
    for secret in ("hook-secret-in-url", "data-secret-in-url", "signing-secret-123"):
        assert secret not in log


def test_a_data_url_shows_no_query_in_the_jobs_anyone_can_read(
    client: httpx.Client, receiver: Receiver, gated_data: GatedDataServer
) -> None:
    """Signed URLs carry their signature in the query; reads need no token."""
    gated_data.gate.set()
    done = wait_job(client, submit(client, data=gated_data.url + "?signature=data-secret-in-url"))
    assert done["result"]["metadata"]["source"]["location"] == gated_data.url
    failed = wait_job(
        client, submit(client, data=receiver.url + "?signature=data-secret-in-url")
    )  # answers GET with 501
    assert failed["status"] == "failed" and receiver.url in failed["error"]
    assert "data-secret-in-url" not in json.dumps(done) + json.dumps(failed)


def test_a_cancelled_job_notifies_as_failed(start_server, receiver: Receiver, gated_data: GatedDataServer) -> None:
    server = start_server("--rate-limit", "0")
    with server.client() as http:
        webhook_id = register(http, receiver.url)
        job_id = submit(http, data=gated_data.url)
        wait_job(http, job_id, until=("running",))
        http.delete(f"/api/v1/generate/{job_id}")
        settled(http, webhook_id)
    assert json.loads(receiver.requests[0]["body"])["data"] == {"job_id": job_id, "error": "cancelled"}


def test_a_receiver_failing_twice_gets_three_attempts_of_one_delivery(start_server, receiver: Receiver) -> None:
    receiver.answers = [500, 502, 200]
    server = start_server("--rate-limit", "0", *FAST_RETRIES)
    with server.client() as http:
        webhook_id = register(http, receiver.url)
        wait_job(http, submit(http, data="interviews.csv"))
        [delivery] = settled(http, webhook_id)
    assert len(receiver.requests) == 3
    assert len({r["headers"]["X-Persona-Delivery"] for r in receiver.requests}) == 1
    assert [a["http_status"] for a in delivery["attempts"]] == [500, 502, 200]
    assert delivery["attempts"][0]["error"] == "the receiver answered HTTP 500"
    assert delivery["next_retry_at"] is None


def test_a_host_that_does_not_resolve_is_retried_like_any_failure(start_server) -> None:
    """DNS may be down for a moment; only an address that may never be reached is final."""
    server = start_server("--rate-limit", "0", *FAST_RETRIES)
    with server.client() as http:
        webhook_id = register(http, "http://persona-test.invalid/hook")  # .invalid never resolves (RFC 6761)
        wait_job(http, submit(http, data="interviews.csv"))
        [delivery] = settled(http, webhook_id, status="failed")
    assert len(delivery["attempts"]) == 4
    assert all("persona-test.invalid could not be resolved" in a["error"] for a in delivery["attempts"])


def test_410_gone_stops_retrying(start_server, receiver: Receiver) -> None:
    receiver.answers = [410, 200]
    server = start_server("--rate-limit", "0", *FAST_RETRIES)
    with server.client() as http:
        webhook_id = register(http, receiver.url)
        wait_job(http, submit(http, data="interviews.csv"))
        [delivery] = settled(http, webhook_id, status="failed")
    assert len(receiver.requests) == 1
    assert "410" in delivery["attempts"][0]["error"]


def test_a_spent_schedule_fails_the_delivery_and_a_manual_retry_sends_it_again(
    start_server, receiver: Receiver
) -> None:
    receiver.answers = [500, 500, 500, 500, 200]
    server = start_server("--rate-limit", "0", *FAST_RETRIES)
    with server.client() as http:
        webhook_id = register(http, receiver.url)
        wait_job(http, submit(http, data="interviews.csv"))
        [delivery] = settled(http, webhook_id, status="failed")
        assert len(delivery["attempts"]) == 4
        url = f"/api/v1/webhooks/{webhook_id}/deliveries/{delivery['delivery_id']}/retry"
        assert http.post(url).status_code == 200
        [delivery] = settled(http, webhook_id)
        assert http.post(url).status_code == 409
    assert len(receiver.requests) == 5
    assert delivery["attempts"][-1]["http_status"] == 200


def test_the_delivery_log_lists_newest_first_with_the_next_retry_time(start_server, receiver: Receiver) -> None:
    receiver.answers = [200, 200, 500]
    server = start_server("--rate-limit", "0", "--webhook-retry-schedule", "3600")
    with server.client() as http:
        webhook_id = register(http, receiver.url)
        jobs = [wait_job(http, submit(http, data="interviews.csv"))["job_id"] for _ in range(2)]
        settled(http, webhook_id, count=2)
        third = wait_job(http, submit(http, data="interviews.csv"))["job_id"]
        log = wait_for(
            lambda: (
                [d for d in deliveries(http, webhook_id) if d["attempts"]]
                if len([d for d in deliveries(http, webhook_id) if d["attempts"]]) == 3
                else None
            ),
            what="three attempts",
        )
    assert [d["job_id"] for d in log] == [third, *reversed(jobs)]
    assert log[0]["status"] == "pending" and log[0]["next_retry_at"].endswith("Z")
    assert log[0]["attempts"][0]["http_status"] == 500
    assert {"delivery_id", "event", "job_id", "status", "created_at", "next_retry_at", "attempts"} == set(log[0])


def test_with_several_keys_a_webhook_hears_and_answers_to_its_own_key_alone(
    start_server, receivers: Callable[[], Receiver]
) -> None:
    server = start_server("--auth-token", "alpha,beta", "--rate-limit", "0", *FAST_RETRIES)
    heard = {"alpha": receivers(), "beta": receivers()}
    with server.client("alpha") as alpha, server.client("beta") as beta:
        hooks = {
            name: http.post("/api/v1/webhooks", json={"url": heard[name].url}).json()["webhook_id"]
            for name, http in (("alpha", alpha), ("beta", beta))
        }
        jobs = {"alpha": submit(alpha, data="interviews.csv"), "beta": submit(beta, data="interviews.csv")}
        for name in ("alpha", "beta"):
            wait_job(alpha, jobs[name])
            wait_for(lambda name=name: heard[name].requests, what=f"{name}'s delivery")
        last = submit(alpha, data="interviews.csv")
        wait_job(alpha, last)
        wait_for(lambda: len(heard["alpha"].requests) == 2, what="alpha's second delivery")
        for name in ("alpha", "beta"):
            got = [json.loads(request["body"])["data"]["job_id"] for request in heard[name].requests]
            assert got == ([jobs["alpha"], last] if name == "alpha" else [jobs["beta"]])
        assert beta.delete(f"/api/v1/webhooks/{hooks['alpha']}").status_code == 404
        delivery = alpha.get(f"/api/v1/webhooks/{hooks['alpha']}/deliveries").json()[0]["delivery_id"]
        retry = f"/api/v1/webhooks/{hooks['alpha']}/deliveries/{delivery}/retry"
        assert beta.post(retry).status_code == 404
        assert alpha.delete(f"/api/v1/webhooks/{hooks['alpha']}").status_code == 200


def test_deleting_a_webhook_stops_its_pending_deliveries(start_server, workdir: Path, receiver: Receiver) -> None:
    receiver.answers = [500]
    server = start_server("--rate-limit", "0", "--webhook-retry-schedule", "0.3,0.3,0.3,0.3,0.3,0.3")
    with server.client() as http:
        webhook_id = register(http, receiver.url)
        wait_job(http, submit(http, data="interviews.csv"))
        wait_for(lambda: receiver.requests, what="a first attempt")
        http.delete(f"/api/v1/webhooks/{webhook_id}")
    wait_for(
        lambda: server.query("SELECT status FROM deliveries") == [("cancelled",)], what="the delivery to be cancelled"
    )


def test_a_hanging_receiver_delays_neither_other_receivers_nor_the_api(start_server, receivers) -> None:
    hanging, healthy = receivers(), receivers()
    hanging.answers = [None]
    server = start_server("--rate-limit", "0", "--webhook-timeout", "60")
    with server.client() as http:
        register(http, hanging.url)
        healthy_hook = register(http, healthy.url)
        wait_job(http, submit(http, data="interviews.csv"))
        wait_for(lambda: hanging.requests, what="the hanging receiver to be called")
        settled(http, healthy_hook)
        assert not hanging.release.is_set()
        assert http.get("/api/v1/health").status_code == 200
        hanging.release.set()


def test_a_receiver_that_times_out_is_retried(start_server, receiver: Receiver) -> None:
    receiver.answers = [None, 200]
    server = start_server("--rate-limit", "0", "--webhook-timeout", "0.5", *FAST_RETRIES)
    with server.client() as http:
        webhook_id = register(http, receiver.url)
        wait_job(http, submit(http, data="interviews.csv"))
        [delivery] = settled(http, webhook_id)
    assert delivery["attempts"][0]["error"] == "no answer within 0.5 s"
    assert delivery["attempts"][1]["http_status"] == 200
    receiver.release.set()


@pytest.mark.slow
def test_a_delivery_pending_when_the_server_is_killed_is_sent_once_after_restart(
    start_server, receiver: Receiver
) -> None:
    receiver.answers = [503, 200]
    server = start_server("--rate-limit", "0", "--webhook-retry-schedule", "2")
    with server.client() as http:
        webhook_id = register(http, receiver.url)
        wait_job(http, submit(http, data="interviews.csv"))
        wait_for(lambda: deliveries(http, webhook_id)[0]["attempts"], what="a first attempt, recorded")
        server.kill()
    server.start()
    with server.client() as http:
        [delivery] = settled(http, webhook_id)
    assert [r["headers"]["X-Persona-Delivery"] for r in receiver.requests] == [delivery["delivery_id"]] * 2
    assert [a["http_status"] for a in delivery["attempts"]] == [503, 200]


@pytest.mark.slow
def test_two_workers_send_each_delivery_exactly_once(start_server, receiver: Receiver) -> None:
    server = start_server("--workers", "2", "--rate-limit", "0", "--max-concurrent-jobs", "100")
    with server.client() as http:
        webhook_id = register(http, receiver.url)
        job_ids = [submit(http, data="interviews.csv") for _ in range(12)]
        for job_id in job_ids:
            wait_job(http, job_id, timeout=60)
        settled(http, webhook_id, count=12)
    sent = [json.loads(r["body"])["data"]["job_id"] for r in receiver.requests]
    assert sorted(sent) == sorted(job_ids)


# -- where requests may go --------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "private_allowed", "refused"),
    [
        ("127.0.0.1", False, True),
        ("127.0.0.1", True, False),
        ("10.1.2.3", False, True),
        ("172.20.0.1", False, True),
        ("192.168.1.1", False, True),
        ("100.64.0.1", False, True),
        ("fd00::1", False, True),
        ("::1", False, True),
        ("::ffff:127.0.0.1", False, True),
        ("169.254.169.254", True, True),
        ("fe80::1", True, True),
        ("0.0.0.0", True, True),
        ("93.184.216.34", False, False),
        ("2606:4700::1111", False, False),
    ],
)
def test_address_rules(address: str, private_allowed: bool, refused: bool) -> None:
    assert (persona.address_refusal(address, private_allowed) is not None) == refused


def test_private_urls_default_to_allowed_only_on_a_loopback_listener() -> None:
    assert persona.Settings(host="127.0.0.1").private_urls_allowed
    assert persona.Settings(host="localhost").private_urls_allowed
    assert not persona.Settings(host="0.0.0.0").private_urls_allowed
    assert not persona.Settings(host="127.0.0.1", allow_private_urls=False).private_urls_allowed
    assert persona.Settings(host="0.0.0.0", allow_private_urls=True).private_urls_allowed


@pytest.fixture
def guarded(start_server):
    return start_server("--rate-limit", "0", "--no-allow-private-urls", *FAST_RETRIES)


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server that may reach no private address, for the module's refusals at registration."""
    yield from module_server(tmp_path_factory, "--no-allow-private-urls", *FAST_RETRIES)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/hook", "http://[::1]/hook", "http://10.0.0.8/h", "http://169.254.169.254/latest"]
)
def test_a_literal_address_that_may_not_be_reached_is_refused_at_registration(refusing, url: str) -> None:
    with refusing.client() as http:
        response = http.post("/api/v1/webhooks", json={"url": url})
        assert response.status_code == 422 and "url" in response.json()["details"]
        response = http.post("/api/v1/generate", json={"data": "interviews.csv", "webhook_url": url})
        assert response.status_code == 422 and "webhook_url" in response.json()["details"]


def test_the_metadata_address_is_refused_even_where_private_urls_are_allowed(client: httpx.Client) -> None:
    response = client.post("/api/v1/webhooks", json={"url": "http://169.254.169.254/latest/meta-data"})
    assert response.status_code == 422


def test_a_hostname_resolving_to_loopback_is_refused_at_delivery(guarded, receiver: Receiver) -> None:
    url = receiver.url.replace("127.0.0.1", "localhost")
    with guarded.client() as http:
        webhook_id = register(http, url)
        wait_job(http, submit(http, data="interviews.csv"))
        [delivery] = settled(http, webhook_id, status="failed")
    assert not receiver.requests
    assert "resolves to" in delivery["attempts"][0]["error"] and "private" in delivery["attempts"][0]["error"]


def test_a_data_url_on_a_private_address_fails_its_job_with_the_reason(guarded, gated_data: GatedDataServer) -> None:
    gated_data.gate.set()
    with guarded.client() as http:
        job = wait_job(http, submit(http, data=gated_data.url.replace("127.0.0.1", "localhost")))
    assert job["status"] == "failed"
    assert "refused" in job["error"] and "127.0.0.1" in job["error"]
    assert gated_data.requests == 0


def test_retry_after_is_honoured_in_both_forms_and_capped() -> None:
    import time
    from email.utils import formatdate

    assert persona.parse_retry_after("30") == 30
    assert 55 <= persona.parse_retry_after(formatdate(time.time() + 60, usegmt=True)) <= 60
    assert persona.parse_retry_after("999999999") == persona.RETRY_AFTER_CAP_S
    assert persona.parse_retry_after("soon") is None
    assert persona.retry_delay((0.1,), 1, 30.0) == 30.0


def test_the_schedule_backs_off_with_jitter_and_ends() -> None:
    schedule = (5.0, 60.0)
    assert 4.5 <= persona.retry_delay(schedule, 1, None) <= 5.5
    assert 54 <= persona.retry_delay(schedule, 2, None) <= 66
    assert persona.retry_delay(schedule, 3, None) is None


def test_a_redirect_is_not_followed_but_retried(start_server, receivers) -> None:
    target = receivers()
    redirecting = receivers()
    redirecting.answers = [307, 200]
    redirecting.redirect_to = target.url
    server = start_server("--rate-limit", "0", *FAST_RETRIES)
    with server.client() as http:
        webhook_id = register(http, redirecting.url)
        wait_job(http, submit(http, data="interviews.csv"))
        [delivery] = settled(http, webhook_id)
    assert [a["http_status"] for a in delivery["attempts"]] == [307, 200]
    assert not target.requests


def test_participants_words_holding_a_nul_still_finish_their_job_and_its_webhook(
    server: Server, receiver: Receiver
) -> None:
    records = [
        {"id": f"p{n}", "text": f"I plan every shift\u0000 around the rota, week {n}, and keep notes."}
        for n in range(6)
    ]
    with server.client() as http:
        job = wait_job(http, submit(http, data=records, count=2, webhook_url=receiver.url))
    assert job["status"] == "completed", job["error"]
    wait_for(lambda: receiver.requests, what="the job's own webhook")
    assert json.loads(receiver.requests[0]["body"])["data"]["job_id"] == job["job_id"]
