"""The README's promises that a test can hold it to."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_environment, free_port

import persona

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", README.split("\n## ", 1)[0])


def test_the_readme_opens_with_exactly_two_setup_commands() -> None:
    commands = readme_commands()
    assert len(commands) == 2
    assert "persona generate" in commands[0] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_word_for_word() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci.splitlines()


def test_every_serve_option_is_documented() -> None:
    for flags, name, _ in persona.SERVE_OPTIONS:
        assert f"`{flags[0]}`" in README
        assert f"`{persona.ENV_VARS[name]}`" in README


def test_the_readme_api_example_and_its_webhook_registration_work_pasted_as_they_are(tmp_path: Path) -> None:
    # Pasted into a shell in a checkout, with the console script on PATH; only the port is one of this test's.
    example, webhook = re.findall(r"```bash\n(.+?)\n```", README.split("\n## The API\n", 1)[1], re.DOTALL)[:2]
    port = free_port()
    script = (example + "\n" + webhook).replace("localhost:8000", f"localhost:{port}")
    script = script.replace("persona serve --data-dir examples &", f"persona serve --data-dir examples --port {port} &")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {**clean_environment(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:  # the server keeps them open
        shell = subprocess.Popen(
            ["bash", "-c", script], cwd=tmp_path, env=env, stdout=out, stderr=err, start_new_session=True
        )
    try:
        shell.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the example did not finish in 60 s: {(tmp_path / 'err').read_text()[-2000:]}")
    finally:
        os.killpg(shell.pid, signal.SIGKILL)  # the server the example left running
    printed, problems = ((tmp_path / name).read_text() for name in ("out", "err"))
    titles = [line for line in printed.splitlines() if line.startswith('"')]
    assert shell.returncode == 0 and len(titles) == 4, problems
    assert '"webhook_id":"webhook-' in printed.replace(" ", ""), printed
