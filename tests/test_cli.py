"""The command line: `persona serve` options and variables, `persona generate`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, Server, clean_environment, free_port, wait_for

import persona

# Its subject is not the store: it runs on SQLite alone (tests/test_store.py and the API,
# webhook, durability and recovery tests run on both stores).
pytestmark = pytest.mark.sqlite_only


def run_persona(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "persona", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def test_serve_help_works_although_h_means_host() -> None:
    result = run_persona("serve", "--help")
    assert result.returncode == 0
    for flag in (
        "--host",
        "-h",
        "--port",
        "-p",
        "--workers",
        "-w",
        "--reload",
        "--auth-token",
        "--log-level",
        "--db",
        "--data-dir",
        "--output-dir",
        "--rate-limit",
        "--max-concurrent-jobs",
    ):
        assert flag in result.stdout


def test_short_options_set_host_and_port(start_server) -> None:
    server = start_server("-h", "127.0.0.1", "-w", "1")
    assert httpx.get(f"http://127.0.0.1:{server.port}/api/v1/health").status_code == 200
    assert f"http://127.0.0.1:{server.port}" in server.log()


def test_settings_come_from_options_then_variables_then_defaults() -> None:
    env = {"PERSONA_RATE_LIMIT": "7", "PERSONA_DB": "/tmp/x.db", "PERSONA_API_AUTH_TOKEN": "a, b,,c"}
    settings = persona.load_settings({"rate_limit": "9", "port": None}, env)
    assert settings.rate_limit == 9
    assert settings.db == Path("/tmp/x.db")
    assert settings.auth_tokens == ("a", "b", "c")
    assert settings.port == 8000 and settings.max_concurrent_jobs == 10 and settings.host == "127.0.0.1"


def test_settings_survive_the_trip_through_variables_to_a_worker() -> None:
    settings = persona.load_settings({"port": "9001", "auth_tokens": "x,y", "workers": "3"}, {})
    assert persona.load_settings({}, persona.settings_to_env(settings)) == settings


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--port", "http"], "--port"),
        (["--rate-limit", "-5"], "--rate-limit"),
        (["--log-level", "loud"], "--log-level"),
    ],
)
def test_a_bad_option_exits_2_with_a_message_naming_it(args: list[str], fragment: str) -> None:
    result = run_persona("serve", *args)
    assert result.returncode == 2
    assert fragment in result.stderr


def test_a_variable_configures_the_server_when_no_option_is_given(start_server) -> None:
    server = start_server(env={"PERSONA_RATE_LIMIT": "3"})
    with server.client() as http:
        assert http.get("/").headers["X-RateLimit-Limit"] == "3"


def test_an_explicit_option_wins_over_its_variable(start_server) -> None:
    server = start_server("--rate-limit", "4", env={"PERSONA_RATE_LIMIT": "3"})
    with server.client() as http:
        assert http.get("/").headers["X-RateLimit-Limit"] == "4"


def test_startup_logs_address_database_directories_and_auth_but_no_token(start_server, workdir: Path) -> None:
    server = start_server("--auth-token", "hunter2-very-secret")
    log = server.log()
    line = next(line for line in log.splitlines() if "starting on" in line)
    assert f"127.0.0.1:{server.port}" in line
    assert server.db in line and str(workdir / "data") in line and str(workdir / "output") in line
    assert "auth on" in line
    assert "hunter2" not in log


def test_uvicorn_can_build_the_app_from_the_factory_and_variables(workdir: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PERSONA_DB": str(workdir / "f.db"),
        "PERSONA_DATA_DIR": str(workdir / "data"),
        "PERSONA_RATE_LIMIT": "6",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "persona:create_app", "--factory", "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def answered() -> httpx.Response | None:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/")
            except httpx.HTTPError:
                return None

        response = wait_for(answered, what="uvicorn to serve the factory app")
        assert response.headers["X-RateLimit-Limit"] == "6"
        assert (workdir / "f.db").exists()
    finally:
        process.kill()
        process.wait(10)


def test_every_option_reaches_every_worker(start_server) -> None:
    server: Server = start_server("--workers", "2", "--rate-limit", "1000", "--auth-token", "wtoken")
    with server.client() as anonymous, server.client("wtoken") as authorised:
        for _ in range(10):
            response = anonymous.post("/api/v1/webhooks", json={"url": "https://example.com/h"})
            assert response.status_code == 401
            assert response.headers["X-RateLimit-Limit"] == "1000"
        assert authorised.post("/api/v1/webhooks", json={"url": "https://example.com/h"}).status_code == 200


def test_version_prints_the_version() -> None:
    result = run_persona("--version")
    assert result.stdout.strip() == f"persona {persona.__version__}"


def test_generate_prints_each_persona_and_the_output_folder(tmp_path: Path) -> None:
    result = run_persona(
        "generate",
        str(ROOT / "examples" / "interviews.csv"),
        "--count",
        "4",
        "--output-dir",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("quote:") == 4
    assert len(re.findall(r"^\S.* — .+ \(\d+% of participants\)$", result.stdout, re.MULTILINE)) == 4
    assert f"Output: {tmp_path}" in result.stdout
    assert "loading data" in result.stderr


def test_generate_json_prints_the_job_result(tmp_path: Path) -> None:
    result = run_persona(
        "generate",
        str(ROOT / "examples" / "transcripts"),
        "-n",
        "3",
        "--json",
        "--config",
        "detail_level=minimal",
        "--output-dir",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert len(body["personas"]) == 3
    assert Path(body["output_path"]).is_dir()


def test_generate_exits_1_when_generation_fails_and_2_on_bad_usage(tmp_path: Path) -> None:
    (tmp_path / "two.csv").write_text(
        "id,response\n1,I want offline maps for my delivery rounds.\n2,I need faster payslips.\n"
    )
    failed = run_persona("generate", str(tmp_path / "two.csv"), "--count", "3", cwd=tmp_path)
    assert failed.returncode == 1
    reason = failed.stderr.strip().splitlines()[-1]
    assert reason.startswith("persona: generation failed:") and "2 participant" in reason
    assert run_persona("generate", str(tmp_path / "missing.csv"), cwd=tmp_path).returncode == 2
    assert run_persona("generate", str(tmp_path / "two.csv"), "--count", "30", cwd=tmp_path).returncode == 2
    assert run_persona("generate", str(tmp_path / "two.csv"), "--config", "colour=red", cwd=tmp_path).returncode == 2


def test_provider_sdks_are_not_imported_until_a_provider_is_used(tmp_path: Path) -> None:
    code = (
        "import sys, persona\n"
        "from pathlib import Path\n"
        "from starlette.testclient import TestClient\n"
        f"settings = persona.Settings(db=Path({str(tmp_path / 'p.db')!r}), data_dir=Path({str(ROOT / 'examples')!r}),"
        f" output_dir=Path({str(tmp_path / 'out')!r}))\n"
        "with TestClient(persona.create_app(settings)) as client:\n"
        "    assert client.get('/api/v1/health').status_code == 200\n"
        "    job = client.post('/api/v1/generate', json={'data': 'interviews.csv'}).json()\n"
        "print(sorted(m for m in ('anthropic', 'openai', 'google.genai') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean_environment(), "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_an_unreachable_server_is_one_line_not_a_traceback() -> None:
    port = free_port()
    for args in (
        ["jobs", "--server", f"127.0.0.1:{port}"],
        ["generate", "x.csv", "--server", f"http://127.0.0.1:{port}"],
    ):
        result = run_persona(*args)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [f"persona: cannot reach the server at {args[-1]} (ConnectError)"]


def test_a_missing_file_is_named_by_the_command_line(tmp_path: Path) -> None:
    result = run_persona("generate", "nope.csv", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == "persona: nope.csv does not exist"


def test_an_unsupported_url_scheme_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_persona("generate", "ftp://example.com/interviews.csv", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "persona: data URL scheme 'ftp' is not supported; use a path, http or https"


def test_serve_refuses_a_data_directory_that_does_not_exist(tmp_path: Path) -> None:
    result = run_persona("serve", "--data-dir", str(tmp_path / "nope"), "--port", str(free_port()))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_each_worker_process_logs_its_startup_line(start_server) -> None:
    server = start_server("--workers", "2", "--auth-token", "never-logged-token")
    wait_for(lambda: server.log().count("starting on") == 2, what="both workers' startup lines")
    assert "never-logged-token" not in server.log()


def test_the_startup_line_says_rate_limit_off_or_per_minute() -> None:
    assert "; rate limit off;" in persona.describe_startup(persona.Settings(rate_limit=0))
    assert "; rate limit 100/min;" in persona.describe_startup(persona.Settings(rate_limit=100))


def test_the_startup_line_says_where_the_workbench_and_the_docs_are() -> None:
    line = persona.describe_startup(persona.Settings(host="127.0.0.1", port=8123))
    assert line.endswith("; workbench http://127.0.0.1:8123/jobs, API docs /docs")


def test_a_persona_vendored_into_a_package_serves_with_several_workers(tmp_path: Path) -> None:
    package = tmp_path / "myapp" / "vendor"
    package.mkdir(parents=True)
    for folder in (tmp_path / "myapp", package):
        (folder / "__init__.py").write_text("")
    # A mark of this copy: the workers serve it, not a `persona` installed beside it (as the tests' own is).
    vendored = (ROOT / "persona.py").read_text(encoding="utf-8")
    marked = vendored.replace(
        '\nif __name__ == "__main__":', '\n__version__ = "0.0.0+vendored"\n\nif __name__ == "__main__":'
    )
    assert marked != vendored
    (package / "persona.py").write_text(marked, encoding="utf-8")
    (tmp_path / "data").mkdir()
    port = free_port()
    command = [sys.executable, "-m", "myapp.vendor.persona", "serve", "--workers", "2", "--port", str(port)]
    env = {key: value for key, value in clean_environment().items() if key != "PYTHONPATH"}
    with open(tmp_path / "server.log", "wb") as log:
        process = subprocess.Popen(
            [*command, "--data-dir", "data", "--db", str(tmp_path / "p.db")],
            cwd=tmp_path,
            env={**env, "TMPDIR": str(tmp_path)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def healthy() -> bool:
            assert process.poll() is None, (tmp_path / "server.log").read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, what="the vendored server to answer")
        wait_for(lambda: (tmp_path / "server.log").read_text().count("starting on") == 2, what="both workers")
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).json()["version"] == "0.0.0+vendored"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def test_generate_caps_a_local_source_by_the_variable_the_server_reads(tmp_path: Path) -> None:
    rows = "".join(
        f"P{n},I keep my own notes of every shift because the app loses them, number {n}.\n" for n in range(30000)
    )
    (tmp_path / "big.csv").write_text("participant_id,response\n" + rows)
    result = run_persona("generate", str(tmp_path / "big.csv"), cwd=tmp_path, env={"PERSONA_MAX_SOURCE_MB": "1"})
    assert result.returncode == 1
    assert "over the 1 MiB cap" in result.stderr and "PERSONA_MAX_SOURCE_MB" in result.stderr


def test_serving_postgresql_without_its_driver_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "asyncpg"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('asyncpg is not installed')\n")
    env = {**clean_environment(), "PYTHONPATH": f"{shadow.parent}{os.pathsep}{ROOT}"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "persona",
            "serve",
            "--db",
            "postgresql://bob:hunter2@localhost/db",
            "--data-dir",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'persona[postgres]'" in lines[0], done.stderr
    assert "hunter2" not in done.stderr + done.stdout
