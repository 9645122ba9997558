"""Fake LLM providers on loopback that speak each provider's real wire format.

The real SDKs reach them through ANTHROPIC_BASE_URL, OPENAI_BASE_URL,
GOOGLE_GEMINI_BASE_URL and OLLAMA_HOST. Answers are built from the prompt's own
data, so quotes are real sentences unless a test asks for an invented one.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

from loopback import serve_on_loopback

PARTICIPANT = re.compile(r"^\[([^\]]+)\](?: \((.*)\))?$")


def participants_in(prompt: str) -> list[tuple[str, list[str]]]:
    """(id, sentences) for each participant block in the prompt's <data> section."""
    data = prompt.split("<data>\n", 1)[1].split("\n</data>", 1)[0]
    found: list[tuple[str, list[str]]] = []
    for line in data.splitlines():
        head = PARTICIPANT.match(line)
        if head:
            found.append((head.group(1), []))
        elif line.strip() and found:
            found[-1][1].extend(s.strip() for s in re.split(r"(?<=[.!?])\s+", line) if len(s.split()) >= 4)
    return found


def personas_answer(prompt: str, invent_quote: bool = False, count_offset: int = 0) -> dict[str, Any]:
    count = int(re.search(r"Create exactly (\d+) distinct persona", prompt).group(1)) + count_offset
    people = participants_in(prompt)
    size = max(1, len(people) // max(count, 1))
    personas = []
    for n in range(count):
        group = people[n * size : (n + 1) * size] if n < count - 1 else people[n * size :]
        group = group or people[-1:]
        sentences = [s for _, said in group for s in said] or ["I need this to work."]
        quotes = sentences[:2] + (["I have never said anything like this sentence."] if invent_quote else [])
        personas.append(
            {
                "name": f"Model Person {n + 1}",
                "title": f"The Segment {n + 1} User",
                "summary": "From the data.",
                "demographics": {"role": "participant", "age_range": "20-60", "context": "study"},
                "goals": sentences[:1],
                "pain_points": sentences[1:2] or sentences[:1],
                "behaviours": sentences[2:3] or sentences[:1],
                "quotes": quotes,
                "participants": [pid for pid, _ in group],
            }
        )
    return {"personas": personas}


def findings_answer(prompt: str) -> dict[str, Any]:
    said = [s for _, sentences in participants_in(prompt) for s in sentences]
    return {"findings": [f"Participants say: {s}" for s in said[:3]], "quotes": said[:2]}


class FakeProvider:
    """One server that answers as Anthropic, OpenAI (and Ollama) and Gemini alike.

    `script` is consumed one behaviour per request (then "ok"): "ok", "wrong_count",
    "missing_field", "invalid_json", "invent_quote", "429", "500" or "hold" (wait for
    `release`, then answer); or a function, called with the prompt and the answer "ok"
    would give, that returns the answer to send instead.
    """

    def __init__(self) -> None:
        self.script: list[str | Callable[[str, Any], Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with outer.lock:
                    outer.requests.append({"path": self.path, "headers": dict(self.headers.items()), "body": body})
                    behaviour = outer.script.pop(0) if outer.script else "ok"
                if behaviour == "hold":
                    outer.release.wait(60)
                    behaviour = "ok"
                if behaviour in ("429", "500"):
                    self.reply(
                        int(behaviour),
                        {"error": {"type": "fake", "message": "fake failure"}},
                        {"retry-after-ms": "20", "retry-after": "0"},
                    )
                    return
                prompt = prompt_of(self.path, body)
                if "Extract the key findings" in prompt:
                    answer: Any = findings_answer(prompt)
                else:
                    answer = personas_answer(
                        prompt, behaviour == "invent_quote", 1 if behaviour == "wrong_count" else 0
                    )
                fill_custom_fields(answer, schema_of(self.path, body))
                if callable(behaviour):
                    answer = behaviour(prompt, answer)
                if behaviour == "missing_field":
                    del answer["personas"][0]["goals"]
                text = "this is { not json" if behaviour == "invalid_json" else json.dumps(answer)
                self.reply(200, wire_answer(self.path, body, text, answer, behaviour == "invalid_json"))

            def reply(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd, self.url = serve_on_loopback(Handler)

    def environment(self, provider: str, key: str = "test-key-not-secret") -> dict[str, str]:
        return {
            "anthropic": {"ANTHROPIC_API_KEY": key, "ANTHROPIC_BASE_URL": self.url},
            "openai": {"OPENAI_API_KEY": key, "OPENAI_BASE_URL": f"{self.url}/v1"},
            "gemini": {"GEMINI_API_KEY": key, "GOOGLE_GEMINI_BASE_URL": self.url},
            "ollama": {"OLLAMA_HOST": self.url},
        }[provider]

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def schema_of(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The structured-output schema the request asks for, where each provider's wire format carries it."""
    if path.endswith("/messages"):
        return body["tools"][0]["input_schema"]
    if path.endswith("/chat/completions"):
        return body["response_format"]["json_schema"]["schema"]
    config = body.get("generationConfig", {})
    return config.get("responseJsonSchema") or config.get("response_json_schema") or {}


STANDARD = {"name", "title", "summary", "demographics", "goals", "pain_points", "behaviours", "quotes", "participants"}


def fill_custom_fields(answer: dict[str, Any], schema: dict[str, Any]) -> None:
    """As a model would: every field the schema requires beyond the standard ones gets a value of its type."""
    persona = schema.get("properties", {}).get("personas", {}).get("items", {})
    for name in set(persona.get("required", [])) - STANDARD:
        kind = persona["properties"][name]["type"]
        for number, item in enumerate(answer.get("personas", []), 1):
            item[name] = [f"{name} item of persona {number}"] if kind == "array" else f"{name} of persona {number}"


def prompt_of(path: str, body: dict[str, Any]) -> str:
    if path.endswith("/messages"):
        return body["messages"][-1]["content"]
    if path.endswith("/chat/completions"):
        return body["messages"][-1]["content"]
    return body["contents"][0]["parts"][0]["text"]


def wire_answer(path: str, body: dict[str, Any], text: str, answer: Any, as_text: bool) -> dict[str, Any]:
    if path.endswith("/messages"):
        block = (
            {"type": "text", "text": text}
            if as_text
            else {"type": "tool_use", "id": "toolu_fake", "name": body["tools"][0]["name"], "input": answer}
        )
        return {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [block],
            "stop_reason": "tool_use",
            "stop_sequence": None,
            "usage": {"input_tokens": 120, "output_tokens": 80},
        }
    if path.endswith("/chat/completions"):
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1,
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 120, "completion_tokens": 80, "total_tokens": 200},
        }
    return {
        "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 120, "candidatesTokenCount": 80, "totalTokenCount": 200},
    }
