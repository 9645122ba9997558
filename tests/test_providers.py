"""LLM providers through their real SDKs, against fake provider servers on loopback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from conftest import Server, submit, wait_for, wait_job
from fake_providers import FakeProvider

# Its subject is not the store: it runs on SQLite alone (tests/test_store.py and the API,
# webhook, durability and recovery tests run on both stores).
pytestmark = pytest.mark.sqlite_only


SECRET_KEY = "sk-test-DO-NOT-LEAK-4242"


def serve_with(start_server, fake: FakeProvider, provider: str, *args: str) -> Server:
    return start_server("--rate-limit", "0", *args, env=fake.environment(provider, SECRET_KEY))


def said_in(workdir: Path) -> str:
    return re.sub(r"\s+", " ", (workdir / "data" / "interviews.csv").read_text())


@pytest.mark.parametrize("provider", ["anthropic", "openai", "gemini", "ollama"])
def test_each_provider_generates_grounded_personas_end_to_end(
    start_server, fake: FakeProvider, workdir: Path, provider: str
) -> None:
    server = serve_with(start_server, fake, provider)
    with server.client() as http:
        job = wait_job(http, submit(http, data="interviews.csv", count=3, provider=provider))
    assert job["status"] == "completed", job["error"]
    result = job["result"]
    assert len(result["personas"]) == 3
    metadata = result["metadata"]
    assert metadata["provider"] == provider
    assert metadata["usage"] == {"input_tokens": 120, "output_tokens": 80, "calls": 1}
    text = said_in(workdir)
    for persona in result["personas"]:
        assert {"id", "name", "title", "demographics", "goals", "pain_points", "behaviours", "quotes"} <= set(persona)
        assert all(quote in text for quote in persona["quotes"])
        assert persona["evidence"]["participants"] and all(
            pid.startswith("P") for pid in persona["evidence"]["participants"]
        )
    output = Path(result["output_path"])
    exchanges = json.loads(((output if output.is_absolute() else workdir / output) / "exchanges.json").read_text())
    assert len(exchanges) == 1 and "<data>" in exchanges[0]["prompt"] and exchanges[0]["answer"]
    assert len(fake.requests) == 1
    assert SECRET_KEY not in json.dumps(exchanges) and SECRET_KEY not in server.log()


def test_anthropic_is_asked_for_a_forced_tool_call_and_openai_for_a_json_schema(
    start_server, fake: FakeProvider
) -> None:
    for provider in ("anthropic", "openai"):  # each server a database of its own: its keys are its own
        server = start_server("--rate-limit", "0", env=fake.environment(provider, SECRET_KEY), db=f"{provider}.db")
        with server.client() as http:
            assert wait_job(http, submit(http, data="interviews.csv", provider=provider))["status"] == "completed"
    anthropic_body, openai_body = fake.requests[0]["body"], fake.requests[1]["body"]
    assert anthropic_body["tool_choice"] == {"type": "tool", "name": "submit"}
    assert anthropic_body["tools"][0]["input_schema"]["required"] == ["personas"]
    assert openai_body["response_format"]["type"] == "json_schema"


@pytest.mark.parametrize("fault", ["wrong_count", "missing_field", "invalid_json"])
def test_an_invalid_answer_is_repaired_once(start_server, fake: FakeProvider, fault: str) -> None:
    fake.script = [fault]
    server = serve_with(start_server, fake, "openai")
    with server.client() as http:
        job = wait_job(http, submit(http, data="interviews.csv", count=3, provider="openai"))
    assert job["status"] == "completed", job["error"]
    assert job["result"]["metadata"]["usage"]["calls"] == 2
    assert "was invalid" in fake.requests[1]["body"]["messages"][-1]["content"]


def test_an_answer_still_invalid_after_repair_fails_the_job_saying_what(start_server, fake: FakeProvider) -> None:
    fake.script = ["wrong_count", "wrong_count"]
    server = serve_with(start_server, fake, "anthropic")
    with server.client() as http:
        job = wait_job(http, submit(http, data="interviews.csv", count=3, provider="anthropic"))
    assert job["status"] == "failed"
    assert (
        job["error"] == "anthropic: the model's answer was invalid after one repair: expected exactly 3 personas, got 4"
    )


def test_a_429_is_retried_by_the_sdk_and_the_job_completes(start_server, fake: FakeProvider) -> None:
    fake.script = ["429"]
    server = serve_with(start_server, fake, "anthropic")
    with server.client() as http:
        job = wait_job(http, submit(http, data="interviews.csv", provider="anthropic"))
    assert job["status"] == "completed", job["error"]
    assert len(fake.requests) == 2


@pytest.mark.parametrize(
    ("provider", "fault", "message"),
    [
        ("openai", "500", "openai: server error (500) after 3 attempts"),
        ("anthropic", "429", "anthropic: rate limited (429) after 3 attempts"),
        ("gemini", "500", "gemini: server error (500) after 3 attempts"),
    ],
)
def test_a_provider_that_keeps_failing_fails_the_job_with_a_clear_error(
    start_server, fake: FakeProvider, provider: str, fault: str, message: str
) -> None:
    fake.script = [fault] * 3
    server = serve_with(start_server, fake, provider)
    with server.client() as http:
        job = wait_job(http, submit(http, data="interviews.csv", provider=provider), timeout=60)
    assert job["status"] == "failed"
    assert job["error"] == message
    assert len(fake.requests) == 3
    assert SECRET_KEY not in server.log() and "Traceback" not in job["error"]


def test_a_slow_provider_leaves_the_api_responsive(start_server, fake: FakeProvider) -> None:
    fake.script = ["hold"]
    server = serve_with(start_server, fake, "gemini")
    with server.client() as http:
        job_id = submit(http, data="interviews.csv", provider="gemini")
        wait_for(lambda: fake.requests, what="the provider to be called")
        for _ in range(20):
            assert http.get(f"/api/v1/generate/{job_id}").json()["status"] == "running"
            assert http.get("/api/v1/health").status_code == 200
        fake.release.set()
        assert wait_job(http, job_id)["status"] == "completed"


def test_quotes_not_in_the_data_move_to_unverified_quotes(start_server, fake: FakeProvider) -> None:
    fake.script = ["invent_quote"]
    server = serve_with(start_server, fake, "openai")
    with server.client() as http:
        job = wait_job(http, submit(http, data="interviews.csv", count=2, provider="openai"))
    personas = job["result"]["personas"]
    assert all(p["unverified_quotes"] == ["I have never said anything like this sentence."] for p in personas)
    assert all("never said" not in q for p in personas for q in p["quotes"])
    assert "2 quote(s) not found verbatim" in job["result"]["metadata"]["warnings"][0]


def test_data_over_the_input_budget_is_generated_per_segment(start_server, fake: FakeProvider, workdir: Path) -> None:
    server = serve_with(start_server, fake, "anthropic")
    with server.client() as http:
        job = wait_job(
            http, submit(http, data="interviews.csv", count=4, provider="anthropic", config={"max_input_tokens": 1000})
        )
    assert job["status"] == "completed", job["error"]
    metadata = job["result"]["metadata"]
    assert metadata["engine"]["strategy"] == "segmented"
    persona_calls = [
        r for r in fake.requests if "Create exactly 1 distinct persona" in r["body"]["messages"][-1]["content"]
    ]
    assert len(persona_calls) == 4
    assert all("Other segments" in r["body"]["messages"][-1]["content"] for r in persona_calls)
    ids = sorted(pid for p in job["result"]["personas"] for pid in p["evidence"]["participants"])
    assert ids == [f"P{i:02d}" for i in range(1, 17)]
    assert metadata["usage"]["calls"] == len(fake.requests)
    for request in fake.requests:
        content = request["body"]["messages"][-1]["content"]
        assert len(content.split("<data>", 1)[1]) // 4 <= 1000


def test_a_segment_over_the_budget_is_condensed_first(start_server, fake: FakeProvider) -> None:
    server = serve_with(start_server, fake, "openai")
    with server.client() as http:
        job = wait_job(
            http,
            submit(
                http,
                data="interviews.csv",
                count=2,
                provider="openai",
                config={"strategy": "segmented", "max_input_tokens": 1000},
            ),
        )
    assert job["status"] == "completed", job["error"]
    prompts = [r["body"]["messages"][-1]["content"] for r in fake.requests]
    assert any("Extract the key findings" in p for p in prompts)
    assert any("Findings from participants" in p for p in prompts)


def test_a_provider_without_its_key_is_refused_at_submission(server: Server) -> None:
    with server.client() as http:
        response = http.post("/api/v1/generate", json={"data": "interviews.csv", "provider": "anthropic"})
        assert response.status_code == 400
        assert "ANTHROPIC_API_KEY" in response.json()["message"]
        assert http.get("/api/v1/generate").json() == []


def test_an_unknown_provider_is_a_422_listing_the_valid_ones(client: httpx.Client) -> None:
    response = client.post("/api/v1/generate", json={"data": "interviews.csv", "provider": "skynet"})
    assert response.status_code == 422
    assert "anthropic, openai, gemini, ollama, local" in response.json()["details"]["provider"]


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"temperature": 2.5}, "config.temperature"),
        ({"strategy": "clever"}, "config.strategy"),
        ({"max_tokens": 0}, "config.max_tokens"),
        ({"max_input_tokens": "lots"}, "config.max_input_tokens"),
    ],
)
def test_provider_settings_are_validated_at_submission(client: httpx.Client, config: dict, field: str) -> None:
    response = client.post("/api/v1/generate", json={"data": "interviews.csv", "config": config})
    assert response.status_code == 422 and field in response.json()["details"]


def test_with_no_provider_named_the_first_with_a_key_is_used(start_server, fake: FakeProvider) -> None:
    server = start_server("--rate-limit", "0", env={**fake.environment("openai"), **fake.environment("gemini")})
    with server.client() as http:
        job = wait_job(http, submit(http, data="interviews.csv"))
    assert job["result"]["metadata"]["provider"] == "openai"


def test_persona_provider_picks_the_default_and_model_variables_the_model(start_server, fake: FakeProvider) -> None:
    env = {
        **fake.environment("anthropic"),
        **fake.environment("ollama"),
        "PERSONA_PROVIDER": "ollama",
        "PERSONA_OLLAMA_MODEL": "qwen-test",
    }
    server = start_server("--rate-limit", "0", env=env)
    with server.client() as http:
        job = wait_job(http, submit(http, data="interviews.csv"))
        overridden = wait_job(http, submit(http, data="interviews.csv", model="other-model"))
    assert (job["result"]["metadata"]["provider"], job["result"]["metadata"]["model"]) == ("ollama", "qwen-test")
    assert fake.requests[1]["body"]["model"] == "other-model"
    assert overridden["status"] == "completed"


def test_providers_endpoint_lists_configuration_but_never_a_key(start_server, fake: FakeProvider) -> None:
    server = serve_with(start_server, fake, "gemini")
    with server.client() as http:
        listing = {p["name"]: p for p in http.get("/api/v1/providers").json()}
        text = http.get("/api/v1/providers").text
    assert set(listing) == {"local", "anthropic", "openai", "gemini", "ollama"}
    assert listing["gemini"]["configured"] is True and listing["anthropic"]["configured"] is False
    assert listing["anthropic"]["default_model"]
    assert SECRET_KEY not in text


def test_every_provider_names_the_sdk_imported_for_it_off_the_event_loop() -> None:
    import importlib

    import persona

    assert set(persona.SDK_MODULES) == set(persona.PROVIDER_NAMES) - {"local"}
    for module in set(persona.SDK_MODULES.values()):
        assert importlib.util.find_spec(module) is not None, module
