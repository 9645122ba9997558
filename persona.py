"""Persona: user personas grounded in qualitative research data.

A self-hosted REST service (Starlette and SQLite), an offline persona engine and a
command line, in one module. The module stands alone: copy this file into a project,
install its dependencies, and ``python -m persona serve`` works; it carries its own
database schema.
"""

from __future__ import annotations

__version__ = "1.9.6"

import abc
import argparse
import asyncio
import base64
import codecs
import contextlib
import csv
import functools
import gc
import hashlib
import hmac
import html
import importlib.util
import io
import ipaddress
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import re
import secrets
import shutil
import socket
import ssl
import stat
import statistics
import sys
import tempfile
import time
import uuid
import weakref
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit
from urllib.parse import quote as url_quote

import aiosqlite
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("persona")
QUIET_LOGGERS = (
    "httpx",
    "httpcore",
    "httpx2",
    "httpcore2",
    "aiosqlite",
    "anthropic",
    "openai",
    "google_genai",
    "google.genai",
    "urllib3",
)

JSON = dict[str, Any]

MAX_BODY_BYTES = 1024 * 1024  # request bodies; larger data goes by path or URL
MAX_URL_BYTES = 50 * 1024 * 1024  # a data source fetched over http(s)
URL_TIMEOUT_S = 30.0  # the whole fetch of a data URL, connecting included
RATE_WINDOW_S = 60  # the rate limit counts requests per minute
PEER_CHECK_S = 1.0  # once other processes share the database, how long before a server looks again
PEER_ALONE_CHECK_S = 0.02  # while none does: a server that joins is seen within this, by then counted in the database
FINISHED_JOBS_KEPT = 64  # finished jobs whose answer bytes a process keeps: a finished job never changes
FLOCK_LAYOUT = "hhqqi"  # struct flock on Linux (type, whence, start, len, pid), for F_GETLK
IDEMPOTENCY_TTL_S = 24 * 3600  # how long an Idempotency-Key keeps its job
JOBS_RETRY_AFTER_S = 10  # Retry-After when a key's concurrent-jobs quota is full (no job's end is known)
JOBS_PER_PROCESS = 32  # jobs one server process runs at once (most wait on a provider or a URL)
ENGINE_WORKERS = 2  # offline-engine computations at once per server process
ENGINE_PROCESS_FROM = 2000  # participants from which the engine runs in a separate process
ENGINE_PROCESS_FROM_CHARS = 2_000_000  # or characters of text, whichever comes first
ENGINE_NICENESS = 10  # engine processes yield the CPU to the API when both want it
GC_YOUNG_THRESHOLD = 20_000  # net allocations between young collections; Python's default is 700
MAX_ATTEMPTS = 3  # runs of one job, counting those a crash interrupted
JOB_ID_ATTEMPTS = 5  # inserts of a new job, each under a new id should the last be taken
LEASE_S = 30.0  # a running job whose heartbeat is older than this is orphaned
PARTIAL_MAX_AGE_S = 3600.0  # a half-written output folder this old has no writer left (its files go in one go)
HEARTBEAT_S = 5.0  # how often a process renews the lease on its jobs
POLL_S = 0.5  # how often the runner looks for jobs other processes accepted
WRITE_CHECK_S = 1.0  # health trusts the last write's outcome for this long, then writes a probe
SAVE_RETRY_MAX_S = 10.0  # longest wait between tries to save a finished job while writes fail
MAX_WEBHOOKS = 1000  # registered webhooks; each finished job fans out to all of them
RETENTION_EVERY_S = 60.0  # how often the background loop applies the retention settings
RETENTION_BATCH = 500  # expired jobs deleted per transaction
DELIVERIES_AT_ONCE = 16  # webhook requests in flight from one process
DELIVERY_LOG_LIMIT = 100  # deliveries shown per webhook, newest first
LOCAL_MODEL = "persona-offline-1"  # the offline engine's name as a model


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


class ConfigError(ValueError):
    """A setting from the command line or the environment that cannot be used."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    log_level: str = "info"
    auth_tokens: tuple[str, ...] = ()
    admin_tokens: tuple[str, ...] = ()  # keys that may cancel, refine and manage every key's jobs and webhooks
    db: Path | str = Path("persona.db")  # a SQLite file, or a postgresql:// URL
    data_dir: Path = Path(".")
    output_dir: Path = Path("output")
    rate_limit: int = 100
    max_concurrent_jobs: int = 10
    allow_private_urls: bool | None = None  # None: allowed when listening on loopback
    webhook_secret: str | None = None
    webhook_retry_schedule: tuple[float, ...] = (5, 60, 300, 1800, 7200, 21600, 43200)
    webhook_timeout: float = 10.0
    max_source_mb: int = 50
    retention_days: float = 0.0  # 0: finished jobs are kept for ever
    attempts_kept: int = 20
    redact: str = "off"  # "on": jobs redact unless config.redact is false; "required": every job redacts
    allowed_hosts: tuple[str, ...] = ()  # Host names a loopback server answers besides localhost, 127.0.0.1, [::1]
    private: bool = False  # every read needs a token and shows each owner its own jobs, webhooks and uploads alone

    def __post_init__(self) -> None:
        if self.private and not (self.auth_tokens or self.admin_tokens):
            raise ConfigError(
                "--private / PERSONA_PRIVATE needs API keys (--auth-token): a private server tells its callers apart "
                "by their keys"
            )

    @property
    def on_loopback(self) -> bool:
        return self.host in ("localhost", "::1") or self.host.startswith("127.")

    @property
    def private_urls_allowed(self) -> bool:
        """On a laptop (loopback) webhooks to localhost are the point; elsewhere they are a risk."""
        if self.allow_private_urls is not None:
            return self.allow_private_urls
        return self.on_loopback


# Every setting has a variable, so that worker processes started by uvicorn see
# the same configuration as the command that started them.
ENV_VARS = {
    "host": "PERSONA_HOST",
    "port": "PERSONA_PORT",
    "workers": "PERSONA_WORKERS",
    "log_level": "PERSONA_LOG_LEVEL",
    "auth_tokens": "PERSONA_API_AUTH_TOKEN",
    "admin_tokens": "PERSONA_ADMIN_TOKEN",
    "db": "PERSONA_DB",
    "data_dir": "PERSONA_DATA_DIR",
    "output_dir": "PERSONA_OUTPUT_DIR",
    "rate_limit": "PERSONA_RATE_LIMIT",
    "max_concurrent_jobs": "PERSONA_MAX_CONCURRENT_JOBS",
    "allow_private_urls": "PERSONA_ALLOW_PRIVATE_URLS",
    "webhook_secret": "PERSONA_WEBHOOK_SECRET",
    "webhook_retry_schedule": "PERSONA_WEBHOOK_RETRY_SCHEDULE",
    "webhook_timeout": "PERSONA_WEBHOOK_TIMEOUT",
    "max_source_mb": "PERSONA_MAX_SOURCE_MB",
    "retention_days": "PERSONA_RETENTION_DAYS",
    "attempts_kept": "PERSONA_ATTEMPTS_KEPT",
    "redact": "PERSONA_REDACT",
    "allowed_hosts": "PERSONA_ALLOWED_HOSTS",
    "private": "PERSONA_PRIVATE",
}
INT_BOUNDS = {
    "port": (0, 65535),
    "workers": (1, 64),
    "rate_limit": (0, 10**9),
    "max_concurrent_jobs": (1, 10**6),
    "max_source_mb": (1, 10**6),
    "attempts_kept": (1, 10**6),
}
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def parse_setting(name: str, raw: str) -> Any:
    """Turn one option or variable into its typed value, naming both on error."""
    label = f"--{name.replace('_', '-')} / {ENV_VARS[name]}"
    if name in INT_BOUNDS:
        low, high = INT_BOUNDS[name]
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{label} must be a whole number, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{label} must be between {low} and {high}, got {value}")
        return value
    if name in ("auth_tokens", "admin_tokens"):
        return tuple(token.strip() for token in raw.split(",") if token.strip())
    if name == "allowed_hosts":
        return tuple(host.strip().lower().strip("[]") for host in raw.split(",") if host.strip())
    if name == "allow_private_urls":
        return parse_switch(label, raw)
    if name == "private":
        return bool(parse_switch(label, raw))
    if name == "redact":
        if raw.strip().lower() == "required":
            return "required"
        return "on" if parse_switch(label.replace(" / ", " (or required) / ", 1), raw) else "off"
    if name == "webhook_retry_schedule":
        return tuple(parse_seconds(label, part) for part in raw.split(",") if part.strip())
    if name == "webhook_timeout":
        seconds = parse_seconds(label, raw)
        if not 0 < seconds <= 300:
            raise ConfigError(f"{label} must be more than 0 and at most 300 seconds, got {raw!r}")
        return seconds
    if name == "webhook_secret":
        return raw or None
    if name == "retention_days":
        return parse_seconds(label, raw, unit="days (0 keeps jobs for ever)")
    if name == "db" and is_postgres_url(raw):
        return raw
    if name in ("db", "data_dir", "output_dir"):
        return Path(raw).expanduser()
    if name == "log_level":
        if raw.lower() not in LOG_LEVELS:
            raise ConfigError(f"{label} must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
        return raw.lower()
    return raw


def is_postgres_url(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


def shown_db(db: Path | str) -> str:
    """The database as logs and messages show it: a URL without its password.

    Masked on the raw text, up to the last @, so that a password holding an unescaped
    /, ? or # is masked too; so is any query parameter whose name says password.
    """
    if isinstance(db, Path):
        return str(db.resolve())
    scheme, _, rest = db.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.partition(':')[0]}:***@{host}"
    address, mark, query = rest.partition("?")
    if mark:
        pairs = [(key, "***" if "password" in key.lower() else value) for key, value in parse_qsl(query)]
        address += "?" + urlencode(pairs, safe="/*")
    return f"{scheme}://{address}"


def parse_switch(label: str, raw: str) -> bool | None:
    word = raw.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    if word in ("", "auto"):
        return None
    raise ConfigError(f"{label} must be 1 or 0 (true or false), got {raw!r}")


def parse_seconds(label: str, raw: str, unit: str = "seconds") -> float:
    """A finite amount from 0 up: seconds, or days as `unit` says."""
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{label} takes {unit} as numbers, got {raw!r}") from None
    if not 0 <= value < math.inf:
        raise ConfigError(f"{label} takes {unit} from 0 up, got {raw!r}")
    return value


def load_settings(overrides: Mapping[str, str | None] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from explicit options, then PERSONA_* variables, then defaults."""
    env = os.environ if env is None else env
    overrides = overrides or {}
    values: dict[str, Any] = {}
    for spec in fields(Settings):
        raw = overrides.get(spec.name)
        if raw is None:
            raw = env.get(ENV_VARS[spec.name])
        if raw is not None:
            values[spec.name] = parse_setting(spec.name, str(raw))
    return Settings(**values)


def settings_to_env(settings: Settings) -> dict[str, str]:
    """The variables that reproduce these settings in another process."""
    env = {}
    for spec in fields(Settings):
        value = getattr(settings, spec.name)
        if isinstance(value, tuple):
            env[ENV_VARS[spec.name]] = ",".join(map(str, value))
        elif value is None:
            env[ENV_VARS[spec.name]] = ""
        else:
            env[ENV_VARS[spec.name]] = str(int(value) if isinstance(value, bool) else value)
    return env


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

ERROR_CODES = {
    400: "invalid_input",
    401: "unauthorised",
    404: "not_found",
    405: "invalid_input",
    409: "invalid_input",
    413: "invalid_input",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    503: "internal_error",
}


class APIError(Exception):
    """Any refusal; the HTTP layer turns it into the reference's error envelope."""

    def __init__(
        self, status: int, message: str, details: JSON | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = ERROR_CODES.get(status, "invalid_input")
        self.message = message
        self.details = details or {}
        self.headers = dict(headers or {})


class StorageUnavailable(Exception):
    """The database cannot be used right now (it refused a write, or cannot be reached); nothing was saved.

    The only error a store lets out: the HTTP layer answers it with a 503, and the
    background loops wait it out.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GenerationError(Exception):
    """A job that cannot finish; its message becomes the job's `error` as it stands."""


class JobCancelled(Exception):
    """The job was cancelled or taken over while this process worked on it."""


def error_envelope(code: str, message: str, details: JSON | None = None) -> JSON:
    return {"success": False, "error": code, "message": message, "details": details or {}}


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------
# Request bodies are checked against small JSON Schema documents. The same
# documents describe the API, so what is documented is what is enforced.

PROVIDER_NAMES = ("anthropic", "openai", "gemini", "ollama", "local")
WEBHOOK_EVENTS = ("generation.completed", "generation.failed")
JOB_STATUSES = ("pending", "running", "completed", "failed")
DELIVERY_STATUSES = ("pending", "delivering", "delivered", "failed", "cancelled")  # the schemas' CHECK says the same
JOB_STAGES = (  # a running job's steps: the progress it reports on reaching each, and the workbench's words for it
    ("fetching", 1, "fetching the data"),
    ("loading", 5, "loading the data"),
    ("loaded", 30, "reading the participants"),
    ("segments", 35, "grouping the participants and writing each persona"),
    ("validated", 80, "checking the personas against the data"),
    ("quality", 82, "measuring the personas' quality"),
    ("built", 85, "writing the outputs"),
    ("written", 95, "saving the outputs"),
)
PROGRESS = {name: progress for name, progress, _ in JOB_STAGES}


def written_progress(done: int, total: int) -> int:
    """The progress a job reports once it has written `done` of its `total` personas, one a segment."""
    return PROGRESS["segments"] + (PROGRESS["validated"] - PROGRESS["segments"]) * done // total


def written_report(done: int, total: int) -> tuple[int, str]:
    """What a job reports once it has written `done` of its `total` personas: its progress and stage."""
    return written_progress(done, total), f"segment {done} of {total} done"


ProgressReport = Callable[[int, str], Coroutine[Any, Any, None]]  # a job reports its progress and stage through one


MAX_CUSTOM_FIELDS = 10
FIELD_NAME_PATTERN = "^[A-Za-z_][A-Za-z0-9_]*$"  # an identifier: a column, a key, a word in a prompt
TEXT_PATTERN = "^[^\x00]*$"  # no NUL: SQLite, files and logs cannot hold it faithfully
HTTP_URL_SCHEMA: JSON = {"type": "string", "format": "uri", "pattern": "^https?://[^\x00]*$", "maxLength": 2048}


INSTRUCTION_SCHEMA: JSON = {"type": "string", "minLength": 1, "maxLength": 2000, "pattern": TEXT_PATTERN}


def nullable(schema: JSON) -> JSON:
    """An optional field may also be sent as null, which means "not given"."""
    widened = {**schema, "type": [schema["type"], "null"]}
    if "enum" in schema:
        widened["enum"] = [*schema["enum"], None]
    return widened


GENERATE_SCHEMA: JSON = {
    "type": "object",
    "required": ["data"],
    "additionalProperties": False,
    "properties": {
        "data": {
            "oneOf": [
                {"type": "string", "minLength": 1, "maxLength": 4096, "pattern": TEXT_PATTERN},
                {"type": "array", "minItems": 1, "items": {"type": ["string", "object"]}},
            ],
            "description": "a path inside the data directory, an http(s) URL, or an array of records",
        },
        "count": nullable({"type": "integer", "minimum": 1, "maximum": 20, "default": 3}),
        "provider": nullable({"type": "string", "enum": list(PROVIDER_NAMES)}),
        "model": nullable({"type": "string", "minLength": 1, "maxLength": 200, "pattern": TEXT_PATTERN}),
        "config": nullable(
            {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "experiment": nullable(
                        {"type": "string", "minLength": 1, "maxLength": 200, "pattern": TEXT_PATTERN}
                    ),
                    "name": nullable(
                        {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 200,
                            "pattern": TEXT_PATTERN,
                            "description": "a name for the job, shown in the workbench",
                        }
                    ),
                    "complexity": nullable(
                        {"type": "string", "enum": ["simple", "moderate", "complex"], "default": "moderate"}
                    ),
                    "detail_level": nullable(
                        {"type": "string", "enum": ["minimal", "standard", "detailed"], "default": "standard"}
                    ),
                    "temperature": nullable({"type": "number", "minimum": 0, "maximum": 2}),
                    "max_tokens": nullable({"type": "integer", "minimum": 1, "maximum": 200000}),
                    "strategy": nullable(
                        {"type": "string", "enum": ["auto", "holistic", "segmented"], "default": "auto"}
                    ),
                    "max_input_tokens": nullable({"type": "integer", "minimum": 1000, "maximum": 10000000}),
                    "group_by": nullable(
                        {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 200,
                            "pattern": TEXT_PATTERN,
                            "description": "an attribute: one persona per value, the `count` largest groups",
                        }
                    ),
                    "instruction": nullable(
                        {**INSTRUCTION_SCHEMA, "description": "free text added to the prompt (LLM providers)"}
                    ),
                    "codebook": nullable(
                        {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 1000,
                            "pattern": TEXT_PATTERN,
                            "description": "a codebook in the data directory (a REFI-QDA .qdc, or a CSV of codes): "
                            "its themes are what each persona is reported against",
                        }
                    ),
                    "redact": nullable(
                        {
                            "type": "boolean",
                            "description": "replace personal data with placeholders "
                            "(default: the server's PERSONA_REDACT)",
                        }
                    ),
                    "fields": nullable(
                        {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_CUSTOM_FIELDS,
                            "description": "extra persona fields the model fills (LLM providers)",
                            "items": {
                                "type": "object",
                                "required": ["name", "description"],
                                "additionalProperties": False,
                                "properties": {
                                    "name": {
                                        "type": "string",
                                        "minLength": 1,
                                        "maxLength": 64,
                                        "pattern": FIELD_NAME_PATTERN,
                                    },
                                    "description": {
                                        "type": "string",
                                        "minLength": 1,
                                        "maxLength": 500,
                                        "pattern": TEXT_PATTERN,
                                    },
                                    "type": nullable(
                                        {"type": "string", "enum": ["string", "list"], "default": "string"}
                                    ),
                                },
                            },
                        }
                    ),
                    "groups": nullable(
                        {
                            "type": "object",
                            "minProperties": 1,
                            "maxProperties": 20,
                            "description": "group name -> participant ids: one persona per group, named after it",
                            "additionalProperties": {
                                "type": "array",
                                "minItems": 1,
                                "items": {"type": "string", "minLength": 1, "maxLength": 500},
                            },
                        }
                    ),
                },
                # both given (not null) is refused
                "not": {
                    "required": ["group_by", "groups"],
                    "properties": {"group_by": {"type": "string"}, "groups": {"type": "object"}},
                },
            }
        ),
        "webhook_url": nullable(HTTP_URL_SCHEMA),
    },
}
DEFAULT_COUNT: int = GENERATE_SCHEMA["properties"]["count"]["default"]
CONFIG_DEFAULTS: JSON = {
    name: spec["default"]
    for name, spec in GENERATE_SCHEMA["properties"]["config"]["properties"].items()
    if "default" in spec
}


def config_value(config: JSON, name: str) -> Any:
    """A request's config setting, or its default from the schema the request was checked against."""
    value = config.get(name)
    return CONFIG_DEFAULTS[name] if value is None else value


REFINE_SCHEMA: JSON = {
    "type": "object",
    "additionalProperties": False,
    "description": "at least one of data and instruction; "
    "count, provider, model and config default to the parent job's",
    "anyOf": [{"required": ["data"]}, {"required": ["instruction"]}],
    "properties": {
        "data": GENERATE_SCHEMA["properties"]["data"],
        "instruction": {**INSTRUCTION_SCHEMA, "description": "what to change, for an LLM provider"},
        **{key: GENERATE_SCHEMA["properties"][key] for key in ("count", "provider", "model", "config", "webhook_url")},
    },
}

WEBHOOK_SCHEMA: JSON = {
    "type": "object",
    "required": ["url"],
    "additionalProperties": False,
    "properties": {
        "url": HTTP_URL_SCHEMA,
        "events": nullable(
            {
                "type": "array",
                "minItems": 1,
                "uniqueItems": True,
                "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)},
            }
        ),
        "secret": nullable({"type": "string", "minLength": 1, "maxLength": 256, "pattern": TEXT_PATTERN}),
    },
}

JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}
TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "object": "an object",
    "array": "an array",
    "null": "null",
}

Check = Callable[[Any, str], dict[str, str]]  # every problem with a value, as {field path: message}


def compile_check(schema: JSON) -> Check:
    """The schema turned, once, into a function, so that a request pays only for the checks."""
    if "oneOf" in schema:
        return one_of_check([compile_check(option) for option in schema["oneOf"]], f"must be {schema['description']}")
    kinds = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
    by_kind: dict[type, Check] = {}
    if "string" in kinds:
        by_kind[str] = string_check(schema)
    if "array" in kinds:
        by_kind[list] = array_check(schema)
    if "object" in kinds:
        by_kind[dict] = object_check(schema)
    if "integer" in kinds or "number" in kinds:
        by_kind[int] = by_kind[float] = number_check(schema)
    enum = schema.get("enum")
    python_types = tuple(kind_type for kind in kinds for kind_type in JSON_TYPES[kind])
    bool_allowed = "boolean" in kinds  # true is an int to Python, but no integer to JSON

    integral_allowed = "integer" in kinds and "number" not in kinds  # JSON Schema: 18.0 is the integer 18

    def check(value: Any, path: str) -> dict[str, str]:
        if integral_allowed and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, python_types) or (isinstance(value, bool) and not bool_allowed):
            return {path: "must be " + " or ".join(TYPE_WORDS[kind] for kind in kinds if kind != "null")}
        if enum is not None and value not in enum:
            return {path: "must be one of: " + ", ".join(str(item) for item in enum if item is not None)}
        return by_kind.get(type(value), no_problems)(value, path)

    return check


def no_problems(value: Any, path: str) -> dict[str, str]:
    """True, false and null: nothing to check beyond their type."""
    return {}


def one_of_check(options: list[Check], message: str) -> Check:
    def check(value: Any, path: str) -> dict[str, str]:
        return {} if any(not option(value, path) for option in options) else {path: message}

    return check


def string_check(schema: JSON) -> Check:
    low, high = schema.get("minLength", 0), schema.get("maxLength", math.inf)
    too_short = "must not be empty" if low == 1 else f"must be at least {low} characters"
    is_url = schema.get("format") == "uri"
    pattern = re.compile(schema["pattern"]) if "pattern" in schema else None

    def check(value: str, path: str) -> dict[str, str]:
        problem = text_problem(value)
        if problem is None and len(value) < low:
            problem = too_short
        if problem is None and len(value) > high:
            problem = f"must be at most {high} characters"
        if problem is None and is_url:
            problem = http_url_problem(value)
        if problem is None and pattern is not None and not pattern.search(value):
            problem = f"must match {pattern.pattern}"
        return {path: problem} if problem else {}

    return check


def text_problem(value: str) -> str | None:
    """Text that SQLite, files and logs cannot hold faithfully is refused up front."""
    if "\x00" in value:
        return "must not contain NUL characters"
    return surrogate_problem(value)


def surrogate_problem(value: str) -> str | None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (it contains a lone surrogate)"
    return None


def http_url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return "must be an absolute http(s) URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an absolute http(s) URL, such as https://example.com/hook"
    if not url.isascii():
        return "must be plain ASCII (write an international domain name in its xn-- form)"
    if not re.fullmatch(
        r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]",
        parts.netloc.rpartition("@")[2].rsplit(":", 1)[0]
        if not parts.netloc.endswith("]")
        else parts.netloc.rpartition("@")[2],
    ):
        return "must have a valid host name"
    if parts.username is not None or parts.password is not None:
        return "must not contain credentials; use a webhook secret instead"
    if any(ch in url for ch in "\r\n\t ") or any(ord(ch) < 32 for ch in url):
        return "must not contain spaces or control characters"
    return None


def number_check(schema: JSON) -> Check:
    low, high = schema.get("minimum", -math.inf), schema.get("maximum", math.inf)

    def check(value: float, path: str) -> dict[str, str]:
        return {} if low <= value <= high else {path: f"must be between {low} and {high}"}

    return check


def array_check(schema: JSON) -> Check:
    fewest, most, unique = schema.get("minItems", 0), schema.get("maxItems", math.inf), schema.get("uniqueItems", False)
    item_check = compile_check(schema["items"])

    def check(value: list[Any], path: str) -> dict[str, str]:
        if len(value) < fewest:
            return {path: f"must have at least {fewest} item(s)"}
        if len(value) > most:
            return {path: f"must have at most {most} item(s)"}
        if unique and len({json.dumps(item, sort_keys=True) for item in value}) != len(value):
            return {path: "must not repeat items"}
        problems: dict[str, str] = {}
        for index, item in enumerate(value):
            problems.update(item_check(item, f"{path}[{index}]"))
        return problems

    return check


def object_check(schema: JSON) -> Check:
    if isinstance(schema.get("additionalProperties"), dict):
        return map_check(schema)
    if "properties" not in schema:
        return nested_text_problems
    properties = {name: compile_check(item) for name, item in schema["properties"].items()}
    required, closed = schema.get("required", []), schema.get("additionalProperties", True) is False
    unknown = "is not a known field; known fields: " + ", ".join(properties)
    exclusive = schema.get("not", {}).get("required", [])
    alternatives = [option["required"] for option in schema.get("anyOf", [])]  # at least one of these sets of fields
    integers = {name for name, item in schema["properties"].items() if "integer" in item.get("type", ())}

    def check(value: JSON, path: str) -> dict[str, str]:
        problems: dict[str, str] = {}
        prefix = f"{path}." if path else ""
        for name in required:
            if value.get(name) is None:
                problems[prefix + name] = "is required"
        for name, item in value.items():
            item_check = properties.get(name)
            if item_check is None:
                if closed:
                    problems[prefix + name] = unknown
            elif item is not None:
                problems.update(item_check(item, prefix + name))
                if name in integers and isinstance(item, float) and item.is_integer():
                    value[name] = int(item)  # checked as the integer it is; the job sees an int
        if exclusive and all(value.get(name) is not None for name in exclusive):
            problems[prefix + exclusive[-1]] = f"cannot be given with {', '.join(exclusive[:-1])}; give one of them"
        if alternatives and not any(all(value.get(name) is not None for name in names) for names in alternatives):
            others = " or ".join(", ".join(names) for names in alternatives[1:])
            problems[prefix + alternatives[0][0]] = f"is required unless {others} is given"
        return problems

    return check


def map_check(schema: JSON) -> Check:
    """An object of free keys whose values share one schema, such as `groups`."""
    value_check = compile_check(schema["additionalProperties"])
    fewest, most = schema.get("minProperties", 0), schema.get("maxProperties", math.inf)

    def check(value: JSON, path: str) -> dict[str, str]:
        if not fewest <= len(value) <= most:
            return {path: f"must have {fewest} to {most} entries"}
        problems: dict[str, str] = {}
        for key, item in value.items():
            problem = text_problem(key) or (None if key.strip() else "keys must not be blank")
            if problem:
                return {path: problem}
            problems.update(value_check(item, f"{path}.{key}"))
        return problems

    return check


def nested_text_problems(value: Any, path: str) -> dict[str, str]:
    """Free-form objects (inline records) must hold storable text; NUL is dropped on loading."""
    if isinstance(value, str):
        problem = surrogate_problem(value)
        return {path: problem} if problem else {}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    problems: dict[str, str] = {}
    for key, item in items:
        key_problem = surrogate_problem(key) if isinstance(key, str) else None
        if key_problem:
            problems[f"{path}.{key!r}"] = "keys " + key_problem
        problems.update(nested_text_problems(item, f"{path}[{key!r}]" if isinstance(key, int) else f"{path}.{key}"))
    return problems


def validation_failed(problems: Mapping[str, str]) -> APIError:
    """The 422 for request fields that fail their checks: each named in the message and in `details`."""
    summary = "; ".join(f"{name or 'body'} {message}" for name, message in problems.items())
    return APIError(422, f"Request validation failed: {summary}", dict(problems))


def validated(body: JSON, check: Check) -> JSON:
    """The body with null optional fields dropped, or a 422 naming every bad field."""
    problems = check(body, "")
    if problems:
        raise validation_failed(problems)
    return {name: value for name, value in body.items() if value is not None}


GENERATE_CHECK = compile_check(GENERATE_SCHEMA)
WEBHOOK_CHECK = compile_check(WEBHOOK_SCHEMA)
REFINE_CHECK = compile_check(REFINE_SCHEMA)


# ---------------------------------------------------------------------------
# Store: what both databases share
# ---------------------------------------------------------------------------

JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # made once: dumps() makes one per call


def json_bytes(value: Any) -> bytes:
    return JSON_ENCODER.encode(value).encode("utf-8")


def epoch_to_iso(clock: float) -> str:
    return datetime.fromtimestamp(clock, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_now() -> str:
    """ISO 8601 in UTC to the second, formatted once per second (it is on every write)."""
    second = int(time.time())
    if UTC_NOW_CACHE[0] != second:
        UTC_NOW_CACHE[:] = [second, epoch_to_iso(second)]
    return UTC_NOW_CACHE[1]


UTC_NOW_CACHE: list[Any] = [0, ""]


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


JOB_SERIALS = itertools.count(secrets.randbits(16))  # this process's run of job id endings, from a random start


def new_job_id() -> str:
    """A job id: 8 hex digits of milliseconds (wrapping every 49 days), then 4 of this process's serial.

    Ids made close in time sit close in the job_id index, so a commit of many new jobs
    rewrites a few index pages rather than one page per job; with random ids, inserts
    slowed down as the table grew. One process never repeats an id; two processes may,
    rarely, in the same millisecond, and the insert then retries under new ids.
    """
    return f"job-{int(time.time() * 1000) & 0xFFFFFFFF:08x}{next(JOB_SERIALS) & 0xFFFF:04x}"


def own_experiment(job_id: str) -> str:
    """A job without an experiment name is an experiment of its own, named after it."""
    return f"exp-{job_id[4:]}"


def job_experiment(job: NewJob, named: Mapping[str, str], job_id: str) -> str:
    """A new job's experiment: its parent's, the one its name found in `named`, or its own."""
    return job.experiment_id or named.get(job.experiment or "") or own_experiment(job_id)


class Coalescer:
    """Calls made while one batch is in flight wait together for the next single batch.

    Each trip to the database costs a round trip; under load this turns many trips
    into one, and with no load a call goes at once, alone.
    """

    def __init__(self, run_batch: Callable[[list[Any]], Awaitable[dict[Any, Any]]]) -> None:
        self.run_batch = run_batch
        self.waiting: dict[Any, list[asyncio.Future[Any]]] = {}
        self.busy = False

    async def get(self, key: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(key, []).append(future)
        if not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.waiting:
                batch, self.waiting = self.waiting, {}
                try:
                    results = await self.run_batch(list(batch))
                except Exception as exc:  # every caller in the batch gets the failure
                    results = {key: exc for key in batch}
                for key, futures in batch.items():
                    for future in futures:
                        if not future.done():
                            outcome = results.get(key)
                            if isinstance(outcome, Exception):
                                future.set_exception(outcome)
                            else:
                                future.set_result(outcome)
        finally:
            self.busy = False


class RateHits:
    """Requests counted in the database, those of one client arriving together in one write.

    Each request still gets its own exact count: a batch of n adds n, and its requests
    take the counts that lead up to the total, in the order they came.
    """

    def __init__(self, count: Callable[[str, int], Awaitable[Any]]) -> None:
        self.count = count  # adds hits to a client's window; returns the row (hits, window_start)
        self.hits = Coalescer(self._count_batch)
        self.waiting: Counter[str] = Counter()

    async def hit(self, client: str) -> tuple[int, float]:
        self.waiting[client] += 1
        total, window_start, place = await self.hits.get(client)
        return total - place.pop(), window_start + RATE_WINDOW_S

    async def _count_batch(self, clients: list[str]) -> dict[str, Any]:
        batch = {client: self.waiting.pop(client) for client in clients}  # before any await: later hits wait
        counted = {}
        for client, hits in batch.items():
            row = await self.count(client, hits)
            counted[client] = (row["hits"], row["window_start"], list(range(hits)))
        return counted


@dataclass
class NewJob:
    """A submission waiting for the next batch of inserts."""

    owner: str
    request: str  # as JSON text
    limit: int  # the owner's concurrent-jobs quota
    experiment: str | None  # config.experiment
    idempotency: tuple[str, str] | None  # (Idempotency-Key, hash of the body)
    experiment_id: str | None = None  # a refinement joins its parent's experiment


@dataclass
class Admission:
    """What became of a submission: its job, or why it has none."""

    job_id: str | None = None
    replayed: bool = False  # an Idempotency-Key found the job an earlier request made
    conflict: bool = False  # the Idempotency-Key came before with another body
    active: int = 0  # refused for the quota: the owner's jobs pending or running


class IdTaken(Exception):
    """A new job's id was already in the database; the batch goes in again under new ids."""


@dataclass
class AdmissionPlan:
    """A batch of submissions sorted out before its insert: replays, conflicts and jobs to insert.

    Within one batch, a second submission with an earlier one's Idempotency-Key
    follows it: it gets the earlier one's job, or its refusal.
    """

    decided: dict[str, Admission]
    inserts: dict[str, NewJob]
    follows: dict[str, str]

    @staticmethod
    def looked_up(jobs: dict[str, NewJob]) -> dict[str, NewJob]:
        """The submissions whose fate the database decides: each without a key, and the first with each key."""
        seen: set[tuple[str, str]] = set()
        firsts = {}
        for key, job in jobs.items():
            owner_key = job.idempotency and (job.owner, job.idempotency[0])
            if owner_key not in seen:
                firsts[key] = job
            if owner_key:
                seen.add(owner_key)
        return firsts

    @classmethod
    def of(cls, jobs: dict[str, NewJob], stored: Mapping[tuple[str, str], tuple[str, str]]) -> AdmissionPlan:
        """`stored` maps (owner, key) to (body hash, job id) for the keys the database holds."""
        plan = cls({}, {}, {})
        first: dict[tuple[str, str], str] = {}  # (owner, key) -> the batch's first submission with it
        for key, job in jobs.items():
            if job.idempotency is None:
                plan.inserts[key] = job
                continue
            owner_key, body_hash = (job.owner, job.idempotency[0]), job.idempotency[1]
            if owner_key in stored:
                stored_hash, job_id = stored[owner_key]
                plan.decided[key] = (
                    Admission(job_id, replayed=True) if stored_hash == body_hash else Admission(conflict=True)
                )
            elif owner_key in first:
                plan.follows[key] = first[owner_key]
            else:
                first[owner_key] = key
                plan.inserts[key] = job
        return plan

    def kept_keys(self, ids: dict[str, str], inserted: set[str]) -> list[tuple[str, ...]]:
        """(owner, key, body hash, job id) for each new job whose Idempotency-Key is to be kept."""
        return [
            (job.owner, *job.idempotency, ids[key])
            for key, job in self.inserts.items()
            if job.idempotency and ids[key] in inserted
        ]

    def refused_owners(self, ids: dict[str, str], inserted: set[str]) -> set[str]:
        """Owners of jobs the insert left out: their quota was full."""
        return {job.owner for key, job in self.inserts.items() if ids[key] not in inserted}

    def settle(
        self, jobs: dict[str, NewJob], ids: dict[str, str], inserted: set[str], active: Mapping[str, int]
    ) -> dict[str, Admission]:
        """Every submission's outcome, once the insert is done; `active` counts each refused owner's jobs."""
        outcomes = {**self.decided}
        for key, job in self.inserts.items():
            outcomes[key] = Admission(ids[key]) if ids[key] in inserted else Admission(active=active[job.owner])
        for key, leader in self.follows.items():
            found = outcomes[leader]
            same_body = jobs[key].idempotency == jobs[leader].idempotency
            if found.job_id is None or not same_body:
                outcomes[key] = found if same_body else Admission(conflict=True)
            else:
                outcomes[key] = Admission(found.job_id, replayed=True)
        return outcomes


def event_payload(job_id: str, event: str, data: JSON, now: str) -> str:
    """A webhook delivery's body, as its receivers get it."""
    return json.dumps(
        {"event": event, "timestamp": now, "data": {"job_id": job_id, **data}},
        ensure_ascii=False,
        separators=(",", ":"),
    )


def completed_data(result: JSON) -> JSON:
    return {
        "personas_count": len(result["personas"]),
        "experiment_id": result["experiment_id"],
        "output_path": result["output_path"],
    }


def requeue_error() -> str:
    return f"interrupted {MAX_ATTEMPTS} times (the server stopped while the job ran); not retried again"


JOB_FIELDS = ("job_id", "status", "progress", "created_at", "started_at", "completed_at", "error")


def job_from_row(row: Any, with_result: bool = False) -> JSON:
    job = {name: row[name] for name in JOB_FIELDS}
    if with_result:
        job["result"] = json.loads(row["result"]) if row["result"] else None
    return job


def job_with_request(row: Any) -> JSON:
    return {**job_from_row(row, with_result=True), "request": json.loads(row["request"])}


def job_json_from_row(row: Any) -> bytes:
    """The job as response bytes, its stored result spliced in rather than parsed and re-encoded."""
    head = json_bytes(job_from_row(row))
    return head[:-1] + b',"result":' + (row["result"].encode() if row["result"] else b"null") + b"}"


def delivery_from_row(row: Any) -> JSON:
    status = row["status"]
    return {
        "delivery_id": row["delivery_id"],
        "event": row["event"],
        "job_id": row["job_id"],
        "status": status,
        "created_at": row["created_at"],
        "next_retry_at": epoch_to_iso(row["next_attempt_at"]) if status == "pending" else None,
        "attempts": json.loads(row["attempts"]) if row["attempts"] else [],
    }


def claimed_job(rows: list[Any]) -> JSON | None:
    """The job a claim returned, its request parsed; None when nothing was pending."""
    return {**dict(rows[0]), "request": json.loads(rows[0]["request"])} if rows else None


def claimed_delivery(row: Any) -> JSON:
    return {name: row[name] for name in ("delivery_id", "event", "url", "secret", "payload", "attempts")}


def webhook_from_row(row: Any) -> JSON:
    return {
        "webhook_id": row["webhook_id"],
        "url": row["url"],
        "events": json.loads(row["events"]),
        "created_at": row["created_at"],
    }


Gone = Callable[[str, float | None], bool]  # whether a claimer is gone, from its id and seconds since it was heard


class Store(abc.ABC):
    """What both stores share: batching of reads and submissions, and what health knows of writes.

    The subclasses hold the SQL; every other part of the module goes through their
    methods, and only StorageUnavailable leaves them.
    """

    def __init__(self, job_webhook_secret: str | None) -> None:
        self.job_webhook_secret = job_webhook_secret  # signs each job's own webhook_url
        self.job_reads = Coalescer(self._read_jobs)
        self.finished_jobs: dict[tuple[str, str], bytes] = {}  # (job id, completed_at) -> its answer, oldest first
        self.listings = Coalescer(self._list_jobs_json)
        self.pings = Coalescer(self._ping)
        self.new_jobs: dict[str, NewJob] = {}
        self.job_inserts = Coalescer(self._admit)
        self.write_trouble: str | None = None  # why the last write failed, until one succeeds
        self.write_seen_at = -WRITE_CHECK_S  # monotonic time of the last write's outcome
        self.write_probes = Coalescer(self._probe)
        self.rate_hits = RateHits(self._count_hits)

    async def create_job(
        self,
        owner: str,
        request: JSON,
        limit: int,
        idempotency: tuple[str, str] | None,
        experiment_id: str | None = None,
    ) -> Admission:
        """Queue a job within its owner's quota, or find the one an Idempotency-Key already made.

        Submissions made together go in together: one transaction for the batch, in
        which each owner's quota is checked, so no number of processes can overshoot it.
        """
        key = new_job_id()
        experiment = request.get("config", {}).get("experiment")
        self.new_jobs[key] = NewJob(owner, json.dumps(request), limit, experiment, idempotency, experiment_id)
        return await self.job_inserts.get(key)

    async def _admit(self, keys: list[str]) -> dict[str, Admission]:
        """Insert a batch; each job goes in under the id it was given, or, should one be taken, all under new ones."""
        jobs = {key: self.new_jobs.pop(key) for key in keys}
        ids = {key: key for key in jobs}
        for _ in range(JOB_ID_ATTEMPTS):
            with contextlib.suppress(IdTaken):
                return await self._admit_batch(jobs, ids)
            ids = {key: new_job_id() for key in jobs}
        raise StorageUnavailable(f"no free job id after {JOB_ID_ATTEMPTS} tries")

    async def get_job(self, job_id: str) -> JSON | None:
        row = await self.job_reads.get(job_id)
        return job_from_row(row, with_result=True) if row else None

    async def get_job_json(self, job_id: str) -> bytes | None:
        """The job as response bytes. A finished job never changes, so its bytes are made once and
        kept; its row is still read, so a job retention deleted is gone at once."""
        row = await self.job_reads.get(job_id)
        if row is None or row["status"] not in ("completed", "failed"):
            return job_json_from_row(row) if row else None
        key = (job_id, row["completed_at"])
        body = self.finished_jobs.get(key)
        if body is None:
            body = self.finished_jobs[key] = job_json_from_row(row)
            if len(self.finished_jobs) > FINISHED_JOBS_KEPT:
                del self.finished_jobs[next(iter(self.finished_jobs))]
        return body

    async def job_owner(self, job_id: str) -> str | None:
        """Who made a job: an API key's fingerprint, a team, or a client address; None if there is no such job."""
        row = await self.job_reads.get(job_id)
        return row["owner"] if row else None

    async def list_jobs_json(
        self, status: str | None, limit: int, offset: int, owner: str | None = None
    ) -> tuple[bytes, int, int]:
        """A page of jobs (every owner's, or one owner's) as response bytes, with the total and the page's length.

        Identical listings asked for at the same moment share one query and one encoding.
        """
        return await self.listings.get((status, limit, offset, owner))

    async def _list_jobs_json(self, keys: list[tuple[str | None, int, int, str | None]]) -> dict[Any, Any]:
        pages = {}
        for key in keys:
            jobs, total = await self.list_jobs(*key)
            pages[key] = (json_bytes(jobs), total, len(jobs))
        return pages

    async def ping(self) -> None:
        """Prove the database answers; concurrent health checks share one query."""
        await self.pings.get(None)

    async def _ping(self, _: list[Any]) -> dict[Any, Any]:
        await self._read("SELECT 1")
        return {None: True}

    async def writes_fail(self) -> str | None:
        """Why writes fail, if they do: the last write's outcome, or a probe write when that is old."""
        if time.monotonic() - self.write_seen_at >= WRITE_CHECK_S:
            await self.write_probes.get(None)
        return self.write_trouble

    async def _probe(self, _: list[Any]) -> dict[Any, Any]:
        with contextlib.suppress(StorageUnavailable):
            await self._probe_write()
        return {None: None}

    def _saw_write(self, trouble: str | None) -> None:
        self.write_trouble, self.write_seen_at = trouble, time.monotonic()

    async def rate_hit(self, client: str) -> tuple[int, float]:
        """Count one request of a client: (requests in its window, when the window resets)."""
        return await self.rate_hits.hit(client)

    async def complete_job(self, job_id: str, worker: str, result: JSON) -> bool:
        return await self._finish(
            job_id,
            worker,
            "completed",
            json_bytes(result).decode("utf-8"),
            "generation.completed",
            completed_data(result),
        )

    async def fail_job(self, job_id: str, worker: str, error: str) -> bool:
        return await self._finish(job_id, worker, "failed", error, "generation.failed", {"error": error})

    async def requeue_orphans(self, worker: str, gone: Gone) -> list[tuple[str, str]]:
        """Requeue running jobs whose claimer is gone, or fail those out of attempts: (job id, new status).

        Each update names the claim it ends, so an orphan is requeued once, by whichever
        process notices first.
        """
        changed = []
        for row in await self._running_claims(worker):
            if gone(row["claimed_by"], row["idle"]):
                status = await self._requeue(row["job_id"], row["claimed_by"])
                if status:
                    changed.append((row["job_id"], status))
        return changed

    async def release_orphan_deliveries(self, worker: str, gone: Gone) -> None:
        """Deliveries claimed by a claimer that is gone go back to the outbox."""
        for row in await self._delivering(worker):
            if gone(row["claimed_by"], row["idle"]):
                await self.release_delivery(row["delivery_id"], row["claimed_by"])

    # What each store does in its own SQL: every caller goes through these declarations.

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create or upgrade the schema; the store is usable once this returns."""

    @abc.abstractmethod
    def listen(self, on_news: Callable[[str], None]) -> None:
        """Call `on_news` when another process has news (a job queued or cancelled, a delivery due); a hint only."""

    @abc.abstractmethod
    def others(self) -> bool:
        """Whether other server processes use this database now."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connections (and, on SQLite, the file that tells other processes this one uses it)."""

    @abc.abstractmethod
    async def _read(self, sql: str) -> list[Any]:
        """Rows of one read-only statement."""

    @abc.abstractmethod
    def missing(self) -> str | None:
        """Why the database cannot be trusted with writes now, if it cannot; None when it can."""

    @abc.abstractmethod
    async def _probe_write(self) -> None:
        """Write one row, to learn whether writes succeed (health's probe)."""

    @abc.abstractmethod
    async def active_jobs(self, owner: str) -> int:
        """How many pending or running jobs an owner has."""

    @abc.abstractmethod
    async def _admit_batch(self, jobs: dict[str, NewJob], ids: dict[str, str]) -> dict[str, Admission]:
        """Insert a batch of submissions in one transaction: replays found, experiments named, jobs within quotas."""

    @abc.abstractmethod
    async def _read_jobs(self, job_ids: list[str]) -> dict[str, Any]:
        """The rows of these jobs, by id (absent ids left out)."""

    @abc.abstractmethod
    async def list_jobs(
        self, status: str | None, limit: int, offset: int, owner: str | None = None
    ) -> tuple[list[JSON], int]:
        """A page of jobs in the order they were submitted, optionally of one status or one owner's alone,
        with how many there are."""

    @abc.abstractmethod
    async def list_experiments(self, limit: int, offset: int, owner: str | None = None) -> tuple[list[JSON], int]:
        """A page of experiments, newest first, with how many there are; with `owner`, the experiments
        holding its jobs, each counting only those."""

    @abc.abstractmethod
    async def get_experiment(self, experiment_id: str, owner: str | None = None) -> JSON | None:
        """An experiment with its jobs (or `owner`'s jobs in it), oldest first, as the job list shows them;
        None if it has none."""

    @abc.abstractmethod
    async def recent_jobs(self, limit: int, owner: str | None = None) -> list[JSON]:
        """The newest jobs (or `owner`'s) with their requests and results, for the workbench's list."""

    @abc.abstractmethod
    async def job_request(self, job_id: str) -> tuple[JSON, str] | None:
        """The request a job was made with, and its experiment; a refinement starts from them."""

    @abc.abstractmethod
    async def claim_job(self, worker: str) -> JSON | None:
        """The oldest pending job, now running here; None when none is pending."""

    @abc.abstractmethod
    async def begin_attempt(self, job_id: str, worker: str) -> bool:
        """Count an attempt of a job this worker still holds."""

    @abc.abstractmethod
    async def set_progress(self, job_id: str, worker: str, progress: int) -> bool:
        """Record progress (and renew the lease); False once the job is no longer this worker's."""

    @abc.abstractmethod
    async def heartbeat(self, worker: str, job_ids: Iterable[str]) -> set[str]:
        """Renew the lease on these jobs, which this worker runs; returns those it still holds.

        Only jobs whose work is alive here are renewed: one whose task died lets its claim
        lapse, and is run again.
        """

    @abc.abstractmethod
    async def _running_claims(self, worker: str) -> list[Any]:
        """The running jobs not claimed by `worker`: their claimer and seconds since it was heard."""

    @abc.abstractmethod
    async def _requeue(self, job_id: str, claimed_by: str) -> str | None:
        """Requeue a job `claimed_by` still holds, or fail it out of attempts.

        Returns its new status, or None when `claimed_by` no longer holds it."""

    @abc.abstractmethod
    async def release_job(self, job_id: str, worker: str, attempt_begun: bool) -> None:
        """Hand back a job a stop cut short; an attempt that began is given back with it."""

    @abc.abstractmethod
    async def cancel_job(self, job_id: str) -> bool:
        """Cancel a pending or running job; False if it is not one."""

    @abc.abstractmethod
    async def _finish(self, job_id: str, worker: str, status: str, outcome: str, event: str, data: JSON) -> bool:
        """End a job and queue its webhook deliveries in one transaction (the outbox)."""

    @abc.abstractmethod
    async def purge_expired(self) -> None:
        """Delete idempotency keys and rate-limit windows that have expired."""

    @abc.abstractmethod
    async def purge_finished_jobs(self, before: str, batch: int) -> tuple[int, list[str]]:
        """Delete finished jobs completed before `before`, with their deliveries and attempts.

        Returns how many went and their output paths, for their folders to go too.
        """

    @abc.abstractmethod
    async def trim_attempts(self, kept: int) -> None:
        """Keep the last `kept` attempts of each delivery."""

    @abc.abstractmethod
    async def create_webhook(
        self, url: str, events: list[str], secret: str | None, owner: str | None = None
    ) -> JSON | None:
        """Register a webhook that hears `owner`'s jobs alone, or every job without one.

        None when MAX_WEBHOOKS are registered already."""

    @abc.abstractmethod
    async def webhook_owner(self, webhook_id: str) -> str | None:
        """Who registered a webhook on a server with API keys; None for one that hears every job."""

    @abc.abstractmethod
    async def get_webhook(self, webhook_id: str) -> JSON | None:
        """A registered webhook, without its secret; None if there is none."""

    @abc.abstractmethod
    async def list_webhooks(self, owner: str | None = None) -> list[JSON]:
        """Every registered webhook (or those `owner` registered), oldest first, without secrets."""

    @abc.abstractmethod
    async def delete_webhook(self, webhook_id: str) -> bool:
        """Delete a webhook and stop its deliveries that are still due."""

    @abc.abstractmethod
    async def claim_deliveries(self, worker: str, limit: int) -> list[JSON]:
        """Up to `limit` deliveries that are due, now being delivered by `worker`."""

    @abc.abstractmethod
    async def settle_delivery(self, delivery_id: str, worker: str, attempt: JSON, status: str, delay: float) -> None:
        """Log one attempt and set what happens next, together: `status`, and the next try in `delay` seconds."""

    @abc.abstractmethod
    async def release_delivery(self, delivery_id: str, worker: str) -> None:
        """Hand back a delivery `worker` holds, due again at once."""

    @abc.abstractmethod
    async def _delivering(self, worker: str) -> list[Any]:
        """Deliveries being delivered by others: their claimer and seconds since it claimed."""

    @abc.abstractmethod
    async def list_deliveries(self, webhook_id: str, limit: int) -> list[JSON]:
        """A webhook's latest deliveries with their attempts, newest first."""

    @abc.abstractmethod
    async def retry_delivery(self, webhook_id: str, delivery_id: str, attempts: int) -> str | None:
        """Send a failed delivery once more; returns None, or the status that forbids it."""

    @abc.abstractmethod
    async def _count_hits(self, client: str, hits: int) -> Any:
        """Count `hits` requests of a client in its window, a new one if it ended: the window's start and its hits."""


# ---------------------------------------------------------------------------
# Store: SQLite, the default (one file; the servers that share it share one host)
# ---------------------------------------------------------------------------

SCHEMA_VERSION = 7  # every step so far only adds tables and indexes, so the whole script upgrades
SCHEMA = """\
-- Persona's SQLite schema. persona.py carries this same text and applies it;
-- a test keeps the two equal. Timestamps shown to clients are ISO 8601 UTC
-- text; times used only for arithmetic (leases, windows) are epoch seconds.

CREATE TABLE IF NOT EXISTS jobs (
    seq           INTEGER PRIMARY KEY,
    job_id        TEXT NOT NULL UNIQUE,
    owner         TEXT NOT NULL,
    status        TEXT NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'running', 'completed', 'failed')),
    progress      INTEGER NOT NULL DEFAULT 0,
    request       TEXT NOT NULL,
    experiment_id TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    started_at    TEXT,
    completed_at  TEXT,
    error         TEXT,
    result        TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    claimed_by    TEXT,
    heartbeat_at  REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_by_experiment ON jobs (experiment_id, seq);

CREATE TABLE IF NOT EXISTS experiments (
    name          TEXT PRIMARY KEY,
    experiment_id TEXT NOT NULL UNIQUE,
    created_at    TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS idempotency_keys (
    owner      TEXT NOT NULL,
    key        TEXT NOT NULL,
    body_hash  TEXT NOT NULL,
    job_id     TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (owner, key)
);

CREATE TABLE IF NOT EXISTS webhooks (
    seq        INTEGER PRIMARY KEY,
    webhook_id TEXT NOT NULL UNIQUE,
    url        TEXT NOT NULL,
    events     TEXT NOT NULL,
    secret     TEXT,
    created_at TEXT NOT NULL
);

-- Who registered a webhook on a server with API keys: the webhook hears that owner's jobs
-- alone. A webhook without a row here (registered with auth off) hears every job.
CREATE TABLE IF NOT EXISTS webhook_owners (
    webhook_id TEXT PRIMARY KEY,
    owner      TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS rate_limits (
    client       TEXT PRIMARY KEY,
    window_start REAL NOT NULL,
    hits         INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS deliveries (
    seq             INTEGER PRIMARY KEY,
    delivery_id     TEXT NOT NULL UNIQUE,
    webhook_id      TEXT,
    job_id          TEXT NOT NULL,
    event           TEXT NOT NULL,
    url             TEXT NOT NULL,
    secret          TEXT,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivering', 'delivered', 'failed', 'cancelled')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    claimed_by      TEXT,
    claimed_at      REAL,
    created_at      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_by_webhook ON deliveries (webhook_id, seq);

CREATE TABLE IF NOT EXISTS delivery_attempts (
    delivery_id  TEXT NOT NULL,
    attempted_at TEXT NOT NULL,
    http_status  INTEGER,
    error        TEXT,
    duration_ms  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS delivery_attempts_by_delivery ON delivery_attempts (delivery_id);
CREATE INDEX IF NOT EXISTS deliveries_by_job ON deliveries (job_id);

-- Jobs per owner and status, kept by triggers, so that limits and totals never count rows.
CREATE TABLE IF NOT EXISTS job_counts (
    owner  TEXT NOT NULL,
    status TEXT NOT NULL,
    n      INTEGER NOT NULL,
    PRIMARY KEY (owner, status)
);
CREATE TRIGGER IF NOT EXISTS job_counts_on_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO job_counts (owner, status, n) VALUES (NEW.owner, NEW.status, 1)
    ON CONFLICT (owner, status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS job_counts_on_status AFTER UPDATE OF status ON jobs
WHEN OLD.status != NEW.status BEGIN
    UPDATE job_counts SET n = n - 1 WHERE owner = OLD.owner AND status = OLD.status;
    INSERT INTO job_counts (owner, status, n) VALUES (NEW.owner, NEW.status, 1)
    ON CONFLICT (owner, status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS job_counts_on_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_counts SET n = n - 1 WHERE owner = OLD.owner AND status = OLD.status;
END;
-- A database from before the counters gets them from its jobs once, as it upgrades.
INSERT INTO job_counts (owner, status, n)
SELECT owner, status, COUNT(*) FROM jobs WHERE NOT EXISTS (SELECT 1 FROM job_counts) GROUP BY owner, status;

-- Health writes here when nothing else wrote lately: a write that succeeds proves the disk takes writes.
CREATE TABLE IF NOT EXISTS write_probe (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    probed_at REAL NOT NULL
);
"""

JOB_COLUMNS = ", ".join(JOB_FIELDS)

SQL_GET_JOBS = f"SELECT {JOB_COLUMNS}, owner, result FROM jobs WHERE job_id IN (SELECT value FROM json_each(?))"
# A listing shows every owner's rows when :owner is NULL, else that owner's alone (a private server).
SQL_COUNT_JOBS = """
SELECT COALESCE(SUM(n), 0) AS total FROM job_counts
WHERE (:status IS NULL OR status = :status) AND (:owner IS NULL OR owner = :owner)"""
# One query per listing: the page and, alongside, the total from the counters.
SQL_LIST_JOBS = f"""
SELECT {JOB_COLUMNS}, ({SQL_COUNT_JOBS}) AS total FROM jobs WHERE :owner IS NULL OR owner = :owner
ORDER BY seq LIMIT :limit OFFSET :offset"""
SQL_LIST_JOBS_BY_STATUS = f"""
SELECT {JOB_COLUMNS}, ({SQL_COUNT_JOBS}) AS total FROM jobs
WHERE status = :status AND (:owner IS NULL OR owner = :owner) ORDER BY seq LIMIT :limit OFFSET :offset"""
SQL_COUNT_ACTIVE = """
SELECT COALESCE(SUM(n), 0) AS active FROM job_counts WHERE owner = ? AND status IN ('pending', 'running')"""
# An experiment is its jobs: it is as old as its first and was last updated when its latest job changed.
SQL_LIST_EXPERIMENTS = """
SELECT j.experiment_id, e.name, j.jobs, j.created_at, j.updated_at FROM (
    SELECT experiment_id, COUNT(*) AS jobs, MIN(seq) AS first, MIN(created_at) AS created_at,
           MAX(COALESCE(completed_at, started_at, created_at)) AS updated_at
    FROM jobs WHERE :owner IS NULL OR owner = :owner GROUP BY experiment_id) AS j
LEFT JOIN experiments AS e ON e.experiment_id = j.experiment_id
ORDER BY j.first DESC LIMIT :limit OFFSET :offset"""
SQL_GET_EXPERIMENT = """
SELECT j.experiment_id, e.name, COUNT(*) AS jobs, MIN(j.created_at) AS created_at,
       MAX(COALESCE(j.completed_at, j.started_at, j.created_at)) AS updated_at
FROM jobs AS j LEFT JOIN experiments AS e ON e.experiment_id = j.experiment_id
WHERE j.experiment_id = :experiment_id AND (:owner IS NULL OR j.owner = :owner) GROUP BY j.experiment_id, e.name"""
SQL_COUNT_EXPERIMENTS = "SELECT COUNT(DISTINCT experiment_id) AS total FROM jobs WHERE :owner IS NULL OR owner = :owner"
SQL_EXPERIMENT_JOBS = f"""
SELECT {JOB_COLUMNS} FROM jobs WHERE experiment_id = :experiment_id AND (:owner IS NULL OR owner = :owner)
ORDER BY seq"""
SQL_GET_REQUEST = "SELECT request, experiment_id FROM jobs WHERE job_id = ?"
SQL_RECENT_JOBS = f"""
SELECT {JOB_COLUMNS}, request, result FROM jobs WHERE :owner IS NULL OR owner = :owner ORDER BY seq DESC LIMIT :limit"""
SQL_FIND_IDEMPOTENT = """
SELECT i.owner, i.key, i.body_hash, i.job_id FROM json_each(:keys) AS k
JOIN idempotency_keys AS i ON i.owner = k.value ->> 0 AND i.key = k.value ->> 1
WHERE i.created_at > :since"""
SQL_ADD_EXPERIMENTS = """
INSERT INTO experiments (name, experiment_id, created_at)
SELECT value ->> 0, value ->> 1, :now FROM json_each(:names) WHERE true
ON CONFLICT (name) DO NOTHING"""
SQL_GET_EXPERIMENTS = "SELECT name, experiment_id FROM experiments WHERE name IN (SELECT value ->> 0 FROM json_each(?))"
# A batch in one statement. Each row's place in the queue is its owner's active jobs before
# the batch plus its rank among the owner's rows in the batch, computed once from one
# snapshot (MATERIALIZED), so the batch can never overshoot a limit.
SQL_INSERT_JOBS_WITHIN_LIMIT = """
WITH batch AS MATERIALIZED (
    SELECT new.value ->> 0 AS job_id, new.value ->> 1 AS owner, new.value ->> 2 AS request,
           new.value ->> 3 AS experiment_id, new.value ->> 4 AS job_limit,
           (SELECT COALESCE(SUM(n), 0) FROM job_counts
            WHERE owner = new.value ->> 1 AND status IN ('pending', 'running'))
           + ROW_NUMBER() OVER (PARTITION BY new.value ->> 1 ORDER BY new.key) AS place
    FROM json_each(:rows) AS new
)
INSERT INTO jobs (job_id, owner, request, experiment_id, created_at)
SELECT job_id, owner, request, experiment_id, :now FROM batch WHERE place <= job_limit
RETURNING job_id"""
SQL_SAVE_IDEMPOTENT = """
INSERT INTO idempotency_keys (owner, key, body_hash, job_id, created_at)
SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, :clock FROM json_each(:rows) WHERE true
ON CONFLICT (owner, key) DO UPDATE SET body_hash = excluded.body_hash, job_id = excluded.job_id,
                                       created_at = excluded.created_at"""
SQL_PURGE_IDEMPOTENT = "DELETE FROM idempotency_keys WHERE created_at <= ?"
SQL_CLAIM_JOB = """
UPDATE jobs SET status = 'running', claimed_by = :worker, started_at = COALESCE(started_at, :now), heartbeat_at = :clock
WHERE seq = (SELECT seq FROM jobs WHERE status = 'pending' ORDER BY seq LIMIT 1) AND status = 'pending'
RETURNING job_id, request, experiment_id, created_at"""
SQL_BEGIN_ATTEMPT = """
UPDATE jobs SET attempts = attempts + 1 WHERE job_id = ? AND claimed_by = ? AND status = 'running'
RETURNING job_id"""
SQL_SET_PROGRESS = """
UPDATE jobs SET progress = MAX(progress, ?), heartbeat_at = ?
WHERE job_id = ? AND claimed_by = ? AND status = 'running'
RETURNING job_id"""
SQL_COMPLETE_JOB = """
UPDATE jobs SET status = 'completed', progress = 100, result = :outcome, completed_at = :now, claimed_by = NULL
WHERE job_id = :job_id AND claimed_by = :worker AND status = 'running'
RETURNING job_id"""
SQL_FAIL_JOB = """
UPDATE jobs SET status = 'failed', error = :outcome, completed_at = :now, claimed_by = NULL
WHERE job_id = :job_id AND claimed_by = :worker AND status = 'running'
RETURNING job_id"""
SQL_CANCEL_JOB = """
UPDATE jobs SET status = 'failed', error = 'cancelled', completed_at = ?, claimed_by = NULL
WHERE job_id = ? AND status IN ('pending', 'running')
RETURNING job_id"""
SQL_HEARTBEAT = """
UPDATE jobs SET heartbeat_at = ?
WHERE claimed_by = ? AND status = 'running' AND job_id IN (SELECT value FROM json_each(?))
RETURNING job_id"""
SQL_RUNNING_JOBS = (
    "SELECT job_id, claimed_by, ? - heartbeat_at AS idle FROM jobs WHERE status = 'running' AND claimed_by != ?"
)
SQL_REQUEUE_JOB = """
UPDATE jobs SET status = CASE WHEN attempts >= :max THEN 'failed' ELSE 'pending' END,
                error = CASE WHEN attempts >= :max THEN :error END,
                completed_at = CASE WHEN attempts >= :max THEN :now END,
                claimed_by = NULL
WHERE job_id = :job_id AND claimed_by = :claimed_by AND status = 'running'
RETURNING status"""
SQL_RELEASE_JOB = """
UPDATE jobs SET status = 'pending', claimed_by = NULL, attempts = MAX(attempts - ?, 0)
WHERE job_id = ? AND claimed_by = ? AND status = 'running'"""
SQL_INSERT_WEBHOOK = "INSERT INTO webhooks (webhook_id, url, events, secret, created_at) VALUES (?, ?, ?, ?, ?)"
SQL_GET_WEBHOOK = "SELECT webhook_id, url, events, created_at FROM webhooks WHERE webhook_id = ?"
SQL_LIST_WEBHOOKS = """
SELECT webhook_id, url, events, created_at FROM webhooks
WHERE :owner IS NULL OR webhook_id IN (SELECT webhook_id FROM webhook_owners WHERE owner = :owner) ORDER BY seq"""
SQL_DELETE_WEBHOOK = "DELETE FROM webhooks WHERE webhook_id = ? RETURNING webhook_id"
SQL_INSERT_WEBHOOK_OWNER = "INSERT INTO webhook_owners (webhook_id, owner) VALUES (?, ?)"
SQL_GET_WEBHOOK_OWNER = "SELECT owner FROM webhook_owners WHERE webhook_id = ?"
SQL_DELETE_WEBHOOK_OWNER = "DELETE FROM webhook_owners WHERE webhook_id = ?"
SQL_COUNT_WEBHOOKS = "SELECT COUNT(*) AS webhooks FROM webhooks"
SQL_CANCEL_WEBHOOK_DELIVERIES = """
UPDATE deliveries SET status = 'cancelled', claimed_by = NULL
WHERE webhook_id = ? AND status IN ('pending', 'delivering')"""
# The outbox: deliveries are written in the transaction that finishes the job.
SQL_ENQUEUE_WEBHOOKS = """
INSERT INTO deliveries (delivery_id, webhook_id, job_id, event, url, secret, payload, next_attempt_at, created_at)
SELECT 'delivery-' || lower(hex(randomblob(6))), webhook_id, :job_id, :event, url, secret, :payload, :clock, :now
FROM webhooks WHERE EXISTS (SELECT 1 FROM json_each(webhooks.events) WHERE value = :event)
AND (NOT EXISTS (SELECT 1 FROM webhook_owners AS o WHERE o.webhook_id = webhooks.webhook_id)
     OR EXISTS (SELECT 1 FROM webhook_owners AS o JOIN jobs AS j ON j.job_id = :job_id
                WHERE o.webhook_id = webhooks.webhook_id AND o.owner = j.owner))
ORDER BY seq"""
SQL_ENQUEUE_JOB_URL = """
INSERT INTO deliveries (delivery_id, webhook_id, job_id, event, url, secret, payload, next_attempt_at, created_at)
SELECT 'delivery-' || lower(hex(randomblob(6))), NULL, job_id, :event, json_extract(request, '$.webhook_url'),
       :secret, :payload, :clock, :now
FROM jobs WHERE job_id = :job_id AND json_extract(request, '$.webhook_url') IS NOT NULL"""
SQL_CLAIM_DELIVERIES = """
UPDATE deliveries SET status = 'delivering', claimed_by = :worker, claimed_at = :clock
WHERE seq IN (SELECT seq FROM deliveries WHERE status = 'pending' AND next_attempt_at <= :clock
              ORDER BY next_attempt_at, seq LIMIT :limit)
RETURNING delivery_id, event, url, secret, payload, attempts"""
SQL_RECORD_ATTEMPT = """
INSERT INTO delivery_attempts (delivery_id, attempted_at, http_status, error, duration_ms) VALUES (?, ?, ?, ?, ?)"""
SQL_SETTLE_DELIVERY = """
UPDATE deliveries SET status = :status, attempts = attempts + 1, next_attempt_at = :next, claimed_by = NULL
WHERE delivery_id = :delivery_id AND claimed_by = :worker AND status = 'delivering'"""
SQL_DELIVERING = """
SELECT delivery_id, claimed_by, ? - claimed_at AS idle FROM deliveries
WHERE status = 'delivering' AND claimed_by != ?"""
SQL_RELEASE_DELIVERY = """
UPDATE deliveries SET status = 'pending', claimed_by = NULL
WHERE delivery_id = ? AND claimed_by = ? AND status = 'delivering'"""
SQL_LIST_DELIVERIES = """
SELECT d.delivery_id, d.event, d.job_id, d.status, d.next_attempt_at, d.created_at,
       (SELECT json_group_array(json_object('attempted_at', a.attempted_at, 'http_status', a.http_status,
                                            'error', a.error, 'duration_ms', a.duration_ms))
        FROM (SELECT * FROM delivery_attempts WHERE delivery_id = d.delivery_id ORDER BY rowid) AS a) AS attempts
FROM deliveries AS d WHERE d.webhook_id = ? ORDER BY d.seq DESC LIMIT ?"""
SQL_RETRY_DELIVERY = """
UPDATE deliveries SET status = 'pending', next_attempt_at = :clock, attempts = :attempts
WHERE delivery_id = :delivery_id AND webhook_id = :webhook_id AND status = 'failed'
RETURNING delivery_id"""
SQL_DELIVERY_STATUS = "SELECT status FROM deliveries WHERE delivery_id = ? AND webhook_id = ?"
SQL_RATE_HIT = """
INSERT INTO rate_limits (client, window_start, hits) VALUES (:client, :now, :hits)
ON CONFLICT (client) DO UPDATE SET
    hits = CASE WHEN window_start + :window <= :now THEN :hits ELSE hits + :hits END,
    window_start = CASE WHEN window_start + :window <= :now THEN :now ELSE window_start END
RETURNING window_start, hits"""
SQL_PURGE_RATE = "DELETE FROM rate_limits WHERE window_start + ? <= ?"
# Retention: finished jobs older than the cut-off whose deliveries are all settled, a batch at a time.
SQL_EXPIRED_JOBS = """
SELECT job_id, result ->> '$.output_path' AS output_path FROM jobs
WHERE status IN ('completed', 'failed') AND completed_at < ?
  AND NOT EXISTS (SELECT 1 FROM deliveries WHERE deliveries.job_id = jobs.job_id
                  AND deliveries.status IN ('pending', 'delivering'))
ORDER BY seq LIMIT ?"""
SQL_PURGE_JOB_ATTEMPTS = """
DELETE FROM delivery_attempts WHERE delivery_id IN (
    SELECT delivery_id FROM deliveries WHERE job_id IN (SELECT value FROM json_each(?)))"""
SQL_PURGE_JOB_DELIVERIES = "DELETE FROM deliveries WHERE job_id IN (SELECT value FROM json_each(?))"
SQL_PURGE_JOBS = "DELETE FROM jobs WHERE job_id IN (SELECT value FROM json_each(?))"
SQL_TRIM_ATTEMPTS = """
DELETE FROM delivery_attempts WHERE rowid IN (
    SELECT rowid FROM (
        SELECT rowid, ROW_NUMBER() OVER (PARTITION BY delivery_id ORDER BY rowid DESC) AS newer
        FROM delivery_attempts WHERE delivery_id IN (SELECT delivery_id FROM deliveries WHERE attempts > :kept))
    WHERE newer > :kept)"""
SQL_PROBE_WRITE = """
INSERT INTO write_probe (id, probed_at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET probed_at = excluded.probed_at"""

Run = Callable[..., Awaitable[list[Any]]]  # runs one statement of a transaction


class PeerWatch:
    """Whether other server processes use this database, so that limits must be counted in it.

    Each server process holds a lock on one byte of `<db>-servers.lock` for as long as it
    runs; a byte another process holds cannot be locked. The kernel drops a process's
    locks when it ends, however it ends.
    """

    SLOTS = 128

    def __init__(self, db: Path) -> None:
        self.fd: int | None = None
        self.slot = -1
        self.checked_at, self.shared = 0.0, False
        with contextlib.suppress(OSError):
            self.fd = fd = os.open(f"{db}-servers.lock", os.O_RDWR | os.O_CREAT, 0o600)
            self.slot = next((slot for slot in range(self.SLOTS) if self._lock(fd, slot)), -1)

    @staticmethod
    def _lock(fd: int, slot: int) -> bool:
        import fcntl

        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
        except OSError:
            return False
        return True

    def others(self) -> bool:
        """Whether another process holds a slot: one F_GETLK over all of them.

        Once others were seen, that answer stands for a second before it is looked at again; while
        none was, for PEER_ALONE_CHECK_S (looking on every request cost a read 8% of its time).
        """
        now = time.monotonic()
        if self.fd is None or now - self.checked_at < (PEER_CHECK_S if self.shared else PEER_ALONE_CHECK_S):
            return self.shared
        self.checked_at, self.shared = now, self._locked_elsewhere(self.fd)
        return self.shared

    def _locked_elsewhere(self, fd: int) -> bool:
        import fcntl
        import struct

        query = struct.pack(FLOCK_LAYOUT, fcntl.F_WRLCK, os.SEEK_SET, 0, self.SLOTS, 0)
        try:
            answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        except OSError:
            return False
        return struct.unpack(FLOCK_LAYOUT, answer)[0] != fcntl.F_UNLCK

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class SQLiteStore(Store):
    """This process's handle on a SQLite database: one connection reads, one writes.

    WAL lets reads go on beside a write. Writes from this process queue on a lock,
    so a transaction never interleaves with another coroutine's statements; other
    processes wait on SQLite's busy timeout.
    """

    def __init__(self, path: Path, job_webhook_secret: str | None = None) -> None:
        super().__init__(job_webhook_secret)
        self.path = path
        self.reader: aiosqlite.Connection | None = None
        self.writer: aiosqlite.Connection | None = None
        self.write_lock = asyncio.Lock()
        self.peers: PeerWatch | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = await self._connect()
        try:
            await self.writer.execute("PRAGMA journal_mode = WAL")
            await self._apply_schema()
        except BaseException:
            await self.writer.close()
            raise
        self.reader = await self._connect()
        self.peers = PeerWatch(self.path)

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = aiosqlite.Row
        await conn.execute("PRAGMA busy_timeout = 10000")
        await conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    async def _apply_schema(self) -> None:
        """Create or upgrade the schema; the version bump commits with the change."""
        assert self.writer is not None, "SQLiteStore.open() connects the writer first"
        async with self.write_lock:
            version = (await self._fetch(self.writer, "PRAGMA user_version"))[0][0]
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"{self.path} was written by a newer Persona (schema {version}, this one knows {SCHEMA_VERSION})"
                )
            if version < SCHEMA_VERSION:
                await self.writer.executescript(
                    f"BEGIN IMMEDIATE;\n{SCHEMA}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;"
                )

    def listen(self, on_news: Callable[[str], None]) -> None:
        """Other processes' news reaches this one by polling alone: every POLL_S, the claim loops look."""

    def others(self) -> bool:
        """Whether other server processes use this database now."""
        return self.peers is not None and self.peers.others()

    async def close(self) -> None:
        for conn in (self.reader, self.writer):
            if conn is not None:
                await conn.close()
        if self.peers is not None:
            self.peers.close()

    @staticmethod
    async def _fetch(conn: aiosqlite.Connection | None, sql: str, params: Any = ()) -> list[Any]:
        assert conn is not None, "SQLiteStore.open() was not awaited"
        return list(await conn.execute_fetchall(sql, params))

    async def _read(self, sql: str, params: Any = ()) -> list[Any]:
        try:
            return await self._fetch(self.reader, sql, params)
        except aiosqlite.OperationalError as exc:
            raise StorageUnavailable(str(exc)) from exc

    def missing(self) -> str | None:
        """Why the database cannot be trusted with writes, if its file is not where it was.

        Moved or deleted under a running server, its open file would take writes that
        no restart could find.
        """
        # By name only: health answers anyone, and the log's start-up line has the full path.
        return None if self.path.exists() else f"the database file {self.path.name} is missing"

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[aiosqlite.Connection]:
        """The writer connection, under the write lock.

        A write SQLite refuses (disk full, read-only file, I/O error) comes out as
        StorageUnavailable, and the reason is kept for health until a write that
        changed rows succeeds (one that changed none wrote nothing to disk).
        """
        missing = self.missing()  # health checks for this itself, on every call
        if missing:
            raise StorageUnavailable(missing)
        async with self.write_lock:
            assert self.writer is not None, "SQLiteStore.open() was not awaited"
            changes = self.writer.total_changes
            try:
                yield self.writer
            except aiosqlite.OperationalError as exc:
                refused = str(exc)
            else:
                if self.writer.total_changes != changes:
                    self._saw_write(None)
                return
        self._saw_write(refused)
        raise StorageUnavailable(refused)

    async def _write(self, sql: str, params: Any = ()) -> list[Any]:
        """One statement in its own transaction; returns RETURNING rows, if any."""
        async with self._writing() as conn:
            return await self._fetch(conn, sql, params)

    @contextlib.asynccontextmanager
    async def _transaction(self, atomic: bool = True) -> AsyncIterator[Run]:
        """Statements that commit together; yields a function that runs one.

        With `atomic` false, for a single statement, each commits on its own.
        """
        async with self._writing() as conn:
            if not atomic:
                yield lambda sql, params=(): self._fetch(conn, sql, params)
                return
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield lambda sql, params=(): self._fetch(conn, sql, params)
                await conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back already, as after a full disk
                    await conn.execute("ROLLBACK")
                raise

    async def _probe_write(self) -> None:
        await self._write(SQL_PROBE_WRITE, (time.time(),))

    # -- jobs ---------------------------------------------------------------

    async def active_jobs(self, owner: str) -> int:
        return (await self._read(SQL_COUNT_ACTIVE, (owner,)))[0]["active"]

    async def _admit_batch(self, jobs: dict[str, NewJob], ids: dict[str, str]) -> dict[str, Admission]:
        """The batch in one transaction: replays found, experiments named, jobs inserted within quotas, keys kept.

        A batch of plain submissions, the common case, is the one insert alone.
        """
        plain = all(job.idempotency is None and job.experiment is None for job in jobs.values())
        try:
            async with self._transaction(atomic=not plain) as run:
                return await self._admit_in(run, jobs, ids)
        except aiosqlite.IntegrityError as exc:  # the only unique value the batch does not check is a new job id
            raise IdTaken from exc

    async def _admit_in(self, run: Run, jobs: dict[str, NewJob], ids: dict[str, str]) -> dict[str, Admission]:
        keyed = [[job.owner, job.idempotency[0]] for job in jobs.values() if job.idempotency]
        stored = {}
        if keyed:
            rows = await run(SQL_FIND_IDEMPOTENT, {"keys": json.dumps(keyed), "since": time.time() - IDEMPOTENCY_TTL_S})
            stored = {(row["owner"], row["key"]): (row["body_hash"], row["job_id"]) for row in rows}
        plan = AdmissionPlan.of(jobs, stored)
        experiments = await self._experiments(run, {job.experiment for job in plan.inserts.values() if job.experiment})
        rows = [
            [ids[key], job.owner, job.request, job_experiment(job, experiments, ids[key]), job.limit]
            for key, job in plan.inserts.items()
        ]
        inserted = {
            row["job_id"]
            for row in await run(SQL_INSERT_JOBS_WITHIN_LIMIT, {"rows": json.dumps(rows), "now": utc_now()})
        }
        kept = plan.kept_keys(ids, inserted)
        if kept:
            await run(SQL_SAVE_IDEMPOTENT, {"rows": json.dumps(kept), "clock": time.time()})
        active = {
            owner: (await run(SQL_COUNT_ACTIVE, (owner,)))[0]["active"] for owner in plan.refused_owners(ids, inserted)
        }
        return plan.settle(jobs, ids, inserted, active)

    @staticmethod
    async def _experiments(run: Run, names: set[str]) -> dict[str, str]:
        if not names:
            return {}
        await run(
            SQL_ADD_EXPERIMENTS, {"names": json.dumps([[name, new_id("exp")] for name in names]), "now": utc_now()}
        )
        rows = await run(SQL_GET_EXPERIMENTS, (json.dumps([[name] for name in names]),))
        return {row["name"]: row["experiment_id"] for row in rows}

    async def _read_jobs(self, job_ids: list[str]) -> dict[str, Any]:
        return {row["job_id"]: row for row in await self._read(SQL_GET_JOBS, (json.dumps(job_ids),))}

    async def list_jobs(
        self, status: str | None, limit: int, offset: int, owner: str | None = None
    ) -> tuple[list[JSON], int]:
        params = {"status": status, "limit": limit, "offset": offset, "owner": owner}
        sql = SQL_LIST_JOBS_BY_STATUS if status else SQL_LIST_JOBS
        rows = await self._read(sql, params)
        if rows:
            return [job_from_row(row) for row in rows], rows[0]["total"]
        return [], (await self._read(SQL_COUNT_JOBS, params))[0]["total"]

    async def list_experiments(self, limit: int, offset: int, owner: str | None = None) -> tuple[list[JSON], int]:
        rows = await self._read(SQL_LIST_EXPERIMENTS, {"limit": limit, "offset": offset, "owner": owner})
        return [dict(row) for row in rows], (await self._read(SQL_COUNT_EXPERIMENTS, {"owner": owner}))[0]["total"]

    async def get_experiment(self, experiment_id: str, owner: str | None = None) -> JSON | None:
        params = {"experiment_id": experiment_id, "owner": owner}
        found = await self._read(SQL_GET_EXPERIMENT, params)
        if not found:
            return None
        jobs = await self._read(SQL_EXPERIMENT_JOBS, params)
        return {**dict(found[0]), "jobs": [job_from_row(row) for row in jobs]}

    async def recent_jobs(self, limit: int, owner: str | None = None) -> list[JSON]:
        return [job_with_request(row) for row in await self._read(SQL_RECENT_JOBS, {"limit": limit, "owner": owner})]

    async def job_request(self, job_id: str) -> tuple[JSON, str] | None:
        rows = await self._read(SQL_GET_REQUEST, (job_id,))
        return (json.loads(rows[0]["request"]), rows[0]["experiment_id"]) if rows else None

    async def claim_job(self, worker: str) -> JSON | None:
        return claimed_job(await self._write(SQL_CLAIM_JOB, {"worker": worker, "now": utc_now(), "clock": time.time()}))

    async def begin_attempt(self, job_id: str, worker: str) -> bool:
        return bool(await self._write(SQL_BEGIN_ATTEMPT, (job_id, worker)))

    async def set_progress(self, job_id: str, worker: str, progress: int) -> bool:
        return bool(await self._write(SQL_SET_PROGRESS, (progress, time.time(), job_id, worker)))

    async def heartbeat(self, worker: str, job_ids: Iterable[str]) -> set[str]:
        return {
            row["job_id"] for row in await self._write(SQL_HEARTBEAT, (time.time(), worker, json.dumps(list(job_ids))))
        }

    async def _running_claims(self, worker: str) -> list[Any]:
        return await self._read(SQL_RUNNING_JOBS, (time.time(), worker))

    async def _requeue(self, job_id: str, claimed_by: str) -> str | None:
        params = {
            "max": MAX_ATTEMPTS,
            "error": requeue_error(),
            "now": utc_now(),
            "job_id": job_id,
            "claimed_by": claimed_by,
        }
        async with self._transaction() as run:
            rows = await run(SQL_REQUEUE_JOB, params)
            if rows and rows[0]["status"] == "failed":
                await self._enqueue(run, job_id, "generation.failed", {"error": requeue_error()})
        return rows[0]["status"] if rows else None

    async def release_job(self, job_id: str, worker: str, attempt_begun: bool) -> None:
        await self._write(SQL_RELEASE_JOB, (1 if attempt_begun else 0, job_id, worker))

    async def cancel_job(self, job_id: str) -> bool:
        async with self._transaction() as run:
            changed = bool(await run(SQL_CANCEL_JOB, (utc_now(), job_id)))
            if changed:
                await self._enqueue(run, job_id, "generation.failed", {"error": "cancelled"})
        return changed

    async def _finish(self, job_id: str, worker: str, status: str, outcome: str, event: str, data: JSON) -> bool:
        sql = SQL_COMPLETE_JOB if status == "completed" else SQL_FAIL_JOB
        async with self._transaction() as run:
            changed = bool(await run(sql, {"outcome": outcome, "now": utc_now(), "job_id": job_id, "worker": worker}))
            if changed:
                await self._enqueue(run, job_id, event, data)
        return changed

    async def _enqueue(self, run: Run, job_id: str, event: str, data: JSON) -> None:
        now = utc_now()
        params = {
            "job_id": job_id,
            "event": event,
            "payload": event_payload(job_id, event, data, now),
            "clock": time.time(),
            "now": now,
            "secret": self.job_webhook_secret,
        }
        await run(SQL_ENQUEUE_WEBHOOKS, params)
        await run(SQL_ENQUEUE_JOB_URL, params)

    async def purge_expired(self) -> None:
        clock = time.time()
        await self._write(SQL_PURGE_IDEMPOTENT, (clock - IDEMPOTENCY_TTL_S,))
        await self._write(SQL_PURGE_RATE, (RATE_WINDOW_S, clock))

    async def purge_finished_jobs(self, before: str, batch: int) -> tuple[int, list[str]]:
        async with self._transaction() as run:
            rows = await run(SQL_EXPIRED_JOBS, (before, batch))
            ids = json.dumps([row["job_id"] for row in rows])
            if rows:
                await run(SQL_PURGE_JOB_ATTEMPTS, (ids,))
                await run(SQL_PURGE_JOB_DELIVERIES, (ids,))
                await run(SQL_PURGE_JOBS, (ids,))
        return len(rows), [row["output_path"] for row in rows if row["output_path"]]

    async def trim_attempts(self, kept: int) -> None:
        await self._write(SQL_TRIM_ATTEMPTS, {"kept": kept})

    # -- webhooks -----------------------------------------------------------

    async def create_webhook(
        self, url: str, events: list[str], secret: str | None, owner: str | None = None
    ) -> JSON | None:
        webhook = {"webhook_id": new_id("webhook"), "url": url, "events": events, "created_at": utc_now()}
        async with self._transaction() as run:
            if (await run(SQL_COUNT_WEBHOOKS))[0]["webhooks"] >= MAX_WEBHOOKS:
                return None
            await run(
                SQL_INSERT_WEBHOOK, (webhook["webhook_id"], url, json.dumps(events), secret, webhook["created_at"])
            )
            if owner is not None:
                await run(SQL_INSERT_WEBHOOK_OWNER, (webhook["webhook_id"], owner))
        return webhook

    async def webhook_owner(self, webhook_id: str) -> str | None:
        rows = await self._read(SQL_GET_WEBHOOK_OWNER, (webhook_id,))
        return rows[0]["owner"] if rows else None

    async def get_webhook(self, webhook_id: str) -> JSON | None:
        rows = await self._read(SQL_GET_WEBHOOK, (webhook_id,))
        return webhook_from_row(rows[0]) if rows else None

    async def list_webhooks(self, owner: str | None = None) -> list[JSON]:
        return [webhook_from_row(row) for row in await self._read(SQL_LIST_WEBHOOKS, {"owner": owner})]

    async def delete_webhook(self, webhook_id: str) -> bool:
        async with self._transaction() as run:
            deleted = bool(await run(SQL_DELETE_WEBHOOK, (webhook_id,)))
            await run(SQL_DELETE_WEBHOOK_OWNER, (webhook_id,))
            await run(SQL_CANCEL_WEBHOOK_DELIVERIES, (webhook_id,))
        return deleted

    # -- deliveries -----------------------------------------------------------

    async def claim_deliveries(self, worker: str, limit: int) -> list[JSON]:
        rows = await self._write(SQL_CLAIM_DELIVERIES, {"worker": worker, "clock": time.time(), "limit": limit})
        return [claimed_delivery(row) for row in rows]

    async def settle_delivery(self, delivery_id: str, worker: str, attempt: JSON, status: str, delay: float) -> None:
        async with self._transaction() as run:
            await run(
                SQL_RECORD_ATTEMPT,
                (
                    delivery_id,
                    attempt["attempted_at"],
                    attempt["http_status"],
                    attempt["error"],
                    attempt["duration_ms"],
                ),
            )
            await run(
                SQL_SETTLE_DELIVERY,
                {"status": status, "next": time.time() + delay, "delivery_id": delivery_id, "worker": worker},
            )

    async def release_delivery(self, delivery_id: str, worker: str) -> None:
        await self._write(SQL_RELEASE_DELIVERY, (delivery_id, worker))

    async def _delivering(self, worker: str) -> list[Any]:
        return await self._read(SQL_DELIVERING, (time.time(), worker))

    async def list_deliveries(self, webhook_id: str, limit: int) -> list[JSON]:
        return [delivery_from_row(row) for row in await self._read(SQL_LIST_DELIVERIES, (webhook_id, limit))]

    async def retry_delivery(self, webhook_id: str, delivery_id: str, attempts: int) -> str | None:
        params = {"clock": time.time(), "attempts": attempts, "delivery_id": delivery_id, "webhook_id": webhook_id}
        if await self._write(SQL_RETRY_DELIVERY, params):
            return None
        rows = await self._read(SQL_DELIVERY_STATUS, (delivery_id, webhook_id))
        return rows[0]["status"] if rows else "missing"

    # -- rate limits ----------------------------------------------------------

    async def _count_hits(self, client: str, hits: int) -> Any:
        params = {"client": client, "now": time.time(), "window": RATE_WINDOW_S, "hits": hits}
        return (await self._write(SQL_RATE_HIT, params))[0]


# ---------------------------------------------------------------------------
# Store: PostgreSQL, for servers on several hosts (`--db postgresql://...`)
# ---------------------------------------------------------------------------

PG_SCHEMA_VERSION = 4
PG_CLOCK = "extract(epoch FROM clock_timestamp())"  # the database's clock, which all hosts share
PG_NOW = (
    """to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')"""  # the same, as clients see it
)
PG_ADMIT_FUNCTION = f"""\
-- A batch of submissions admitted in one round trip, its commit included. Every statement in
-- a function takes a fresh snapshot, so the quotas and Idempotency-Keys read after the locks
-- include every batch that held them before, from any host. The caller passes one submission
-- per Idempotency-Key (the batch's first); it gets back, per submission in order, whether its
-- job went in, the job and body hash an earlier request's key holds, and, for one refused
-- for its quota, its owner's jobs pending or running. As batches commit one after another,
-- jobs are numbered in the order they commit: a listing paged by offset gains new jobs only
-- at its end.
CREATE OR REPLACE FUNCTION persona_admit(
    lock_names text[], job_ids text[], owners text[], requests text[], named text[], fixed_experiments text[],
    new_experiments text[], job_limits integer[], idempotency_keys text[], body_hashes text[],
    key_ttl double precision)
RETURNS TABLE (admitted boolean, known_hash text, known_job text, owner_active bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    created text;
    found_hashes text[];
    found_jobs text[];
    added_ids text[];
BEGIN
    -- The locks, taken in one order so that batches never deadlock: 'persona:admission', which
    -- every batch takes, so that batches from all hosts commit one after another; and one per
    -- owner (its quota) and per Idempotency-Key, which a server of schema 2 takes alone.
    PERFORM pg_advisory_xact_lock(hashtextextended(name, 0))
    FROM (SELECT DISTINCT unnest(lock_names) AS name) AS names ORDER BY name;
    created := {PG_NOW};  -- in seq order
    SELECT array_agg(i.body_hash ORDER BY b.n), array_agg(i.job_id ORDER BY b.n) INTO found_hashes, found_jobs
    FROM unnest(owners, idempotency_keys) WITH ORDINALITY AS b (owner, key, n)
    LEFT JOIN idempotency_keys AS i ON i.owner = b.owner AND i.key = b.key
                                   AND i.created_at > {PG_CLOCK} - key_ttl;
    INSERT INTO experiments (name, experiment_id, created_at)
    SELECT DISTINCT ON (e.name) e.name, e.candidate, created
    FROM unnest(named, new_experiments, found_jobs) AS e (name, candidate, found)
    WHERE e.name IS NOT NULL AND e.found IS NULL ORDER BY e.name
    ON CONFLICT (name) DO NOTHING;
    WITH batch AS MATERIALIZED (
        SELECT b.n, b.job_id, b.owner, b.request, b.job_limit, b.key, b.body_hash,
               COALESCE(b.fixed, x.experiment_id) AS experiment_id,
               (SELECT COALESCE(SUM(c.n), 0) FROM job_counts AS c
                WHERE c.owner = b.owner AND c.status IN ('pending', 'running'))
               + ROW_NUMBER() OVER (PARTITION BY b.owner ORDER BY b.n) AS place
        FROM unnest(job_ids, owners, requests, fixed_experiments, named, job_limits, idempotency_keys,
                    body_hashes, found_jobs)
             WITH ORDINALITY AS b (job_id, owner, request, fixed, name, job_limit, key, body_hash, found, n)
        LEFT JOIN experiments AS x ON x.name = b.name
        WHERE b.found IS NULL
    ), added AS (
        INSERT INTO jobs (job_id, owner, request, experiment_id, created_at)
        SELECT job_id, owner, request, experiment_id, created FROM batch WHERE place <= job_limit ORDER BY n
        RETURNING job_id
    ), kept AS (
        INSERT INTO idempotency_keys (owner, key, body_hash, job_id, created_at)
        SELECT batch.owner, batch.key, batch.body_hash, batch.job_id, {PG_CLOCK}
        FROM batch JOIN added USING (job_id) WHERE batch.key IS NOT NULL
        ON CONFLICT (owner, key) DO UPDATE SET body_hash = excluded.body_hash, job_id = excluded.job_id,
                                               created_at = excluded.created_at
    )
    SELECT array_agg(job_id) INTO added_ids FROM added;
    IF added_ids IS NOT NULL THEN  -- the other hosts hear of new jobs as the batch commits
        PERFORM pg_notify('persona', 'jobs');
    END IF;
    RETURN QUERY
    SELECT b.job_id = ANY(COALESCE(added_ids, '{{}}')), b.hash, b.found,
           CASE WHEN b.found IS NULL AND NOT b.job_id = ANY(COALESCE(added_ids, '{{}}')) THEN
               (SELECT COALESCE(SUM(c.n), 0)::bigint FROM job_counts AS c
                WHERE c.owner = b.owner AND c.status IN ('pending', 'running')) END
    FROM unnest(job_ids, owners, found_hashes, found_jobs) WITH ORDINALITY AS b (job_id, owner, hash, found, n)
    ORDER BY b.n;
END $$;
"""
PG_MIGRATIONS = {  # version: what brings a database of the version before to it (a new one gets PG_SCHEMA whole)
    2: "CREATE INDEX IF NOT EXISTS jobs_by_experiment ON jobs (experiment_id, seq)",
    3: PG_ADMIT_FUNCTION,
    4: """CREATE TABLE IF NOT EXISTS webhook_owners (
    webhook_id text PRIMARY KEY,
    owner      text NOT NULL
);""",
}
PG_SCHEMA = (
    """\
-- Persona's PostgreSQL schema. persona.py carries this same text and applies it
-- in one transaction under an advisory lock; a test keeps the two equal.
-- Timestamps shown to clients are ISO 8601 UTC text, as in the SQLite schema;
-- times used for leases, windows and retries are epoch seconds of the
-- database's clock, which every host shares.

CREATE TABLE IF NOT EXISTS persona_schema (
    version integer NOT NULL
);

CREATE TABLE IF NOT EXISTS jobs (
    seq           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id        text NOT NULL UNIQUE,
    owner         text NOT NULL,
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'running', 'completed', 'failed')),
    progress      integer NOT NULL DEFAULT 0,
    request       text NOT NULL,
    experiment_id text NOT NULL,
    created_at    text NOT NULL,
    started_at    text,
    completed_at  text,
    error         text,
    result        text,
    attempts      integer NOT NULL DEFAULT 0,
    claimed_by    text,
    heartbeat_at  double precision
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_by_experiment ON jobs (experiment_id, seq);

CREATE TABLE IF NOT EXISTS experiments (
    name          text PRIMARY KEY,
    experiment_id text NOT NULL UNIQUE,
    created_at    text NOT NULL
);

CREATE TABLE IF NOT EXISTS idempotency_keys (
    owner      text NOT NULL,
    key        text NOT NULL,
    body_hash  text NOT NULL,
    job_id     text NOT NULL,
    created_at double precision NOT NULL,
    PRIMARY KEY (owner, key)
);

CREATE TABLE IF NOT EXISTS webhooks (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook_id text NOT NULL UNIQUE,
    url        text NOT NULL,
    events     text NOT NULL,
    secret     text,
    created_at text NOT NULL
);

-- Who registered a webhook on a server with API keys: the webhook hears that owner's jobs
-- alone. A webhook without a row here (registered with auth off) hears every job.
CREATE TABLE IF NOT EXISTS webhook_owners (
    webhook_id text PRIMARY KEY,
    owner      text NOT NULL
);

CREATE TABLE IF NOT EXISTS rate_limits (
    client       text PRIMARY KEY,
    window_start double precision NOT NULL,
    hits         integer NOT NULL
);

CREATE TABLE IF NOT EXISTS deliveries (
    seq             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id     text NOT NULL UNIQUE,
    webhook_id      text,
    job_id          text NOT NULL,
    event           text NOT NULL,
    url             text NOT NULL,
    secret          text,
    payload         text NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivering', 'delivered', 'failed', 'cancelled')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL,
    claimed_by      text,
    claimed_at      double precision,
    created_at      text NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_by_webhook ON deliveries (webhook_id, seq);
CREATE INDEX IF NOT EXISTS deliveries_by_job ON deliveries (job_id);

CREATE TABLE IF NOT EXISTS delivery_attempts (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id  text NOT NULL,
    attempted_at text NOT NULL,
    http_status  integer,
    error        text,
    duration_ms  integer NOT NULL
);
CREATE INDEX IF NOT EXISTS delivery_attempts_by_delivery ON delivery_attempts (delivery_id, seq);

-- Jobs per owner and status, kept by triggers, so that limits and totals never count rows.
CREATE TABLE IF NOT EXISTS job_counts (
    owner  text NOT NULL,
    status text NOT NULL,
    n      integer NOT NULL,
    PRIMARY KEY (owner, status)
);
-- New and deleted jobs are counted once per statement (a batch of submissions, a batch of
-- expired jobs), a change of status once per row.
CREATE OR REPLACE FUNCTION persona_count_new_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_counts (owner, status, n)
    SELECT owner, status, count(*) FROM new_jobs GROUP BY owner, status ORDER BY owner, status
    ON CONFLICT (owner, status) DO UPDATE SET n = job_counts.n + excluded.n;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION persona_count_deleted_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM job_counts JOIN (SELECT DISTINCT owner, status FROM old_jobs) AS gone USING (owner, status)
    ORDER BY owner, status FOR UPDATE OF job_counts;
    UPDATE job_counts SET n = job_counts.n - gone.n
    FROM (SELECT owner, status, count(*) AS n FROM old_jobs GROUP BY owner, status) AS gone
    WHERE job_counts.owner = gone.owner AND job_counts.status = gone.status;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION persona_count_status_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Both counters are locked in one order, so that changes in opposite directions never deadlock.
    PERFORM 1 FROM job_counts WHERE owner = OLD.owner AND status IN (OLD.status, NEW.status)
    ORDER BY status FOR UPDATE;
    UPDATE job_counts SET n = n - 1 WHERE owner = OLD.owner AND status = OLD.status;
    INSERT INTO job_counts (owner, status, n) VALUES (NEW.owner, NEW.status, 1)
    ON CONFLICT (owner, status) DO UPDATE SET n = job_counts.n + 1;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS job_counts_on_insert ON jobs;
CREATE TRIGGER job_counts_on_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_jobs
FOR EACH STATEMENT EXECUTE FUNCTION persona_count_new_jobs();
DROP TRIGGER IF EXISTS job_counts_on_delete ON jobs;
CREATE TRIGGER job_counts_on_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_jobs
FOR EACH STATEMENT EXECUTE FUNCTION persona_count_deleted_jobs();
DROP TRIGGER IF EXISTS job_counts_on_status ON jobs;
CREATE TRIGGER job_counts_on_status AFTER UPDATE OF status ON jobs
FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION persona_count_status_change();

-- Health writes here when nothing else wrote lately: a write that succeeds proves the database takes writes.
CREATE TABLE IF NOT EXISTS write_probe (
    id        integer PRIMARY KEY CHECK (id = 1),
    probed_at double precision NOT NULL
);

"""
    + PG_ADMIT_FUNCTION
)

PG_LOCK_SCHEMA = "SELECT pg_advisory_xact_lock(hashtextextended('persona:schema', 0))"
PG_SCHEMA_FOUND = "SELECT to_regclass('persona_schema') IS NOT NULL AS found"
PG_GET_VERSION = "SELECT max(version) AS version FROM persona_schema"
PG_SET_VERSION = "DELETE FROM persona_schema; INSERT INTO persona_schema (version) VALUES ({version})"
PG_GET_JOBS = f"SELECT {JOB_COLUMNS}, owner, result FROM jobs WHERE job_id = ANY($1::text[])"
PG_COUNT_JOBS = """
SELECT COALESCE(SUM(n), 0)::bigint AS total FROM job_counts
WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR owner = $2)"""
PG_LIST_JOBS = f"""
SELECT {JOB_COLUMNS}, ({PG_COUNT_JOBS}) AS total FROM jobs
WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR owner = $2) ORDER BY seq LIMIT $3 OFFSET $4"""
# The same statements as SQLite's, in PostgreSQL's parameters.
PG_LIST_EXPERIMENTS = (
    SQL_LIST_EXPERIMENTS.replace(":limit", "$1").replace(":offset", "$2").replace(":owner", "$3::text")
)
PG_COUNT_EXPERIMENTS = SQL_COUNT_EXPERIMENTS.replace(":owner", "$1::text")
PG_GET_EXPERIMENT = SQL_GET_EXPERIMENT.replace(":experiment_id", "$1").replace(":owner", "$2::text")
PG_EXPERIMENT_JOBS = SQL_EXPERIMENT_JOBS.replace(":experiment_id", "$1").replace(":owner", "$2::text")
PG_GET_REQUEST = SQL_GET_REQUEST.replace("?", "$1")
PG_RECENT_JOBS = SQL_RECENT_JOBS.replace(":owner", "$1::text").replace(":limit", "$2")
PG_COUNT_ACTIVE = """
SELECT COALESCE(SUM(n), 0)::bigint AS active FROM job_counts WHERE owner = $1 AND status IN ('pending', 'running')"""
# Every invariant that SQLite's single writer kept needs a lock here: persona_admit takes them.
PG_ADMIT = """
SELECT admitted, known_hash, known_job, owner_active
FROM persona_admit($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::int[],
                   $9::text[], $10::text[], $11)"""
PG_PURGE_IDEMPOTENT = f"DELETE FROM idempotency_keys WHERE created_at <= {PG_CLOCK} - $1"
# A claim skips rows another host is claiming this instant, rather than waiting for them; the
# outer status check makes sure that a row is claimed only while it is still pending.
PG_CLAIM_JOB = f"""
UPDATE jobs SET status = 'running', claimed_by = $1, started_at = COALESCE(started_at, {PG_NOW}),
                heartbeat_at = {PG_CLOCK}
WHERE seq = (SELECT seq FROM jobs WHERE status = 'pending' ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)
  AND status = 'pending'
RETURNING job_id, request, experiment_id, created_at"""
PG_BEGIN_ATTEMPT = """
UPDATE jobs SET attempts = attempts + 1 WHERE job_id = $1 AND claimed_by = $2 AND status = 'running'
RETURNING job_id"""
PG_SET_PROGRESS = f"""
UPDATE jobs SET progress = GREATEST(progress, $3), heartbeat_at = {PG_CLOCK}
WHERE job_id = $1 AND claimed_by = $2 AND status = 'running'
RETURNING job_id"""
PG_COMPLETE_JOB = f"""
UPDATE jobs SET status = 'completed', progress = 100, result = $3, completed_at = {PG_NOW}, claimed_by = NULL
WHERE job_id = $1 AND claimed_by = $2 AND status = 'running'
RETURNING request, completed_at"""
PG_FAIL_JOB = f"""
UPDATE jobs SET status = 'failed', error = $3, completed_at = {PG_NOW}, claimed_by = NULL
WHERE job_id = $1 AND claimed_by = $2 AND status = 'running'
RETURNING request, completed_at"""
PG_CANCEL_JOB = f"""
UPDATE jobs SET status = 'failed', error = 'cancelled', completed_at = {PG_NOW}, claimed_by = NULL
WHERE job_id = $1 AND status IN ('pending', 'running')
RETURNING request, completed_at"""
PG_HEARTBEAT = f"""
UPDATE jobs SET heartbeat_at = {PG_CLOCK} WHERE claimed_by = $1 AND status = 'running' AND job_id = ANY($2::text[])
RETURNING job_id"""
PG_RUNNING_JOBS = f"""
SELECT job_id, claimed_by, {PG_CLOCK} - heartbeat_at AS idle FROM jobs WHERE status = 'running' AND claimed_by != $1"""
PG_REQUEUE_JOB = f"""
UPDATE jobs SET status = CASE WHEN attempts >= $3 THEN 'failed' ELSE 'pending' END,
                error = CASE WHEN attempts >= $3 THEN $4 END,
                completed_at = CASE WHEN attempts >= $3 THEN {PG_NOW} END,
                claimed_by = NULL
WHERE job_id = $1 AND claimed_by = $2 AND status = 'running'
RETURNING status, request, completed_at"""
PG_RELEASE_JOB = """
UPDATE jobs SET status = 'pending', claimed_by = NULL, attempts = GREATEST(attempts - $3, 0)
WHERE job_id = $1 AND claimed_by = $2 AND status = 'running'"""
PG_LOCK_WEBHOOKS = "SELECT pg_advisory_xact_lock(hashtextextended('persona:webhooks', 0))"
PG_INSERT_WEBHOOK = f"""
INSERT INTO webhooks (webhook_id, url, events, secret, created_at) VALUES ($1, $2, $3, $4, {PG_NOW})
RETURNING created_at"""
PG_GET_WEBHOOK = "SELECT webhook_id, url, events, created_at FROM webhooks WHERE webhook_id = $1"
PG_LIST_WEBHOOKS = SQL_LIST_WEBHOOKS.replace(":owner", "$1::text")
PG_DELETE_WEBHOOK = "DELETE FROM webhooks WHERE webhook_id = $1 RETURNING webhook_id"
PG_INSERT_WEBHOOK_OWNER = "INSERT INTO webhook_owners (webhook_id, owner) VALUES ($1, $2)"
PG_GET_WEBHOOK_OWNER = "SELECT owner FROM webhook_owners WHERE webhook_id = $1"
PG_DELETE_WEBHOOK_OWNER = "DELETE FROM webhook_owners WHERE webhook_id = $1"
PG_COUNT_WEBHOOKS = "SELECT COUNT(*) AS webhooks FROM webhooks"
PG_CANCEL_WEBHOOK_DELIVERIES = """
UPDATE deliveries SET status = 'cancelled', claimed_by = NULL
WHERE webhook_id = $1 AND status IN ('pending', 'delivering')"""
PG_DELIVERY_ID = "'delivery-' || lpad(to_hex((random() * 281474976710655)::bigint), 12, '0')"
# The outbox: deliveries are written in the transaction that finishes the job. A job's stored
# request and result are never parsed here: PostgreSQL's JSON refuses the \u0000 that
# participants' words may hold, so they are read in Python.
PG_ENQUEUE_WEBHOOKS = f"""
INSERT INTO deliveries (delivery_id, webhook_id, job_id, event, url, secret, payload, next_attempt_at, created_at)
SELECT {PG_DELIVERY_ID}, webhook_id, $1, $2, url, secret, $3, {PG_CLOCK}, $4
FROM webhooks WHERE events::jsonb ? $2
AND (NOT EXISTS (SELECT 1 FROM webhook_owners AS o WHERE o.webhook_id = webhooks.webhook_id)
     OR EXISTS (SELECT 1 FROM webhook_owners AS o JOIN jobs AS j ON j.job_id = $1
                WHERE o.webhook_id = webhooks.webhook_id AND o.owner = j.owner))
ORDER BY seq"""
PG_ENQUEUE_JOB_URL = f"""
INSERT INTO deliveries (delivery_id, webhook_id, job_id, event, url, secret, payload, next_attempt_at, created_at)
VALUES ({PG_DELIVERY_ID}, NULL, $1, $2, $6, $5, $3, {PG_CLOCK}, $4)"""
PG_NOTIFY = "SELECT pg_notify('persona', $1)"
PG_OTHER_SERVERS = """
SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database()
               AND application_name LIKE 'persona:%' AND application_name <> $1) AS others"""
PG_CLAIM_DELIVERIES = f"""
WITH due AS MATERIALIZED (
    SELECT seq FROM deliveries WHERE status = 'pending' AND next_attempt_at <= {PG_CLOCK}
    ORDER BY next_attempt_at, seq LIMIT $2 FOR UPDATE SKIP LOCKED
)
UPDATE deliveries SET status = 'delivering', claimed_by = $1, claimed_at = {PG_CLOCK}
FROM due WHERE deliveries.seq = due.seq AND deliveries.status = 'pending'
RETURNING delivery_id, event, url, secret, payload, attempts"""
PG_RECORD_ATTEMPT = """
INSERT INTO delivery_attempts (delivery_id, attempted_at, http_status, error, duration_ms)
VALUES ($1, $2, $3, $4, $5)"""
PG_SETTLE_DELIVERY = f"""
UPDATE deliveries SET status = $3, attempts = attempts + 1, next_attempt_at = {PG_CLOCK} + $4, claimed_by = NULL
WHERE delivery_id = $1 AND claimed_by = $2 AND status = 'delivering'"""
PG_DELIVERING = f"""
SELECT delivery_id, claimed_by, {PG_CLOCK} - claimed_at AS idle FROM deliveries
WHERE status = 'delivering' AND claimed_by != $1"""
PG_RELEASE_DELIVERY = """
UPDATE deliveries SET status = 'pending', claimed_by = NULL
WHERE delivery_id = $1 AND claimed_by = $2 AND status = 'delivering'"""
PG_LIST_DELIVERIES = """
SELECT d.delivery_id, d.event, d.job_id, d.status, d.next_attempt_at, d.created_at,
       (SELECT json_agg(json_build_object('attempted_at', a.attempted_at, 'http_status', a.http_status,
                                          'error', a.error, 'duration_ms', a.duration_ms) ORDER BY a.seq)
        FROM delivery_attempts AS a WHERE a.delivery_id = d.delivery_id)::text AS attempts
FROM deliveries AS d WHERE d.webhook_id = $1 ORDER BY d.seq DESC LIMIT $2"""
PG_RETRY_DELIVERY = f"""
UPDATE deliveries SET status = 'pending', next_attempt_at = {PG_CLOCK}, attempts = $3
WHERE delivery_id = $1 AND webhook_id = $2 AND status = 'failed'
RETURNING delivery_id"""
PG_DELIVERY_STATUS = "SELECT status FROM deliveries WHERE delivery_id = $1 AND webhook_id = $2"
# A count lost in a database crash costs nothing, so this commit does not wait for the disk:
# the statement's own source turns synchronous_commit off for its transaction.
PG_RATE_HIT = f"""
INSERT INTO rate_limits AS r (client, window_start, hits)
SELECT $1, {PG_CLOCK}, $3 FROM (SELECT set_config('synchronous_commit', 'off', true)) AS relaxed
ON CONFLICT (client) DO UPDATE SET
    hits = CASE WHEN r.window_start + $2 <= excluded.window_start THEN $3 ELSE r.hits + $3 END,
    window_start = CASE WHEN r.window_start + $2 <= excluded.window_start THEN excluded.window_start
                        ELSE r.window_start END
RETURNING window_start, hits"""
PG_PURGE_RATE = f"DELETE FROM rate_limits WHERE window_start + $1 <= {PG_CLOCK}"
PG_EXPIRED_JOBS = """
SELECT job_id, result FROM jobs
WHERE status IN ('completed', 'failed') AND completed_at < $1
  AND NOT EXISTS (SELECT 1 FROM deliveries WHERE deliveries.job_id = jobs.job_id
                  AND deliveries.status IN ('pending', 'delivering'))
ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED"""
# A retry may have made one of these jobs' deliveries pending since they were chosen: their
# deliveries are locked, read again at their latest, and the jobs with work left are kept.
PG_LOCK_JOB_DELIVERIES = """
WITH locked AS (SELECT job_id, status FROM deliveries WHERE job_id = ANY($1::text[]) FOR UPDATE)
SELECT DISTINCT job_id FROM locked WHERE status IN ('pending', 'delivering')"""
PG_PURGE_JOB_ATTEMPTS = """
DELETE FROM delivery_attempts
WHERE delivery_id IN (SELECT delivery_id FROM deliveries WHERE job_id = ANY($1::text[]))"""
PG_PURGE_JOB_DELIVERIES = "DELETE FROM deliveries WHERE job_id = ANY($1::text[])"
PG_PURGE_JOBS = "DELETE FROM jobs WHERE job_id = ANY($1::text[])"
PG_TRIM_ATTEMPTS = """
DELETE FROM delivery_attempts WHERE seq IN (
    SELECT seq FROM (
        SELECT seq, ROW_NUMBER() OVER (PARTITION BY delivery_id ORDER BY seq DESC) AS newer
        FROM delivery_attempts WHERE delivery_id IN (SELECT delivery_id FROM deliveries WHERE attempts > $1)) AS ranked
    WHERE newer > $1)"""
PG_PROBE_WRITE = f"""
INSERT INTO write_probe (id, probed_at) VALUES (1, {PG_CLOCK})
ON CONFLICT (id) DO UPDATE SET probed_at = excluded.probed_at"""
# Errors that say the database cannot be used for now, not that a statement is wrong: by SQLSTATE class.
PG_UNAVAILABLE_CLASSES = ("08", "25", "28", "40", "53", "55", "57", "58")
PG_POOL_SIZE = 10  # connections per server process; a listener connection comes on top
PG_CONNECT_TIMEOUT_S = 5.0  # a database host that does not answer fails a request (503), not holds it


def asyncpg_module() -> Any:
    """asyncpg, imported only when a PostgreSQL URL is used, so that SQLite needs nothing new."""
    try:
        import asyncpg
    except ImportError:
        raise ConfigError(
            "--db names a PostgreSQL database, which needs the asyncpg driver: pip install 'persona[postgres]'"
        ) from None
    return asyncpg


@functools.cache
def pooled_connection_class(asyncpg: Any) -> type:
    """Pooled connections that skip asyncpg's reset round trip on each release.

    Persona leaves no session state on them to reset: its advisory locks end with their
    transactions, and LISTEN has a connection of its own. The reset doubled the round
    trips of every query.
    """

    class PooledConnection(asyncpg.Connection):
        def get_reset_query(self) -> str:
            return ""

    return PooledConnection


def pg_trouble(exc: BaseException) -> str | None:
    """Why the database cannot be used, if this error says so (and not that a statement was wrong)."""
    if isinstance(exc, (OSError, TimeoutError)):
        return (
            f"cannot reach PostgreSQL: {exc.strerror or type(exc).__name__}"
            if isinstance(exc, OSError)
            else "PostgreSQL did not answer in time"
        )
    state = getattr(exc, "sqlstate", None) or ""
    if state[:2] in PG_UNAVAILABLE_CLASSES:
        return f"PostgreSQL: {type(exc).__name__} ({state})"
    if type(exc).__name__ in ("InterfaceError", "ConnectionDoesNotExistError", "InternalClientError"):
        return f"PostgreSQL connection lost: {type(exc).__name__}"
    return None


class PostgresStore(Store):
    """This process's handle on a PostgreSQL database that servers on several hosts share.

    Row locks and advisory locks do what SQLite's single writer did; leases run on
    the database's clock. A dedicated connection listens for other hosts' news.
    """

    def __init__(self, url: str, job_webhook_secret: str | None = None) -> None:
        super().__init__(job_webhook_secret)
        self.url = url
        self.asyncpg = asyncpg_module()
        self.pool: Any = None
        self.listener_task: asyncio.Task[None] | None = None
        self.session_name = f"persona:{secrets.token_hex(6)}"  # every connection of this process bears it
        self.shared = False  # whether other server processes use this database, as last seen
        self.peer_task: asyncio.Task[None] | None = None

    def _session_settings(self) -> dict[str, str]:
        """Every connection names this process, and reads at read committed whatever the database's default:
        persona_admit and retention rely on each statement seeing what committed before it."""
        return {"application_name": self.session_name, "default_transaction_isolation": "read committed"}

    async def open(self) -> None:
        try:
            self.pool = await self.asyncpg.create_pool(
                self.url,
                min_size=0,
                max_size=PG_POOL_SIZE,
                timeout=PG_CONNECT_TIMEOUT_S,
                command_timeout=60,
                connection_class=pooled_connection_class(self.asyncpg),
                server_settings=self._session_settings(),
            )
        except Exception as exc:
            raise ConfigError(f"cannot open the PostgreSQL database {shown_db(self.url)}: {self._why(exc)}") from None
        try:
            await self._apply_schema()
        except ConfigError:
            await self.pool.close()
            raise
        except Exception as exc:
            await self.pool.close()
            raise ConfigError(f"cannot open the PostgreSQL database {shown_db(self.url)}: {self._why(exc)}") from None
        self.shared = await self._others_now()
        await self._notify(f"hello:{self.session_name}")  # the servers already here count in the database from now
        self.peer_task = asyncio.get_running_loop().create_task(self._watch_peers(), name="persona-peers")

    async def _apply_schema(self) -> None:
        """Create or upgrade the schema in one transaction, under a lock that other hosts starting wait on."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(PG_LOCK_SCHEMA)
            found = (await conn.fetchrow(PG_SCHEMA_FOUND))["found"]
            version = (await conn.fetchrow(PG_GET_VERSION))["version"] if found else 0
            if version and version > PG_SCHEMA_VERSION:
                raise ConfigError(
                    f"{shown_db(self.url)} was written by a newer Persona "
                    f"(schema {version}, this one knows {PG_SCHEMA_VERSION})"
                )
            if not version:
                await conn.execute(PG_SCHEMA)
            for step in range((version or PG_SCHEMA_VERSION) + 1, PG_SCHEMA_VERSION + 1):
                await conn.execute(PG_MIGRATIONS[step])
            if (version or 0) < PG_SCHEMA_VERSION:
                await conn.execute(PG_SET_VERSION.format(version=int(PG_SCHEMA_VERSION)))

    def _why(self, exc: Exception) -> str:
        """Why the database could not be opened, in words that cannot hold the URL's password."""
        if isinstance(exc, self.asyncpg.PostgresError):
            return str(exc)  # the server's own message: it names the user, never the password
        return pg_trouble(exc) or type(exc).__name__

    def listen(self, on_news: Callable[[str], None]) -> None:
        """Hear other hosts' news (a job queued, a job cancelled, a delivery due) as it happens.

        Only a hint: the claim loops poll as well, so news lost while the listener
        reconnects costs at most a poll's delay.
        """
        self.listener_task = asyncio.get_running_loop().create_task(self._listen(on_news), name="persona-listener")

    async def _listen(self, on_news: Callable[[str], None]) -> None:
        while True:
            closed = asyncio.Event()
            try:
                conn = await self.asyncpg.connect(
                    self.url, timeout=PG_CONNECT_TIMEOUT_S, server_settings=self._session_settings()
                )
            except Exception as exc:
                log.warning(
                    "PostgreSQL listener cannot connect (%s); trying again", pg_trouble(exc) or type(exc).__name__
                )
            else:
                conn.add_termination_listener(lambda _, lost=closed: lost.set())  # this connection's own event
                try:
                    await conn.add_listener(
                        "persona", lambda _conn, _pid, _channel, payload: self._hear(payload, on_news)
                    )
                    await closed.wait()
                except Exception as exc:
                    log.warning("PostgreSQL listener lost (%s); reconnecting", pg_trouble(exc) or type(exc).__name__)
                finally:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=1)
            await asyncio.sleep(POLL_S)  # a backoff before reconnecting, not a wait for an event

    def others(self) -> bool:
        """Whether other server processes use this database, as seen within the last PEER_CHECK_S."""
        return self.shared

    async def _watch_peers(self) -> None:
        """Look for other Persona processes' sessions on this database, so that limits are counted in it
        while there are any; a host that dies takes its sessions with it."""
        while True:
            await asyncio.sleep(PEER_CHECK_S)  # the period of the watch, not a wait for an event
            with contextlib.suppress(StorageUnavailable):
                self.shared = await self._others_now()

    async def _others_now(self) -> bool:
        return bool((await self._read(PG_OTHER_SERVERS, self.session_name))[0]["others"])

    def _hear(self, payload: str, on_news: Callable[[str], None]) -> None:
        """A server that joins says hello: from then on this one counts limits in the database."""
        if payload.startswith("hello:"):
            self.shared = self.shared or payload != f"hello:{self.session_name}"
        else:
            on_news(payload)

    async def close(self) -> None:
        for task in (self.listener_task, self.peer_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.close(), 5)

    def missing(self) -> str | None:
        return None

    @contextlib.asynccontextmanager
    async def _connection(self, writing: bool) -> AsyncIterator[Any]:
        """A pooled connection; failures that mean the database is unusable come out as StorageUnavailable."""
        try:
            async with self.pool.acquire() as conn:
                yield conn
        except Exception as exc:
            trouble = pg_trouble(exc)
            if trouble is None:
                raise
            if writing:
                self._saw_write(trouble)
            raise StorageUnavailable(trouble) from exc
        if writing:
            self._saw_write(None)

    async def _read(self, sql: str, *args: Any) -> list[Any]:
        async with self._connection(writing=False) as conn:
            return await conn.fetch(sql, *args)

    async def _write(self, sql: str, *args: Any) -> list[Any]:
        async with self._connection(writing=True) as conn:
            return await conn.fetch(sql, *args)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        async with self._connection(writing=True) as conn, conn.transaction():
            yield conn

    async def _probe_write(self) -> None:
        await self._write(PG_PROBE_WRITE)

    # -- jobs ---------------------------------------------------------------

    async def active_jobs(self, owner: str) -> int:
        return (await self._read(PG_COUNT_ACTIVE, owner))[0]["active"]

    async def _admit_batch(self, jobs: dict[str, NewJob], ids: dict[str, str]) -> dict[str, Admission]:
        """The batch in one call of persona_admit: one round trip, as a plain batch is on SQLite."""
        looked_up = AdmissionPlan.looked_up(jobs)
        news = looked_up.values()
        locks = ["persona:admission"] + [f"persona:owner:{job.owner}" for job in news]
        locks += [f"persona:key:{job.owner}:{job.idempotency[0]}" for job in news if job.idempotency]
        try:
            rows = await self._write(
                PG_ADMIT,
                locks,
                [ids[key] for key in looked_up],
                [job.owner for job in news],
                [job.request for job in news],
                [job.experiment for job in news],
                [
                    job.experiment_id or (None if job.experiment else own_experiment(ids[key]))
                    for key, job in looked_up.items()
                ],
                [new_id("exp") for _ in news],
                [job.limit for job in news],
                [job.idempotency and job.idempotency[0] for job in news],
                [job.idempotency and job.idempotency[1] for job in news],
                IDEMPOTENCY_TTL_S,
            )
        except self.asyncpg.UniqueViolationError as exc:  # the only unique value the batch does not check
            raise IdTaken from exc
        found = dict(zip(looked_up, rows))
        stored = {
            (job.owner, job.idempotency[0]): (found[key]["known_hash"], found[key]["known_job"])
            for key, job in looked_up.items()
            if job.idempotency and found[key]["known_job"]
        }
        inserted = {ids[key] for key, row in found.items() if row["admitted"]}
        active = {
            looked_up[key].owner: row["owner_active"] for key, row in found.items() if row["owner_active"] is not None
        }
        return AdmissionPlan.of(jobs, stored).settle(jobs, ids, inserted, active)

    async def _notify(self, news: str) -> None:
        """Tell the other hosts; losing this only costs them a poll's delay."""
        with contextlib.suppress(StorageUnavailable):
            await self._write(PG_NOTIFY, news)

    async def _read_jobs(self, job_ids: list[str]) -> dict[str, Any]:
        return {row["job_id"]: row for row in await self._read(PG_GET_JOBS, job_ids)}

    async def list_jobs(
        self, status: str | None, limit: int, offset: int, owner: str | None = None
    ) -> tuple[list[JSON], int]:
        rows = await self._read(PG_LIST_JOBS, status, owner, limit, offset)
        if rows:
            return [job_from_row(row) for row in rows], rows[0]["total"]
        return [], (await self._read(PG_COUNT_JOBS, status, owner))[0]["total"]

    async def list_experiments(self, limit: int, offset: int, owner: str | None = None) -> tuple[list[JSON], int]:
        rows = await self._read(PG_LIST_EXPERIMENTS, limit, offset, owner)
        return [dict(row) for row in rows], (await self._read(PG_COUNT_EXPERIMENTS, owner))[0]["total"]

    async def get_experiment(self, experiment_id: str, owner: str | None = None) -> JSON | None:
        found = await self._read(PG_GET_EXPERIMENT, experiment_id, owner)
        if not found:
            return None
        jobs = await self._read(PG_EXPERIMENT_JOBS, experiment_id, owner)
        return {**dict(found[0]), "jobs": [job_from_row(row) for row in jobs]}

    async def recent_jobs(self, limit: int, owner: str | None = None) -> list[JSON]:
        return [job_with_request(row) for row in await self._read(PG_RECENT_JOBS, owner, limit)]

    async def job_request(self, job_id: str) -> tuple[JSON, str] | None:
        rows = await self._read(PG_GET_REQUEST, job_id)
        return (json.loads(rows[0]["request"]), rows[0]["experiment_id"]) if rows else None

    async def claim_job(self, worker: str) -> JSON | None:
        return claimed_job(await self._write(PG_CLAIM_JOB, worker))

    async def begin_attempt(self, job_id: str, worker: str) -> bool:
        return bool(await self._write(PG_BEGIN_ATTEMPT, job_id, worker))

    async def set_progress(self, job_id: str, worker: str, progress: int) -> bool:
        return bool(await self._write(PG_SET_PROGRESS, job_id, worker, progress))

    async def heartbeat(self, worker: str, job_ids: Iterable[str]) -> set[str]:
        return {row["job_id"] for row in await self._write(PG_HEARTBEAT, worker, list(job_ids))}

    async def _running_claims(self, worker: str) -> list[Any]:
        return await self._read(PG_RUNNING_JOBS, worker)

    async def _requeue(self, job_id: str, claimed_by: str) -> str | None:
        async with self._transaction() as conn:
            rows = await conn.fetch(PG_REQUEUE_JOB, job_id, claimed_by, MAX_ATTEMPTS, requeue_error())
            if rows and rows[0]["status"] == "failed":
                await self._enqueue(conn, job_id, rows[0], "generation.failed", {"error": requeue_error()})
            elif rows:
                await conn.execute(PG_NOTIFY, "jobs")
        return rows[0]["status"] if rows else None

    async def release_job(self, job_id: str, worker: str, attempt_begun: bool) -> None:
        await self._write(PG_RELEASE_JOB, job_id, worker, 1 if attempt_begun else 0)

    async def cancel_job(self, job_id: str) -> bool:
        async with self._transaction() as conn:
            ended = await conn.fetch(PG_CANCEL_JOB, job_id)
            if ended:
                await self._enqueue(conn, job_id, ended[0], "generation.failed", {"error": "cancelled"})
                await conn.execute(PG_NOTIFY, f"cancel:{job_id}")
        return bool(ended)

    async def _finish(self, job_id: str, worker: str, status: str, outcome: str, event: str, data: JSON) -> bool:
        sql = PG_COMPLETE_JOB if status == "completed" else PG_FAIL_JOB
        async with self._transaction() as conn:
            ended = await conn.fetch(sql, job_id, worker, outcome)
            if ended:
                await self._enqueue(conn, job_id, ended[0], event, data)
        return bool(ended)

    async def _enqueue(self, conn: Any, job_id: str, ended: Any, event: str, data: JSON) -> None:
        """The outbox's deliveries for a job that has just ended (`ended`: its request and completed_at)."""
        now = ended["completed_at"]
        payload = event_payload(job_id, event, data, now)
        await conn.execute(PG_ENQUEUE_WEBHOOKS, job_id, event, payload, now)
        own_url = json.loads(ended["request"]).get("webhook_url")
        if own_url:
            await conn.execute(PG_ENQUEUE_JOB_URL, job_id, event, payload, now, self.job_webhook_secret, own_url)
        await conn.execute(PG_NOTIFY, "deliveries")

    async def purge_expired(self) -> None:
        await self._write(PG_PURGE_IDEMPOTENT, IDEMPOTENCY_TTL_S)
        await self._write(PG_PURGE_RATE, RATE_WINDOW_S)

    async def purge_finished_jobs(self, before: str, batch: int) -> tuple[int, list[str]]:
        async with self._transaction() as conn:
            rows = await conn.fetch(PG_EXPIRED_JOBS, before, batch)
            if rows:
                busy = {
                    row["job_id"] for row in await conn.fetch(PG_LOCK_JOB_DELIVERIES, [row["job_id"] for row in rows])
                }
                rows = [row for row in rows if row["job_id"] not in busy]
            ids = [row["job_id"] for row in rows]
            if rows:
                await conn.execute(PG_PURGE_JOB_ATTEMPTS, ids)
                await conn.execute(PG_PURGE_JOB_DELIVERIES, ids)
                await conn.execute(PG_PURGE_JOBS, ids)
        paths = [json.loads(row["result"]).get("output_path") for row in rows if row["result"]]
        return len(rows), [path for path in paths if path]

    async def trim_attempts(self, kept: int) -> None:
        await self._write(PG_TRIM_ATTEMPTS, kept)

    # -- webhooks -----------------------------------------------------------

    async def create_webhook(
        self, url: str, events: list[str], secret: str | None, owner: str | None = None
    ) -> JSON | None:
        webhook_id = new_id("webhook")
        async with self._transaction() as conn:
            await conn.execute(PG_LOCK_WEBHOOKS)  # the cap holds for hosts registering at once
            if (await conn.fetchrow(PG_COUNT_WEBHOOKS))["webhooks"] >= MAX_WEBHOOKS:
                return None
            created = await conn.fetchrow(PG_INSERT_WEBHOOK, webhook_id, url, json.dumps(events), secret)
            if owner is not None:
                await conn.execute(PG_INSERT_WEBHOOK_OWNER, webhook_id, owner)
        return {"webhook_id": webhook_id, "url": url, "events": events, "created_at": created["created_at"]}

    async def webhook_owner(self, webhook_id: str) -> str | None:
        rows = await self._read(PG_GET_WEBHOOK_OWNER, webhook_id)
        return rows[0]["owner"] if rows else None

    async def get_webhook(self, webhook_id: str) -> JSON | None:
        rows = await self._read(PG_GET_WEBHOOK, webhook_id)
        return webhook_from_row(rows[0]) if rows else None

    async def list_webhooks(self, owner: str | None = None) -> list[JSON]:
        return [webhook_from_row(row) for row in await self._read(PG_LIST_WEBHOOKS, owner)]

    async def delete_webhook(self, webhook_id: str) -> bool:
        async with self._transaction() as conn:
            deleted = bool(await conn.fetch(PG_DELETE_WEBHOOK, webhook_id))
            await conn.execute(PG_DELETE_WEBHOOK_OWNER, webhook_id)
            await conn.execute(PG_CANCEL_WEBHOOK_DELIVERIES, webhook_id)
        return deleted

    # -- deliveries -----------------------------------------------------------

    async def claim_deliveries(self, worker: str, limit: int) -> list[JSON]:
        return [claimed_delivery(row) for row in await self._write(PG_CLAIM_DELIVERIES, worker, limit)]

    async def settle_delivery(self, delivery_id: str, worker: str, attempt: JSON, status: str, delay: float) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                PG_RECORD_ATTEMPT,
                delivery_id,
                attempt["attempted_at"],
                attempt["http_status"],
                attempt["error"],
                attempt["duration_ms"],
            )
            await conn.execute(PG_SETTLE_DELIVERY, delivery_id, worker, status, delay)

    async def release_delivery(self, delivery_id: str, worker: str) -> None:
        await self._write(PG_RELEASE_DELIVERY, delivery_id, worker)

    async def _delivering(self, worker: str) -> list[Any]:
        return await self._read(PG_DELIVERING, worker)

    async def list_deliveries(self, webhook_id: str, limit: int) -> list[JSON]:
        return [delivery_from_row(row) for row in await self._read(PG_LIST_DELIVERIES, webhook_id, limit)]

    async def retry_delivery(self, webhook_id: str, delivery_id: str, attempts: int) -> str | None:
        if await self._write(PG_RETRY_DELIVERY, delivery_id, webhook_id, attempts):
            await self._notify("deliveries")
            return None
        rows = await self._read(PG_DELIVERY_STATUS, delivery_id, webhook_id)
        return rows[0]["status"] if rows else "missing"

    # -- rate limits ----------------------------------------------------------

    async def _count_hits(self, client: str, hits: int) -> Any:
        return (await self._write(PG_RATE_HIT, client, RATE_WINDOW_S, hits))[0]


def open_store(settings: Settings) -> Store:
    """The store the settings name: SQLite for a path, PostgreSQL for a postgresql:// URL."""
    if isinstance(settings.db, str):
        return PostgresStore(settings.db, settings.webhook_secret)
    return SQLiteStore(settings.db, settings.webhook_secret)


# ---------------------------------------------------------------------------
# Outbound requests: data URLs and webhooks go only where they are allowed
# ---------------------------------------------------------------------------

# Not globally reachable, though Python's `is_global` says they are: site-local, and local-use NAT64.
NOT_GLOBAL_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in (
        "fec0::/10",
        "64:ff9b:1::/48",
        "2001:db8::/32",  # and those whose `is_global` changed between Python releases:
        "192.0.0.0/24",
        "198.18.0.0/15",
        "100.64.0.0/10",
        "192.0.2.0/24",
        "198.51.100.0/24",
        "203.0.113.0/24",
    )
)
IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
NEVER_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in (
        "169.254.0.0/16",
        "fe80::/10",
        "0.0.0.0/8",
        "::/128",
        "224.0.0.0/4",
        "ff00::/8",
        "240.0.0.0/4",
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): it may translate to any IPv4 address, the metadata one too
    )
)
NAT64_NETWORK = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class OutboundRefused(Exception):
    """A URL whose host is, or resolves to, an address this server must not reach."""


class HostNotResolved(Exception):
    """A host name that does not resolve now; unlike a refusal, it may resolve later."""


def address_refusal(address: str, private_allowed: bool) -> str | None:
    """Why this address may not be reached, or None. Link-local (cloud metadata) never may.

    An IPv6 address that carries an IPv4 one (mapped, IPv4-compatible, NAT64, 6to4,
    Teredo) is judged by the IPv4 address inside: `::ffff:127.0.0.1` is loopback.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    inner = embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    if any(
        candidate in net
        for candidate in (ip, inner)
        if candidate is not None
        for net in NEVER_NETWORKS
        if candidate.version == net.version
    ):
        return f"{ip} is a link-local, multicast, unspecified or local-use NAT64 address, which is never allowed"
    if private_allowed or is_globally_reachable(inner if inner is not None else ip):
        return None
    return (
        f"{ip} is not a globally reachable address (loopback, private, shared, reserved or documentation "
        "range); allow such addresses with --allow-private-urls"
    )


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in NAT64_NETWORK or ip in IPV4_TRANSLATED or (ip in IPV4_COMPATIBLE and int(ip) >= 1 << 24):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_globally_reachable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_global and not any(ip in net for net in NOT_GLOBAL_NETWORKS if ip.version == net.version)


def literal_address(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def url_refusal(url: str, private_allowed: bool) -> str | None:
    """What can be known without a lookup: a literal address that may not be reached."""
    address = literal_address(urlsplit(url).hostname or "")
    return address_refusal(address, private_allowed) if address else None


async def checked_target(url: str, private_allowed: bool) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Resolve the host once, check every address, and aim the request at a checked one.

    Returns the URL with the address in place of the host, the Host header, and the TLS
    server name, so no second lookup (DNS rebinding) can send the request elsewhere.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = literal_address(host)
    if address is None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise HostNotResolved(f"{host} could not be resolved ({exc.strerror})") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    else:
        addresses = [address]
    for candidate in addresses:
        reason = address_refusal(candidate, private_allowed)
        if reason:
            raise OutboundRefused(f"{host} resolves to {candidate}: {reason}" if address is None else reason)
    chosen = addresses[0]
    netloc = f"[{chosen}]:{port}" if ":" in chosen else f"{chosen}:{port}"
    target = parts._replace(netloc=netloc).geturl()
    host_header = parts.netloc.rpartition("@")[2]
    extensions = {"sni_hostname": host} if parts.scheme == "https" and address is None else {}
    return target, {"Host": host_header}, extensions


@contextlib.asynccontextmanager
async def outbound_request(method: str, target: str, timeout: float, **options: Any) -> AsyncIterator[Any]:
    """The streamed response to one request to a target from `checked_target`.

    Each request gets a client and connection of its own: a pool matches connections
    by address alone, so a kept TLS session verified for one host name could carry a
    request meant for another name served from the same address.
    """
    import httpx

    async with (
        httpx.AsyncClient(timeout=timeout, follow_redirects=False, verify=outbound_tls()) as client,
        client.stream(method, target, **options) as response,
    ):
        yield response


@functools.cache
def outbound_tls() -> ssl.SSLContext:
    """The TLS settings of every outbound client, made once: loading the CA bundle costs ~25 ms of CPU."""
    import httpx

    return httpx.create_ssl_context()


# ---------------------------------------------------------------------------
# Processes: who this worker is, on which host, and whether a process still runs
# ---------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_identity() -> str:
    """host:pid:nonce, so a claim names a process that can be checked for life."""
    return f"{this_host()}:{os.getpid()}:{secrets.token_hex(4)}"


@functools.cache
def this_host() -> str:
    """The host name and the process namespace: containers that share a host name (host networking)
    do not share process ids, so only a claimer with both the same can be checked by its pid."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return socket.gethostname()
    return f"{socket.gethostname()}~{namespace}"


# ---------------------------------------------------------------------------
# Engine work: heavy computations off the event loop, in threads or in children a cancel can kill
# ---------------------------------------------------------------------------
#
# Reading Office files and the engine's large computations run in a spawned child:
# a thread would hold the GIL against the event loop, and could not be stopped.
# Small computations run in a thread, where a process would cost more than the work.


News = Callable[[Any], None]
"""What an engine computation tells its caller as it goes (`tell=` in the computation), heard on the event loop."""


async def run_in_child(function: Callable[..., Any], *args: Any, news: News | None = None) -> Any:
    """`function(*args)` in a spawned child process, killed if the caller is cancelled; with `news`,
    the function is handed `tell=`, whose messages reach `news` as the child sends them.

    The child dies with its parent too (PR_SET_PDEATHSIG), so no server, however it
    stops, leaves computations behind.
    """
    async with host_engine_slot():
        return await child_result(function, *args, news=news)


async def child_result(function: Callable[..., Any], *args: Any, news: News | None = None) -> Any:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(
        target=child_main,
        args=(sender, function, args, os.getpid(), news is not None),
        daemon=True,
        name="persona-engine",
    )
    starting = asyncio.ensure_future(asyncio.to_thread(child.start))  # pickling large data would hold the loop
    try:
        await asyncio.shield(starting)
        sender.close()
        ok, value = await asyncio.to_thread(receive_or_eof, receiver)
        while ok is None and news is not None:  # news, sent before the answer
            news(value)
            ok, value = await asyncio.to_thread(receive_or_eof, receiver)
    finally:  # also when cancelled: the child's end closes as it dies, which ends the read
        if not starting.done():  # cancelled while starting: let the start finish, so the child can be killed
            with contextlib.suppress(BaseException):
                await starting
        if child.pid is not None:
            if child.is_alive():
                child.kill()
            child.join(5)
        receiver.close()
    if ok:
        return value
    if isinstance(value, BaseException):
        raise value
    raise GenerationError(f"the engine's process ended without an answer (exit code {child.exitcode})")


@contextlib.asynccontextmanager
async def host_engine_slot() -> AsyncIterator[None]:
    """One of ENGINE_WORKERS engine children at once on this host, across every Persona process.

    A slot is a lock on one byte of a file in the temporary folder; the kernel frees it
    when its process ends, however it ends. Without the file, the process's own slots bound it.
    """
    import fcntl

    fd = host_slot_file()
    if fd is None:
        yield
        return
    slot, delay = None, 0.02
    try:
        while slot is None:
            for candidate in range(ENGINE_WORKERS):
                if candidate in HOST_SLOTS_HELD:  # this process's own locks would not stop it
                    continue
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, candidate)
                except OSError:
                    continue
                slot = candidate
                HOST_SLOTS_HELD.add(slot)
                break
            else:
                await asyncio.sleep(delay)  # held by other processes: look again soon
                delay = min(delay * 2, 0.5)
        yield
    finally:
        if slot is not None:
            HOST_SLOTS_HELD.discard(slot)
            with contextlib.suppress(OSError):
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, slot)


@functools.cache
def host_slot_file() -> int | None:
    """The slots' file, opened once: closing any descriptor of it would drop all of this process's locks."""
    try:
        return os.open(
            Path(tempfile.gettempdir()) / f"persona-engine-{os.getuid()}.lock", os.O_RDWR | os.O_CREAT, 0o600
        )
    except OSError:
        return None


HOST_SLOTS_HELD: set[int] = set()  # the host-wide engine slots this process holds


def receive_or_eof(receiver: Any) -> tuple[bool | None, Any]:
    try:
        return receiver.recv()
    except (EOFError, OSError):
        return False, None


def child_main(sender: Any, function: Callable[..., Any], args: tuple[Any, ...], parent: int, telling: bool) -> None:
    """The engine child: niced, bound to its parent's life, sends back (ok, result or exception),
    after (None, message) for each message the function tells when `telling`."""
    die_with_parent(parent)
    os.nice(ENGINE_NICENESS)
    told = {"tell": lambda message: sender.send((None, message))} if telling else {}
    try:
        outcome: tuple[bool, Any] = (True, function(*args, **told))
    except Exception as exc:  # handed to the parent, which raises it as its own
        outcome = (False, exc)
    sender.send(outcome)
    sender.close()


def die_with_parent(parent: int) -> None:
    """Ask Linux to end this process when its parent ends; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent was already gone before the request took effect
        os._exit(1)


ENGINE_THREADS: list[ThreadPoolExecutor] = []  # one small pool for small data, made when first needed
ENGINE_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def engine_threads() -> ThreadPoolExecutor:
    if not ENGINE_THREADS:
        ENGINE_THREADS.append(ThreadPoolExecutor(ENGINE_WORKERS, thread_name_prefix="persona-engine"))
    return ENGINE_THREADS[0]


def engine_slot() -> asyncio.Semaphore:
    """This process's engine computations at once: ENGINE_WORKERS, so memory and CPU stay bounded."""
    loop = asyncio.get_running_loop()
    if loop not in ENGINE_SLOTS:
        ENGINE_SLOTS[loop] = asyncio.Semaphore(ENGINE_WORKERS)
    return ENGINE_SLOTS[loop]


def is_large(people: list[Participant]) -> bool:
    """Whether the work is large enough for a process of its own: many participants, or much text."""
    if len(people) >= ENGINE_PROCESS_FROM:
        return True
    chars = 0
    for person in people:
        chars += sum(map(len, person.texts))
        if chars >= ENGINE_PROCESS_FROM_CHARS:
            return True
    return False


async def run_engine(
    people: list[Participant], function: Callable[..., Any], *args: Any, news: News | None = None
) -> Any:
    """CPU-bound engine work off the event loop; its callers hold an engine slot (`engine_slot`).
    With `news`, the function tells how it goes (`tell=`), and `news` hears it on the event loop.

    Large work runs in a child process of its own: a thread computing for seconds would
    hold the GIL against the event loop and slow every request, and a child can be
    stopped, so cancelling a job or stopping the server stops its computation. Small
    work stays in a thread, where starting a process would cost more than the work.
    """
    if is_large(people):
        return await run_in_child(function, *args, news=news)
    loop = asyncio.get_running_loop()
    told: dict[str, Callable[[Any], object]] = {}
    if news is not None:
        heard = news
        told["tell"] = lambda message: loop.call_soon_threadsafe(heard, message)
    return await loop.run_in_executor(engine_threads(), functools.partial(function, *args, **told))


class InOrder:
    """Steps run one after another in the order they were added, beside the work that adds them: what a
    computation tells as it goes (a persona written) reaches the store in order, and before the job
    moves on. A step that fails (the job was cancelled meanwhile) ends the work, and the work's end,
    however it ends, ends the steps: a thread that cannot be stopped adds none after it."""

    def __init__(self) -> None:
        self.last: asyncio.Future[None] | None = None
        self.work: asyncio.Future[Any] | None = None
        self.closed = False

    def add(self, step: Coroutine[Any, Any, None]) -> None:
        if self.closed:
            step.close()
            return
        self.last = asyncio.ensure_future(self.then(self.last, step))

    async def then(self, previous: asyncio.Future[None] | None, step: Coroutine[Any, Any, None]) -> None:
        try:
            if previous is not None:
                await previous
            await step
        except BaseException:
            step.close()  # not started, when the one before failed
            if self.work is not None:
                self.work.cancel()
            raise

    async def after(self, work: Awaitable[Any]) -> Any:
        """`work`'s result, once every step added while it ran has run; a step's failure is the work's."""
        self.work = asyncio.ensure_future(work)
        try:
            try:
                result = await self.work
            except asyncio.CancelledError:
                failed = self.failure()
                if failed is not None:
                    raise failed from None
                raise
            if self.last is not None:
                await self.last
            return result
        finally:
            self.closed = True
            for task in (self.work, self.last):
                if task is not None and not task.done():
                    task.cancel()
            self.failure()  # retrieved, so that no "exception never retrieved" is logged

    def failure(self) -> BaseException | None:
        """The exception the last step ended with, if it has ended with one."""
        if self.last is None or not self.last.done() or self.last.cancelled():
            return None
        return self.last.exception()


# ---------------------------------------------------------------------------
# Words: what counts as a word in the data, and its stem
# ---------------------------------------------------------------------------

STOPWORDS = frozenset(
    """
a about above actually after again against all also always am an and any anything are around as at
back be because been before being below between both but by can cannot could couple did do does doing
don done down during each either else enough especially even ever every everything few for from
further get gets getting go goes going gone got gotten had has have having he her here hers herself
him himself his how however i if in into is isn it its itself just kind know let like lot lots made
make makes many may me might mine more most much must my myself need needs never no nor not nothing
now of off often ok okay on once one only or other our ours ourselves out over own per probably
quite rather re really right said same say says see seem seems she should since so some something
sometimes sort still such sure take than that the their theirs them themselves then there these they
thing things think this those though through thus to too toward under until up upon us use used
uses using usually very want wants was way we well were what whatever when where whether which while
who whom whose why will with within without would yeah yes yet you your yours yourself ll ve
i'm i've i'd i'll it's don't can't doesn't didn't isn't won't that's there's we're they're you're we've
they've let's wasn't aren't couldn't wouldn't shouldn't haven't hasn't what's he's she's
another frustrating annoying great good bad better worse easy easier hard harder nice love hate wish
uh um umm uhm hmm hm er erm ah oh eh mm mhm uh-huh cuz cos cause gonna wanna gotta kinda sorta super
perhaps maybe basically literally honestly totally definitely pretty stuff guess mean yep yup nope lol
anyway anyways whatever etc also bit little lot thank thanks please hello hi hey wow cool awesome
bunch whole tons plenty none
app apps
de des du la le les et est un une que qui pour dans pas sur avec ce cette il elle je nous vous ils au aux
ne se sa ses mais ou donc très y el los las por para es una uno del al lo su sus como pero muy
der das und ist nicht zu mit von ein eine auf dem sich auch ich sie wir o os um não com mais di che è
della il gli
""".split()
)


WORD = re.compile(r"[a-z][a-z0-9'’-]*[a-z0-9]|[a-z]")
LINK = re.compile(
    r"\b(?:https?://|www\.)\S+|(?<![\w.-])(?:[a-z0-9-]+\.)+(?:com|org|net|io|edu|gov|dev)(?:/\S*)?(?![\w.])",
    re.IGNORECASE,
)
"""A web address: its parts (`https`, `github`, `com`) are no words the participant said."""


def stem(word: str) -> str:
    word = word.replace("’", "'")
    if word.endswith("'s"):
        word = word[:-2]
    if len(word) > 4 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    return word


def is_word_token(token: str) -> bool:
    """A word worth counting: no stop word, filler, digit or id fragment."""
    return len(token) > 2 and token not in STOPWORDS and not any(char.isdigit() for char in token)


def content_words(text: str) -> list[tuple[str, str]]:
    """(stem, surface form) of the words that carry meaning, in order."""
    return [(token, surface) for token, surface, _, _ in content_spans(text)]


def content_spans(text: str) -> list[tuple[str, str, int, int]]:
    """(stem, surface, start, end) of the words that carry meaning; offsets into `text`."""
    words = []
    unlinked = LINK.sub(lambda link: " " * len(link.group()), text.lower())  # same length: offsets hold
    for match in WORD.finditer(unlinked):
        token = stem(match.group())
        if is_word_token(token) and match.group() not in STOPWORDS:
            words.append((token, match.group().replace("’", "'"), match.start(), match.end()))
    return words


def word_set(text: str) -> frozenset[str]:
    return frozenset(token for token, _ in content_words(text))


# ---------------------------------------------------------------------------
# Data loading: files and their formats
# ---------------------------------------------------------------------------

FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".xlsx": "xlsx",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".txt": "text",
    ".md": "text",
    ".markdown": "text",
    ".docx": "docx",
    ".vtt": "vtt",
    ".srt": "srt",
    ".qdpx": "qdpx",
}
RECORD_LIST_KEYS = ("responses", "participants", "records", "data", "entries", "items", "results", "interviews")
MAX_ARCHIVE_BYTES = 100 * 1024 * 1024  # what one .docx or .xlsx may unpack to, counted as it unpacks
MAX_SHEET_COLUMNS = 1000  # columns read from a sheet; a survey has far fewer
MAX_NAMES_SHOWN = 12  # files or columns named in one warning
MAX_SOURCE_FILES = 10_000  # files one data folder may hold
MAX_LISTED_FILES = 200_000  # files the data listing walks: the data directory's own limit, far above the upload quotas
OUTPUT_MARKER = ".persona-output"  # marks Persona's output folder: never a data source, wherever it lies
MAX_DATA_DEPTH = 32  # how deeply a JSON data file or an inline record may nest


@dataclass
class Participant:
    id: str
    texts: list[str] = field(default_factory=list)  # each a unit of its own: a turn, an answer, a review
    attributes: dict[str, str] = field(default_factory=dict)
    coded: dict[str, list[str]] = field(default_factory=dict)  # a QDA project's coded passages -> her codes' names
    asked: dict[str, str] = field(default_factory=dict)  # text -> the survey question it answers


@dataclass
class Dataset:
    participants: list[Participant]
    source: JSON
    warnings: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)  # attribute -> the question it answers, for coded columns
    names: set[str] = field(default_factory=set)  # what the data marks as people's names: name columns, speaker labels
    silent: list[str] = field(default_factory=list)  # respondents who answered nothing at all: counted, not read

    @property
    def respondents(self) -> int:
        """Every respondent of the source, read or not: what coverage is a share of."""
        return len(self.participants) + len(self.silent)


def classify_data(data: str | list[Any]) -> str:
    """'inline', 'url' or 'path'; other URL schemes are refused here."""
    if isinstance(data, list):
        return "inline"
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", data)
    if scheme is None:
        return "path"
    if scheme.group(1).lower() in ("http", "https"):
        if http_url_problem(data):
            raise APIError(400, f"data URL {data!r} is not a valid http(s) URL")
        return "url"
    raise APIError(400, f"data URL scheme {scheme.group(1)!r} is not supported; use a path, http or https")


def resolve_data_path(data: str, data_dir: Path) -> Path:
    """The real path of a data source, refused unless it lies inside the data directory."""
    try:
        return checked_data_path(data, data_dir)
    except OSError as exc:  # a name too long, a loop of links: a bad path, not a server fault
        raise APIError(400, f"data path {data[:200]!r} cannot be used: {exc.strerror or type(exc).__name__}") from None


def missing_source(data: str) -> APIError:
    return APIError(
        400,
        f"data source {data!r} does not exist in the server's data directory "
        "(paths are relative to it; the server's --data-dir sets it)",
        {"data": data},
    )


def located_in_data_dir(data: str, data_dir: Path, what: str = "data path") -> Path:
    """The real path `data` names, refused if it lies outside the data directory, is hidden, or lies in
    Persona's output folder (it may not exist)."""
    root = real_root(data_dir)
    resolved = Path(os.path.realpath(root / data))
    if not resolved.is_relative_to(root):
        raise APIError(400, f"{what} {data!r} lies outside the data directory; give a path inside it")
    if any(part.startswith(".") for part in resolved.relative_to(root).parts) or any(
        (folder / OUTPUT_MARKER).exists() for folder in [resolved, *resolved.parents] if folder.is_relative_to(root)
    ):
        raise APIError(
            400, f"{what} {data!r} is a hidden file or lies in Persona's output folder; neither is ever read as data"
        )
    return resolved


def checked_data_path(data: str, data_dir: Path) -> Path:
    root = real_root(data_dir)
    resolved = located_in_data_dir(data, data_dir)
    try:
        mode = resolved.stat().st_mode
    except FileNotFoundError:
        raise missing_source(data) from None
    if stat.S_ISDIR(mode):
        if not folder_files(resolved, root)[0]:
            raise APIError(400, f"data folder {data!r} holds no supported files ({', '.join(FORMATS)})")
        return resolved
    if not stat.S_ISREG(mode):
        raise APIError(400, f"data source {data!r} is not a regular file")
    if resolved.suffix.lower() not in FORMATS:
        raise APIError(
            400,
            f"data source {data!r} has an unsupported format {resolved.suffix or '(none)'!r}; "
            f"supported: {', '.join(FORMATS)}",
        )
    return resolved


@functools.lru_cache(maxsize=16)
def real_root(data_dir: Path) -> Path:
    """The data directory's real path, worked out once: every submission checks against it."""
    return data_dir.resolve()


def folder_files(folder: Path, root: Path, most: int = MAX_SOURCE_FILES) -> tuple[list[Path], list[str]]:
    """The supported regular files below `folder`, sorted, and the names of the others.

    Hidden files and links out of `root` are neither read nor named; links to folders are
    not followed. The walk keeps its own stack, so no depth of folders can exhaust
    Python's, and it stops past `most` files: a source that large is refused.
    """
    read: list[Path] = []
    skipped: list[str] = []
    stack = [folder]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:  # unreadable, or a path too long for the system
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                if not os.path.exists(os.path.join(entry.path, OUTPUT_MARKER)):
                    stack.append(Path(entry.path))
            elif entry.is_file() and Path(os.path.realpath(entry.path)).is_relative_to(root):
                path = Path(entry.path)
                if path.suffix.lower() in FORMATS:
                    read.append(path)
                else:
                    skipped.append(path.relative_to(folder).as_posix())
            if len(read) + len(skipped) > most:
                raise APIError(
                    400,
                    f"data folder {folder.relative_to(root).as_posix() or '.'!r} holds more than "
                    f"{most:,} files; give a smaller folder",
                )
    return sorted(read), sorted(skipped)


async def check_data_source(
    data: str | list[Any], data_dir: Path, before_walking: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Refuse at submission what can be known to fail: a missing or escaping path.

    A path found good is trusted for a moment under its normal form (`many/.` is `many`),
    so a burst of submissions naming one folder walks it once, off the event loop, and
    submissions arriving during the walk wait for that one; `before_walking` (the
    submitter's quota) is checked first. The job checks the path again when it reads it.
    """
    if not isinstance(data, str) or classify_data(data) != "path":
        return
    key, now = (data_dir, os.path.normpath(data)), time.monotonic()
    if CHECKED_PATHS.get(key, 0.0) > now:
        return
    if before_walking is not None:
        await before_walking()
    walk = PATH_CHECKS.get(key)
    if walk is None:
        walk = PATH_CHECKS[key] = asyncio.ensure_future(asyncio.to_thread(resolve_data_path, data, data_dir))
        walk.add_done_callback(lambda _: PATH_CHECKS.pop(key, None))
    await asyncio.shield(walk)
    if len(CHECKED_PATHS) > 1000:
        CHECKED_PATHS.clear()
    CHECKED_PATHS[key] = time.monotonic() + CHECKED_PATH_TTL_S


CHECKED_PATH_TTL_S = 2.0
CHECKED_PATHS: dict[tuple[Path, str], float] = {}  # (data dir, normal path) -> trusted until (monotonic)
PATH_CHECKS: dict[tuple[Path, str], asyncio.Future[Path]] = {}  # walks under way, shared by their waiters


def decode_text(raw: bytes, name: str) -> str:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise GenerationError(f"{name} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    return text.replace("\x00", "")


def nests_deeper(value: Any, limit: int) -> bool:
    """Whether lists and objects nest deeper than `limit`; its own stack, so any depth is safe to ask about."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def shortened(text: str, most: int) -> str:
    """`text` in at most `most` characters: cut after a whole word, with an ellipsis."""
    if len(text) <= most:
        return text
    cut = text[: most - 1].rsplit(" ", 1)[0] if " " in text[: most - 1] else text[: most - 1]
    return cut.rstrip(" ,;:.-") + "…"


def named_list(names: Iterable[str]) -> str:
    """Names for a warning: quoted, at most a dozen, the rest counted; a long one (a survey's
    question) cut at a word and marked so."""
    names = list(names)
    shown = ", ".join(repr(shortened(name, 60)) for name in names[:MAX_NAMES_SHOWN])
    return shown + (f" and {len(names) - MAX_NAMES_SHOWN} more" if len(names) > MAX_NAMES_SHOWN else "")


# ---------------------------------------------------------------------------
# Data loading: Office files (.docx, .xlsx)
# ---------------------------------------------------------------------------
#
# A .docx or .xlsx is a zip of XML parts, read with the standard library.
# Each part streams through expat a chunk at a time, so time and memory grow with the
# file, never with what it claims: its unpacked bytes are counted as they come (a zip
# may declare any size), a document type is refused (Office files have none, so no
# entity can expand), and what the parts produce is counted too: characters, cells,
# shared strings and depth. A wide sparse sheet costs the cells it holds.

WORD_NS = "http://schemas.openxmlformats.org/wordprocessingml/2006/main "
SHEET_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main "
RELS_NS = "http://schemas.openxmlformats.org/package/2006/relationships "
DOC_RELS_NS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships "
OFFICE_FORMATS = ("docx", "xlsx", "qdpx")  # zips of XML: read in a child process, each count under its cap
ZIP_OPENING = b"PK\x03\x04"  # how a zip archive, and so every Office file, opens: its first entry's header
MAX_OFFICE_CHARS = 20_000_000  # characters of text one Office file may give
MAX_SHEET_CELLS = 2_000_000  # cells one sheet may give, its empty columns left out
MAX_SHEETS = 64  # sheets of one workbook read to find the one with the data
MAX_XML_DEPTH = 256  # how deeply a part's elements may nest; real documents stay under 40
XML_CHUNK_BYTES = 64 * 1024


class OfficeBudget:
    """What one Office file has given so far, each count under its cap; errors name the file."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.unpacked = 0
        self.chars = 0

    def unpack(self, size: int) -> None:
        self.unpacked += size
        if self.unpacked > MAX_ARCHIVE_BYTES:
            raise GenerationError(f"{self.name} unpacks to more than {MAX_ARCHIVE_BYTES // (1024 * 1024)} MiB")

    def produce(self, size: int) -> None:
        self.chars += size
        if self.chars > MAX_OFFICE_CHARS:
            raise GenerationError(f"{self.name} holds more than {MAX_OFFICE_CHARS:,} characters of text")


def open_archive(raw: bytes, name: str, kind: str) -> Any:
    """The zip inside an Office file, refused if it is not one or declares more than it may unpack to."""
    import zipfile

    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except (zipfile.BadZipFile, ValueError, EOFError):
        raise GenerationError(f"{name} is not a {kind} file (not a zip archive)") from None
    if sum(info.file_size for info in archive.infolist()) > MAX_ARCHIVE_BYTES:
        raise GenerationError(f"{name} unpacks to more than {MAX_ARCHIVE_BYTES // (1024 * 1024)} MiB")
    return archive


XmlStart = Callable[[str, dict[str, str]], None]
XmlEnd = Callable[[str], None]
XmlText = Callable[[str], None]


def stream_part(archive: Any, part: str, budget: OfficeBudget, start: XmlStart, end: XmlEnd, text: XmlText) -> bool:
    """Stream one XML part through expat, calling `start`, `end` and `text` as it goes; False if it is absent."""
    import zipfile

    try:
        stream = archive.open(part)
    except KeyError:
        return False
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError) as exc:
        raise GenerationError(f"{budget.name} is damaged and cannot be unpacked ({type(exc).__name__})") from None
    stream_xml(stream, part, budget, start, end, text)
    return True


def stream_xml(stream: Any, part: str, budget: OfficeBudget, start: XmlStart, end: XmlEnd, text: XmlText) -> None:
    """Stream XML from a binary `stream` through expat a chunk at a time: no document type, no entity
    expanded, nesting and size counted against `budget`."""
    import zipfile
    import zlib
    from xml.parsers import expat

    parser = expat.ParserCreate(namespace_separator=" ")
    parser.buffer_text = True
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    depth = 0

    def on_start(tag: str, attributes: dict[str, str]) -> None:
        nonlocal depth
        depth += 1
        if depth > MAX_XML_DEPTH:
            raise GenerationError(f"{budget.name} nests the elements of {part} deeper than {MAX_XML_DEPTH} levels")
        start(tag, attributes)

    def on_end(tag: str) -> None:
        nonlocal depth
        depth -= 1
        end(tag)

    def refuse_doctype(*_: Any) -> None:
        raise GenerationError(
            f"{budget.name} declares a document type in {part}; the files Persona reads have none, "
            "and it expands no entities"
        )

    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = on_start, on_end, text
    parser.StartDoctypeDeclHandler = parser.EntityDeclHandler = refuse_doctype
    try:
        with stream:
            while chunk := stream.read(XML_CHUNK_BYTES):
                budget.unpack(len(chunk))
                parser.Parse(chunk, False)
            parser.Parse(b"", True)
    except expat.ExpatError as exc:
        raise GenerationError(f"{budget.name} has a broken part {part}: {exc}") from None
    except (
        zipfile.BadZipFile,
        zlib.error,
        RuntimeError,
        NotImplementedError,
        EOFError,
        ValueError,
        LookupError,
    ) as exc:
        raise GenerationError(f"{budget.name} is damaged and cannot be unpacked ({type(exc).__name__})") from None


def docx_text(raw: bytes, name: str) -> str:
    """A Word document's paragraphs as lines: tabs and line breaks kept.

    A paragraph inside another (a text box) is a line of its own, so nesting costs nothing.
    """
    archive, budget = open_archive(raw, name, ".docx"), OfficeBudget(name)
    lines: list[str] = []
    paragraphs: list[list[str]] = []  # the paragraphs open around the parser, innermost last
    in_text = False

    def start(tag: str, _: dict[str, str]) -> None:
        nonlocal in_text
        if tag == f"{WORD_NS}p":
            paragraphs.append([])
        elif tag == f"{WORD_NS}t":
            in_text = True
        elif paragraphs and tag in (f"{WORD_NS}tab", f"{WORD_NS}br", f"{WORD_NS}cr"):
            budget.produce(1)
            paragraphs[-1].append("\t" if tag == f"{WORD_NS}tab" else "\n")

    def end(tag: str) -> None:
        nonlocal in_text
        if tag == f"{WORD_NS}p":
            lines.append("".join(paragraphs.pop()))
        elif tag == f"{WORD_NS}t":
            in_text = False

    def text(data: str) -> None:
        if in_text and paragraphs:
            budget.produce(len(data))
            paragraphs[-1].append(data)

    if not stream_part(archive, "word/document.xml", budget, start, end, text):
        raise GenerationError(f"{name} is not a Word document (it has no word/document.xml)")
    return "\n".join(lines).replace("\x00", "")


def xlsx_rows(raw: bytes, name: str) -> tuple[list[list[str]], list[str]]:
    """The workbook's sheet with the most rows (the data, not a cover page) as rows of cell text,
    gaps filled with empty cells, and a note naming it when it is not the first sheet.

    Columns empty in every row are left out and so are empty rows: a cell far to the
    right, or a million blank rows, cost nothing.
    """
    archive, budget = open_archive(raw, name, ".xlsx"), OfficeBudget(name)
    strings = shared_strings(archive, budget)
    tables = []
    for title, part in sheet_parts(archive, budget):
        sheet = SheetReader(strings, budget)
        if stream_part(archive, part, budget, sheet.start, sheet.end, sheet.text):
            tables.append((title, sheet.table()))
    if not tables:
        raise GenerationError(f"{name} is not an Excel workbook (it has no worksheet)")
    title, rows = max(tables, key=lambda table: len(table[1]))  # the first of the longest
    if len(rows) < 2:  # not even a header and one response
        sheets = named_list(title for title, _ in tables)
        raise GenerationError(
            f"{name} holds no table of responses (a header row, then a row each) in its sheets {sheets}"
        )
    if title == tables[0][0]:
        return rows, []
    others = named_list(other for other, _ in tables if other != title)
    return rows, [f"{name}: read its sheet {title!r}, the one with the most rows (the others: {others})"]


def shared_strings(archive: Any, budget: OfficeBudget) -> list[str]:
    """The workbook's shared strings, each the text of its runs (phonetic guides left out)."""
    strings: list[str] = []
    pieces: list[str] = []
    inside = {"t": False, "rPh": False}

    def start(tag: str, _: dict[str, str]) -> None:
        local = tag.removeprefix(SHEET_NS)
        if local in inside:
            inside[local] = True
        elif local == "si":
            pieces.clear()

    def end(tag: str) -> None:
        local = tag.removeprefix(SHEET_NS)
        if local in inside:
            inside[local] = False
        elif local == "si":
            if len(strings) >= MAX_SHEET_CELLS:
                raise GenerationError(f"{budget.name} holds more than {MAX_SHEET_CELLS:,} shared strings")
            strings.append("".join(pieces))

    def text(data: str) -> None:
        if inside["t"] and not inside["rPh"]:
            budget.produce(len(data))
            pieces.append(data)

    stream_part(archive, "xl/sharedStrings.xml", budget, start, end, text)
    return strings


class SheetReader:
    """A worksheet's cells as they stream by, each non-empty row kept as {column: text}."""

    def __init__(self, strings: list[str], budget: OfficeBudget) -> None:
        self.strings, self.budget = strings, budget
        self.rows: list[dict[int, str]] = []
        self.width = MAX_SHEET_COLUMNS  # the header row narrows it: a stray cell far right widens nothing
        self.cells = 0
        self.row: dict[int, str] = {}
        self.column, self.into = -1, ""  # the open cell's column; `into` is "v", "t" or ""
        self.kind: str | None = None  # the open cell's type
        self.values: list[str] = []
        self.inline: list[str] = []

    def start(self, tag: str, attributes: dict[str, str]) -> None:
        local = tag.removeprefix(SHEET_NS)
        if local == "row":
            self.row, self.column = {}, -1
        elif local == "c":
            self.column = cell_column(attributes.get("r"), self.column + 1)
            self.kind, self.values, self.inline = attributes.get("t"), [], []
        elif local in ("v", "t"):
            self.into = local

    def end(self, tag: str) -> None:
        local = tag.removeprefix(SHEET_NS)
        if local in ("v", "t"):
            self.into = ""
        elif local == "c":
            value = cell_value(self.kind, "".join(self.values), "".join(self.inline), self.strings)
            if value and self.column < self.width:
                self.cells += 1
                if self.cells > MAX_SHEET_CELLS:
                    raise GenerationError(f"{self.budget.name} holds more than {MAX_SHEET_CELLS:,} cells")
                self.row[self.column] = value
        elif local == "row" and self.row:
            if not self.rows:
                self.width = max(self.row) + 1
            self.rows.append(self.row)

    def text(self, data: str) -> None:
        if self.into:
            self.budget.produce(len(data))
            (self.values if self.into == "v" else self.inline).append(data)

    def table(self) -> list[list[str]]:
        """The rows as lists over the columns that hold something; trailing empty cells left off."""
        used = sorted({column for row in self.rows for column in row})
        if len(self.rows) * len(used) > MAX_SHEET_CELLS:
            raise GenerationError(
                f"{self.budget.name} is a sheet of {len(self.rows):,} rows by {len(used):,} "
                f"columns, more than {MAX_SHEET_CELLS:,} cells"
            )
        table = []
        for row in self.rows:
            cells = [row.get(column, "") for column in used]
            while cells and not cells[-1]:
                cells.pop()
            table.append(cells)
        return table


def sheet_parts(archive: Any, budget: OfficeBudget) -> list[tuple[str, str]]:
    """Each sheet's name and the part holding it, in the workbook's order, through its relationships."""
    wanted: list[tuple[str, str]] = []
    targets: dict[str, str] = {}

    def in_workbook(tag: str, attributes: dict[str, str]) -> None:
        if tag == f"{SHEET_NS}sheet" and len(wanted) < MAX_SHEETS:
            wanted.append((attributes.get("name", f"Sheet{len(wanted) + 1}"), attributes.get(f"{DOC_RELS_NS}id", "")))

    def in_rels(tag: str, attributes: dict[str, str]) -> None:
        if tag == f"{RELS_NS}Relationship":
            targets.setdefault(attributes.get("Id", ""), attributes.get("Target", ""))

    def nothing(*_: Any) -> None:
        pass

    stream_part(archive, "xl/workbook.xml", budget, in_workbook, nothing, nothing)
    stream_part(archive, "xl/_rels/workbook.xml.rels", budget, in_rels, nothing, nothing)
    parts = []
    for title, relation in wanted:
        target = targets.get(relation)
        if target:
            parts.append((title, target.lstrip("/") if target.startswith("/") else f"xl/{target}"))
    return parts or [("Sheet1", "xl/worksheets/sheet1.xml")]


def cell_column(reference: str | None, position: int) -> int:
    """`C7` -> 2; a cell without a reference sits after the one before it."""
    letters = re.match(r"[A-Z]{1,3}", reference or "")
    if not letters:
        return position
    return functools.reduce(lambda total, letter: total * 26 + ord(letter) - 64, letters.group(), 0) - 1


def cell_value(kind: str | None, value: str, inline: str, strings: list[str]) -> str:
    """A cell's text from its type, its `<v>` and its inline string."""
    if kind == "inlineStr":
        return inline
    if kind == "s" and value.isascii() and value.isdigit() and int(value) < len(strings):
        return strings[int(value)]
    if kind == "b":
        return "TRUE" if value == "1" else "FALSE"
    if re.fullmatch(r"-?\d+\.0", value):
        return value[:-2]
    return value


# ---------------------------------------------------------------------------
# Data loading: tables (survey, feedback and review exports, one row a response)
# ---------------------------------------------------------------------------

# Column names, squashed to letters and digits, that identify a participant, best first.
ID_COLUMNS = (
    "participantid",
    "participant",
    "respondentid",
    "respondent",
    "intervieweeid",
    "interviewee",
    "responseid",
    "reviewid",
    "userid",
    "customerid",
    "subjectid",
    "personid",
    "recordid",
    "submissionid",
    "pid",
    "uid",
    "id",
    "#",
    "token",
    "uuid",
)
METADATA_COLUMNS = frozenset(
    """
startdate enddate status ipaddress ip progress durationinseconds duration finished recordeddate
externalreference externaldatareference locationlatitude locationlongitude latitude longitude
distributionchannel userlanguage language timestamp submittedat submitdate submitdateutc startdateutc
networkid collectorid tags useragent browser operatingsystem os device devicetype screenresolution
date time datetime createdat updatedat at repliedat userimage avatar reviewcreatedversion appversion
version url link thumbsupcount helpfulcount responsetype qualtricssurveyid surveyid
""".split()
)
PERSONAL_COLUMNS = frozenset(
    """
name username fullname firstname lastname author authorname reviewer reviewername nickname email
emailaddress phone phonenumber mobile contact recipientname recipientfirstname recipientlastname
recipientemail respondentname participantname customername yourname yourfullname whatisyourname whatsyourname
nameoptional yournameoptional fullnameoptional yourfirstname yourlastname
""".split()
)
REPLY_COLUMNS = frozenset("developerresponse responsefromdeveloper companyresponse responsefromcompany".split())
TIMESTAMP_VALUE = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[ T]\d{1,2}:\d{2}(?::\d{2})?(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?)?"
    r"|\d{1,2}/\d{1,2}/\d{2,4}(?:,? \d{1,2}:\d{2}(?::\d{2})?(?: ?[AaPp][Mm])?)?"
)
IP_VALUE = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}|[0-9a-fA-F:]{2,39}:[0-9a-fA-F]{1,4}")
TOKEN_VALUE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|"
    r"(?=[A-Za-z_:-]*\d)[\w:-]{16,}"
)
EMAIL_VALUE = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}\.[A-Za-z]{2,24}")
PIPED_TEXT = re.compile(r"\[QID\d+[^\]]{0,80}\]|\$\{[^}]{0,120}\}")
IMPORT_ID_CELL = re.compile(r'\s*\{\s*"ImportId"')
# Answers that say there is nothing to say: not speech, and no reason to count a respondent.
# Matched against the answer's words alone, its punctuation around them stripped in
# linear time first: a pattern that took punctuation runs itself was cubic in them.
NON_ANSWER_WORDS = re.compile(
    r"none|n\s*(?:/\s*)?a|na|no|nope|nothing|nil|null|not really|not sure|no comments?|"
    r"idk|i don'?t know|none so far|nothing (?:else|more|to add)|no thanks?",
    re.IGNORECASE,
)
WORD_CHARACTER = re.compile(r"\w")
SECOND_HEADER_CELLS = frozenset(("response", "open-ended response", "open ended response"))


def squash(name: str) -> str:
    """A name or a text reduced to lower-case letters, digits and '#', so that neither spacing nor
    punctuation tells two apart: `Response ID` = `responseId`."""
    return re.sub(r"[^a-z0-9#]", "", name.lower())


def normalise_key(key: str) -> str:
    return re.sub(r"[\s\-]+", "_", key.strip().lower())


def is_non_answer(text: str) -> bool:
    """`n/a`, `Nothing.`, `--`, `???`: an answer that says there is nothing to say."""
    first = WORD_CHARACTER.search(text)
    if first is None:
        return any(mark in text for mark in "-.?")
    from_end = WORD_CHARACTER.search(text[::-1])
    last = len(text) - (from_end.start() if from_end else 0)
    return NON_ANSWER_WORDS.fullmatch(text, first.start(), last) is not None


def is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def cell_texts(value: Any) -> list[str]:
    if value is None or isinstance(value, bool):
        return []
    if isinstance(value, list):
        return [text for item in value for text in cell_texts(item)]
    if isinstance(value, dict):
        return [text for item in value.values() for text in cell_texts(item)]
    text = PIPED_TEXT.sub("", str(value).replace("\x00", "")).strip()
    return list_literal(text) if text.startswith("[") and text.endswith("]") else [text] if text else []


def list_literal(text: str) -> list[str]:
    """A cell that an export wrote as a list (`['Fees', 'Login']`, `[]`) is its items; other text stays whole."""
    items = re.findall(r"'([^'\n]{0,200})'|\"([^\"\n]{0,200})\"", text[1:-1]) if len(text) < 4000 else []
    rest = re.sub(r"'[^'\n]{0,200}'|\"[^\"\n]{0,200}\"", "", text[1:-1]) if len(text) < 4000 else text
    if rest.replace(",", "").strip():
        return [text]
    return [single or double for single, double in items if (single or double).strip()]


def sniff_delimiter(text: str, fmt: str) -> str:
    """The header line's most frequent separator; TSV files are always tab."""
    if fmt == "tsv":
        return "\t"
    header = text[:65536].split("\n", 1)[0]
    return max(",;\t|", key=header.count)


def decode_table(raw: bytes, name: str) -> tuple[str, list[str]]:
    """A CSV's or TSV's text as the tools that write them encode it: UTF-8; UTF-16 with its byte
    order mark (Excel's "Unicode Text"); else Windows-1252 (Excel's CSV on Windows), said in a warning."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = raw.decode("utf-16").replace("\x00", "")
            return text, [f'{name} is UTF-16 text, as Excel saves "Unicode Text"; it was read as such']
        except UnicodeDecodeError:
            raise GenerationError(f"{name} starts as UTF-16 text but is not valid UTF-16") from None
    try:
        return decode_text(raw, name), []
    except GenerationError:
        text = raw.decode("cp1252", errors="replace").replace("\x00", "")
        return text, [f"{name} is not UTF-8; it was read as Windows-1252, as Excel saves CSV files on Windows"]


def table_rows(raw: bytes, fmt: str, name: str) -> tuple[list[list[str]], list[str]]:
    """A table's rows, and what reading them assumed."""
    if fmt == "xlsx":
        return xlsx_rows(raw, name)
    text, notes = decode_table(raw, name)
    try:
        return list(csv.reader(io.StringIO(text, newline=""), delimiter=sniff_delimiter(text, fmt))), notes
    except csv.Error as exc:
        raise GenerationError(f"{name} is not valid CSV: {exc}") from None


def records_from_rows(rows: list[list[str]], name: str) -> tuple[list[JSON], dict[str, str], list[str]]:
    """Records from a table, its export rows taken out: returns records, question labels, warnings.

    Qualtrics puts each question's text in the row under the header and, in newer
    exports, an `ImportId` row under that; SurveyMonkey puts a second header row
    (`Response`, `Open-Ended Response`, or each choice) under the questions.
    """
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise GenerationError(f"{name} is empty")
    header, body, warnings = unique_headers(rows[0]), rows[1:], []
    labels: dict[str, str] = {}
    choices: dict[str, tuple[str, str]] = {}
    if body and is_second_header(header, body[0]):
        header, choices, body = *merged_headers(header, body[0]), body[1:]
        warnings.append(f"{name}: read its second header row as the answer labels (a SurveyMonkey export)")
    if body and (is_question_row(header, body[0]) or (len(body) > 1 and is_import_id_row(body[1]))):
        labels = {
            column: PIPED_TEXT.sub("", text).strip()
            for column, text in zip(header, body[0])
            if text.strip() and squash(text) != squash(column)
        }
        warnings.append(f"{name}: read the row under the header as question text, not as a participant")
        body = body[1:]
    while body and is_import_id_row(body[0]):  # Qualtrics: each column's ImportId, under the questions
        body = body[1:]
    if not body:
        raise GenerationError(f"{name} has a header but no rows")
    records = [merge_choices({column: cell for column, cell in zip(header, row)}, choices) for row in body]
    return records, labels, warnings


def unique_headers(row: list[str]) -> list[str]:
    """Header cells stripped, blank ones named by position and repeats numbered."""
    seen: Counter[str] = Counter()
    header = []
    for index, cell in enumerate(row):
        column = cell.strip().lstrip("\ufeff") or f"column_{index + 1}"
        seen[column] += 1
        header.append(column if seen[column] == 1 else f"{column}_{seen[column]}")
    return header


def is_import_id_row(row: list[str]) -> bool:
    return sum(bool(IMPORT_ID_CELL.match(cell)) for cell in row) >= max(1, len(row) // 2)


def is_question_row(header: list[str], row: list[str]) -> bool:
    """A row that restates the header in words (`StartDate` -> `Start Date`) is question text."""
    same = sum(1 for column, cell in zip(header, row) if cell.strip() and squash(cell) == squash(column))
    return same >= 2 or (same >= 1 and len(header) <= 3)


def is_second_header(header: list[str], row: list[str]) -> bool:
    blanks = sum(column.startswith("column_") for column in header)
    return blanks > 0 and any(cell.strip().lower() in SECOND_HEADER_CELLS for cell in row)


def merged_headers(header: list[str], second: list[str]) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """A question over several columns, each named `question - choice` (blank header cells carry on).

    Also returns, for each such column, its (question, choice): a ticked box holds its choice.
    """
    merged, parts, question = [], [], ""
    for column, sub in itertools.zip_longest(header, second, fillvalue=""):
        if not column.startswith("column_"):
            question = column
        sub = sub.strip()
        plain = not sub or sub.lower() in SECOND_HEADER_CELLS
        merged.append(question if plain else f"{question} - {sub}")
        parts.append(None if plain else (question, sub))
    names = unique_headers(merged)
    return names, {name: part for name, part in zip(names, parts) if part}


def merge_choices(record: dict[str, str], choices: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Tick-box columns (`Features - Reports` holding `Reports`) become one answer: `Reports; Exports`."""
    if not choices:
        return record
    merged: dict[str, str] = {}
    for column, cell in record.items():
        part = choices.get(column)
        if part and cell.strip() == part[1]:
            merged[part[0]] = f"{merged[part[0]]}; {cell.strip()}" if merged.get(part[0]) else cell.strip()
        elif part and not cell.strip():
            merged.setdefault(part[0], "")
        elif cell.strip() or column not in merged:  # a blank cell never hides the ticked choices
            merged[column] = cell
    return merged


def records_from_json(text: str, name: str) -> list[Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise GenerationError(f"{name} is not valid JSON: {exc}") from None
    return record_list(value, name)


def record_list(value: Any, name: str) -> list[Any]:
    """An array of records, or the one array a survey export holds."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        arrays = {key: item for key, item in value.items() if isinstance(item, list) and item}
        for key in RECORD_LIST_KEYS:
            if key in arrays:
                return arrays[key]
        if arrays:
            return next(iter(arrays.values()))
    raise GenerationError(f"{name} holds no array of responses (expected a list, or an object with one)")


def records_from_jsonl(text: str, name: str) -> list[Any]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except (ValueError, RecursionError) as exc:
                raise GenerationError(f"{name} line {number} is not valid JSON: {exc}") from None
    return records


def flatten_record(record: Any) -> dict[str, Any]:
    """One level of nesting becomes dotted keys; lists of strings stay lists; NUL goes."""
    if isinstance(record, str):
        return {"text": record}
    if not isinstance(record, dict):
        return {"value": record}
    flat: dict[str, Any] = {}
    for key, value in record.items():
        key = str(key).replace("\x00", "")
        if isinstance(value, dict):
            for inner, item in value.items():
                flat[f"{key}.{inner}".replace("\x00", "")] = item
        else:
            flat[key] = value
    return flat


@dataclass
class Columns:
    """What each column of a table is: the id, speech, attributes, or dropped for a reason."""

    id: str | None
    speech: list[str]
    attributes: list[str]
    dropped: dict[str, list[str]]


def id_column(columns: list[str], records: list[dict[str, Any]]) -> str | None:
    """The participant id column: by name, else a column of unique UUID-like values."""
    by_name = {squash(column.rpartition(".")[2]): column for column in reversed(columns)}
    named = next((by_name[name] for name in ID_COLUMNS if name in by_name), None)
    if named is not None:
        return named
    for column in columns:
        values = [text for record in records for text in cell_texts(record.get(column))]
        if (
            len(values) == len(records) > 1
            and len(set(values)) == len(values)
            and all(TOKEN_VALUE.fullmatch(value) for value in values)
        ):
            return column
    return None


def dropped_reason(column: str, values: list[str], label: str, rows: int) -> str | None:
    """Why a column is neither speech nor an attribute, or None when it is one of them."""
    name = column.rpartition(".")[2].strip()
    key, words = squash(name), f"{column} {label}".lower()
    short = len(re.findall(r"[A-Za-z]+", re.sub(r"([a-z])([A-Z])", r"\1 \2", name))) <= 3  # a name, not a question
    if (
        key in PERSONAL_COLUMNS
        or (short and "email" in key)
        or (values and all(EMAIL_VALUE.fullmatch(v) for v in values))
    ):
        return "personal data"
    if key in REPLY_COLUMNS or (short and ("reply" in key or "replied" in key)):
        return "replies to the participant"
    if (
        key in METADATA_COLUMNS
        or key.startswith(("recipient", "customdata", "embeddeddata"))
        or re.search(r"(?:^|[_ .-])(?:id|ID|Id)$|[a-z]Id$", name)
        or (short and "sentiment" in key)
    ):
        return "metadata"
    if values and all(
        TIMESTAMP_VALUE.fullmatch(v) or IP_VALUE.fullmatch(v) or v.startswith(("http://", "https://")) for v in values
    ):
        return "metadata"
    if "consent" in words or "agree to participate" in words:
        return "consent"
    if values and all(TOKEN_VALUE.fullmatch(v) for v in values):
        return "metadata"
    if rows >= 3 and len(values) >= 2 and len(set(values)) == 1:
        return "one value for everyone"
    return None


def is_speech(records: list[dict[str, Any]], column: str, values: list[str]) -> bool:
    """Long, varied answers are what people said; few repeated choices are an attribute."""
    if not values or all(is_number(value) for value in values):
        return False
    if any(isinstance(record.get(column), (list, dict)) for record in records):
        return True
    choices = Counter(part.strip() for value in values for part in re.split(r"[;,]", value) if part.strip())
    if is_multiple_choice(values, choices):
        return False
    if (
        len(values) >= 10
        and len(set(values)) >= 0.9 * len(values)
        and sum(len(v.split()) for v in values) >= 2 * len(values)
    ):
        return True  # nearly every answer its own words: a review's title, a one-line comment
    if not choices:  # nothing but separators: nothing said
        return False
    if len(choices) <= 12 and len(values) >= 2 * len(choices) and max(map(len, choices)) <= 60:
        return False
    if is_choice_column(values, choices):
        return False
    return sum(map(len, values)) / len(values) >= 30 or max(len(value.split()) for value in values) >= 12


MULTIPLE_CHOICE_SHARE = 0.8  # of the options ticked, the share that are options many ticked


def is_multiple_choice(values: list[str], choices: Counter[str]) -> bool:
    """Options ticked together ("Error messages, Language syntax"): each answer a new combination, but
    nearly every part of it an option that recurs. Free text split at its commas hardly recurs."""
    ticked = sum(choices.values())
    if len(values) < 10 or ticked < 1.5 * len(values):
        return False
    recurring = sum(times for times in choices.values() if times >= max(3, 0.02 * len(values)))
    return recurring >= MULTIPLE_CHOICE_SHARE * ticked


def is_choice_column(values: list[str], choices: Counter[str]) -> bool:
    """Answers that repeat (a school, a role, a country, options ticked together) are choices, however many.

    Told by the values, not their length: few distinct options for many answers, and
    hardly any answer a long sentence of its own.
    """
    if len(values) < 10 or len(choices) > 0.3 * len(values):
        return False
    times = Counter(values)
    own_sentences = sum(1 for value in values if times[value] == 1 and len(value.split()) >= 8)
    return own_sentences < 0.1 * len(values)


def classify_columns(records: list[dict[str, Any]], labels: dict[str, str]) -> Columns:
    columns = list(dict.fromkeys(key for record in records for key in record))
    id_key = id_column(columns, records)
    result = Columns(id_key, [], [], {})
    lengths: dict[str, float] = {}
    for column in columns:
        if column == id_key:
            continue
        values = [text for record in records for text in cell_texts(record.get(column))]
        if not values:
            continue
        reason = dropped_reason(column, values, labels.get(column, ""), len(records))
        if reason:
            result.dropped.setdefault(reason, []).append(column)
        elif is_speech(records, column, values):
            result.speech.append(column)
        else:
            result.attributes.append(column)
            if not all(is_number(value) for value in values):
                lengths[column] = sum(map(len, values)) / len(values)
    if not result.speech and lengths:  # a survey of one-line answers still has something to say
        longest = max(lengths, key=lengths.__getitem__)
        result.speech.append(longest)
        result.attributes.remove(longest)
    return result


def participants_from_records(
    records: list[Any], name: str, labels: dict[str, str] | None = None
) -> tuple[list[Participant], list[str], list[str]]:
    """Group records by participant id: speech columns give units, the others attributes.

    A respondent who answered only closed questions is a participant; one who answered
    nothing at all is left out, and returned (third) so that coverage still counts them.
    """
    flat = [flatten_record(record) for record in records]
    labels = labels or {}
    columns = classify_columns(flat, labels)
    people: dict[str, Participant] = {}
    for number, record in enumerate(flat, 1):
        raw_id = cell_texts(record.get(columns.id)) if columns.id else []
        pid = raw_id[0] if raw_id else f"{Path(name).stem}-{number:03d}"
        person = people.setdefault(pid, Participant(pid))
        for column in columns.speech:
            answers = [text for text in cell_texts(record.get(column)) if not is_non_answer(text)]
            person.texts.extend(answers)
            person.asked.update(dict.fromkeys(answers, labels.get(column) or column))
        for column in columns.attributes:
            values = cell_texts(record.get(column))
            if values and normalise_key(column) not in person.attributes:
                person.attributes[normalise_key(column)] = "; ".join(values)
    answered = [person for person in people.values() if person.texts or person.attributes]
    silent = [person.id for person in people.values() if not (person.texts or person.attributes)]
    warnings = column_warnings(columns, name, len(flat))
    if silent:
        warnings.append(f"{name}: left out {len(silent)} respondent(s) who answered nothing: {named_list(silent)}")
    return answered, warnings, silent


def column_labels(records: list[Any], questions: dict[str, str]) -> dict[str, str]:
    """How to name each column to a reader: its question where it is a code (Q12), else its header as written."""
    columns = dict.fromkeys(key for record in records if isinstance(record, dict) for key in record)
    return {
        column: questions.get(column) or column
        for column in columns
        if questions.get(column) or normalise_key(column) != column
    }


def column_warnings(columns: Columns, name: str, rows: int) -> list[str]:
    warnings = []
    if columns.id is None and rows > 1:
        warnings.append(
            f"{name}: no participant id column (such as participant_id or ResponseId); "
            "each row was read as one participant"
        )
    for reason, dropped in columns.dropped.items():
        warnings.append(f"{name}: left out {len(dropped)} column(s) as {reason}: {named_list(dropped)}")
    return warnings


NAME_COLUMNS = frozenset(
    """
name username fullname firstname lastname givenname surname familyname author authorname reviewer reviewername
nickname displayname recipientname recipientfirstname recipientlastname respondentname participantname
customername intervieweename speaker speakername yourname yourfullname whatisyourname whatsyourname nameoptional
yournameoptional fullnameoptional yourfirstname yourlastname respondent
""".split()
)


ANONYMOUS_NAMES = frozenset(
    {
        "a google user",
        "amazon customer",
        "kindle customer",
        "verified buyer",
        "verified purchaser",
        "anonymous",
        "anon",
        "guest",
        "user",
        "customer",
        "speaker",
        "unknown",
        "n/a",
        "none",
    }
)


def marked_names(records: list[Any]) -> set[str]:
    """The values of name-like columns (`name`, `userName`, `author`, ...): the people a table names."""
    names: set[str] = set()
    for record in records:
        for column, value in flatten_record(record).items():
            if squash(column.rpartition(".")[2]) in NAME_COLUMNS:
                names.update(text for text in cell_texts(value) if text.strip().lower() not in ANONYMOUS_NAMES)
    return names


def grid_parts(header: str) -> tuple[str, str] | None:
    """A grid question's stem and item: `Question [item]` as Google Forms writes it, `Question - item` as
    Qualtrics' question row and SurveyMonkey's second header row give it; None for any other header."""
    text = header.rstrip()
    opening = text.rfind("[")
    if text.endswith("]") and opening >= 0 and "]" not in text[opening:-1] and text[opening + 1 : -1].strip():
        return text[:opening].rstrip(), text[opening + 1 : -1].strip()
    stem, dash, item = text.rpartition(" - ")
    if dash and item.strip() and len(stem.split()) >= 3 and stem.rfind("(") <= stem.rfind(")"):
        return stem.rstrip(), item.strip()
    return None  # a dash inside brackets is the question's own: "... programs? (ps - our list includes ...)"


def header_of(key: str, labels: Mapping[str, str]) -> str:
    """An attribute's column header: its question's text where the export gave one, else its key in words."""
    return labels.get(key) or key.replace("_", " ")


def question_text(key: str, labels: Mapping[str, str]) -> str:
    """A closed question as a reader knows it: its header in full, a grid's `[item]` read into the sentence
    where the stem ends in punctuation ("... how often do you… Re-run the build.", "... agree? Flaky tests
    ..."), in its brackets after any other stem ("Rank these features by importance [Better error messages]"):
    whether the item carries the stem on ("How often do you use [JupyterLab]") the words do not say."""
    header = header_of(key, labels)
    grid = grid_parts(header)
    if not grid:
        return header.strip()
    stem, item = grid
    return f"{stem} {item}" if stem[-1:] and not stem[-1].isalnum() else f"{stem} [{item}]"


# ---------------------------------------------------------------------------
# Data loading: transcripts (interviews as turns, the interviewer told from the participant)
# ---------------------------------------------------------------------------

INTERVIEWER_ROLES = frozenset(
    (
        "interviewer",
        "moderator",
        "facilitator",
        "researcher",
        "host",
        "int",
        "iv",
        "i",
        "q",
        "question",
        "ux researcher",
        "user researcher",
        "research lead",
        "note taker",
        "notetaker",
    )
)
PARTICIPANT_ROLES = frozenset(
    (
        "participant",
        "respondent",
        "interviewee",
        "r",
        "a",
        "answer",
        "p",
        "user",
        "customer",
        "subject",
        "candidate",
        "guest",
    )
)
HEADER_SKIPPED = frozenset(
    """
date time duration length interviewer interviewers moderator facilitator researcher transcriber transcript
recording file filename session study project notes note id participant participantid interview interviewid
""".split()
)
TIME = r"\d{1,2}:\d{2}(?::\d{2})?(?:[.,]\d{1,3})?"
LABEL = r"(?:\*\*|__)?\[?(?P<label>[A-Za-z][\w.'’-]{0,30}(?: [\w.'’-]{1,30}){0,3}?)\]?(?:\*\*|__)?"
# Each pattern sees at most a line's first LABEL_SCAN characters: no line can make it backtrack for long.
LABEL_SCAN = 120
LEADING_TIME = re.compile(rf"\s*[\[(]?{TIME}[\])]?\s+")
SPEAKER_TURN = re.compile(rf"{LABEL}(?:\s*[\[(]?{TIME}[\])]?)?\s*(?:\*\*|__)?:(?:\*\*|__)?(?=\s|$)")
SPEAKER_HEADING = re.compile(rf"{LABEL}\s+[\[(]?{TIME}[\])]?\s*")
CUE_TIMING = re.compile(rf"\s*{TIME}\s*-->\s*{TIME}")
VOICE_TAG = re.compile(r"<v(?:\.[\w.-]{0,40})?\s+([^>]{1,60})>")
MARKUP_TAG = re.compile(r"</?[A-Za-z][^<>]{0,100}>")
NON_SPEECH = re.compile(
    r"\\?[\[(](?:laugh\w*|inaudible|crosstalk|pause\w*|silence|music|unclear|applause|"
    r"indistinct|background noise|coughs?|sighs?|overlapping)[^\])]{0,30}\\?[\])]|"
    rf"\\?[\[(]{TIME}\\?[\])]",
    re.IGNORECASE,
)
NOTICE = re.compile(
    r"\b(?:(?:is|are|being|been) (?:being )?recorded|recording (?:has )?(?:started|stopped|in progress)|"
    r"(?:started|stopped) (?:the )?(?:recording|transcription)|transcription (?:has )?(?:started|stopped)|"
    r"consent to (?:be )?record\w*|meeting (?:has )?(?:started|ended))\b",
    re.IGNORECASE,
)
SMALL_TALK = re.compile(
    r"(?:hi|hello|hey|good (?:morning|afternoon|evening)|thanks?|thank you|nice to (?:meet|see)|"
    r"bye|goodbye|see you|can you hear me|you(?:'re| are) (?:on )?mute\w*|how are you|"
    r"(?:i'm|i am) (?:good|fine|well))\b",
    re.IGNORECASE,
)
# How turns, answers and reviews split into sentences: at a stop, after the quotes and brackets it
# closes (they stay with their sentence, so "(We had problems.)" closes its bracket), or a line break.
SENTENCE_END = re.compile(r"(?:(?<=[.!?…])|(?<=[.!?…][\"'”’)])|(?<=[.!?…][\"'”’)]{2}))\s+|\n+")


@dataclass
class Transcript:
    """One file of conversation: its header attributes and its turns, (speaker key or None, text)."""

    pid: str
    name: str
    attributes: dict[str, str]
    turns: list[tuple[str | None, str]]
    coded: dict[str, list[str]] = field(default_factory=dict)  # the passages of it a researcher coded -> codes


def transcript_text(raw: bytes, fmt: str, name: str) -> str:
    """Plain lines of `Speaker: words`, whatever the file: captions and Word files become such lines."""
    if fmt == "docx":
        return docx_text(raw, name)
    text = decode_text(raw, name)
    return caption_lines(text) if fmt in ("vtt", "srt") else text


def caption_lines(text: str) -> str:
    """WebVTT and SubRip cues as lines: timings, numbers and notes go, voice tags become labels.

    Cues cut sentences anywhere, so a cue without a speaker continues the speaker before it.
    """
    lines, speaker = [], None
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n").replace("\r", "\n")):
        cue = block.strip().split("\n")
        if not cue or cue[0].startswith(("WEBVTT", "NOTE", "STYLE", "REGION")):
            continue
        timing = next((index for index, line in enumerate(cue) if CUE_TIMING.match(line)), -1)
        words = []
        for line in cue[timing + 1 :]:  # a cue's identifier comes before its timing: `12`, `8e0b…/20-0`
            if line.strip().isdigit() and timing < 0:
                continue
            voice = VOICE_TAG.search(line[:LABEL_SCAN])
            if voice:
                speaker = voice.group(1).strip()
            words.append(MARKUP_TAG.sub("", line).strip())
        said = " ".join(word for word in words if word)
        if not said:
            continue
        labelled = SPEAKER_TURN.match(said[:LABEL_SCAN])
        if labelled:
            speaker = labelled.group("label")
        lines.append(said if labelled or speaker is None else f"{speaker}: {said}")
    return "\n".join(merge_caption_lines(lines))


def merge_caption_lines(lines: list[str]) -> list[str]:
    """Consecutive cues of one speaker as one turn (pieces joined once, so long captions stay linear)."""
    merged: list[list[str]] = []
    speaker: str | None = None
    for line in lines:
        label = SPEAKER_TURN.match(line[:LABEL_SCAN])
        if label and merged and label.group("label") == speaker:
            merged[-1].append(line[label.end() :].strip())
        elif not label and merged:
            merged[-1].append(line)
        else:
            merged.append([line])
            speaker = label.group("label") if label else None
    return [" ".join(parts) for parts in merged]


def speaker_key(label: str) -> str:
    return " ".join(label.replace("’", "'").lower().split())


def speaker_role(key: str) -> str | None:
    """'interviewer', 'participant', or None for a name: `Interviewer 2` is an interviewer."""
    base = re.sub(r"(?<![\s_\d-])[\s_-]*\d+$", "", key)
    if base in INTERVIEWER_ROLES:
        return "interviewer"
    if base in PARTICIPANT_ROLES:
        return "participant"
    return None


def read_line(line: str) -> tuple[str, str | None, str]:
    """('turn', label, rest), ('heading', label, '') or ('text', None, line) for one stripped line."""
    head = line[:LABEL_SCAN]
    timed = LEADING_TIME.match(head)
    start = timed.end() if timed else 0
    heading = SPEAKER_HEADING.fullmatch(line) if len(line) <= LABEL_SCAN else None
    if heading:
        return "heading", heading.group("label"), ""
    turn = SPEAKER_TURN.match(head, start)
    if turn:
        return "turn", turn.group("label"), line[turn.end() :].strip().lstrip("*_").strip()
    return "text", None, line


def header_block(lines: list[str], labels: Counter[str]) -> tuple[dict[str, str], int]:
    """A leading `Key: value` block, when it is one: short keys and values, then a blank line.

    A first sentence that happens to hold a colon, or a speaker's first turn, is no header.
    """
    end = next((index for index, line in enumerate(lines) if not line.strip()), len(lines))
    if end == 0 or end == len(lines) or end > 20:
        return {}, 0
    found = {}
    for line in lines[:end]:
        key, colon, value = line.strip().partition(":")
        key, value = key.strip().strip("*_ ").strip(), value.strip().strip("*_ ").strip()
        if not colon or not re.fullmatch(r"[A-Za-z][\w ()/-]{0,30}", key) or len(key.split()) > 4:
            return {}, 0
        if (
            not value
            or len(value) > 60
            or len(value.split()) > 8
            or value.endswith("?")
            or (value.endswith((".", "!")) and len(value.split()) > 2)
        ):
            return {}, 0
        if speaker_key(key) in labels or speaker_role(speaker_key(key)):
            return {}, 0
        found[key] = value
    return found, end


def header_attributes(found: dict[str, str]) -> dict[str, str]:
    """Header fields that describe the participant: dates, names and the interviewer's own are not."""
    attributes = {}
    for key, value in found.items():
        squashed = squash(key)
        if squashed in HEADER_SKIPPED or squashed in PERSONAL_COLUMNS or squashed in METADATA_COLUMNS:
            continue
        if TIMESTAMP_VALUE.fullmatch(value) or EMAIL_VALUE.fullmatch(value):
            continue
        attributes[normalise_key(key)] = value
    return attributes


def parse_transcript(text: str, pid: str, name: str) -> Transcript:
    """Turns by speaker label; a label counts when it is a role or speaks more than once."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    read = [read_line(re.sub(r"^(?:>|[-•] )\s*", "", line.strip())) for line in lines]
    said: Counter[str] = Counter(speaker_key(label) for kind, label, _ in read if label)
    accepted = {key for key, times in said.items() if times >= 2 or speaker_role(key)}
    found, start = header_block(lines, Counter(accepted))
    turns: list[tuple[str | None, str]] = []
    current: tuple[str | None, list[str]] | None = None
    for (_kind, label, rest), line in zip(read[start:], lines[start:]):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "---")):
            if current and current[1] and current[1][-1] != "\n":
                current[1].append("\n")
            continue
        if label and speaker_key(label) in accepted:
            if current:
                turns.append((current[0], joined(current[1])))
            current = (speaker_key(label), [rest] if rest else [])
        elif current is not None:
            current[1].append(stripped)
        elif not accepted:
            current = (None, [stripped])
    if current:
        turns.append((current[0], joined(current[1])))
    cleaned = [(speaker, clean_turn(words)) for speaker, words in turns]
    return Transcript(pid, name, header_attributes(found), [(s, words) for s, words in cleaned if words])


def joined(parts: list[str]) -> str:
    """A turn's lines: wrapped lines join with a space, paragraphs with a line break."""
    return re.sub(r" ?\n ?", "\n", " ".join(parts)).strip()


def clean_turn(text: str) -> str:
    """A turn without non-speech cues, recording notices or small talk; paragraphs stay apart."""
    paragraphs = []
    for paragraph in NON_SPEECH.sub("", text).split("\n"):
        kept = [
            s.strip()
            for s in SENTENCE_END.split(paragraph)
            if s.strip() and not NOTICE.search(s) and not is_small_talk(s)
        ]
        if kept:
            paragraphs.append(" ".join(kept))
    return "\n".join(paragraphs)


def is_small_talk(sentence: str) -> bool:
    """Greetings, thanks and `can you hear me`: a short sentence with nothing else in it."""
    words = sentence.split()
    return (
        len(words) <= 8
        and SMALL_TALK.match(sentence.strip(" -–—\"'")) is not None
        and len(content_words(SMALL_TALK.sub("", sentence))) <= 1
    )


def interviewer_speakers(transcript: Transcript, files_with: Counter[str], files: int) -> tuple[set[str], str]:
    """Who interviews in this file, and how that was told.

    By label first (`Interviewer`, `Q`, `Moderator 2`); when every speaker is a name,
    by who appears across most files of a study, else by who asks the questions. Where
    some do appear across most files, a third voice heard in other files too that says
    under a tenth of what the file's main speaker says (a producer reading the next
    segment's trailer) is the team's as well; a participant of two sessions is not.
    """
    speakers = list(dict.fromkeys(speaker for speaker, _ in transcript.turns if speaker))
    roles = {speaker: speaker_role(speaker) for speaker in speakers}
    named = [speaker for speaker in speakers if roles[speaker] is None]
    if any(role == "interviewer" for role in roles.values()):
        return {s for s in speakers if roles[s] == "interviewer"}, "by its label"
    if len(speakers) < 2:
        return set(), ""
    if any(role == "participant" for role in roles.values()):
        return set(named), "beside a participant label"
    if files >= 3:
        recurring = {s for s in speakers if files_with[s] >= max(2, files / 2)}
        if recurring and len(recurring) < len(speakers):
            words = question_shares(transcript)[1]
            main = max(words[s] for s in speakers if s not in recurring)
            aside = {s for s in speakers if s not in recurring and files_with[s] >= 2 and 10 * words[s] < main}
            return recurring | aside, "appears across the study's files"
    asks, words = question_shares(transcript)
    best = max(speakers, key=lambda s: (asks[s], -words[s]))
    if asks[best] > 0 and all(asks[best] > asks[s] for s in speakers if s != best):
        return {best}, "asks the questions"
    return set(), ""


def question_shares(transcript: Transcript) -> tuple[dict[str, float], Counter[str]]:
    """Per speaker, the share of their turns that ask something, and how many words they said; one pass."""
    turns: Counter[str] = Counter()
    questions: Counter[str] = Counter()
    words: Counter[str] = Counter()
    for speaker, said in transcript.turns:
        if speaker:
            turns[speaker] += 1
            questions[speaker] += "?" in said
            words[speaker] += len(said.split())
    return {speaker: questions[speaker] / turns[speaker] for speaker in turns}, words


def participants_from_transcripts(transcripts: list[Transcript]) -> tuple[list[Participant], list[str]]:
    """One participant per file: everything but the interviewer's turns, each turn a unit."""
    files_with: Counter[str] = Counter(s for t in transcripts for s in {s for s, _ in t.turns if s})
    taken: dict[tuple[str, str], list[str]] = {}
    unsure: list[str] = []
    people = []
    for transcript in transcripts:
        interviewers, how = interviewer_speakers(transcript, files_with, len(transcripts))
        for speaker in sorted(interviewers):
            taken.setdefault((speaker, how), []).append(transcript.name)
        if not interviewers and len({s for s, _ in transcript.turns if s}) >= 2:
            unsure.append(transcript.name)
        texts = [words for speaker, words in transcript.turns if speaker not in interviewers]
        if texts:
            people.append(Participant(transcript.pid, texts, transcript.attributes, transcript.coded))
    warnings = [
        f"took {speaker!r} as the interviewer ({how}) in {len(names)} file(s); "
        "the interviewer's words are context, never persona content"
        for (speaker, how), names in taken.items()
    ]
    if unsure:
        warnings.append(
            f"could not tell the interviewer from the participant in {named_list(unsure)}; "
            "every speaker there was read as the participant"
        )
    return people, warnings


# ---------------------------------------------------------------------------
# Data loading: REFI-QDA projects (a researcher's own cases, codes and coded passages)
# ---------------------------------------------------------------------------
#
# A .qdpx is the QDA tools' exchange file (NVivo, ATLAS.ti, MAXQDA, QualCoder, ...): a zip
# holding a project file (`project.qde`, namespace urn:QDA-XML:project:1.0) and the text of
# its sources under `sources/`. It is read as the tools write it, not only as the standard
# says: `Project.qde` or any one `.qde`; `Sources/`; text paths with or without `internal://`.

MAX_QDA_ELEMENTS = 1_000_000  # elements one project file may hold: codes, cases, sources, selections
QDA_OTHER_SOURCES = ("PDFSource", "PictureSource", "AudioSource", "VideoSource")
QDA_VALUES = ("TextValue", "BooleanValue", "IntegerValue", "FloatValue", "DateValue", "DateTimeValue")


@dataclass
class QdaSource:
    """A text source of a project: where its text is, and the coded selections of it (code guids by span)."""

    guid: str
    name: str
    path: str
    text: str = ""  # the text written inside the project file, when it is there
    selections: list[tuple[int, int, list[str]]] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)  # variable guid -> value


@dataclass
class QdaCase:
    name: str
    variables: dict[str, str] = field(default_factory=dict)  # variable guid -> value
    sources: list[str] = field(default_factory=list)  # source guids


@dataclass
class QdaProject:
    """What Persona reads of a project file: codes, variables, cases and text sources."""

    origin: str = ""
    codes: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # guid -> (name, parent guid)
    variables: dict[str, str] = field(default_factory=dict)  # guid -> name
    cases: list[QdaCase] = field(default_factory=list)
    sources: list[QdaSource] = field(default_factory=list)
    other_sources: list[str] = field(default_factory=list)  # PDFs, pictures, audio and video: not read
    sets: list[tuple[str, list[str]]] = field(default_factory=list)  # a set's name and its sources' guids


def qda_project_part(archive: Any, name: str) -> str:
    """The project file inside a .qdpx: `project.qde` as the standard says, else the one `.qde` there is."""
    parts = [info.filename for info in archive.infolist() if info.filename.lower().endswith(".qde")]
    top = [part for part in parts if "/" not in part.strip("/")]
    if "project.qde" in top:
        return "project.qde"
    if len(top) == 1:
        return top[0]
    raise GenerationError(
        f"{name} holds no project file (project.qde)"
        if not top
        else f"{name} holds several project files: {named_list(top)}"
    )


def read_qda_project(archive: Any, part: str, budget: OfficeBudget) -> QdaProject:
    """The project file's codes, variables, cases and sources, streamed: nothing is expanded and
    every element counts against the cap."""
    project, path = QdaProject(), list[str]()  # the open elements' names, outermost first
    code_stack: list[str] = []
    case: QdaCase | None = None
    source: QdaSource | None = None
    selection: tuple[int, int, list[str]] | None = None
    variable, text = "", list[str]()
    elements = 0

    def start(tag: str, attributes: dict[str, str]) -> None:
        nonlocal case, source, selection, variable, elements
        elements += 1
        if elements > MAX_QDA_ELEMENTS:
            raise GenerationError(f"{budget.name} holds more than {MAX_QDA_ELEMENTS:,} elements in {part}")
        local = tag.rpartition(" ")[2]
        parent = path[-1] if path else ""
        path.append(local)
        text.clear()
        guid = attributes.get("guid", "")
        if local == "Project":
            project.origin = attributes.get("origin", "")
        elif local == "Code" and "CodeBook" in path:
            project.codes[guid] = (attributes.get("name", "") or guid, code_stack[-1] if code_stack else None)
            code_stack.append(guid)
        elif local == "Variable" and parent == "Variables":
            project.variables[guid] = attributes.get("name", "") or guid
        elif local == "Case" and parent == "Cases":
            case = QdaCase(attributes.get("name", "") or guid)
        elif local == "SourceRef" and case is not None and parent == "Case":
            case.sources.append(attributes.get("targetGUID", ""))
        elif local == "Set" and parent == "Sets":
            project.sets.append((attributes.get("name", "") or guid, []))
        elif local == "MemberSource" and parent == "Set" and project.sets:
            project.sets[-1][1].append(attributes.get("targetGUID", ""))
        elif local == "VariableRef":
            variable = attributes.get("targetGUID", "")
        elif local == "TextSource" and parent == "Sources":
            source = QdaSource(guid, attributes.get("name", "") or guid, attributes.get("plainTextPath", ""))
        elif local in QDA_OTHER_SOURCES and parent == "Sources":
            project.other_sources.append(attributes.get("name", "") or guid)
        elif local == "PlainTextSelection" and source is not None and parent == "TextSource":
            try:
                selection = (int(attributes["startPosition"]), int(attributes["endPosition"]), [])
            except (KeyError, ValueError):
                selection = None
        elif local == "CodeRef" and selection is not None and parent == "Coding":
            selection[2].append(attributes.get("targetGUID", ""))

    def end(tag: str) -> None:
        nonlocal case, source, selection
        local = path.pop()
        value = "".join(text)
        if local == "Code" and code_stack and "CodeBook" in path:
            code_stack.pop()
        elif local in QDA_VALUES and variable:
            owner = case if case is not None else source
            if owner is not None:
                owner.variables[variable] = value.strip()
        elif local == "Case" and case is not None:
            project.cases.append(case)
            case = None
        elif local == "PlainTextContent" and source is not None and path and path[-1] == "TextSource":
            source.text = value  # counted as it streamed in
        elif local == "PlainTextSelection" and source is not None and selection is not None:
            source.selections.append(selection)
            selection = None
        elif local == "TextSource" and source is not None:
            project.sources.append(source)
            source = None
        text.clear()

    def characters(data: str) -> None:
        if path and path[-1] in (*QDA_VALUES, "PlainTextContent"):
            budget.produce(len(data))
            text.append(data)

    stream_part(archive, part, budget, start, end, characters)
    return project


def qda_source_text(archive: Any, source: QdaSource, budget: OfficeBudget) -> str | None:
    """A source's plain text: written in the project file, or a `.txt` in the archive's sources folder
    (`internal://name.txt`, or a bare name); None when it lies outside the archive."""
    if source.text:
        return source.text
    location = source.path.removeprefix("internal://")
    if not location or "://" in location or location.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", location):
        return None
    wanted = {f"sources/{location}".lower(), location.lower()}
    member = next((info for info in archive.infolist() if info.filename.lower() in wanted), None)
    if member is None:
        return None
    budget.unpack(member.file_size)
    try:
        raw = archive.read(member)
    except Exception as exc:  # a damaged member: the zip module raises several kinds
        raise GenerationError(f"{budget.name} is damaged and cannot be unpacked ({type(exc).__name__})") from None
    budget.produce(len(raw))
    return decode_text(raw, f"{budget.name}: {member.filename}")


def word_edge(text: str, at: int) -> bool:
    """Whether a selection may start or end at `at`: not inside a word."""
    return at <= 0 or at >= len(text) or not (text[at - 1].isalnum() and text[at].isalnum())


def unit_offsets(text: str, size: Callable[[int], int]) -> dict[int, int]:
    """Where each offset falls in `text` when the character at index i counts `size(i)` units."""
    offsets: dict[int, int] = {}
    for index, unit in enumerate(itertools.accumulate((size(i) for i in range(len(text))), initial=0)):
        offsets.setdefault(unit, index)
    return offsets


def coded_passages(text: str, selections: list[tuple[int, int, list[str]]]) -> dict[str, list[str]]:
    """The text of each coded selection, with its codes (guids; a span written once per code is one
    passage with all of them). The standard counts offsets in code points, but NVivo counts
    UTF-16 units (an emoji is two) and ATLAS.ti a Windows line end as one character: the count under
    which more selections start and end between words is the one the tool used."""
    if not selections:
        return {}
    readings = [[(start, end) for start, end, _ in selections]]
    for size in (
        lambda i: 2 if ord(text[i]) > 0xFFFF else 1,
        lambda i: 0 if text[i] == "\n" and i and text[i - 1] == "\r" else 1,
    ):
        offsets = unit_offsets(text, size)
        readings.append([(offsets.get(start, -1), offsets.get(end, -1)) for start, end, _ in selections])

    def fits(spans: list[tuple[int, int]]) -> int:
        return sum(0 <= a < b <= len(text) and word_edge(text, a) and word_edge(text, b) for a, b in spans)

    spans = max(readings, key=fits)  # code points first: they win a tie, as the standard says
    passages: dict[str, list[str]] = {}
    for (a, b), (_, _, refs) in zip(spans, selections):
        if 0 <= a < b <= len(text) and (passage := text[a:b].strip()):
            passages[passage] = list(dict.fromkeys([*passages.get(passage, []), *refs]))
    return passages


def code_attributes(
    selections: Iterable[tuple[int, int, list[str]]], codes: dict[str, tuple[str, str | None]]
) -> dict[str, str]:
    """A participant's codes as attributes `group_by` takes: `code`, the code covering most of their
    coded text, and for each code with sub-codes (`code:Barriers`) the sub-code covering most."""
    covered: Counter[str] = Counter()
    for start, end, refs in selections:
        for ref in dict.fromkeys(refs):
            if ref in codes:
                covered[ref] += max(end - start, 1)
    if not covered:
        return {}
    attributes = {"code": codes[max(covered, key=lambda ref: (covered[ref], codes[ref][0]))][0]}
    within: dict[str, Counter[str]] = {}  # family guid -> its children's coverage, each child's sub-codes counted in
    for ref, size in covered.items():
        child, parent = ref, codes[ref][1]
        while parent is not None and parent in codes:
            within.setdefault(parent, Counter())[child] += size
            child, parent = parent, codes[parent][1]
    for family, children in within.items():
        leader = max(children, key=lambda ref: (children[ref], codes[ref][0]))
        attributes[normalise_key(f"code:{codes[family][0]}")] = codes[leader][0]
    return attributes


def set_attributes(sources: set[str], sets: list[tuple[str, list[str]]]) -> dict[str, str]:
    """The sets a participant's sources belong to, as attributes: a set named `gender: male` (as
    ATLAS.ti names its document groups) gives `gender`; the others are listed under `set`."""
    attributes, plain = {}, []
    for set_name, members in sets:
        if sources & set(members):
            key, colon, value = set_name.partition(":")
            if colon and key.strip() and value.strip():
                attributes[normalise_key(key)] = value.strip()
            else:
                plain.append(set_name)
    if plain:
        attributes["set"] = ", ".join(plain)
    return attributes


def qda_speakers(project: QdaProject, texts: Mapping[str, str]) -> list[tuple[str, dict[str, str], list[QdaSource]]]:
    """Who speaks in a project, with their variables and the sources (those with `texts`) they speak in:
    each case, where the project has cases, and each source in no case by itself. The participants of a
    job made from the project, and the owners of its sources when personas go back into it."""
    by_guid = {source.guid: source for source in project.sources}
    speakers: list[tuple[str, dict[str, str], list[QdaSource]]] = []
    in_case: set[str] = set()
    for case in project.cases:
        spoken = [by_guid[guid] for guid in dict.fromkeys(case.sources) if guid in texts]
        in_case |= {source.guid for source in spoken}
        if spoken:
            speakers.append((case.name, case.variables, spoken))
    return speakers + [
        (source.name, source.variables, [source])
        for source in project.sources
        if source.guid in texts and source.guid not in in_case
    ]


def qda_transcripts(raw: bytes, name: str) -> tuple[list[Transcript], dict[str, str], list[str]]:
    """A .qdpx as transcripts: one per text source, each spoken by its case where the project has cases
    (a case's variables and codes its attributes), else by the source itself. Also the labels of the
    code attributes, and warnings: which tool wrote the file, and what was not read."""
    archive, budget = open_archive(raw, name, ".qdpx"), OfficeBudget(name)
    part = qda_project_part(archive, name)
    project = read_qda_project(archive, part, budget)
    texts, outside = {}, []
    for source in project.sources:
        text = qda_source_text(archive, source, budget)
        if text is None:
            outside.append(source.name)
        elif text.strip():
            texts[source.guid] = text
    transcripts = []
    for speaker, variables, spoken in qda_speakers(project, texts):
        attributes = {
            normalise_key(project.variables.get(guid, guid)): value for guid, value in variables.items() if value
        }
        attributes.update(set_attributes({source.guid for source in spoken}, project.sets))
        attributes.update(code_attributes((s for source in spoken for s in source.selections), project.codes))
        for source in spoken:
            transcript = parse_transcript(texts[source.guid], speaker, f"{name}: {source.name}")
            coded = {
                passage: [project.codes[ref][0] for ref in refs if ref in project.codes]
                for passage, refs in coded_passages(texts[source.guid], source.selections).items()
            }
            transcripts.append(Transcript(speaker, transcript.name, attributes, transcript.turns, coded))
    families = {parent for _, parent in project.codes.values() if parent is not None}
    labels = {
        normalise_key(f"code:{project.codes[guid][0]}"): f"Coded under {project.codes[guid][0]}" for guid in families
    }
    notes = [
        f"{name} was written by {project.origin or 'an unnamed tool'}: {len(project.sources)} text source(s), "
        f"{len(project.cases)} case(s), {len(project.codes)} code(s)"
    ]
    if project.other_sources:
        notes.append(
            f"{name}: did not read {len(project.other_sources)} source(s) that are not text "
            f"(PDF, picture, audio, video): {named_list(project.other_sources)}"
        )
    if outside:
        notes.append(f"{name}: did not find the text of {len(outside)} source(s) in the file: {named_list(outside)}")
    return transcripts, labels, notes


# ---------------------------------------------------------------------------
# Data loading: a researcher's codebook (the themes she names, to report personas against)
# ---------------------------------------------------------------------------
#
# `config.codebook` names a file in the data directory: a REFI-QDA codebook (`.qdc`, namespace
# urn:QDA-XML:codebook:1.0, as the QDA tools export their codes) or a CSV of codes, as
# Taguette exports its tags (a `tag`, `name`, `path` or `code` column, and `description`).

CODEBOOK_SUFFIXES = (".qdc", ".csv")
MAX_CODEBOOK_CODES = 1000
MAX_CODEBOOK_BYTES = 10 * 1024 * 1024
CODEBOOK_NAME_COLUMNS = ("tag", "name", "path", "code")
PROMPT_CODEBOOK_THEMES = 200  # the codebook's first themes a model is shown


@dataclass
class CodebookTheme:
    name: str
    description: str = ""
    parent: str | None = None  # the code it is a sub-code of: who speaks of it speaks of its parent too


def read_codebook(raw: bytes, name: str) -> list[CodebookTheme]:
    """A codebook's codes, each a theme (a sub-code as well as its parent), in the file's order."""
    themes = qdc_themes(raw, name) if name.lower().endswith(".qdc") else csv_themes(raw, name)
    unique = list({theme.name.lower(): theme for theme in themes if theme.name}.values())
    if not unique:
        raise GenerationError(f"codebook {name} holds no codes")
    if len(unique) > MAX_CODEBOOK_CODES:
        raise GenerationError(f"codebook {name} holds more than {MAX_CODEBOOK_CODES} codes")
    return unique


def qdc_themes(raw: bytes, name: str) -> list[CodebookTheme]:
    """The codes of a REFI-QDA codebook, read as a project's are: streamed, nothing expanded."""
    themes: list[CodebookTheme] = []
    path: list[str] = []
    text: list[str] = []

    open_codes: list[CodebookTheme] = []  # the codes being read, outermost first

    def start(tag: str, attributes: dict[str, str]) -> None:
        path.append(tag.rpartition(" ")[2])
        text.clear()
        if path[-1] == "Code":
            parent = open_codes[-1].name if open_codes else None
            open_codes.append(CodebookTheme(attributes.get("name", "").strip(), parent=parent))
            themes.append(open_codes[-1])

    def end(tag: str) -> None:
        local = path.pop()
        if local == "Description" and path and path[-1] == "Code" and open_codes:
            open_codes[-1].description = "".join(text).strip()
        elif local == "Code" and open_codes:
            open_codes.pop()
        text.clear()

    def characters(data: str) -> None:
        if path and path[-1] == "Description":
            budget.produce(len(data))
            text.append(data)

    budget = OfficeBudget(f"codebook {name}")
    stream_xml(io.BytesIO(raw), name, budget, start, end, characters)
    return themes


def csv_themes(raw: bytes, name: str) -> list[CodebookTheme]:
    """The codes of a CSV codebook: the first of its tag, name, path or code columns, and description
    (Taguette's export: tag, description, number of highlights). A path's last part is the code
    (`Barriers/Time` is Time, and so is Taguette's `barriers.time`)."""
    rows, _ = table_rows(raw, "csv", name)
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    column = next((header.index(wanted) for wanted in CODEBOOK_NAME_COLUMNS if wanted in header), None)
    if column is None:
        raise GenerationError(
            f"codebook {name} has no column named {', '.join(CODEBOOK_NAME_COLUMNS)}; its columns: "
            f"{', '.join(header) or '(none)'}"
        )
    described = header.index("description") if "description" in header else None
    parts = r"[/\\.]" if header[column] in ("tag", "path") else r"[/\\]"  # Taguette's tags nest by dots
    themes = []
    for row in rows[1:]:
        if column >= len(row):  # a blank or short line
            continue
        steps = [step.strip() for step in re.split(parts, row[column].strip().strip(".")) if step.strip()]
        if steps:
            description = row[described].strip() if described is not None and described < len(row) else ""
            themes.append(CodebookTheme(steps[-1], description, steps[-2] if len(steps) > 1 else None))
    return themes


def codebook_file(wanted: str, data_dir: Path) -> Path:
    """The codebook `config.codebook` names: a .qdc or .csv file inside the data directory."""
    try:
        path = located_in_data_dir(wanted, data_dir, "config.codebook")
    except OSError as exc:
        raise APIError(
            400, f"config.codebook {wanted[:200]!r} cannot be used: {exc.strerror or type(exc).__name__}"
        ) from None
    if not path.is_file() or path.suffix.lower() not in CODEBOOK_SUFFIXES:
        raise not_a_codebook(wanted)
    return path


def not_a_codebook(wanted: str) -> APIError:
    return APIError(
        400,
        f"config.codebook {wanted!r} is not a codebook file in the server's data directory "
        f"(a REFI-QDA .qdc, or a .csv of codes)",
        {"codebook": wanted},
    )


def load_codebook(wanted: str, data_dir: Path) -> list[CodebookTheme]:
    """Read and parse the job's codebook (blocking: run it in a thread)."""
    try:
        path = codebook_file(wanted, data_dir)
        if path.stat().st_size > MAX_CODEBOOK_BYTES:
            raise GenerationError(f"codebook {wanted} is larger than {MAX_CODEBOOK_BYTES // (1024 * 1024)} MiB")
        return read_codebook(path.read_bytes(), wanted)
    except APIError as exc:
        raise GenerationError(exc.message) from None
    except OSError as exc:
        raise GenerationError(f"codebook {wanted} cannot be read: {exc.strerror or type(exc).__name__}") from None


# ---------------------------------------------------------------------------
# Data loading: reading a source (files to participants, with what was skipped or assumed)
# ---------------------------------------------------------------------------

TABLE_FORMATS = ("csv", "tsv", "xlsx")
TRANSCRIPT_FORMATS = ("text", "docx", "vtt", "srt")


class SourceReader:
    """Reads a source's files one at a time, then makes its participants.

    Transcripts are kept as turns until the last file is read: telling the interviewer
    by who appears across a study's files needs all of them.
    """

    def __init__(self) -> None:
        self.groups: list[list[Participant]] = []
        self.transcripts: list[Transcript] = []
        self.warnings: list[str] = []
        self.labels: dict[str, str] = {}
        self.names: set[str] = set()
        self.silent: list[str] = []

    def add(self, raw: bytes, fmt: str, name: str, pid: str) -> None:
        if fmt == "qdpx":
            transcripts, labels, notes = qda_transcripts(raw, name)
            if not transcripts:
                raise GenerationError(f"{name} holds no text source with anything in it")
            self.transcripts += transcripts
            self.labels.update(labels)
            self.warnings += notes
            return
        if fmt in TRANSCRIPT_FORMATS:
            text = transcript_text(raw, fmt, name)
            if not text.strip():
                raise GenerationError(f"{name} is empty")
            self.transcripts.append(parse_transcript(text, pid, name))
            return
        if fmt in TABLE_FORMATS:
            rows, decoding_notes = table_rows(raw, fmt, name)
            records, labels, export_notes = records_from_rows(rows, name)
            export_notes = decoding_notes + export_notes
        else:
            text = decode_text(raw, name)
            if not text.strip():
                raise GenerationError(f"{name} is empty")
            records = records_from_json(text, name) if fmt == "json" else records_from_jsonl(text, name)
            if nests_deeper(records, MAX_DATA_DEPTH):
                raise GenerationError(
                    f"{name} nests deeper than {MAX_DATA_DEPTH} levels; Persona reads records of answers, not trees"
                )
            labels, export_notes = {}, []
        people, notes, silent = participants_from_records(records, name, labels)
        self.groups.append(people)
        self.silent += silent
        self.names |= marked_names(records)
        self.warnings += export_notes + notes
        self.labels.update((normalise_key(column), label) for column, label in column_labels(records, labels).items())

    def participants(self) -> list[Participant]:
        if self.transcripts:
            people, notes = participants_from_transcripts(self.transcripts)
            self.groups.append(people)
            self.names |= {s for t in self.transcripts for s, _ in t.turns if s and speaker_role(s) is None}
            self.warnings += notes
            self.transcripts = []
        return merge_participants(self.groups)


def merged_codes(first: Mapping[str, list[str]], more: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Coded passages of two sources together: a passage in both carries the codes of each."""
    codes = {passage: list(names) for passage, names in first.items()}
    for passage, names in more.items():
        codes[passage] = list(dict.fromkeys([*codes.get(passage, []), *names]))
    return codes


def merge_participants(groups: Iterable[list[Participant]]) -> list[Participant]:
    """The same id in several files is one participant who spoke in each."""
    merged: dict[str, Participant] = {}
    for group in groups:
        for person in group:
            if person.id in merged:
                merged[person.id].texts.extend(person.texts)
                merged[person.id].coded = merged_codes(merged[person.id].coded, person.coded)
                merged[person.id].asked = {**person.asked, **merged[person.id].asked}
                for key, value in person.attributes.items():
                    merged[person.id].attributes.setdefault(key, value)
            else:
                merged[person.id] = person
    return list(merged.values())


def load_path(data: str, data_dir: Path, max_mb: int = Settings.max_source_mb) -> Dataset:
    """Read a file or folder inside the data directory (blocking: run it in a thread)."""
    try:
        path = resolve_data_path(data, data_dir)
    except APIError as exc:
        raise GenerationError(exc.message + missing_here(exc)) from None
    root = real_root(data_dir)
    try:  # the folder may have changed since it was checked at submission
        files, skipped = folder_files(path, root) if path.is_dir() else ([path], [])
        check_source_size(f"data source {data!r}", files, max_mb)
    except APIError as exc:
        raise GenerationError(exc.message) from None
    except OSError as exc:
        raise GenerationError(f"data source {data!r} cannot be read: {exc.strerror or type(exc).__name__}") from None
    reader, digests = SourceReader(), []
    for file in files:
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise GenerationError(
                f"{file.relative_to(root).as_posix()} cannot be read: {exc.strerror or type(exc).__name__}"
            ) from None
        relative = file.relative_to(root).as_posix()
        digest = hashlib.sha256(raw).hexdigest()
        digests.append(f"{relative}\0{digest}")
        pid = file.relative_to(path).with_suffix("").as_posix() if path.is_dir() else file.stem
        reader.add(raw, FORMATS[file.suffix.lower()], relative, pid)
    sha = digest if len(files) == 1 and not path.is_dir() else hashlib.sha256("\n".join(digests).encode()).hexdigest()
    source = {"kind": "path", "location": data, "sha256": sha, "files": len(files)}
    if skipped:
        reader.warnings.insert(
            0, f"{data}: did not read {len(skipped)} file(s) of an unsupported format: {named_list(skipped)}"
        )
    return finish_dataset(reader, source, data)


def missing_here(exc: APIError) -> str:
    """For a source that is not there when its job runs: which host looked, and what servers on several hosts need."""
    if "data" not in exc.details:
        return ""
    return (
        f" on {socket.gethostname()}, the host that ran the job; servers that share a database need the same "
        "data directory (shared storage), or data given by URL or inline"
    )


def source_files(data: str, data_dir: Path) -> list[Path]:
    """The files a local source names, for a look before it is read; none when it cannot be read
    (reading it then fails the job, saying why)."""
    try:
        path = resolve_data_path(data, data_dir)
        return folder_files(path, real_root(data_dir))[0] if path.is_dir() else [path]
    except (APIError, OSError):
        return []


def check_sources_size(sources: list[Any], settings: Settings) -> None:
    """Refuse a refinement whose local sources, read together, are over the cap one source has."""
    files = [
        file
        for source in sources
        if isinstance(source, str) and classify_data(source) == "path"
        for file in source_files(source, settings.data_dir)
    ]
    with contextlib.suppress(OSError):
        check_source_size(
            "a refinement's data, its parent's sources and its own together",
            list(dict.fromkeys(files)),
            settings.max_source_mb,
        )


def check_source_size(what: str, files: list[Path], max_mb: int) -> None:
    """Refuse a local source over the cap before reading it: memory per job stays bounded."""
    size = sum(file.stat().st_size for file in files)
    if size > max_mb * 1024 * 1024:
        raise GenerationError(
            f"{what} is {size / (1024 * 1024):.1f} MiB, over the {max_mb} MiB cap "
            "for a local source (set by --max-source-mb / PERSONA_MAX_SOURCE_MB)"
        )


def load_inline(records: list[Any]) -> Dataset:
    canonical = json.dumps(records, sort_keys=True, ensure_ascii=False).encode("utf-8")
    source = {
        "kind": "inline",
        "location": f"{len(records)} inline records",
        "sha256": hashlib.sha256(canonical).hexdigest(),
    }
    reader = SourceReader()
    people, reader.warnings, reader.silent = participants_from_records(records, "inline")
    reader.groups.append(people)
    reader.names |= marked_names(records)
    return finish_dataset(reader, source, "the inline data")


def shown_url(url: str) -> str:
    """A data URL as jobs show it: no query, fragment or user info, where signatures and tokens live.

    Anyone may read a job, so its error and its result's source name the URL this way.
    """
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="").geturl()


async def fetch_url(url: str, shown: str, private_allowed: bool) -> tuple[bytes, str]:
    """Download a data URL with a size cap; returns the body and its content type. Errors name it as `shown`."""
    import httpx

    chunks, size = [], 0
    try:
        target, headers, extensions = await checked_target(url, private_allowed)
    except OutboundRefused as exc:
        raise GenerationError(f"data URL refused: {exc}") from None
    except HostNotResolved as exc:
        raise GenerationError(f"fetching {shown} failed: {exc}") from None
    try:
        headers["User-Agent"] = f"Persona/{__version__}"
        async with (  # the deadline bounds the whole fetch: a server sending a byte at a time cannot hold a job
            asyncio.timeout(URL_TIMEOUT_S),
            outbound_request("GET", target, URL_TIMEOUT_S, headers=headers, extensions=extensions) as response,
        ):
            if response.status_code != 200:
                raise GenerationError(f"fetching {shown} answered HTTP {response.status_code}")
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_URL_BYTES:
                    raise GenerationError(f"{shown} is larger than {MAX_URL_BYTES // (1024 * 1024)} MiB")
                chunks.append(chunk)
            return b"".join(chunks), response.headers.get("content-type", "")
    except TimeoutError:
        raise GenerationError(
            f"fetching {shown} took longer than {URL_TIMEOUT_S:g} s, the limit for a data URL"
        ) from None
    except httpx.HTTPError as exc:
        raise GenerationError(f"fetching {shown} failed: {type(exc).__name__}") from None


def url_format(url: str, content_type: str) -> str:
    """A data URL's format: by its path's suffix, else by its Content-Type."""
    suffix = Path(urlsplit(url).path).suffix.lower()
    if suffix in FORMATS:
        return FORMATS[suffix]
    kind = content_type.split(";")[0].strip().lower()
    by_type = {
        "text/csv": "csv",
        "text/tab-separated-values": "tsv",
        "application/json": "json",
        "application/x-ndjson": "jsonl",
        "application/jsonl": "jsonl",
        "text/plain": "text",
        "text/markdown": "text",
        "text/vtt": "vtt",
        "application/x-subrip": "srt",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx",
    }
    if kind not in by_type:
        raise GenerationError(f"{url} has an unsupported format (Content-Type {kind or 'missing'!r})")
    return by_type[kind]


Fetched = dict[str, tuple[bytes, str]]  # data URL -> its body and content type, downloaded ahead of reading


async def fetch_sources(sources: list[Any], settings: Settings) -> Fetched:
    """Download a job's data URLs, so that the job takes an engine slot only once its data is here:
    a slow server delays its own job, never the jobs waiting for a slot."""
    return {
        source: await fetch_url(source, shown_url(source), settings.private_urls_allowed)
        for source in dict.fromkeys(s for s in sources if isinstance(s, str) and classify_data(s) == "url")
    }


async def load_url(url: str, raw: bytes, content_type: str) -> Dataset:
    """A fetched data URL read as a source; Office files in a child process, as from the data directory."""
    shown = shown_url(url)
    fmt = url_format(shown, content_type)
    stem = Path(urlsplit(url).path).stem or "document"
    reading = run_in_child if fmt in OFFICE_FORMATS else asyncio.to_thread
    reader = await reading(read_alone, raw, fmt, shown, stem)
    source = {"kind": "url", "location": shown, "sha256": hashlib.sha256(raw).hexdigest()}
    return await asyncio.to_thread(finish_dataset, reader, source, shown)


def finish_dataset(reader: SourceReader, source: JSON, name: str) -> Dataset:
    people = reader.participants()
    if not people:
        raise GenerationError(f"{name} holds no participants with anything to say")
    source["participants"] = len(people)
    read = {person.id for person in people}
    silent = list(dict.fromkeys(pid for pid in reader.silent if pid not in read))  # one who spoke in another file spoke
    return Dataset(people, source, reader.warnings, reader.labels, reader.names, silent)


async def load_data(data: str | list[Any], settings: Settings, fetched: Fetched | None = None) -> Dataset:
    if isinstance(data, list):
        return await asyncio.to_thread(load_inline, data)
    if classify_data(data) == "url":
        raw, content_type = (fetched or {}).get(data) or await fetch_url(
            data, shown_url(data), settings.private_urls_allowed
        )
        return await load_url(data, raw, content_type)
    reading = (
        run_in_child if await asyncio.to_thread(holds_office_files, data, settings.data_dir) else asyncio.to_thread
    )
    return await reading(load_path, data, settings.data_dir, settings.max_source_mb)


def read_alone(raw: bytes, fmt: str, name: str, pid: str) -> SourceReader:
    """A reader that has read one file."""
    reader = SourceReader()
    reader.add(raw, fmt, name, pid)
    return reader


def holds_office_files(data: str, data_dir: Path) -> bool:
    """Whether a local source holds a .docx or .xlsx: those are read in a child process.

    A child can be killed, so cancelling the job or stopping the server stops the
    reading, and whatever a file makes of memory goes with it.
    """
    return any(FORMATS.get(file.suffix.lower()) in OFFICE_FORMATS for file in source_files(data, data_dir))


# ---------------------------------------------------------------------------
# Data directory: the sources it holds, and files uploaded into it
# ---------------------------------------------------------------------------

UPLOADS = "uploads"  # the data directory's folder for uploaded files
UPLOAD_OWNERS = ".owners"  # in uploads/: one file per upload naming who uploaded it (hidden: never data)
MAX_UPLOADS_PER_OWNER = 200  # files one API key (or client IP with auth off) may keep in uploads/
MAX_UPLOAD_MB_PER_OWNER = 1024  # and MiB, all its uploads together
ATTRIBUTE_SCAN_BYTES = 5 * 1024 * 1024  # tables up to this size are read to name their attributes
MAX_FOLDER_SCAN = 200  # transcripts of a folder read for the header attributes the listing gives it
UPLOAD_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")
UPLOAD_SUFFIXES = (*FORMATS, *(suffix for suffix in CODEBOOK_SUFFIXES if suffix not in FORMATS))  # data, codebooks
SOURCE_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> "format:sha256" of the file
ATTRIBUTES_BY_CONTENT: dict[str, JSON | None] = {}  # "format:sha256" -> the table's attributes and group counts
LISTING_CACHE_SIZE = 10_000  # entries each of the two keeps, the least recently used going first


async def data_sources(
    data_dir: Path, limit: int = MAX_LISTED_FILES, offset: int = 0, hidden: Collection[str] = ()
) -> tuple[list[JSON], int]:
    """A page of the files a job can read in the data directory and the folders holding some,
    sorted by name, and how many there are; the `hidden` names left out.

    A table of the page small enough is read, to name its attributes (what `group_by` can
    take). What was read is remembered by content, so a listing reads only what is new, and
    a file uploaded many times is read once; an Office file is read in a child process, as a
    job reads it.
    """
    sources, tables = await asyncio.to_thread(walk_sources, data_dir)
    if hidden:  # another's upload, and the files in another's folder of uploads
        sources = [
            source
            for source in sources
            if source["name"] not in hidden and "/".join(source["name"].split("/")[:2]) not in hidden
        ]
    page = sources[offset : offset + limit]
    shown = {id(source) for source in page}
    for source, file, info in tables:
        if id(source) in shown and FORMATS[file.suffix.lower()] not in TRANSCRIPT_FORMATS:
            summary = await table_attributes(file, info)
            if summary is not None:
                source.update(summary)
    folders = {source["name"]: source for source in page if source["kind"] == "folder"}
    inside: dict[str, list[tuple[Path, os.stat_result]]] = {name: [] for name in folders}
    for source, file, info in tables:  # one pass: each transcript joins the page's folders that hold it
        if FORMATS[file.suffix.lower()] in TRANSCRIPT_FORMATS:
            for parent in Path(source["name"]).parents:
                held = inside.get(parent.as_posix())
                if held is not None and len(held) < MAX_FOLDER_SCAN:
                    held.append((file, info))
    for name, folder in folders.items():
        summaries = [summary for file, info in inside[name] if (summary := await table_attributes(file, info))]
        folder.update(folder_attributes(summaries) or {})
    return page, len(sources)


def walk_sources(data_dir: Path) -> tuple[list[JSON], list[tuple[JSON, Path, os.stat_result]]]:
    """The listing's entries, and the tables among them small enough to read for their attributes."""
    root = real_root(data_dir)
    files, _ = folder_files(root, root, MAX_LISTED_FILES)
    folders: Counter[str] = Counter()
    sources, tables = [], []
    for file in files:
        relative = file.relative_to(root)
        for parent in list(relative.parents)[:-1]:
            folders[parent.as_posix()] += 1
        info = file.stat()
        fmt = FORMATS[file.suffix.lower()]
        source = {"name": relative.as_posix(), "kind": "file", "format": fmt, "size": info.st_size, "attributes": None}
        sources.append(source)
        if info.st_size <= ATTRIBUTE_SCAN_BYTES:  # tables, and transcripts for their folder's header attributes
            tables.append((source, file, info))
    sources += [
        {"name": name, "kind": "folder", "format": "folder", "files": count, "attributes": None}
        for name, count in folders.items()
    ]
    return sorted(sources, key=lambda source: source["name"]), tables


async def table_attributes(file: Path, info: os.stat_result) -> JSON | None:
    """A table's attributes in its order, and how many groups each makes; None when it cannot be read."""
    key = (str(file), info.st_size, info.st_mtime_ns)
    fmt = FORMATS[file.suffix.lower()]
    digest = SOURCE_DIGESTS.get(key)
    if digest is None or digest not in ATTRIBUTES_BY_CONTENT:
        try:
            raw = await asyncio.to_thread(file.read_bytes)
        except OSError:
            return None
        digest = f"{fmt}:{hashlib.sha256(raw).hexdigest()}"  # the same bytes read as another format read otherwise
        remember(SOURCE_DIGESTS, key, digest)
        if digest not in ATTRIBUTES_BY_CONTENT:
            if fmt in OFFICE_FORMATS and not raw.startswith(ZIP_OPENING):
                attributes = None  # no zip, so no Office file: a child to start for each would slow the listing
            else:
                reading = run_in_child if fmt in OFFICE_FORMATS else asyncio.to_thread
                attributes = await reading(attributes_of, raw, fmt, file.name)
            remember(ATTRIBUTES_BY_CONTENT, digest, attributes)
    remember(ATTRIBUTES_BY_CONTENT, digest, ATTRIBUTES_BY_CONTENT[digest])
    return ATTRIBUTES_BY_CONTENT[digest]


def group_counts(keys: list[str], people: list[dict[str, str]]) -> dict[str, int]:
    """How many groups each attribute makes of these participants' attributes (what `group_by` would give)."""
    return {key: len({attributes[key] for attributes in people if key in attributes}) for key in keys}


def attributes_of(raw: bytes, fmt: str, name: str) -> JSON | None:
    """The attributes a table's participants have, in the table's order (a survey's, as the researcher
    wrote it), with the number of groups each makes (what `group_by` would give); None if it cannot be read."""
    try:
        reader = read_alone(raw, fmt, name, Path(name).stem)
        people = reader.participants()
    except (GenerationError, ValueError):
        return None
    keys = list(dict.fromkeys(key for person in people for key in person.attributes))
    groups = group_counts(keys, [person.attributes for person in people])
    questions = {key: choice_label(key, reader.labels) for key in keys if key in reader.labels}
    summary: JSON = {"attributes": keys, "groups": groups, "questions": questions}
    if fmt in TRANSCRIPT_FORMATS:  # a folder's transcripts are grouped together: it needs their values
        summary["people"] = [person.attributes for person in people]
    return summary


def choice_label(key: str, labels: Mapping[str, str]) -> str:
    """A coded attribute as a list of choices shows it: its question in full, or a grid's item first
    and then its question (`Re-run the build. (After identifying a flaky test, how often do you…)`),
    so that a grid's items tell apart however narrow the list."""
    grid = grid_parts(labels[key])
    return f"{grid[1]} ({grid[0].rstrip(' ?:')})" if grid else question_text(key, labels)


def folder_attributes(summaries: list[JSON]) -> JSON | None:
    """A transcript folder's header attributes (`Role: Nurse`), from its files' summaries: what
    `group_by` can take for the folder, and how many groups each makes."""
    people = [attributes for summary in summaries for attributes in summary.get("people", [])]
    keys = [key for key, _ in Counter(key for attributes in people for key in attributes).most_common()]
    if not keys:
        return None
    return {"attributes": keys, "groups": group_counts(keys, people), "questions": {}}


def remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    """Keep `value` as the most recently used; past LISTING_CACHE_SIZE the least recently used goes."""
    cache.pop(key, None)
    cache[key] = value
    if len(cache) > LISTING_CACHE_SIZE:
        del cache[next(iter(cache))]


def upload_folder_name(name: str) -> str:
    """A safe folder name from the one a browser sent, cleaned as a file's name is."""
    cleaned = UPLOAD_NAME_CHARACTERS.sub("-", name).strip(".-")[:100].rstrip(".-")
    if not cleaned:
        raise APIError(
            422, f"A folder of uploads needs a name with a letter or digit, got {name[:100]!r}", {"folder": "is empty"}
        )
    return cleaned


def upload_name(name: str) -> str:
    """A safe file name from the one a browser sent: letters, digits, dots, dashes and underscores, a known format."""
    cleaned = UPLOAD_NAME_CHARACTERS.sub("-", name).strip(".-")[:100]
    if Path(cleaned).suffix.lower() not in UPLOAD_SUFFIXES or not Path(cleaned).stem:
        raise APIError(
            422,
            f"An upload must be named as a supported format ({', '.join(UPLOAD_SUFFIXES)}), got {name[:100]!r}",
            {"name": f"must end in one of: {', '.join(UPLOAD_SUFFIXES)}"},
        )
    return cleaned


def uploads_folder(data_dir: Path) -> Path:
    """uploads/ in the data directory, made if needed; refused if it is a link or lies elsewhere."""
    folder = real_root(data_dir) / UPLOADS
    folder.mkdir(exist_ok=True)
    if folder.is_symlink() or not folder.resolve().is_relative_to(real_root(data_dir)):
        raise APIError(400, f"{UPLOADS}/ in the data directory is not a plain folder; uploads need one")
    (folder / UPLOAD_OWNERS).mkdir(exist_ok=True)
    return folder


def owned_uploads(folder: Path, owner: str) -> list[Path]:
    """The uploads this owner made, by the owner files beside them: files, and the files in their folders."""
    owned = []
    for entry in os.scandir(folder / UPLOAD_OWNERS):
        with contextlib.suppress(OSError):
            if not entry.is_file() or Path(entry.path).read_text("utf-8") != owner:
                continue
            upload = folder / entry.name
            if upload.is_file():
                owned.append(upload)
            elif is_upload_folder(upload):
                owned += folder_uploads(upload)
    return owned


def is_upload_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def folder_uploads(folder: Path) -> list[Path]:
    """The files in a folder of uploads (not the ones being written, whose names start with a dot)."""
    return [
        Path(entry.path)
        for entry in os.scandir(folder)
        if entry.is_file(follow_symlinks=False) and not entry.name.startswith(".")
    ]


def others_uploads(data_dir: Path, owner: str) -> set[str]:
    """The uploads another key or team made, as the listing names them (`uploads/notes.csv`), with
    `uploads` itself when there is one: a folder holding another's upload is not the caller's to read."""
    names, folder = set(), real_root(data_dir) / UPLOADS
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder / UPLOAD_OWNERS):
            with contextlib.suppress(OSError):
                upload = folder / entry.name
                if (upload.is_file() or is_upload_folder(upload)) and Path(entry.path).read_text("utf-8") != owner:
                    names.add(f"{UPLOADS}/{entry.name}")
    return names | {UPLOADS} if names else names


async def refuse_others_uploads(data: str | list[Any] | None, data_dir: Path, owner: str | None) -> None:
    """Uploads are the uploader's: a job of `owner` may not read another key's or team's upload, which
    is as missing to it, nor a folder holding one (the data directory itself, or uploads/)."""
    if owner is None or not isinstance(data, str):
        return
    path = os.path.normpath(data)  # a string's work: this runs on every submission
    if os.path.isabs(path):  # the same place named from the root
        path = os.path.relpath(os.path.realpath(path), real_root(data_dir))
    if path not in (".", UPLOADS) and not path.startswith(f"{UPLOADS}/"):
        return
    others = await asyncio.to_thread(others_uploads, data_dir, owner)
    if path in (".", UPLOADS) and others:
        raise APIError(400, f"data folder {data!r} holds other clients' uploads; name a file or folder of yours in it")
    if "/".join(path.split("/")[:2]) in others:
        raise missing_source(data)


def upload_owner(folder: Path, name: str, kind: Callable[[Path], bool] = Path.is_file) -> str | None:
    """Who made the upload `name` in uploads/, if it is a file (or with `kind`, a folder) with an owner."""
    if not kind(folder / name) or (folder / name).is_symlink():
        return None
    try:
        return (folder / UPLOAD_OWNERS / name).read_text("utf-8")
    except OSError:
        return None


def owned_upload_folder(uploads: Path, name: str, owner: str) -> Path:
    """uploads/<name>, a folder of `owner`'s uploads: made and claimed for them if new (the claim, an
    owner file, is linked into place so that two clients never both get it); another's is refused."""
    path, marker = uploads / name, uploads / UPLOAD_OWNERS / name
    taken = APIError(409, f"{UPLOADS}/{name} is another upload; put the files in a folder of another name")
    with tempfile.NamedTemporaryFile("w", dir=marker.parent, prefix=".claim-", delete=False) as claim:
        claim.write(owner)
    try:
        os.link(claim.name, marker)
        claimed = True
    except FileExistsError:
        claimed = False
    finally:
        os.unlink(claim.name)
    if claimed:
        try:
            path.mkdir()
        except FileExistsError:  # a file or folder there that no client owns: nobody's to claim
            marker.unlink(missing_ok=True)
            raise taken from None
    if upload_owner(uploads, name, is_upload_folder) != owner:
        raise taken
    return path


def check_upload_quota(folder: Path, owner: str, size: int, replaced: Path | None = None) -> None:
    """Refuse an upload past its owner's quota: one client cannot fill the data directory for everyone.

    An upload that `replaced` one of the owner's takes its place, in the count and in the bytes."""
    owned = [path for path in owned_uploads(folder, owner) if path != replaced]
    if len(owned) >= MAX_UPLOADS_PER_OWNER:
        raise APIError(
            413,
            f"You keep {len(owned)} uploads, the most one client may; delete some with DELETE /api/v1/data/{{name}}",
            {"max_files": MAX_UPLOADS_PER_OWNER},
        )
    used = sum(path.stat().st_size for path in owned)
    if used + size > MAX_UPLOAD_MB_PER_OWNER * 1024 * 1024:
        raise APIError(
            413,
            f"Your uploads would take {(used + size) / 2**20:.1f} MiB, over the "
            f"{MAX_UPLOAD_MB_PER_OWNER} MiB one client may keep; delete some with DELETE /api/v1/data/{{name}}",
            {"max_bytes": MAX_UPLOAD_MB_PER_OWNER * 1024 * 1024},
        )


def delete_upload(data_dir: Path, name: str, owner: str, folder: str | None = None) -> bool:
    """Delete an upload its owner made (one with no owner file predates them: anyone allowed to write may),
    or a file in a folder of theirs, the folder going with its last file; False when there is none this
    owner may delete."""
    uploads = uploads_folder(data_dir)
    if folder is not None:
        target = uploads / folder / name
        if upload_owner(uploads, folder, is_upload_folder) != owner or not target.is_file() or target.is_symlink():
            return False
        target.unlink(missing_ok=True)
        remove_if_empty(uploads, folder)
        return True
    target, marker = uploads / name, uploads / UPLOAD_OWNERS / name
    if not target.is_file() or target.is_symlink():
        return False
    with contextlib.suppress(FileNotFoundError):
        if marker.read_text("utf-8") != owner:
            return False
    target.unlink(missing_ok=True)
    marker.unlink(missing_ok=True)
    return True


def remove_if_empty(uploads: Path, folder: str) -> None:
    """A folder of uploads with no file left goes, with its owner file."""
    with contextlib.suppress(OSError):
        (uploads / folder).rmdir()  # fails while anything is in it
        (uploads / UPLOAD_OWNERS / folder).unlink(missing_ok=True)


def remove_old_uploads(data_dir: Path, days: float) -> int:
    """Uploads older than the retention period go, with their owner files, as finished jobs do."""
    folder = real_root(data_dir) / UPLOADS
    if not folder.is_dir() or folder.is_symlink():
        return 0
    cutoff, removed = time.time() - days * 86400, 0
    for entry in os.scandir(folder):
        with contextlib.suppress(OSError):
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):  # a folder of uploads: its old files, then itself if empty
                for file in folder_uploads(Path(entry.path)):
                    if file.stat().st_mtime < cutoff:
                        file.unlink()
                        removed += 1
                remove_if_empty(folder, entry.name)
            elif entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                (folder / UPLOAD_OWNERS / entry.name).unlink(missing_ok=True)
                removed += 1
    return removed


UPLOAD_NAME_PATTERN = r"^[A-Za-z0-9._-]*[A-Za-z0-9_-]\.(" + "|".join(suffix[1:] for suffix in UPLOAD_SUFFIXES) + ")$"
UPLOAD_FOLDER_PATTERN = r"^[A-Za-z0-9_-]([A-Za-z0-9._-]{0,98}[A-Za-z0-9_])?$"  # as upload_folder_name leaves it


def upload_format(suffix: str) -> str:
    """An upload's format as the answer names it: a data format, or `codebook` for a .qdc."""
    return FORMATS.get(suffix.lower(), "codebook")


def store_upload(
    data_dir: Path, name: str, body: bytes, owner: str, replace: bool = False, folder: str | None = None
) -> JSON:
    """Write an upload under uploads/ (or uploads/<folder>/, a folder of the owner's), never over another
    file: a taken name gets `-2`, `-3`, ... before its suffix.

    The file is written aside and then linked into place, which fails rather than replace
    a file that exists, so two uploads of one name keep both. Its owner is written beside it
    (a folder's files are its owner's). With `replace`, the owner's own upload of that name is
    replaced instead, in one rename.
    """
    uploads = uploads_folder(data_dir)
    place = uploads if folder is None else uploads / folder
    shown = f"{UPLOADS}/" if folder is None else f"{UPLOADS}/{folder}/"
    stem, suffix = Path(name).stem, Path(name).suffix
    if folder is None:
        replacing = replace and upload_owner(uploads, name) == owner
    else:
        replacing = replace and (place / name).is_file() and upload_owner(uploads, folder, is_upload_folder) == owner
    check_upload_quota(uploads, owner, len(body), (place / name) if replacing else None)  # before any folder is made
    if folder is not None:
        owned_upload_folder(uploads, folder, owner)
    try:
        with tempfile.NamedTemporaryFile(dir=place, prefix=".upload-", delete=False) as staged:
            staged.write(body)
    except FileNotFoundError:  # its folder went (a delete, retention) while the file came in
        raise APIError(409, f"{shown} went while the file was sent; send it again") from None
    if replacing:
        os.replace(staged.name, place / name)
        return {"name": f"{shown}{name}", "format": upload_format(suffix), "size": len(body)}
    try:
        for number in itertools.count(1):
            target = place / (name if number == 1 else f"{stem}-{number}{suffix}")
            with contextlib.suppress(FileExistsError):
                os.link(staged.name, target)
                break
    finally:
        os.unlink(staged.name)
    if folder is None:
        (uploads / UPLOAD_OWNERS / target.name).write_text(owner, "utf-8")
    return {"name": f"{shown}{target.name}", "format": upload_format(suffix), "size": len(body)}


# ---------------------------------------------------------------------------
# Redaction: personal data replaced by placeholders before the data leaves the machine
# ---------------------------------------------------------------------------

REDACTED_KINDS = (
    "email",
    "url",
    "ip_address",
    "iban",
    "card",
    "id_number",
    "birth_date",
    "address",
    "postal_code",
    "phone",
    "handle",
    "name",
)
WEB_SUFFIXES = "com|org|net|io|co|edu|gov|info|app|dev|me|de|uk|fr|nl|es|it|ca|au|ch|at|be|se|no|dk|eu|us|in|jp"
STREET_TYPES = (
    "street|st|road|rd|avenue|ave|lane|ln|drive|dr|boulevard|blvd|way|court|ct|place|pl|terrace|close|"
    "crescent|square|sq|straße|strasse|str|weg|gasse|allee|platz|rue|calle|via"
)
# A pattern's `value` group, where it has one, is what is replaced; the rest (`born on `) stays.
REDACTION_PATTERNS = (  # in this order: e-mail addresses and URLs hold digits and names, ZIP+4 codes look like phones
    ("email", re.compile(r"(?<![\w.+-])[\w.+-]+@(?:[^\W_]|-)+(?:\.(?:[^\W_]|-)+)*\.[^\W\d_]{2,}")),
    (
        "url",
        re.compile(
            r"\b(?:https?://|www\.)[^\s<>\"]+[^\s<>\".,;:!?)\]']"
            rf"|(?<![\w@.-])(?:[a-z0-9-]+\.)+(?:{WEB_SUFFIXES})/[^\s<>\"]*[^\s<>\".,;:!?)\]']"
            rf"|(?<![\w@.-])(?:[a-z0-9-]+\.)+(?:{WEB_SUFFIXES})\b(?![.-]?\w)",
            re.IGNORECASE,
        ),
    ),
    (
        "ip_address",
        re.compile(
            r"(?<![\w.:])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\w.])"
            r"|(?<![\w:])(?:[0-9a-f]{1,4}:){7}[0-9a-f]{1,4}(?![\w:])"
            r"|(?<![\w:])(?:[0-9a-f]{1,4}:){1,6}:(?:[0-9a-f]{1,4}:){0,5}[0-9a-f]{1,4}(?![\w:])",
            re.IGNORECASE,
        ),
    ),
    ("iban", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")),
    ("card", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")),
    (
        "id_number",
        re.compile(
            r"\b\d{3}-\d{2}-\d{4}\b"  # a US social security number
            r"|\b[A-CEGHJ-PR-TW-Z]{2} ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"  # a UK National Insurance number
            r"|(?i:\b(?:passport|national id|id card|identity card|licen[cs]e|ssn|social security|"
            r"insurance|tax id|personal id)(?: number| no\.?| nr\.?| #)?[: ]+)(?P<value>[A-Z0-9][A-Z0-9-]{4,14})\b"
        ),
    ),
    (
        "birth_date",
        re.compile(
            r"(?i:\b(?:born(?: on| in)?|dob|d\.o\.b\.|date of birth|birthday|birth date)[:,]? +)"
            r"(?P<value>\d{1,4}[-./ ]\d{1,2}[-./ ]\d{1,4}|\d{1,2}(?:st|nd|rd|th)? [A-Za-z]{3,9},? \d{4}|"
            r"[A-Za-z]{3,9} \d{1,2}(?:st|nd|rd|th)?,? \d{4})"
        ),
    ),
    (
        "address",
        re.compile(
            rf"\b\d{{1,5}}[A-Za-z]? (?:[A-Z][\w'’-]+ ){{1,3}}(?i:{STREET_TYPES})\b\.?"
            rf"|\b(?:[A-Z][\w'’-]+ ){{0,2}}[A-Z]\w*(?i:{STREET_TYPES}) \d{{1,5}}[a-z]?\b"
        ),
    ),
    (
        "postal_code",
        re.compile(
            r"\b(?:[A-Z]{1,2}\d[A-Z\d]? ?\d[A-Z]{2}"  # United Kingdom
            r"|[A-Z]\d[A-Z] ?\d[A-Z]\d"  # Canada
            r"|\d{5}-\d{4}"  # United States, ZIP+4
            r"|(?<=[A-Z]{2} )\d{5}"  # a US state's code, then its ZIP code
            r"|(?i:(?<=zip )|(?<=zip code )|(?<=postcode )|(?<=postal code )|(?<=plz ))\d{4,6})\b"
        ),
    ),
    (
        "phone",
        re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?\d{2,5}(?:[ .-]?\d{2,5}){1,4}(?![\w-])"),
    ),
    ("handle", re.compile(r"(?<![\w@.])@[A-Za-z0-9_](?:[A-Za-z0-9_.]{0,28}[A-Za-z0-9_])?\b")),
)
NAME_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")
ID_WORDS = frozenset(
    """
interview interviews transcript transcripts participant respondent session survey zoom teams meet call recording
notes user test pilot study round wave group focus final draft copy export data audio video
""".split()
)  # words of file names and ids that name the file, not a person
GENERIC_LABEL = re.compile(r"[^\W\d_]+[\s_-]*\d+", re.IGNORECASE)  # "Speaker 2", "user_17": a role and a number
DATE_LIKE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}")


def luhn_valid(digits: str) -> bool:
    total = 0
    for place, digit in enumerate(int(d) for d in reversed(digits)):
        total += digit if place % 2 == 0 else (digit * 2 - 9 if digit > 4 else digit * 2)
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    """An IBAN's check digits: its country and check moved to the end, letters as numbers, mod 97 is 1."""
    compact = text.replace(" ", "").upper()
    moved = compact[4:] + compact[:4]
    return 15 <= len(compact) <= 34 and int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


def looks_like(kind: str, found: str) -> bool:
    """Whether a pattern's match is what it names: card numbers pass Luhn's check, IBANs theirs, phone numbers
    have 9 to 15 digits, an id number holds a digit."""
    digits = re.sub(r"\D", "", found)
    if kind == "card":
        return luhn_valid(digits)
    if kind == "iban":
        return iban_valid(found)
    if kind == "id_number":
        return bool(digits)
    if kind == "phone":
        return (
            9 <= len(digits) <= 15
            and not DATE_LIKE.fullmatch(found)
            and (found.startswith(("+", "(")) or len(digits) >= 10 or bool(re.search(r"[ .-]", found)))
        )
    return True


class Redactor:
    """One job's placeholders: each value always gets the same one (`[email-1]`), and every replacement is counted.

    Names are those the data marks as names (name columns' values, speakers' labels). A
    whole name ("Sarah Jones") is one placeholder; each of its words alone ("Sarah") is
    that name's placeholder too, unless the data uses the word in lower case as often as
    capitalised ("Nurse Manager" is no reason to hide every "nurse"), or the label is a
    role with a number ("Speaker 2"). The values themselves stay in memory, for the job.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.placeholders: dict[tuple[str, str], str] = {}
        self.numbers: Counter[str] = Counter()
        self.counts: Counter[str] = Counter({kind: 0 for kind in REDACTED_KINDS})
        marked = {name.strip().lower() for name in names if name.strip() and not GENERIC_LABEL.fullmatch(name.strip())}
        self.whole: dict[str, list[tuple[str, ...]]] = {}  # a name's first word -> its names' words, longest first
        self.words: dict[str, str] = {}  # one word -> the name it stands for: a one-word name itself, else the longest
        for name in sorted(marked, key=lambda n: (-len(n), n)):
            words = tuple(NAME_WORD.findall(name))
            if words:
                self.whole.setdefault(words[0], []).append(words)
                self.words.update(
                    {
                        word: " ".join(words)
                        for word in words
                        if word not in self.words and len(word) >= 2 and word not in STOPWORDS
                    }
                )
        self.words.update({words[0]: words[0] for names in self.whole.values() for words in names if len(words) == 1})

    def placeholder(self, kind: str, value: str) -> str:
        key = (kind, value.lower())
        if key not in self.placeholders:
            self.numbers[kind] += 1
            self.placeholders[key] = f"[{kind}-{self.numbers[kind]}]"
        self.counts[kind] += 1
        return self.placeholders[key]

    def keep_common_words(self, texts: Iterable[str]) -> None:
        """Words of names that the data writes in lower case as often as capitalised are words, not names."""
        lower: Counter[str] = Counter()
        capital: Counter[str] = Counter()
        for text in texts:
            for word in NAME_WORD.findall(text):
                key = word.lower()
                if key in self.words:
                    (lower if word == key else capital)[key] += 1
        for word in [
            w for w in self.words if lower[w] and lower[w] >= capital[w] and (w,) not in self.whole.get(w, [])
        ]:
            del self.words[word]

    def text(self, text: str) -> str:
        for kind, pattern in REDACTION_PATTERNS:
            text = pattern.sub(functools.partial(self._replaced, kind), text)
        return self._names(text) if self.words or self.whole else text

    def _replaced(self, kind: str, match: re.Match[str]) -> str:
        """A match with its value (the `value` group where there is one) replaced, if it is what its kind says."""
        start, end = match.span("value") if "value" in match.re.groupindex else (-1, -1)
        if start < 0:  # no `value` group, or one this alternative does not use: the whole match is the value
            start, end = match.span()
        value = match.string[start:end]
        if not looks_like(kind, value):
            return match.group()
        return match.string[match.start() : start] + self.placeholder(kind, value) + match.string[end : match.end()]

    def learn_names_from_addresses(self, texts: Iterable[str]) -> None:
        """A name written beside its e-mail address (`Sarah Jones <sarah.jones@x.org>`) is a name, though no
        column marks it: the address's local part names the words, written capitalised in the same text."""
        email = REDACTION_PATTERNS[0][1]
        for text in texts:
            for match in email.finditer(text):
                parts = [
                    part
                    for part in re.split(r"[._+-]", match.group().partition("@")[0].lower())
                    if len(part) >= 2 and part.isalpha() and part not in STOPWORDS
                ]
                said = [part for part in parts if re.search(rf"\b{re.escape(part.capitalize())}\b", text)]
                if said:
                    self.add_name(" ".join(said))

    def add_name(self, name: str) -> None:
        words = tuple(NAME_WORD.findall(name.lower()))
        if words and words not in self.whole.get(words[0], []):
            self.whole.setdefault(words[0], []).append(words)
            self.whole[words[0]].sort(key=lambda w: -len(w))
            self.words.update({word: " ".join(words) for word in words if word not in self.words and len(word) >= 2})

    def _names(self, text: str) -> str:
        """Whole names first, then single words of them, each replaced by its name's placeholder."""
        found = list(NAME_WORD.finditer(text))
        pieces, done, index = [], 0, 0
        while index < len(found):
            word = found[index].group().lower()
            length = self._whole_name_at(text, found, index)
            name = (
                " ".join(w.group().lower() for w in found[index : index + length]) if length else self.words.get(word)
            )
            if name is None:
                index += 1
                continue
            pieces += [text[done : found[index].start()], self.placeholder("name", name)]
            done = found[index + max(length, 1) - 1].end()
            index += max(length, 1)
        return "".join(pieces) + text[done:]

    def _whole_name_at(self, text: str, found: list[re.Match[str]], index: int) -> int:
        """How many words from `index` spell a whole marked name, separated by spaces only; 0 for none."""
        for words in self.whole.get(found[index].group().lower(), []):
            end = index + len(words)
            if (
                end <= len(found)
                and all(found[index + k].group().lower() == words[k] for k in range(len(words)))
                and all(text[found[k].end() : found[k + 1].start()].isspace() for k in range(index, end - 1))
            ):
                return len(words)
        return 0

    def dataset(self, dataset: Dataset) -> Dataset:
        """The data with every id, attribute value, text and warning redacted, participant by participant, in order.

        Two participants whose ids redact alike stay two: the second gets a suffix. Ids and file
        names that hold a capitalised name (`zoom_Sarah_Jones`) have it redacted too.
        """
        texts = [text for person in dataset.participants for text in person.texts]
        self.learn_names_from_addresses(texts)
        for person in dataset.participants:
            self.learn_names_from_ids(person.id)
        self.learn_names_from_ids(str(dataset.source.get("location", "")))
        self.keep_common_words(
            REDACTION_PATTERNS[0][1].sub(" ", text) for text in texts
        )  # an address's words are no usage
        people, taken = [], set()
        for person in dataset.participants:
            pid = self.text(self.spaced_id(person.id))
            while pid in taken:
                pid += "'"
            taken.add(pid)
            people.append(
                Participant(
                    pid,
                    [self.text(text) for text in person.texts],
                    {key: self.text(value) for key, value in person.attributes.items()},
                    coded={self.text(passage): codes for passage, codes in person.coded.items()},
                    asked={self.text(text): question for text, question in person.asked.items()},
                )
            )
        return Dataset(
            people,
            self.value(dataset.source),
            [self.text(w) for w in dataset.warnings],
            dataset.labels,
            silent=[self.text(pid) for pid in dataset.silent],
        )

    def spaced_id(self, label: str) -> str:
        """An id whose words hold a name, with its `_`, `-` and `.` as spaces, so the whole name is found."""
        if any(word.lower() in self.words for word in re.split(r"[^A-Za-z]+", label)):
            return re.sub(r"[_.-]+", " ", label)
        return label

    def learn_names_from_ids(self, label: str) -> None:
        """Two or three capitalised words in an id or a file name (`zoom_Sarah_Jones`, `Interview-Ana-Lima.txt`)
        are a person's name: ids and file names go wherever the data goes."""
        run: list[str] = []
        for word in [*re.split(r"[^A-Za-z]+", label), ""]:
            if re.fullmatch(r"[A-Z][a-z]+", word) and word.lower() not in STOPWORDS and word.lower() not in ID_WORDS:
                run.append(word)
                continue
            if 2 <= len(run) <= 3:
                self.add_name(" ".join(run))
            run = []

    def value(self, value: Any) -> Any:
        """Any JSON value with its texts redacted: a source's names, a refinement's parent personas."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(item) for item in value]
        if isinstance(value, dict):
            return {key: self.value(item) for key, item in value.items()}
        return value


# ---------------------------------------------------------------------------
# Offline engine: TF-IDF vectors, divisive splits refined by k-means, personas from the text
# ---------------------------------------------------------------------------

ATTRIBUTE_WEIGHT = 2.5  # how much an attribute counts beside the words, in clustering
MAX_FEATURES = 5000
MAX_SPAN_WORDS = 6  # a title phrase's words, with those between its two content words
# Words that may stand between a title phrase's two words: `locked out of the account`, not `client wants a different`.
GLUE_WORDS = frozenset(
    "of the a an my our their your his her its out in on for to with at from up off into by and".split()
)

# Which list a sentence belongs to: goals, pain points, behaviours, or none. The sentence's
# own words decide first; a survey answer's question then frames it (an answer to "what hinders
# you?" that names no problem in words is still one), as a researcher reads it. The rules were
# fitted on the `tune` half of bench/labels and measured on the held-out half (README, "Output
# quality on real data").
# Each pattern is an alternation of literal phrases anchored with \b, linear in its input.

# Guards: what is no item, and cue words that state no pain or wish.

QUOTE = re.compile(r"[\"“”]")
"""Quoted speech: with REPORTED, the words are someone else's, not the participant's own."""

REPORTED = re.compile(
    r"\b(?:was like|were like|(?:he|she|they)'s like|told me|asked me|"
    r"(?:he|she|they|somebody|someone|people) (?:said|says|asked|told))\b",
    re.IGNORECASE,
)
"""A speech verb that introduces someone else's words ("Somebody else was like, 'it'd be cool ...'")."""

DEFINITION = re.compile(
    r"^\W*(?:(?:i|we)(?: would|'d)? (?:say|define|consider|call|describe) (?:that )?)?"
    r"(?:a|an) [\w'-]+(?: [\w'-]+){0,2} "
    r"(?:(?:is|are|means|refers to) (?:a|an|any|one|something)(?: [\w'-]+){0,3} (?:that|which|where|when|whose)|"
    r"(?:is|are) (?:when|where))\b|"
    r"\b(?:i|we)(?: would|'d)? define\b|\bdefined as\b|\b(?:my|the|by|your|this|that|a) (?:given |proposed )?"
    r"definitions?\b|"
    r"\b(?:i|we)(?: would|'d)? (?:say|consider|call) (?:that )?(?:a|an|the) [\w'-]+(?: [\w'-]+){0,2} (?:is|are) "
    r"[\w'-]+ (?:if|when|whenever)\b",
    re.IGNORECASE,
)
"""A sentence that says what a word means ("A flaky test is a test that ...", "I define it as ...", "I'd say
the test is flaky if ...") or speaks of a definition: an answer to a survey's definition question, no goal,
pain point or behaviour of the speaker's."""

HYPOTHETICAL = re.compile(r"^\W*if (?:i|we) (?:were|was) (?:ever )?to\b", re.IGNORECASE)
"""A sentence that imagines a case ("If I were to find one in a PR, I would not accept it") tells what the
speaker would do, not something they suffer: no pain point, whatever its words."""

CONDITIONAL_PAIN = re.compile(
    r"\bwould (?:be|have been|get|become) (?:a |an |so |very |really |quite |pretty )?"
    r"(?:pain|painful|hard|difficult|annoying|frustrating|nightmare|tedious)\b",
    re.IGNORECASE,
)
"""A difficulty imagined, not met ("installing a GUI on the server would be a pain"): no pain point."""

RESOLVED = re.compile(
    r"\b(?:is|are|seems?|has become|have become) now (?:much |far |a lot |a bit )?(?:more (?:stable|reliable)|better|"
    r"fixed|stable|resolved|solved|fine)\b|\bnow (?:much |far )?(?:more stable|better|fixed|resolved|solved)\b|"
    r"\b(?:has|have) (?:since )?been (?:fixed|resolved|solved)\b|"
    r"\bprior to (?:the )?(?:release|version|arrival|introduction|update)\b|\blast (?:year|semester|term)\b",
    re.IGNORECASE,
)
"""A trouble told as past and mended ("... failed to load regularly, but the system is now much more stable",
"... all related to learning R prior to dplyr", "... was painful last year"): no pain point the speaker has now.
"No longer" is no mend: "older code may no longer run" is the trouble itself."""

OPINION = re.compile(
    r"^\W*(?:i (?:think|believe|trust|feel that|guess|suppose|reckon)|in my opinion|i'm sure|i am sure)\b",
    re.IGNORECASE,
)
"""A sentence that opens as a general opinion is no pain point or behaviour of the speaker's (persona's rule)."""

BAD_THINGS = r"problems?|issues?|trouble|complaints?|crash\w*|glitch\w*|bugs?|errors?|hassle|delays?|virus\w*|ads|lag"
NOT_A_CUE = re.compile(
    # praise by absence: "no problems", "without crashes or glitches", "free from virus"
    rf"\b(?:no|any|never had any|never had a|never had|never have|without any|without|free (?:from|of)) (?:any )?"
    rf"(?:{BAD_THINGS})(?:(?:,| or| and| nor) (?:any )?(?:{BAD_THINGS}))*\b|"
    r"\b(?:can't|cannot|couldn't|could not) complain\b|"
    # difficulty denied or epistemic: "not that hard", "hard to say"
    r"\b(?:not|never|isn't|wasn't|aren't|weren't|nothing) (?:that |too |very |so |particularly |really )?"
    r"(?:hard|difficult|complicated|confusing|slow|bad|expensive|worried)\b|"
    r"\b(?:hard|difficult|impossible) to (?:say|tell|know|predict|judge|believe|beat|find fault)\b|"
    # fixed phrases that hold a cue word: thanks, teaching, open-source work, idioms
    r"\b(?:hard|hard-|hard )work\w*|\bhard way\b|\btrial and error\b|\bno way (?:i|we|you|they|it|that|this)\b|"
    r"\bproblem[- ](?:solving|sets?)\b|\bpain points?\b|\bdon't worry\b|\bno worries\b|"
    r"\b(?:open|opened|opening|file|filed|filing|report|reported|reporting|reply to|replied to|close|closed|closing|"
    r"triage|triaging|label|labelled|comment on|commented on|fix|fixed|fixing|resolve|resolved|solve|solved|solving|"
    r"remove[sd]?|removing|reduce[sd]?|reducing|lower\w*|avoid\w*) "
    r"(?:the |all |any |those |these |many |a lot of |my |our |an |new |github |open )?"
    r"(?:barriers?|problems?|issues?|bugs?|pain|hassle|errors?)\b|"
    r"\b(?:issue|bug) (?:tracker|reports?|bount\w*|triage)\b|"
    r"\b(?:error bars?|(?:standard|std\.?) errors?|error terms?|margin of error|squared errors?|"
    r"type (?:i|ii|1|2) errors?|missing (?:values?|data|observations?|cases)|crash course|a failed|"
    r"failure (?:profiles?|modes?|patterns?|scenarios?))\b|"
    # a topic, not a trouble: "talking about copyright problems", "we make beginner issues"
    r"\b(?:talk|talks|talking|talked|speak|speaking|spoke|write|writing|wrote) about (?:[\w'-]+ ){0,2}?"
    r"(?:problems?|issues?)\b|\b(?:beginner|good first|first-timers?|newcomer|starter) issues?\b|"
    r"\bproblems? (?:i|we) (?:solve|work on|tackle)\b|"
    r"\bthe poor\b|\bpoor (?:people|farmers|families|communities|households|customers)\b|"
    r"\b(?:don't|do not|doesn't|does not|no longer|never|without|not) (?:have|having|need|needing|needs) to\b|"
    r"(?:\b(?:i|we) |^\W*)(?:don't|do not) work (?:with|on|for|in|at|as)\b|"
    r"\bno (?:need|more) to\b|"
    r"\b(?:not bad|not only|not limited|not sure|no matter|not that i know|nothing (?:wrong|bad))\b|"
    # politeness that holds a wish word: "I'd like to thank", "hope this helps"
    r"\b(?:would|'d|want|wanted) (?:also |just )?(?:like )?to (?:thank|say|add|mention|point out|note|share|echo|"
    r"reiterate|congratulate|express|think|believe|praise)\b|"
    # a wish inside a relative clause describes a thing: "it ignores the elements I want it to interact with"
    r"\b(?:the|those|these|all|every|each|whatever|anything|everything|something) (?:[\w'-]+ ){0,2}?(?:i|we) "
    r"(?:want|wish)\b(?!(?: [\w'-]+){0,3} (?:is|are|was|were|would be)\b)|"
    r"\bhope (?:this|that|it) (?:helps|is useful|is helpful)\b|"
    r"\bhope (?:you|u) (?:keep|continue|guys|all|enjoy|have|are|do well|succeed)\b|"
    # a condition, not a wish: "if we want to have a world where ...", "if only Cygnus can use it", "if only because"
    r"\bif (?:i|we|you|they) (?:really |ever |just )?(?:want|wanted|need|needed|would like|wish)\b|"
    r"\bif only (?:[\w'-]+ ){1,2}(?:can|is|are|has|have|does|do)\b|\bif only (?:because|for|to)\b|"
    # what others could do, and a thing described: "where people could ask questions", "Something that was ..."
    r"\b(?:people|someone|somebody|anyone|anybody|one|he|she) could\b|^\W*something that (?:was|is|were|are|has|had)\b",
    re.IGNORECASE,
)
"""Phrases that contain a cue word but state no pain or wish: praise ("without crashes", "no need to
queue"), thanks ("the hard work", "I'd like to thank"), uncertainty ("hard to say", "not sure"), denial
("not that hard"), fixes and tracker talk ("remove the barriers", "open an issue"), statistics ("error
bars", "missing values", "failure modes"), charity ("poor people"), labels ("pain points:"), a topic ("talking
about copyright problems", "beginner issues"), relief ("not having to"), work one does not do ("I don't work
with data") and a wish that only says which thing is meant ("the elements I want it to click")."""

# Goals: a wish, or a request for the product.

WISH = re.compile(
    r"\b(?:i|we)(?:'d| would)(?: also| really| just| definitely| still| much| so)? "
    r"(?:love|like|prefer|appreciate)\b|"
    r"\b(?:i|we)(?: also| really| just| still)? (?:want|wish|hope) (?:to|a|an|the|more|some|better|it|they|them|that|"
    r"there|this|for|my|our|i|we|you)\b|"
    r"\bi wish\b|^\W*wish\b|\bwish (?:it|there|they|you|the)\b|\bideally\b|"
    r"\bwish (?:i|we) (?:had|'d|could|knew|would)\b|"
    r"\b(?:i|we)(?:'m| am|'re| are) (?:hoping|looking for|trying to)\b|"
    r"\b(?:my|our) (?:main |biggest |only )?(?:goal|aim|dream|hope)\b|"
    r"\b(?:would|'d) be (?:so |really |very |much |even |super )?(?:nice|great|good|helpful|useful|better|ideal|"
    r"awesome|cool|lovely|fantastic|amazing|handy|wonderful|neat|excellent|beneficial|valuable|perfect)\b|"
    r"\bwould (?:love|like) (?:it|to|a|an|more|some|better)\b|"
    r"\b(?:i|we|probably|definitely|maybe|perhaps) (?:would|should|could)(?:'ve| have) (?:\w+ )?(?:started|learned|"
    r"learnt|liked|taken|used|known|found|begun|loved|studied)\b|"
    r"\b(?:i|we) (?:really |also |just |still )?need (?:to be|be) able\b|"
    r"\b(?:key|main|killer|must-have|missing|dream) feature (?:would be|is|for me)\b|"
    r"\bwould (?:really |also |definitely )?(?:make (?:it|my|our|things|life|everything)|save (?:me|us)|help)\b|"
    r"\b(?:if only|looking forward to|(?:i|we)(?:'d| would) rather)\b|"
    r"\bwhat (?:i|we) (?:really )?(?:want|need|would like|miss) (?:is|are)\b|"
    r"\bthe (?:only |one |main )?things? (?:i|we) (?:really )?(?:want|would like)(?: [\w'-]+){0,3} (?:is|are)\b",
    re.IGNORECASE,
)
"""A first-person wish: what the speaker wants to have or achieve, said as a wish (also in hindsight:
"I would've started with more Tidyverse")."""

OPENER = re.compile(
    r"^\W*(?:please )?(?:add|allow|enable|provide|include|integrate|implement|introduce|offer|bring back|warn|"
    r"let (?:users|people|students)|give (?:users|people|students)|make it)\b",
    re.IGNORECASE,
)
"""An imperative request at the start ("Add ...", "Warn when ...")."""

FEATURE_NP = re.compile(
    r"^\W*(?:a |an |the )?(?:much |far |way |some )?(?:better|more|easier|simpler|simplified|improved|faster|cleaner|"
    r"clearer|smoother|quicker|fewer|less|greater|stronger|richer|tighter|deeper|native|built-in|additional|extra|"
    r"first-class|proper|official)\b",
    re.IGNORECASE,
)
"""A fragment that names something better or more of it ("Better support for tables", "More integration
with R"); STATEMENT vetoes it."""

WAY_NP = re.compile(
    r"^\W*(?:a |an |some )?(?:easy |easier |simple |better |good |quick |quicker |simpler |built-in |native |"
    r"automatic |single )?(?:way|ways|option|options|ability|possibility|setting|button|mode|feature|tool|function|"
    r"command|shortcut|something|place|wizard) (?:to|for|that|of)\b(?! do with)|"
    r"^\W*(?:support|integration|documentation|tutorials?|examples?|templates?|guides?) (?:for|with|on|about)\b",
    re.IGNORECASE,
)
"""A fragment that names a wanted means: a way or option to do something, support for something;
PRAISE vetoes it."""

PRAISE = re.compile(
    r"\b(?:great|good|nice|love|loved|best|awesome|excellent|helpful|useful|amazing|fantastic|brilliant|perfect|"
    r"wonderful|handy|easy|simple|fast|reliable|thanks?|thank you)\b",
    re.IGNORECASE,
)
"""Praise: a way-or-option fragment that holds it is what the speaker likes, not what they want."""

ARTICLE_NP = re.compile(
    r"^\W*(?:a|an) (?!lot\b|bit\b|little\b|mix\b|combination\b|couple\b|number\b|variety\b|kind\b|sort\b|type\b|"
    r"while\b|year\b|month\b|week\b|day\b|few\b)",
    re.IGNORECASE,
)
"""A bare noun phrase opened by "a"/"an" ("A consistent, easy-to-use hash table", "A backend that lets ..."):
a feature named as wanted, unless it is a statement, high praise or long (see list_kind)."""
ARTICLE_NP_MAX_WORDS = 25
SAYS_WHAT_IT_CAN = re.compile(
    r"^\W*(?:a|an)\s+(?:(?!(?:that|which|who|whom|so|if|when|where|because|to|you|i|we|they|it|he|she)\b)"
    r"[\w'-]+\s+){1,3}(?:can|could|will|must|may|might|cannot|can't|won't)\b",
    re.IGNORECASE,
)
"""An ARTICLE_NP whose noun is followed by a modal verb: it states what a thing can do ("A proprietary program
can use an LGPL library"), and names no wanted feature, as one with the modal in a clause of its own still does
("A backend that can ...", "A debugger you can attach ...", "A cache so builds will be faster")."""

HIGH_PRAISE = re.compile(
    r"\b(?:great|good|nice|love|loved|best|awesome|excellent|amazing|fantastic|brilliant|perfect|wonderful|powerful|"
    r"helpful|useful|convenient|must[- ]have|thanks?|thank you)\b",
    re.IGNORECASE,
)
"""Praise that makes an "a/an" noun phrase a verdict ("A very good app") rather than a wish; "easy" is not in
it, because a wished-for feature is often described as easy ("A repository with easy installation")."""

STATEMENT = re.compile(
    r"\b(?:is|are|was|were|has|had|i|we|it's|that's|there's|they're|you're|i'm|we're|than|more and more|"
    r"more or less)\b",
    re.IGNORECASE,
)
"""A finite statement or a comparison: a FEATURE_NP opening here is no request ("Better composability than
Stata", "More people are using R", "The ability to share is great")."""

REQUEST = re.compile(
    r"\bplease (?:add|make|bring|let|allow|give|consider|include|support|provide|improve|enable|implement|offer|"
    r"create|introduce|update|change|remove|fix)\b|"
    r"\bthere (?:should|needs to|must) be\b|^\W*needs? (?:a|an|more|better|some|to (?:be|have|add|support))\b|"
    r"\b(?:i|we) (?:really |also |just |still )?need (?:a|an|more|some|better|access|help|support|features?)\b|"
    r"\b(?:you|u) (?:had )?better\b|"
    r"\b(?:can|could) (?:you|u) (?:please )?(?:add|make|bring|include|allow|enable|provide|fix|give|let)\b|"
    r"\b(?:should|must|needs to|could)(?: really| also| just| definitely)* (?:add|allow|include|offer|support|"
    r"provide|enable|implement|integrate|introduce|let|give|show|ask|have (?:a|an|more|some|better|the option)|"
    r"be able|be possible|be made|be plain|be in|make it|become|be (?:much |a lot |a bit )?(?:more|less|cheaper|"
    r"faster|easier|simpler|clearer|quicker|better|bigger|larger|smaller|shorter|lighter))\b",
    re.IGNORECASE,
)
"""A request inside a sentence: a plea, an obligation on the product ("there should be", "it should
support"), a need for something, or advice to the makers ("you better ...")."""

# Pain points: a problem the speaker suffers.

PAIN_PARTS = (
    # feelings and verdicts
    r"frustrat\w*|annoy\w*|irritat\w*|infuriat\w*|disappoint\w*|struggl\w*|hate|hated|dislike|dread|"
    r"worr(?:y|ied|ies)|i fear|fear that|"
    r"stressful|stressed|painful|pain in the|nightmare|headaches?|hassle|tedious|clunky|cumbersome|awkward|odd|"
    r"crude|limited|poor|poorly|unreliable|unstable|inconvenien\w*|overwhelm\w*|confus\w*|complicated|convoluted|"
    r"counter-?intuitive|unintuitive|verbose|bloated|outdated|obsolete|"
    r"unusable|waste of (?:time|money)|wasted|wasting|mess|messy|steep|learning curve|"
    r"(?:a|such a) (?:real |huge |big )?pain",
    # failures
    r"crash\w*|freez\w*|hangs|bugs?|buggy|broken|glitch\w*|errors?|"
    r"(?:fails?|failing) to|(?:is|are|was|were) failing|failed|failure|stuck|"
    r"locked out|delays?|delayed|lag|lags|lagging|laggy|slow|slower|slowness|long wait\w*|"
    r"(?:takes?|took|taking) (?:forever|ages|too long|so long|a long time|days|weeks|months|hours)|"
    r"stops? (?:at|working|responding)|stopped (?:at|working|responding)|keeps? (?:crashing|freezing|failing|closing|"
    r"logging|saying|asking|bringing|showing)|kept (?:crashing|freezing|failing|closing|bringing|showing)|"
    r"(?:lose|loses|losing|lost) (?:my|all|the|our|that|their|data|work|track)|get lost|"
    r"(?:worked|was working|used to work) (?:fine |well |great |perfectly )?until",
    # negated capability or quality
    r"(?:doesn't|does not|don't|do not|didn't|did not|won't|will not|wouldn't|isn't|aren't|not|never|no longer) "
    r"(?:work\w*|load\w*|open\w*|sync\w*|sav\w*|show\w*|respond\w*|run|runs|install\w*|download\w*|start\w*|"
    r"connect\w*|updat\w*|function\w*|display\w*|recogni[sz]e\w*|accept\w*|appear\w*|process\w*|render\w*|"
    r"let me|allow\w*|support\w*|understand|available|possible|maintained|up to|"
    r"(?:very |really |so |that |always |too |particularly |quite )?(?:intuitive|ideal|great|good|clear|easy|obvious|"
    r"reliable|stable|responsive|user[- ]friendly|consistent|accurate|helpful|useful|enough|fast|quick|secure|"
    r"convenient|necessary|sufficient|mature|compatible|accessible|functional))",
    r"unable to|inability|not able to|not having|not being able|aren't able|isn't able|wasn't able|weren't able|"
    r"incapable|(?:can't|cannot|can not|couldn't|could not)(?! (?:really )?(?:think|recommend|imagine|wait|live|say|"
    r"complain|remember|believe|thank|praise|ask|stress|agree|be happier|be better|go wrong|fault|stop|do without|"
    r"have done|have asked|have been|predict|make a prediction|comment|speak)\b)",
    # difficulty
    r"difficult\w*|hard to|hard for|harder|too hard|challenging|impossible|tricky|troublesome|"
    r"(?:makes?|made|making) (?:it|that|this|things|everything|life) (?:\w+ )?(?:hard|difficult|painful)|"
    r"(?:is|are|was|were|it's|that's) (?:very |really |so |quite |pretty |a bit )?hard\b"
    r"(?![-\s](?:coded|set|wired|limit|requirement|work|drive|disk|copy))|"
    r"problems?|problematic|issues?|trouble|complain\w*|obstacles?|barriers?",
    # lack and absence
    r"lack|lacks|lacking|lacked|missing|i miss|absence of|there (?:is|are|was|were)(?: still)? no|there's no|"
    r"(?:doesn't|does not) (?:have|offer|include|provide|give|tell|let) (?=[a-z0-9])|"
    r"(?:has|have|had) no (?!idea\b|experience\b|opinion\b|preference\b|comments?\b|complaints?\b|words\b)|"
    r"no (?:good|easy|simple|real|proper|decent|native|built-in|clear|way|option|support|documentation|docs|"
    r"integration|ability|access|feedback|response|control|offline|dark|undo)",
    # cost and burden
    r"expensive|costly|overpriced|too (?:many|much|long|slow|hard|difficult|complicated|complex|expensive|confusing|"
    r"buggy|small|big|heavy|often|few|little|late|limited|verbose|cumbersome)|"
    r"(?:i|we|they|students|users) (?:have|had|has|need|needed) to (?:go|manually|re-?\w+|keep|wait|switch|"
    r"copy|use|do|fill|type|enter|log|sign|install|create)|had to be|"
    r"again and again|over and over|"
    r"could be (?:better|improved|easier|faster|clearer)|needs? (?:improvement|improving|work|fixing)|"
    r"leaves? (?:a lot|much) to be desired",
)
PAIN = re.compile(
    "|".join(rf"\b(?:{part})\b" for part in PAIN_PARTS)
    + r"|^\W*no (?!one\b|idea\b|not\b|no\b|yes\b|thanks?\b|doubt\b|matter\b|comments?\b|worries\b|need\b|"
    r"i\b|we\b|it\b|more\b|longer\b)[a-z]",
    re.IGNORECASE,
)
"""A problem the speaker suffers: a feeling (frustrating), a failure (crashes, doesn't load), a lack
(no unit testing support, lacking), a difficulty (hard to, unable to) or a burden (I have to go ...)."""

# Behaviours: what the speaker does.

PRACTICES = (
    r"use|run|write|create|build|check|keep|track|log|plan|schedule|share|store|teach|deploy|export|import|"
    r"save|open|work on|work with|start|develop|generate|stick|rely|switch|copy|email|send|submit|post|commit|push|"
    r"host|install|maintain|review|test|analy[sz]e|explore|prototype|document|print|spend|sync|back up|prefer to|"
    r"tend to|merge|release|publish|triage|mentor|require|encourage|go through|respond to|reply to|read through|"
    r"answer"
)
PRACTICES_ING = (
    r"using|running|writing|creating|generating|sharing|teaching|maintaining|exporting|deploying|analy[sz]ing|"
    r"storing|tracking|keeping|hosting|testing|sticking|relying|saving|checking"
)
BEHAVIOUR = re.compile(
    r"\b(?:i|we)(?: (?:usually|always|often|normally|typically|regularly|mostly|generally|sometimes|frequently|"
    r"occasionally|rarely|mainly|primarily|only|still|currently|now|also|just|actually|personally|strongly|then))? "
    rf"(?:{PRACTICES})\b|"
    rf"\b(?:i|we)(?:'m| am|'re| are|'ve been| have been)(?: \w+)? (?:{PRACTICES_ING})\b|"
    r"\b(?:i|we)(?:'ve| have)(?: \w+)? (?:started|been) (?:using|to use)\b|"
    r"\b(?:i|we) (?:don't|do not|never|rarely) (?:use|run|need|write|share|open|bother)\b|"
    r"\b(?:i|we) (?:usually|always|often|normally|typically|regularly|mostly|generally|tend to|rely on|"
    r"stick to|spend)\b|"
    r"\b(?:my|our|the) (?:students|team|colleagues|group|lab|company|analysts|clients) (?:currently |usually |"
    r"mostly |often |always |now |all |then )?(?:use|uses|submit|submits|create|creates|share|shares|work|works|run|"
    r"runs|write|writes|build|builds|rely|relies|send|sends|collaborate|collaborates|download|downloads|upload|"
    r"uploads|access|accesses|install|installs)\b|"
    r"\b(?:my|our|the) users (?:currently |usually |mostly |often |always |now |all )?(?:use|submit|create|share|"
    r"run|write|build|rely|send)\b|"
    r"\bwhat (?:i|we) (?:usually |typically |normally |generally )?do is\b|"
    r"\b(?:my|our) (?:day|week|morning|weekday|workday) (?:starts|begins|consists|looks)\b|"
    r"\b(?:in|for) (?:my|our) (?:setup|workflow|work|day job|team|lab|company|class|classes|course|courses)\b|"
    r"\b(?:my|our) (?:workflow|routine|process|setup) (?:is|involves|consists)\b|"
    r"\b(?:can't|cannot|couldn't|could not|can not) live without\b|"
    r"\b(?:i|we) (?:wrote|built|created|made|set up|developed) (?:a |an |some |my |our )?(?:\w+ )?(?:code|scripts?|"
    r"tools?|notebooks?|apps?|workflows?|pipelines?|systems?|templates?|extensions?|packages?|library|plugins?|"
    r"dashboards?|bots?) (?:to|for|that)\b|"
    r"\b(?:i|we) (?:often |sometimes |usually |always )?find (?:myself|ourselves)\b|"
    r"\b(?:i|we) do (?:most|all|much|a lot) of (?:my|our)\b|"
    r"\b(?:i|we) have (?:a|an|some|my|our) (?:own )?(?:scripts?|alias\w*|cron|templates?|checklists?|routine|system|"
    r"setup|workflow|process|code) (?:that|to|for|which)\b|"
    r"\b(?:our|my|the general|the usual|my usual|our usual) (?:policy|process|practice|convention|routine|approach) "
    r"(?:is|was)\b|"
    r"\b(?:my|our) (?:assignments|exams|courses|classes|lectures|labs|homework|workflows?|notebooks|scripts|reports|"
    r"analyses|projects|pipelines)(?: and \w+)? (?:are|get|live|go|run)\b|"
    r"\bon the daily\b",
    re.IGNORECASE,
)
"""A first-person practice: what the speaker (or their team or students) does, uses or keeps doing."""

LEAD_ACTIVITY = re.compile(
    r"^\W*(?:(?:mostly|mainly|usually|often|always|sometimes|primarily|just|only|also|currently|still|generally) )?"
    r"(?:us(?:e|ing)(?! cases?\b| of\b)|explor(?:e|ing)|analy[sz](?:e|ing)|prototyp(?:e|ing)|visuali[sz](?:e|ing)|"
    r"teach(?:ing)?|collaborat(?:e|ing))\b",
    re.IGNORECASE,
)
"""A subjectless answer that opens with an activity ("Explore data", "Mostly use it for teaching"); only
when it is neither a statement nor praise (see list_kind)."""

PURPOSE = re.compile(
    r"^\W*(?:mostly |mainly |primarily |just |only |usually )?to (?!be\b|me\b|this\b|that\b|the\b|my\b|our\b|a\b|an\b|"
    r"date\b|some\b|summari[sz]e\b|sum up\b|give you\b|put it\b|"
    r"make (?:it|things|\w+ing) (?:easier|better|simpler))[a-z]+\b",
    re.IGNORECASE,
)
"""A short purpose fragment ("To randomize student team assignments"): the answer to what the speaker
uses something for. Only when it is short and not a statement (see list_kind)."""
PURPOSE_MAX_WORDS = 12

HABIT_TIME = re.compile(
    r"\b(?:every (?:day|morning|evening|week|night|month|weekend)|each (?:day|week|morning|month)|most days|"
    r"daily|weekly|monthly|on weekends|in the morning|at night|"
    r"every (?:other|two|three|few|couple of) (?:days|weeks|months)|(?:once|twice) a (?:day|week|month|year)|"
    r"on (?:mondays|tuesdays|wednesdays|thursdays|fridays|saturdays|sundays))\b",
    re.IGNORECASE,
)
SPEAKER = re.compile(r"\b(?:i|i'm|i've|i'd|we|we're|we've|we'd)\b", re.IGNORECASE)
"""A time of habit counts as a behaviour only when the speaker is in the sentence ("every week I ...").
A duration ("for ten years") is no habit: with the speaker it is mostly biography, which is none."""

NOT_BEHAVIOUR = re.compile(
    r"\b(?:i|we) (?:\w+ )?(?:get|got|receive|received)\b|\bsince (?:i|we)\b|\b(?:best|worst|ever used)\b|"
    r"\bthan (?:any|all|every|other|the other|most)\b|\b(?:i|we)(?: will|['’]ll| am going to| are going to) be\b",
    re.IGNORECASE,
)
"""Things that happen to the speaker ("I always get alerts immediately"), the opening of a benefit
("Since I started using it, I have saved ..."), comparisons ("the best app I've used") and what the speaker
will be doing ("With the move to a monthly meeting, I will be attending") are no practice."""

QUESTION_ASKS: tuple[tuple[str | None, re.Pattern[str]], ...] = (
    (
        "goals",
        re.compile(
            r"\b(?:not address|would you like|missing|change one thing|suggestions?|enhancements?|wish(?:es)?|"
            r"improve(?:ments?)?|would (?:have )?made? .{0,40}better|would help|"
            r"(?:would|could|can|might|should) (?:\w+ ){0,3}make (?:\w+ ){0,3}easier)\b",
            re.IGNORECASE,
        ),
    ),
    (
        "pain_points",
        re.compile(
            r"\b(?:pain points?|problems?|challenges?|difficult|hinders?|frustrat\w*|obstacles?|barriers?|like least|"
            r"dislike|struggle\w*|annoy\w*|worst)\b",
            re.IGNORECASE,
        ),
    ),
    (
        None,
        re.compile(
            r"\b(?:causes?|definition|define|like best|pleasant|enjoy|job title|helped you (?:the )?most)\b",
            re.IGNORECASE,
        ),
    ),
    (
        "behaviours",
        re.compile(
            r"\b(?:how do you|(?:do|are) you (?:use|using|run|running|work|working)|tools? do you|go-to|other actions|"
            r"would take|could you not live without|ways? (?:in which|that) you|use cases?|address|working with|"
            r"your workflow|(?:most recent|last) thing you did)\b",
            re.IGNORECASE,
        ),
    ),
)
"""What a survey question asks for, by its words; the first that matches decides. None: the answers
describe the world or praise (causes, a definition, what one likes best or what helped most), so only an answer
in the first person can be the speaker's goal, pain or practice. A question matching none frames nothing."""

FRAGMENT_MAX_WORDS = 15
CLAUSE = re.compile(
    r"\b(?:i|we|my|our|they|you|he|she|it|this|that|there|these|those|things|is|are|was|were|will|would|have|has|"
    r"had|do|does|did|don't|didn't|can|could|should|am|'m|'s|'re|'ve|seems?|seemed|appears?|appeared|becomes?|"
    r"became|gets|got|makes|made|takes|took|keeps|kept|goes|went|acts|works|breaks|fails|feels)\b",
    re.IGNORECASE,
)
"""A subject or a verb of a clause: a sentence holding one says something of its own, so its question does
not make it an item ("This course was a joy to teach" answers "what are your pain points?")."""
NON_ANSWER_OPENING = re.compile(r"^\W*(?:none|nothing|no|not|n/a|na|nope|idk|thanks?|thank you)\b", re.IGNORECASE)
"""An answer that declines ("None at this time", "Not that I know of", "Thanks!")."""
DECLINED = re.compile(
    r"^\W*(?:(?:none|nothing|n/a|nope)\s*[-\u2013\u2014,:;]|no\s*[-\u2013\u2014:;.])"
    r"(?!\s*(?:but|except|apart|other than|although|though)\b)",
    re.IGNORECASE,
)
"""A sentence that declines first and then says why ("Nothing - the issues I had were all before dplyr"): its
answer is none, whatever trouble the reason names ("No - it has worked out well"); not one that goes on with an
exception ("None - but ...", and "No, but ..." where the comma makes it a reply)."""

CUES: dict[str, re.Pattern[str]] = {
    "pain_points": PAIN,
    "goals": re.compile(
        "|".join(f"(?:{cue.pattern})" for cue in (WISH, OPENER, FEATURE_NP, WAY_NP, REQUEST, ARTICLE_NP)), re.IGNORECASE
    ),
    "behaviours": BEHAVIOUR,
}
"""The three lists in persona's order, each with the union of its cues. A CUES match alone is only a
candidate: list_kind adds the guards, the vetoes and the precedence between lists."""
FILLER = re.compile(r",?(?<!\s)\s*\b(?:u+m+|u+h+|e+r+m+|h+m+|uh-huh|you know|i mean)\b,?", re.IGNORECASE)
STUTTER = re.compile(r"\b(\w+)(?:,? \1\b)+", re.IGNORECASE)
LIST_LENGTHS = {"minimal": 2, "standard": 3, "detailed": 5}
QUOTE_COUNTS = {"minimal": 1, "standard": 3, "detailed": 5}
THEME_COUNTS = {"simple": 2, "moderate": 3, "complex": 5}
MAX_DEMOGRAPHICS = 10  # attributes summarised per persona
MAX_ITEM_WORDS = 40  # a longer sentence is no goal, pain point or behaviour: a reader cannot take it in
PLAIN_ITEM_WORDS = 25  # a longer one is chosen only after every shorter one of its list
NUMBER_WORDS = frozenset(
    """
two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty hundred thousand
million first second third couple half dozen
""".split()
)
PLACEHOLDER_VALUES = frozenset("other others none na nan null unknown notapplicable nothing".split())
PERSONA_NAMES = (
    "Sarah Chen",
    "Marcus Johnson",
    "Priya Patel",
    "Diego Hernández",
    "Aisha Okafor",
    "Tomasz Nowak",
    "Mei Tanaka",
    "Olivia Brown",
    "Kwame Mensah",
    "Sofia Rossi",
    "Arjun Mehta",
    "Hannah Schmidt",
    "Lucas Oliveira",
    "Fatima Al-Sayed",
    "Noah Williams",
    "Yuki Sato",
    "Amara Nwosu",
    "Elena Petrova",
    "Mateo García",
    "Grace Kim",
    "Ibrahim Diallo",
    "Chloe Martin",
    "Ravi Shankar",
    "Ingrid Larsen",
    "Samuel Cohen",
    "Leila Haddad",
    "Jonas Weber",
    "Zara Ahmed",
    "Daniel Murphy",
    "Ana Costa",
    "Kenji Watanabe",
    "Nadia Kowalski",
    "Oscar Lindqvist",
    "Maya Goldberg",
    "Tariq Hassan",
    "Lucía Fernández",
    "Ethan Clarke",
    "Aylin Demir",
    "Benedict Osei",
    "Camille Dubois",
    "Rahul Verma",
    "Freya Jensen",
    "Hugo Moreau",
    "Imani Brooks",
    "Joon-ho Park",
    "Valentina Ricci",
    "Wei Zhang",
    "Esther Adeyemi",
)


LIST_MARKER = re.compile(r"^(?:\(?\d{1,2}\)|[-*•])\s+")  # "3) ", "(2) ", "- ": a list's numbering, not its words
MAX_JOINED_SENTENCE = 400  # characters a sentence joined across an abbreviation or brackets may reach
ABBREVIATIONS = frozenset(
    """
vs vs. i.e e.g etc cf approx dr mr mrs ms prof st no nos fig eg ie al inc ltd co jr sr dept est min max
""".split()
)


def split_sentences(text: str) -> list[str]:
    """Sentences of three words or more, without a list's numbering ("3) "); a stop after an abbreviation
    (vs., e.g.) or inside brackets ends none."""
    sentences: list[str] = []
    pending = ""
    for part in SENTENCE_END.split(text):
        if not part:
            continue
        if ends_a_list(pending) and part.strip()[:1].isupper():  # "etc." ends a list, and its sentence
            sentences.append(pending)
            pending = ""
        pending = f"{pending} {part.strip()}" if pending else part.strip()
        if not continues(pending):
            sentences.append(pending)
            pending = ""
    sentences.append(pending)
    unmarked = [LIST_MARKER.sub("", sentence) for sentence in sentences]
    return [sentence for sentence in unmarked if len(sentence.split()) >= 3]


def ends_a_list(piece: str) -> bool:
    """Whether a piece cut at a stop ends in "etc." outside brackets (inside them, the stop ends nothing)."""
    return piece.lower().endswith(" etc.") and piece.count("(") <= piece.count(")")


def continues(piece: str) -> bool:
    """Whether a piece cut at a stop goes on: it ends in an abbreviation, or a bracket it opened is still open."""
    if not piece or len(piece) > MAX_JOINED_SENTENCE:  # a stray "(" must not swallow the rest of an answer
        return False
    last = piece.rsplit(None, 1)[-1].lower().lstrip("(\"'“‘").rstrip(")\"'”’")
    return last.rstrip(".") in ABBREVIATIONS or last in ABBREVIATIONS or piece.count("(") > piece.count(")")


def shown_span(sentence: str, start: int, end: int) -> str:
    """A phrase as written (`Google Colab`, `PDF export`, `CI/CD`); a sentence's first word loses its capital."""
    words = re.sub(r"[^\w'’ /-]", " ", sentence[start:end]).split()
    if words and start == 0 and not words[0].isupper():
        words[0] = words[0].lower()
    return " ".join(words)


def is_phrase(gap: str) -> bool:
    """Whether two words with `gap` between them read as one phrase."""
    words = re.sub(r"[^\w'’ -]", " ", gap).lower().split()
    return (
        len(words) <= MAX_SPAN_WORDS - 2
        and all(word in GLUE_WORDS for word in words)
        and not re.search(r"[.,;:!?]", gap)
    )


def term_counts(texts: Iterable[str], surfaces: Counter[tuple[str, str]] | None = None) -> Counter[str]:
    """Unigrams and adjacent-word bigrams of each unit's sentences; notes surface forms for display."""
    counts: Counter[str] = Counter()
    for text in texts:
        for sentence in split_sentences(text) or [text]:
            words = content_spans(sentence)
            for index, (token, surface, start, end) in enumerate(words):
                counts[token] += 1
                if surfaces is not None:
                    surfaces[(token, surface)] += 1
                if index + 1 < len(words):
                    following = words[index + 1]
                    pair = f"{token} {following[0]}"
                    counts[pair] += 1
                    if surfaces is not None and is_phrase(sentence[end : following[2]]):
                        surfaces[(pair, shown_span(sentence, start, following[3]))] += 1
    return counts


@dataclass
class Corpus:
    """The dataset as TF-IDF vectors: what the clustering and the ranking read."""

    people: list[Participant]
    vocabulary: dict[str, int]
    idf: list[float]
    vectors: list[dict[int, float]]
    display: dict[str, str]
    users: list[set[int]]  # per participant, the non-attribute terms they used
    speakers: Counter[int]  # per term, how many participants used it


ORDINAL_SCALES = (
    ("never", "rarely", "sometimes", "often", "always"),
    ("never", "rarely", "sometimes", "often", "very often"),
    ("strongly disagree", "disagree", "neither agree nor disagree", "agree", "strongly agree"),
    ("strongly disagree", "disagree", "neutral", "agree", "strongly agree"),
    ("never", "a few times a year", "monthly", "weekly", "daily"),
    ("never", "less than once a month", "monthly", "weekly", "daily"),
    ("very dissatisfied", "dissatisfied", "neutral", "satisfied", "very satisfied"),
    ("very unlikely", "unlikely", "neutral", "likely", "very likely"),
    ("not at all", "slightly", "moderately", "very", "extremely"),
    ("not important", "slightly important", "somewhat important", "very important", "critical"),
    ("not at all important", "slightly important", "moderately important", "very important", "extremely important"),
    ("horrible", "bad", "ok", "good", "excellent"),
    ("very poor", "poor", "fair", "good", "very good", "excellent"),
    ("beginner", "intermediate", "advanced", "expert"),
)
SCALE_LEVELS = {value: index for scale in ORDINAL_SCALES for index, value in enumerate(scale)}
SCALE_WORDS = frozenset(word for level in SCALE_LEVELS for word in level.split())


def answer_terms(key: str, value: str) -> set[str]:
    """`role=charge nurse`, plus one term per word so that "Nurse" and "Charge Nurse" are alike.

    An answer on an ordered scale also counts every level up to it (`often` is `>=1`,
    `>=2`, `>=3`), so "often" and "always" are nearer each other than "never" is.
    """
    if is_number(value):
        return set()
    answer = value.strip().lower()
    terms = {f"{key}={answer}"}
    terms.update(f"{key}={word}" for word, _ in content_words(value))
    terms.update(f"{key}>={level}" for level in range(1, SCALE_LEVELS.get(answer, 0) + 1))
    return terms


WHO_THEY_ARE = re.compile(
    r"\b(?:describes? (?:you|yourself|the work you do|your)|job title|"
    r"(?:what|which) is your (?:[\w-]+ ){0,2}?(?:role|position|occupation|profession|job)|"
    r"what (?:role|occupation|profession)|highest degree|level of (?:school|education)(?! is your course)|are you an?|"
    r"consider yourself (?:to be )?(?:an?|on|at|part of))\b|\b(?:what|which) (?:kind|type) of \w+ are you\s*\?*\s*$|"
    r"^(?:role|job|occupation|profession|position|job title|job role|user type)$",
    re.IGNORECASE,
)
"""A question whose answer names what kind of person answered (a role, a job, a degree, where they stand on a
ladder they consider themselves on): `Data scientist`, `Subproject owner` say it alone."""
IDENTITY_WEIGHT = 2.0
"""How much more a question that asks who they are (`WHO_THEY_ARE`) counts in clustering than any other."""


def question_of(key: str, labels: Mapping[str, str]) -> str:
    """The question an attribute answers: a grid's stem for each of its items, else the attribute itself."""
    grid = grid_parts(header_of(key, labels))
    return grid[0] if grid else key


def attribute_weights(people: list[Participant], labels: Mapping[str, str]) -> dict[str, float]:
    """Per attribute, how much its answer counts in clustering: ATTRIBUTE_WEIGHT, shared among a grid's items,
    twice that for a question that asks who they are.

    A grid of n items weighs as one question (each item 1/sqrt(n), so the grid's share of a distance is
    one question's). Counted item by item, a 16-item rating grid outweighs the role question sixteen
    times over, and people then group by how they fill in grids ("not important" to every feature)
    rather than by who they are. A persona is a kind of person: where the survey asks what kind (a role,
    a job, a kind of user, a rung on a ladder), that answer leads the grouping without deciding it."""
    keys = dict.fromkeys(key for person in people for key in person.attributes)
    questions = {key: question_of(key, labels) for key in keys}
    items = Counter(questions.values())
    weights = {}
    for key, question in questions.items():
        asks_who = items[question] == 1 and WHO_THEY_ARE.search(header_of(key, labels))
        weights[key] = ATTRIBUTE_WEIGHT * (IDENTITY_WEIGHT if asks_who else 1.0) / math.sqrt(items[question])
    return weights


def build_corpus(people: list[Participant], labels: Mapping[str, str] | None = None) -> Corpus:
    """The participants as vectors; `labels` (the dataset's question texts) tell a grid's items apart."""
    surfaces: Counter[tuple[str, str]] = Counter()
    counts = [term_counts(person.texts, surfaces) for person in people]
    answer_weights = attribute_weights(people, labels or {})
    weight_of: dict[str, float] = {}
    for person, count in zip(people, counts):
        for key, value in person.attributes.items():
            terms = answer_terms(key, value)
            count.update(terms)
            weight_of.update(dict.fromkeys(terms, answer_weights[key]))
    df: Counter[str] = Counter(term for count in counts for term in count)
    min_df = 2 if len(people) >= 4 else 1
    kept = [term for term, freq in df.most_common() if freq >= min_df][:MAX_FEATURES]
    vocabulary = {term: index for index, term in enumerate(sorted(kept))}
    n = len(people)
    idf = [0.0] * len(vocabulary)
    for term, index in vocabulary.items():
        idf[index] = math.log((1 + n) / (1 + df[term])) + 1
    weights = [1.0] * len(vocabulary)
    for term, index in vocabulary.items():
        weights[index] = weight_of.get(term, 1.0)
    vectors = [tfidf_vector(count, vocabulary, idf, weights) for count in counts]
    users = [{vocabulary[t] for t in count if t in vocabulary and t not in weight_of} for count in counts]
    display: dict[str, str] = {}
    for (token, surface), _ in surfaces.most_common():
        display.setdefault(token, surface)
    speakers: Counter[int] = Counter(t for used in users for t in used)
    return Corpus(people, vocabulary, idf, vectors, display, users, speakers)


def tfidf_vector(
    count: Mapping[str, int], vocabulary: dict[str, int], idf: list[float], weights: list[float] | None = None
) -> dict[int, float]:
    """Log-scaled term frequency times idf, each term times its weight (`weights`, by vocabulary index)."""
    vector: dict[int, float] = {}
    for term, freq in count.items():
        index = vocabulary.get(term)
        if index is not None:
            weight = (1 + math.log(freq)) * idf[index]
            vector[index] = weight * weights[index] if weights else weight
    return normalised(vector)


def normalised(vector: dict[Any, float]) -> dict[Any, float]:
    norm = math.sqrt(sum(weight * weight for weight in vector.values()))
    return {index: weight / norm for index, weight in vector.items()} if norm else vector


def similarity(vector: Mapping[Any, float], centroid: Mapping[Any, float]) -> float:
    return sum(weight * centroid.get(index, 0.0) for index, weight in vector.items())


def centroid_of(vectors: Iterable[dict[int, float]]) -> dict[int, float]:
    total: dict[int, float] = {}
    for vector in vectors:
        for index, weight in vector.items():
            total[index] = total.get(index, 0.0) + weight
    return normalised(total)


def mean_vector(vectors: list[dict[int, float]], members: list[int]) -> dict[int, float]:
    total: dict[int, float] = {}
    for i in members:
        for index, weight in vectors[i].items():
            total[index] = total.get(index, 0.0) + weight
    return {index: weight / len(members) for index, weight in total.items()}


PRINCIPAL_ROUNDS = 100  # power iterations at most: fewer left directions half-turned where two are nearly as long
PRINCIPAL_SETTLED = 1e-6  # a direction that moved less than this (1 - cosine) in a round has settled
PRINCIPAL_SAMPLE = 1000  # members a direction is found from, at most: a sample gives nearly the same one


def content_key(vector: dict[int, float]) -> int:
    """A number a participant's words and answers set, whatever their place in the data: for ties."""
    return hash(tuple(sorted(vector.items())))


def in_content_order(vectors: list[dict[int, float]], members: list[int]) -> list[int]:
    """The members in an order their words set, not the data's."""
    return sorted(members, key=lambda i: content_key(vectors[i]))


def direction_sample(vectors: list[dict[int, float]], members: list[int]) -> list[int]:
    """At most PRINCIPAL_SAMPLE members, spread evenly in an order their words set (not the data's order)."""
    if len(members) <= PRINCIPAL_SAMPLE:
        return members
    ordered = in_content_order(vectors, members)
    return sorted(ordered[:: math.ceil(len(members) / PRINCIPAL_SAMPLE)])


def principal_direction(vectors: list[dict[int, float]], members: list[int]) -> dict[int, float]:
    """The direction along which the members differ most (power iteration on their covariance).

    It starts from the member farthest from the mean, so the same members always give the
    same direction: no random seed, and a sample of them gives nearly the same one, which is
    why a large group's direction is found from a sample of it. It runs until the direction
    settles, so where it ends does not depend on where it started.
    """
    members = direction_sample(vectors, members)
    mean = mean_vector(vectors, members)
    farthest = min(members, key=lambda i: (similarity(vectors[i], mean), content_key(vectors[i])))
    direction = dict(vectors[farthest])
    for index, weight in mean.items():
        direction[index] = direction.get(index, 0.0) - weight
    for _ in range(PRINCIPAL_ROUNDS):
        offset = similarity(mean, direction)
        projections = [similarity(vectors[i], direction) - offset for i in members]
        moved: dict[int, float] = {}
        for projection, i in zip(projections, members):
            for index, weight in vectors[i].items():
                moved[index] = moved.get(index, 0.0) + projection * weight
        total = sum(projections)
        for index, weight in mean.items():
            moved[index] = moved.get(index, 0.0) - total * weight
        moved = normalised(moved)
        settled = 1 - abs(similarity(moved, direction)) < PRINCIPAL_SETTLED
        direction = moved
        if settled:
            break
    return direction


def split_in_two(vectors: list[dict[int, float]], members: list[int]) -> tuple[list[int], list[int]]:
    """The members on either side of their mean along their principal direction."""
    direction = principal_direction(vectors, members)
    offset = similarity(mean_vector(vectors, members), direction)
    side = {i: similarity(vectors[i], direction) >= offset for i in members}
    first, second = [i for i in members if side[i]], [i for i in members if not side[i]]
    if not first or not second:  # all alike along every direction: halves, in an order their words set
        ordered = in_content_order(vectors, members)
        first, second = sorted(ordered[: len(members) // 2]), sorted(ordered[len(members) // 2 :])
    return first, second


def spread(vectors: list[dict[int, float]], members: list[int]) -> float:
    """How far a group's members lie from their mean, in all (n - n·|mean|², for unit vectors)."""
    mean = mean_vector(vectors, members)
    return len(members) * (1 - similarity(mean, mean))


def tie_order(vectors: list[dict[int, float]], members: list[int]) -> tuple[float, int]:
    """Of groups as large, which to split first: the most spread out, then the one whose words come first."""
    return round(spread(vectors, members), 9), -min(content_key(vectors[i]) for i in members)


def divisive_labels(vectors: list[dict[int, float]], k: int) -> list[int]:
    """`k` groups by splitting the largest group in two along its principal direction, again and again
    (of groups as large, the most spread out; then the one whose words come first: never by position)."""
    groups = [list(range(len(vectors)))]
    while len(groups) < k:
        size = max(len(members) for members in groups)
        tied = [members for members in groups if len(members) == size]  # a tie is rare: only then are they weighed
        largest = tied[0] if len(tied) == 1 else max(tied, key=lambda members: tie_order(vectors, members))
        groups.remove(largest)
        groups.extend(split_in_two(vectors, largest))
    labels = [0] * len(vectors)
    for number, members in enumerate(groups):
        for i in members:
            labels[i] = number
    return labels


def assign(vectors: list[dict[int, float]], centres: list[dict[int, float]]) -> list[int]:
    return [max(range(len(centres)), key=lambda c: similarity(vector, centres[c])) for vector in vectors]


def fill_empty_clusters(vectors: list[dict[int, float]], labels: list[int], centres: list[dict[int, float]]) -> None:
    """An empty cluster takes the member that fits its own cluster worst."""
    for cluster in range(len(centres)):
        if cluster in labels:
            continue
        sizes = Counter(labels)
        movable = [i for i, label in enumerate(labels) if sizes[label] > 1]
        worst = min(movable, key=lambda i: similarity(vectors[i], centres[labels[i]]))
        labels[worst] = cluster
        centres[cluster] = vectors[worst]


def kmeans(vectors: list[dict[int, float]], labels: list[int], k: int, max_rounds: int = 50) -> list[int]:
    """Spherical k-means from a first grouping: each member moves to the centre it is most like."""
    for _ in range(max_rounds):
        centres = cluster_centres(vectors, labels, k)
        new_labels = assign(vectors, centres)
        fill_empty_clusters(vectors, new_labels, centres)
        if new_labels == labels:
            break
        labels = new_labels
    return labels


def cluster_centres(vectors: list[dict[int, float]], labels: list[int], k: int) -> list[dict[int, float]]:
    members: list[list[dict[int, float]]] = [[] for _ in range(k)]
    for vector, label in zip(vectors, labels):
        members[label].append(vector)
    return [centroid_of(group) for group in members]


def size_limits(n: int, k: int) -> tuple[int, int]:
    """The smallest and largest segment a persona may stand for.

    No segment holds more than half the participants when there are three or more, and
    none fewer than two participants or 2% of them, whichever is more (as far as `n` allows).
    """
    smallest = max(2, math.ceil(0.02 * n))
    if smallest * k > n:
        smallest = max(1, n // k)
    largest = max(n // 2, smallest) if k >= 3 else n - smallest * (k - 1)
    return smallest, largest


def balance(vectors: list[dict[int, float]], labels: list[int], k: int, rounds: int = 20) -> list[int]:
    """Move the members that fit worst until every segment's size is within its limits.

    A member leaves an oversized segment for the one it fits next best; an undersized
    segment takes the members of larger ones that fit it best. Deterministic.
    """
    smallest, largest = size_limits(len(vectors), k)
    labels = list(labels)
    for _ in range(rounds):
        sizes = Counter(labels)
        over = [c for c in range(k) if sizes[c] > largest]
        under = [c for c in range(k) if sizes[c] < smallest]
        if not over and not under:
            break
        centres = cluster_centres(vectors, labels, k)
        sims = [[similarity(vector, centre) for centre in centres] for vector in vectors]
        for cluster in over:
            shed_members(labels, sims, cluster, sizes, largest)
        for cluster in under:
            gather_members(labels, sims, cluster, sizes, smallest)
    return labels


def shed_members(labels: list[int], sims: list[list[float]], cluster: int, sizes: Counter[int], largest: int) -> None:
    def best_other(i: int) -> int:
        return max(
            (c for c in range(len(sims[i])) if c != cluster and sizes[c] < largest), key=sims[i].__getitem__, default=-1
        )

    members = sorted(
        (i for i, label in enumerate(labels) if label == cluster),
        key=lambda i: (sims[i][cluster] - max((s for c, s in enumerate(sims[i]) if c != cluster), default=0.0), i),
    )
    for i in members:
        if sizes[cluster] <= largest:
            break
        target = best_other(i)
        if target >= 0:
            labels[i], sizes[cluster], sizes[target] = target, sizes[cluster] - 1, sizes[target] + 1


def gather_members(
    labels: list[int], sims: list[list[float]], cluster: int, sizes: Counter[int], smallest: int
) -> None:
    candidates = sorted(
        (i for i, label in enumerate(labels) if label != cluster),
        key=lambda i: (sims[i][labels[i]] - sims[i][cluster], i),
    )
    for i in candidates:
        if sizes[cluster] >= smallest:
            break
        if sizes[labels[i]] > smallest:
            sizes[labels[i]] -= 1
            labels[i], sizes[cluster] = cluster, sizes[cluster] + 1


def cluster_participants(corpus: Corpus, k: int) -> list[list[int]]:
    """Segments as lists of participant indexes, largest first; deterministic, with no seed.

    Divisive splits give the first grouping and k-means refines it: k-means from random
    seeds found a different grouping on nearly every 90% sample of a real survey, where
    splits along principal directions find much the same one.
    """
    labels = balance(corpus.vectors, kmeans(corpus.vectors, divisive_labels(corpus.vectors, k), k), k)
    segments = [[i for i, label in enumerate(labels) if label == cluster] for cluster in range(k)]
    return sorted((members for members in segments if members), key=lambda members: (-len(members), members[0]))


@dataclass
class Segment:
    """Participants (indexes into the corpus) one persona stands for; `name` when the researcher named it."""

    members: list[int]
    name: str | None = None
    answer: str | None = None  # the group_by answer its members share, when the researcher grouped by one


def attribute_value(person: Participant, wanted: str) -> str | None:
    return person.attributes.get(normalise_key(wanted))


def segments_for(corpus: Corpus, count: int, config: JSON) -> list[Segment]:
    """The researcher's grouping when `config` gives one (`groups`, `group_by`), else clustering."""
    people = corpus.people
    if config.get("groups") is not None:
        return named_groups(people, config["groups"])
    if config.get("group_by") is not None:
        return attribute_groups(people, config["group_by"], count)
    if len(people) < count:
        raise GenerationError(
            f"the data has {len(people)} participant(s), fewer than the {count} personas asked for; "
            f"ask for at most {len(people)}"
        )
    return [Segment(members) for members in cluster_participants(corpus, count)]


def named_groups(people: list[Participant], groups: Mapping[str, list[str]]) -> list[Segment]:
    index = {person.id: i for i, person in enumerate(people)}
    unknown = [pid for ids in groups.values() for pid in ids if pid not in index]
    if unknown:
        raise GenerationError(
            f"config.groups names participant id(s) the data does not have: {named_list(unknown)}; "
            f"its ids include {named_list([p.id for p in people[:5]])}"
        )
    segments = [Segment(list(dict.fromkeys(index[pid] for pid in ids)), name) for name, ids in groups.items()]
    empty = [name for name, segment in zip(groups, segments) if not segment.members]
    if empty:
        raise GenerationError(f"config.groups has empty group(s): {named_list(empty)}")
    return segments


def attribute_groups(people: list[Participant], attribute: str, count: int) -> list[Segment]:
    by_value: dict[str, list[int]] = {}
    for i, person in enumerate(people):
        value = attribute_value(person, attribute)
        if value is not None:
            by_value.setdefault(value, []).append(i)
    if not by_value:
        have = sorted({key for person in people for key in person.attributes})
        raise GenerationError(
            f"config.group_by names {attribute!r}, an attribute the data does not have; "
            f"its attributes: {', '.join(have) if have else '(none)'}"
        )
    largest = sorted(by_value.items(), key=lambda item: (-len(item[1]), item[0]))[:count]
    return [Segment(members, answer=value) for value, members in largest]


@dataclass
class Sentence:
    participant: str
    text: str
    score: float
    question: str = ""  # the survey question it answers, if any


def segment_sentences(corpus: Corpus, members: list[int], centre: dict[int, float]) -> list[Sentence]:
    """The segment's sentences, most central first; exact repeats dropped. None crosses a unit."""
    seen, sentences = set(), []
    for index in members:
        person = corpus.people[index]
        for text in person.texts:
            for sentence in split_sentences(text):
                key = re.sub(r"\W+", " ", sentence.lower()).strip()
                if key in seen:
                    continue
                seen.add(key)
                vector = tfidf_vector(term_counts([sentence]), corpus.vocabulary, corpus.idf)
                question = person.asked.get(text, "")
                sentences.append(Sentence(person.id, sentence, similarity(vector, centre), question))
    return sorted(sentences, key=lambda s: (-s.score, s.participant, s.text))


POINTS_BACK = re.compile(
    r"^\W*(?:that\b|this(?:'s|\s+(?:is|was|are|were|means|meant|would|will|can|could|should|might|may|must|has|"
    r"had|have|does|did|makes|made|happens|happened|seems|sounds|gets|got|goes|went|takes|took|also|just|really|"
    r"typically|usually|often|always|never|sometimes|basically|actually|probably|alone|too)\b)|"
    r"(?:these|those|such|they|they're|them)\b|i\.e\.|e\.g\.|which\b|for (?:example|instance)\b|"
    r"(?:two|three|four|second|secondly|third|thirdly|next|lastly|finally)(?:\s*,|\s+is\b|\s*-)|"
    r"(?:and|but|so|or|because|however|similarly|likewise|moreover|furthermore|besides|additionally|otherwise|"
    r"plus)\b|"
    r"(?:by the end of|at|after|because of|with regards? to|in) (?:it|that)\b|"
    r"(?:by the end of|at|after|because of|with regards? to|in) (?:this|those)(?=\s*[,.;])|what that means\b|"
    r"the (?:one|ones)\b(?! (?:thing|things)\b)|the (?:other|others)\b(?! (?:day|week|month|night|year)\b)|"
    r"the (?:former|latter|same)\b|(?:for|because of) (?:these|those|that|this|the same|both) reasons?\b)",
    re.IGNORECASE,
)
"""A sentence that opens by pointing at what came before it ("This means I end up ...", "That would be cool",
"That issue template was ...", "These slides can be imported", "They're very annoying!", "The one that wasn't was
...", "For these reasons, I ...", "For example, if I build package A ...", "Two, it had to be ...", "Second is -
...") or by carrying it on ("And they might hear ...", "But there was no real buzz around it"): a reader shown it
alone cannot tell what it is about."""
ELSEWHERE = re.compile(
    r"\b(?:(?:see|mentioned|said|noted|listed|described|linked)(?: [\w-]+){0,2} (?:above|below|earlier|before)|"
    r"as (?:i|we) (?:said|mentioned)|like (?:i|we) said|as mentioned|"
    r"(?:as|like) you (?:said|mentioned)|you (?:just )?(?:asked|mentioned)|your question|"
    r"you(?:'re| are| were) (?:calling|describing|talking about|asking)|(?:might as well|let's) talk about|"
    r"next episodes?|this (?:podcast|episode|interview)|(?:everyone|everybody|anyone|you all) listening|listeners)\b",
    re.IGNORECASE,
)
"""A sentence that sends the reader to the text around it ("see linked video above", "as I said") or answers the
interviewer's words ("A bunch of things came to mind when you asked the question", "what you're calling ...") or
speaks of the talk itself ("We might as well talk about Node", "I'm looking forward to the next episodes", "To
everyone listening, ...")."""
SELF_REPAIR = re.compile(r"\s--\s(?:and|but|so|i|we|it|you|they|the|like|um|uh)\b", re.IGNORECASE)
"""A speaker breaking off and starting again ("we've -- and it was really hard"): no sentence to show. A dash typed
between two parts ("Better keybindings -- toggle for vim") is none."""
LEANS_BACK = re.compile(
    r"\b(?:it|that|this|them|(?<!\bout )there)(?=\s*(?:[.,;:!?)]|$)|\s+(?:down|up|out|off|back|over|away|again|"
    r"anymore|either|too|yet)\b)|"
    r"\b(?:that|those) (?:time|times|thing|things|stuff|kind|sort|point|way|one|ones|part|piece|issue|issues|idea|"
    r"case|cases|guidance|project|work)\b|\b(?:do|does|did|doing|done) (?:it|that|this)\b|\bthese\b(?! days\b)|"
    r"\blike (?:this|that)\b|\bthis way\b|\bthe (?:whole|entire) thing\b|^\W*(?:yes|yeah|yep|no)\b\s*[,.!]",
    re.IGNORECASE,
)
"""A pronoun that ends a clause ("We pull it down, we build it.", "I would love to do that, but ..."), a thing
named by "that" or "these" ("I spend that time writing", "these open source projects"), or a deed named by "do
it" or "like this" ("My main goal in doing that is ...", "issues like this"): what the sentence is about was
most likely said before it; so does a reply that opens with "Yes," or "No," to a question the card does not
show ("Yes, with the help of mentors."). Its referent is often in the sentence itself ("a notebook ... I would
like to scale it up"), so such a sentence is chosen last rather than never."""
ALIKE_SHARE = 2 / 3  # of the shorter item's words, shared with one already chosen: the same item said again


def stands_alone(text: str) -> bool:
    """Whether a sentence can be shown on its own: it neither points back, nor sends the reader elsewhere, nor
    breaks off (`--`, a trailing `...`), and holds no quotation cut in two by the sentence's end (`I'd
    appreciate it if you didn't."`)."""
    plain = text.replace("\u201c", '"').replace("\u201d", '"').rstrip()
    return not (
        POINTS_BACK.match(text)
        or ELSEWHERE.search(text)
        or SELF_REPAIR.search(text)
        or plain.endswith(("...", "\u2026"))
        or plain.count('"') % 2
    )


@dataclass
class Said:
    """What a persona's chosen items and quotes say, so that none says one of them again; `topic` holds the
    word pairs so many participants use (`flaky test`) that sharing one tells nothing."""

    topic: frozenset[str] = frozenset()
    words: list[frozenset[str]] = field(default_factory=list)
    pairs: set[str] = field(default_factory=set)

    def again(self, text: str) -> bool:
        """Whether `text` repeats one already chosen: the same words ("Ggplot2 and dplyr" after "Ggplot2 &
        dplyr"), two or more shared and most of the shorter one's, or a pair of words side by side that is no
        topic ("multiple cells" in "Selecting multiple cells" and "Lack of ability to select multiple cells")."""
        words, pairs = word_set(text), word_pairs(text)
        return bool(pairs & self.pairs) or any(words == other or share_most(words, other) for other in self.words)

    def add(self, text: str) -> None:
        self.words.append(word_set(text))
        self.pairs.update(word_pairs(text) - self.topic)


def share_most(words: frozenset[str], other: frozenset[str]) -> bool:
    """Two or more words shared, and most of the shorter one's: the same item, even where the shared words are
    the data set's topic ("Flaky tests are slow." after "I quarantine flaky tests the same day.")."""
    shared = len(words & other)
    return shared >= 2 and shared >= ALIKE_SHARE * min(len(words), len(other))


def word_pairs(text: str) -> set[str]:
    """Adjacent content words of a sentence, as the corpus's pair terms spell them (`multiple cell`)."""
    tokens = [token for token, _ in content_words(text)]
    return {f"{first} {second}" for first, second in zip(tokens, tokens[1:])}


TOPIC_PAIR_SHARE = 0.2  # a word pair this share of the participants who said anything use is the data set's topic


def topic_pairs(corpus: Corpus) -> frozenset[str]:
    """The word pairs a fifth or more of those who said anything use: the data set's topic (`flaky test`, said by
    26% in a survey about them), no repeat when shared. `version control`, said by 17% of a notebook survey, is a
    theme: three items about it in one persona say one thing three times."""
    widespread = TOPIC_PAIR_SHARE * sum(1 for used in corpus.users if used)
    return frozenset(
        term for term, index in corpus.vocabulary.items() if " " in term and corpus.speakers[index] >= widespread
    )


def pick_spread(candidates: list[Sentence], count: int, said: Said | None = None) -> list[Sentence]:
    """The best `count`, one per participant first so a single voice does not dominate, none saying one
    already chosen for the persona again (`said`, which the chosen join)."""
    said = said if said is not None else Said()
    chosen: list[Sentence] = []
    voices: set[str] = set()
    for first_round in (True, False):
        for candidate in candidates:
            if len(chosen) >= count or candidate in chosen or (first_round and candidate.participant in voices):
                continue
            if not said.again(candidate.text):
                chosen.append(candidate)
                said.add(candidate.text)
                voices.add(candidate.participant)
    return chosen


def blank_pseudo_cues(sentence: str) -> str:
    """Straight apostrophes, and pseudo-cues (no problem, hard work, hard to say) blanked out."""
    text = sentence.replace("\u2019", "'").replace("\u2018", "'")
    return NOT_A_CUE.sub(" ", text)


def opens_as_request(text: str) -> bool:
    """An imperative request, or a feature fragment that is not a statement or comparison."""
    return bool(
        OPENER.match(text)
        or (FEATURE_NP.match(text) and not STATEMENT.search(text))
        or (WAY_NP.match(text) and not PRAISE.search(text))
    )


def question_asks(question: str) -> str | None:
    """The list a survey question asks for, "none" when its answers describe the world, None when it frames nothing."""
    for asked, pattern in QUESTION_ASKS:
        if pattern.search(question):
            return asked or "none"
    return None


QUOTED_OPENING = re.compile(r"(?:^|\s)[\"\u201c\u2018'(\[]")


def is_question(text: str) -> bool:
    """Whether a sentence asks: it ends with a question mark, or is a quoted or bracketed question with
    at most a word before it (`Or "What is the language here?"`); a sentence that quotes a question
    asks nothing (`I hate the popup that keeps asking "Are you sure?"`)."""
    plain = text.rstrip()
    if plain.endswith("?"):
        return True
    closed = plain.rstrip("\"'\u201d\u2019)]")
    opening = QUOTED_OPENING.search(closed)
    return closed.endswith("?") and opening is not None and len(closed[: opening.start()].split()) <= 1


def is_bare_fragment(text: str) -> bool:
    """A short answer with no clause of its own, no refusal and no praise ("Managing notebooks on git"):
    what it is depends on the question it answers."""
    return (
        len(text.split()) <= FRAGMENT_MAX_WORDS
        and not is_question(text)
        and not CLAUSE.search(text)
        and not NON_ANSWER_OPENING.match(text)
        and not PRAISE.search(text)
        and len(re.findall(r"[A-Za-z]{3,}", text)) >= 2
    )


ACTION_LEAD = re.compile(
    r"^\W*(?:rewrite|fix|repair|split|mock|stub|retry|re-?run|isolate|quarantine|skip|remove|delete|refactor|"
    r"investigate|debug|ignore|disable|mark|add|increase|reduce|restart|reboot|replace|upgrade|downgrade|pin|"
    r"revert|notify|contact|ask|tell)\b(?! (?:is|are|was|were|has|have)\b)",
    re.IGNORECASE,
)
"""An answer that opens with what one does ("Rewrite problematic code to make it testable"): under a
question that asks what one does, it is a practice, whatever trouble it names."""
ASKS_THE_MAKERS = re.compile(r"^\W*(?:please|make it|let|give|allow|enable|provide|offer|bring back)\b", re.IGNORECASE)
"""An imperative that only the makers can carry out ("Please add ...", "Let users ...", "Allow ..."): a
request, even where the question asks what one does."""
IN_THE_WAY = re.compile(r"\b(?:hinders?|obstacles?|barriers?|prevents?|keeps? you from|stops? you)\b", re.IGNORECASE)
"""A question that asks what stands in the way, which its answers name by what is missing as often as not."""
NOT_GERUNDS = frozenset("string strings thing things something anything everything nothing morning evening".split())
TROUBLE_GERUNDS = frozenset("having missing lacking struggling failing waiting trying fighting dealing".split())


def first_word(text: str) -> str:
    found = re.match(r"\W*([A-Za-z]+)", text)
    return found[1].lower() if found else ""


def opens_with_activity(text: str) -> bool:
    """Whether an answer opens with an activity ("Organizing the submissions"), not a thing ("Git integration")."""
    word = first_word(text)
    return word.endswith("ing") and word not in NOT_GERUNDS


JUDGED = re.compile(r"(?<!\bto )\b(?:is|are|was|were|takes?|took|makes|made)\b", re.IGNORECASE)
"""A verb that judges what a sentence opens with ("Building the docs is a problem", "Debug builds take
forever"): the opening word is then its subject, not an action."""


def opens_with_action(text: str) -> bool:
    """Whether an answer opens with what one does ("Deploying a stack", "Rewrite the test to make it ..."),
    not with trouble ("Having to rebuild everything") nor with a subject judged ("Mock objects make tests
    brittle")."""
    if JUDGED.search(text):
        return False
    return bool(ACTION_LEAD.match(text)) or (opens_with_activity(text) and first_word(text) not in TROUBLE_GERUNDS)


def list_kind(sentence: str, question: str = "") -> str | None:
    """The list a sentence answering `question` (a survey column's; "" for speech) belongs to, or None.

    The sentence's own words decide (sentence_kind), but for an answer that opens with what one does
    under a question that asks for it, a wish with a problem in it under one that asks for
    problems, and an activity no one is said to do under one that asks for wishes or what is missing. A question
    that asks for causes, definitions or praise leaves
    only first-person items; one that asks for a list gives it the bare fragments ("Organizing the
    assignment submissions." under "What are your biggest pain points?"), but one that asks what is in
    the way only the tasks: "Git integration, CSS themes" under "What hinders you ...?" names what is
    missing as often as what is in the way."""
    own = sentence_kind(sentence)
    asked = question_asks(question) if question else None
    if asked == "none":
        return own if own and SPEAKER.search(sentence) else None
    if asked == "behaviours" and (
        (own == "pain_points" and opens_with_action(sentence))
        or (own == "goals" and OPENER.match(sentence) and not ASKS_THE_MAKERS.match(sentence))
    ):
        return asked  # "Rewrite the flaky code", "Warn other teams", asked what one does
    if asked == "pain_points" and own == "goals" and names_a_problem(blank_pseudo_cues(sentence)):
        return asked  # "I want to see inside a build and it makes that hard", asked for pain points
    if asked == "goals" and own == "behaviours" and not SPEAKER.search(sentence):
        return asked  # "Using tidyverse in functions without quo", asked what is missing: what they want to do
    if own or asked is None or not is_bare_fragment(sentence):
        return own
    in_the_way = asked == "pain_points" and IN_THE_WAY.search(question)
    return None if in_the_way and not opens_with_activity(sentence) else asked


def names_a_problem(text: str) -> bool:
    """Whether a sentence (its pseudo-cues blanked) names a problem of the speaker's: not an opinion,
    nor one only imagined ("If I were to ...", "... would be a pain") or told as mended ("... is now stable")."""
    return bool(
        PAIN.search(text)
        and not OPINION.match(text)
        and not HYPOTHETICAL.match(text)
        and not CONDITIONAL_PAIN.search(text)
        and not RESOLVED.search(text)
    )


def sentence_kind(sentence: str) -> str | None:
    """The list a sentence belongs to ("goals", "pain_points", "behaviours") or None, by its own words.

    Questions, declined answers, sentences over MAX_ITEM_WORDS words, definitions and other people's quoted
    words are None. A wish beats a problem (the speaker asks for the fix) and so does a sentence that opens as
    a request ("Better error messages"); a problem beats any other request or a practice (a complaint that
    mentions a feature or a habit is still a complaint)."""
    if is_question(sentence) or len(sentence.split()) > MAX_ITEM_WORDS or DECLINED.match(sentence):
        return None
    if QUOTE.search(sentence) and REPORTED.search(sentence):
        return None
    text = blank_pseudo_cues(sentence)
    if DEFINITION.search(text):
        return None
    if WISH.search(text) or opens_as_request(text):
        return "goals"
    opinion = bool(OPINION.match(text))
    if names_a_problem(text):
        return "pain_points"
    if REQUEST.search(text) or (
        ARTICLE_NP.match(text)
        and len(text.split()) <= ARTICLE_NP_MAX_WORDS
        and not (STATEMENT.search(text) or HIGH_PRAISE.search(text) or SAYS_WHAT_IT_CAN.search(text))
    ):
        return "goals"
    if opinion or NOT_BEHAVIOUR.search(text):
        return None
    if BEHAVIOUR.search(text) or (HABIT_TIME.search(text) and SPEAKER.search(text)):
        return "behaviours"
    if PURPOSE.match(text) and len(text.split()) <= PURPOSE_MAX_WORDS and not STATEMENT.search(text):
        return "behaviours"
    if LEAD_ACTIVITY.match(text) and not (STATEMENT.search(text) or PRAISE.search(text)):
        return "behaviours"
    return None


def is_long(sentence: Sentence) -> bool:
    """A sentence a reader takes in at a glance no longer: an item is one only when no shorter one is left."""
    return len(sentence.text.split()) > PLAIN_ITEM_WORDS


def leans_back(text: str) -> bool:
    """Whether a sentence may lean on what was said before it (`LEANS_BACK`): shown only when no plainer one is."""
    return bool(LEANS_BACK.search(text))


def plainest_first(sentence: Sentence) -> tuple[bool, bool]:
    """An item's place among those of its list: one that may lean on what was said before it comes after every
    one that does not, and a long one after the short ones; otherwise the list's order."""
    return leans_back(sentence.text), is_long(sentence)


def categorise(sentences: list[Sentence], length: int, said: Said | None = None) -> dict[str, list[Sentence]]:
    """Goals, pain points and behaviours by cue phrases; a sentence lands in one list only, and says nothing
    an item of another list says (a wish and the lack it mirrors)."""
    said = said if said is not None else Said()
    buckets: dict[str, list[Sentence]] = {name: [] for name in CUES}
    for sentence in filter(lambda sentence: stands_alone(sentence.text), sentences):
        kind = list_kind(sentence.text, sentence.question)
        if kind:
            buckets[kind].append(sentence)
    return {name: pick_spread(sorted(found, key=plainest_first), length, said) for name, found in buckets.items()}


def tidy_spoken(sentence: str) -> str:
    """A list item in clean words: fillers (um, you know) and stutters (the, the) go; nothing else changes."""
    text = STUTTER.sub(r"\1", FILLER.sub("", sentence))
    text = re.sub(r"(?<!\s)\s+([,.!?;:])", r"\1", re.sub(r"\s{2,}", " ", text)).strip(" ,;")
    return sentence_case(text) if text else sentence


def pick_quotes(
    sentences: list[Sentence], used: set[str], count: int, coded: Collection[str] = (), said: Said | None = None
) -> list[Sentence]:
    """Quotes that speak: first-person sentences of a readable length not used in the lists, then others of
    that length (fewer than `count` rather than a fragment); the passages the researcher coded first (`coded`,
    in `squash` form), each voice once before any twice."""
    speakable = [
        s
        for s in sentences
        if 6 <= len(s.text.split()) <= 45
        and not is_question(s.text)
        and stands_alone(s.text)
        and len(content_words(s.text)) >= 3
        and not DEFINITION.search(blank_pseudo_cues(s.text))  # what a word means says nothing of the speaker
        and not DECLINED.match(s.text)  # "No - it has worked out well": a reply to a question not shown
    ]

    def rank(s: Sentence) -> tuple[bool, bool, bool]:
        """Coded passages first, then those that lean on nothing said before them, then the first person;
        otherwise the sentences' own order (a stable sort)."""
        in_code = any(squash(s.text) in passage for passage in coded)
        return not in_code, leans_back(s.text), not re.search(r"\b(i|i'm|i've|my|me|we|our)\b", s.text, re.IGNORECASE)

    return pick_spread(sorted((s for s in speakable if s.text not in used), key=rank), count, said)


@dataclass
class SegmentTerms:
    """What a segment says, counted once for its title and themes: per word or pair, the
    share of its participants who use it (`inside`) and of everyone else (`outside`)."""

    size: int
    inside: dict[str, float]
    outside: dict[str, float]


def term_shares(corpus: Corpus, members: list[int]) -> SegmentTerms:
    used: Counter[int] = Counter(t for i in members for t in corpus.users[i])
    terms = {index: term for term, index in corpus.vocabulary.items()}
    rest = max(1, len(corpus.people) - len(members))
    return SegmentTerms(
        len(members),
        {terms[t]: times / len(members) for t, times in used.items()},
        {terms[t]: (corpus.speakers[t] - times) / rest for t, times in used.items()},
    )


VAGUE_WORDS = frozenset(
    "able unable trying tried going getting doing saying seeing looking wanting important huge amount lot alright "
    "guys folks".split()
)
"""Words that name no theme, alone or in a pair ("people trying", "able to maintain", "important parts"), and a
conversation's fillers ("alright", "guys")."""


def names_a_theme(corpus: Corpus, term: str) -> bool:
    """Whether a word or pair can be a persona's theme or title: it holds no vague word, and a pair is no
    piece of a commoner one in the other order ("source to open", from "closed source to open source")."""
    words = term.split()
    if VAGUE_WORDS.intersection(words):
        return False
    if len(words) == 2:
        reverse = corpus.vocabulary.get(f"{words[1]} {words[0]}")
        if reverse is not None and corpus.speakers[reverse] > corpus.speakers[corpus.vocabulary[term]]:
            return False
    return True


def distinctive_terms(corpus: Corpus, shares: SegmentTerms, count: int, pairs_only: bool = False) -> list[str]:
    """Words and pairs this segment says more than the others, said by a good share of it, that name a theme.

    A pair counts only where it reads as a phrase (it has a surface form to show).
    """
    inside, outside = shares.inside, shares.outside
    floor = min(0.25, 2 / shares.size) if shares.size > 1 else 1.0
    scored = sorted(
        (
            ((inside[t] ** 2) / (inside[t] + outside[t]) + (0.05 if " " in t else 0.0), t)
            for t in inside
            if inside[t] >= floor
            and (" " not in t or t in corpus.display)
            and (" " in t or not pairs_only)
            and names_a_theme(corpus, t)
        ),
        key=lambda pair: (-pair[0], pair[1]),
    )
    chosen: list[str] = []
    for _, term in scored:
        if any(set(term.split()) & set(other.split()) for other in chosen):
            continue
        chosen.append(term)
        if len(chosen) == count:
            break
    return chosen


def frequent_words(people: list[Participant], count: int) -> list[str]:
    """Themes for a segment too small to stand out in the shared vocabulary."""
    words: Counter[str] = Counter()
    for person in people:
        words.update(surface for text in person.texts for _, surface in content_words(text))
    return [word for word, _ in words.most_common(count)]


ABSENT_ANSWERS = frozenset(["never", "no", "none", "not at all", "not important", "not at all important"])
ANSWER_LEAD = re.compile(r"[a-z]+(?: [a-z]+)*")


def says_absence(answer: str) -> bool:
    """An answer that something does not happen: `Never`, `No`, `Never -- I don't use Shiny.`

    It is a finding, but no title: a kind of person is named by what they do."""
    lead = ANSWER_LEAD.match(answer.strip().lower())
    return lead is not None and lead.group() in ABSENT_ANSWERS


def distinguishing_attribute(people: list[Participant], everyone: list[Participant]) -> tuple[str, str] | None:
    """The attribute value most of the segment shares and few others have: (key, value); never an absence."""
    best, best_lift = None, 0.3
    rest = len(everyone) - len(people)
    for key in dict.fromkeys(k for person in people for k in person.attributes):
        values = Counter(person.attributes[key] for person in people if key in person.attributes)
        value, times = min(values.items(), key=lambda item: (-item[1], item[0]))
        if is_number(value) or len(value.split()) > 5 or squash(value) in PLACEHOLDER_VALUES or says_absence(value):
            continue
        share = times / len(people)
        elsewhere = sum(person.attributes.get(key) == value for person in everyone) - times
        lift = share - (elsewhere / rest if rest else 0.0)
        if share >= 0.6 and lift > best_lift:
            best, best_lift = (key, value), lift
    return best


def pair_with(corpus: Corpus, shares: SegmentTerms, word: str) -> str | None:
    """The phrase around a distinctive word that most of the segment says: `swap` -> `swap shifts`."""
    pairs = [
        (share, term)
        for term, share in shares.inside.items()
        if " " in term and word in term.split() and term in corpus.display and names_a_theme(corpus, term)
    ]
    return min(pairs, key=lambda pair: (-pair[0], pair[1]))[1] if pairs else None


def sentence_case(text: str) -> str:
    return text[:1].upper() + text[1:]


def sentence_lower(text: str) -> str:
    return text[:1].lower() + text[1:]


MAX_ANSWERS = 8  # closed answers a persona carries as evidence
ANSWER_MIN_SHARE = 0.3  # of the segment's members who answered the question
ANSWER_MIN_LIFT = 0.15  # above the share of everyone else


def comma_pieces(text: str) -> list[str]:
    """A text's `, `-separated pieces, never cut inside brackets ("R Command Line (i.e., the R console)")."""
    pieces, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += (char in "([") - (char in ")]")
        if depth <= 0 and text.startswith(", ", index):
            pieces.append(text[start:index].strip())
            start = index + 2
    return [*pieces, text[start:].strip()]


def semicolon_parts(value: str) -> list[str]:
    """An answer's `;`-joined choices (the separator no option holds)."""
    return [part.strip() for part in value.split(";") if part.strip()] or [value]


def column_options(values: Iterable[str]) -> set[str]:
    """A question's options, from all its answers: what someone chose alone, and each `, `-separated piece
    found in two different answers (`JavaScript` in "JavaScript, Python" and "JavaScript, R"). A write-in
    after a choice ("No, only on Slack") or a place ("London, Ontario") is found in one answer only."""
    parts = [part for value in set(values) for part in semicolon_parts(value)]
    pieces = Counter(piece for part in set(parts) for piece in set(comma_pieces(part)))
    return set(parts) | {piece for piece, answers in pieces.items() if answers >= 2}


def options_in(value: str, options: Collection[str]) -> list[str]:
    """The options one answer holds: `;`-joined choices split, and `, `-joined ones too where every piece is
    one of the question's `options` (`JavaScript, Python`; never `Bristol, UK` nor `Yes, but only at work`)."""
    found = []
    for part in semicolon_parts(value):
        pieces = comma_pieces(part)
        found += pieces if len(pieces) > 1 and all(piece in options for piece in pieces) else [part]
    return found


def question_options(key: str, everyone: list[Participant]) -> set[str]:
    """`column_options` of one closed question, from everyone's answers to it."""
    return column_options(person.attributes[key] for person in everyone if key in person.attributes)


def chosen_options(values: list[str], options: Collection[str]) -> Counter[str]:
    """How often each option was chosen, options ticked together counted one by one."""
    return Counter(option for value in values for option in options_in(value, options))


def closed_answers(
    members: list[Participant], everyone: list[Participant], labels: Mapping[str, str], grouped_by: str | None = None
) -> list[JSON]:
    """The closed answers that set a segment apart most, one per question: each with its count among
    the members who answered the question, and its share among everyone else who did.

    The question the researcher grouped by is left out: it sets each group apart by definition."""
    return [answer for _, answer in keyed_answers(members, everyone, labels, grouped_by)]


def keyed_answers(
    members: list[Participant], everyone: list[Participant], labels: Mapping[str, str], grouped_by: str | None = None
) -> list[tuple[str, JSON]]:
    """`closed_answers`, each with the attribute it answers (two questions may read alike)."""
    member_ids = {person.id for person in members}
    others = [person for person in everyone if person.id not in member_ids]
    left_out = normalise_key(grouped_by) if grouped_by else None
    found = []
    for key in dict.fromkeys(key for person in members for key in person.attributes if key != left_out):
        options = question_options(key, everyone)
        answered = [set(options_in(person.attributes[key], options)) for person in members if key in person.attributes]
        elsewhere = [set(options_in(person.attributes[key], options)) for person in others if key in person.attributes]
        chosen_elsewhere = Counter(option for chosen in elsewhere for option in chosen)
        for value, count in Counter(option for chosen in answered for option in chosen).items():
            if count < 2 or is_number(value) or len(value.split()) > 8 or squash(value) in PLACEHOLDER_VALUES:
                continue
            share = count / len(answered)
            outside = chosen_elsewhere[value] / len(elsewhere) if elsewhere else 0.0
            if share >= ANSWER_MIN_SHARE and share - outside >= ANSWER_MIN_LIFT:
                found.append((share - outside, count, key, value, len(answered), outside))
    found.sort(key=lambda item: (-item[0], -item[1], item[2], item[3]))
    best: dict[str, tuple[float, int, str, str, int, float]] = {}
    for item in found:
        best.setdefault(item[2], item)  # a question's answer that sets the segment apart most
    found = list(best.values())
    return [
        (
            key,
            {
                "question": question_text(key, labels),
                "answer": value,
                "count": count,
                "of": of,
                "share_elsewhere": round(outside, 4),
            },
        )
        for _, count, key, value, of, outside in found[:MAX_ANSWERS]
    ]


ANSWER_WORDS = frozenset(
    {level.split()[0] for level in SCALE_LEVELS}
    | {"yes", "no", "maybe", "other", "none", "a", "an", "the", "once", "twice", "more", "less", "about", "between"}
    | {"every", "several", "some", "up", "over", "under"}
)  # words an answer opens with that name nothing: "Often", "A few times a year", "Strongly agree"


def as_read_on(answer: str, common: Collection[str] = ANSWER_WORDS) -> str:
    """An answer as it reads after a colon: "Often" becomes "often" and "Not Important" "not important" (its
    first word one of the `common`, the rest lowered too where every word is capitalised and common or a scale's:
    not "A Python Developer"); "Python", "System Administrator", "US" and "I ..." stay as written."""
    first = answer.split(" ", 1)[0]
    if first.lower() not in common or (len(first) > 1 and first.isupper()):
        return answer
    plain = answer.istitle() and all(word.lower() in common or word.lower() in SCALE_WORDS for word in answer.split())
    return answer.lower() if plain else sentence_lower(answer)


def counted_share(finding: JSON) -> float:
    """A finding's `count` of its `of` as a share (0 where it counts of no one)."""
    return finding["count"] / finding["of"] if finding.get("of") else 0.0


def answer_finding(answer: JSON) -> str:
    """A closed answer stated as a finding: `Re-run the build: often, 20 of 23 (87%), against 41% of everyone else.`"""
    share = counted_share(answer)
    return (
        f"{answer['question'].rstrip(' ?:.…')}: {as_read_on(answer['answer'])}, {answer['count']} of {answer['of']} "
        f"({share:.0%}), against {answer['share_elsewhere']:.0%} of everyone else."
    )


def theme_finding(theme: JSON) -> str:
    """A codebook theme stated as a finding: `Time: said by 7 of 12 (58%), against 20% of everyone else.`"""
    share = counted_share(theme)
    return (
        f"{theme['theme']}: said by {theme['count']} of {theme['of']} ({share:.0%}), "
        f"against {theme['share_elsewhere']:.0%} of everyone else."
    )


def code_finding(code: JSON) -> str:
    """One of her QDA codes as the persona's participants carry it: `Time: 2 of 2 participants (100%).`"""
    share = counted_share(code)
    return f"{code['code']}: {code['count']} of {code['of']} participants ({share:.0%})."


TITLE_MIN_SHARE = 0.25  # a title phrase is said by at least this share of the segment's members
TITLE_MIN_LIFT = 2.0  # and by at least twice the share of everyone else: the data set's own topic sets no one apart
BARE_ANSWERS = frozenset(["yes", "no", "maybe", "other", *SCALE_LEVELS])
AMOUNT_WORDS = frozenset(
    "less more than between and or once twice a an the per every few several couple of about around over under up to "
    "hour hours day days week weeks month months year years time times minute minutes never rarely sometimes often "
    "always daily weekly monthly yearly annually hourly one two three four five six seven eight nine ten dozen dozens "
    "tens hundreds thousands".split()
)
"""Words of an answer that is only an amount or a frequency ("Months", "Between once a day and once a week",
"10 - 25"): it says nothing without its question."""
QUESTION_LEAD = re.compile(
    r"^(?:(?:roughly|approximately|about|overall|generally|typically|usually),? )?"
    r"(?:how (?:would|do) you (?:rate|describe|assess) (?:your )?|"
    r"(?:how(?: often| many| much| long| well)?|what|which|when|where|why|who|whom|to what (?:extent|degree)|"
    r"in what way)\b[^,?]*?"
    r"\b(?:do|does|did|are|is|was|were|have|has|would|will|can|could)\b\s*(?:you|your|they)?\b\s*|"
    r"(?:do|does|did|are|is|have|has|would|will|can|could) (?:you|your)\b\s*)",
    re.IGNORECASE,
)


HOW_MANY = re.compile(
    r"^(?:(?:roughly|approximately|about),? )?how (?:many|much) ((?:\w+ ){0,2}?\w+) "
    r"(?:are|is|were|was|do|does|did|have|has)\b\s*",
    re.IGNORECASE,
)
HOW_MANY_DO = re.compile(
    r"^(?:(?:roughly|approximately|about),? )?how (?:many|much) "
    r"(?!(?:of|do|does|did|is|are|was|were|have|has|would|will|can|could)\b)(\w+) ",
    re.IGNORECASE,
)
"""How many of something do a thing ("How many people typically see your work?"): those who do it."""
LEADING_CLAUSE = re.compile(
    r"^[^,?]*, (?=(?:roughly |approximately |about )?(?:how|what|which|do|does|did|are|is)\b)",
    re.IGNORECASE,
)
"""A clause before a question's question ("If you grade notebooks, how ...", "Other than yourself, how many ..."); not
one that a "where" or "when" clause follows ("on a scale of 1 to 5, where 1 is you don't enjoy it")."""


def says_nothing_alone(value: str) -> bool:
    """An answer that needs its question to mean anything: yes, never, agree, or an amount alone (also two of
    them: "agree or strongly agree")."""
    answer = value.strip().lower()
    words = re.findall(r"[a-z]+|\d+", answer)
    return all(part in BARE_ANSWERS for part in answer.split(" or ")) or (
        bool(words) and all(word.isdigit() or word in AMOUNT_WORDS for word in words)
    )


TOPIC_ENDS = frozenset("in on at for during when while since that which who whom whose why if".split())
"""Words where a question's topic ends and its circumstances or a clause about it begin."""
POSSESSIVES = frozenset("your their our".split())
PREPOSITIONS = GLUE_WORDS | frozenset("about over through across within without like than".split())
WHOSE = re.compile(
    r"^(.+?) (?:that|which) (?:your|their|our) (\w+) (?:are|is|were|was|have|has|do|does|will|would|should|must|can)\b",
    re.IGNORECASE,
)
"""A topic that a clause gives to others ("experience that your students are expected to have"): theirs."""
TOPIC_WORDS = 10  # a question's topic in a title, at most


def names_the_person(header: str) -> bool:
    """Whether an answer to `header` names a kind of person: a column labelled, not asked (`role`), or a
    question that asks who they are."""
    return ("?" not in header and len(header.split()) <= 3) or bool(WHO_THEY_ARE.search(header))


COMMON_WORDS = (STOPWORDS | AMOUNT_WORDS | BARE_ANSWERS | SCALE_WORDS) - {"i"}
"""Words an answer in a title opens with that name nothing ("by hand", "every year"); "I" is the speaker."""


ANCHORED_RATING = re.compile(r"\d{1,2}\s*:\s*([^\W\d_].*)")
"""A point on a rating scale with the label the scale gives it (`5: everyday`, `1: strongly disagree`)."""


def as_answered(value: str) -> str:
    """An answer inside a phrase: in lower case where it opens with a common word (`every year`, `by hand`,
    `often`, `once a week` for "Once A Week"), as written where it may open with a name (`JupyterHub`, `Python
    3`, `Complete novice`) or is in capitals (`US`, `DAILY`). A rating with its anchor reads as the anchor:
    `everyday` for "5: everyday", as a title would say it."""
    anchored = ANCHORED_RATING.fullmatch(value.strip())
    return as_read_on(anchored.group(1) if anchored else value.strip(), COMMON_WORDS)


WHAT_THING = re.compile(
    r"^(?:in )?(?:what|which)(?: of (?:the following|these|those))? "
    r"(?!(?:is|are|was|were|do|does|did|have|has|would|will|can|could|of)\b)"
    r"((?:[\w/-]+ ){0,3}?[\w/-]+) (?:is|are|was|were|do|does|did|have|has|would|will|can|could)\b",
    re.IGNORECASE,
)
"""A question that names the kind of thing it asks for ("What industry do you work in?"): that thing is its
topic, unless it is a measure (`GENERIC_THINGS`: "What year did you first start learning R?" asks about learning)."""
GENERIC_THINGS = frozenset("year years age time month day date kind type sort number percentage size amount".split())
WHICH_STATEMENT = re.compile(
    r"^(?:which|what) (?:statement|option|answer|choice)s? (?:best |most closely |most )?"
    r"(?:describes?|reflects?|matches?) (?:the |your )?",
    re.IGNORECASE,
)
"""A question that offers statements to choose from: what they are about is its topic ("... the primary reason")."""


def ends_the_topic(words: list[str], position: int) -> bool:
    """Whether a question's topic ends before `words[position]`: a preposition or clause word, or the
    possessive of a clause with a verb of its own ("tools your class is utilizing"; not "students in your
    class", nor "meet your needs")."""
    word = words[position].lower()
    if word in TOPIC_ENDS:
        return True
    rest = [later.lower() for later in words[position + 1 :]]
    verb = any(later in ("is", "are", "was", "were", "uses", "use") or later.endswith("ing") for later in rest)
    return word in POSSESSIVES and words[position - 1].lower() not in PREPOSITIONS and verb


def asked_about(question: str) -> str:
    """A question without its asking words: what it counts ("students in your class"), the kind of thing it
    names ("industry"), what its statements are about ("primary reason"), or what is left after "how often do
    you" ("observe flaky tests in ...")."""
    counted = HOW_MANY.match(question)  # "how many students are in your class" counts students in your class
    counted_doing = HOW_MANY_DO.match(question)
    thing = WHAT_THING.match(question)
    if counted:
        return f"{counted.group(1)} {question[counted.end() :]}"
    if counted_doing:
        rest = question[counted_doing.end() :]
        return f"{counted_doing.group(1)} {rest if re.match(r'(?:that|who|which) ', rest) else 'who ' + rest}"
    if thing and thing.group(1).lower() not in GENERIC_THINGS:
        named = thing.group(1).split()  # "Jupyter/IPython tools your class (is utilizing)": the tools
        return " ".join(next((named[:i] for i, word in enumerate(named) if i and word.lower() in POSSESSIVES), named))
    return QUESTION_LEAD.sub("", WHICH_STATEMENT.sub("", question))


def question_topic(header: str) -> str:
    """What a question asks about, in a few words: `Achieve proficiency`, `Industry`, `Doing the grading`."""
    grid = grid_parts(header)
    topic = " ".join(re.sub(r"\([^)]*\)", " ", grid[1] if grid else header).split("?", 1)[0].split())
    preamble, colon, asked = topic.rpartition(":")
    if colon and preamble and QUESTION_LEAD.match(asked.strip()):  # "Think about the past month: how often ..."
        topic = asked.strip()
    topic = LEADING_CLAUSE.sub("", topic)  # "If you grade notebooks, how do you ...?", "Other than yourself, how ..."
    topic = re.sub(r"^(?:please )?(?:indicate|select|choose|specify|name|list) ", "", topic, flags=re.IGNORECASE)
    topic = asked_about(topic).strip(" ?:.…")
    topic = re.sub(r"^(?:it )?(?:takes?|took) (?:you|them) (?:to )?", "", topic, flags=re.IGNORECASE)
    topic = re.sub(r"^(?:the|this|that|these|those|your) ", "", topic, flags=re.IGNORECASE)  # "this course taught"
    concerns = WHOSE.match(topic)  # "level of experience that your students are expected to have" is theirs
    if concerns:
        owner = concerns.group(2)
        mark = "'" if owner.endswith("s") else "'s"
        topic = f"{owner}{mark} {sentence_lower(concerns.group(1))}"
    words = topic.split()
    for position, word in enumerate(words[1:], 1):  # the topic ends where its circumstances begin
        if word.endswith(","):
            words = words[: position + 1]
            break
        if position >= 2 and ends_the_topic(words, position):
            words = words[:position]
            break
    words = words[:TOPIC_WORDS]
    while len(words) > 1 and words[-1].lower() in GLUE_WORDS:  # "... interact with the"
        words.pop()
    return " ".join(words).rstrip(",") or header[:60].rstrip(" ?:.")


def answer_phrase(key: str, value: str, labels: Mapping[str, str]) -> str:
    """An answer with its question's meaning: `Re-run the build: often`, `Observe flaky tests: weekly`,
    `Doing the grading: by hand`.

    Only an answer that names a kind of person (`Nurse`, `Data scientist`) needs no question: `By hand`
    or `Ungraded coding exercises` alone says nothing of whom it describes.
    """
    header = header_of(key, labels)
    if not says_nothing_alone(value) and names_the_person(header):
        return value
    return f"{sentence_case(question_topic(header))}: {as_answered(value)}"


TITLE_ANSWER_SHARE = 0.5  # an answer names a persona only when most of its members who answered gave it
TITLE_ANSWER_LIFT = 0.25  # and a quarter of them more than of everyone else: what sets them apart, not the data set


def scale_of(values: Iterable[str]) -> tuple[str, ...] | None:
    """The ordered scale a question's answers come from (placeholders such as "None" aside), or None for
    answers in no order."""
    given = {value.strip().lower() for value in values if squash(value) not in PLACEHOLDER_VALUES}
    return next((scale for scale in ORDINAL_SCALES if given <= set(scale)), None)


def share_giving(answers: list[str], levels: Collection[str]) -> float:
    """The share of `answers` that are one of `levels` (compared in lower case)."""
    return sum(answer.strip().lower() in levels for answer in answers) / len(answers) if answers else 0.0


def held_by_most(key: str, value: str, members: list[Participant], others: list[Participant]) -> str | None:
    """An answer as a title may state it: itself when most of the members who answered gave it, or with the
    level beside it on its scale that more of them gave ("daily or weekly"), given by a quarter of them more
    than of everyone else; None when neither holds. A title says what the persona is: "Observe flaky tests:
    daily" does not stand for a segment of whom 39% see them daily and 45% weekly."""
    answered = [person.attributes[key] for person in members if key in person.attributes]
    elsewhere = [person.attributes[key] for person in others if key in person.attributes]
    levels = [value.strip().lower()]
    scale = scale_of(answered + elsewhere)
    if scale and levels[0] in scale and share_giving(answered, levels) < TITLE_ANSWER_SHARE:
        at = scale.index(levels[0])
        beside = [scale[i] for i in (at - 1, at + 1) if 0 <= i < len(scale) and not says_absence(scale[i])]
        if beside:
            levels.append(max(beside, key=lambda level: (share_giving(answered, [level]), -scale.index(level))))
    inside, outside = share_giving(answered, levels), share_giving(elsewhere, levels)
    if inside < TITLE_ANSWER_SHARE or inside - outside < TITLE_ANSWER_LIFT:
        return None
    return " or ".join(levels) if len(levels) > 1 else value


def titled_answers(
    answers: list[tuple[str, JSON]], members: list[Participant], everyone: list[Participant], labels: Mapping[str, str]
) -> list[str]:
    """The segment's distinctive answers (`keyed_answers`) that may name it, best first, each with its
    question's meaning (`Observe flaky tests: daily or weekly`); never an absence."""
    member_ids = {person.id for person in members}
    others = [person for person in everyone if person.id not in member_ids]
    phrases = []
    for key, answer in answers:
        held = None if says_absence(answer["answer"]) else held_by_most(key, answer["answer"], members, others)
        if held:
            phrases.append(answer_phrase(key, held, labels))
    return phrases


def title_phrases(corpus: Corpus, shares: SegmentTerms, keep: Callable[[str], bool], lead: bool) -> list[str]:
    """Phrases for a title, best first: the segment's distinctive pairs, then words (two at once when no lead)."""
    singles = [term for term in distinctive_terms(corpus, shares, 4) if " " not in term and keep(term)]
    pairs = [
        p
        for p in distinctive_terms(corpus, shares, 4, pairs_only=True)
        + [p for p in map(functools.partial(pair_with, corpus, shares), singles) if p]
        if keep(p)
    ]
    words = [corpus.display.get(t, t) for t in singles]
    phrases = [corpus.display[t] for t in dict.fromkeys(pairs)]
    if not lead:  # without a shared attribute to lead, two words say more than one
        phrases += [f"{a} and {b}" for a, b in zip(words, words[1:])]
    return phrases + (words if lead else [])


def persona_title(
    corpus: Corpus,
    shares: SegmentTerms,
    attribute: tuple[str, str] | None,
    taken: set[str],
    answers: list[str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> str:
    """What sets the segment apart: a phrase a quarter of its members say and others say far less,
    led by a shared attribute value; or an answer with its question's meaning.

    `Nurse: swap shifts`, `Locked out of the account`, `Re-run the build: often`; never a
    bare answer (`Never:`), an absence (`Floating point: never`), the data set's own topic (`Flaky tests`),
    or an id. Only when nothing sets the segment apart is a phrase they share the title.
    """
    labels = labels or {}

    def apart(term: str) -> bool:
        inside = shares.inside.get(term, 0.0)
        return inside >= TITLE_MIN_SHARE and inside >= TITLE_MIN_LIFT * shares.outside.get(term, 0.0)

    lead = answer_phrase(*attribute, labels) if attribute else ""
    lead_words = word_set(lead)
    titles = []
    if ":" not in lead:  # a plain value leads a phrase; an answer with its question is a title of its own
        titles += [
            f"{sentence_case(lead)}: {phrase}" if lead else sentence_case(phrase)
            for phrase in title_phrases(corpus, shares, apart, bool(lead))
            if not (lead_words & word_set(phrase) or NUMBER_WORDS & set(phrase.split()))
        ]
    titles += [lead] if lead else []
    titles += answers or []
    topic = topic_pairs(corpus)
    topic_words = {word for pair in topic for word in pair.split()}

    def beside_topic(term: str) -> bool:
        return term not in topic and term not in topic_words

    shared = title_phrases(corpus, shares, beside_topic, False)
    singles = [t for t in distinctive_terms(corpus, shares, 4) if " " not in t and beside_topic(t)]
    titles += [
        sentence_case(phrase)
        for phrase in shared + [corpus.display.get(t, t) for t in singles]
        if not NUMBER_WORDS & set(phrase.split())
    ]
    titles = [title for title in titles if title and not title.rstrip(" \"'’”)]").endswith("?")]  # asks nothing
    for title in titles:
        if sentence_case(title) not in taken:
            return sentence_case(title)
    return f"{sentence_case(titles[0]) if titles else 'No shared answer sets them apart'} ({len(taken) + 1})"


NEAR_CONSTANT_SHARE = 0.9  # an attribute one answer holds for this share of everyone tells no one apart


def summarise_attributes(people: list[Participant], everyone: list[Participant], labels: Mapping[str, str]) -> JSON:
    """The most informative attributes: each value's most common choice with its share, numbers as median and range.

    Attributes that read as sentences, or that only some have, come last or not at all; so
    does one nearly everyone answers alike (a consent, "Yes, I agree"), whatever the segment,
    and a grid's item (`Agree with ... [statement]`): that is a finding, shown as one.
    """
    keys = list(dict.fromkeys(key for person in people for key in person.attributes))
    ranked = []
    for key in keys:
        if is_near_constant(key, everyone) or grid_parts(labels.get(key, "")):
            continue
        values = [person.attributes[key] for person in people if key in person.attributes]
        if max(len(value.split()) for value in values) > 8:
            continue
        ranked.append((-len(values), keys.index(key), key, values))
    demographics: JSON = {}
    for _, _, key, values in sorted(ranked):
        summary = summarise_values(values, len(people), question_options(key, everyone))
        if summary is not None and len(demographics) < MAX_DEMOGRAPHICS:
            demographics[shown_label(key, labels)] = summary
    demographics["participants"] = len(people)
    demographics["share"] = round(len(people) / len(everyone), 4)
    return demographics


def is_near_constant(key: str, everyone: list[Participant]) -> bool:
    values = Counter(person.attributes[key] for person in everyone if key in person.attributes)
    answered = sum(values.values())
    return answered >= 10 and values.most_common(1)[0][1] >= NEAR_CONSTANT_SHARE * answered


def shown_label(key: str, labels: Mapping[str, str]) -> str:
    """An attribute's name for a reader: the question's words where the column was a code (Q12)."""
    label = labels.get(key)
    if not label:
        return key
    grid = grid_parts(label)
    if grid and len(label) > 80:  # a grid's item is what tells its rows apart: it stays whole
        stem = grid[0]
        return f"{shortened(stem, 41)} [{grid[1]}]"
    return shortened(label, 78)


MIN_DEMOGRAPHIC_SHARE = 0.2  # a choice fewer of a segment give says nothing about it: left out


def summarise_values(values: list[str], people: int, options: Collection[str]) -> str | None:
    """Numbers as median and range; else the most common choice with its share, or None when fewer
    than MIN_DEMOGRAPHIC_SHARE of the segment give it."""
    if all(is_number(value) for value in values):
        numbers = sorted(float(value) for value in values)
        median = (
            numbers[len(numbers) // 2]
            if len(numbers) % 2
            else (numbers[len(numbers) // 2 - 1] + numbers[len(numbers) // 2]) / 2
        )
        low, high = numbers[0], numbers[-1]
        return f"{low:g}" if low == high else f"median {median:g}, range {low:g}–{high:g}"
    value, times = min(chosen_options(values, options).items(), key=lambda item: (-item[1], item[0]))
    return f"{value} ({times / people:.0%})" if times / people >= MIN_DEMOGRAPHIC_SHARE else None


def persona_name(ids: list[str], taken: set[str]) -> str:
    start = int(hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest(), 16) % len(PERSONA_NAMES)
    for step in range(len(PERSONA_NAMES)):
        name = PERSONA_NAMES[(start + step) % len(PERSONA_NAMES)]
        if name not in taken:
            return name
    return f"{PERSONA_NAMES[start]} {len(taken) + 1}"


SUMMARY_GOAL_WORDS = 25  # a longer sentence with a wish in it is mostly a story: the summary quotes none


def persona_summary(count: int, total: int, themes: list[str], goals: list[str]) -> str:
    """Who the persona stands for, what they talk about, and their first goal short enough to state one and
    plain: a goal that may lean on what was said before it says nothing on its own here."""
    text = f"Stands for {count} of {total} participants ({count / total:.0%})."
    if themes:
        text += (
            " They talk most about " + (", ".join(themes[:-1]) + " and " if len(themes) > 1 else "") + themes[-1] + "."
        )
    goal = next((goal for goal in goals if len(goal.split()) <= SUMMARY_GOAL_WORDS and not leans_back(goal)), None)
    if goal:
        text += f' A goal in their words: "{goal}"'
    return text


def build_persona(
    corpus: Corpus, segment: Segment, config: JSON, number: int, taken: dict[str, set[str]], labels: Mapping[str, str]
) -> tuple[JSON, list[str]]:
    detail = config_value(config, "detail_level")
    members = segment.members
    people = [corpus.people[i] for i in members]
    ids = [person.id for person in people]
    centre = centroid_of(corpus.vectors[i] for i in members)
    sentences = segment_sentences(corpus, members, centre)
    said = Said(topic_pairs(corpus))
    lists = categorise(sentences, LIST_LENGTHS[detail], said)
    used = {s.text for found in lists.values() for s in found}
    coded = {squash(passage) for person in people for passage in person.coded}
    quotes = pick_quotes(sentences, used, QUOTE_COUNTS[detail], coded, said)
    theme_count = THEME_COUNTS[config_value(config, "complexity")]
    shares = term_shares(corpus, members)
    themes = [corpus.display.get(t, t) for t in distinctive_terms(corpus, shares, theme_count)] or frequent_words(
        people, theme_count
    )
    demographics = summarise_attributes(people, corpus.people, labels)
    name = persona_name(ids, taken["names"])
    attribute = distinguishing_attribute(people, corpus.people)
    keyed = keyed_answers(people, corpus.people, labels, config.get("group_by"))
    answers = [answer for _, answer in keyed]
    grouped = answer_phrase(config["group_by"], segment.answer, labels) if segment.answer is not None else None
    titles = titled_answers(keyed, people, corpus.people, labels)
    title = segment.name or grouped or persona_title(corpus, shares, attribute, taken["titles"], titles, labels)
    taken["names"].add(name)
    taken["titles"].add(title)
    persona_id = f"persona-{number:03d}"
    warnings = [
        f"{persona_id}: no sentence in its segment reads as {label.replace('_', ' ')}"
        for label, found in lists.items()
        if not found
    ]
    goals = [tidy_spoken(s.text) for s in lists["goals"]]
    persona = {
        "id": persona_id,
        "name": name,
        "title": title,
        "summary": persona_summary(len(people), len(corpus.people), themes, goals),
        "demographics": demographics,
        "goals": goals,
        "pain_points": [tidy_spoken(s.text) for s in lists["pain_points"]],
        "behaviours": [tidy_spoken(s.text) for s in lists["behaviours"]],
        "quotes": [s.text for s in quotes],
        "themes": themes,
        "evidence": {"participants": ids, "share": demographics["share"], "answers": answers},
    }
    return persona, warnings


def offline_personas(
    dataset: Dataset, count: int, config: JSON, tell: Callable[[tuple[int, int]], None] | None = None
) -> tuple[list[JSON], list[str]]:
    """The offline engine from participants to personas (blocking: run it in a thread or a child).

    `tell` hears (personas written, segments) once the participants are grouped and after each persona
    but the last: the stage after the last is the quality report's."""
    corpus = build_corpus(dataset.participants, dataset.labels)
    segments = segments_for(corpus, count, config)
    taken: dict[str, set[str]] = {"names": set(), "titles": set()}
    personas, warnings = [], []
    for number, segment in enumerate(segments, 1):
        if tell is not None:
            tell((number - 1, len(segments)))
        persona, notes = build_persona(corpus, segment, config, number, taken, dataset.labels)
        personas.append(persona)
        warnings.extend(notes)
    if len(segments) < count and config.get("groups") is None:
        warnings.append(f"the grouping gives {len(segments)} group(s), fewer than the {count} personas asked for")
    return personas, warnings


# ---------------------------------------------------------------------------
# LLM providers: official SDKs, structured output, validation and repair
# ---------------------------------------------------------------------------

PROVIDER_CALL_TIMEOUT_S = 120.0  # one request to a provider
PROVIDER_RETRIES = 2  # the SDKs' own retries on 429, 5xx and timeouts (3 attempts in all)
PROVIDER_JOB_TIMEOUT_S = 900.0  # all provider work of one job
SEGMENT_CALLS_AT_ONCE = 4  # concurrent provider calls within one job
DEFAULT_MAX_INPUT_TOKENS = 100_000
PERSONA_FIELDS = ("name", "title", "demographics", "goals", "pain_points", "behaviours", "quotes")


STANDARD_KEYS = frozenset({*PERSONA_FIELDS, "id", "summary", "evidence", "unverified_quotes", "themes"})


RESERVED_FIELD_NAMES = STANDARD_KEYS | {"participants", "share"}  # the model's evidence, and a CSV column


def custom_fields(persona: JSON) -> JSON:
    """The fields a request's config.fields added, in their order; every other key is a standard one."""
    return {key: value for key, value in persona.items() if key not in STANDARD_KEYS}


def field_heading(key: str) -> str:
    return key.replace("_", " ").capitalize()


LLM_PERSONA_SCHEMA: JSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "title": {"type": "string", "description": "'The ...', naming the persona's defining theme"},
        "summary": {"type": "string"},
        "demographics": {
            "type": "object",
            "properties": {"role": {"type": "string"}, "age_range": {"type": "string"}, "context": {"type": "string"}},
        },
        "goals": {"type": "array", "items": {"type": "string"}},
        "pain_points": {"type": "array", "items": {"type": "string"}},
        "behaviours": {"type": "array", "items": {"type": "string"}},
        "quotes": {
            "type": "array",
            "items": {"type": "string"},
            "description": "sentences copied verbatim from the data",
        },
        "participants": {
            "type": "array",
            "items": {"type": "string"},
            "description": "ids of the participants it stands for",
        },
    },
    "required": [
        "name",
        "title",
        "summary",
        "demographics",
        "goals",
        "pain_points",
        "behaviours",
        "quotes",
        "participants",
    ],
}
LLM_RESULT_SCHEMA: JSON = {
    "type": "object",
    "properties": {"personas": {"type": "array", "items": LLM_PERSONA_SCHEMA}},
    "required": ["personas"],
}


def result_schema(config: JSON) -> JSON:
    """The structured output asked for: the standard persona, plus the request's custom fields, all required."""
    fields = config.get("fields")
    if not fields:
        return LLM_RESULT_SCHEMA
    persona = {
        **LLM_PERSONA_SCHEMA,
        "properties": {**LLM_PERSONA_SCHEMA["properties"]},
        "required": [*LLM_PERSONA_SCHEMA["required"], *(item["name"] for item in fields)],
    }
    for item in fields:
        kind = {"type": "array", "items": {"type": "string"}} if item.get("type") == "list" else {"type": "string"}
        persona["properties"][item["name"]] = {**kind, "description": item["description"]}
    return {**LLM_RESULT_SCHEMA, "properties": {"personas": {"type": "array", "items": persona}}}


FINDINGS_SCHEMA: JSON = {
    "type": "object",
    "properties": {
        "findings": {"type": "array", "items": {"type": "string"}},
        "quotes": {
            "type": "array",
            "items": {"type": "string"},
            "description": "sentences copied verbatim from the data",
        },
    },
    "required": ["findings", "quotes"],
}
SYSTEM_PROMPT = (
    "You are an experienced UX researcher. You build user personas strictly from the research data you are "
    "given: every goal, pain point and behaviour must be supported by what participants said, and every quote "
    "must be a sentence copied exactly, word for word, from the data. Answer only through the structured output."
)


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    key_variables: tuple[str, ...]
    model_variable: str
    default_model: str


PROVIDER_SPECS = {
    "anthropic": ProviderSpec("anthropic", ("ANTHROPIC_API_KEY",), "PERSONA_ANTHROPIC_MODEL", "claude-sonnet-4-5"),
    "openai": ProviderSpec("openai", ("OPENAI_API_KEY",), "PERSONA_OPENAI_MODEL", "gpt-4.1"),
    "gemini": ProviderSpec("gemini", ("GEMINI_API_KEY", "GOOGLE_API_KEY"), "PERSONA_GEMINI_MODEL", "gemini-2.5-flash"),
    "ollama": ProviderSpec("ollama", (), "PERSONA_OLLAMA_MODEL", "llama3.1"),
}


# Each provider's SDK. Importing one takes seconds the first time; done on the event loop,
# that stalled every request the server was answering meanwhile.
SDK_MODULES = {"anthropic": "anthropic", "openai": "openai", "ollama": "openai", "gemini": "google.genai"}


def provider_key(spec: ProviderSpec) -> str | None:
    return next((os.environ[name] for name in spec.key_variables if os.environ.get(name)), None)


def default_model(provider: str) -> str:
    if provider == "local":
        return LOCAL_MODEL
    spec = PROVIDER_SPECS[provider]
    return os.environ.get(spec.model_variable) or spec.default_model


def provider_status() -> list[JSON]:
    """What GET /api/v1/providers shows: never a key, only whether one is set."""
    listing = [{"name": "local", "configured": True, "default_model": LOCAL_MODEL, "key_variables": []}]
    for spec in PROVIDER_SPECS.values():
        configured = spec.name == "ollama" or provider_key(spec) is not None
        listing.append(
            {
                "name": spec.name,
                "configured": configured,
                "default_model": default_model(spec.name),
                "key_variables": list(spec.key_variables),
            }
        )
    return listing


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    calls: int = 0

    def add(self, input_tokens: int | None, output_tokens: int | None) -> None:
        self.input_tokens += input_tokens or 0
        self.output_tokens += output_tokens or 0
        self.calls += 1


class ProviderError(GenerationError):
    """A provider that kept failing; the message is safe to show (no key, no body)."""


def describe_provider_failure(provider: str, exc: Exception) -> str:
    """One line for the job's error, from any SDK's exception."""
    attempts = PROVIDER_RETRIES + 1
    status = getattr(exc, "status_code", None) or getattr(exc, "code", None)
    name = type(exc).__name__
    if status == 429:
        return f"{provider}: rate limited (429) after {attempts} attempts"
    if isinstance(status, int) and status >= 500:
        return f"{provider}: server error ({status}) after {attempts} attempts"
    if isinstance(status, int) and status in (401, 403):
        variables = " or ".join(PROVIDER_SPECS[provider].key_variables)
        return f"{provider}: the API key was refused ({status}); check {variables}"
    if isinstance(status, int):
        return f"{provider}: request refused ({status})"
    if "Timeout" in name:
        return f"{provider}: no answer within {PROVIDER_CALL_TIMEOUT_S:g} s after {attempts} attempts"
    if "Connection" in name:
        return f"{provider}: could not connect after {attempts} attempts"
    return f"{provider}: request failed ({name})"


SDK_CLIENTS: dict[tuple[str | None, ...], tuple[asyncio.AbstractEventLoop, Any]] = {}


def shared_client(identity: tuple[str | None, ...], make: Callable[[], Any]) -> Any:
    """One SDK client per provider configuration, shared by every job of this event loop.

    Building a client costs about 20 ms of CPU (it loads the CA bundle), and sharing one
    keeps connections to the provider open from job to job. A client belongs to the loop
    it was made in, so another loop (a CLI run, a test) gets a new one.
    """
    loop = asyncio.get_running_loop()
    held = SDK_CLIENTS.get(identity)
    if held is None or held[0] is not loop:
        held = SDK_CLIENTS[identity] = (loop, make())
    return held[1]


class AnthropicProvider:
    """Messages API; the structured answer comes as a forced tool call."""

    def __init__(self, model: str, config: JSON) -> None:
        import anthropic

        key = provider_key(PROVIDER_SPECS["anthropic"])
        self.client = shared_client(
            ("anthropic", key, os.environ.get("ANTHROPIC_BASE_URL")),
            lambda: anthropic.AsyncAnthropic(
                api_key=key, max_retries=PROVIDER_RETRIES, timeout=PROVIDER_CALL_TIMEOUT_S
            ),
        )
        self.model, self.config = model, config

    async def complete(self, prompt: str, schema: JSON, usage: Usage) -> str:
        extra = {"temperature": self.config["temperature"]} if "temperature" in self.config else None
        message = await self.client.messages.create(
            model=self.model,
            max_tokens=self.config.get("max_tokens", 8192),
            system=SYSTEM_PROMPT,
            messages=[{"role": "user", "content": prompt}],
            tools=[{"name": "submit", "description": "Submit the answer.", "input_schema": schema}],
            tool_choice={"type": "tool", "name": "submit"},
            extra_body=extra,
        )
        usage.add(message.usage.input_tokens, message.usage.output_tokens)
        for block in message.content:
            if block.type == "tool_use":
                return json.dumps(block.input)
        return "".join(getattr(block, "text", "") for block in message.content)


class OpenAIProvider:
    """Chat Completions with a JSON-schema response format; also any OpenAI-compatible server."""

    def __init__(self, model: str, config: JSON, base_url: str | None = None, api_key: str | None = None) -> None:
        import openai

        key = api_key or provider_key(PROVIDER_SPECS["openai"])
        self.client = shared_client(
            ("openai", key, base_url or os.environ.get("OPENAI_BASE_URL")),
            lambda: openai.AsyncOpenAI(
                api_key=key, base_url=base_url, max_retries=PROVIDER_RETRIES, timeout=PROVIDER_CALL_TIMEOUT_S
            ),
        )
        self.model, self.config = model, config

    async def complete(self, prompt: str, schema: JSON, usage: Usage) -> str:
        options: JSON = {}
        if "temperature" in self.config:
            options["temperature"] = self.config["temperature"]
        if "max_tokens" in self.config:
            options["max_completion_tokens"] = self.config["max_tokens"]
        response = await self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
            **options,
        )
        if response.usage is not None:
            usage.add(response.usage.prompt_tokens, response.usage.completion_tokens)
        else:
            usage.add(0, 0)
        return response.choices[0].message.content or ""


def ollama_provider(model: str, config: JSON) -> OpenAIProvider:
    """Ollama, vLLM, llama.cpp or LM Studio: the OpenAI wire format at OLLAMA_HOST."""
    host = os.environ.get("OLLAMA_HOST", "http://localhost:11434")
    if "://" not in host:
        host = f"http://{host}"
    return OpenAIProvider(model, config, base_url=host.rstrip("/") + "/v1", api_key="ollama")


class GeminiProvider:
    """generateContent with a response JSON schema."""

    def __init__(self, model: str, config: JSON) -> None:
        from google import genai
        from google.genai import types

        self.types = types
        key = provider_key(PROVIDER_SPECS["gemini"])
        self.client = shared_client(
            ("gemini", key, os.environ.get("GOOGLE_GEMINI_BASE_URL")),
            lambda: genai.Client(api_key=key, http_options=self._http_options()),
        )
        self.model, self.config = model, config

    def _http_options(self) -> Any:
        retry = self.types.HttpRetryOptions(
            attempts=PROVIDER_RETRIES + 1, initial_delay=0.5, max_delay=8.0, http_status_codes=[429, 500, 502, 503, 504]
        )
        return self.types.HttpOptions(timeout=int(PROVIDER_CALL_TIMEOUT_S * 1000), retry_options=retry)

    async def complete(self, prompt: str, schema: JSON, usage: Usage) -> str:
        config = self.types.GenerateContentConfig(
            system_instruction=SYSTEM_PROMPT,
            response_mime_type="application/json",
            response_json_schema=schema,
            temperature=self.config.get("temperature"),
            max_output_tokens=self.config.get("max_tokens"),
        )
        response = await self.client.aio.models.generate_content(model=self.model, contents=prompt, config=config)
        meta = response.usage_metadata
        usage.add(meta.prompt_token_count if meta else 0, meta.candidates_token_count if meta else 0)
        return response.text or ""


PROVIDERS: dict[str, Callable[[str, JSON], Any]] = {
    "anthropic": AnthropicProvider,
    "openai": OpenAIProvider,
    "gemini": GeminiProvider,
    "ollama": ollama_provider,
}


def normalise_quote(text: str) -> str:
    """Case, spacing, punctuation and curly quotes do not decide whether a quote is real."""
    text = text.lower().replace("’", "'").replace("‘", "'").replace("“", '"').replace("”", '"')
    return re.sub(r"[^\w']+", " ", text).strip()


def estimate_tokens(text: str) -> int:
    return len(text) // 4 + 1


def render_participants(people: list[Participant]) -> str:
    """The data as the model reads it: one block per participant, id and attributes first."""
    blocks = []
    for person in people:
        attributes = "; ".join(f"{key}: {value}" for key, value in person.attributes.items())
        head = f"[{person.id}]" + (f" ({attributes})" if attributes else "")
        blocks.append(head + "\n" + "\n".join(person.texts))
    return "\n\n".join(blocks)


Refining = tuple[list[JSON], str]  # the personas to refine, as the model reads them, and the researcher's instruction


def persona_prompt(
    count: int, data: str, config: JSON, others: list[str] | None = None, refining: Refining | None = None
) -> str:
    detail = LIST_LENGTHS[config_value(config, "detail_level")]
    quotes = QUOTE_COUNTS[config_value(config, "detail_level")]
    lines = [
        f"Create exactly {count} distinct persona{'s' if count != 1 else ''} from the research data below.",
        f"Give each persona about {detail} goals, pain points and behaviours, and {quotes} "
        "quotes. Quotes must be whole sentences copied exactly from the data.",
        "In `participants`, list the ids (shown in brackets) of the participants each persona stands for.",
        f"Complexity: {config_value(config, 'complexity')}.",
    ]
    for item in config.get("fields", []):
        kind = "a list of short items" if item.get("type") == "list" else "a short text"
        lines.append(f"Also fill `{item['name']}` ({kind}): {item['description']}")
    if others:
        lines.append("Other segments already have their own personas; keep this one distinct from them:")
        lines += [f"- {summary}" for summary in others]
    if config.get("instruction"):
        lines.append(f"The researcher's instruction: {config['instruction']}")
    if isinstance(config.get("codebook"), list):
        lines.append("The researcher's codebook names these themes; where they fit, name the personas' themes by them:")
        lines += [
            f"- {theme.name}" + (f": {theme.description}" if theme.description else "")
            for theme in config["codebook"][:PROMPT_CODEBOOK_THEMES]
        ]
    earlier = ""
    if refining is not None:
        lines += [
            "Personas made earlier from this data are in <personas> below. Refine them, rather than starting "
            "afresh, following this instruction of the researcher's: " + refining[1],
            "Keep a persona's name while it stands for the same participants.",
        ]
        earlier = f"\n\n<personas>\n{json.dumps(refining[0], ensure_ascii=False, indent=1)}\n</personas>"
    return "\n".join(lines) + earlier + f"\n\n<data>\n{data}\n</data>"


def persona_problems(answer: Any, count: int, fields: Iterable[JSON] = ()) -> list[str]:
    """What is wrong with a model's answer, against the schema and the request's custom fields."""
    if not isinstance(answer, dict) or not isinstance(answer.get("personas"), list):
        return ["the answer must be an object with a `personas` array"]
    personas = answer["personas"]
    problems = [] if len(personas) == count else [f"expected exactly {count} personas, got {len(personas)}"]
    for number, item in enumerate(personas, 1):
        if not isinstance(item, dict):
            problems.append(f"persona {number} is not an object")
            continue
        for name in PERSONA_FIELDS:
            value = item.get(name)
            if (
                not value
                or (name == "demographics" and not isinstance(value, dict))
                or (
                    name in ("goals", "pain_points", "behaviours", "quotes")
                    and not (isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value))
                )
            ):
                problems.append(f"persona {number}: `{name}` is missing, empty or of the wrong type")
        for field_spec in fields:
            value = item.get(field_spec["name"])
            if not (
                isinstance(value, str) and value.strip()
                if field_spec.get("type") != "list"
                else isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)
            ):
                problems.append(f"persona {number}: `{field_spec['name']}` is missing, empty or of the wrong type")
    return problems


def findings_problems(answer: Any, _: int) -> list[str]:
    if (
        not isinstance(answer, dict)
        or not isinstance(answer.get("findings"), list)
        or not isinstance(answer.get("quotes"), list)
    ):
        return ["the answer must be an object with `findings` and `quotes` arrays"]
    return []


class ModelSession:
    """One job's conversation with a provider: calls, repairs, usage and the audit trail."""

    def __init__(self, provider_name: str, model: str, config: JSON) -> None:
        self.name = provider_name
        self.provider = PROVIDERS[provider_name](model, config)
        self.usage = Usage()
        self.exchanges: list[JSON] = []
        self.calls = asyncio.Semaphore(SEGMENT_CALLS_AT_ONCE)

    async def ask(
        self, purpose: str, prompt: str, schema: JSON, check: Callable[[Any, int], list[str]], count: int
    ) -> Any:
        """Ask once; on an invalid answer, ask once more showing what was wrong."""
        answer_text = await self._call(purpose, prompt, schema)
        answer, problems = parse_answer(answer_text, check, count)
        if not problems:
            return answer
        repair = (
            f"{prompt}\n\nYour previous answer was:\n{answer_text[:20000]}\n\nIt was invalid: "
            + "; ".join(problems)
            + ". Answer again, correcting every problem."
        )
        answer_text = await self._call(f"{purpose} (repair)", repair, schema)
        answer, problems = parse_answer(answer_text, check, count)
        if problems:
            raise GenerationError(
                f"{self.name}: the model's answer was invalid after one repair: " + "; ".join(problems[:5])
            )
        return answer

    async def _call(self, purpose: str, prompt: str, schema: JSON) -> str:
        async with self.calls:
            try:
                text = await self.provider.complete(prompt, schema, self.usage)
            except GenerationError:
                raise
            except Exception as exc:
                raise ProviderError(describe_provider_failure(self.name, exc)) from None
        self.exchanges.append({"purpose": purpose, "system": SYSTEM_PROMPT, "prompt": prompt, "answer": text})
        return text


def parse_answer(text: str, check: Callable[[Any, int], list[str]], count: int) -> tuple[Any, list[str]]:
    try:
        answer = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, [f"the answer is not valid JSON ({exc.msg} at character {exc.pos})"]
    except (ValueError, RecursionError) as exc:  # a number too long to convert, or nesting too deep
        return None, [f"the answer is not valid JSON ({exc})"]
    return answer, check(answer, count)


def evidence_ids(item: JSON, said: Mapping[str, str]) -> list[str]:
    """The participants a model's persona stands for: those it names, and those whose words it quotes."""
    named = [str(pid) for pid in item.get("participants") or [] if str(pid) in said]
    quotes = [normalise_quote(quote) for quote in item.get("quotes") or [] if isinstance(quote, str)]
    quoted = [pid for quote in quotes if quote for pid, text in said.items() if quote in text]
    return list(dict.fromkeys(named + quoted))


def evidence_problems(said: Mapping[str, str], fields: list[JSON], answer: Any, count: int) -> list[str]:
    """The answer's problems, and a persona that stands for nobody in the data: it goes back for repair."""
    problems = persona_problems(answer, count, fields)
    if problems:
        return problems
    return [
        f"persona {number} names no participant id of the data in `participants` and quotes none verbatim"
        for number, item in enumerate(answer["personas"], 1)
        if not evidence_ids(item, said)
    ]


def grounded_persona(
    item: JSON,
    number: int,
    source: str,
    said: Mapping[str, str],
    segment: list[str] | None,
    total: int,
    fields: list[JSON],
) -> tuple[JSON, int]:
    """Keep verbatim quotes, move the rest to `unverified_quotes`; evidence names real participants.

    Every persona names at least the participants whose words its verified quotes are.
    """
    verified: list[str] = []
    unverified: list[str] = []
    for quote in item["quotes"]:
        (verified if normalise_quote(quote) and normalise_quote(quote) in source else unverified).append(quote)
    ids = segment if segment is not None else evidence_ids({**item, "quotes": verified}, said)
    persona = {
        "id": f"persona-{number:03d}",
        **{name: item[name] for name in PERSONA_FIELDS if name != "quotes"},
        "quotes": verified,
        "summary": item.get("summary", ""),
        **{spec["name"]: item[spec["name"]] for spec in fields},
        "evidence": {"participants": ids, "share": round(len(ids) / total, 4)},
    }
    if unverified:
        persona["unverified_quotes"] = unverified
    return persona, len(unverified)


async def llm_personas(
    dataset: Dataset, request: JSON, provider: str, report: ProgressReport
) -> tuple[list[JSON], JSON]:
    """Personas from an LLM, holistic or per segment; returns them with metadata to merge."""
    config = request.get("config", {})
    count = request.get("count", DEFAULT_COUNT)
    people = dataset.participants
    if len(people) < count and not is_grouped(config):
        raise GenerationError(f"the data has {len(people)} participant(s), fewer than the {count} personas asked for")
    budget = config.get("max_input_tokens", DEFAULT_MAX_INPUT_TOKENS)
    strategy, rendered = llm_strategy(people, config)
    refining = refining_asked(request)
    await asyncio.to_thread(importlib.import_module, SDK_MODULES[provider])  # seconds, the first time: not on the loop
    session = ModelSession(provider, request.get("model") or default_model(provider), config)
    said = {person.id: normalise_quote("\n".join(person.texts)) for person in people}
    async with asyncio.timeout(PROVIDER_JOB_TIMEOUT_S):
        if strategy == "holistic":
            if estimate_tokens(rendered) > budget:
                raise GenerationError(
                    f"the data is about {estimate_tokens(rendered)} tokens, over max_input_tokens "
                    f"{budget}; use strategy 'segmented' or 'auto'"
                )
            answer = await session.ask(
                "personas",
                persona_prompt(count, rendered, config, refining=refining),
                result_schema(config),
                functools.partial(evidence_problems, said, config.get("fields", [])),
                count,
            )
            await report(PROGRESS["validated"], "personas validated")
            items: Sequence[tuple[JSON, list[str] | None]] = [(item, None) for item in answer["personas"]]
        else:
            items = await segmented_items(session, dataset, count, config, budget, report, refining)
    source = normalise_quote(rendered)
    personas, unverified = [], 0
    for number, (item, segment) in enumerate(items, 1):
        persona, missing = grounded_persona(item, number, source, said, segment, len(people), config.get("fields", []))
        personas.append(persona)
        unverified += missing
    warnings = (
        [f"{unverified} quote(s) not found verbatim in the data moved to unverified_quotes"] if unverified else []
    )
    usage = {
        "input_tokens": session.usage.input_tokens,
        "output_tokens": session.usage.output_tokens,
        "calls": session.usage.calls,
    }
    return personas, {
        "strategy": strategy,
        "usage": usage,
        "warnings": warnings,
        "exchanges": session.exchanges,
        "model": session.provider.model,
    }


def refining_for(refining: Refining | None, group: list[Participant]) -> Refining | None:
    """A segment's persona refines the parent personas standing for some of its participants, if any do."""
    if refining is None:
        return None
    ids = {person.id for person in group}
    overlapping = [persona for persona in refining[0] if ids & set(persona["participants"])]
    return (overlapping, refining[1]) if overlapping else None


def refining_asked(request: JSON) -> Refining | None:
    """A refinement with an instruction shows the model its parent's personas; one with data alone starts afresh."""
    refine = request.get("refine") or {}
    if not refine.get("instruction"):
        return None
    shown = [
        {
            **{
                key: value
                for key, value in persona.items()
                if key not in ("id", "evidence", "themes", "unverified_quotes")
            },
            "participants": persona.get("evidence", {}).get("participants", []),
        }
        for persona in refine["parent_personas"]
    ]
    return shown, refine["instruction"]


def is_grouped(config: JSON) -> bool:
    """Whether the researcher set the grouping (a persona per group), rather than the engine."""
    return config.get("group_by") is not None or config.get("groups") is not None


def llm_strategy(people: list[Participant], config: JSON) -> tuple[str, str]:
    """Holistic (one call on all the data) or segmented (one per segment), with the data as the model reads it.

    Grouping asks for segments; `auto` sends the data whole while it fits max_input_tokens.
    """
    strategy = "segmented" if is_grouped(config) else config_value(config, "strategy")
    rendered = render_participants(people)
    if strategy == "auto":
        strategy = (
            "holistic"
            if estimate_tokens(rendered) <= config.get("max_input_tokens", DEFAULT_MAX_INPUT_TOKENS)
            else "segmented"
        )
    return strategy, rendered


def segment_summaries(corpus: Corpus, segments: list[Segment]) -> list[str]:
    """A few words per segment, shown to the model writing each other segment's persona so it stays distinct."""
    return [
        segment.name
        or ", ".join(
            corpus.display.get(t, t) for t in distinctive_terms(corpus, term_shares(corpus, segment.members), 4)
        )
        for segment in segments
    ]


async def segmented_items(
    session: ModelSession,
    dataset: Dataset,
    count: int,
    config: JSON,
    budget: int,
    report: ProgressReport,
    refining: Refining | None = None,
) -> list[tuple[JSON, list[str]]]:
    """Cluster offline, then one persona per segment, concurrently, each from its own data."""
    people = dataset.participants
    async with engine_slot():
        corpus = await run_engine(people, build_corpus, people, dataset.labels)
        segments = await run_engine(people, segments_for, corpus, count, config)
    summaries = segment_summaries(corpus, segments)
    done = 0

    async def one(index: int, segment: Segment) -> tuple[JSON, list[str]]:
        nonlocal done
        group = [people[i] for i in segment.members]
        data = render_participants(group)
        if estimate_tokens(data) > budget:
            data = await condense(session, group, budget)
        findings = [answer_finding(answer) for answer in closed_answers(group, people, {}, config.get("group_by"))]
        if findings:  # what the counts say, so the model need not count
            data += "\n\nClosed answers that set this segment apart:\n" + "\n".join(f"- {line}" for line in findings)
        others = [f"segment {n + 1}: {summary}" for n, summary in enumerate(summaries) if n != index]
        answer = await session.ask(
            f"persona for segment {index + 1}",
            persona_prompt(1, data, config, others, refining_for(refining, group)),
            result_schema(config),
            functools.partial(persona_problems, fields=config.get("fields", [])),
            1,
        )
        done += 1
        await report(*written_report(done, len(segments)))
        item = answer["personas"][0]
        return ({**item, "title": segment.name} if segment.name else item), [person.id for person in group]

    return list(await asyncio.gather(*(one(i, segment) for i, segment in enumerate(segments))))


def condense_chunks(group: list[Participant], budget: int) -> list[list[Participant]]:
    """A segment too large for one call, in chunks of whole participants that each fit in 80% of the budget."""
    chunks: list[list[Participant]] = []
    current: list[Participant] = []
    size = 0
    for person in group:
        tokens = estimate_tokens(render_participants([person]))
        if current and size + tokens > budget * 0.8:
            chunks.append(current)
            current, size = [], 0
        current.append(person)
        size += tokens
    chunks.append(current)
    return chunks


def findings_prompt(text: str) -> str:
    return (
        "Extract the key findings (goals, pain points, behaviours) and the most telling quotes from "
        f"this part of the research data. Quotes must be copied exactly.\n\n<data>\n{text}\n</data>"
    )


async def condense(session: ModelSession, group: list[Participant], budget: int) -> str:
    """The map step: findings and verbatim quotes per chunk, so nothing is cut off unread."""
    chunks = condense_chunks(group, budget)
    lines = []
    for number, chunk in enumerate(chunks, 1):
        text = render_participants(chunk)
        answer = await session.ask(
            f"findings, chunk {number} of {len(chunks)}", findings_prompt(text), FINDINGS_SCHEMA, findings_problems, 0
        )
        lines += [f"- {finding}" for finding in answer["findings"]]
        lines += [f'"{quote}"' for quote in answer["quotes"] if normalise_quote(quote) in normalise_quote(text)]
    ids = ", ".join(person.id for person in group)
    return f"Findings from participants {ids}:\n" + "\n".join(lines)


# ---------------------------------------------------------------------------
# Estimates: what a job would send to its provider, and what that would cost
# ---------------------------------------------------------------------------
# Prices in US dollars per million input and output tokens, from the providers' price
# pages (December 2026). A model not listed has no price here: its cost is unknown, never guessed.
MODEL_PRICES = {
    "claude-opus-4-5": (5.0, 25.0),
    "claude-opus-4-1": (15.0, 75.0),
    "claude-opus-4": (15.0, 75.0),
    "claude-sonnet-4-5": (3.0, 15.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-haiku-4-5": (1.0, 5.0),
    "claude-3-5-haiku": (0.8, 4.0),
    "gpt-5": (1.25, 10.0),
    "gpt-5-mini": (0.25, 2.0),
    "gpt-5-nano": (0.05, 0.4),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6),
    "gpt-4.1-nano": (0.1, 0.4),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
    "gemini-2.5-pro": (1.25, 10.0),
    "gemini-2.5-flash": (0.3, 2.5),
    "gemini-2.5-flash-lite": (0.1, 0.4),
    "gemini-2.0-flash": (0.1, 0.4),
}
MODEL_SNAPSHOT = re.compile(r"-(\d{8}|\d{4}-\d\d-\d\d|latest)$")  # claude-sonnet-4-20250514, gpt-4o-2024-08-06
OUTPUT_TOKENS_PER_PERSONA = {"minimal": 350, "standard": 600, "detailed": 1000}  # what answers here have run to
FINDINGS_OUTPUT_TOKENS = 800  # one chunk's findings and quotes


def model_price(provider: str, model: str) -> tuple[float, float] | None:
    """A known model's price; a model served by Ollama or any other server has none known."""
    if provider == "ollama":
        return None
    return MODEL_PRICES.get(MODEL_SNAPSHOT.sub("", model))


@dataclass
class CallPlan:
    """The calls a job would make: how many, their tokens in and out, and what would go wrong."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    warnings: list[str] = field(default_factory=list)

    def add(self, prompt_tokens: int, schema: JSON, output_tokens: int) -> None:
        """One call: the system prompt, the prompt and the structured-output schema go in."""
        self.calls += 1
        self.input_tokens += estimate_tokens(SYSTEM_PROMPT) + prompt_tokens + estimate_tokens(json.dumps(schema))
        self.output_tokens += output_tokens


def plan_calls(dataset: Dataset, count: int, config: JSON) -> tuple[str, CallPlan]:
    """The strategy and calls llm_personas would make for this data, without making them.

    A segment too large for one call is condensed first; its persona call then reads the
    findings, counted at what findings answers run to.
    """
    people = dataset.participants
    strategy, rendered = llm_strategy(people, config)
    per_persona = OUTPUT_TOKENS_PER_PERSONA[config_value(config, "detail_level")]
    budget = config.get("max_input_tokens", DEFAULT_MAX_INPUT_TOKENS)
    plan = CallPlan()
    if strategy == "holistic":
        if estimate_tokens(rendered) > budget:
            plan.warnings.append(
                f"the job would fail: the data is about {estimate_tokens(rendered)} tokens, over "
                f"max_input_tokens {budget}; use strategy 'segmented' or 'auto'"
            )
        plan.add(estimate_tokens(persona_prompt(count, rendered, config)), result_schema(config), per_persona * count)
        return strategy, plan
    corpus = build_corpus(people, dataset.labels)
    segments = segments_for(corpus, count, config)
    summaries = segment_summaries(corpus, segments)
    for index, segment in enumerate(segments):
        group = [people[i] for i in segment.members]
        data = render_participants(group)
        others = [f"segment {n + 1}: {summary}" for n, summary in enumerate(summaries) if n != index]
        if estimate_tokens(data) <= budget:
            plan.add(estimate_tokens(persona_prompt(1, data, config, others)), result_schema(config), per_persona)
            continue
        chunks = condense_chunks(group, budget)
        for chunk in chunks:
            plan.add(
                estimate_tokens(findings_prompt(render_participants(chunk))), FINDINGS_SCHEMA, FINDINGS_OUTPUT_TOKENS
            )
        findings = FINDINGS_OUTPUT_TOKENS * len(chunks)  # the persona call reads the findings instead of the data
        plan.add(estimate_tokens(persona_prompt(1, "", config, others)) + findings, result_schema(config), per_persona)
    return strategy, plan


async def estimate_job(request: JSON, settings: Settings) -> JSON:
    """What a job with this request would send and cost; nothing is created and no provider is called.

    It reads and segments the data as the job would, holding an engine slot as a job does,
    so many estimates of a large file wait their turn rather than read it all at once.
    Data the job could not read or segment is no error here: the estimate says the job would
    fail, and why, at no cost.
    """
    provider, count, config = request["provider"], request.get("count", DEFAULT_COUNT), request.get("config", {})
    model = request.get("model") or default_model(provider)
    people: list[Participant] = []
    strategy, plan, warnings = "offline" if provider == "local" else config_value(config, "strategy"), CallPlan(), []
    try:
        async with engine_slot():  # reading and segmenting are a job's work: estimates take their turn as jobs do
            dataset = await load_data(request["data"], settings)
            people, warnings = dataset.participants, list(dataset.warnings)
            if len(people) < count and not is_grouped(config):
                raise GenerationError(
                    f"the data has {len(people)} participant(s), fewer than the {count} personas asked for"
                )
            if provider != "local":
                strategy, plan = await run_engine(people, plan_calls, dataset, count, config)
    except GenerationError as exc:
        warnings.append(f"the job would fail: {exc}")
    warnings += plan.warnings
    price = (0.0, 0.0) if provider == "local" else model_price(provider, model)
    if price is None:
        warnings.append(
            f"no price is known for model {model!r}, so cost_usd is null"
            + (" (Ollama's models cost what the machine running them costs)" if provider == "ollama" else "")
        )
    cost = None if price is None else round((plan.input_tokens * price[0] + plan.output_tokens * price[1]) / 1e6, 6)
    return {
        "participants": len(people),
        "provider": provider,
        "model": model,
        "strategy": strategy,
        "calls": plan.calls,
        "input_tokens": plan.input_tokens,
        "output_tokens": plan.output_tokens,
        "cost_usd": cost,
        "warnings": warnings,
    }


# ---------------------------------------------------------------------------
# Quality: how well the personas stand for the data, whichever engine made them
# ---------------------------------------------------------------------------

PERSONA_LISTS = ("goals", "pain_points", "behaviours")


def quality_report(people: list[Participant], personas: list[JSON], silent: Sequence[str] = ()) -> JSON:
    """How well the personas stand for the data: coverage of every respondent, and per persona its
    size, support, overlap, who says each item, and how distinct it is (deterministic).

    `silent` are the respondents who answered nothing: read by no persona, still counted.
    Support is the share of a persona's goals, pain points and behaviours whose content
    words all occur in one sentence of its own participants. An item is said by a
    participant when one sentence of theirs holds most of its content words; a copied
    sentence is said by its author at least, so `said_by` is what tells one voice from many.
    Overlap is its highest word similarity to another persona, each word weighed by how few
    participants use it: near-duplicates show, and the data set's topic, in every persona, does not.
    """
    known = {person.id: index for index, person in enumerate(people)}
    members = [
        [known[pid] for pid in dict.fromkeys(persona.get("evidence", {}).get("participants", [])) if pid in known]
        for persona in personas
    ]
    covered = {index for group in members for index in group}
    said = SaidIndex(people)
    vectors = [
        normalised({word: count * said.rarity(word) for word, count in persona_words(persona).items()})
        for persona in personas
    ]
    report = []
    for index, (persona, group) in enumerate(zip(personas, members)):
        overlap = max(
            (similarity(vectors[index], vectors[other]) for other in range(len(personas)) if other != index),
            default=0.0,
        )
        items, lifts = said.items(persona, set(group))
        lifts += [
            answer["count"] / answer["of"] - answer["share_elsewhere"]
            for answer in persona.get("evidence", {}).get("answers", [])
            if answer.get("of")
        ]
        report.append(
            {
                "id": persona.get("id"),
                "participants": len(group),
                "support": support(persona, [people[i] for i in group]),
                "overlap": round(overlap, 4),
                "items": items,
                "distinctiveness": round(max(0.0, statistics.fmean(lifts)), 4) if lifts else 0.0,
            }
        )
    respondents = len(people) + len(silent)
    return {
        "respondents": respondents,
        "coverage": round(len(covered) / respondents, 4) if respondents else 0.0,
        "unrepresented": [person.id for index, person in enumerate(people) if index not in covered] + list(silent),
        "personas": report,
        "stability": None,
    }


class SaidIndex:
    """Every participant's sentences as word sets, indexed by word: who says something like an item."""

    def __init__(self, people: list[Participant]) -> None:
        self.people = len(people)
        self.owner: list[int] = []
        self.postings: dict[str, list[int]] = {}
        for index, person in enumerate(people):
            for text in person.texts:
                for sentence in split_sentences(text):
                    number = len(self.owner)
                    self.owner.append(index)
                    for word in word_set(sentence):
                        self.postings.setdefault(word, []).append(number)
        # A word everyone uses (the data set's topic, "spack", "package") tells little about who says an item.
        users = {word: len({self.owner[n] for n in numbers}) for word, numbers in self.postings.items()}
        self.weight = {word: math.log((1 + self.people) / (1 + count)) + 1 for word, count in users.items()}

    def rarity(self, word: str) -> float:
        """How few participants use a word (inverse document frequency; a word nobody uses, the most)."""
        return self.weight.get(word, math.log(1 + self.people) + 1)

    def speakers(self, item: str) -> set[int]:
        """The participants with a sentence holding more than half of the item's content words, each
        word weighed by how few people use it, and two of them at least: "internal details of a spack
        package" is said by whoever speaks of internal details, not by everyone who says "spack package",
        nor by whoever says "Kubernetes" once."""
        weights = {word: self.rarity(word) for word in word_set(item)}
        hits: dict[int, float] = {}
        words: Counter[int] = Counter()
        for word, weight in weights.items():
            for number in self.postings.get(word, ()):
                hits[number] = hits.get(number, 0.0) + weight
                words[number] += 1
        whole, least = sum(weights.values()), min(2, len(weights))  # one rare word shared is not the item said
        return {self.owner[number] for number, shared in hits.items() if 2 * shared > whole and words[number] >= least}

    def items(self, persona: JSON, group: set[int]) -> tuple[list[JSON], list[float]]:
        """Per goal, pain point and behaviour, how many of the persona's participants say it; and per
        item, how much more its participants say it than everyone else does."""
        found, lifts = [], []
        others = self.people - len(group)
        for key in PERSONA_LISTS:
            for position, item in enumerate(persona.get(key, [])):
                speakers = self.speakers(item) if isinstance(item, str) else set()
                inside = len(speakers & group)
                found.append({"field": key, "index": position, "said_by": inside})
                if group:
                    lifts.append(inside / len(group) - (len(speakers - group) / others if others else 0.0))
        return found, lifts


STABILITY_RUNS = 5  # reruns, each on its own fixed-seed resample
STABILITY_SHARE = 0.9  # of the participants each rerun groups
STABILITY_MAX_PARTICIPANTS = 2000  # a rerun groups at most this many: stability costs no more than a job


def grouping_stability(
    people: list[Participant],
    count: int,
    config: JSON,
    personas: list[JSON] | None = None,
    labels: Mapping[str, str] | None = None,
) -> float | None:
    """How far the engine's own grouping survives leaving participants out (0-1).

    The adjusted Rand index between the job's grouping and each of 5 reruns on a
    fixed-seed resample of 90% of the participants, on the participants both group,
    averaged; a chance-level agreement scores 0. None where the researcher chose the
    groups (`groups`, `group_by`), or where there are too few participants to resample.
    The offline engine's `personas` are its grouping; without them it is computed again. `labels`, the
    dataset's question texts, are the ones the grouping read.
    """
    if config.get("groups") is not None or config.get("group_by") is not None or len(people) < max(10, 2 * count):
        return None
    if personas is None:
        groups = cluster_participants(build_corpus(people, labels), count)
    else:
        index = {person.id: i for i, person in enumerate(people)}
        groups = [[index[pid] for pid in persona["evidence"]["participants"]] for persona in personas]
    grouping = group_labels(groups, len(people))
    size = min(int(len(people) * STABILITY_SHARE), STABILITY_MAX_PARTICIPANTS)
    scores = []
    for run in range(STABILITY_RUNS):
        sample = sorted(random.Random(run).sample(range(len(people)), size))
        again = group_labels(cluster_participants(build_corpus([people[i] for i in sample], labels), count), size)
        scores.append(adjusted_rand_index([grouping[i] for i in sample], again))
    return round(max(0.0, statistics.fmean(scores)), 4)


def group_labels(groups: list[list[int]], size: int) -> list[int]:
    """Each member's group number, from the groups' member lists."""
    labels = [-1] * size
    for number, members in enumerate(groups):
        for member in members:
            labels[member] = number
    return labels


def adjusted_rand_index(first: list[int], second: list[int]) -> float:
    """Agreement of two groupings of the same items, corrected for chance: 1 the same, about 0 at random."""

    def pairs(n: int) -> float:
        return n * (n - 1) / 2

    together = sum(pairs(n) for n in Counter(zip(first, second)).values())
    in_first = sum(pairs(n) for n in Counter(first).values())
    in_second = sum(pairs(n) for n in Counter(second).values())
    expected = in_first * in_second / pairs(len(first)) if len(first) > 1 else 0.0
    most = (in_first + in_second) / 2
    return 1.0 if most == expected else (together - expected) / (most - expected)


def support(persona: JSON, group: list[Participant]) -> float:
    items = [word_set(item) for key in PERSONA_LISTS for item in persona.get(key, [])]
    if not items:  # nothing claimed, nothing unbacked; its cards say that the lists are empty
        return 1.0
    sentences = {word_set(sentence) for person in group for text in person.texts for sentence in split_sentences(text)}
    backed = sum(1 for words in items if any(words <= sentence for sentence in sentences))
    return round(backed / len(items), 4)


def persona_words(persona: JSON) -> Counter[str]:
    texts = [persona.get("title", "")] + persona.get("themes", []) + persona.get("quotes", [])
    texts += [item for key in PERSONA_LISTS for item in persona.get(key, [])]
    return Counter(token for text in texts if isinstance(text, str) for token, _ in content_words(text))


# ---------------------------------------------------------------------------
# Comparison: two runs' personas paired, and what each pair shares field by field
# ---------------------------------------------------------------------------

COMPARED_FIELDS = ("name", "title", "summary", "demographics", "goals", "pain_points", "behaviours", "quotes")
MIN_CONTENT_SIMILARITY = 0.1  # personas sharing no participant pair on their words only above this


def persona_participants(persona: JSON) -> set[str]:
    return set(persona.get("evidence", {}).get("participants", []))


def persona_pairs(left: list[JSON], right: list[JSON]) -> list[tuple[int, int, float]]:
    """(left index, right index, similarity) for each pair, each persona in one pair at most.

    Pairs form greedily, the closest first: personas that stand for the same participants
    before personas that only read alike. Similarity is the participants' overlap
    (Jaccard) when they share any, their words' cosine similarity otherwise.
    """
    vectors = [[normalised(dict(persona_words(persona))) for persona in side] for side in (left, right)]
    candidates = []
    for i, a in enumerate(left):
        for j, b in enumerate(right):
            ours, theirs = persona_participants(a), persona_participants(b)
            shared = len(ours & theirs) / len(ours | theirs) if ours & theirs else 0.0
            content = similarity(vectors[0][i], vectors[1][j])
            if shared or content >= MIN_CONTENT_SIMILARITY:
                candidates.append((shared > 0, shared or content, content, i, j))
    pairs, used_left, used_right = [], set(), set()
    for _, score, _, i, j in sorted(candidates, key=lambda c: (-c[0], -c[1], -c[2], c[3], c[4])):
        if i not in used_left and j not in used_right:
            used_left.add(i)
            used_right.add(j)
            pairs.append((i, j, round(min(score, 1.0), 4)))
    return sorted(pairs)


def field_items(persona: JSON, key: str) -> list[str]:
    """A field as a list of items to compare: a list as it is, a text as one item, demographics as `key: value`."""
    value = persona.get(key)
    if key == "demographics":
        return [f"{name}: {item}" for name, item in (value or {}).items()]
    if isinstance(value, list):
        return [str(item) for item in value]
    return [str(value)] if value not in (None, "") else []


def split_items(ours: list[str], theirs: list[str]) -> JSON:
    """What two lists share and what only one holds; case, spacing and punctuation do not count."""
    their_keys = {normalise_quote(item) for item in theirs}
    our_keys = {normalise_quote(item) for item in ours}
    return {
        "shared": [item for item in ours if normalise_quote(item) in their_keys],
        "only_a": [item for item in ours if normalise_quote(item) not in their_keys],
        "only_b": [item for item in theirs if normalise_quote(item) not in our_keys],
    }


def persona_differences(a: JSON, b: JSON) -> JSON:
    """Per field (the standard ones, the custom ones of either, and the participants): shared, only_a, only_b."""
    keys = [*COMPARED_FIELDS, *dict.fromkeys([*custom_fields(a), *custom_fields(b)])]
    fields = {key: split_items(field_items(a, key), field_items(b, key)) for key in keys}
    ours, theirs = persona_participants(a), persona_participants(b)  # ids as written: `p01` is not `P01`
    fields["participants"] = {
        "shared": sorted(ours & theirs),
        "only_a": sorted(ours - theirs),
        "only_b": sorted(theirs - ours),
    }
    return fields


def persona_label(persona: JSON) -> JSON:
    return {"id": persona.get("id"), "name": persona.get("name"), "title": persona.get("title")}


def compare_personas(left: list[JSON], right: list[JSON]) -> JSON:
    """The pairs of two persona sets with their differences, and the personas of either left unpaired."""
    pairs = persona_pairs(left, right)
    paired_left, paired_right = {i for i, _, _ in pairs}, {j for _, j, _ in pairs}
    return {
        "pairs": [
            {
                "a": persona_label(left[i]),
                "b": persona_label(right[j]),
                "similarity": score,
                "fields": persona_differences(left[i], right[j]),
            }
            for i, j, score in pairs
        ],
        "unpaired": {
            "a": [persona_label(p) for i, p in enumerate(left) if i not in paired_left],
            "b": [persona_label(p) for j, p in enumerate(right) if j not in paired_right],
        },
    }


# ---------------------------------------------------------------------------
# Refinement: a job's personas again, with more data or an instruction
# ---------------------------------------------------------------------------


def copied_participant(person: Participant) -> Participant:
    """A participant whose lists and maps can grow without touching the original."""
    return Participant(
        person.id, list(person.texts), dict(person.attributes), merged_codes(person.coded, {}), dict(person.asked)
    )


def merged_datasets(first: Dataset, more: Dataset) -> Dataset:
    """The parent's data and the data a refinement adds.

    A participant in both (the same id) is one, with all their texts."""
    people = {person.id: copied_participant(person) for person in first.participants}
    for person in more.participants:
        known = people.get(person.id)
        if known is None:
            people[person.id] = copied_participant(person)
        else:
            known.texts += [text for text in person.texts if text not in known.texts]
            known.coded = merged_codes(known.coded, person.coded)
            known.attributes = {**person.attributes, **known.attributes}
            known.asked = {**person.asked, **known.asked}
    source = {
        "kind": "refined",
        "location": f"{first.source['location']} + {more.source['location']}",
        "sources": [first.source, more.source],
        "participants": len(people),
    }
    silent = [pid for pid in dict.fromkeys(first.silent + more.silent) if pid not in people]
    return Dataset(
        list(people.values()),
        source,
        first.warnings + more.warnings,
        {**more.labels, **first.labels},
        first.names | more.names,
        silent,
    )


def continued_personas(parent: list[JSON], personas: list[JSON], keep_names: bool) -> list[JSON]:
    """Each new persona that continues a parent's (they share participants) takes its id, and with new data its name.

    The continued ones come first, in the parent's order; the others follow under new ids, and under
    another name where theirs is one a continued persona keeps or a gone one had.
    """
    pairs = [
        (i, j)
        for i, j, _ in persona_pairs(parent, personas)
        if persona_participants(parent[i]) & persona_participants(personas[j])
    ]
    continues = {j: parent[i] for i, j in pairs}
    number = max((int(p["id"].rsplit("-", 1)[1]) for p in parent if re.fullmatch(r"persona-\d+", p["id"])), default=0)
    kept, fresh = [], []
    for j, persona in enumerate(personas):
        before = continues.get(j)
        if before is not None:
            kept.append(
                (
                    parent.index(before),
                    {**persona, "id": before["id"], **(named_as(persona, before["name"]) if keep_names else {})},
                )
            )
        else:
            number += 1
            fresh.append({**persona, "id": f"persona-{number:03d}"})
    named = [persona for _, persona in sorted(kept, key=lambda entry: entry[0])]
    taken = {persona["name"] for persona in named + parent}  # a continued name, or one a gone persona had
    wanted = {persona["name"] for persona in fresh}
    for persona in fresh:
        if persona["name"] in taken:  # another name, none that another new persona has
            ids = sorted(persona_participants(persona))
            persona = {**persona, **named_as(persona, persona_name(ids, taken | wanted))}
        taken.add(persona["name"])
        named.append(persona)
    return named


def named_as(persona: JSON, name: str) -> JSON:
    """A persona's name, and its summary's mentions of the name it had, as the name it continues."""
    return {"name": name, "summary": persona.get("summary", "").replace(persona["name"], name)}


def persona_changes(parent: list[JSON], personas: list[JSON]) -> JSON:
    """Per continued persona, what each field gained and lost; and the personas new or gone."""
    before = {persona["id"]: persona for persona in parent}
    changed = []
    for persona in personas:
        if persona["id"] in before:
            fields = {
                key: {"added": split["only_b"], "removed": split["only_a"]}
                for key, split in persona_differences(before[persona["id"]], persona).items()
                if split["only_a"] or split["only_b"]
            }
            changed.append({"id": persona["id"], "name": persona["name"], "fields": fields})
    now = {persona["id"] for persona in personas}
    return {
        "personas": changed,
        "new": [persona_label(p) for p in personas if p["id"] not in before],
        "gone": [persona_label(p) for p in parent if p["id"] not in now],
    }


# ---------------------------------------------------------------------------
# Outputs: persona cards, exports and the job's output folder
# ---------------------------------------------------------------------------

LIST_HEADINGS = {"goals": "Goals", "pain_points": "Pain points", "behaviours": "Behaviours"}


def nothing_found(key: str) -> str:
    return f"Nothing in this persona's data reads as a {LIST_HEADINGS[key].lower().rstrip('s')}."


def quality_line(quality: JSON | None) -> str:
    """One persona's quality in words, for its card: what the counts say, not a share that copying fills."""
    if not quality:
        return ""
    size, said = quality["participants"], sorted(item["said_by"] for item in quality.get("items", []))
    spread = f"{said[0]}" if said and said[0] == said[-1] else f"{said[0]} to {said[-1]}" if said else ""
    items = (
        f"its goals, pain points and behaviours are each said by {spread} of its {size}"
        if said
        else "no goal, pain point or behaviour to check"
    )
    apart, overlap = quality.get("distinctiveness", 0.0), quality["overlap"]
    return (
        f"Quality: {items}; its participants stand apart from everyone else "
        f"{in_words(apart, DISTINCTIVENESS_WORDS)} (distinctiveness {apart:.2f}); the closest other persona is "
        f"{in_words(overlap, OVERLAP_WORDS)} (overlap {overlap:.2f})"
    )


DISTINCTIVENESS_WORDS = ((0.15, "hardly"), (0.35, "a little"), (0.6, "clearly"), (1.01, "strongly"))
OVERLAP_WORDS = ((0.3, "little alike"), (0.6, "somewhat alike"), (1.01, "much alike"))


def in_words(value: float, scale: tuple[tuple[float, str], ...]) -> str:
    """A 0-1 figure in words, by the first bound it stays under."""
    return next((words for bound, words in scale if value < bound), scale[-1][1])


STABILITY_WORDS = ((0.5, "changes much"), (0.8, "mostly holds"), (1.01, "holds"))


def coverage_line(quality: JSON | None) -> str:
    """What share of every respondent the personas stand for, counted, how many no persona holds,
    and whether the grouping holds when a tenth of the participants is left out (where it is Persona's)."""
    if not quality:
        return ""
    missing, total = len(quality["unrepresented"]), quality.get("respondents", 0)
    line = f"personas cover {total - missing} of {total} respondents ({quality['coverage']:.0%})"
    line += f"; {missing} in no persona" if missing else ""
    stability = quality.get("stability")
    if stability is not None:
        line += (
            f"; their grouping {in_words(stability, STABILITY_WORDS)} when a tenth of the participants is left out"
            f" (stability {stability:.2f})"
        )
    return line


def said_by(quality: JSON | None, key: str, index: int) -> str:
    """` (said by 7 of 12)` beside a list item, from the quality report."""
    size = (quality or {}).get("participants")
    for item in (quality or {}).get("items", []):
        if item["field"] == key and item["index"] == index:
            return f" (said by {item['said_by']} of {size})"
    return ""


def persona_card(persona: JSON, quality: JSON | None = None, depth: int = 1) -> str:
    """A persona as a Markdown card a researcher can read or paste; `depth` is its heading's level.

    Markdown passes HTML through, so everything from the data is escaped as on the HTML cards.
    """
    e, h = markdown_escape, "#" * depth
    details = ", ".join(
        f"{e(str(key).replace('_', ' '))}: {e(value)}"
        for key, value in persona["demographics"].items()
        if key not in ("participants", "share")  # the summary says them
    )
    lines = [f"{h} {e(persona['name'])}: {e(persona['title'])}", "", e(persona.get("summary", "")), ""]
    if details:  # a transcript study has none: no empty line that reads as if something were missing
        lines += [f"**Demographics**: {details}", ""]
    if quality:
        lines += [f"*{quality_line(quality)}*", ""]
    answers = persona.get("evidence", {}).get("answers", [])
    if answers:
        lines += [f"{h}# What sets them apart", ""] + [f"- {e(answer_finding(answer))}" for answer in answers] + [""]
    spoken = persona.get("evidence", {}).get("codebook", [])
    if spoken:
        lines += [f"{h}# Her codebook's themes", ""] + [f"- {e(theme_finding(theme))}" for theme in spoken] + [""]
    carried = persona.get("evidence", {}).get("codes", [])
    if carried:
        lines += [f"{h}# Her codes", ""] + [f"- {e(code_finding(code))}" for code in carried] + [""]
    for key, heading in LIST_HEADINGS.items():
        lines += (
            [f"{h}# {heading}", ""]
            + (
                [f"- {e(item)}{said_by(quality, key, index)}" for index, item in enumerate(persona[key])]
                or [f"*{nothing_found(key)}*"]
            )
            + [""]
        )
    for key, value in custom_fields(persona).items():
        items = value if isinstance(value, list) else [value]
        lines += [f"{h}# {e(field_heading(key))}", ""] + [f"- {e(item)}" for item in items] + [""]
    lines += [f"{h}# Quotes", ""] + [line for quote in persona["quotes"] for line in (f"> {e(quote)}", "")]
    if persona.get("unverified_quotes"):
        lines += [f"{h}# Unverified quotes (not found in the data)", ""]
        lines += [line for quote in persona["unverified_quotes"] for line in (f"> {e(quote)}", "")]
    evidence = persona["evidence"]
    lines += [
        f"{h}# Evidence",
        "",
        f"Participants ({evidence['share']:.0%}): {e(', '.join(evidence['participants']))}",
        "",
    ]
    return "\n".join(lines)


PAGE_STYLE = """
body{font:16px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{padding:1.5rem 2rem;background:#1d2330;color:#fff}header h1{margin:0;font-size:1.4rem}
header p{margin:.25rem 0 0;opacity:.8}main{display:grid;gap:1.25rem;padding:1.5rem 2rem;
grid-template-columns:repeat(auto-fill,minmax(22rem,1fr))}
.card{background:#fff;border-radius:12px;padding:1.25rem 1.5rem;box-shadow:0 1px 3px rgba(0,0,0,.12);break-inside:avoid}
.card h2{margin:0;font-size:1.25rem}.title{margin:.1rem 0 .75rem;color:#4b5565;font-style:italic}
.share{float:right;background:#e8eefc;color:#2848a8;border-radius:999px;padding:.1rem .6rem;font-size:.85rem}
h3{font-size:.8rem;text-transform:uppercase;letter-spacing:.06em;color:#6b7280;margin:1rem 0 .3rem}
ul{margin:0;padding-left:1.2rem}blockquote{margin:.4rem 0;padding-left:.8rem;border-left:3px solid #2848a8}
.unverified{border-left-color:#c2410c;color:#7c2d12}.unverified::after{content:" (unverified)";font-size:.8rem}
dl{display:grid;grid-template-columns:auto 1fr;gap:.1rem .75rem;margin:0}dt{color:#6b7280}dd{margin:0}
.ids{font-size:.85rem;color:#4b5565}.none{color:#6b7280;font-style:italic;margin:0}
.quality{font-size:.85rem;color:#4b5565;background:#f4f5f7;border-radius:6px;padding:.3rem .6rem}
.said{color:#6b7280;font-size:.85rem}table{border-collapse:collapse;width:100%;background:#fff}
td,th{padding:.5rem .75rem;border-bottom:1px solid #e5e7eb;text-align:left}
@media print{@page{margin:12mm}body{background:#fff;font-size:9pt;line-height:1.3}header{background:#fff;color:#000;
padding:0 0 .5rem}main{display:block;padding:0}.card{box-shadow:none;border:0;padding:0;margin:0;
break-inside:auto;break-after:page}.card:last-child{break-after:auto}.cards{display:block}h3{margin:.6rem 0 .15rem}
dl{grid-template-columns:auto 1fr auto 1fr}details{display:none}h3:has(+details){display:none}}
"""


def markdown_escape(value: Any) -> str:
    """Markdown passes HTML through: every `<` is escaped, and an `&` where it opens an entity (`&amp;`),
    so "Testing & Infrastructure" reads as written where the card is read raw. `>` stays as written inside
    a value ("Installations: > 1,000") and is escaped where it opens one, as a value may open a line (a
    list item, a quotation), where it would open a quotation.

    Brackets are escaped too, so no link or image from the data (`[x](javascript:…)`, a
    remote image that reports who read the card) is ever one.
    """
    text = re.sub(r"&(?=#?\w+;)", "&amp;", str(value)).replace("<", "&lt;")
    text = re.sub(r"^([ \t]*)>", r"\1\\>", text, flags=re.MULTILINE)  # a line it opens would be a quotation
    return text.replace("[", "\\[").replace("]", "\\]")


def escape(value: Any) -> str:
    """Everything from data is escaped: interview text may hold HTML."""
    return html.escape(str(value), quote=True)


def html_page(title: str, subtitle: str, body: str) -> str:
    """A self-contained page: inline CSS, no scripts, no external assets."""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
        f'content="width=device-width,initial-scale=1"><title>{escape(title)}</title><style>{PAGE_STYLE}</style>'
        f"</head><body><header><h1>{escape(title)}</h1><p>{escape(subtitle)}</p></header>{body}</body></html>"
    )


def html_list(key: str, items: list[str], quality: JSON | None = None) -> str:
    if not items:
        return f'<h3>{escape(LIST_HEADINGS[key])}</h3><p class="none">{escape(nothing_found(key))}</p>'
    return (
        f"<h3>{escape(LIST_HEADINGS[key])}</h3><ul>"
        + "".join(
            f'<li>{escape(item)}<span class="said">{escape(said_by(quality, key, index))}</span></li>'
            for index, item in enumerate(items)
        )
        + "</ul>"
    )


def html_items(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{escape(item)}</li>" for item in items) + "</ul>" if items else ""


def html_field(key: str, value: str | list[str]) -> str:
    """A custom field (config.fields) on a card: a paragraph, or a list (never empty: the answer was checked)."""
    shown = html_items(value) if isinstance(value, list) else f"<p>{escape(value)}</p>"
    return f"<h3>{escape(field_heading(key))}</h3>{shown}"


def persona_html_card(persona: JSON, quality: JSON | None = None) -> str:
    """A persona as an HTML card: its participants counted once, their ids behind a disclosure."""
    evidence = persona.get("evidence", {})
    ids = evidence.get("participants", [])
    counted = f"{len(ids)} participant{'s' if len(ids) != 1 else ''}"
    share = f" ({evidence['share']:.0%})" if "share" in evidence else ""
    badge = f'<span class="share">{counted}{share}</span>' if ids or share else ""
    demographics = "".join(
        f"<dt>{escape(key.replace('_', ' '))}</dt><dd>{escape(value)}</dd>"
        for key, value in persona.get("demographics", {}).items()
        if key not in ("participants", "share")  # the summary and the badge say these once
    )
    quotes = "".join(f"<blockquote>{escape(q)}</blockquote>" for q in persona.get("quotes", []))
    quotes += "".join(
        f'<blockquote class="unverified">{escape(q)}</blockquote>' for q in persona.get("unverified_quotes", [])
    )
    return (
        f'<article class="card" id="{escape(persona.get("id", ""))}">{badge}<h2>{escape(persona["name"])}</h2>'
        f'<p class="title">{escape(persona["title"])}</p>'
        + (f"<p>{escape(persona['summary'])}</p>" if persona.get("summary") else "")
        + (f"<h3>Demographics</h3><dl>{demographics}</dl>" if demographics else "")
        + (f'<p class="quality">{escape(quality_line(quality))}</p>' if quality else "")
        + (
            f"<h3>What sets them apart</h3>{html_items([answer_finding(a) for a in evidence['answers']])}"
            if evidence.get("answers")
            else ""
        )
        + (
            f"<h3>Her codebook's themes</h3>{html_items([theme_finding(t) for t in evidence['codebook']])}"
            if evidence.get("codebook")
            else ""
        )
        + (
            f"<h3>Her codes</h3>{html_items([code_finding(c) for c in evidence['codes']])}"
            if evidence.get("codes")
            else ""
        )
        + "".join(html_list(key, persona.get(key, []), quality) for key in LIST_HEADINGS)
        + "".join(html_field(key, value) for key, value in custom_fields(persona).items())
        + (f"<h3>Quotes</h3>{quotes}" if quotes else "")
        + (
            f'<h3>Participants</h3><details><summary>Their ids</summary><p class="ids">{escape(", ".join(ids))}</p>'
            "</details>"
            if ids
            else ""
        )
        + "</article>"
    )


def personas_page(personas: list[JSON], subtitle: str, quality: JSON | None = None) -> str:
    by_id = {entry["id"]: entry for entry in (quality or {}).get("personas", [])}
    cards = "".join(persona_html_card(persona, by_id.get(persona.get("id"))) for persona in personas)
    return html_page(
        "Personas", subtitle + (f" · {coverage_line(quality)}" if quality else ""), f"<main>{cards}</main>"
    )


CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_cell(value: Any) -> str:
    """A cell a spreadsheet shows as text: a participant's words starting with `=` or `+` never run as a formula."""
    text = "\n".join(map(str, value)) if isinstance(value, list) else "" if value is None else str(value)
    return "'" + text if text.startswith(CSV_FORMULA_START) else text


def personas_table(personas: list[JSON]) -> tuple[list[str], list[list[Any]]]:
    """One row per persona, a column per field and per demographic key: the CSV's and the workbook's."""
    demographics = list(dict.fromkeys(key for persona in personas for key in persona.get("demographics", {})))
    extra = list(dict.fromkeys(key for persona in personas for key in custom_fields(persona)))
    lists = ["goals", "pain_points", "behaviours", "quotes"]
    named = {"id", "name", "title", "summary", *lists, *extra}
    demographics = [
        key for key in demographics if key not in ("participants", "share")
    ]  # the evidence columns say them
    columns = [
        "id",
        "name",
        "title",
        "summary",
        *(f"demographics.{key}" if key in named else key for key in demographics),
        *lists,
        *extra,
        "participants",
        "share",
    ]
    rows = []
    for persona in personas:
        evidence = persona.get("evidence", {})
        row = [persona.get(key) for key in ("id", "name", "title", "summary")]
        row += [persona.get("demographics", {}).get(key) for key in demographics]
        row += [persona.get(key, []) for key in lists] + [persona.get(key) for key in extra]
        rows.append([*row, evidence.get("participants", []), evidence.get("share")])
    return columns, rows


def personas_csv(personas: list[JSON]) -> str:
    """One row per persona, list fields joined by line breaks, a column per demographic key.

    It starts with a byte order mark: Excel reads a CSV without one in the machine's legacy code page.
    """
    columns, rows = personas_table(personas)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([spreadsheet_cell(column) for column in columns])  # headers come from data and models too
    for row in rows:
        writer.writerow([spreadsheet_cell(value) for value in row])
    return "\ufeff" + out.getvalue()


XML_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")  # characters XML 1.0 cannot hold
XLSX_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
XLSX_RELS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"


def xlsx_cell(value: Any) -> str:
    """A cell as inline text (never a formula, whatever it starts with); lists one item a line."""
    if value is None:
        return "<c/>"
    text = "\n".join(map(str, value)) if isinstance(value, list) else str(value)
    return f'<c t="inlineStr"><is><t xml:space="preserve">{html.escape(XML_UNSAFE.sub("", text))}</t></is></c>'


def xlsx_sheet(rows: list[list[Any]]) -> str:
    cells = "".join(f"<row>{''.join(xlsx_cell(value) for value in row)}</row>" for row in rows)
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><worksheet xmlns="{XLSX_NS}"><sheetData>{cells}</sheetData></worksheet>'
    )


def personas_xlsx(personas: list[JSON]) -> bytes:
    """The personas as an Excel workbook: a sheet of personas as the CSV has them, and a sheet of
    evidence, a row per persona and participant it stands for."""
    columns, rows = personas_table(personas)
    evidence = [["persona", "name", "participant"]] + [
        [persona.get("id"), persona.get("name"), participant]
        for persona in personas
        for participant in persona.get("evidence", {}).get("participants", [])
    ]
    sheets = {"Personas": xlsx_sheet([columns, *rows]), "Evidence": xlsx_sheet(evidence)}
    kind = "application/vnd.openxmlformats-officedocument.spreadsheetml"
    overrides = "".join(
        f'<Override PartName="/xl/worksheets/sheet{n}.xml" ContentType="{kind}.worksheet+xml"/>'
        for n in range(1, len(sheets) + 1)
    )
    parts = {
        "[Content_Types].xml": (
            '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/'
            'content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-package.'
            'relationships+xml"/><Default Extension="xml" ContentType="application/xml"/><Override PartName='
            f'"/xl/workbook.xml" ContentType="{kind}.sheet.main+xml"/>{overrides}</Types>'
        ),
        "_rels/.rels": (
            '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/'
            f'2006/relationships"><Relationship Id="rId1" Type="{XLSX_RELS}/officeDocument" Target="xl/workbook.xml"/>'
            "</Relationships>"
        ),
        "xl/workbook.xml": (
            f'<?xml version="1.0" encoding="UTF-8"?><workbook xmlns="{XLSX_NS}" xmlns:r="{XLSX_RELS}"><sheets>'
            + "".join(f'<sheet name="{name}" sheetId="{n}" r:id="rId{n}"/>' for n, name in enumerate(sheets, 1))
            + "</sheets></workbook>"
        ),
        "xl/_rels/workbook.xml.rels": (
            '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/'
            '2006/relationships">'
            + "".join(
                f'<Relationship Id="rId{n}" Type="{XLSX_RELS}/worksheet" Target="worksheets/sheet{n}.xml"/>'
                for n in range(1, len(sheets) + 1)
            )
            + "</Relationships>"
        ),
        **{f"xl/worksheets/sheet{n}.xml": sheet for n, sheet in enumerate(sheets.values(), 1)},
    }
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in parts.items():
            archive.writestr(name, text)
    return out.getvalue()


def personas_markdown(personas: list[JSON], subtitle: str, quality: JSON | None) -> str:
    by_id = {entry["id"]: entry for entry in (quality or {}).get("personas", [])}
    cards = [persona_card(persona, by_id.get(persona["id"]), depth=2) for persona in personas]
    head = f"# Personas\n\n{markdown_escape(subtitle)}" + (f" · {coverage_line(quality)}" if quality else "") + "\n\n"
    return head + "\n---\n\n".join(cards)


def personas_subtitle(personas: list[JSON], metadata: JSON) -> str:
    source = metadata["source"]["location"]
    return f"{len(personas)} personas from {source} · {metadata['provider']} · {metadata['job_id']}"


EXPORT_FORMATS = {  # format: (media type, file name's ending)
    "csv": ("text/csv; charset=utf-8", "csv"),
    "json": ("application/json", "json"),
    "markdown": ("text/markdown; charset=utf-8", "md"),
    "html": ("text/html; charset=utf-8", "html"),
    "xlsx": ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", "xlsx"),
    "qdpx": ("application/zip", "qdpx"),
    "qdc": ("application/xml", "qdc"),
    "segments": ("text/csv; charset=utf-8", "segments.csv"),
}


def personas_document(form: str, personas: list[JSON], metadata: JSON) -> str:
    """A job's personas as one document in one of EXPORT_FORMATS: its folder holds these, the export sends them."""
    quality = metadata.get("quality")
    if form == "csv":
        return personas_csv(personas)
    if form == "json":
        return json.dumps({"personas": personas}, indent=2, ensure_ascii=False)
    if form == "markdown":
        return personas_markdown(personas, personas_subtitle(personas, metadata), quality)
    return personas_page(personas, personas_subtitle(personas, metadata), quality)


def output_folder(output_dir: Path, job_id: str, created_at: str | None) -> Path:
    """A job's folder, named from the job alone (its creation time and id): every run of it writes the same one."""
    stamp = (created_at or utc_now()).replace("-", "").replace(":", "").replace("T", "_").rstrip("Z")[:15]
    return output_dir / f"{stamp}_{job_id}"


def write_outputs(folder: Path, personas: list[JSON], metadata: JSON, exchanges: list[JSON]) -> str:
    """Write the job's folder atomically (a rename), so a crash never leaves half of one.

    A folder already there is a complete one from an earlier run of the job that a crash
    or a stop cut off before it was recorded: this run's replaces it, so exactly one stays.
    """
    staging = folder.with_name(f".{folder.name}~{this_host()}~{os.getpid()}~{secrets.token_hex(4)}.partial")
    staging.mkdir(parents=True)
    mark_output_folder(folder.parent)
    for form in ("json", "csv", "html"):
        (staging / f"personas.{EXPORT_FORMATS[form][1]}").write_text(
            personas_document(form, personas, metadata), "utf-8"
        )
    (staging / "metadata.json").write_text(json.dumps(metadata, indent=2, ensure_ascii=False), "utf-8")
    by_id = {entry["id"]: entry for entry in (metadata.get("quality") or {}).get("personas", [])}
    for persona in personas:
        (staging / f"{persona['id']}.md").write_text(persona_card(persona, by_id.get(persona["id"])), "utf-8")
    if exchanges:  # the prompts sent and the raw answers, for auditing an LLM run
        (staging / "exchanges.json").write_text(json.dumps(exchanges, indent=2, ensure_ascii=False), "utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    try:
        staging.rename(folder)
    except OSError:  # another run of the job put its complete folder there meanwhile: keep that one
        shutil.rmtree(staging, ignore_errors=True)
    return f"{folder.as_posix()}/"


def mark_output_folder(output_dir: Path) -> None:
    """Mark the output folder, so that no data source ever takes in what Persona wrote.

    The folder may lie in the data directory."""
    with contextlib.suppress(OSError):
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / OUTPUT_MARKER).touch(exist_ok=True)


def remove_output_folders(output_dir: Path, paths: list[str]) -> None:
    """Delete the folders of deleted jobs: only folders inside the output directory, never anything else."""
    root = output_dir.resolve()
    for path in paths:
        folder = Path(path).resolve()
        if folder != root and folder.is_relative_to(root) and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def remove_partial_folders(output_dir: Path) -> int:
    """Folders that crashed processes left half written; none is a job's result.

    A folder whose writer ran on this host, in this process namespace, goes at once if
    that process is gone. Whether a writer on another host, or in another container with
    the same host name, lives cannot be told from here: its folder goes once it is
    PARTIAL_MAX_AGE_S old. A folder a live process is writing stays.
    """
    removed = 0
    for path in output_dir.glob(".*~*~*~*.partial"):
        writer, pid, _ = path.name.rsplit("~", 2)
        # at start-up this process has written nothing yet: a folder under its pid is a dead namesake's
        # (a container's server is PID 1 on every start)
        gone = (
            writer.endswith(f"~{this_host()}")
            and pid.isdigit()
            and (int(pid) == os.getpid() or not pid_alive(int(pid)))
        )
        with contextlib.suppress(OSError):
            if gone or time.time() - path.stat().st_mtime > PARTIAL_MAX_AGE_S:
                shutil.rmtree(path)
                removed += 1
    return removed


# ---------------------------------------------------------------------------
# Outputs: the personas as a REFI-QDA project, a codebook, and coded segments
# ---------------------------------------------------------------------------
#
# A researcher audits personas in her QDA tool (NVivo, ATLAS.ti, MAXQDA, QualCoder). The
# project (`.qdpx`: `project.qde` plus `sources/`) holds each quoted participant's words as a
# plain UTF-8 text, one code per persona with a child code per theme, and a coded selection for
# each quote and each goal, pain point and behaviour found in those words; offsets count code
# points of the stored text, the end exclusive, as the REFI-QDA 1.5 specification says. The
# words come from reading the job's source again; where that cannot be done (a URL, a file
# changed since), each persona's own quotes and items are its source, and the project says so.

QDA_PROJECT_NS = "urn:QDA-XML:project:1.0"
QDA_CODEBOOK_NS = "urn:QDA-XML:codebook:1.0"
QDA_GUIDS = uuid.UUID("5b0f8a4e-58d3-4c0e-9a39-0c8f1d2b7e61")  # an export's guids: uuid5 of its job and what they name
QDA_NAME_CHARACTERS = 100  # a selection longer than this is named by its start and "…"
QDA_COLOURS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")
EVIDENCE_FIELDS = {"quotes": "Quote", "goals": "Goal", "pain_points": "Pain point", "behaviours": "Behaviour"}


@dataclass
class Passage:
    """A persona's quote or item found in a source's text: where, and what it is."""

    persona: int
    field: str  # one of EVIDENCE_FIELDS
    index: int
    source: str  # the source's key: a participant's id, a project's source guid, or a persona's own
    start: int
    end: int


@dataclass
class EvidenceSources:
    """The texts a project's sources hold (by participant id, or a persona's own) and the passages in them."""

    texts: dict[str, str]
    passages: list[Passage]
    people: dict[str, Participant]  # the participants the personas stand for, as the data has them
    read_again: bool  # whether the texts are the participants' words, or only the personas'


def plain_source_text(person: Participant) -> str:
    """A participant's words as one plain text: each unit (a turn, an answer) a paragraph, `\\n` line ends."""
    return "\n\n".join(text.replace("\r\n", "\n").replace("\r", "\n") for text in person.texts)


def locate(text: str, passage: str) -> tuple[int, int] | None:
    """Where `passage` stands in `text`, allowing other white space between its words."""
    start = text.find(passage)
    if start >= 0:
        return start, start + len(passage)
    words = passage.split()
    match = re.search(r"\s+".join(map(re.escape, words)), text) if words else None
    return match.span() if match else None


def found_passages(
    personas: list[JSON], texts_of: Mapping[str, list[tuple[str, str]]]
) -> tuple[dict[str, str], list[Passage]]:
    """Each quote and item of each persona, found in a text of one of its own participants (`texts_of`:
    a participant's id -> its sources' keys and texts); and the texts that hold any."""
    texts: dict[str, str] = {}
    passages = []
    for number, persona in enumerate(personas):
        members = [pid for pid in dict.fromkeys(persona.get("evidence", {}).get("participants", [])) if pid in texts_of]
        sources = [pair for pid in members for pair in texts_of[pid]]
        text_of = dict(sources)
        tidied: dict[str, tuple[str, str]] | None = None  # an item's sentence as the engine tidied it: read once
        for key in EVIDENCE_FIELDS:
            for index, item in enumerate(persona.get(key, [])):
                if not isinstance(item, str):
                    continue
                found = next(((source, text, span) for source, text in sources if (span := locate(text, item))), None)
                if found is None and key != "quotes":
                    if tidied is None:
                        tidied = tidied_sentences(sources)
                    source, sentence = tidied.get(item, ("", ""))
                    span = locate(text_of[source], sentence) if source else None
                    found = (source, text_of[source], span) if span else None
                if found is not None:
                    texts[found[0]] = found[1]
                    passages.append(Passage(number, key, index, found[0], *found[2]))
    return texts, passages


def tidied_sentences(sources: list[tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """Each sentence of the sources as a list item shows it (fillers and stutters gone), with its source's
    key and the sentence as written: how an item that is not word for word in the data is found."""
    found: dict[str, tuple[str, str]] = {}
    for source, text in sources:
        for sentence in split_sentences(text):
            found.setdefault(tidy_spoken(sentence), (source, sentence))
    return found


def evidence_sources(personas: list[JSON], dataset: Dataset | None) -> EvidenceSources:
    """The personas' quotes and items in their participants' words, a source per participant.

    Without the data (`dataset` None) each persona's quotes and items, a paragraph each, are its source."""
    if dataset is not None:
        people = {person.id: person for person in dataset.participants}
        texts, passages = found_passages(
            personas, {pid: [(pid, plain_source_text(person))] for pid, person in people.items()}
        )
        return EvidenceSources(texts, passages, people, True)
    texts, passages = {}, []
    for number, persona in enumerate(personas):
        own, paragraphs = f"{persona.get('id', number + 1)} {persona['name']}: quotes and items", list[str]()
        for key in EVIDENCE_FIELDS:
            for index, item in enumerate(persona.get(key, [])):
                if isinstance(item, str) and item.strip():
                    start = sum(len(p) + 2 for p in paragraphs)
                    paragraphs.append(item)
                    passages.append(Passage(number, key, index, own, start, start + len(item)))
        if paragraphs:
            texts[own] = "\n\n".join(paragraphs)
    return EvidenceSources(texts, passages, {}, False)


def qda_guid(job_id: str, *names: str) -> str:
    return str(uuid.uuid5(QDA_GUIDS, "\x1f".join((job_id, *names))))


def qda_text(text: str) -> str:
    """Text XML 1.0 can hold."""
    return XML_UNSAFE.sub("", text)


def selection_name(text: str) -> str:
    """A selection's name: the exact text it covers, or its first 100 characters and "…"."""
    return text if len(text) <= QDA_NAME_CHARACTERS else text[:QDA_NAME_CHARACTERS] + "…"


def persona_code_name(persona: JSON) -> str:
    return f"{persona['name']} — {persona['title']}"


def persona_description(persona: JSON) -> str:
    """What a persona's code says of it: its summary, demographics, distinctive answers and lists."""
    lines = [persona.get("summary", "")]
    details = [
        f"{key}: {value}" for key, value in persona["demographics"].items() if key not in ("participants", "share")
    ]
    if details:
        lines += ["", "Demographics:", *details]
    answers = persona.get("evidence", {}).get("answers", [])
    if answers:
        lines += ["", "What sets them apart:", *(answer_finding(answer) for answer in answers)]
    for key, heading in LIST_HEADINGS.items():
        if persona.get(key):
            lines += ["", f"{heading}:", *(f"- {item}" for item in persona[key] if isinstance(item, str))]
    return qda_text("\n".join(lines).strip())


def theme_codes(job_id: str, number: int, persona: JSON) -> dict[str, str]:
    """A persona's themes, each with its child code's guid."""
    themes = [theme for theme in dict.fromkeys(persona.get("themes", [])) if isinstance(theme, str) and theme.strip()]
    return {theme: qda_guid(job_id, "theme", str(number), theme) for theme in themes}


def mentions(text: str, theme: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(theme)}(?!\w)", text, re.IGNORECASE) is not None


def qda_user(metadata: JSON) -> tuple[str, str]:
    """Persona as the project's user, named with its provider and model so the team tells its coding from theirs."""
    name = f"Persona {metadata.get('version', __version__)} ({metadata.get('provider', 'local')}"
    name += f", {metadata['model']})" if metadata.get("model") else ")"
    return qda_guid(metadata["job_id"], "user"), name


def qda_codebook(personas: list[JSON], job_id: str, parent: Any) -> None:
    """One code per persona under `parent` (a <Codes>), each with a child code per theme."""
    from xml.etree import ElementTree as ET

    for number, persona in enumerate(personas):
        code = ET.SubElement(
            parent,
            "Code",
            guid=qda_guid(job_id, "persona", str(number)),
            name=qda_text(persona_code_name(persona)),
            isCodable="true",
            color=QDA_COLOURS[number % len(QDA_COLOURS)],
        )
        ET.SubElement(code, "Description").text = persona_description(persona)
        for theme, guid in theme_codes(job_id, number, persona).items():
            ET.SubElement(code, "Code", guid=guid, name=qda_text(theme), isCodable="true")


def qda_selections(
    text: str, passages: list[Passage], source: str, personas: list[JSON], job_id: str, stamp: dict[str, str]
) -> list[Any]:
    """The coded selections of a source's `text` (its key `source`): one per span, coded with each persona
    that found it there and each theme it names."""
    from xml.etree import ElementTree as ET

    spans: dict[tuple[int, int], list[Passage]] = {}
    for passage in passages:
        if passage.source == source:
            spans.setdefault((passage.start, passage.end), []).append(passage)
    selections = []
    for (start, end), here in sorted(spans.items()):
        covered = text[start:end]
        selection = ET.Element(
            "PlainTextSelection",
            {
                "guid": qda_guid(job_id, "selection", source, str(start), str(end)),
                "name": qda_text(selection_name(covered)),
                "startPosition": str(start),
                "endPosition": str(end),
                **stamp,
            },
        )
        ET.SubElement(selection, "Description").text = qda_text(
            "; ".join(f"{EVIDENCE_FIELDS[p.field]} of {personas[p.persona]['name']}" for p in here)
        )
        codes = {qda_guid(job_id, "persona", str(p.persona)): None for p in here}
        for p in here:
            codes.update(
                (guid, None)
                for theme, guid in theme_codes(job_id, p.persona, personas[p.persona]).items()
                if mentions(covered, theme)
            )
        for code in codes:
            coding = ET.SubElement(
                selection, "Coding", {"guid": qda_guid(job_id, "coding", source, str(start), str(end), code), **stamp}
            )
            ET.SubElement(coding, "CodeRef", targetGUID=code)
        selections.append(selection)
    return selections


def zip_member(name: str, when: str) -> Any:
    """An archive member dated by the job (`when`, ISO 8601), not by the clock: one job, one export, byte for byte."""
    import zipfile

    stamp = datetime.strptime(when[:19], "%Y-%m-%dT%H:%M:%S")
    member = zipfile.ZipInfo(name, date_time=stamp.timetuple()[:6])
    member.compress_type = zipfile.ZIP_DEFLATED
    return member


def project_bytes(project: Any) -> bytes:
    from xml.etree import ElementTree as ET

    return ET.tostring(project, encoding="utf-8", xml_declaration=True)


def personas_qdpx(personas: list[JSON], metadata: JSON, dataset: Dataset | None, when: str) -> bytes:
    """The personas as a REFI-QDA project (.qdpx) over the words they were drawn from."""
    import zipfile
    from xml.etree import ElementTree as ET

    job_id = metadata["job_id"]
    found = evidence_sources(personas, dataset)
    user, user_name = qda_user(metadata)
    stamp = {"creatingUser": user, "creationDateTime": when}
    project = ET.Element(
        "Project",
        xmlns=QDA_PROJECT_NS,
        name=qda_text(f"Personas from {metadata.get('source', {}).get('location', 'inline data')}"),
        origin=f"Persona {__version__}",
        creatingUserGUID=user,
        creationDateTime=when,
    )
    ET.SubElement(ET.SubElement(project, "Users"), "User", guid=user, name=qda_text(user_name), id="persona")
    qda_codebook(personas, job_id, ET.SubElement(ET.SubElement(project, "CodeBook"), "Codes"))
    members: dict[str, list[int]] = {}  # each participant with its personas (a model's may share one)
    for number, persona in enumerate(personas):
        for pid in dict.fromkeys(persona.get("evidence", {}).get("participants", [])):
            if pid in found.people:
                members.setdefault(pid, []).append(number)
    keys = sorted({key for pid in members for key in found.people[pid].attributes})
    variables = {key: qda_guid(job_id, "variable", key) for key in keys}
    if variables:
        holder = ET.SubElement(project, "Variables")
        labels = dataset.labels if dataset is not None else {}
        for key, guid in variables.items():
            name = qda_text(question_text(key, labels))
            ET.SubElement(holder, "Variable", guid=guid, name=name, typeOfVariable="Text")
    sources = {name: qda_guid(job_id, "source", name) for name in found.texts}
    if members:
        holder = ET.SubElement(project, "Cases")
        for pid, numbers in members.items():
            case = ET.SubElement(holder, "Case", guid=qda_guid(job_id, "case", pid), name=qda_text(pid))
            for number in numbers:
                ET.SubElement(case, "CodeRef", targetGUID=qda_guid(job_id, "persona", str(number)))
            for key, value in found.people[pid].attributes.items():
                entry = ET.SubElement(case, "VariableValue")
                ET.SubElement(entry, "VariableRef", targetGUID=variables[key])
                ET.SubElement(entry, "TextValue").text = qda_text(value)
            if pid in sources:
                ET.SubElement(case, "SourceRef", targetGUID=sources[pid])
    if sources:
        holder = ET.SubElement(project, "Sources")
        for name, guid in sources.items():
            source = ET.SubElement(
                holder,
                "TextSource",
                {"guid": guid, "name": qda_text(name), "plainTextPath": f"internal://{guid}.txt", **stamp},
            )
            source.extend(qda_selections(found.texts[name], found.passages, name, personas, job_id, stamp))
    summary = f"{len(personas)} personas by {user_name}, job {job_id}."
    if not found.read_again:
        summary += " The job's source could not be read again, so each persona's quotes and items are its source."
    ET.SubElement(project, "Description").text = summary
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(zip_member("project.qde", when), project_bytes(project))
        for name, guid in sources.items():
            archive.writestr(zip_member(f"sources/{guid}.txt", when), found.texts[name].encode("utf-8"))
    return out.getvalue()


def personas_onto_project(personas: list[JSON], metadata: JSON, raw: bytes, name: str, when: str) -> bytes:
    """The researcher's own project (.qdpx) with the personas added: Persona as a user, its codes beside
    hers, each case coded with its persona, and a coded selection on her own source for each quote and
    item found there. Everything of hers is kept as it was."""
    import zipfile
    from xml.etree import ElementTree as ET

    archive, budget = open_archive(raw, name, ".qdpx"), OfficeBudget(name)
    part = qda_project_part(archive, name)
    project = read_qda_project(archive, part, budget)  # streamed first: it refuses a document type and entities
    texts = {s.guid: text for s in project.sources if (text := qda_source_text(archive, s, budget)) is not None}
    texts_of: dict[str, list[tuple[str, str]]] = {}
    for speaker, _, spoken in qda_speakers(project, texts):
        texts_of.setdefault(speaker, []).extend((source.guid, texts[source.guid]) for source in spoken)
    _, passages = found_passages(personas, texts_of)
    job_id = metadata["job_id"]
    user, user_name = qda_user(metadata)
    stamp = {"creatingUser": user, "creationDateTime": when}
    root = in_project_namespace(ET.fromstring(archive.read(part)), name)
    users = child_in_order(root, "Users")
    ET.SubElement(users, "User", guid=user, name=qda_text(user_name), id="persona")
    codebook = child_in_order(root, "CodeBook")
    codes = codebook.find("Codes")
    qda_codebook(personas, job_id, codes if codes is not None else ET.SubElement(codebook, "Codes"))
    personas_of: dict[str, list[int]] = {}  # a model's personas may share a participant
    for number, persona in enumerate(personas):
        for pid in dict.fromkeys(persona.get("evidence", {}).get("participants", [])):
            personas_of.setdefault(pid, []).append(number)
    for entry in root.iter("Case"):
        for number in personas_of.get(entry.get("name", ""), []):
            ref = ET.Element("CodeRef", targetGUID=qda_guid(job_id, "persona", str(number)))
            entry.insert(sum(child.tag in ("Description", "CodeRef") for child in entry), ref)
    for element in root.iter("TextSource"):
        guid = element.get("guid", "")
        if guid in texts:
            place = sum(
                child.tag in (t for t in ("Description", "PlainTextContent", "PlainTextSelection")) for child in element
            )
            for offset, selection in enumerate(qda_selections(texts[guid], passages, guid, personas, job_id, stamp)):
                element.insert(place + offset, selection)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as copy:
        for member in archive.infolist():
            if member.filename != part:
                budget.unpack(member.file_size)
                copy.writestr(member, archive.read(member))
        copy.writestr(zip_member(part, when), project_bytes(root))
    return out.getvalue()


PROJECT_ORDER = (
    "Users",
    "CodeBook",
    "Variables",
    "Cases",
    "Sources",
    "Notes",
    "Links",
    "Sets",
    "Graphs",
    "Description",
)


def in_project_namespace(root: Any, name: str) -> Any:
    """A parsed project file with its elements' names in the project namespace written plain, as the
    ones Persona adds are; the root declares the namespace for all of them."""
    prefix = f"{{{QDA_PROJECT_NS}}}"
    if root.tag != f"{prefix}Project":
        raise GenerationError(f"{name}'s project file is not in the namespace {QDA_PROJECT_NS}")
    for element in root.iter():
        if isinstance(element.tag, str) and element.tag.startswith(prefix):
            element.tag = element.tag.removeprefix(prefix)
    root.set("xmlns", QDA_PROJECT_NS)
    return root


def child_in_order(root: Any, tag: str) -> Any:
    """`root`'s <tag>, made where the schema's order puts it if the project has none."""
    from xml.etree import ElementTree as ET

    found = root.find(tag)
    if found is not None:
        return found
    after = PROJECT_ORDER[PROJECT_ORDER.index(tag) + 1 :]
    place = next((i for i, child in enumerate(root) if child.tag in after), len(root))
    element = ET.Element(tag)
    root.insert(place, element)
    return element


def qdpx_export(
    personas: list[JSON], metadata: JSON, dataset: Dataset | None, own: tuple[bytes, str] | None, when: str
) -> bytes:
    """The QDA project export: onto her own project (`own`, its bytes and name) where the job read one
    and it can be written as the standard says, else a project of Persona's own."""
    import zipfile

    if own is not None:
        try:
            return personas_onto_project(personas, metadata, *own, when)
        except (GenerationError, ValueError, OSError, zipfile.BadZipFile):  # outside the standard, or damaged
            pass
    return personas_qdpx(personas, metadata, dataset, when)


def personas_qdc(personas: list[JSON], metadata: JSON) -> bytes:
    """The personas and their themes as a REFI-QDA codebook (.qdc), to code with in a QDA tool."""
    from xml.etree import ElementTree as ET

    codebook = ET.Element("CodeBook", xmlns=QDA_CODEBOOK_NS, origin=f"Persona {__version__}")
    qda_codebook(personas, metadata["job_id"], ET.SubElement(codebook, "Codes"))
    return ET.tostring(codebook, encoding="utf-8", xml_declaration=True)


def coded_segments_csv(personas: list[JSON], dataset: Dataset | None) -> str:
    """One row per quote or item found in the data: its source, participant and their attributes, its
    text, persona and themes, and the researcher's own codes on it where her project had them."""
    found = evidence_sources(personas, dataset)
    keys = sorted(
        {key for passage in found.passages for key in found.people.get(passage.source, Participant("")).attributes}
    )
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    labels = dataset.labels if dataset is not None else {}
    questions = [question_text(key, labels) for key in keys]
    writer.writerow(["source", "participant", *questions, "kind", "text", "start", "end", "persona", "themes", "codes"])
    for passage in found.passages:
        persona = personas[passage.persona]
        person = found.people.get(passage.source)
        text = found.texts[passage.source][passage.start : passage.end]
        attributes = person.attributes if person is not None else {}
        themes = [theme for theme in persona.get("themes", []) if isinstance(theme, str) and mentions(text, theme)]
        codes = codes_on(person, found.texts[passage.source], (passage.start, passage.end)) if person else []
        row = [
            dataset.source.get("location", "") if dataset is not None else "",
            passage.source if person is not None else "",
            *(attributes.get(key, "") for key in keys),
            EVIDENCE_FIELDS[passage.field],
            text,
            passage.start,
            passage.end,
            persona_code_name(persona),
            "; ".join(themes),
            "; ".join(codes),
        ]
        writer.writerow([spreadsheet_cell(value) for value in row])
    return "\ufeff" + out.getvalue()


# ---------------------------------------------------------------------------
# Generation: one job from request to output folder
# ---------------------------------------------------------------------------


def pick_provider(request: JSON) -> str:
    """The request's provider, else PERSONA_PROVIDER, else the first with a key, else local."""
    if request.get("provider"):
        return request["provider"]
    if os.environ.get("PERSONA_PROVIDER"):
        return os.environ["PERSONA_PROVIDER"].strip().lower()
    keyed = (name for name in ("anthropic", "openai", "gemini") if provider_key(PROVIDER_SPECS[name]))
    return next(keyed, "local")


def resolve_provider(request: JSON, need_key: bool = True) -> str:
    """Refuse at submission a provider that cannot run here, saying what to do (an estimate needs no key)."""
    provider = pick_provider(request)
    if provider not in PROVIDER_NAMES:
        raise APIError(
            400, f"PERSONA_PROVIDER names an unknown provider {provider!r}; use one of: {', '.join(PROVIDER_NAMES)}"
        )
    if provider == "local":
        if request.get("model") not in (None, LOCAL_MODEL):
            raise validation_failed({"model": f"must be {LOCAL_MODEL!r} for provider 'local'"})
        return provider
    spec = PROVIDER_SPECS[provider]
    if need_key and spec.key_variables and provider_key(spec) is None:
        raise APIError(
            400,
            f"provider {provider!r} needs an API key: set {' or '.join(spec.key_variables)} "
            "in the environment Persona runs in",
            {"provider": provider},
        )
    return provider


def redact_by_default(request: JSON, mode: str) -> None:
    """PERSONA_REDACT applies at submission, wherever the job runs: `on` to a request that does not say,
    `required` to every request, whatever its config.redact says."""
    config = request.get("config", {})
    if mode == "required" or (mode == "on" and "redact" not in config):
        request["config"] = {**config, "redact": True}


def check_llm_options(request: JSON) -> None:
    """config.instruction and config.fields ask a model for something; the offline engine refuses them, by name.

    A custom field may not take a standard field's name, nor be given twice.
    """
    config = request.get("config", {})
    problems = {}
    if request["provider"] == "local":
        problems = {
            f"config.{key}": "needs an LLM provider; the offline engine builds personas from the data alone"
            for key in ("instruction", "fields")
            if key in config
        }
    seen: set[str] = set()
    for index, item in enumerate(config.get("fields", [])):
        name = item["name"]
        if name in RESERVED_FIELD_NAMES:
            problems[f"config.fields[{index}].name"] = f"{name!r} is a standard persona field; choose another name"
        elif name in seen:
            problems[f"config.fields[{index}].name"] = f"{name!r} is given twice"
        seen.add(name)
    if problems:
        raise validation_failed(problems)


def grouping_key(wanted: str, dataset: Dataset) -> str:
    """The attribute `group_by` names, however a researcher names it: its key, its column's code or
    question text, or a grid item's text. A name that matches none is left for the engine to refuse."""
    keys = sorted({key for person in dataset.participants for key in person.attributes})
    if normalise_key(wanted) in keys:
        return wanted
    for key in keys:
        label = dataset.labels.get(key, "")
        grid = grid_parts(label)
        if squash(wanted) in {
            squash(name) for name in (label, question_text(key, dataset.labels), grid and grid[1]) if name
        }:
            return key
    return wanted


def group_count(key: str, dataset: Dataset) -> int:
    """How many groups `group_by` makes of the data."""
    return len({value for person in dataset.participants if (value := attribute_value(person, key)) is not None})


def grouping_warnings(key: str, dataset: Dataset, count: int) -> list[str]:
    """Say so when the grouping has more groups than personas asked for: the smallest are left out."""
    groups = group_count(key, dataset)
    if groups <= count:
        return []
    return [
        f"{groups} groups, personas for the {count} largest; ask for {min(groups, 20)} to see "
        f"{'all' if groups <= 20 else 'the 20 largest'}"
    ]


def with_answers(personas: list[JSON], dataset: Dataset, grouped_by: str | None = None) -> list[JSON]:
    """Every persona carries the closed answers that set its participants apart, whichever engine made it;
    and where the researcher coded the data, her codes its participants carry and those on each quote."""
    known = {person.id: person for person in dataset.participants}
    for persona in personas:
        evidence = persona.setdefault("evidence", {})
        members = [known[pid] for pid in dict.fromkeys(evidence.get("participants", [])) if pid in known]
        if "answers" not in evidence:
            evidence["answers"] = closed_answers(members, dataset.participants, dataset.labels, grouped_by)
        if any(person.coded for person in members):
            evidence["codes"] = carried_codes(members)
            evidence["quote_codes"] = [quote_codes(quote, members) for quote in persona.get("quotes", [])]
    return personas


CODEBOOK_FINDINGS = 8  # a persona names at most this many of the codebook's themes, those that set it apart most


def with_codebook(personas: list[JSON], people: list[Participant], themes: list[CodebookTheme]) -> list[str]:
    """Each persona names the codebook's themes its participants speak of (a sentence holding the theme's
    name, or one of its sub-codes'), those that set it apart most first, whichever engine made it; a
    warning names the themes no participant speaks of."""
    said = SaidIndex(people)
    speakers = {theme.name: said.speakers(theme.name) for theme in themes}
    for theme in reversed(themes):  # sub-codes come after their parent: each passes its speakers up
        if theme.parent in speakers:
            speakers[theme.parent] |= speakers[theme.name]
    index = {person.id: number for number, person in enumerate(people)}
    for persona in personas:
        evidence = persona.setdefault("evidence", {})
        members = {index[pid] for pid in evidence.get("participants", []) if pid in index}
        others = len(people) - len(members)
        found: list[JSON] = [
            {
                "theme": theme.name,
                "count": len(speakers[theme.name] & members),
                "of": len(members),
                "share_elsewhere": round(len(speakers[theme.name] - members) / others, 4) if others else 0.0,
            }
            for theme in themes
            if speakers[theme.name] & members
        ]
        found.sort(key=lambda f: (f["share_elsewhere"] - f["count"] / f["of"], -f["count"], f["theme"]))
        evidence["codebook"] = found[:CODEBOOK_FINDINGS]
    unheard = [theme.name for theme in themes if not speakers[theme.name]]
    if not unheard:
        return []
    return [
        f"{len(unheard)} of the codebook's {len(themes)} themes are in no participant's words: {named_list(unheard)}"
    ]


def carried_codes(members: list[Participant]) -> list[JSON]:
    """The researcher's codes a persona's participants carry, most carried first: `{"code", "count", "of"}`."""
    carried = Counter(name for person in members for name in {n for names in person.coded.values() for n in names})
    ranked = sorted(carried.items(), key=lambda item: (-item[1], item[0]))
    return [{"code": name, "count": count, "of": len(members)} for name, count in ranked]


def quote_codes(quote: str, members: list[Participant]) -> list[str]:
    """Her codes on the passages a quote overlaps, in the words of whichever participant said it."""
    for person in members:
        text = plain_source_text(person)
        span = locate(text, quote)
        if span is not None:
            return codes_on(person, text, span)
    return []


def codes_on(person: Participant, text: str, span: tuple[int, int]) -> list[str]:
    """Her codes on the coded passages of `person` that overlap `span` of their text."""
    names: list[str] = []
    for passage, codes in person.coded.items():
        at = locate(text, passage)
        if at is not None and at[0] < span[1] and span[0] < at[1]:
            names += codes
    return list(dict.fromkeys(names))


async def job_dataset(
    request: JSON, settings: Settings, fetched: Fetched | None = None
) -> tuple[Dataset, Redactor | None]:
    """A job's data: its source, then each source its refinements added, read together; and its redactor, if asked.

    Each source is redacted in turn, before they are merged, so that a refinement numbers
    its parent's values as its parent did.
    """
    sources = [request["data"], *request.get("refine", {}).get("more_data", [])]
    if len(sources) > 1:  # a chain of refinements reads every source again: together they stay under the cap
        await asyncio.to_thread(check_sources_size, sources, settings)
    datasets = [await load_data(source, settings, fetched) for source in sources]
    redactor = None
    if request.get("config", {}).get("redact"):  # before any provider sees the data, and so in every output
        redactor = Redactor(set().union(*(dataset.names for dataset in datasets)))
        datasets = [await asyncio.to_thread(redactor.dataset, dataset) for dataset in datasets]
    return functools.reduce(merged_datasets, datasets), redactor


async def generate(
    job_id: str,
    request: JSON,
    experiment_id: str,
    settings: Settings,
    report: ProgressReport,
    begin: Callable[[], Awaitable[None]] | None = None,
    created_at: str | None = None,
) -> JSON:
    """Run one job: load, cluster, build personas, write outputs. Returns the job's result.

    Its data URLs are fetched first; then an offline job holds one of the process's engine
    slots from reading to its quality report, so a slow data server delays only its own
    job. `begin` is told when the work really starts, fetching or reading (a crash before
    then, while waiting for a slot, spends none of the job's attempts).
    """
    provider = request.get("provider") or pick_provider(request)
    sources = [request["data"], *request.get("refine", {}).get("more_data", [])]
    if any(isinstance(s, str) and classify_data(s) == "url" for s in sources):
        if begin is not None:
            await begin()  # fetching is the job's work: it begins now, and begins once
            begin = None
        await report(PROGRESS["fetching"], "fetching the data")
    fetched = await fetch_sources(sources, settings)
    async with engine_slot() if provider == "local" else contextlib.nullcontext():
        if begin is not None:
            await begin()
        return await generate_with(provider, job_id, request, experiment_id, settings, report, created_at, fetched)


def steered_request(request: JSON, dataset: Dataset, redactor: Redactor | None, count: int) -> JSON:
    """The request as the engine and the model read it: what else the researcher gave is redacted
    as the data was, and `group_by` names the attribute as the data holds it."""
    config, refine = request.get("config", {}), request.get("refine")
    if redactor is not None:
        if refine:
            refine = {**refine, "parent_personas": redactor.value(refine["parent_personas"])}
        if "groups" in config:
            groups = {name: [redactor.text(pid) for pid in ids] for name, ids in config["groups"].items()}
            config = {**config, "groups": groups}
        request = {**request, "config": config, **({"refine": refine} if refine else {})}
    if config.get("group_by") is not None:
        config = {**config, "group_by": grouping_key(config["group_by"], dataset)}
        request = {**request, "config": config}
        dataset.warnings += grouping_warnings(config["group_by"], dataset, count)
    return request


@dataclass
class MadePersonas:
    """Personas and how they were made: the engine's settings, the model, its usage and exchanges."""

    personas: list[JSON]
    warnings: list[str]
    model: str
    usage: JSON
    engine: JSON
    exchanges: list[JSON] = field(default_factory=list)


async def made_personas(
    provider: str, dataset: Dataset, request: JSON, count: int, report: ProgressReport
) -> MadePersonas:
    """The personas of the offline engine or of a model, continued from the parent's when refining."""
    config, refine = request.get("config", {}), request.get("refine")
    engine: JSON = {
        "count": count,
        "complexity": config_value(config, "complexity"),
        "detail_level": config_value(config, "detail_level"),
    }
    if provider == "local":
        await report(PROGRESS["segments"], "grouping the participants")
        reports = InOrder()
        personas, warnings = await reports.after(
            run_engine(
                dataset.participants,
                offline_personas,
                dataset,
                count,
                config,
                news=lambda written: reports.add(report(*written_report(*written))),
            )
        )
        made = MadePersonas(
            personas,
            warnings,
            LOCAL_MODEL,
            {"input_tokens": 0, "output_tokens": 0, "calls": 0},
            {**engine, "name": "tfidf-kmeans"},
        )
    else:
        personas, details = await llm_personas(dataset, request, provider, report)
        options = ("temperature", "max_tokens", "max_input_tokens", "instruction", "fields")
        engine.update(
            name="llm", strategy=details["strategy"], **{key: config[key] for key in options if key in config}
        )
        made = MadePersonas(
            personas, details["warnings"], details["model"], details["usage"], engine, details["exchanges"]
        )
    if refine:
        made.personas = continued_personas(
            refine["parent_personas"], made.personas, keep_names="instruction" not in refine
        )
    made.personas = with_answers(made.personas, dataset, config.get("group_by"))
    if config.get("codebook"):
        made.warnings += with_codebook(made.personas, dataset.participants, config["codebook"])
    return made


async def measured_quality(provider: str, made: MadePersonas, dataset: Dataset, count: int, config: JSON) -> JSON:
    """The quality report, with stability where the grouping is Persona's own (an offline job holds its slot)."""
    people = dataset.participants
    async with engine_slot() if provider != "local" else contextlib.nullcontext():
        quality = await run_engine(people, quality_report, people, made.personas, dataset.silent)
        if made.engine.get("name") == "tfidf-kmeans" or made.engine.get("strategy") == "segmented":
            grouping = made.personas if provider == "local" else None
            quality["stability"] = await run_engine(
                people, grouping_stability, people, count, config, grouping, dataset.labels
            )
    return quality


async def generate_with(
    provider: str,
    job_id: str,
    request: JSON,
    experiment_id: str,
    settings: Settings,
    report: ProgressReport,
    created_at: str | None,
    fetched: Fetched | None = None,
) -> JSON:
    """Read the data, make the personas, measure them, write the output folder: the job's result."""
    started = time.perf_counter()
    count = request.get("count", DEFAULT_COUNT)
    await report(PROGRESS["loading"], "loading data")
    dataset, redactor = await job_dataset(request, settings, fetched)
    request = steered_request(request, dataset, redactor, count)
    if isinstance(request.get("config", {}).get("codebook"), str):
        themes = await asyncio.to_thread(load_codebook, request["config"]["codebook"], settings.data_dir)
        request = {**request, "config": {**request["config"], "codebook": themes}}
    loaded = time.perf_counter()
    await report(PROGRESS["loaded"], f"loaded {len(dataset.participants)} participants")
    made = await made_personas(provider, dataset, request, count, report)
    await report(PROGRESS["quality"], "measuring quality")
    quality = await measured_quality(provider, made, dataset, count, request.get("config", {}))
    built = time.perf_counter()
    await report(PROGRESS["built"], "personas built")
    metadata: JSON = {
        "job_id": job_id,
        "provider": provider,
        "model": made.model,
        "engine": made.engine,
        "source": dataset.source,
        "experiment_id": experiment_id,
        "version": __version__,
        "created_at": utc_now(),
        "timings": {"load_s": round(loaded - started, 4), "generate_s": round(built - loaded, 4)},
        "usage": made.usage,
        "warnings": dataset.warnings + made.warnings,
        "quality": quality,
    }
    if redactor is not None:
        metadata["redaction"] = dict(redactor.counts)
    if request.get("config", {}).get("name"):
        metadata["name"] = request["config"]["name"]
    folder = output_folder(settings.output_dir, job_id, created_at)
    output_path = await asyncio.to_thread(write_outputs, folder, made.personas, metadata, made.exchanges)
    metadata["timings"]["total_s"] = round(time.perf_counter() - started, 4)
    await report(PROGRESS["written"], "outputs written")
    result = {
        "personas": made.personas,
        "experiment_id": experiment_id,
        "output_path": output_path,
        "metadata": metadata,
    }
    refine = request.get("refine")
    if refine:
        changes = persona_changes(refine["parent_personas"], made.personas)
        result.update(parent_job_id=refine["parent_job_id"], changes=changes)
    return result


# ---------------------------------------------------------------------------
# Background work: who this worker is, the claim loops and the job runner
# ---------------------------------------------------------------------------


def claimer_is_gone(claimed_by: str, idle: float | None, lease: float = LEASE_S) -> bool:
    """A claimer is gone when its lease lapsed (`idle` seconds since it was last heard).

    On this host, it is also gone when its process died."""
    if idle is None or idle > lease:
        return True
    host, _, rest = claimed_by.partition(":")
    pid = rest.partition(":")[0]
    return host == this_host() and pid.isdigit() and not pid_alive(int(pid))


class ClaimLoop:
    """A loop that claims work from the shared database and runs each piece as a task.

    Several processes may share the database; a claim is a single UPDATE, so each piece
    of work goes to exactly one of them. Subclasses say what to claim, what upkeep to
    do every few seconds, and how to hand back work cut short by a stop.
    """

    name = "claim-loop"

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.worker_id = worker_identity()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.stopping = False
        self.wakeup = asyncio.Event()
        self.loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.loop_task = asyncio.create_task(self._loop(), name=f"persona-{self.name}")

    def alive(self) -> bool:
        return self.loop_task is not None and not self.loop_task.done()

    async def stop(self) -> None:
        """Stop claiming, and hand back work cut short so a restart picks it up at once."""
        self.stopping = True
        if self.loop_task is not None:
            self.loop_task.cancel()
            await asyncio.gather(self.loop_task, return_exceptions=True)
        cut_short = list(self.tasks)
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        for key in cut_short:
            try:
                await self.release(key)
            except Exception as exc:  # the claim lapses instead, and the work is done again
                log.warning(
                    "%s: could not hand back %s (%s); its claim will lapse",
                    self.name,
                    key,
                    getattr(exc, "reason", type(exc).__name__),
                )

    async def release(self, key: str) -> None:
        """Hand back one piece of work that a stop cut short."""
        raise NotImplementedError

    def track(self, key: str, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks[key] = task
        task.add_done_callback(lambda _: self._done(key))

    def _done(self, key: str) -> None:
        self.tasks.pop(key, None)
        self.wakeup.set()

    async def _loop(self) -> None:
        last_upkeep = 0.0
        while True:
            self.wakeup.clear()
            try:
                if time.monotonic() - last_upkeep >= HEARTBEAT_S:
                    await self._upkeep()
                    last_upkeep = time.monotonic()
                await self._claim()
            except StorageUnavailable as exc:
                log.warning("%s: %s; trying again", self.name, exc.reason)
            except Exception:
                log.exception("%s: database trouble; trying again", self.name)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):  # no helper task, so a stop cancels it cleanly
                    await self.wakeup.wait()

    async def _upkeep(self) -> None:
        raise NotImplementedError

    async def _claim(self) -> None:
        raise NotImplementedError

    async def save(self, write: Callable[[], Awaitable[Any]], what: str) -> Any:
        """Write the outcome of a piece of work, waiting out a database that refuses writes; the write's answer.

        Until written the outcome lives only here, so it is kept and tried again; if the
        server stops meanwhile, its claim lapses and the work is done again elsewhere (None).
        """
        delay = 0.5
        while True:
            try:
                return await write()
            except StorageUnavailable as exc:
                log.warning("%s: cannot save %s yet (%s); trying again in %g s", self.name, what, exc.reason, delay)
            except Exception:  # not a passing trouble: the claim lapses and the work is done again
                log.exception("%s: cannot save %s; its claim is left to lapse", self.name, what)
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, SAVE_RETRY_MAX_S)


class JobRunner(ClaimLoop):
    """Claims pending jobs and runs them in this process."""

    name = "job-runner"

    def __init__(self, store: Store, settings: Settings, on_finished: Callable[[], None]) -> None:
        super().__init__(store, settings)
        self.on_finished = on_finished  # a finished job has deliveries to send
        self.begun: set[str] = set()  # jobs whose work began here: their attempt is counted
        self.retained_at = -math.inf  # when the retention settings were last applied (monotonic)

    async def release(self, key: str) -> None:
        """A stop is not the job's fault: the attempt it was on, if it began, is given back."""
        await self.store.release_job(key, self.worker_id, key in self.begun)
        self.begun.discard(key)

    def wake(self) -> None:
        """A job is waiting; worth a look only with a free slot (a finished job frees one)."""
        if len(self.tasks) < JOBS_PER_PROCESS:
            self.wakeup.set()

    def cancel_local(self, job_id: str) -> None:
        task = self.tasks.get(job_id)
        if task is not None:
            task.cancel()

    async def _upkeep(self) -> None:
        still_mine = await self.store.heartbeat(self.worker_id, list(self.tasks))
        for job_id in [job_id for job_id in self.tasks if job_id not in still_mine]:
            self.cancel_local(job_id)  # cancelled through another process: its computation stops here too
        for job_id, status in await self.store.requeue_orphans(self.worker_id, claimer_is_gone):
            log.warning("job %s was interrupted by a stopped server; now %s", job_id, status)
        await self.store.purge_expired()
        if time.monotonic() - self.retained_at >= RETENTION_EVERY_S:
            self.retained_at = time.monotonic()
            await self.apply_retention()

    async def apply_retention(self) -> None:
        """The retention settings: old finished jobs go with their deliveries and folders; old attempts go."""
        await self.store.trim_attempts(self.settings.attempts_kept)
        if not self.settings.retention_days:
            return
        await asyncio.to_thread(remove_old_uploads, self.settings.data_dir, self.settings.retention_days)
        cutoff = epoch_to_iso(time.time() - self.settings.retention_days * 86400)
        while True:
            deleted, paths = await self.store.purge_finished_jobs(cutoff, RETENTION_BATCH)
            await asyncio.to_thread(remove_output_folders, self.settings.output_dir, paths)
            if deleted < RETENTION_BATCH:
                break

    async def _claim(self) -> None:
        while len(self.tasks) < JOBS_PER_PROCESS:
            job = await self.store.claim_job(self.worker_id)
            if job is None:
                return
            self.track(
                job["job_id"], self._execute(job["job_id"], job["request"], job["experiment_id"], job["created_at"])
            )

    async def _report(self, job_id: str, progress: int, stage: str) -> None:
        """Record progress; a write the database refuses only loses this step of it."""
        log.debug("job %s: %d%% %s", job_id, progress, stage)
        try:
            still_running = await self.store.set_progress(job_id, self.worker_id, progress)
        except StorageUnavailable:
            return
        if not still_running:
            raise JobCancelled(job_id)

    async def _begin(self, job_id: str) -> None:
        """The job's work starts now: count the attempt (claimed jobs waiting for a slot spend none).

        A database that refuses writes (a full disk) is waited out, as a finished job's result is."""
        begin = functools.partial(self.store.begin_attempt, job_id, self.worker_id)
        if not await self.save(begin, f"the start of job {job_id}"):
            raise JobCancelled(job_id)
        self.begun.add(job_id)

    async def _execute(self, job_id: str, request: JSON, experiment_id: str, created_at: str) -> None:
        async def report(progress: int, stage: str) -> None:
            await self._report(job_id, progress, stage)

        try:
            result = await generate(
                job_id,
                request,
                experiment_id,
                self.settings,
                report,
                functools.partial(self._begin, job_id),
                created_at,
            )
        except JobCancelled:
            self.begun.discard(job_id)
            return
        except asyncio.CancelledError:  # a stop releases the job (and needs to know it began); a cancel does not
            if not self.stopping:
                self.begun.discard(job_id)
            raise
        except GenerationError as exc:
            finish = functools.partial(self.store.fail_job, job_id, self.worker_id, str(exc))
        except Exception:
            log.exception("job %s failed unexpectedly", job_id)
            error = "internal error while generating personas; see the server log"
            finish = functools.partial(self.store.fail_job, job_id, self.worker_id, error)
        else:
            finish = functools.partial(self.store.complete_job, job_id, self.worker_id, result)
        await self.save(finish, f"job {job_id}")
        self.begun.discard(job_id)
        self.on_finished()


# ---------------------------------------------------------------------------
# Webhooks: signed deliveries from the outbox, retried with backoff
# ---------------------------------------------------------------------------

RETRY_AFTER_CAP_S = 24 * 3600  # a receiver's Retry-After is honoured up to a day


def persona_signature(secret: str, body: bytes) -> str:
    """The reference's X-Persona-Signature: hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def standard_signature(secret: str, delivery_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks' `v1,<base64 HMAC of id.timestamp.body>`.

    A `whsec_` secret is base64 as that scheme defines; any other secret is used as its
    UTF-8 bytes (a receiver's library takes it as base64 of those bytes).
    """
    key = base64.b64decode(secret[6:]) if secret.startswith("whsec_") else secret.encode()
    mac = hmac.new(key, f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def delivery_headers(delivery_id: str, event: str, secret: str | None, body: bytes, timestamp: int) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"Persona-Webhooks/{__version__}",
        "X-Persona-Event": event,
        "X-Persona-Delivery": delivery_id,
        "X-Persona-Timestamp": str(timestamp),
        "webhook-id": delivery_id,
        "webhook-timestamp": str(timestamp),
    }
    if secret:
        headers["X-Persona-Signature"] = persona_signature(secret, body)
        headers["webhook-signature"] = standard_signature(secret, delivery_id, timestamp, body)
    return headers


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header, either form, or None."""
    if not value:
        return None
    if value.strip().isdigit():
        return min(float(value), RETRY_AFTER_CAP_S)
    with contextlib.suppress(TypeError, ValueError):
        from email.utils import parsedate_to_datetime

        return min(max(0.0, parsedate_to_datetime(value).timestamp() - time.time()), RETRY_AFTER_CAP_S)
    return None


def retry_delay(schedule: tuple[float, ...], attempts_done: int, retry_after: float | None) -> float | None:
    """Seconds until the next attempt (the schedule with ±10% jitter), or None when it is spent."""
    if attempts_done > len(schedule):
        return None
    delay = schedule[attempts_done - 1] * random.uniform(0.9, 1.1)
    return max(delay, retry_after) if retry_after is not None else delay


class WebhookDispatcher(ClaimLoop):
    """Sends due deliveries from the outbox, a bounded number at a time.

    A receiver that hangs holds one slot until its timeout, never the others, and
    never the API.
    """

    name = "webhooks"

    def wake(self) -> None:
        self.wakeup.set()

    async def release(self, key: str) -> None:
        await self.store.release_delivery(key, self.worker_id)

    async def _upkeep(self) -> None:
        """Deliveries claimed by a process that died go back to the outbox."""
        lease = max(LEASE_S, self.settings.webhook_timeout + HEARTBEAT_S)
        await self.store.release_orphan_deliveries(self.worker_id, functools.partial(claimer_is_gone, lease=lease))

    async def _claim(self) -> None:
        free = DELIVERIES_AT_ONCE - len(self.tasks)
        if free <= 0:
            return
        for delivery in await self.store.claim_deliveries(self.worker_id, free):
            self.track(delivery["delivery_id"], self._deliver(**delivery))

    async def _deliver(
        self, delivery_id: str, event: str, url: str, secret: str | None, payload: str, attempts: int
    ) -> None:
        body = payload.encode("utf-8")
        attempt = {"attempted_at": utc_now(), "http_status": None, "error": None, "duration_ms": 0}
        started = time.perf_counter()
        retry_after, final = None, False
        try:
            target, headers, extensions = await checked_target(url, self.settings.private_urls_allowed)
            headers.update(delivery_headers(delivery_id, event, secret, body, int(time.time())))
            async with (  # the timeout bounds the whole attempt: a receiver trickling its answer fails it
                asyncio.timeout(self.settings.webhook_timeout),
                outbound_request(
                    "POST", target, self.settings.webhook_timeout, content=body, headers=headers, extensions=extensions
                ) as response,
            ):
                attempt["http_status"] = response.status_code
                if response.status_code in (429, 503):
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
        except OutboundRefused as exc:
            attempt["error"], final = f"refused: {exc}", True
        except TimeoutError:  # past the timeout an attempt has failed, whatever came before
            attempt["http_status"], attempt["error"] = None, f"no answer within {self.settings.webhook_timeout:g} s"
        except Exception as exc:  # a receiver's failure is recorded, never raised
            attempt["error"] = describe_send_error(exc, self.settings.webhook_timeout)
        attempt["duration_ms"] = round((time.perf_counter() - started) * 1000)
        status, delay = self._outcome(attempt, attempts + 1, retry_after, final)
        await self.save(
            functools.partial(self.store.settle_delivery, delivery_id, self.worker_id, attempt, status, delay),
            f"delivery {delivery_id}",
        )

    def _outcome(self, attempt: JSON, attempts_done: int, retry_after: float | None, final: bool) -> tuple[str, float]:
        code = attempt["http_status"]
        if code is not None and 200 <= code < 300:
            return "delivered", 0.0
        if code == 410:
            attempt["error"] = "the receiver answered 410 Gone; not retried"
            final = True
        elif code is not None:
            attempt["error"] = f"the receiver answered HTTP {code}"
        delay = None if final else retry_delay(self.settings.webhook_retry_schedule, attempts_done, retry_after)
        if delay is None:
            return "failed", 0.0
        return "pending", delay


def describe_send_error(exc: Exception, timeout: float) -> str:
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, httpx.ConnectError):
        return "could not connect"
    if isinstance(exc, HostNotResolved):
        return str(exc)
    return f"request failed ({type(exc).__name__})"


# ---------------------------------------------------------------------------
# HTTP layer: limits and middleware
# ---------------------------------------------------------------------------

UNLIMITED_PATHS = frozenset({"/api/v1/health"})
JOB_ID = re.compile(r"^job-[0-9a-f]{12}$")
WEBHOOK_ID = re.compile(r"^webhook-[0-9a-f]{12}$")
EXPERIMENT_ID = re.compile(r"^exp-[0-9a-f]{12}$")
DELIVERY_ID = re.compile(r"^delivery-[0-9a-f]{12}$")
# A path segment that reads as a token: long, or of letters and digits together.
SECRET_SEGMENT = re.compile(r"[\w.+=~%-]{24,}|(?=[^/]*\d)(?=[^/]*[A-Za-z])[\w.+=~%-]{16,}|[^/]*[;=][^/]*")


class MemoryRateLimiter:
    """Fixed one-minute windows per client, in this process (one worker serves all)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.windows: dict[str, tuple[float, int]] = {}

    async def hit(self, client: str) -> tuple[int, float]:
        """Count one request; returns (requests in this window, when the window resets)."""
        now = time.time()
        start, hits = self.windows.get(client, (now, 0))
        if start + RATE_WINDOW_S <= now:
            start, hits = now, 0
        if len(self.windows) > 10000:
            self.windows = {key: value for key, value in self.windows.items() if value[0] + RATE_WINDOW_S > now}
        self.windows[client] = (start, hits + 1)
        return hits + 1, start + RATE_WINDOW_S


class SharedRateLimiter:
    """The same windows kept in the database, so that several workers share one limit."""

    def __init__(self, limit: int, store: Store) -> None:
        self.limit = limit
        self.store = store

    async def hit(self, client: str) -> tuple[int, float]:
        return await self.store.rate_hit(client)


class RateLimiter:
    """Counts in this process while it is its database's only server, in the database once others share it.

    Separate servers on one database then share one count. Workers of one server count in
    the database from the start: each knows the others are coming before they have joined.
    """

    def __init__(self, limit: int, store: Store) -> None:
        self.limit = limit
        self.alone, self.together, self.store = MemoryRateLimiter(limit), SharedRateLimiter(limit, store), store

    async def hit(self, client: str) -> tuple[int, float]:
        return await (self.together if self.store.others() else self.alone).hit(client)


def client_ip(scope: Scope) -> str:
    """The client's address as limits count it: an IPv6 client by its /64, which one host is usually given."""
    client = scope.get("client")
    if not client:
        return "unknown"
    if ":" not in client[0]:
        return client[0]
    try:
        ip = ipaddress.IPv6Address(client[0].split("%", 1)[0])
    except ValueError:
        return client[0]
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


async def send_envelope(send: Send, status: int, envelope: JSON, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """An error in the reference's envelope, sent by a middleware before any route runs."""
    body = json_bytes(envelope)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def request_host(scope: Scope) -> str | None:
    """The Host header's name, without its port or brackets, lower-case; None when there is none."""
    for name, value in scope.get("headers", ()):
        if name == b"host":
            host = value.decode("latin-1").strip().lower()
            if host.startswith("["):
                return host[1:].partition("]")[0]
            return host.rpartition(":")[0] if host.count(":") == 1 else host
    return None


@functools.lru_cache(maxsize=1024)
def is_loopback_address(host: str) -> bool:
    """`127.0.0.2` is; `127.0.0.1.nip.io`, a name that resolves there, is not.

    Remembered: every request asks it of the address it came in on, which is nearly always one."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HostCheckMiddleware:
    """A server on loopback answers only its own names: a web page cannot reach it by DNS rebinding.

    A rebinding page's requests carry its own host name, which no loopback name matches;
    other names a loopback server should answer (a tunnel, a container name) are given
    with --allowed-hosts. A server listening beyond loopback is reached by any name, and so
    is an app served in process (a test client has no socket).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings: Settings | None = scope["app"].state.settings if scope["type"] == "http" else None
        local = (scope.get("server") or ("",))[0]  # the address the connection came in on
        if settings is None or not settings.on_loopback or not is_loopback_address(str(local)):
            await self.app(scope, receive, send)
            return
        host = request_host(scope)
        if host is None or host in LOOPBACK_NAMES or is_loopback_address(host) or host in settings.allowed_hosts:
            await self.app(scope, receive, send)
            return
        await send_envelope(
            send,
            400,
            error_envelope(
                ERROR_CODES[400],
                f"Host {host[:100]!r} is not a name this server answers: a server on loopback answers "
                "localhost, 127.0.0.1 and [::1] (add others with --allowed-hosts)",
                {"host": host[:100]},
            ),
        )


class RateLimitMiddleware:
    """Per-IP request limit with the reference's headers; plain ASGI, no per-request task."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limiter = scope["app"].state.limiter if scope["type"] == "http" else None
        if limiter is None or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        hits, reset = await limiter.hit(client_ip(scope))
        headers = [
            (b"x-ratelimit-limit", str(limiter.limit).encode()),
            (b"x-ratelimit-remaining", str(max(0, limiter.limit - hits)).encode()),
            (b"x-ratelimit-reset", str(math.ceil(reset)).encode()),
        ]
        if hits > limiter.limit:
            await self._refuse(send, headers, max(1, math.ceil(reset - time.time())))
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    @staticmethod
    async def _refuse(send: Send, headers: list[tuple[bytes, bytes]], retry_after: int) -> None:
        envelope = error_envelope(
            "rate_limited", f"Rate limit exceeded. Retry after {retry_after} seconds.", {"retry_after": retry_after}
        )
        await send_envelope(send, 429, envelope, [*headers, (b"retry-after", str(retry_after).encode())])


# ---------------------------------------------------------------------------
# HTTP layer: request helpers
# ---------------------------------------------------------------------------


def state(request: Request) -> Any:
    return request.app.state


def request_header(request: Request, name: bytes) -> str | None:
    """A request header by its lowercase name; the first one if it is repeated.

    The headers become a dict once per request: Starlette's lookup scans the list on
    every call, and a submission asks for four. Surrounding spaces and tabs are no part
    of a field's value (RFC 9110, section 5.5), though the parser may leave them.
    """
    headers = request.scope.get("persona.headers")
    if headers is None:
        headers = request.scope["persona.headers"] = dict(reversed(request.scope["headers"]))
    value = headers.get(name)
    return None if value is None else value.decode("latin-1").strip(" \t")


def json_integer(digits: str) -> int:
    """An integer in a request body; one longer than Python reads is refused in plain words."""
    if len(digits) > sys.get_int_max_str_digits() > 0:
        raise APIError(400, f"The request body holds a number longer than {sys.get_int_max_str_digits()} digits")
    return int(digits)


BODY_DECODER = json.JSONDecoder(parse_int=json_integer)  # made once: json.loads() with options makes one per call


async def read_json(request: Request) -> JSON:
    """The body as a JSON object; refuses oversized bodies before reading them whole."""
    content_type = request_header(request, b"content-type") or ""
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise APIError(400, f"Content-Type must be application/json, got {content_type or 'none'!r}")
    declared = request_header(request, b"content-length") or ""
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise body_too_large()
    body = bytearray()
    more_body = True
    while more_body:  # the ASGI messages themselves: Starlette's stream() adds a generator per request
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        body += message.get("body", b"")
        if len(body) > MAX_BODY_BYTES:
            raise body_too_large()
        more_body = message.get("more_body", False)
    try:
        value = BODY_DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except RecursionError:
        raise APIError(400, "The request body is nested too deeply to be read") from None
    except ValueError as exc:
        raise APIError(400, f"The request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(value).__name__}")
    if nests_deeper(value, MAX_DATA_DEPTH):
        raise APIError(400, f"The request body nests deeper than {MAX_DATA_DEPTH} levels; flatten the data")
    return value


def body_too_large() -> APIError:
    return APIError(
        413,
        f"The request body is larger than {MAX_BODY_BYTES // 1024} KiB; send larger data by path or URL",
        {"max_bytes": MAX_BODY_BYTES},
    )


def too_many_jobs(owner: str, limit: int, active: int, estimates: int = 0) -> APIError:
    """The reference's rate-limited answer, with Retry-After, for a full concurrent-jobs quota.

    An estimate being made counts as a job, since it reads the data as one does."""
    who = "client address" if owner.startswith("ip:") else "API key"
    busy = f"{active} are pending or running" + (f" and {estimates} estimates are being made" if estimates else "")
    return APIError(
        429,
        f"Too many concurrent jobs: {busy} for this {who} and the limit is {limit}. "
        f"Retry after {JOBS_RETRY_AFTER_S} seconds, or cancel one.",
        {"retry_after": JOBS_RETRY_AFTER_S, "limit": limit, "active": active + estimates},
        headers={"Retry-After": str(JOBS_RETRY_AFTER_S)},
    )


async def check_quota(store: Store, owner: str, limit: int) -> None:
    """Refuse early, before costly checks, a submitter whose concurrent-jobs quota is full."""
    active = await store.active_jobs(owner)
    if active >= limit:
        raise too_many_jobs(owner, limit, active)


TEAM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


ADMIN = "admin"  # the owner an admin token speaks for: every job and webhook is its to change


def token_owners(entries: Iterable[str], admin_entries: Iterable[str] = ()) -> dict[bytes, str]:
    """Each configured token's SHA-256 digest, and whom it speaks for.

    `team-a:tok1` is the token `tok1` of the team `team-a` (its keys share their jobs and
    quota); a token alone speaks for itself, by its fingerprint; an admin token for ADMIN.
    """
    owners = {hashlib.sha256(token.encode()).digest(): ADMIN for token in admin_entries}
    for entry in entries:
        team, colon, token = entry.partition(":")
        if colon and token and TEAM_NAME.fullmatch(team):
            owners[hashlib.sha256(token.encode()).digest()] = f"team:{team}"
        else:
            digest = hashlib.sha256(entry.encode()).digest()
            owners[digest] = f"key:{digest.hex()[:16]}"
    return owners


def authenticate(request: Request) -> str:
    """Who is asking, for per-key limits and ownership: a team, a token's fingerprint, or (auth off) the client IP."""
    digests: tuple[bytes, ...] = state(request).token_digests
    if not digests:
        return f"ip:{client_ip(request.scope)}"
    given = request_header(request, b"authorization") or ""
    if not given.startswith("Bearer ") or not given[7:]:
        raise APIError(
            401, "Authentication required: send 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"}
        )
    owner = token_owner(request, given[7:].encode("latin-1"))  # the header's bytes, as the client sent them
    if owner is None:
        raise APIError(401, "Invalid API token", headers={"WWW-Authenticate": "Bearer"})
    return owner


def token_owner(request: Request, token: bytes) -> str | None:
    """Whom a token (its UTF-8 bytes) speaks for, or None if it is no token of this server's.

    Every configured token is compared, each in constant time, so timing tells nothing."""
    given_digest = hashlib.sha256(token).digest()
    match = None
    for digest in state(request).token_digests:
        if hmac.compare_digest(given_digest, digest):
            match = digest
    return None if match is None else str(state(request).token_owners[match])


CALLER = "persona.caller"  # the scope key where a route's caller check leaves whom it found


def caller(request: Request) -> str:
    """Who calls an endpoint whose route checked its caller (see `path_handler`).

    Kept in the ASGI scope: Starlette's `request.state` cost a few percent of a submission's time."""
    found: str = request.scope[CALLER]
    return found


def caller_scope(request: Request, write: bool) -> str | None:
    """Whose jobs and webhooks the caller may change (`write`) or see: one owner's, or None for everyone's.

    A write is the maker's whenever the server has keys; a read only on a private server.
    An admin's scope, and everyone's with auth off, is everything."""
    owner = request.scope.get(CALLER)
    if owner is None or owner == ADMIN or not state(request).token_digests:
        return None
    return str(owner) if write or state(request).settings.private else None


def query_switch(request: Request, name: str) -> bool:
    """A boolean query parameter, `true` or `false` once (absent: false), or a 422."""
    values = request.query_params.getlist(name)
    if len(values) > 1 or (values and values[0] not in ("true", "false")):
        raise validation_failed({name: "must be true or false, given once"})
    return values == ["true"]


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"\d{1,10}", raw) or not low <= int(raw) <= high:
        raise APIError(
            422,
            f"Query parameter {name} must be an integer from {low} to {high}",
            {name: f"must be an integer from {low} to {high}"},
        )
    return int(raw)


def idempotency_key(request: Request, body: JSON) -> tuple[str, str] | None:
    key = request_header(request, b"idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise APIError(
            422,
            "Idempotency-Key must be 1 to 255 printable characters",
            {"Idempotency-Key": "must be 1 to 255 printable characters"},
        )
    return key, hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------
# HTTP layer: handlers
# ---------------------------------------------------------------------------


async def root(request: Request) -> Response:
    """The API's description; a browser (asking for HTML first) is sent on to the workbench. Either
    answer varies with `Accept`, so no cache hands a browser's answer to an API client."""
    vary = {"Vary": "Accept"}
    if (request_header(request, b"accept") or "").startswith("text/html"):
        return RedirectResponse("/jobs", status_code=303, headers=vary)
    body = {"name": "Persona API", "version": __version__, "docs": "/docs", "health": "/api/v1/health"}
    return JSONResponse(body, headers=vary)


async def health(request: Request) -> JSONResponse:
    """Healthy only when the database answers and takes writes, and the job runner lives."""
    app_state = state(request)
    reason = app_state.store.missing()
    try:
        await app_state.store.ping()
    except StorageUnavailable as exc:
        reason = reason or f"database unavailable: {exc.reason}"
    except Exception as exc:
        reason = reason or f"database unavailable: {type(exc).__name__}"
    if reason is None:
        trouble = await app_state.store.writes_fail()
        reason = f"the database cannot take writes: {trouble}" if trouble else None
    if reason is None and not app_state.runner.alive():
        reason = "job runner stopped"
    if reason is None and not app_state.dispatcher.alive():
        reason = "webhook dispatcher stopped"
    body = {"status": "healthy" if reason is None else "unhealthy", "version": __version__, "timestamp": utc_now()}
    if reason is None:
        return JSONResponse(body)
    return JSONResponse({**body, "reason": reason, **error_envelope("internal_error", reason)}, status_code=503)


def generation_request(body: JSON, settings: Settings, need_key: bool = True) -> JSON:
    """A generation request checked as far as it can be before its data is read; nulls in config are unset keys."""
    job_request = validated(body, GENERATE_CHECK)
    if "config" in job_request:
        job_request["config"] = {key: value for key, value in job_request["config"].items() if value is not None}
    job_request["provider"] = resolve_provider(job_request, need_key)
    check_llm_options(job_request)
    redact_by_default(job_request, settings.redact)
    check_destination(job_request.get("webhook_url"), "webhook_url", settings)
    return job_request


async def create_generation(request: Request) -> Response:
    owner = caller(request)
    body = await read_json(request)
    job_request = generation_request(body, state(request).settings)
    return await admit_job(request, owner, job_request, job_request["data"], idempotency_key(request, body))


async def refine_generation(request: Request) -> Response:
    """A new job in the parent's experiment: its personas again, with more data, an instruction, or both."""
    owner = caller(request)
    body = await read_json(request)
    asked = validated(body, REFINE_CHECK)
    parent = await find_own_job(request)
    result = completed_result(parent, "refined")
    stored = await state(request).store.job_request(parent["job_id"])
    if stored is None:  # deleted by retention since it was read
        raise APIError(404, f"Job {parent['job_id']} not found")
    job_request = generation_request(refined_body(stored[0], asked), state(request).settings)
    if "instruction" in asked and job_request["provider"] == "local":
        raise validation_failed(
            {"instruction": "needs an LLM provider; the offline engine can refine with more data only"}
        )
    more_data = stored[0].get("refine", {}).get("more_data", []) + ([asked["data"]] if "data" in asked else [])
    job_request["refine"] = {
        "parent_job_id": parent["job_id"],
        "parent_personas": result["personas"],
        "more_data": more_data,
        **({"instruction": asked["instruction"]} if "instruction" in asked else {}),
    }
    idempotency = idempotency_key(request, {"refine": parent["job_id"], **body})
    return await admit_job(request, owner, job_request, asked.get("data"), idempotency, experiment_id=stored[1])


def refined_body(parent: JSON, asked: JSON) -> JSON:
    """A refinement's request: the parent's data, and its count, provider, model and config unless asked otherwise.

    A model is the parent's only with the parent's provider; the experiment is the parent's, whatever the config says;
    a redacted parent's refinements are always redacted, whatever their config says.
    """
    provider = asked.get("provider", parent.get("provider"))
    model = asked.get("model", parent.get("model") if provider == parent.get("provider") else None)
    config = {
        key: value for key, value in (asked.get("config", parent.get("config")) or {}).items() if key != "experiment"
    }
    if parent.get("config", {}).get("redact"):
        config["redact"] = True
    body = {
        "data": parent["data"],
        "count": asked.get("count", parent.get("count")),
        "provider": provider,
        "model": model,
        "config": config,
        "webhook_url": asked.get("webhook_url"),
    }
    return {key: value for key, value in body.items() if value is not None}


async def check_submitted_source(
    request: Request, data: str | list[Any], before_walking: Callable[[], Awaitable[None]] | None = None
) -> None:
    """A job's or an estimate's data, checked as far as it can be before it is read: a path that
    exists in the data directory and, with API keys, is no other client's upload."""
    data_dir = state(request).settings.data_dir
    await check_data_source(data, data_dir, before_walking)
    await refuse_others_uploads(data, data_dir, caller_scope(request, write=True))


async def check_codebook(request: Request, job_request: JSON) -> None:
    """A job's codebook, checked at submission as its data is: a codebook file in the data directory,
    and no other client's upload."""
    wanted = (job_request.get("config") or {}).get("codebook")
    if wanted is None:
        return
    data_dir = state(request).settings.data_dir
    try:
        await refuse_others_uploads(wanted, data_dir, caller_scope(request, write=True))
    except APIError:  # another client's upload is, as a missing file is, no codebook of the caller's
        raise not_a_codebook(wanted) from None
    await asyncio.to_thread(codebook_file, wanted, data_dir)


async def admit_job(
    request: Request,
    owner: str,
    job_request: JSON,
    data: str | list[Any] | None,
    idempotency: tuple[str, str] | None,
    experiment_id: str | None = None,
) -> Response:
    """Queue a checked request within its owner's quota, once its data source checks out.

    The answer is the reference's: 202 with the job, or the replay of an Idempotency-Key."""
    app_state = state(request)
    limit = app_state.settings.max_concurrent_jobs
    if data is not None:
        await check_submitted_source(request, data, functools.partial(check_quota, app_state.store, owner, limit))
    await check_codebook(request, job_request)
    admission = await app_state.store.create_job(owner, job_request, limit, idempotency, experiment_id)
    if admission.conflict:
        raise APIError(
            422,
            "This Idempotency-Key was already used with a different request body; "
            "use a new key for a different request",
            {"idempotency_key": idempotency and idempotency[0]},
        )
    if admission.job_id is None:
        raise too_many_jobs(owner, limit, admission.active)
    job_id, replayed = admission.job_id, admission.replayed
    app_state.runner.wake()
    status = "pending"
    if replayed:
        job = await app_state.store.get_job(job_id)
        status = job["status"] if job else status
    return Response(
        json_bytes(
            {
                "job_id": job_id,
                "status": status,
                "message": "Generation job created successfully",
                "status_url": f"/api/v1/generate/{job_id}",
            }
        ),
        media_type="application/json",
        headers={"Idempotent-Replayed": "true"} if replayed else None,
    )


async def estimate_generation(request: Request) -> JSONResponse:
    """What POST /api/v1/generate with this body would send and cost; creates nothing.

    It reads the data as a job does, so it counts in its owner's concurrent-jobs quota
    while it is made (in this server process)."""
    app_state, owner = state(request), caller(request)
    settings = app_state.settings
    job_request = generation_request(await read_json(request), settings, need_key=False)
    limit, making = settings.max_concurrent_jobs, app_state.estimates[owner]
    active = await app_state.store.active_jobs(owner)
    if active + making >= limit:
        raise too_many_jobs(owner, limit, active, making)
    app_state.estimates[owner] += 1
    try:
        await check_submitted_source(request, job_request["data"])
        return JSONResponse(await estimate_job(job_request, settings))
    finally:
        app_state.estimates[owner] -= 1
        if not app_state.estimates[owner]:
            del app_state.estimates[owner]


def check_destination(url: str | None, field_name: str, settings: Settings) -> None:
    """A webhook URL whose literal address may never be reached is refused when registered."""
    reason = url_refusal(url, settings.private_urls_allowed) if url else None
    if reason:
        raise validation_failed({field_name: reason})


async def lookup(
    request: Request, param: str, pattern: re.Pattern[str], fetch: Callable[[str], Awaitable[Any]], label: str
) -> Any:
    """The resource a path names, or a 404; what does not look like an id is never queried."""
    key = request.path_params[param]
    found = await fetch(key) if pattern.match(key) else None
    if found is None:
        raise APIError(404, f"{label} {key if len(key) <= 64 else key[:64] + '…'} not found")
    return found


async def job_hidden(request: Request, job_id: str, write: bool) -> bool:
    """Whether a job is not the caller's to change (`write`) or see, by `caller_scope`: it is then
    a 404, as if it did not exist (with one token, every job is its own)."""
    scope = caller_scope(request, write)
    return scope is not None and await state(request).store.job_owner(job_id) != scope


async def job_named(request: Request, key: str) -> JSON | None:
    """The job a page or a query names, if the caller may see it; what does not look like a job id is never queried."""
    if not JOB_ID.match(key) or await job_hidden(request, key, write=False):
        return None
    return await state(request).store.get_job(key)


async def find_job(request: Request) -> JSON:
    """The job a path names, if the caller may see it, or a 404."""
    return await lookup(request, "job_id", JOB_ID, lambda key: job_named(request, key), "Job")


async def find_own_job(request: Request) -> JSON:
    """The job a write names, when the caller made it: with auth on, another key's or team's job is a 404."""
    job = await find_job(request)
    if await job_hidden(request, job["job_id"], write=True):
        raise APIError(404, f"Job {job['job_id']} not found")
    return job


async def get_generation(request: Request) -> Response:
    key = request.path_params["job_id"]
    if JOB_ID.match(key) and await job_hidden(request, key, write=False):
        raise APIError(404, f"Job {key} not found")
    body = await lookup(request, "job_id", JOB_ID, state(request).store.get_job_json, "Job")
    return Response(body, media_type="application/json")


def completed_result(job: JSON, action: str) -> JSON:
    """A job's result, for what only a completed job allows (export, refine, compare); else a 409."""
    if job["status"] != "completed":
        raise APIError(
            409,
            f"Job {job['job_id']} has status {job['status']}; only a completed job can be {action}",
            {"status": job["status"]},
        )
    return job["result"]


async def export_generation(request: Request) -> Response:
    """A completed job's personas as a download, in the format asked for."""
    job = await find_job(request)
    form = request.query_params.get("format", "json").lower()
    if form not in EXPORT_FORMATS:
        formats = ", ".join(EXPORT_FORMATS)
        raise APIError(
            422, f"Query parameter format must be one of: {formats}", {"format": f"must be one of: {formats}"}
        )
    result = completed_result(job, "exported")
    media_type, ending = EXPORT_FORMATS[form]
    personas, metadata = result["personas"], result["metadata"]
    if form == "xlsx":
        body = personas_xlsx(personas)
    elif form == "qdc":
        body = personas_qdc(personas, metadata)
    elif form in WORDS_EXPORTS:
        await check_words_reader(request, job["job_id"])
        async with engine_slot():  # reading the source again and placing the personas in it is a job's work
            stored = await state(request).store.job_request(job["job_id"])
            asked = stored[0] if stored else None
            dataset = await export_dataset(request, asked, metadata)
            if form == "qdpx":
                own = await own_project(request, asked, metadata)
                body = await asyncio.to_thread(qdpx_export, personas, metadata, dataset, own, job["completed_at"])
            else:
                body = (await asyncio.to_thread(coded_segments_csv, personas, dataset)).encode()
    else:
        body = personas_document(form, personas, metadata).encode()
    name = f"{export_name(job)}.{ending}"
    return Response(
        body,
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


WORDS_EXPORTS = ("qdpx", "segments")  # exports that hold participants' whole words, not only what personas quote


async def check_words_reader(request: Request, job_id: str) -> None:
    """Participants' whole words are the job's maker's: on a server with keys, an export that holds them
    needs the token of the key or team that made the job (or an admin's); another's is a 404."""
    if not state(request).token_digests:
        return
    reader = request.scope.get(CALLER) or authenticate(request)
    if reader != ADMIN and await state(request).store.job_owner(job_id) != reader:
        raise APIError(404, f"Job {job_id} not found")


async def export_dataset(request: Request, asked: JSON | None, metadata: JSON) -> Dataset | None:
    """The job's data (`asked`, its request) read again, for an export that places the personas in it; None
    where it cannot be: a source on the web (an export fetches nothing), or one that changed or went since."""
    if asked is None:
        return None
    sources = [asked["data"], *asked.get("refine", {}).get("more_data", [])]
    if any(isinstance(source, str) and classify_data(source) == "url" for source in sources):
        return None
    try:
        dataset, _ = await job_dataset(asked, state(request).settings)
    except (GenerationError, OSError):
        return None
    return dataset if dataset.source == metadata.get("source") else None


async def own_project(request: Request, asked: JSON | None, metadata: JSON) -> tuple[bytes, str] | None:
    """The researcher's .qdpx the job (`asked`, its request) read, its bytes and name, for an export onto it:
    only where the job read that one file alone, unredacted, and it is unchanged since."""
    if asked is None:
        return None
    data, config = asked["data"], asked.get("config") or {}
    if (
        not isinstance(data, str)
        or not data.lower().endswith(".qdpx")
        or asked.get("refine", {}).get("more_data")
        or config.get("redact")
    ):
        return None
    try:
        path = await asyncio.to_thread(resolve_data_path, data, state(request).settings.data_dir)
        raw = await asyncio.to_thread(path.read_bytes)
    except (APIError, OSError):
        return None
    unchanged = hashlib.sha256(raw).hexdigest() == metadata.get("source", {}).get("sha256")
    return (raw, data) if unchanged else None


def first_location(source: JSON) -> str:
    """The file or URL a source was read from: its own, or for a refinement its parent's ("" for inline data)."""
    if source.get("kind") in ("path", "url"):
        return str(source.get("location", ""))
    return first_location(source["sources"][0]) if source.get("sources") else ""


def export_name(job: JSON) -> str:
    """A download's name a researcher can file: its source, its day and its job,
    `personas-interviews-2026-12-07-job-1651089e0c13` (a refinement's by the data it refines)."""
    location = first_location(job["result"].get("metadata", {}).get("source", {}))
    stem = Path(urlsplit(location).path if "://" in location else location).stem
    slug = UPLOAD_NAME_CHARACTERS.sub("-", stem).strip(".-")[:40] or "inline"  # cleaned as an upload's name is
    return f"personas-{slug}-{(job['completed_at'] or '')[:10]}-{job['job_id']}"


async def compare_generations(request: Request) -> JSONResponse:
    """Two completed jobs' personas, paired, with what each pair shares and what only one side has."""
    results = {}
    for side in ("a", "b"):
        job_id = request.query_params.get(side, "")
        if not JOB_ID.match(job_id):
            problem = "must be the id of a completed job, such as job-1651089e0c13"
            raise APIError(422, f"Query parameter {side} {problem}", {side: problem})
        job = await job_named(request, job_id)
        if job is None:
            raise APIError(404, f"Job {job_id} not found", {side: "not found"})
        results[side] = completed_result(job, "compared")
    comparison = compare_personas(results["a"]["personas"], results["b"]["personas"])
    return JSONResponse({"a": request.query_params["a"], "b": request.query_params["b"], **comparison})


async def cancel_generation(request: Request) -> JSONResponse:
    job = await find_own_job(request)
    if not await state(request).store.cancel_job(job["job_id"]):
        job = await find_job(request)
        raise APIError(
            409,
            f"Job {job['job_id']} is already {job['status']}; only pending or running jobs can be cancelled",
            {"status": job["status"]},
        )
    state(request).runner.cancel_local(job["job_id"])
    state(request).dispatcher.wake()
    return JSONResponse(await find_job(request))


async def list_generations(request: Request) -> Response:
    status = request.query_params.get("status")
    if status is not None and status not in JOB_STATUSES:
        raise APIError(
            422,
            f"Query parameter status must be one of: {', '.join(JOB_STATUSES)}",
            {"status": "must be one of: " + ", ".join(JOB_STATUSES)},
        )
    limit, offset = page_of(request)
    body, total, count = await state(request).store.list_jobs_json(
        status, limit, offset, caller_scope(request, write=False)
    )
    headers = page_headers(request, {"status": status} if status else {}, limit, offset, count, total)
    return Response(body, media_type="application/json", headers=headers)


def page_of(request: Request) -> tuple[int, int]:
    """The page a listing asks for: (limit, offset)."""
    return query_int(request, "limit", 100, 1, 1000), query_int(request, "offset", 0, 0, 10**9)


def page_headers(
    request: Request, query: dict[str, str], limit: int, offset: int, count: int, total: int
) -> dict[str, str]:
    """A listing's X-Total-Count, and a Link to the next page when there is one."""
    headers = {"X-Total-Count": str(total)}
    if offset + count < total:
        headers["Link"] = (
            f'<{request.url.path}?{urlencode({**query, "limit": limit, "offset": offset + limit})}>; rel="next"'
        )
    return headers


async def list_experiments(request: Request) -> JSONResponse:
    limit, offset = page_of(request)
    experiments, total = await state(request).store.list_experiments(limit, offset, caller_scope(request, write=False))
    return JSONResponse(experiments, headers=page_headers(request, {}, limit, offset, len(experiments), total))


async def get_experiment(request: Request) -> JSONResponse:
    scope = caller_scope(request, write=False)
    return JSONResponse(
        await lookup(
            request,
            "experiment_id",
            EXPERIMENT_ID,
            lambda key: state(request).store.get_experiment(key, scope),
            "Experiment",
        )
    )


async def create_webhook(request: Request) -> JSONResponse:
    body = validated(await read_json(request), WEBHOOK_CHECK)
    check_destination(body["url"], "url", state(request).settings)
    app_state = state(request)
    owner = caller(request) if app_state.token_digests else None  # with auth off, a webhook hears every job
    owner = None if owner == ADMIN else owner  # and an admin's hears every job too
    webhook = await app_state.store.create_webhook(
        body["url"], body.get("events", list(WEBHOOK_EVENTS)), body.get("secret"), owner
    )
    if webhook is None:
        raise APIError(
            400, f"At most {MAX_WEBHOOKS} webhooks can be registered; delete one first", {"max_webhooks": MAX_WEBHOOKS}
        )
    return JSONResponse(webhook)


async def find_webhook(request: Request) -> JSON:
    return await lookup(request, "webhook_id", WEBHOOK_ID, state(request).store.get_webhook, "Webhook")


async def find_own_webhook(request: Request, write: bool = True) -> JSON:
    """The webhook a path names, when the caller registered it: with auth on, another key's or
    team's webhook is a 404 to a write, and on a private server to a read too. One registered with
    auth off, which hears every job, is anyone's to change, and on a private server the admin's alone."""
    webhook = await find_webhook(request)
    scope = caller_scope(request, write)
    if scope is not None:
        owner = await state(request).store.webhook_owner(webhook["webhook_id"])
        if owner != scope and (owner is not None or state(request).settings.private):
            raise APIError(404, f"Webhook {webhook['webhook_id']} not found")
    return webhook


def token_presented(request: Request) -> bool:
    """Whether the request carries a valid token (never true with auth off: there is none to carry)."""
    if not state(request).token_digests:
        return False
    try:
        authenticate(request)
    except APIError:
        return False
    return True


def webhook_for_reader(webhook: JSON, whole: bool) -> JSON:
    """Anyone may read webhooks; a URL's secrets only with a valid token.

    Tokens live in the query and the user info, and in path segments such as Slack's and
    Discord's (`/services/T…/B…/<secret>`): long segments of letters and digits (JWTs and
    base64 too) are hidden, and so is any segment with parameters (`;token=…`).
    """
    if whole:
        return webhook
    parts = urlsplit(shown_url(webhook["url"]))
    path = "/".join("…" if SECRET_SEGMENT.fullmatch(segment) else segment for segment in parts.path.split("/"))
    return {**webhook, "url": parts._replace(path=path).geturl()}


async def get_webhook(request: Request) -> JSONResponse:
    return JSONResponse(webhook_for_reader(await find_own_webhook(request, write=False), token_presented(request)))


async def delete_webhook(request: Request) -> JSONResponse:
    webhook = await find_own_webhook(request)
    await state(request).store.delete_webhook(webhook["webhook_id"])
    return JSONResponse({"success": True, "message": f"Webhook {webhook['webhook_id']} deleted successfully"})


async def list_webhooks(request: Request) -> JSONResponse:
    whole = token_presented(request)
    webhooks = await state(request).store.list_webhooks(caller_scope(request, write=False))
    return JSONResponse([webhook_for_reader(webhook, whole) for webhook in webhooks])


async def list_data(request: Request) -> JSONResponse:
    """A page of the sources in the data directory; file names can be sensitive, so with auth on this needs a token."""
    limit, offset = query_int(request, "limit", 1000, 1, 1000), query_int(request, "offset", 0, 0, 10**9)
    data_dir, scope = state(request).settings.data_dir, caller_scope(request, write=False)
    hidden = await asyncio.to_thread(others_uploads, data_dir, scope) if scope is not None else set()
    sources, total = await data_sources(data_dir, limit, offset, hidden)
    return JSONResponse(sources, headers=page_headers(request, {}, limit, offset, len(sources), total))


async def upload_data(request: Request) -> JSONResponse:
    """A file from the researcher's computer, stored under uploads/ in the data directory (body = its bytes)."""
    owner = caller(request)
    settings = state(request).settings
    name = upload_name(request.path_params["name"])
    folder = request.path_params.get("folder")
    folder = upload_folder_name(folder) if folder is not None else None
    replace = query_switch(request, "replace")
    cap = settings.max_source_mb * 1024 * 1024
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise upload_too_large(settings.max_source_mb)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise upload_too_large(settings.max_source_mb)
    if not body:
        raise APIError(422, "The upload is empty; send the file's bytes as the request body", {"body": "is empty"})
    stored = await asyncio.to_thread(store_upload, settings.data_dir, name, bytes(body), owner, replace, folder)
    return JSONResponse(stored, status_code=201, headers={"Location": "/api/v1/data"})


async def delete_data(request: Request) -> Response:
    """Delete one of the caller's uploads, named as PUT named it; another client's is a 404."""
    owner = caller(request)
    name, folder = request.path_params["name"], request.path_params.get("folder")
    shown = name if folder is None else f"{folder}/{name}"
    if (
        not re.fullmatch(UPLOAD_NAME_PATTERN, name)
        or name.startswith(".")
        or (folder is not None and not re.fullmatch(UPLOAD_FOLDER_PATTERN, folder))
        or not await asyncio.to_thread(delete_upload, state(request).settings.data_dir, name, owner, folder)
    ):
        raise APIError(404, f"No upload {UPLOADS}/{shown} of yours to delete")
    return Response(status_code=204)


def upload_too_large(max_mb: int) -> APIError:
    return APIError(
        413,
        f"The upload is larger than the {max_mb} MiB a local source may be "
        "(set by --max-source-mb / PERSONA_MAX_SOURCE_MB)",
        {"max_bytes": max_mb * 1024 * 1024},
    )


async def list_providers(request: Request) -> JSONResponse:
    return JSONResponse(provider_status())


async def list_deliveries(request: Request) -> JSONResponse:
    webhook = await find_own_webhook(request, write=False)
    return JSONResponse(await state(request).store.list_deliveries(webhook["webhook_id"], DELIVERY_LOG_LIMIT))


async def retry_delivery(request: Request) -> JSONResponse:
    webhook = await find_own_webhook(request)
    delivery_id = request.path_params["delivery_id"]
    schedule = state(request).settings.webhook_retry_schedule
    refusal = await state(request).store.retry_delivery(webhook["webhook_id"], delivery_id, len(schedule))
    if refusal == "missing":
        raise APIError(404, f"Delivery {delivery_id} of webhook {webhook['webhook_id']} not found")
    if refusal is not None:
        raise APIError(
            409, f"Delivery {delivery_id} is {refusal}; only failed deliveries can be sent again", {"status": refusal}
        )
    state(request).dispatcher.wake()
    return JSONResponse(
        {"success": True, "message": f"Delivery {delivery_id} will be sent again", "delivery_id": delivery_id}
    )


# ---------------------------------------------------------------------------
# HTTP layer: the workbench pages (/jobs, /jobs/{id}, /compare) and their script
# ---------------------------------------------------------------------------
# Plain HTML rendered here, everything from the data escaped, and one small script served
# from /assets: the Content-Security-Policy lets no other script, style or connection in.

WORKBENCH_LIST_SIZE = 50  # jobs on /jobs, newest first
PAGE_WAIT_S = 5.0  # a followed page's request is held at most this long for what it shows to change
PAGE_LOOK_S = 1.0  # how often a held page request reads its job (or the list) again: any host may change it
WORKBENCH_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
WORKBENCH_STYLE = (
    PAGE_STYLE
    + """
header{overflow-wrap:anywhere}header a{color:#fff}nav{margin:0 0 1rem}nav a{margin-right:1rem}
.page{display:block;padding:1.5rem 2rem;max-width:90rem}.page>section{margin-bottom:2rem}
.cards{display:grid;gap:1.25rem;grid-template-columns:repeat(auto-fill,minmax(22rem,1fr))}
form.panel{display:grid;gap:.75rem;grid-template-columns:repeat(auto-fill,minmax(14rem,1fr));align-items:end;
background:#fff;border-radius:12px;padding:1rem 1.25rem;box-shadow:0 1px 3px rgba(0,0,0,.12)}
label{display:grid;gap:.25rem;font-size:.9rem;color:#4b5565}
input,select,textarea,button{font:inherit;padding:.4rem .5rem;
border:1px solid #c7ccd6;border-radius:6px;background:#fff;color:#1d2330;min-width:0}
button{background:#2848a8;color:#fff;border-color:#2848a8;cursor:pointer}button:focus,a:focus,input:focus,select:focus,
textarea:focus{outline:3px solid #f59e0b;outline-offset:1px}progress{width:100%;max-width:30rem;height:1.1rem}
.alert{color:#b91c1c}.muted{color:#6b7280}.table{overflow-x:auto}.actions a{margin-right:1rem}
.sides{display:grid;gap:1rem;grid-template-columns:repeat(auto-fit,minmax(18rem,1fr))}.pair{margin-bottom:2rem}
.differs td{vertical-align:top}dialog{border:1px solid #c7ccd6;border-radius:12px}
@media (max-width:600px){header,.page{padding:1rem}.cards{grid-template-columns:1fr}.card{padding:1rem}
form.panel{grid-template-columns:1fr}td,th{padding:.4rem}}
@media print{nav,form,.actions,dialog,.changes,.warnings,#status,#waiting{display:none}.page{padding:0}
.cards{display:block}.card{break-after:page}.card:last-child{break-after:auto}}
"""
)


def workbench_page(request: Request, title: str, subtitle: str, body: str, status: int = 200) -> HTMLResponse:
    """A workbench page: its style and script from /assets, nothing inline, under a strict policy.

    With auth on, the page carries the dialog that asks for the token; on a private server the
    script also keeps the token in a cookie, by which the pages know their reader.
    """
    auth = bool(state(request).token_digests)
    private = "on" if state(request).settings.private else "off"
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
        f'content="width=device-width,initial-scale=1"><title>{escape(title)}</title>'
        f'<link rel="icon" href="/assets/icon.svg" type="image/svg+xml">'
        f'<link rel="stylesheet" href="/assets/workbench.css"><script src="/assets/workbench.js" defer></script>'
        f'</head><body data-auth="{"on" if auth else "off"}" data-private="{private}">'
        f"<header><h1>{escape(title)}</h1><p>{escape(subtitle)}</p></header>"
        f"{body}{TOKEN_DIALOG if auth else ''}</body></html>"
    )
    return HTMLResponse(page, status_code=status, headers={"Content-Security-Policy": WORKBENCH_CSP})


SIGN_IN_COOKIE = "persona-token"  # where the workbench's script keeps the token on a private server


def page_caller(request: Request) -> str | None:
    """Who opens a page of a private server: the owner of the token its cookie holds, or None."""
    cookie = request.cookies.get(SIGN_IN_COOKIE)
    return token_owner(request, unquote(cookie).encode()) if cookie else None


def sign_in_page(request: Request) -> HTMLResponse:
    """A private server's page opened without a known token: the script asks for one and opens the page again."""
    body = (
        '<main class="page" id="sign-in"><p>This Persona server is private: each team sees its own jobs alone. '
        'Give your API token to go on.</p><p><button id="sign-in-button" type="button">Sign in</button></p></main>'
    )
    return workbench_page(request, "Sign in", "Persona workbench", body, status=401)


TOKEN_DIALOG = (
    '<dialog id="token-dialog"><form method="dialog"><label>API token <input id="token" type="password" '
    'autocomplete="off" required></label> <button>Use token</button></form></dialog>'
)


def personas_written(progress: int, count: int) -> int:
    """How many of `count` personas a job has written, from the progress it reports after each one."""
    return max((done for done in range(count + 1) if written_progress(done, count) <= progress), default=0)


def stage_words(job: JSON, count: int | None) -> str:
    """The job's stage in words, from its progress: what each stage reports as it begins, and
    while a model writes one persona a segment, how many of the `count` it has written (None:
    the segments are not known before they are made, as with `group_by`)."""
    if job["status"] == "completed":
        return "done"
    if job["status"] == "failed":
        return "failed"
    if job["status"] == "pending":
        return "waiting for a free worker"
    progress = job["progress"]
    if PROGRESS["segments"] < progress < PROGRESS["validated"]:
        return (
            f"writing the personas: {personas_written(progress, count)} of {count} done"
            if count
            else ("writing the personas")
        )
    reached = [words for _, start, words in JOB_STAGES if progress >= start]
    return reached[-1] if reached else "starting"


def segments_asked(asked: JSON) -> int | None:
    """How many segments a job's model writes personas for, where its request says: its groups, or its
    count; None with `group_by`, whose groups are known only once the data is read."""
    config = asked.get("config") or {}
    if config.get("groups"):
        return len(config["groups"])
    return None if config.get("group_by") else asked.get("count", DEFAULT_COUNT)


def elapsed_seconds(job: JSON) -> int:
    """How long a job has run, or waited, by the server's clock (the page's script counts on from it)."""
    since = job["started_at"] or job["created_at"]
    started = datetime.strptime(since, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    return max(0, int(time.time() - started))


def elapsed_words(job: JSON) -> str:
    """How long a job has run, or waited: `running for 1 min 12 s`."""
    seconds = elapsed_seconds(job)
    shown = f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
    return f"{'running' if job['started_at'] else 'waiting'} for {shown}"


def job_source(job: JSON) -> str:
    data = job["request"]["data"]
    return f"{len(data)} inline records" if isinstance(data, list) else shown_url(data) if "://" in data else data


def experiment_names(jobs: list[JSON]) -> dict[str, str]:
    """Per listed job, its experiment's name: its own, or for a refinement, which joins its parent's
    experiment, the name of the first job up its line that the list holds and that named one."""
    requests = {job["job_id"]: job["request"] for job in jobs}
    names: dict[str, str] = {}
    for job_id in requests:
        line, name = job_id, ""
        for _ in range(len(requests)):  # a line is no longer than the list
            request = requests.get(line)
            if request is None:
                break
            name = request.get("config", {}).get("experiment") or ""
            line = request.get("refine", {}).get("parent_job_id")
            if name or not line:
                break
        names[job_id] = name
    return names


def experiment_cell(request: JSON, experiment: str) -> str:
    """A job's experiment as the list shows it: its name, and for a refinement the job it refines."""
    parent = request.get("refine", {}).get("parent_job_id")
    refines = f'refines <a href="/jobs/{escape(parent)}">{escape(parent)}</a>' if parent else ""
    return " · ".join(part for part in (escape(experiment), refines) if part)


def job_row(job: JSON, experiment: str) -> str:
    result = job["result"] or {}
    titles = ", ".join(persona["title"] for persona in result.get("personas", [])[:3])
    request = job["request"]
    name = request.get("config", {}).get("name")
    if name and request.get("refine"):  # it keeps its parent's name; the list tells the two apart
        name = f"{name} (refined)"
    return (
        f'<tr data-status="{escape(job["status"])}">'
        f'<td><a href="/jobs/{escape(job["job_id"])}">{escape(name or job["job_id"])}</a>'
        f"</td><td>{escape(job_source(job))}</td><td>{escape(request.get('provider', ''))}</td>"
        f"<td>{escape(request.get('count', DEFAULT_COUNT))}</td><td>{escape(job['status'])}</td>"
        f'<td><progress max="100" value="{job["progress"]}">{job["progress"]}%</progress> {job["progress"]}%</td>'
        f"<td>{escape(titles or job['error'] or '')}</td><td>{experiment_cell(request, experiment)}"
        f'</td><td><time datetime="{escape(job["created_at"])}">{escape(job["created_at"])}</time></td></tr>'
    )


def jobs_table(jobs: list[JSON]) -> str:
    experiments = experiment_names(jobs)
    rows = "".join(job_row(job, experiments[job["job_id"]]) for job in jobs)
    return (
        f'<section id="jobs" class="table" data-version="{jobs_version(jobs)}"><h2>Jobs</h2>'
        f"<table><tr><th>Job</th><th>Source</th><th>Provider</th>"
        f"<th>Personas</th><th>Status</th><th>Progress</th><th>Personas made</th><th>Experiment</th><th>Created</th>"
        f"</tr>{rows}"
        f"</table></section>"
    )


def provider_options() -> str:
    """The providers that can run here, the offline engine first; Ollama needs no key, so it is offered only
    where the server is told it is there (OLLAMA_HOST, or PERSONA_PROVIDER=ollama)."""
    told = bool(os.environ.get("OLLAMA_HOST")) or pick_provider({}) == "ollama"
    return "".join(
        f'<option value="{escape(p["name"])}">{escape("offline engine" if p["name"] == "local" else p["name"])}'
        "</option>"
        for p in provider_status()
        if p["configured"] and (p["name"] != "ollama" or told)
    )


NEW_PERSONAS_FORM = """<section><h2>New personas</h2><form id="new-job" class="panel">
<label>Data <select id="data" name="data" required><option value="">Choose a file or folder…</option></select></label>
<label>Upload <input id="upload" type="file" multiple data-formats="{formats}"></label>
<label>A whole folder <input id="upload-folder" type="file" webkitdirectory multiple data-formats="{formats}"></label>
<label>Personas <input id="count" name="count" type="number" min="1" max="20" value="{count}" required></label>
<label>Provider <select id="provider" name="provider">{providers}</select></label>
<label>Model <input id="model" name="model" placeholder="the provider's default"></label>
<label>Group by <select id="group-by" name="group_by"><option value="">No grouping</option></select></label>
<p id="groups-hint" role="status" hidden><span></span> <button type="button" id="all-groups">Ask for all</button></p>
<label>Name <input id="job-name" name="name" maxlength="200" placeholder="optional, to find it again"></label>
<button type="submit">Generate personas</button><p id="new-job-error" class="alert" role="alert"></p>
</form></section>"""


async def jobs_page(request: Request) -> HTMLResponse:
    """The workbench: a form for new personas, and the newest jobs, refreshed while some run."""

    def newest() -> Awaitable[list[JSON]]:
        return state(request).store.recent_jobs(WORKBENCH_LIST_SIZE, caller_scope(request, write=False))

    jobs = await once_changed(request, newest, jobs_version, some_job_is_live, await newest())
    form = NEW_PERSONAS_FORM.format(
        providers=provider_options(), count=DEFAULT_COUNT, formats=" ".join(UPLOAD_SUFFIXES)
    )
    body = f'<main class="page">{form}{jobs_table(jobs)}</main>'
    return workbench_page(request, "Persona workbench", f"the newest {WORKBENCH_LIST_SIZE} jobs first", body)


def job_version(job: JSON | None) -> str:
    """What a job's page shows that can change while it is followed: its status and progress."""
    return f"{job['status']}-{job['progress']}" if job else "gone"


def jobs_version(jobs: list[JSON]) -> str:
    """What the job list shows that can change while it is followed, as one short digest."""
    shown = json.dumps([[job["job_id"], job["status"], job["progress"]] for job in jobs])
    return hashlib.sha256(shown.encode()).hexdigest()[:16]


Shown = TypeVar("Shown")  # what a followed page shows: a job, or the list of jobs


def job_is_live(job: JSON | None) -> bool:
    return job is not None and job["status"] in ("pending", "running")


def some_job_is_live(jobs: list[JSON]) -> bool:
    return any(job_is_live(job) for job in jobs)


async def once_changed(
    request: Request,
    read: Callable[[], Awaitable[Shown]],
    version: Callable[[Shown], str],
    live: Callable[[Shown], bool],
    current: Shown,
) -> Shown:
    """What a followed page shows, once it differs from the version the page has (`?wait=`).

    A page that follows a job asks again with the version it shows, and the request is held
    while the job is live and unchanged (at most PAGE_WAIT_S, and not once the reader leaves):
    a page open on a running job costs a few requests a minute, not one every 2 s. What has
    ended or is gone answers at once.
    """
    shown = request.query_params.get("wait")
    deadline = time.monotonic() + PAGE_WAIT_S
    while (
        live(current)
        and version(current) == shown
        and time.monotonic() < deadline
        and not await request.is_disconnected()
    ):
        await asyncio.sleep(PAGE_LOOK_S)
        current = await read()
    return current


def not_found_page(request: Request, what: str) -> HTMLResponse:
    body = f'<main class="page"><nav><a href="/jobs">All jobs</a></nav><p>{escape(what)} was not found.</p></main>'
    return workbench_page(request, "Not found", what, body, status=404)


async def job_page(request: Request) -> HTMLResponse:
    """A job followed live, then its cards and what comes next.

    While the job runs, the page's script fetches it again until the job ends."""
    key = request.path_params["job_id"]
    job = await once_changed(
        request, lambda: job_named(request, key), job_version, job_is_live, await job_named(request, key)
    )
    if job is None:
        return not_found_page(request, f"Job {key[:64]}")
    stored = await state(request).store.job_request(job["job_id"])
    asked = stored[0] if stored else {}
    count, provider = segments_asked(asked), asked.get("provider")
    stage = stage_words(job, count)
    active = job_is_live(job)
    seconds = f'data-seconds="{elapsed_seconds(job)}"'
    controls = f' <span id="elapsed" {seconds}>{escape(elapsed_words(job))}</span> ' if active else ""
    controls += (
        f'<button type="button" id="cancel" data-job="{escape(job["job_id"])}">Cancel</button>' if active else ""
    )
    parts = [
        f'<nav><a href="/jobs">All jobs</a></nav><section id="status"><progress id="progress" max="100" '
        f'value="{job["progress"]}">{job["progress"]}%</progress> <span id="stage">{escape(stage)}</span>'
        f"{controls}</section>"
    ]
    subtitle = f"{job['status']} · {job['progress']}%"
    if job["error"]:
        parts.append(f'<p class="alert">Error: {escape(job["error"])}</p>')
    data = asked.get("data")
    source = (shown_url(data) if classify_data(data) == "url" else data) if isinstance(data, str) else "inline data"
    name = (asked.get("config") or {}).get("name")
    if job["status"] == "completed":
        parts.append(await completed_job_parts(request, job))
        metadata = job["result"].get("metadata", {})
        source, name = metadata.get("source", {}).get("location", source), metadata.get("name", name)
        count, provider = len(job["result"]["personas"]), metadata.get("provider", provider)
        subtitle = job["job_id"]
    settings = ", ".join(filter(None, (f"{count} persona{'s' if count != 1 else ''}" if count else "", provider)))
    title = (f"{name}: personas from {source}" if name else f"Personas from {source}") + (
        f" ({settings})" if settings else ""
    )
    body = (
        f'<main class="page" data-status="{escape(job["status"])}" data-version="{job_version(job)}">'
        f"{''.join(parts)}</main>"
    )
    return workbench_page(request, title, subtitle, body)


def model_configured() -> bool:
    """Whether a refinement here could take an instruction: a provider with a key, or one the server is
    told to use (Ollama needs no key, so PERSONA_PROVIDER or OLLAMA_HOST say it is there)."""
    return pick_provider({}) != "local" or bool(os.environ.get("OLLAMA_HOST"))


def shown_changes(key: str, split: JSON) -> list[str]:
    """A field's changes as the page says them ("added …", "removed …"): not the demographics' size and
    share, which the card and its participants' change say."""
    return [
        f"{change} {item}"
        for change in ("added", "removed")
        for item in split[change]
        if not (key == "demographics" and item.startswith(("participants: ", "share: ")))
    ]


def changes_html(changes: JSON) -> str:
    """What a refinement changed: each continued persona's fields gained and lost, and the personas new or gone."""
    rows = []
    for persona in changes.get("personas", []):
        shown = {key: shown_changes(key, split) for key, split in persona["fields"].items()}
        fields = "".join(
            f"<li>{escape(field_heading(key))}: {escape('; '.join(said))}</li>" for key, said in shown.items() if said
        )
        rows.append(
            f"<li>{escape(persona['name'])} continued: "
            + (f"<ul>{fields}</ul>" if fields else "nothing changed")
            + "</li>"
        )
    rows += [f"<li>New: {escape(label['name'])}, {escape(label['title'])}</li>" for label in changes.get("new", [])]
    rows += [f"<li>Gone: {escape(label['name'])}, {escape(label['title'])}</li>" for label in changes.get("gone", [])]
    count = len(changes.get("personas", [])) + len(changes.get("new", [])) + len(changes.get("gone", []))
    return f'<details class="changes"><summary>What changed ({count})</summary><ul>{"".join(rows)}</ul></details>'


async def completed_job_parts(request: Request, job: JSON) -> str:
    """The personas first, under the coverage line; then the warnings (collapsed and counted),
    exports, the refine and compare forms, and the experiment's other jobs."""
    result, job_id = job["result"], job["job_id"]
    metadata = result.get("metadata", {})
    quality = metadata.get("quality")
    by_id = {entry["id"]: entry for entry in (quality or {}).get("personas", [])}
    warned = metadata.get("warnings", [])
    warnings = "".join(f"<li>{escape(warning)}</li>" for warning in warned)
    exports = "".join(
        f'<a href="/api/v1/generate/{escape(job_id)}/export?format={form}" download'
        f"{' data-token' if form in WORDS_EXPORTS else ''}>Export {label}</a>"
        for form, label in (
            ("csv", "CSV"),
            ("xlsx", "Excel"),
            ("markdown", "Markdown"),
            ("json", "JSON"),
            ("html", "cards page (HTML)"),
            ("qdpx", "QDA project (.qdpx)"),
            ("qdc", "QDA codebook (.qdc)"),
            ("segments", "coded segments (CSV)"),
        )
    )
    parent = result.get("parent_job_id")
    others = await state(request).store.get_experiment(result["experiment_id"])
    siblings = [other for other in (others or {}).get("jobs", []) if other["job_id"] != job_id]
    completed = [
        other
        for other in await state(request).store.recent_jobs(WORKBENCH_LIST_SIZE, caller_scope(request, write=False))
        if other["status"] == "completed" and other["job_id"] != job_id
    ]
    completed.sort(key=lambda other: other["job_id"] != parent)  # a refinement is compared with its parent first
    compare_options = "".join(
        f'<option value="{escape(o["job_id"])}"{" data-parent" if o["job_id"] == parent else ""}>'
        f"{escape(o['job_id'])} · {escape(job_source(o))}{' (its parent)' if o['job_id'] == parent else ''}</option>"
        for o in completed
    )
    cards = "".join(persona_html_card(persona, by_id.get(persona.get("id"))) for persona in result["personas"])
    instruction_box = (
        '<label>Instruction <textarea id="instruction" name="instruction" rows="2" '
        'placeholder="what the model should change"></textarea></label>'
        if model_configured()
        else ""
    )
    return (
        f'<section><p class="quality">{escape(coverage_line(quality).capitalize())}</p>'
        + (f'<p>Refined from <a href="/jobs/{escape(parent)}">{escape(parent)}</a></p>' if parent else "")
        + (changes_html(result["changes"]) if result.get("changes") else "")
        + f'</section><section><h2>Personas</h2><div class="cards">{cards}</div></section><section class="warnings">'
        + (
            f"<details><summary>{len(warned)} warning{'s' if len(warned) != 1 else ''}</summary>"
            f"<ul>{warnings}</ul></details>"
            if warned
            else ""
        )
        + f'</section><section class="actions"><h2>Next</h2><p>{exports}</p>'
        f'<form id="refine" class="panel" data-job="{escape(job_id)}"><label>Data <select id="refine-data" '
        f'name="data"><option value="">No more data</option></select></label>'
        f'<label>Add files <input id="refine-upload" type="file" multiple data-formats="{" ".join(UPLOAD_SUFFIXES)}">'
        f"</label>{instruction_box}"
        f'<button type="submit">Refine</button><p id="refine-error" class="alert" role="alert"></p></form>'
        f'<form class="panel" id="compare" action="/compare" method="get">'
        f'<input type="hidden" name="a" value="{escape(job_id)}">'
        f'<label>Compare with <select name="b" id="compare-with" required>{compare_options}</select></label>'
        f'<button type="submit">Compare</button></form>'
        + (
            "<h2>This experiment's other jobs</h2><ul>"
            + "".join(
                f'<li><a href="/jobs/{escape(o["job_id"])}">{escape(o["job_id"])}</a> {escape(o["status"])}</li>'
                for o in siblings
            )
            + "</ul>"
            if siblings
            else ""
        )
        + "</section>"
    )


def comparison_summary(comparison: JSON, personas: dict[str, dict[str, JSON]]) -> str:
    """The comparison in one paragraph: pairs, personas only in A or B, and the participants who
    moved (stood for by a persona in A, and in B by one that is not its pair)."""

    def owners(side: str) -> dict[str, str]:
        return {pid: key for key, p in personas[side].items() for pid in p.get("evidence", {}).get("participants", [])}

    in_a, in_b = owners("a"), owners("b")
    partner = {pair["a"]["id"]: pair["b"]["id"] for pair in comparison["pairs"]}
    both = [pid for pid in in_a if pid in in_b]
    moved = sum(partner.get(in_a[pid]) != in_b[pid] for pid in both)
    only_a, only_b = len(comparison["unpaired"]["a"]), len(comparison["unpaired"]["b"])
    return (
        f'<section id="summary"><p>{len(comparison["pairs"])} pairs · {only_a} only in A · {only_b} only in B · '
        f"{moved} of {len(both)} participants in both runs moved to a persona that is not their persona's pair</p>"
        "</section>"
    )


async def compare_page(request: Request) -> HTMLResponse:
    """Two jobs' personas side by side, each pair with what it shares and what differs."""
    jobs = {}
    for side in ("a", "b"):
        key = request.query_params.get(side, "")
        job = await job_named(request, key)
        if job is None or job["status"] != "completed":
            return not_found_page(request, f"A completed job {key[:64]}")
        jobs[side] = job
    personas = {side: {p["id"]: p for p in job["result"]["personas"]} for side, job in jobs.items()}
    comparison = compare_personas(jobs["a"]["result"]["personas"], jobs["b"]["result"]["personas"])
    sections = [comparison_summary(comparison, personas)]
    for pair in comparison["pairs"]:
        rows = "".join(
            f"<tr><th>{escape(field_heading(key))}</th><td>{html_items(split['shared'])}</td>"
            f"<td>{html_items(split['only_a'])}</td><td>{html_items(split['only_b'])}</td></tr>"
            for key, split in pair["fields"].items()
            if split["only_a"] or split["only_b"]
        )
        first, second = personas["a"][pair["a"]["id"]], personas["b"][pair["b"]["id"]]
        shared = set(first.get("evidence", {}).get("participants", [])) & set(
            second.get("evidence", {}).get("participants", [])
        )
        sections.append(
            f'<section class="pair"><h2>A: {escape(first["title"])} and B: {escape(second["title"])} · '
            f'{len(shared)} participants in both · similarity {pair["similarity"]:.2f}</h2><div class="sides">'
            f"{persona_html_card(first)}{persona_html_card(second)}</div>"
            f'<div class="table"><table class="differs"><tr>'
            f"<th>Field</th><th>Shared</th><th>Only in A</th><th>Only in B</th></tr>{rows}</table></div></section>"
        )
    for side, label in (("a", "A"), ("b", "B")):
        alone = [personas[side][entry["id"]] for entry in comparison["unpaired"][side]]
        if alone:
            sections.append(
                f'<section><h2>Only in {label}</h2><div class="cards">'
                + "".join(persona_html_card(p) for p in alone)
                + "</div></section>"
            )
    a, b = jobs["a"]["job_id"], jobs["b"]["job_id"]
    body = (
        f'<main class="page"><nav><a href="/jobs">All jobs</a><a href="/jobs/{escape(a)}">A: {escape(a)}</a>'
        f'<a href="/jobs/{escape(b)}">B: {escape(b)}</a></nav>{"".join(sections)}</main>'
    )
    return workbench_page(request, "Compare", f"A {a} · B {b}", body)


async def workbench_asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name == "workbench.js":
        return Response(
            WORKBENCH_JS, media_type="text/javascript; charset=utf-8", headers={"Cache-Control": "no-cache"}
        )
    if name == "workbench.css":
        return Response(WORKBENCH_STYLE, media_type="text/css; charset=utf-8", headers={"Cache-Control": "no-cache"})
    if name == "icon.svg":
        return Response(WORKBENCH_ICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})
    raise APIError(404, f"No asset {name[:64]}")


WORKBENCH_ICON = (  # the pages' tab icon: two heads, a persona drawn from people
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" fill="#2f5d8a"/>'
    '<circle cx="12" cy="12" r="5" fill="#fff"/><circle cx="22" cy="13" r="4" fill="#cfe0f1"/>'
    '<path d="M3 28c1-6 5-9 9-9s8 3 9 9z" fill="#fff"/><path d="M17 27c1-5 3-7 5-7s5 2 6 7z" fill="#cfe0f1"/></svg>'
)


WORKBENCH_JS = r"""
"use strict";
const auth = document.body.dataset.auth === "on";
const isPrivate = document.body.dataset.private === "on";

function keepCookie(value, seconds) {
  // On a private server the pages know their reader by this cookie; it never leaves this site.
  const secure = location.protocol === "https:" ? "; Secure" : "";
  const cookie = "persona-token=" + encodeURIComponent(value) + "; path=/; SameSite=Strict";
  document.cookie = cookie + "; max-age=" + seconds + secure;
}

function token() {
  // Asked once, kept for this tab only; sent as a bearer token on what needs one.
  const kept = sessionStorage.getItem("persona-token");
  if (kept || !auth) return Promise.resolve(kept);
  const dialog = document.getElementById("token-dialog");
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const given = document.getElementById("token").value;
      sessionStorage.setItem("persona-token", given);
      if (isPrivate) keepCookie(given, 43200);
      resolve(given);
    }, {once: true});
    dialog.showModal();
  });
}

async function api(method, path, body, raw) {
  const headers = {};
  const bearer = await token();
  if (bearer) headers["Authorization"] = "Bearer " + bearer;
  if (body !== undefined && !raw) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {method, headers, body: raw ? body : JSON.stringify(body)});
  const answer = await response.json();
  if (response.status === 401) {
    sessionStorage.removeItem("persona-token");
    if (isPrivate) keepCookie("", 0);
  }
  if (!response.ok) {
    const failure = new Error(answer.message || response.statusText);
    failure.status = response.status;
    throw failure;
  }
  return answer;
}

function option(select, value, label) {
  const item = document.createElement("option");
  item.value = value;
  item.textContent = label;
  select.append(item);
  return item;
}

let sources = [];

async function loadSources(selects, chosen) {
  sources = await api("GET", "/api/v1/data");
  for (const select of selects) {
    select.length = 1;
    for (const source of sources)
      option(select, source.name, source.kind === "folder" ? source.name + "/" : source.name);
    if (chosen) select.value = chosen;
  }
}

function fillGroupBy() {
  const select = document.getElementById("group-by");
  const source = sources.find((s) => s.name === document.getElementById("data").value);
  select.length = 1;
  const questions = (source && source.questions) || {};
  for (const attribute of (source && source.attributes) || [])
    option(select, attribute, questions[attribute] || attribute);
  hintGroups();
}

function chosenGroups() {
  const source = sources.find((s) => s.name === document.getElementById("data").value);
  return (source && source.groups && source.groups[document.getElementById("group-by").value]) || 0;
}

function countGroups() {
  // A researcher who groups wants a persona per group: the count follows the grouping, up to 20.
  const groups = chosenGroups();
  if (groups) document.getElementById("count").value = Math.min(20, groups);
  hintGroups();
}

function hintGroups() {
  // Fewer personas than groups leaves the smallest groups out: the form says so before the job, and offers all.
  const groups = chosenGroups();
  const count = Number(document.getElementById("count").value);
  const hint = document.getElementById("groups-hint");
  const all = Math.min(20, groups);
  hint.hidden = !(groups > count);
  hint.querySelector("span").textContent = groups > count ?
    `${groups} groups: personas for the ${count} largest.` : "";
  hint.querySelector("button").textContent = `Ask for ${all === groups ? "all " : "the largest "}${all}`;
}

function showError(id, error) {
  document.getElementById(id).textContent = error.message;
}

async function swapFromServer(selector, wait) {
  // The server renders the page again; only this part of it is replaced, so forms keep what was typed.
  // With `wait`, it holds the request until the part no longer shows the version it has (at most 5 s).
  const url = new URL(location.href);
  if (wait) url.searchParams.set("wait", document.querySelector(selector).dataset.version);
  const response = await fetch(url, {headers: {Accept: "text/html"}});
  if (!response.ok) {  // a 429 says when to ask again; anything else is asked again later
    const error = new Error(response.status === 429 ? "the server asked to slow down" : "the server did not answer");
    error.retryAfter = Number(response.headers.get("Retry-After")) * 1000 || 0;
    throw error;
  }
  const page = new DOMParser().parseFromString(await response.text(), "text/html");
  const fresh = page.querySelector(selector);
  const here = document.querySelector(selector);
  if (fresh && here) here.replaceWith(document.adoptNode(fresh));
  document.title = page.title;
  document.querySelector("header").replaceWith(document.adoptNode(page.querySelector("header")));
  return document.querySelector(selector);
}

function running(root) {
  return root.querySelector("[data-status=pending], [data-status=running]") !== null ||
    ["pending", "running"].includes(root.dataset.status);
}

function notify(id, text) {
  // A status line at the foot of the page, outside what following replaces; an empty text takes it away.
  let notice = document.getElementById(id);
  if (!notice) {
    notice = document.createElement("p");
    notice.id = id;
    notice.className = "alert";
    notice.setAttribute("role", "status");
    document.body.append(notice);
  }
  notice.hidden = !text;
  notice.textContent = text;
}

function waiting(text) {
  // Says on the page that following has paused, and why.
  notify("waiting", text);
}

const FOLLOW_GAP = 1000;  // ms between a change and asking for the next: a busy job is asked at most once a second
const HIDDEN_GAP = 10000;  // ms between asks while the tab is hidden: it holds none of the browser's connections

function follow(selector) {
  // Follows a job (or the list) to its end whatever the server answers. While the tab is seen,
  // each request waits at the server for a change, so an idle page asks a few times a minute;
  // a hidden tab asks every 10 s without waiting, so tabs in the background do not hold the
  // browser's few connections to the server. A 429 or a failed request pauses (for its
  // Retry-After, else twice as long each time, at most a minute) and then resumes.
  let pause = FOLLOW_GAP;
  const tick = async () => {
    const seen = document.visibilityState === "visible";
    let part;
    try {
      part = await swapFromServer(selector, seen);
    } catch (error) {
      pause = error.retryAfter || Math.min(pause * 2, 60000);
      waiting(`Waiting ${Math.ceil(pause / 1000)} s to follow this page: ${error.message}.`);
      setTimeout(tick, pause);
      return;
    }
    pause = FOLLOW_GAP;
    waiting("");
    localTimes(part);
    if (running(part)) setTimeout(tick, seen ? FOLLOW_GAP : HIDDEN_GAP);
    else if (part.matches("main")) setUp(part);
  };
  if (running(document.querySelector(selector))) setTimeout(tick, FOLLOW_GAP);
}

function countElapsed() {
  // The running time counts on between the server's answers, which come only when the job changes:
  // from the seconds the server counted when it answered, by this browser's clock since then.
  const shown = document.querySelector("#elapsed[data-seconds]");
  if (!shown) return;
  if (!shown.dataset.seen) shown.dataset.seen = String(Date.now());
  const seconds = Number(shown.dataset.seconds) + Math.floor((Date.now() - Number(shown.dataset.seen)) / 1000);
  const words = seconds >= 60 ? `${Math.floor(seconds / 60)} min ${seconds % 60} s` : `${seconds} s`;
  shown.textContent = shown.textContent.replace(/ for .*$/, " for " + words);
}

function cleanedName(name) {
  // The name the server will store a file under, as it cleans it.
  return name.replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^[.-]+|[.-]+$/g, "").slice(0, 100);
}

function folderOf(file) {
  // The top folder a file was chosen or dropped in ("interviews" of "interviews/round 1/p1.txt"), or "".
  const path = file.webkitRelativePath || file.droppedPath || "";
  return path.includes("/") ? path.split("/")[0] : "";
}

async function uploadFiles(files, select, formats) {
  // Each file goes into uploads/, a folder's files into one folder of the researcher's there (its
  // subfolders' files too); a file of a format Persona does not read is left out and named. A file
  // whose name is there already asks first: replace it, or keep both.
  let last = null;
  let loose = 0;
  const left = [];
  for (const file of files) {
    const chosen = file.webkitRelativePath || file.droppedPath || file.name;
    if (chosen.split("/").some((part) => part.startsWith("."))) continue;  // hidden files are no one's data
    const dot = file.name.lastIndexOf(".");
    if (dot < 1 || !formats.includes(file.name.slice(dot).toLowerCase())) {
      left.push(file.name);
      continue;
    }
    const folder = folderOf(file);
    const into = folder ? cleanedName(folder) + "/" : "";
    const taken = sources.some((source) => source.name === "uploads/" + into + cleanedName(file.name));
    const replace = taken && confirm(`"${file.name}" was uploaded before. ` +
      "OK replaces it with this file; Cancel keeps both, this one under a new name.");
    const path = "/api/v1/data/" + (folder ? encodeURIComponent(folder) + "/" : "") +
      encodeURIComponent(file.name) + (replace ? "?replace=true" : "");
    const stored = (await api("PUT", path, file, true)).name;
    last = folder ? stored.slice(0, stored.lastIndexOf("/")) : stored;
    if (!folder) loose += 1;
  }
  if (last) await loadSources([select], last);
  return {left, loose};
}

async function droppedFiles(transfer) {
  // The files dropped, a dropped folder's files (its subfolders' too) each marked with its path in it.
  const entries = [...transfer.items].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry());
  if (!entries.some((entry) => entry && entry.isDirectory)) return [...transfer.files];
  const files = [];
  const visit = async (entry) => {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      file.droppedPath = entry.fullPath.replace(/^\//, "");
      files.push(file);
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {  // a directory reader gives its entries a batch at a time
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        for (const child of batch) await visit(child);
      }
    }
  };
  for (const entry of entries) if (entry) await visit(entry);
  return files;
}

function uploadNote({left, loose}) {
  // What an upload did that the researcher might not expect: files left out, or files that stay apart.
  const notes = [];
  if (loose > 1) {
    notes.push(`Uploaded ${loose} files, each a source of its own (the last is chosen); ` +
      "to read them together, upload them as a whole folder");
  }
  if (left.length) notes.push(`Left out ${left.length} file(s) of a format Persona does not read: ${left.join(", ")}`);
  return notes.join(". ");
}

function setUpNewJob(form) {
  const data = document.getElementById("data");
  loadSources([data]).catch((error) => showError("new-job-error", error));
  data.addEventListener("change", fillGroupBy);
  document.getElementById("group-by").addEventListener("change", countGroups);
  document.getElementById("count").addEventListener("input", hintGroups);
  document.getElementById("all-groups").addEventListener("click", () => {
    document.getElementById("count").value = Math.min(20, chosenGroups());
    hintGroups();
  });
  const chooser = document.getElementById("upload");
  const formats = chooser.dataset.formats.split(" ");
  const upload = async (files) => {
    try {
      document.getElementById("new-job-error").textContent = uploadNote(await uploadFiles(files, data, formats));
      fillGroupBy();
    } catch (error) { showError("new-job-error", error); }
  };
  chooser.addEventListener("change", (event) => upload(event.target.files));
  document.getElementById("upload-folder").addEventListener("change", (event) => upload(event.target.files));
  form.addEventListener("dragover", (event) => event.preventDefault());
  form.addEventListener("drop", async (event) => {
    event.preventDefault();
    upload(await droppedFiles(event.dataTransfer));
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {data: data.value, count: Number(document.getElementById("count").value),
                  provider: document.getElementById("provider").value};
    const model = document.getElementById("model").value.trim();
    const groupBy = document.getElementById("group-by").value;
    if (model) body.model = model;
    const name = document.getElementById("job-name").value.trim();
    if (groupBy || name) body.config = {};
    if (groupBy) body.config.group_by = groupBy;
    if (name) body.config.name = name;
    try {
      const job = await api("POST", "/api/v1/generate", body);
      location.assign("/jobs/" + job.job_id);
    } catch (error) { showError("new-job-error", error); }
  });
}

function setUpRefine(form) {
  const data = document.getElementById("refine-data");
  loadSources([data]).catch((error) => showError("refine-error", error));
  const chooser = document.getElementById("refine-upload");
  chooser.addEventListener("change", async (event) => {
    try {
      const done = await uploadFiles(event.target.files, data, chooser.dataset.formats.split(" "));
      document.getElementById("refine-error").textContent = uploadNote(done);
    } catch (error) { showError("refine-error", error); }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {};
    const box = document.getElementById("instruction");  // there only where a model is configured
    const instruction = box ? box.value.trim() : "";
    if (data.value) body.data = data.value;
    if (instruction) body.instruction = instruction;
    try {
      const job = await api("POST", "/api/v1/generate/" + form.dataset.job + "/refine", body);
      location.assign("/jobs/" + job.job_id);
    } catch (error) { showError("refine-error", error); }
  });
}

function localTimes(root) {
  // Times come from the server in UTC; the researcher reads them in her own time zone.
  for (const time of root.querySelectorAll("time[datetime]"))
    time.textContent = new Date(time.getAttribute("datetime")).toLocaleString();
}

function setUp(root) {
  localTimes(root);
  const newJob = root.querySelector("#new-job");
  if (newJob) setUpNewJob(newJob);
  const refine = root.querySelector("#refine");
  if (refine) setUpRefine(refine);
}

document.addEventListener("click", async (event) => {
  // Cancel sits in the part of the page that is fetched again while the job runs: one listener serves every copy.
  const button = event.target.closest("#cancel");
  if (!button) return;
  button.disabled = true;
  try {
    await api("DELETE", "/api/v1/generate/" + encodeURIComponent(button.dataset.job));
  } catch (error) {
    if (error.status === 409) {  // it ended first: the page follows it to how it ended
      notify("cancelling", "The job ended before it could be cancelled.");
      return;
    }
    button.disabled = false;
    notify("cancelling", "Cancel failed: " + error.message);
  }
});

document.addEventListener("click", async (event) => {
  // An export holding participants' whole words needs the job's token on a server with keys; a link sends
  // none, so the page fetches it with the token and saves what comes (a private server's cookie serves too).
  const link = event.target.closest("a[data-token]");
  if (!link || !auth || isPrivate) return;
  event.preventDefault();
  try {
    const response = await fetch(link.href, {headers: {Authorization: "Bearer " + await token()}});
    if (!response.ok) throw new Error((await response.json()).message || response.statusText);
    const named = /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") || "");
    const save = document.createElement("a");
    save.href = URL.createObjectURL(await response.blob());
    save.download = named ? named[1] : "";
    save.click();
    setTimeout(() => URL.revokeObjectURL(save.href), 60000);
  } catch (error) {
    notify("exporting", "Export failed: " + error.message);
  }
});

document.addEventListener("submit", (event) => {
  // A refinement compared with its parent reads as before and after: the parent is A.
  const form = event.target.closest("#compare");
  const chosen = form && form.querySelector("#compare-with").selectedOptions[0];
  if (!chosen || !chosen.hasAttribute("data-parent")) return;
  event.preventDefault();
  const here = form.querySelector("input[name=a]").value;
  location.assign("/compare?a=" + encodeURIComponent(chosen.value) + "&b=" + encodeURIComponent(here));
});

function signIn() {
  sessionStorage.removeItem("persona-token");
  token().then((given) => { if (given) location.reload(); });
}

setUp(document);
if (document.getElementById("sign-in")) {
  document.getElementById("sign-in-button").addEventListener("click", signIn);
  signIn();
} else if (document.getElementById("jobs")) follow("#jobs");
else if (document.querySelector("main[data-status]")) {
  follow("main");
  setInterval(countElapsed, 1000);
}
"""


# ---------------------------------------------------------------------------
# HTTP layer: the API description (OpenAPI 3.1) and offline docs
# ---------------------------------------------------------------------------
# Request bodies reference GENERATE_SCHEMA and WEBHOOK_SCHEMA, the very documents
# the handlers validate with, so the description and the checks cannot drift apart.

NULLABLE_TEXT: JSON = {"type": ["string", "null"]}
TIMESTAMP: JSON = {"type": "string", "format": "date-time", "examples": ["2025-12-19T10:30:00Z"]}
STRING_LIST: JSON = {"type": "array", "items": {"type": "string"}}
ERROR_SCHEMA: JSON = {
    "type": "object",
    "required": ["success", "error", "message", "details"],
    "properties": {
        "success": {"type": "boolean", "const": False},
        "error": {"type": "string", "enum": sorted(set(ERROR_CODES.values()))},
        "message": {"type": "string"},
        "details": {"type": "object"},
    },
    "examples": [
        {
            "success": False,
            "error": "rate_limited",
            "message": "Rate limit exceeded. Retry after 60 seconds.",
            "details": {"retry_after": 60},
        }
    ],
}


def counted_findings(labels: tuple[str, ...], description: str = "", elsewhere: bool = True) -> JSON:
    """The schema of a persona's findings: each names something (`labels`) and how many of its `of`
    participants it holds for, and with `elsewhere` the share of everyone else it holds for."""
    properties: JSON = {label: {"type": "string"} for label in labels}
    properties.update(count={"type": "integer"}, of={"type": "integer"})
    if elsewhere:
        properties["share_elsewhere"] = {"type": "number"}
    schema: JSON = {"type": "array", "items": {"type": "object", "properties": properties}}
    return {**schema, "description": description} if description else schema


PERSONA_SCHEMA: JSON = {
    "type": "object",
    "required": ["id", "name", "title", "demographics", "goals", "pain_points", "behaviours", "quotes"],
    "properties": {
        "id": {"type": "string", "examples": ["persona-001"]},
        "name": {"type": "string"},
        "title": {"type": "string"},
        "summary": {"type": "string"},
        "demographics": {"type": "object"},
        "goals": STRING_LIST,
        "pain_points": STRING_LIST,
        "behaviours": STRING_LIST,
        "quotes": STRING_LIST,
        "unverified_quotes": STRING_LIST,
        "themes": STRING_LIST,
        "evidence": {
            "type": "object",
            "properties": {
                "participants": STRING_LIST,
                "share": {"type": "number"},
                "answers": counted_findings(("question", "answer")),
                "codes": counted_findings(
                    ("code",), "a QDA project's codes the persona's participants carry, most carried first", False
                ),
                "codebook": counted_findings(
                    ("theme",),
                    "the themes of config.codebook its participants speak of, those that set it apart most first",
                ),
                "quote_codes": {
                    "type": "array",
                    "description": "per quote, in order, the researcher's codes on the passage it quotes",
                    "items": STRING_LIST,
                },
            },
        },
    },
}
JOB_FIELDS_SCHEMA: JSON = {
    "job_id": {"type": "string", "pattern": JOB_ID.pattern},
    "status": {"type": "string", "enum": list(JOB_STATUSES)},
    "progress": {"type": "integer", "minimum": 0, "maximum": 100},
    "created_at": TIMESTAMP,
    "started_at": NULLABLE_TEXT,
    "completed_at": NULLABLE_TEXT,
    "error": NULLABLE_TEXT,
}
JOB_SUMMARY_SCHEMA: JSON = {"type": "object", "required": list(JOB_FIELDS_SCHEMA), "properties": JOB_FIELDS_SCHEMA}
JOB_SCHEMA: JSON = {
    "type": "object",
    "required": [*JOB_FIELDS_SCHEMA, "result"],
    "properties": {
        **JOB_FIELDS_SCHEMA,
        "result": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["personas", "experiment_id", "output_path"],
                    "properties": {
                        "personas": {"type": "array", "items": {"$ref": "#/components/schemas/Persona"}},
                        "experiment_id": {"type": "string"},
                        "output_path": {"type": "string"},
                        "metadata": {"type": "object"},
                        "parent_job_id": {"type": "string", "description": "the job a refinement refined"},
                        "changes": {"type": "object", "description": "a refinement's changes to its parent's personas"},
                    },
                },
            ]
        },
    },
}
PERSONA_LABEL_SCHEMA: JSON = {
    "type": "object",
    "required": ["id", "name", "title"],
    "properties": {"id": {"type": "string"}, "name": {"type": "string"}, "title": {"type": "string"}},
}
SPLIT_SCHEMA: JSON = {
    "type": "object",
    "required": ["shared", "only_a", "only_b"],
    "properties": {"shared": STRING_LIST, "only_a": STRING_LIST, "only_b": STRING_LIST},
}
COMPARISON_SCHEMA: JSON = {
    "type": "object",
    "required": ["a", "b", "pairs", "unpaired"],
    "properties": {
        "a": {"type": "string"},
        "b": {"type": "string"},
        "pairs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["a", "b", "similarity", "fields"],
                "properties": {
                    "a": PERSONA_LABEL_SCHEMA,
                    "b": PERSONA_LABEL_SCHEMA,
                    "similarity": {"type": "number", "minimum": 0, "maximum": 1},
                    "fields": {"type": "object", "additionalProperties": SPLIT_SCHEMA},
                },
            },
        },
        "unpaired": {
            "type": "object",
            "required": ["a", "b"],
            "properties": {
                "a": {"type": "array", "items": PERSONA_LABEL_SCHEMA},
                "b": {"type": "array", "items": PERSONA_LABEL_SCHEMA},
            },
        },
    },
}
DATA_SOURCE_SCHEMA: JSON = {
    "type": "object",
    "required": ["name", "kind", "format", "attributes"],
    "properties": {
        "name": {"type": "string", "description": "the path to give as `data`"},
        "kind": {"type": "string", "enum": ["file", "folder"]},
        "format": {"type": "string"},
        "size": {"type": "integer"},
        "files": {"type": "integer"},
        "attributes": {
            "type": ["array", "null"],
            "items": {"type": "string"},
            "description": "a table's attributes, what config.group_by can take",
        },
        "groups": {
            "type": "object",
            "additionalProperties": {"type": "integer"},
            "description": "a table's attributes, each with how many groups group_by would make",
        },
        "questions": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "a coded attribute's question in full (a grid's item first, then its question)",
        },
    },
}
UPLOADED_SCHEMA: JSON = {
    "type": "object",
    "required": ["name", "format", "size"],
    "properties": {"name": {"type": "string"}, "format": {"type": "string"}, "size": {"type": "integer"}},
}
ESTIMATE_SCHEMA: JSON = {
    "type": "object",
    "required": [
        "participants",
        "provider",
        "model",
        "strategy",
        "calls",
        "input_tokens",
        "output_tokens",
        "cost_usd",
        "warnings",
    ],
    "properties": {
        "participants": {"type": "integer"},
        "provider": {"type": "string"},
        "model": {"type": "string"},
        "strategy": {
            "type": "string",
            "enum": ["offline", "holistic", "segmented", "auto"],
            "description": "auto: not chosen, as the job would fail first (see warnings)",
        },
        "calls": {"type": "integer"},
        "input_tokens": {"type": "integer"},
        "output_tokens": {"type": "integer"},
        "cost_usd": {"type": ["number", "null"], "description": "null when the model's price is not known"},
        "warnings": STRING_LIST,
    },
}
EXPERIMENT_FIELDS_SCHEMA: JSON = {
    "experiment_id": {"type": "string", "pattern": EXPERIMENT_ID.pattern},
    "name": {"type": ["string", "null"], "description": "config.experiment; null for a job's own experiment"},
    "created_at": TIMESTAMP,
    "updated_at": TIMESTAMP,
}
EXPERIMENT_SCHEMA: JSON = {
    "type": "object",
    "required": [*EXPERIMENT_FIELDS_SCHEMA, "jobs"],
    "properties": {
        **EXPERIMENT_FIELDS_SCHEMA,
        "jobs": {"type": "integer", "minimum": 1, "description": "how many jobs"},
    },
}
EXPERIMENT_DETAIL_SCHEMA: JSON = {
    "type": "object",
    "required": [*EXPERIMENT_FIELDS_SCHEMA, "jobs"],
    "properties": {
        **EXPERIMENT_FIELDS_SCHEMA,
        "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/JobSummary"}},
    },
}
WEBHOOK_OUT_SCHEMA: JSON = {
    "type": "object",
    "required": ["webhook_id", "url", "events", "created_at"],
    "properties": {
        "webhook_id": {"type": "string"},
        "url": {"type": "string"},
        "events": {"type": "array", "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)}},
        "created_at": TIMESTAMP,
    },
}
DELIVERY_SCHEMA: JSON = {
    "type": "object",
    "required": ["delivery_id", "event", "job_id", "status", "created_at", "next_retry_at", "attempts"],
    "properties": {
        "delivery_id": {"type": "string"},
        "event": {"type": "string"},
        "job_id": {"type": "string"},
        "status": {"type": "string", "enum": list(DELIVERY_STATUSES)},
        "created_at": TIMESTAMP,
        "next_retry_at": NULLABLE_TEXT,
        "attempts": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "attempted_at": {"type": "string"},
                    "http_status": {"type": ["integer", "null"]},
                    "error": NULLABLE_TEXT,
                    "duration_ms": {"type": "integer"},
                },
            },
        },
    },
}
SUCCESS_SCHEMA: JSON = {
    "type": "object",
    "required": ["success", "message"],
    "properties": {"success": {"type": "boolean"}, "message": {"type": "string"}},
}
OFFLINE_EXAMPLE_DATA = [
    {
        "participant_id": "P01",
        "role": "Nurse",
        "response": "I need to swap night shifts quickly when my kids get sick.",
    },
    {
        "participant_id": "P02",
        "role": "Nurse",
        "response": "It's frustrating when the rota changes and nobody tells me.",
    },
    {
        "participant_id": "P03",
        "role": "Driver",
        "response": "I want my overtime to be paid correctly every single week.",
    },
    {
        "participant_id": "P04",
        "role": "Driver",
        "response": "I usually keep my own notes of my start and finish times.",
    },
]
# The first of each is what "Try it out" sends: the offline engine on inline data works on any fresh install.
REQUEST_EXAMPLES = {
    "GenerateRequest": {
        "offline": {
            "summary": "The offline engine on inline data (no API key, no webhook)",
            "value": {
                "data": OFFLINE_EXAMPLE_DATA,
                "count": 2,
                "provider": "local",
                "config": {"complexity": "moderate", "detail_level": "standard"},
            },
        },
        "reference": {
            "summary": "The reference's example: Anthropic, with a completion webhook",
            "value": {
                "data": "./interviews.csv",
                "count": 5,
                "provider": "anthropic",
                "model": "claude-sonnet-4-20250514",
                "config": {"complexity": "moderate", "detail_level": "standard"},
                "webhook_url": "https://example.com/webhook",
            },
        },
    },
    "RefineRequest": {
        "data": {
            "summary": "More interviews, the offline engine (no API key)",
            "value": {"data": OFFLINE_EXAMPLE_DATA[:2]},
        },
        "instruction": {
            "summary": "An instruction, for an LLM provider",
            "value": {"instruction": "Focus on accessibility needs.", "provider": "anthropic"},
        },
    },
    "WebhookRequest": {
        "reference": {
            "summary": "The reference's example",
            "value": {
                "url": "https://example.com/webhook",
                "events": ["generation.completed", "generation.failed"],
                "secret": "webhook-secret-123",
            },
        },
    },
}
ERROR_TEXT = {
    400: "Invalid request",
    401: "Authentication required",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict with the resource's state",
    413: "Request body too large",
    422: "Validation error",
    429: "Too many requests",
    500: "Server error",
    503: "Database or disk unavailable",
}


def json_response(description: str, schema: JSON, example: Any = None, headers: bool = True) -> JSON:
    content: JSON = {"schema": schema}
    if example is not None:
        content["example"] = example
    response: JSON = {"description": description, "content": {"application/json": content}}
    if headers:
        response["headers"] = {
            name: {"$ref": f"#/components/headers/{name}"}
            for name in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
        }
    return response


def export_response() -> JSON:
    """The export's 200: one media type per format, each an attachment."""
    content = {
        media_type.split(";")[0]: {"schema": {"type": "object"} if ending == "json" else {"type": "string"}}
        for media_type, ending in EXPORT_FORMATS.values()
    }
    return {
        "description": "The personas as a file (Content-Disposition: attachment)",
        "content": content,
        "headers": {"Content-Disposition": {"schema": {"type": "string"}}},
    }


def operation(
    summary: str,
    ok: JSON,
    errors: Iterable[int],
    write: bool = False,
    takes_json: bool = False,
    parameters: list[JSON] | None = None,
) -> JSON:
    """An operation's summary, responses (its own errors and those every endpoint can give), security and parameters."""
    codes = {*errors, 405, 429, 500, 503}
    if write:
        codes |= {401}
    if takes_json:
        codes |= {400, 413, 422}
    responses: JSON = {"200": ok}
    for code in sorted(codes):
        error = json_response(ERROR_TEXT[code], {"$ref": "#/components/schemas/Error"})
        if code == 429:
            error["headers"]["Retry-After"] = {"schema": {"type": "integer"}, "description": "seconds to wait"}
        if code == 401:
            error["headers"]["WWW-Authenticate"] = {"schema": {"type": "string"}}
        responses[str(code)] = error
    spec: JSON = {"summary": summary, "responses": responses}
    if write:
        spec["security"] = [{"bearerAuth": []}]
    if parameters:
        spec["parameters"] = parameters
    return spec


def path_parameter(name: str, pattern: str) -> JSON:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": pattern}}


def query_parameter(name: str, schema: JSON) -> JSON:
    return {"name": name, "in": "query", "required": False, "schema": schema}


UI_ASSETS = {  # what /docs and /redoc load, from the drf-spectacular-sidecar package
    "swagger-ui-bundle.js": "swagger-ui-dist/swagger-ui-bundle.js",
    "swagger-ui.css": "swagger-ui-dist/swagger-ui.css",
    "redoc.standalone.js": "redoc/bundles/redoc.standalone.js",
}
SWAGGER_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Persona API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head><body><div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script></body></html>"""
REDOC_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Persona API</title></head>
<body><redoc spec-url="/openapi.json"></redoc><script src="/docs/assets/redoc.standalone.js"></script></body></html>"""


def ui_asset_folder() -> Path | None:
    """The package's static folder, found without importing it (it would import Django)."""
    spec = importlib.util.find_spec("drf_spectacular_sidecar")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "static" / "drf_spectacular_sidecar"


async def openapi_json(request: Request) -> Response:
    return Response(state(request).openapi, media_type="application/json")


def docs_policy(page: str) -> str:
    """The docs pages' Content-Security-Policy: their own assets and inline script only, never framed.

    Swagger UI and ReDoc style elements inline and ReDoc searches in a worker it makes from a blob.
    """
    scripts = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
        for script in re.findall(r"<script>(.*?)</script>", page, re.DOTALL)
    )
    return (
        f"default-src 'self'; script-src 'self' {scripts}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )


def docs_page(page: str) -> Callable[[Request], Awaitable[Response]]:
    headers = {"Content-Security-Policy": docs_policy(page), "X-Frame-Options": "DENY"}

    async def endpoint(request: Request) -> Response:
        if ui_asset_folder() is None:
            raise APIError(
                503, "The interactive docs need the drf-spectacular-sidecar package; install it, or read /openapi.json"
            )
        return HTMLResponse(page, headers=headers)

    return endpoint


async def docs_asset(request: Request) -> Response:
    name = request.path_params["name"]
    folder = ui_asset_folder()
    if name not in UI_ASSETS or folder is None:
        raise APIError(404, f"No docs asset {name}")
    return FileResponse(folder / UI_ASSETS[name], headers={"Cache-Control": "public, max-age=86400"})


# ---------------------------------------------------------------------------
# HTTP layer: the route table (each endpoint once: the routes, their auth, the OpenAPI paths)
# ---------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]

JOB_ID_PARAMETER = path_parameter("job_id", JOB_ID.pattern)
WEBHOOK_ID_PARAMETER = path_parameter("webhook_id", WEBHOOK_ID.pattern)
DELIVERY_ID_PARAMETER = path_parameter("delivery_id", DELIVERY_ID.pattern)
UPLOAD_NAME_PARAMETER = path_parameter("name", UPLOAD_NAME_PATTERN)
UPLOAD_BODY: JSON = {
    "required": True,
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary", "minLength": 1}}},
}
UPLOAD_FOLDER_PARAMETER: JSON = {  # any name: cleaned as a file's is, the stored name in the answer
    "name": "folder",
    "in": "path",
    "required": True,
    "description": "the folder's name, with a letter, digit or underscore: other characters than those, dots and "
    "dashes become -, and it is cut to 100",
    "schema": {"type": "string", "pattern": "[A-Za-z0-9_]"},
}
STORED_FOLDER_PARAMETER = path_parameter("folder", UPLOAD_FOLDER_PATTERN)
IDEMPOTENCY_HEADER: JSON = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"},
}
PAGE_PARAMETERS = (
    query_parameter("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
    query_parameter("offset", {"type": "integer", "minimum": 0, "maximum": 10**9}),
)
PAGE_HEADERS: JSON = {"X-Total-Count": {"schema": {"type": "integer"}}, "Link": {"schema": {"type": "string"}}}
HEALTH_SCHEMA: JSON = {
    "type": "object",
    "required": ["status", "version", "timestamp"],
    "properties": {
        "status": {"type": "string", "enum": ["healthy", "unhealthy"]},
        "version": {"type": "string"},
        "timestamp": TIMESTAMP,
        "reason": {"type": "string"},
    },
}
ACCEPTED_SCHEMA: JSON = {
    "type": "object",
    "required": ["job_id", "status", "message", "status_url"],
    "properties": {
        "job_id": {"type": "string"},
        "status": {"type": "string", "enum": list(JOB_STATUSES)},
        "message": {"type": "string"},
        "status_url": {"type": "string"},
    },
}


def json_body(schema_name: str) -> JSON:
    """A JSON request body: the schema the handler validates with, and its examples."""
    schema = {"$ref": f"#/components/schemas/{schema_name}"}
    return {
        "required": True,
        "content": {"application/json": {"schema": schema, "examples": REQUEST_EXAMPLES[schema_name]}},
    }


def list_of(description: str, schema_name: str) -> JSON:
    return json_response(description, {"type": "array", "items": {"$ref": f"#/components/schemas/{schema_name}"}})


def one(description: str, schema_name: str) -> JSON:
    return json_response(description, {"$ref": f"#/components/schemas/{schema_name}"})


@dataclass(frozen=True)
class Endpoint:
    """One method on one path: the handler, whether it needs a token, and what the API document says of it.

    `operation_id` None keeps a route out of the document: the docs and the workbench's
    pages and assets. A JSON `body` adds the 400, 413 and 422 it can cause; `auth` the 401.
    Every other endpoint is a read: open, or on a private server answered to a known caller
    alone, except the `public` ones (health, the API's description and document, assets).
    A workbench `page` knows its caller by the cookie its sign-in sets, as a browser sends no header.
    """

    method: str
    path: str
    handler: Handler
    operation_id: str | None = None
    tag: str = ""
    summary: str = ""
    ok: JSON = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    auth: bool = False
    body: JSON | None = None
    parameters: tuple[JSON, ...] = ()
    status: int = 200  # the success status: 201 for an upload, 204 for a deletion
    links: dict[str, str] = field(default_factory=dict)  # operation id -> the field of this answer it takes
    responses: JSON | None = None  # the whole responses object, for health alone (no rate limit, no auth)
    public: bool = False
    page: bool = False


ENDPOINTS = (  # the router tries each path in turn, so the busiest come first
    Endpoint(
        "GET",
        "/api/v1/generate",
        list_generations,
        "listJobs",
        "jobs",
        "List jobs, oldest first, without results",
        {**list_of("Jobs", "JobSummary"), "headers": PAGE_HEADERS},
        (422,),
        parameters=(query_parameter("status", {"type": "string", "enum": list(JOB_STATUSES)}), *PAGE_PARAMETERS),
    ),
    Endpoint(
        "POST",
        "/api/v1/generate",
        create_generation,
        "createJob",
        "jobs",
        "Start a persona generation job",
        json_response("Job created", ACCEPTED_SCHEMA),
        auth=True,
        body=json_body("GenerateRequest"),
        parameters=(IDEMPOTENCY_HEADER,),
        links={"getJob": "job_id"},
    ),
    Endpoint(
        "GET",
        "/api/v1/generate/{job_id}",
        get_generation,
        "getJob",
        "jobs",
        "Job status and result",
        one("The job", "Job"),
        (404,),
        parameters=(JOB_ID_PARAMETER,),
    ),
    Endpoint(
        "DELETE",
        "/api/v1/generate/{job_id}",
        cancel_generation,
        "cancelJob",
        "jobs",
        "Cancel a pending or running job; it fails with error 'cancelled'",
        one("The cancelled job", "Job"),
        (404, 409),
        auth=True,
        parameters=(JOB_ID_PARAMETER,),
    ),
    Endpoint(
        "GET",
        "/api/v1/health",
        health,
        "getHealth",
        "service",
        "Health check: the database answers and the job runner lives",
        responses={
            "200": json_response("Healthy", HEALTH_SCHEMA, headers=False),
            "405": json_response(ERROR_TEXT[405], {"$ref": "#/components/schemas/Error"}, headers=False),
            "503": json_response("Unhealthy, with the reason", HEALTH_SCHEMA, headers=False),
        },
        public=True,
    ),
    Endpoint(
        "GET",
        "/",
        root,
        "getInfo",
        "service",
        "API information",
        json_response(
            "API information",
            {"type": "object"},
            {"name": "Persona API", "version": __version__, "docs": "/docs", "health": "/api/v1/health"},
        ),
        public=True,
    ),
    Endpoint(
        "GET",
        "/api/v1/generate/{job_id}/export",
        export_generation,
        "exportJob",
        "jobs",
        "A completed job's personas as a download: CSV, JSON, Markdown, the HTML cards, Excel, a REFI-QDA "
        "project or codebook, or coded segments (the project and the segments need the job's token when the "
        "server has keys)",
        export_response(),
        (401, 404, 409, 422),
        parameters=(
            JOB_ID_PARAMETER,
            query_parameter("format", {"type": "string", "enum": list(EXPORT_FORMATS), "default": "json"}),
        ),
    ),
    Endpoint(
        "POST",
        "/api/v1/generate/{job_id}/refine",
        refine_generation,
        "refineJob",
        "workflow",
        "Refine a completed job's personas with more data or an instruction: a new job in its experiment",
        json_response("Job created", ACCEPTED_SCHEMA),
        (404, 409),
        auth=True,
        body=json_body("RefineRequest"),
        parameters=(JOB_ID_PARAMETER, IDEMPOTENCY_HEADER),
    ),
    Endpoint(
        "POST",
        "/api/v1/estimate",
        estimate_generation,
        "estimateJob",
        "workflow",
        "What a generation request would send to its provider and cost; creates nothing",
        json_response("The estimate", ESTIMATE_SCHEMA),
        auth=True,
        body=json_body("GenerateRequest"),
    ),
    Endpoint(
        "GET",
        "/api/v1/compare",
        compare_generations,
        "compareJobs",
        "workflow",
        "Pair two completed jobs' personas and show, per field, what each pair shares",
        json_response("The comparison", COMPARISON_SCHEMA),
        (404, 409, 422),
        parameters=tuple(
            {**query_parameter(side, {"type": "string", "pattern": JOB_ID.pattern}), "required": True}
            for side in ("a", "b")
        ),
    ),
    Endpoint(
        "GET",
        "/api/v1/experiments",
        list_experiments,
        "listExperiments",
        "workflow",
        "List experiments, newest first; a job without config.experiment is one of its own",
        {**list_of("Experiments", "Experiment"), "headers": PAGE_HEADERS},
        (422,),
        parameters=PAGE_PARAMETERS,
    ),
    Endpoint(
        "GET",
        "/api/v1/experiments/{experiment_id}",
        get_experiment,
        "getExperiment",
        "workflow",
        "An experiment with its jobs, oldest first",
        json_response("The experiment", EXPERIMENT_DETAIL_SCHEMA),
        (404,),
        parameters=(path_parameter("experiment_id", EXPERIMENT_ID.pattern),),
    ),
    Endpoint(
        "GET",
        "/api/v1/providers",
        list_providers,
        "listProviders",
        "service",
        "Persona engines and LLM providers, and whether each is configured",
        json_response("Providers", {"type": "array", "items": {"type": "object"}}),
    ),
    Endpoint(
        "GET",
        "/api/v1/data",
        list_data,
        "listData",
        "data",
        "The sources in the data directory, a page at a time: files with their format and a table's attributes, "
        "and folders",
        {**json_response("Sources", {"type": "array", "items": DATA_SOURCE_SCHEMA}), "headers": PAGE_HEADERS},
        (422,),
        auth=True,
        parameters=(
            query_parameter("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 1000}),
            PAGE_PARAMETERS[1],
        ),
    ),
    Endpoint(
        "PUT",
        "/api/v1/data/{name}",
        upload_data,
        "uploadData",
        "data",
        "Upload a file into uploads/ in the data directory; a name already taken gets -2, -3, ...",
        json_response("Stored", UPLOADED_SCHEMA),
        (400, 404, 413, 422),
        auth=True,
        status=201,
        parameters=(
            UPLOAD_NAME_PARAMETER,
            query_parameter("replace", {"type": "boolean", "default": False}),
        ),
        body=UPLOAD_BODY,
    ),
    Endpoint(
        "DELETE",
        "/api/v1/data/{name}",
        delete_data,
        "deleteData",
        "data",
        "Delete one of your uploads, named as it was uploaded (uploads/ left out)",
        {"description": "Deleted"},
        (404,),
        auth=True,
        status=204,
        parameters=(UPLOAD_NAME_PARAMETER,),
    ),
    Endpoint(
        "PUT",
        "/api/v1/data/{folder}/{name}",
        upload_data,
        "uploadDataIntoFolder",
        "data",
        "Upload a file into a folder of yours under uploads/ (made by its first file), such as a folder of "
        "transcripts to give as one `data`; a name already taken in it gets -2, -3, ...",
        json_response("Stored", UPLOADED_SCHEMA),
        (400, 404, 409, 413, 422),
        auth=True,
        status=201,
        parameters=(
            UPLOAD_FOLDER_PARAMETER,
            UPLOAD_NAME_PARAMETER,
            query_parameter("replace", {"type": "boolean", "default": False}),
        ),
        body=UPLOAD_BODY,
    ),
    Endpoint(
        "DELETE",
        "/api/v1/data/{folder}/{name}",
        delete_data,
        "deleteDataInFolder",
        "data",
        "Delete a file from a folder of your uploads; the folder goes with its last file",
        {"description": "Deleted"},
        (404,),
        auth=True,
        status=204,
        parameters=(STORED_FOLDER_PARAMETER, UPLOAD_NAME_PARAMETER),
    ),
    Endpoint("GET", "/openapi.json", openapi_json, public=True),
    Endpoint("GET", "/docs", docs_page(SWAGGER_PAGE), public=True),
    Endpoint("GET", "/redoc", docs_page(REDOC_PAGE), public=True),
    Endpoint("GET", "/docs/assets/{name}", docs_asset, public=True),
    Endpoint("GET", "/jobs", jobs_page, page=True),
    Endpoint("GET", "/jobs/{job_id}", job_page, page=True),
    Endpoint("GET", "/compare", compare_page, page=True),
    Endpoint("GET", "/assets/{name}", workbench_asset, public=True),
    Endpoint(
        "GET",
        "/api/v1/webhooks",
        list_webhooks,
        "listWebhooks",
        "webhooks",
        "List webhooks",
        list_of("Webhooks", "Webhook"),
    ),
    Endpoint(
        "POST",
        "/api/v1/webhooks",
        create_webhook,
        "createWebhook",
        "webhooks",
        "Register a webhook",
        one("The webhook", "Webhook"),
        auth=True,
        body=json_body("WebhookRequest"),
        links={"getWebhook": "webhook_id", "deleteWebhook": "webhook_id", "listDeliveries": "webhook_id"},
    ),
    Endpoint(
        "GET",
        "/api/v1/webhooks/{webhook_id}",
        get_webhook,
        "getWebhook",
        "webhooks",
        "Webhook details",
        one("The webhook", "Webhook"),
        (404,),
        parameters=(WEBHOOK_ID_PARAMETER,),
    ),
    Endpoint(
        "DELETE",
        "/api/v1/webhooks/{webhook_id}",
        delete_webhook,
        "deleteWebhook",
        "webhooks",
        "Delete a webhook",
        json_response("Deleted", SUCCESS_SCHEMA),
        (404,),
        auth=True,
        parameters=(WEBHOOK_ID_PARAMETER,),
    ),
    Endpoint(
        "GET",
        "/api/v1/webhooks/{webhook_id}/deliveries",
        list_deliveries,
        "listDeliveries",
        "webhooks",
        "Recent deliveries to a webhook, newest first",
        list_of("Deliveries", "Delivery"),
        (404,),
        parameters=(WEBHOOK_ID_PARAMETER,),
    ),
    Endpoint(
        "POST",
        "/api/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/retry",
        retry_delivery,
        "retryDelivery",
        "webhooks",
        "Send a failed delivery again",
        json_response("Queued", SUCCESS_SCHEMA),
        (404, 409),
        auth=True,
        parameters=(WEBHOOK_ID_PARAMETER, DELIVERY_ID_PARAMETER),
    ),
)
TAGS = (  # the groups /docs shows, in this order
    ("jobs", "Generate personas, follow a job, export its result, cancel it"),
    ("workflow", "Refine, estimate and compare; experiments group a job with its refinements"),
    ("data", "The data directory: list its sources, upload and delete your files"),
    ("webhooks", "Be told when a job ends; see and retry each delivery"),
    ("service", "What the server is and runs, and whether it is healthy"),
)


CallerCheck = Callable[[Request], str | None]  # the caller, or None when a page must ask for a token first


def caller_check(endpoint: Endpoint, private: bool) -> CallerCheck | None:
    """How an endpoint knows its caller: by token to write, and on a private server to read (a page by its cookie)."""
    if endpoint.auth:
        return authenticate
    if not private or endpoint.public:
        return None
    return page_caller if endpoint.page else reader


def reader(request: Request) -> str:
    """Who reads an API resource of a private server: by the token sent, or else by the workbench's cookie,
    so that a link on a page (an export) opens as the page did."""
    if request_header(request, b"authorization") is None:
        owner = page_caller(request)
        if owner is not None:
            return owner
    return authenticate(request)


def path_handler(methods: dict[str, tuple[Handler, CallerCheck | None]]) -> Handler:
    """One route per path serving each of its methods, so that a 405 lists every allowed one.

    Where the method needs its caller known, the caller is `caller(request)` before its handler
    runs; a page whose caller is not known is the sign-in page instead."""

    async def dispatch(request: Request) -> Response:
        handler, check = methods["GET" if request.method == "HEAD" else request.method]
        if check is not None:
            owner = check(request)
            if owner is None:
                return sign_in_page(request)
            request.scope[CALLER] = owner
        return await handler(request)

    return dispatch


def route_of(path: str, methods: dict[str, tuple[Handler, CallerCheck | None]]) -> Route:
    """A path's route: its one method's handler itself when it needs no caller known, else a dispatch."""
    handler, check = next(iter(methods.values()))
    direct = len(methods) == 1 and check is None
    return Route(path, handler if direct else path_handler(methods), methods=list(methods))


def routes_of(endpoints: Iterable[Endpoint], private: bool) -> list[Route]:
    """The router's routes: one per path, in the table's order, each method's handler with its caller check."""
    paths: dict[str, dict[str, tuple[Handler, CallerCheck | None]]] = {}
    for endpoint in endpoints:
        paths.setdefault(endpoint.path, {})[endpoint.method] = (endpoint.handler, caller_check(endpoint, private))
    return [route_of(path, methods) for path, methods in paths.items()]


def openapi_operation(endpoint: Endpoint, private: bool) -> JSON:
    """What the API document says of one endpoint; on a private server every read but the public ones needs a token."""
    if endpoint.responses is not None:
        spec: JSON = {"summary": endpoint.summary, "responses": endpoint.responses}
    else:
        takes_json = endpoint.body is not None and "application/json" in endpoint.body["content"]
        spec = operation(
            endpoint.summary,
            endpoint.ok,
            endpoint.errors,
            endpoint.auth or (private and not endpoint.public),
            takes_json,
            list(endpoint.parameters),
        )
        spec["responses"] = {
            (str(endpoint.status) if code == "200" else code): response for code, response in spec["responses"].items()
        }
        if endpoint.body is not None:
            spec["requestBody"] = endpoint.body
        if endpoint.links:
            spec["responses"][str(endpoint.status)]["links"] = {
                target: {"operationId": target, "parameters": {name: f"$response.body#/{name}"}}
                for target, name in endpoint.links.items()
            }
    return {**spec, "operationId": endpoint.operation_id, "tags": [endpoint.tag]}


def openapi_document(private: bool = False) -> JSON:
    """The whole API as OpenAPI 3.1, built from the route table and the schemas the server enforces."""
    paths: JSON = {}
    for endpoint in ENDPOINTS:
        if endpoint.operation_id is not None:
            paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = openapi_operation(endpoint, private)
    rate_header = {"schema": {"type": "integer"}, "required": False}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Persona API",
            "version": __version__,
            "description": "User personas grounded in qualitative research data.",
        },
        "servers": [{"url": "/"}],
        "tags": [{"name": name, "description": description} for name, description in TAGS],
        "paths": paths,
        "components": {
            "schemas": {
                "GenerateRequest": GENERATE_SCHEMA,
                "RefineRequest": REFINE_SCHEMA,
                "WebhookRequest": WEBHOOK_SCHEMA,
                "Job": JOB_SCHEMA,
                "JobSummary": JOB_SUMMARY_SCHEMA,
                "Experiment": EXPERIMENT_SCHEMA,
                "Persona": PERSONA_SCHEMA,
                "Webhook": WEBHOOK_OUT_SCHEMA,
                "Delivery": DELIVERY_SCHEMA,
                "Error": ERROR_SCHEMA,
            },
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Needed on write endpoints when the server has a token",
                }
            },
            "headers": {
                "X-RateLimit-Limit": {**rate_header, "description": "requests allowed per minute"},
                "X-RateLimit-Remaining": {**rate_header, "description": "requests left in this minute"},
                "X-RateLimit-Reset": {**rate_header, "description": "when the window resets, epoch seconds"},
            },
        },
    }


# ---------------------------------------------------------------------------
# HTTP layer: errors and the app
# ---------------------------------------------------------------------------


async def storage_error(request: Request, exc: Exception) -> JSONResponse:
    """The database cannot be used: a 503, as the reference answers a server that cannot serve for now."""
    assert isinstance(exc, StorageUnavailable)
    message = f"The database cannot be used right now ({exc.reason}); nothing was saved; try again shortly"
    return JSONResponse(error_envelope("internal_error", message, {"reason": exc.reason}), status_code=503)


async def api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return JSONResponse(error_envelope(exc.code, exc.message, exc.details), status_code=exc.status, headers=exc.headers)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own 404 and 405, in the reference's envelope."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"No endpoint at {request.url.path}"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"Method {request.method} is not allowed on {request.url.path}; allowed: {allowed}"
    else:
        message = str(exc.detail)
    code = ERROR_CODES.get(exc.status_code, "invalid_input")
    return JSONResponse(error_envelope(code, message), status_code=exc.status_code, headers=exc.headers)


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    """Last resort: a 500 without a traceback; the server still logs the error.

    Refusals raised in middleware, outside the routes' own handlers, arrive here too.
    """
    if isinstance(exc, APIError):
        return await api_error(request, exc)
    if isinstance(exc, StorageUnavailable):
        return await storage_error(request, exc)
    if isinstance(exc, OSError):
        message = f"The server cannot use its files right now ({exc.strerror or type(exc).__name__}); try again shortly"
        return JSONResponse(error_envelope("internal_error", message), status_code=503)
    return JSONResponse(error_envelope("internal_error", "Internal server error; see the server log"), status_code=500)


def describe_startup(settings: Settings) -> str:
    keys = len(settings.auth_tokens) + len(settings.admin_tokens)
    admins = f", {len(settings.admin_tokens)} admin" if settings.admin_tokens else ""
    private = ", private" if settings.private else ""
    auth = f"on ({keys} key{'s' if keys != 1 else ''}{admins}{private})" if keys else "off"
    rate_limit = f"{settings.rate_limit}/min" if settings.rate_limit else "off"
    return (
        f"Persona {__version__} starting on http://{settings.host}:{settings.port}; database {shown_db(settings.db)}; "
        f"data dir {settings.data_dir.resolve()}; output dir {settings.output_dir.resolve()}; auth {auth}; "
        f"rate limit {rate_limit}; private URLs {'allowed' if settings.private_urls_allowed else 'refused'}; "
        f"workbench http://{settings.host}:{settings.port}/jobs, API docs /docs"
    )


@contextlib.contextmanager
def collector_tuned_for_requests() -> Iterator[None]:
    """The process's garbage collector tuned for many short requests while the app serves.

    A request holds a few dozen container objects while it waits on the database.
    At Python's default threshold a young collection runs every few requests, finds
    the in-flight requests' objects alive and promotes them; their count soon forces
    full collections, each walking every long-lived object. Under load that was 15%
    of the CPU. The young generation collects after GC_YOUNG_THRESHOLD net
    allocations, more than a few hundred requests in flight hold, and what lives
    after start-up (modules, settings, the app) is frozen out of collections. When
    the app stops, the collector is as it was, for a process that goes on without it.
    """
    thresholds, frozen_before = gc.get_threshold(), gc.get_freeze_count()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        if not frozen_before:  # a process that froze objects itself keeps them frozen
            gc.unfreeze()


def hear_news(app_state: Any, news: str) -> None:
    """Another host's news, heard through the store: start a queued job, stop a cancelled one, send a delivery."""
    if news == "jobs":
        app_state.runner.wake()
    elif news == "deliveries":
        app_state.dispatcher.wake()
    elif news.startswith("cancel:"):
        app_state.runner.cancel_local(news.removeprefix("cancel:"))


def configure_logging(level: str) -> None:
    numeric = 5 if level == "trace" else getattr(logging, level.upper())
    logging.basicConfig(level=numeric, format="%(levelname)s:     %(message)s")
    log.setLevel(numeric)
    # These log every URL, and every SQL statement with its parameters, at INFO and DEBUG:
    # a URL or a webhook secret may be among them.
    for name in QUIET_LOGGERS:  # they log whole requests at DEBUG: URLs with tokens, SQL with secrets, interview text
        logging.getLogger(name).setLevel(logging.WARNING)


def create_app(settings: Settings | None = None) -> Starlette:
    """The ASGI app; `uvicorn persona:create_app --factory` builds it from PERSONA_* variables."""
    settings = settings or load_settings()
    configure_logging(settings.log_level)  # worker and reload processes start with no logging set up

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = open_store(settings)
        await store.open()
        await asyncio.to_thread(mark_output_folder, settings.output_dir)
        removed = await asyncio.to_thread(remove_partial_folders, settings.output_dir)
        if removed:
            log.warning("removed %d half-written output folder(s) left by a crash", removed)
        app.state.store = store
        if settings.rate_limit:
            app.state.limiter = (
                RateLimiter(settings.rate_limit, store)
                if settings.workers == 1
                else SharedRateLimiter(settings.rate_limit, store)
            )
        app.state.dispatcher = WebhookDispatcher(store, settings)
        app.state.runner = JobRunner(store, settings, app.state.dispatcher.wake)
        app.state.dispatcher.start()
        app.state.runner.start()
        store.listen(functools.partial(hear_news, app.state))
        log.info(describe_startup(settings))
        try:
            with collector_tuned_for_requests():
                yield
        finally:
            try:
                await app.state.runner.stop()
                await app.state.dispatcher.stop()
            finally:
                await store.close()

    app = Starlette(
        routes=routes_of(ENDPOINTS, settings.private),
        middleware=[Middleware(HostCheckMiddleware), Middleware(RateLimitMiddleware)],
        exception_handlers={
            APIError: api_error,
            StorageUnavailable: storage_error,
            HTTPException: http_error,
            Exception: server_error,
        },
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # a redirect would echo the request's Host header; 404 in the envelope
    app.state.settings = settings
    app.state.openapi = json_bytes(openapi_document(settings.private))
    app.state.limiter = None
    app.state.token_owners = token_owners(settings.auth_tokens, settings.admin_tokens)
    app.state.token_digests = tuple(app.state.token_owners)
    app.state.estimates = Counter()  # estimates being made, per owner: they count in the concurrent-jobs quota
    return app


# ---------------------------------------------------------------------------
# Python client
# ---------------------------------------------------------------------------

CLIENT_RETRY_AFTER_CAP_S = 60.0  # the longest a client waits on one 429 before trying again


class PersonaAPIError(Exception):
    """An error answer from a Persona server, with the envelope's fields."""

    def __init__(self, status_code: int, error: str, message: str, details: JSON | None = None) -> None:
        super().__init__(f"{status_code} {error}: {message}")
        self.status_code = status_code
        self.error = error
        self.message = message
        self.details = details or {}


class PersonaClient:
    """The REST API from Python: `PersonaClient().generate("interviews.csv")`.

    A 429 is retried after its Retry-After, at most `max_retries` times; any other
    error answer raises PersonaAPIError.
    """

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        token: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 3,
    ) -> None:
        import httpx

        headers = {b"Authorization": f"Bearer {token}".encode()} if token else {}  # UTF-8, as the server reads it
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self.max_retries = max_retries

    def __enter__(self) -> PersonaClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        """The successful response, after waiting out 429s; any other error answer raises PersonaAPIError."""
        for attempt in range(self.max_retries + 1):
            response = self.http.request(method, path, **kwargs)
            if response.status_code != 429 or attempt == self.max_retries:
                break
            time.sleep(min(parse_retry_after(response.headers.get("retry-after")) or 1.0, CLIENT_RETRY_AFTER_CAP_S))
        if response.is_success:
            return response
        try:
            body = response.json()
            raise PersonaAPIError(response.status_code, body["error"], body["message"], body.get("details"))
        except (ValueError, KeyError, TypeError):
            raise PersonaAPIError(
                response.status_code, "http_error", response.text[:200] or response.reason_phrase
            ) from None

    def generate(
        self, data: str | list[Any], count: int = DEFAULT_COUNT, idempotency_key: str | None = None, **kwargs: Any
    ) -> JSON:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._request("POST", "/api/v1/generate", json={"data": data, "count": count, **kwargs}, headers=headers)

    def list_data(self) -> list[JSON]:
        """The sources in the server's data directory."""
        return self._request("GET", "/api/v1/data")

    def upload(self, name: str, content: bytes) -> JSON:
        """Store a file in the server's data directory, under uploads/ (`folder/name.txt` puts it in a folder of
        yours); returns its `name` to give as `data`."""
        path = "/".join(url_quote(part, safe="") for part in name.split("/", 1))  # a name may hold a space or a #
        return self._request(
            "PUT", f"/api/v1/data/{path}", content=content, headers={"Content-Type": "application/octet-stream"}
        )

    def upload_folder(self, folder: str | Path) -> str:
        """Store every file of a supported format in a local folder (its subfolders' too) in one folder of
        yours under uploads/; returns the folder's name to give as `data`."""
        local = Path(folder)
        files = sorted(
            path
            for path in local.rglob("*")
            if path.is_file()
            and path.suffix.lower() in FORMATS
            and not any(part.startswith(".") for part in path.relative_to(local).parts)  # hidden: no one's data
        )
        if not files:
            raise ValueError(f"{local} holds no file of a format Persona reads ({', '.join(FORMATS)})")
        stored = [self.upload(f"{local.resolve().name}/{path.name}", path.read_bytes())["name"] for path in files]
        return stored[0].rsplit("/", 1)[0]

    def delete_upload(self, name: str) -> None:
        """Delete one of your uploads, named as upload() named it (with or without `uploads/`)."""
        self._send("DELETE", f"/api/v1/data/{name.removeprefix('uploads/')}")

    def estimate(self, data: str | list[Any], count: int = DEFAULT_COUNT, **kwargs: Any) -> JSON:
        """What generate() with the same arguments would send and cost; creates nothing."""
        return self._request("POST", "/api/v1/estimate", json={"data": data, "count": count, **kwargs})

    def get_job(self, job_id: str) -> JSON:
        return self._request("GET", f"/api/v1/generate/{job_id}")

    def wait_for_job(
        self,
        job_id: str,
        timeout: float = 300,
        interval: float = 2.0,
        on_progress: Callable[[JSON], None] | None = None,
    ) -> JSON:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["status"] in ("completed", "failed"):
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Job {job_id} did not complete within {timeout}s")
            time.sleep(interval)

    def list_jobs(self, status: str | None = None, limit: int | None = None, offset: int | None = None) -> list[JSON]:
        params = {
            key: value for key, value in (("status", status), ("limit", limit), ("offset", offset)) if value is not None
        }
        return self._request("GET", "/api/v1/generate", params=params)

    def cancel_job(self, job_id: str) -> JSON:
        return self._request("DELETE", f"/api/v1/generate/{job_id}")

    def list_experiments(self, limit: int | None = None, offset: int | None = None) -> list[JSON]:
        params = {key: value for key, value in (("limit", limit), ("offset", offset)) if value is not None}
        return self._request("GET", "/api/v1/experiments", params=params)

    def get_experiment(self, experiment_id: str) -> JSON:
        return self._request("GET", f"/api/v1/experiments/{experiment_id}")

    def refine(
        self,
        job_id: str,
        data: str | list[Any] | None = None,
        instruction: str | None = None,
        idempotency_key: str | None = None,
        **kwargs: Any,
    ) -> JSON:
        """A new job refining a completed one with more data, an instruction or both."""
        body = {key: value for key, value in (("data", data), ("instruction", instruction)) if value is not None}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._request("POST", f"/api/v1/generate/{job_id}/refine", json={**body, **kwargs}, headers=headers)

    def compare(self, a: str, b: str) -> JSON:
        """Two completed jobs' personas, paired, with what each pair shares field by field."""
        return self._request("GET", "/api/v1/compare", params={"a": a, "b": b})

    def export(self, job_id: str, format: str = "csv") -> bytes:
        """A completed job's personas as the file's bytes, in one of the export formats (csv, xlsx, json, markdown,
        html, qdpx, qdc, segments)."""
        return self._send("GET", f"/api/v1/generate/{job_id}/export", params={"format": format}).content

    def create_webhook(self, url: str, events: list[str] | None = None, secret: str | None = None) -> JSON:
        body = {
            key: value for key, value in (("url", url), ("events", events), ("secret", secret)) if value is not None
        }
        return self._request("POST", "/api/v1/webhooks", json=body)

    def get_webhook(self, webhook_id: str) -> JSON:
        return self._request("GET", f"/api/v1/webhooks/{webhook_id}")

    def list_webhooks(self) -> list[JSON]:
        return self._request("GET", "/api/v1/webhooks")

    def delete_webhook(self, webhook_id: str) -> JSON:
        return self._request("DELETE", f"/api/v1/webhooks/{webhook_id}")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

SERVE_OPTIONS = (
    # (flags, setting, help); {default} is the setting's default, from Settings
    (("--host", "-h"), "host", "address to listen on (default {default})"),
    (("--port", "-p"), "port", "port to listen on (default {default})"),
    (("--workers", "-w"), "workers", "worker processes (default {default})"),
    (
        ("--auth-token",),
        "auth_tokens",
        "API token for write endpoints; a comma-separated list gives several, and team:token entries make teams",
    ),
    (
        ("--admin-token",),
        "admin_tokens",
        "a token that may also cancel, refine and manage every key's jobs and webhooks; comma-separated for several",
    ),
    (("--log-level",), "log_level", "logging level: " + ", ".join(LOG_LEVELS) + " (default {default})"),
    (("--db",), "db", "SQLite database file (default {default}), or a postgresql:// URL"),
    (("--data-dir",), "data_dir", "where data paths are resolved; nothing outside it is read (default {default})"),
    (("--output-dir",), "output_dir", "where each job writes its folder (default {default})"),
    (("--rate-limit",), "rate_limit", "requests per minute per client IP, 0 for none (default {default})"),
    (("--max-concurrent-jobs",), "max_concurrent_jobs", "pending plus running jobs per API key (default {default})"),
    (
        ("--allowed-hosts",),
        "allowed_hosts",
        "Host names a server on loopback answers besides localhost, 127.0.0.1 "
        "and [::1], comma-separated (default {default})",
    ),
    (
        ("--webhook-retry-schedule",),
        "webhook_retry_schedule",
        "seconds between webhook attempts, comma-separated (default {default})",
    ),
    (("--webhook-timeout",), "webhook_timeout", "seconds one webhook attempt may take (default {default})"),
    (
        ("--retention-days",),
        "retention_days",
        "delete finished jobs, their deliveries and output folders this many "
        "days after they finished (default {default}: keep them)",
    ),
    (("--attempts-kept",), "attempts_kept", "delivery attempts kept per delivery, the newest (default {default})"),
    (
        ("--max-source-mb",),
        "max_source_mb",
        "largest local data source (a file, or a folder's files together) in MiB (default {default})",
    ),
)


def shown_default(name: str) -> str:
    """A setting's default as the command line writes it: `5,60,300`, `10`, `none`."""
    value = next(spec.default for spec in fields(Settings) if spec.name == name)
    if isinstance(value, tuple):
        return ",".join(f"{item:g}" if isinstance(item, float) else str(item) for item in value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona", description="User personas grounded in qualitative research.")
    parser.add_argument("--version", action="version", version=f"persona {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        add_help=False,
        help="run the REST API server",
        description="Run the REST API server. Every option also reads a PERSONA_* variable.",
    )
    serve.add_argument("--help", action="help", help="show this help and exit")
    for flags, name, text in SERVE_OPTIONS:
        shown = text.format(default=shown_default(name))
        serve.add_argument(*flags, dest=name, default=None, metavar="VALUE", help=f"{shown} [env {ENV_VARS[name]}]")
    serve.add_argument("--reload", action="store_true", help="reload on code changes (development)")
    serve.add_argument(
        "--redact",
        nargs="?",
        const="on",
        choices=("on", "required"),
        default=None,
        help="replace e-mail addresses, phone numbers, URLs, postal codes, card numbers and names with "
        "placeholders before any provider sees the data, unless a request's config.redact is false; "
        f"--redact=required: in every job, whatever a request says (default {shown_default('redact')}) "
        "[env PERSONA_REDACT: 1, 0 or required]",
    )
    serve.add_argument("--no-redact", dest="redact", action="store_const", const="off", help="no redaction by default")
    serve.add_argument(
        "--private",
        action="store_true",
        default=None,
        help="every read needs an API token and shows each key or team only its own jobs, results, experiments, "
        "webhooks, deliveries and uploads; needs --auth-token [env PERSONA_PRIVATE]",
    )
    serve.add_argument(
        "--allow-private-urls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let webhooks and data URLs reach loopback and private addresses "
        "(default: allowed when listening on loopback) [env PERSONA_ALLOW_PRIVATE_URLS]",
    )

    generate_cmd = commands.add_parser(
        "generate", help="generate personas from a data file or folder, without a server"
    )
    generate_cmd.add_argument(
        "data",
        help="a survey export (CSV, TSV, Excel, JSON, JSON Lines), transcripts (text, Markdown, Word, captions), "
        "a QDA project (.qdpx), or a folder of them",
    )
    generate_cmd.add_argument(
        "--count",
        "-n",
        type=int,
        help=f"number of personas, 1 to 20 (default {DEFAULT_COUNT}; with group_by, one per group up to 20)",
    )
    generate_cmd.add_argument(
        "--provider",
        default=None,
        choices=PROVIDER_NAMES,
        help="anthropic, openai, gemini, ollama or local (default: as the server chooses)",
    )
    generate_cmd.add_argument("--model", default=None, help="model identifier")
    generate_cmd.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="generation setting such as detail_level=detailed; repeatable",
    )
    generate_cmd.add_argument(
        "--groups", metavar="FILE", help='a JSON file {"Group name": ["participant id", ...]}: one persona per group'
    )
    generate_cmd.add_argument("--output-dir", default="output", help="where the output folder goes (default ./output)")
    generate_cmd.add_argument("--json", action="store_true", help="print the job result as JSON on stdout")
    generate_cmd.add_argument(
        "--estimate",
        action="store_true",
        help="print what the job would send to its provider and cost, and generate nothing",
    )
    generate_cmd.add_argument("--server", metavar="URL", help="submit to a running server instead of generating here")
    generate_cmd.add_argument(
        "--auth-token",
        default=os.environ.get("PERSONA_API_AUTH_TOKEN"),
        help="API token for --server [env PERSONA_API_AUTH_TOKEN]",
    )

    jobs_cmd = server_command(commands, "jobs", "list a server's jobs")
    jobs_cmd.add_argument("--status", choices=JOB_STATUSES, help="only jobs in this status")
    jobs_cmd.add_argument("--limit", type=int, default=100, help="how many (default 100)")

    experiments_cmd = server_command(commands, "experiments", "list a server's experiments, or one with its jobs")
    experiments_cmd.add_argument("experiment_id", nargs="?", help="show this experiment's jobs")
    experiments_cmd.add_argument("--limit", type=int, default=100, help="how many (default 100)")

    refine_cmd = server_command(
        commands, "refine", "refine a completed job's personas with more data or an instruction"
    )
    refine_cmd.add_argument("job_id", help="the completed job to refine")
    refine_cmd.add_argument("--data", help="more data: a path in the server's data directory, or a URL")
    refine_cmd.add_argument("--instruction", help="what to change (an LLM provider only)")
    refine_cmd.add_argument("--count", "-n", type=int, help="number of personas (default: the job's)")
    refine_cmd.add_argument("--provider", choices=PROVIDER_NAMES, help="provider (default: the job's)")
    refine_cmd.add_argument("--model", help="model (default: the job's, with its provider)")
    refine_cmd.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="generation setting, replacing the job's; repeatable",
    )
    refine_cmd.add_argument("--json", action="store_true", help="print the new job's result as JSON")

    compare_cmd = server_command(commands, "compare", "pair two runs' personas and show what each pair shares")
    compare_cmd.add_argument("a", help="a job id (on --server), or an output folder")
    compare_cmd.add_argument("b", help="another job id, or another output folder")
    compare_cmd.add_argument("--json", action="store_true", help="print the comparison as JSON")

    export_cmd = server_command(
        commands,
        "export",
        "download a completed job's personas as CSV, Excel, JSON, Markdown, HTML, a QDA project (qdpx), "
        "a QDA codebook (qdc) or coded segments (CSV)",
    )
    export_cmd.add_argument("job_id", help="the job")
    export_cmd.add_argument(
        "--format", "-f", choices=list(EXPORT_FORMATS), default="csv", help="the file's format (default csv)"
    )
    export_cmd.add_argument("--output", "-o", metavar="FILE", help="where to write it (default: standard output)")
    return parser


def server_command(commands: Any, name: str, text: str) -> argparse.ArgumentParser:
    """A command that talks to a running server: --server and --auth-token."""
    command = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
    command.add_argument(
        "--server", metavar="URL", default="http://localhost:8000", help="the server (default http://localhost:8000)"
    )
    command.add_argument(
        "--auth-token", default=os.environ.get("PERSONA_API_AUTH_TOKEN"), help="API token [env PERSONA_API_AUTH_TOKEN]"
    )
    return command


def app_module() -> str:
    """This module's import name, for worker processes to import the app by: `persona`, or
    `myapp.vendor.persona` when vendored into a package and run as `python -m myapp.vendor.persona`."""
    spec = globals().get("__spec__")
    return spec.name if spec is not None and spec.name != "__main__" else Path(__file__).stem


def run_server(args: argparse.Namespace) -> int:
    import uvicorn

    overrides = {name: getattr(args, name) for _, name, _ in SERVE_OPTIONS}
    if args.allow_private_urls is not None:
        overrides["allow_private_urls"] = "1" if args.allow_private_urls else "0"
    if args.redact is not None:
        overrides["redact"] = {"on": "1", "off": "0"}.get(args.redact, args.redact)
    if args.private:
        overrides["private"] = "1"
    settings = load_settings(overrides)
    if not settings.data_dir.is_dir():
        raise ConfigError(f"the data directory {settings.data_dir} does not exist (--data-dir / PERSONA_DATA_DIR)")
    if isinstance(settings.db, str):
        asyncpg_module()  # a missing driver is said before serving, in one line
    configure_logging(settings.log_level)
    if settings.workers > 1 or args.reload:
        # Worker processes import the app afresh; the variables carry every option to them.
        os.environ.update(settings_to_env(settings))
        target: Any = f"{app_module()}:create_app"
    else:
        target = create_app(settings)
    uvicorn.run(
        target,
        factory=isinstance(target, str),
        host=settings.host,
        port=settings.port,
        workers=settings.workers if not args.reload else None,
        reload=args.reload,
        log_level=settings.log_level,
        proxy_headers=False,
        server_header=False,
    )
    return 0


def parse_config_pairs(pairs: list[str]) -> JSON:
    """`--config temperature=0.4` gives text; numbers and true/false become JSON's, so validation can judge them."""
    config: JSON = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--config takes KEY=VALUE, got {pair!r}")
        value = value.strip()
        is_json = re.fullmatch(r"-?(0|[1-9]\d*)(\.\d+)?|true|false", value)
        config[key.strip()] = json.loads(value) if is_json else value
    return config


def print_summary(result: JSON) -> None:
    metadata = result.get("metadata", {})
    for warning in metadata.get("warnings", []):
        print(f"note: {warning}")
    if metadata.get("warnings"):
        print()
    quality = {entry["id"]: entry for entry in metadata.get("quality", {}).get("personas", [])}
    for persona in result["personas"]:
        share = persona.get("evidence", {}).get("share")
        # a dash, as a title can hold a colon itself ("Role: nurse")
        print(
            f"{persona['name']} — {persona['title']}" + (f" ({share:.0%} of participants)" if share is not None else "")
        )
        for label, key in (("goal", "goals"), ("pain point", "pain_points")):
            for item in persona[key][:2]:
                print(f"  {label}: {item}")
        if persona["quotes"]:
            print(f'  quote: "{persona["quotes"][0]}"')
        if persona.get("id") in quality:
            print(f"  {quality_line(quality[persona['id']]).lower()}")
        print()
    if metadata.get("quality"):
        print(coverage_line(metadata["quality"]).capitalize())
    print(f"Job: {metadata['job_id']}")
    print(f"Output: {result['output_path']}")


class UsageError(Exception):
    """A command line that cannot work as given; exit status 2."""


class ProgressDisplay:
    """Progress on stderr: a live bar on a terminal, a plain line per change otherwise."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.last: tuple[int, str] | None = None

    def update(self, progress: int, stage: str) -> None:
        if (progress, stage) == self.last:
            return
        self.last = (progress, stage)
        if self.live:
            filled = progress * 30 // 100
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {progress:3d}% {stage[:40]:<40}")
        else:
            self.stream.write(f"[{progress:3d}%] {stage}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live and self.last is not None:
            self.stream.write("\n")
            self.stream.flush()


def generation_body(args: argparse.Namespace) -> JSON:
    body: JSON = {"data": args.data, "count": args.count, "provider": args.provider, "model": args.model}
    if args.config:
        body["config"] = parse_config_pairs(args.config)
    if args.groups:
        body.setdefault("config", {})["groups"] = read_groups_file(args.groups)
    return {key: value for key, value in body.items() if value is not None}


def read_groups_file(name: str) -> Any:
    """`--groups FILE`: the researcher's grouping, checked like any request when it is sent."""
    try:
        return json.loads(Path(name).read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"--groups cannot read {name}: {exc.strerror or type(exc).__name__}") from None
    except ValueError as exc:
        raise ConfigError(f"--groups {name} is not valid JSON: {exc}") from None


def local_job(args: argparse.Namespace, need_key: bool = True) -> tuple[JSON, Settings]:
    """The request and settings for running the server's pipeline here, on the user's own file or folder."""
    try:
        is_path = classify_data(args.data) == "path"
        if is_path and not Path(args.data).exists():
            raise UsageError(f"{args.data} does not exist")
        request = validated(generation_body(args), GENERATE_CHECK)
        request["provider"] = resolve_provider(request, need_key)
        check_llm_options(request)
        redact_by_default(request, parse_setting("redact", os.environ.get(ENV_VARS["redact"], "0")))
        data_dir = Path.cwd()
        if is_path:
            path = Path(args.data).resolve()
            request["data"], data_dir = (path.name, path.parent) if path.is_file() else (".", path)
            resolve_data_path(request["data"], data_dir)
    except APIError as exc:
        raise UsageError(exc.message) from None
    cap = os.environ.get(ENV_VARS["max_source_mb"])  # the one server setting that applies here too
    return request, Settings(
        data_dir=data_dir,
        output_dir=Path(args.output_dir),
        allow_private_urls=True,
        max_source_mb=parse_setting("max_source_mb", cap) if cap else Settings.max_source_mb,
    )


def generate_locally(args: argparse.Namespace, display: ProgressDisplay) -> JSON:
    request, settings = local_job(args)
    group_by = request.get("config", {}).get("group_by")
    if args.count is None and group_by is not None:  # a researcher who groups wants a persona per group
        dataset = asyncio.run(load_data(request["data"], settings))
        request["count"] = max(1, min(20, group_count(grouping_key(group_by, dataset), dataset)))

    async def report(progress: int, stage: str) -> None:
        display.update(progress, stage)

    result = asyncio.run(generate(new_job_id(), request, new_id("exp"), settings, report))
    display.update(100, "done")
    return result


def generate_remotely(args: argparse.Namespace, display: ProgressDisplay) -> JSON:
    """Submit to a running server and follow the job with the same progress display."""
    return submit_and_follow(args, display, lambda client: client.generate(**generation_body(args)))


def submit_and_follow(
    args: argparse.Namespace, display: ProgressDisplay, submit: Callable[[PersonaClient], JSON]
) -> JSON:
    """A job made on the --server, followed to its end; its result, or its error as a GenerationError."""
    with PersonaClient(server_url(args.server), args.auth_token) as client:
        try:
            job_id = submit(client)["job_id"]
        except PersonaAPIError as exc:
            raise UsageError(exc.message) from None
        job = client.wait_for_job(
            job_id,
            timeout=24 * 3600,
            interval=0.5,
            on_progress=lambda job: display.update(job["progress"], job["status"]),
        )
    if job["status"] == "failed":
        raise GenerationError(job["error"])
    return job["result"]


def server_url(url: str) -> str:
    return url if "://" in url else f"http://{url}"


def estimate_here_or_there(args: argparse.Namespace) -> JSON:
    if args.server:
        return ask_server(args, lambda client: client.estimate(**generation_body(args)))
    request, settings = local_job(args, need_key=False)
    return asyncio.run(estimate_job(request, settings))


def print_estimate(estimate: JSON) -> None:
    cost = "unknown" if estimate["cost_usd"] is None else f"${estimate['cost_usd']:.4f}"
    for label, value in (
        ("participants", estimate["participants"]),
        ("provider", estimate["provider"]),
        ("model", estimate["model"]),
        ("strategy", estimate["strategy"]),
        ("calls", estimate["calls"]),
        ("input tokens", f"{estimate['input_tokens']:,}"),
        ("output tokens", f"{estimate['output_tokens']:,}"),
        ("cost (USD)", cost),
    ):
        print(f"{label:<14} {value}")
    for warning in estimate["warnings"]:
        print(f"note: {warning}")


def run_estimate(args: argparse.Namespace) -> int:
    estimate = estimate_here_or_there(args)
    if args.json:
        print(json.dumps(estimate, indent=2, ensure_ascii=False))
    else:
        print_estimate(estimate)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    if args.estimate:
        return run_estimate(args)
    return run_job(
        args, lambda display: generate_remotely(args, display) if args.server else generate_locally(args, display)
    )


def run_refine(args: argparse.Namespace) -> int:
    body: JSON = {
        "data": args.data,
        "instruction": args.instruction,
        "count": args.count,
        "provider": args.provider,
        "model": args.model,
        "config": parse_config_pairs(args.config) if args.config else None,
    }
    asked = {key: value for key, value in body.items() if value is not None}
    return run_job(
        args, lambda display: submit_and_follow(args, display, lambda client: client.refine(args.job_id, **asked))
    )


def print_changes(changes: JSON) -> None:
    for persona in changes["personas"]:
        counts = ", ".join(
            f"{key.replace('_', ' ')} +{len(change['added'])} -{len(change['removed'])}"
            for key, change in persona["fields"].items()
        )
        print(
            f"changed {persona['name']} ({persona['id']}): {counts}"
            if counts
            else f"unchanged {persona['name']} ({persona['id']})"
        )
    for label in changes["new"]:
        print(f"new {label['name']} ({label['id']}): {label['title']}")
    for label in changes["gone"]:
        print(f"gone {label['name']} ({label['id']}): {label['title']}")


def run_job(args: argparse.Namespace, make: Callable[[ProgressDisplay], JSON]) -> int:
    """Make a job's result with a progress display, then print it; exit 1 when it fails."""
    import httpx

    display = ProgressDisplay()
    try:
        result = make(display)
    except httpx.HTTPError as exc:
        display.close()
        print(f"persona: cannot reach the server at {args.server} ({type(exc).__name__})", file=sys.stderr)
        return 1
    except UsageError as exc:
        display.close()
        print(f"persona: {exc}", file=sys.stderr)
        return 2
    except (GenerationError, PersonaAPIError, OSError) as exc:
        display.close()
        print(f"persona: generation failed: {exc}", file=sys.stderr)
        return 1
    display.close()
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    print_summary(result)
    if "changes" in result:
        print()
        print_changes(result["changes"])
    return 0


class ServerUnreachable(Exception):
    """The --server did not answer; exit status 1."""


def ask_server(args: argparse.Namespace, call: Callable[[PersonaClient], Any]) -> Any:
    """One conversation with the --server: its refusals are usage errors, silence is ServerUnreachable."""
    import httpx

    with PersonaClient(server_url(args.server), args.auth_token) as client:
        try:
            return call(client)
        except PersonaAPIError as exc:
            raise UsageError(exc.message) from None
        except httpx.HTTPError as exc:
            raise ServerUnreachable(f"cannot reach the server at {args.server} ({type(exc).__name__})") from None


def run_jobs(args: argparse.Namespace) -> int:
    print_jobs(ask_server(args, lambda client: client.list_jobs(status=args.status, limit=args.limit)))
    return 0


def print_jobs(jobs: list[JSON]) -> None:
    print(f"{'JOB':<18} {'STATUS':<10} {'PROGRESS':>8}  {'CREATED':<20}  ERROR")
    for job in jobs:
        created, error = job["created_at"], job["error"] or ""
        print(f"{job['job_id']:<18} {job['status']:<10} {job['progress']:>7}%  {created:<20}  {error}")


def run_experiments(args: argparse.Namespace) -> int:
    if args.experiment_id:
        experiment = ask_server(args, lambda client: client.get_experiment(args.experiment_id))
        print(
            f"{experiment['experiment_id']}  {experiment['name'] or '(unnamed)'}  created {experiment['created_at']}  "
            f"updated {experiment['updated_at']}\n"
        )
        print_jobs(experiment["jobs"])
        return 0
    experiments = ask_server(args, lambda client: client.list_experiments(limit=args.limit))
    print(f"{'EXPERIMENT':<17} {'JOBS':>5}  {'UPDATED':<20}  NAME")
    for experiment in experiments:
        updated, name = experiment["updated_at"], experiment["name"] or ""
        print(f"{experiment['experiment_id']:<17} {experiment['jobs']:>5}  {updated:<20}  {name}")
    return 0


def folder_personas(folder: str) -> list[JSON]:
    """The personas an output folder holds, for comparing runs without a server."""
    try:
        return json.loads((Path(folder) / "personas.json").read_text("utf-8"))["personas"]
    except OSError as exc:
        raise UsageError(f"{folder} holds no readable personas.json ({exc.strerror or type(exc).__name__})") from None
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{folder}/personas.json is not a Persona output") from None


def print_comparison(comparison: JSON) -> None:
    """Each pair, then per field what only one side has (what both share is counted)."""
    for pair in comparison["pairs"]:
        a, b = pair["a"], pair["b"]
        print(f"{a['name']} ({a['id']}) ~ {b['name']} ({b['id']}): similarity {pair['similarity']:.2f}")
        for key, split in pair["fields"].items():
            if split["only_a"] or split["only_b"]:
                print(f"  {key.replace('_', ' ')} ({len(split['shared'])} shared):")
                print(
                    "".join(f"    a: {item}\n" for item in split["only_a"])
                    + "".join(f"    b: {item}\n" for item in split["only_b"]),
                    end="",
                )
    for side in ("a", "b"):
        for label in comparison["unpaired"][side]:
            print(f"only in {side}: {label['name']} ({label['id']}): {label['title']}")


def run_compare(args: argparse.Namespace) -> int:
    folders = [Path(args.a).is_dir(), Path(args.b).is_dir()]
    for given, is_folder in zip((args.a, args.b), folders):
        if not is_folder and not JOB_ID.match(given):
            raise UsageError(f"{given} is neither an output folder nor a job id (such as job-1651089e0c13)")
    if all(folders):
        comparison = {"a": args.a, "b": args.b, **compare_personas(folder_personas(args.a), folder_personas(args.b))}
    elif any(folders):
        raise UsageError("compare two output folders, or two job ids on --server, not one of each")
    else:
        comparison = ask_server(args, lambda client: client.compare(args.a, args.b))
    if args.json:
        print(json.dumps(comparison, indent=2, ensure_ascii=False))
    else:
        print_comparison(comparison)
    return 0


def run_export(args: argparse.Namespace) -> int:
    document = ask_server(args, lambda client: client.export(args.job_id, args.format))
    if args.output:
        Path(args.output).write_bytes(document)
    else:
        sys.stdout.buffer.write(document)
        sys.stdout.flush()
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": run_server,
    "generate": run_generate,
    "jobs": run_jobs,
    "experiments": run_experiments,
    "refine": run_refine,
    "compare": run_compare,
    "export": run_export,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, UsageError) as exc:
        print(f"persona: {exc}", file=sys.stderr)
        return 2
    except ServerUnreachable as exc:
        print(f"persona: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
