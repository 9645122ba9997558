"""Every regular expression in persona.py runs in time linear in its input, used as it is used.

Participants' words reach these patterns unbounded (a cell, an answer, a turn), so one
that backtracks over a run of some character would let a short upload hold a server.
Each pattern is found in the source, with how it is called: anchored (`match`,
`fullmatch`) or scanning (`search`, `sub`, `findall`, `finditer`, `split`), and run that
way on long runs of every kind of character and of pairs of them.
"""

from __future__ import annotations

import ast
import io
import re
import time
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import persona

SOURCE = Path(persona.__file__).read_text()
ANCHORED = {"match", "fullmatch"}
SCANNING = {"search", "sub", "subn", "findall", "finditer", "split"}
CHARACTERS = list(" \t\na1-.?,'\"/:@_[(<=é#*\\|!{$%&)]>;}~`+^\u00a0")
RUNS = (
    CHARACTERS
    + [c + " " for c in CHARACTERS]
    + ["a" + c for c in CHARACTERS]
    + ["1" + c for c in CHARACTERS]
    + [
        "no ",
        "um ",
        "uh ",
        "n ",
        "a.",
        "1.",
        "A. ",
        "P1: ",
        "Q1_",
        "http://a",
        "[a]",
        "(a)",
        "- ",
        "a@",
        "\n\n",
        " \n",
        "<v a>",
        "**a:** ",
        "Speaker 1: ",
        "00:01 ",
        "what ",
        "how often ",
        "i ",
        "no problem ",
        "the ",
        "[a] ",
        "please ",
    ]
)
LENGTHS = (200, 600, 2_000, 10_000)  # growing slowly: a cubic pattern stops at 600, in seconds
GROWING = 8  # the runs that grow to the longest length: the slowest at the length before it
LIMIT_S = 0.125  # the slowest linear pattern takes 30 ms on 10,000 characters; a quadratic one, seconds


def flags_of(node: ast.expr | None) -> int:
    return 0 if node is None else eval(compile(ast.Expression(node), "flags", "eval"), vars(persona))


def inline_patterns() -> list[tuple[str, re.Pattern[str], set[str]]]:
    """`re.sub(r"...", ...)` and the like, written where they are used (a module-level name is found by name)."""
    found = []
    positions = {
        "compile": 1,
        "match": 2,
        "fullmatch": 2,
        "search": 2,
        "findall": 2,
        "finditer": 2,
        "split": 3,
        "sub": 4,
        "subn": 4,
    }
    tree = ast.parse(SOURCE)
    named = {
        id(node.value) for node in tree.body if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "re"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            continue
        method = node.func.attr
        if method == "compile" and id(node) in named:
            continue
        flag_node = next((kw.value for kw in node.keywords if kw.arg == "flags"), None)
        if flag_node is None and len(node.args) > positions.get(method, 99):
            flag_node = node.args[positions[method]]
        uses = {"search"} if method == "compile" else {method}  # compiled into a table: assume the worst
        found.append((f"line {node.lineno}", re.compile(node.args[0].value, flags_of(flag_node)), uses))
    return found


def named_uses(name: str) -> set[str]:
    uses = set(re.findall(rf"\b{name}\.(\w+)\(", SOURCE))
    passed = re.search(rf"[(,=]\s*{name}\b(?!\.)", SOURCE.split(f"{name} = re.compile", 1)[-1])
    return uses | ({"search"} if passed or not uses else set())  # handed on: assume the worst


def module_patterns() -> list[tuple[str, re.Pattern[str], set[str]]]:
    named = [(name, value, named_uses(name)) for name, value in vars(persona).items() if isinstance(value, re.Pattern)]
    in_tables = [
        (f"{table}[{index}]", pattern, {"search"})
        for table, value in vars(persona).items()
        if isinstance(value, (list, tuple))
        for index, item in enumerate(value)
        if isinstance(item, tuple)
        for pattern in item
        if isinstance(pattern, re.Pattern)
    ]
    return named + in_tables


PATTERNS = {name: (pattern, uses) for name, pattern, uses in module_patterns() + inline_patterns()}


def slowest(pattern: re.Pattern[str], uses: set[str]) -> tuple[float, str]:
    """The longest one call took (over the limit, the fastest of three tries), and on what; lengths grow
    only while calls stay fast, so a cubic one stops early. Every run is tried up to the length before the
    longest; only the `GROWING` slowest there grow to the longest, as a run on which a pattern backtracks is
    already the slowest at 2,000 characters, and trying all of them at 10,000 took most of the suite's time."""
    worst, worst_run = 0.0, ""
    runs = list(RUNS)
    for length in LENGTHS:
        took: dict[str, float] = {}
        for run in runs:
            text = (run * (length // len(run) + 1))[:length]
            for probe in (text, text + "x", text + "\x01", "x" + text + "\x01"):
                elapsed = timed(pattern, uses, probe)
                if elapsed > LIMIT_S:  # a slow pattern is slow every time; a busy machine stalls once
                    elapsed = min(elapsed, timed(pattern, uses, probe), timed(pattern, uses, probe))
                took[run] = max(took.get(run, 0.0), elapsed)
                if elapsed > worst:
                    worst, worst_run = elapsed, run
                if worst > LIMIT_S:
                    return worst, worst_run
        if length == LENGTHS[-2]:
            runs = sorted(runs, key=lambda run: -took[run])[:GROWING]
    return worst, worst_run


def timed(pattern: re.Pattern[str], uses: set[str], probe: str) -> float:
    started = time.process_time()
    if uses & SCANNING:
        for _ in pattern.finditer(probe):
            pass
    if uses & ANCHORED:
        pattern.match(probe)
        pattern.fullmatch(probe)
    return time.process_time() - started


def test_the_audit_finds_the_module_s_patterns_and_how_they_are_called() -> None:
    assert len(PATTERNS) > 60
    assert PATTERNS["FILLER"][1] == {"sub"}
    assert "fullmatch" in PATTERNS["TOKEN_VALUE"][1]


def test_the_audit_catches_a_pattern_that_backtracks() -> None:
    cubic = re.compile(r"\W*(?:none|-+|\.+)\W*")  # the shape of an old non-answer rule
    assert slowest(cubic, {"fullmatch"})[0] > LIMIT_S


def test_the_audit_catches_a_pattern_that_is_quadratic_in_a_search() -> None:
    quadratic = re.compile(r"\b(?:[a-z0-9-]+\.)+(?:com|org)(?![\w.])", re.IGNORECASE)  # an old link rule's shape
    assert slowest(quadratic, {"search"})[0] > LIMIT_S


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_every_pattern_is_linear_in_its_input(name: str) -> None:
    pattern, uses = PATTERNS[name]
    elapsed, run = slowest(pattern, uses)
    assert elapsed < LIMIT_S, f"{name} ({pattern.pattern[:80]!r}) took {elapsed:.2f} s on a run of {run!r}"


# -- fuzzing: every loader and the engine's tidying take anything and answer in kind --------

WORD = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
SHEET = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEXT_FORMATS = ("csv", "tsv", "json", "jsonl", "text", "vtt", "srt")
texts = st.lists(
    st.sampled_from(list(" \n\t,;:\"'[]{}-.?!@/\\aAzZ09é\u00a0\u2028<>*_#=|") + ["um", "Q1", "P1: "]), max_size=300
).map("".join)


@FUZZ
@given(fmt=st.sampled_from(TEXT_FORMATS), text=texts)
def test_a_text_loader_reads_anything_or_says_what_is_wrong(fmt: str, text: str) -> None:
    try:
        persona.read_alone(text.encode(), fmt, f"fuzz.{fmt}", "fuzz").participants()
    except persona.GenerationError as exc:
        assert "fuzz" in str(exc)


@FUZZ
@given(raw=st.binary(max_size=300), fmt=st.sampled_from(TEXT_FORMATS + persona.OFFICE_FORMATS))
def test_a_loader_given_bytes_of_any_kind_fails_only_by_saying_so(raw: bytes, fmt: str) -> None:
    try:
        persona.read_alone(raw, fmt, f"fuzz.{fmt}", "fuzz").participants()
    except persona.GenerationError:
        pass


xml_pieces = st.sampled_from(
    [
        "<w:p>",
        "</w:p>",
        "<w:r>",
        "</w:r>",
        "<w:t>",
        "</w:t>",
        "<w:tab/>",
        "<w:br/>",
        "a",
        "Interviewer: ",
        "Dana: ",
        "&amp;",
        "&#0;",
        "\n",
        "<x:y>",
        "]]>",
        "<![CDATA[",
        "&c;",
    ]
)
cell_pieces = st.sampled_from(
    [
        '<row r="1">',
        "<row>",
        "</row>",
        '<c r="A1" t="s">',
        '<c r="ZZZ9" t="inlineStr">',
        "<c>",
        "</c>",
        "<v>0</v>",
        "<v>²</v>",
        "<v>1.0</v>",
        "<is><t>x</t></is>",
        "<t>",
        "</t>",
        "q",
    ]
)


@FUZZ
@given(pieces=st.lists(xml_pieces, max_size=60))
def test_a_word_file_of_any_structure_is_read_or_refused_naming_it(pieces: list[str]) -> None:
    body = "".join(pieces)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr("word/document.xml", f'<w:document xmlns:w="{WORD}"><w:body>{body}</w:body></w:document>')
    try:
        persona.docx_text(buffer.getvalue(), "fuzz.docx")
    except persona.GenerationError as exc:
        assert "fuzz.docx" in str(exc)


@FUZZ
@given(pieces=st.lists(cell_pieces, max_size=60))
def test_a_sheet_of_any_structure_is_read_or_refused_naming_it(pieces: list[str]) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr(
            "xl/worksheets/sheet1.xml",
            f'<worksheet xmlns="{SHEET}"><sheetData>{"".join(pieces)}</sheetData></worksheet>',
        )
        zipped.writestr("xl/sharedStrings.xml", f'<sst xmlns="{SHEET}"><si><t>one</t></si></sst>')
    try:
        persona.xlsx_rows(buffer.getvalue(), "fuzz.xlsx")
    except persona.GenerationError as exc:
        assert "fuzz.xlsx" in str(exc)


@FUZZ
@given(text=texts)
def test_the_engine_s_tidying_takes_any_text(text: str) -> None:
    for sentence in persona.split_sentences(text):
        assert sentence.strip()
        tidy = persona.tidy_spoken(sentence)
        assert isinstance(tidy, str) and len(tidy) <= len(sentence) + 1


@pytest.mark.parametrize(
    "answer",
    [
        "N/A",
        "n / a",
        "na.",
        "--",
        "...",
        "???",
        "Nothing.",
        "no thanks!",
        "(none)",
        "I don't know",
        "- nothing to add -",
    ],
)
def test_an_answer_that_says_there_is_nothing_to_say_is_not_speech(answer: str) -> None:
    assert persona.is_non_answer(answer)


@pytest.mark.parametrize(
    "answer", ["No, I never use it", "!!!", "Nap time", "none of the exports work", "-" * 2400 + "a"]
)
def test_an_answer_with_something_in_it_is_speech(answer: str) -> None:
    assert not persona.is_non_answer(answer)
