"""What the attacks on data loading cost: seconds and peak memory of reading each hostile file.

    python bench/attacks.py                       # this checkout's persona.py
    python bench/attacks.py --persona old/persona.py   # another version, for a before/after table

Each file is read in a fresh process (`persona.read_alone`, then the engine's tidying of
every answer), under a 3 GiB address-space limit and a 120 s deadline, as a job would read
it. Deterministic files, one run each; the machine's noise is in the seconds, not the bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

W = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
S = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
LIMIT_BYTES = 3 * 1024**3
DEADLINE_S = 120


def zipped(parts: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, text in parts.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def cell(ref: str, text: str) -> str:
    return f'<c r="{ref}" t="inlineStr"><is><t>{text}</t></is></c>'


def attacks() -> dict[str, tuple[str, bytes]]:
    header = f"<row>{cell('A1', 'participant_id')}{cell('B1', 'comment')}{cell('ALL1', 'x')}</row>"
    wide = header + f"<row>{cell('ALL2', 'x')}</row>" * 300_000
    laughs = (
        '<?xml version="1.0"?><!DOCTYPE w:document [<!ENTITY a "'
        + "lol " * 25
        + '">'
        + "".join(f'<!ENTITY {b} "{("&" + a + ";") * 10}">' for a, b in zip("abcde", "bcdef"))
        + "]>"
    )
    strings = "<si><t>ab</t></si>" * 5_000_000
    return {
        "wide sheet (a header cell at column ALL)": (
            "xlsx",
            zipped({"xl/worksheets/sheet1.xml": (f'<worksheet xmlns="{S}"><sheetData>{wide}</sheetData></worksheet>')}),
        ),
        "entities in a Word file": (
            "docx",
            zipped(
                {
                    "word/document.xml": (
                        f'{laughs}<w:document xmlns:w="{W}"><w:body><w:p><w:r>'
                        "<w:t>Dana: &f;</w:t></w:r></w:p></w:body></w:document>"
                    )
                }
            ),
        ),
        "paragraphs nested 16,000 deep": (
            "docx",
            zipped(
                {
                    "word/document.xml": (
                        f'<w:document xmlns:w="{W}"><w:body>'
                        + "<w:p>" * 16_000
                        + "</w:p>" * 16_000
                        + "</w:body></w:document>"
                    )
                }
            ),
        ),
        "5 million shared strings": (
            "xlsx",
            zipped(
                {
                    "xl/sharedStrings.xml": f'<sst xmlns="{S}">{strings}</sst>',
                    "xl/worksheets/sheet1.xml": f'<worksheet xmlns="{S}"><sheetData>{header}</sheetData></worksheet>',
                }
            ),
        ),
        "an answer of 2,400 dashes": ("csv", ("participant_id,answer\nP1," + "-" * 2400 + "x\n").encode()),
        "30,000 spaces inside an answer": (
            "csv",
            ("participant_id,answer\nP1,I keep" + " " * 30_000 + "notes and um I plan.\n").encode(),
        ),
    }


READ = """
import resource, sys, time, importlib.util
spec = importlib.util.spec_from_file_location("persona", sys.argv[1]); persona = importlib.util.module_from_spec(spec)
sys.modules["persona"] = persona; spec.loader.exec_module(persona)
raw = sys.stdin.buffer.read(); started = time.perf_counter()
try:
    people = persona.read_alone(raw, sys.argv[2], "attack." + sys.argv[2], "attack").participants() \\
        if hasattr(persona, "read_alone") else None
    if people is None:
        reader = persona.SourceReader(); reader.add(raw, sys.argv[2], "attack." + sys.argv[2], "attack")
        people = reader.participants()
    for person in people:
        for text in person.texts:
            for sentence in persona.split_sentences(text):
                persona.tidy_spoken(sentence)
    outcome = f"read {len(people)} participant(s)"
except persona.GenerationError as exc:
    outcome = "refused: " + str(exc)[:90]
except MemoryError:
    outcome = "MemoryError"
print(f"{time.perf_counter() - started:.2f}\\t{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}\\t{outcome}")
"""


def limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))


def run(module: Path, fmt: str, raw: bytes) -> dict[str, object]:
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", READ, str(module), fmt],
            input=raw,
            capture_output=True,
            timeout=DEADLINE_S,
            preexec_fn=limit,
        )
    except subprocess.TimeoutExpired:
        return {"seconds": DEADLINE_S, "outcome": f"still reading after {DEADLINE_S} s", "peak_mb": None}
    fields = done.stdout.decode().strip().split("\t", 2)
    if len(fields) < 3:  # killed, or out of memory outside Python's reach
        failure = (done.stderr.decode().strip().splitlines() or [f"exit code {done.returncode}"])[-1][:90]
        return {"seconds": round(time.perf_counter() - started, 2), "outcome": failure, "peak_mb": None}
    return {"seconds": float(fields[0]), "peak_mb": int(fields[1]), "outcome": fields[2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--persona", type=Path, default=Path(__file__).resolve().parent.parent / "persona.py")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for name, (fmt, raw) in attacks().items():
        row = {"attack": name, "bytes": len(raw), **run(args.persona, fmt, raw)}
        rows.append(row)
        print(
            f"{name:42} {len(raw):>9,} B  {row['seconds']:>7} s  peak {row['peak_mb']} MB  {row['outcome']}", flush=True
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
