"""Run Schemathesis against a real Persona server, inside a fresh network namespace.

Started as `unshare -n python tests/run_schemathesis.py`: generated webhook and data
URLs then cannot reach any address beyond this machine's own loopback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "schemathesis-token"
NOWHERE = "http://127.0.0.1:9"  # a closed port: providers named in requests fail fast, locally


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("server did not become healthy")


def main() -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "examples", work / "data")
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PERSONA_", "ANTHROPIC", "OPENAI", "GEMINI", "GOOGLE"))
        }
        env.update(
            PYTHONPATH=str(ROOT),
            ANTHROPIC_API_KEY="k",
            ANTHROPIC_BASE_URL=NOWHERE,
            OPENAI_API_KEY="k",
            OPENAI_BASE_URL=NOWHERE,
            GEMINI_API_KEY="k",
            GOOGLE_GEMINI_BASE_URL=NOWHERE,
            OLLAMA_HOST=NOWHERE,
        )
        port = 8917
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "persona",
                "serve",
                "--port",
                str(port),
                "--db",
                str(work / "p.db"),
                "--data-dir",
                str(work / "data"),
                "--output-dir",
                str(work / "out"),
                "--auth-token",
                TOKEN,
                "--rate-limit",
                "0",
                "--max-concurrent-jobs",
                "1000000",
                "--log-level",
                "warning",
                "--webhook-retry-schedule",
                "0.1",
            ],  # deliveries fail soon, so their retry can be tried
            cwd=work,
            env=env,
        )
        try:
            wait_healthy(url, server)
            st = Path(sys.executable).parent / "st"
            command = [
                str(st),
                "--config-file",
                str(ROOT / "tests" / "schemathesis.toml"),
                "--no-color",
                "run",
                f"{url}/openapi.json",
                "-H",
                f"Authorization: Bearer {TOKEN}",
                "--max-examples",
                os.environ.get("ST_MAX_EXAMPLES", "50"),
                *sys.argv[1:],
            ]
            return subprocess.run(command, cwd=work).returncode
        finally:
            server.terminate()
            server.wait(15)


if __name__ == "__main__":
    sys.exit(main())
