"""The README's promises that a test can hold it to."""

from __future__ import annotations

import re
from pathlib import Path

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
