"""Screenshots of the workbench for the README: each page at 1400 and 400 pixels wide.

Run from the repository's root, with the test extra installed and Debian's chromium:
`python docs/screenshots.py`. It starts a server of its own on the bundled examples.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
PORT = 8931


def started(work: Path) -> subprocess.Popen[bytes]:
    shutil.copytree(ROOT / "examples", work / "data")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "persona",
            "serve",
            "--port",
            str(PORT),
            "--db",
            str(work / "p.db"),
            "--data-dir",
            str(work / "data"),
            "--output-dir",
            str(work / "out"),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/api/v1/health").status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("the server did not start")


def finished(http: httpx.Client, body: dict, path: str = "/api/v1/generate") -> str:
    job_id = http.post(path, json=body).json()["job_id"]
    while http.get(f"/api/v1/generate/{job_id}").json()["status"] not in ("completed", "failed"):
        time.sleep(0.1)
    return job_id


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = started(Path(tmp))
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{PORT}") as http:
                first = finished(http, {"data": "interviews.csv", "count": 3, "config": {"experiment": "Shift work"}})
                second = finished(http, {"data": "transcripts"}, f"/api/v1/generate/{first}/refine")
            pages = {"jobs": "/jobs", "job": f"/jobs/{second}", "compare": f"/compare?a={first}&b={second}"}
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
                for width in (1400, 400):
                    tab = browser.new_page(viewport={"width": width, "height": 900})
                    for name, path in pages.items():
                        tab.goto(f"http://127.0.0.1:{PORT}{path}")
                        tab.wait_for_load_state("networkidle")
                        tab.screenshot(
                            path=str(ROOT / "docs" / f"workbench-{name}-{width}.png"), full_page=name != "job"
                        )
                    tab.close()
                browser.close()
        finally:
            server.terminate()
            server.wait(15)


if __name__ == "__main__":
    main()
