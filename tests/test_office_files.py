"""Office files cost what they hold: no entity, depth, declared size or sparse column makes a few KB expensive."""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from pathlib import Path

import pytest

import persona

pytestmark = pytest.mark.sqlite_only  # loading is the subject, not the store

W = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
S = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"


def archive(parts: dict[str, str | bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zipped:
        for name, content in parts.items():
            zipped.writestr(name, content)
    return buffer.getvalue()


def word(body: str, prologue: str = '<?xml version="1.0" encoding="UTF-8"?>') -> bytes:
    return archive({"word/document.xml": f'{prologue}<w:document xmlns:w="{W}"><w:body>{body}</w:body></w:document>'})


def sheet(rows: str, strings: list[str] | None = None) -> bytes:
    parts: dict[str, str | bytes] = {
        "xl/worksheets/sheet1.xml": f'<worksheet xmlns="{S}"><sheetData>{rows}</sheetData></worksheet>'
    }
    if strings is not None:
        parts["xl/sharedStrings.xml"] = (
            f'<sst xmlns="{S}">' + "".join(f"<si><t>{s}</t></si>" for s in strings) + "</sst>"
        )
    return archive(parts)


def inline(ref: str, text: str) -> str:
    return f'<c r="{ref}" t="inlineStr"><is><t>{text}</t></is></c>'


def peak_bytes(function: object, *args: object) -> int:
    tracemalloc.start()
    try:
        function(*args)  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_header_cell_far_right_does_not_make_every_row_as_wide() -> None:
    header = f'<row r="1">{inline("A1", "participant_id")}{inline("B1", "comment")}{inline("ALL1", "note")}</row>'
    rows = "".join(f'<row r="{n}">{inline(f"ALL{n}", "x")}</row>' for n in range(2, 20_002))
    raw = sheet(header + rows)
    assert len(raw) < 200_000
    table = persona.xlsx_rows(raw, "wide.xlsx")[0]
    assert table[0] == ["participant_id", "comment", "note"] and table[1] == ["", "", "x"]
    assert peak_bytes(persona.xlsx_rows, raw, "wide.xlsx") < 30 * 1024 * 1024  # 20,000 rows of 1,000 cells: 160 MB


def workbook(sheets: dict[str, str]) -> bytes:
    """A workbook of named sheets in this order, each of rows as in `sheet`."""
    names = list(sheets)
    entries = "".join(
        f'<sheet name="{name}" sheetId="{n}" r:id="rId{n}" '
        'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships"/>'
        for n, name in enumerate(names, 1)
    )
    relations = "".join(
        f'<Relationship Id="rId{n}" Target="worksheets/sheet{n}.xml" '
        'Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/worksheet"/>'
        for n in range(1, len(names) + 1)
    )
    parts: dict[str, str | bytes] = {
        "xl/workbook.xml": f'<workbook xmlns="{S}"><sheets>{entries}</sheets></workbook>',
        "xl/_rels/workbook.xml.rels": (
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            f"{relations}</Relationships>"
        ),
    }
    for n, name in enumerate(names, 1):
        parts[f"xl/worksheets/sheet{n}.xml"] = (
            f'<worksheet xmlns="{S}"><sheetData>{sheets[name]}</sheetData></worksheet>'
        )
    return archive(parts)


def test_a_workbook_opening_on_a_cover_page_is_read_from_its_sheet_of_data() -> None:
    cover = f'<row r="1">{inline("A1", "Team survey 2026, exported for the research team")}</row>'
    data = f'<row r="1">{inline("A1", "participant_id")}{inline("B1", "response")}</row>' + "".join(
        f'<row r="{n}">{inline(f"A{n}", f"P{n}")}{inline(f"B{n}", f"I plan week {n} on paper.")}</row>'
        for n in range(2, 6)
    )
    rows, notes = persona.xlsx_rows(workbook({"Cover": cover, "Responses": data}), "survey.xlsx")
    assert rows[0] == ["participant_id", "response"] and len(rows) == 5
    assert notes == ["survey.xlsx: read its sheet 'Responses', the one with the most rows (the others: 'Cover')"]
    rows, notes = persona.xlsx_rows(workbook({"Responses": data, "Notes": cover}), "survey.xlsx")
    assert len(rows) == 5 and notes == []


def test_a_workbook_with_no_sheet_of_responses_is_refused_naming_its_sheets() -> None:
    cover = f'<row r="1">{inline("A1", "Team survey 2026, exported for the research team")}</row>'
    with pytest.raises(persona.GenerationError, match="survey.xlsx holds no table of responses .* 'Cover', 'Notes'"):
        persona.xlsx_rows(workbook({"Cover": cover, "Notes": cover}), "survey.xlsx")


def test_a_sheet_of_more_cells_than_the_cap_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(persona, "MAX_SHEET_CELLS", 1_000)
    rows = "".join(f'<row r="{n}">{inline(f"A{n}", f"P{n}")}{inline(f"B{n}", "said")}</row>' for n in range(1, 600))
    with pytest.raises(persona.GenerationError, match=r"big\.xlsx holds more than 1,000 cells"):
        persona.xlsx_rows(sheet(rows), "big.xlsx")


def test_more_shared_strings_than_a_sheet_may_hold_cells_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(persona, "MAX_SHEET_CELLS", 1_000)
    raw = sheet('<row r="1"><c r="A1" t="s"><v>0</v></c></row>', [f"s{n}" for n in range(1_500)])
    with pytest.raises(persona.GenerationError, match="strings.xlsx holds more than 1,000 shared strings"):
        persona.xlsx_rows(raw, "strings.xlsx")


def test_what_a_file_unpacks_to_is_counted_as_it_unpacks_not_as_the_zip_declares(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(persona, "MAX_ARCHIVE_BYTES", 1024 * 1024)
    raw = bytearray(word("<w:p><w:r><w:t>" + "I plan my week on Sunday. " * 120_000 + "</w:t></w:r></w:p>"))
    central = raw.rindex(b"PK\x01\x02")
    raw[central + 24 : central + 28] = (1024).to_bytes(4, "little")  # the central directory says 1 KB
    with pytest.raises(persona.GenerationError, match="liar.docx"):
        persona.docx_text(bytes(raw), "liar.docx")
    assert (
        peak_bytes(lambda: pytest.raises(persona.GenerationError, persona.docx_text, bytes(raw), "liar.docx"))
        < 8 * 1024 * 1024
    )


def test_a_document_type_with_entities_is_refused_before_anything_expands() -> None:
    laughs = (
        '<?xml version="1.0"?><!DOCTYPE w:document [<!ENTITY a "lol lol lol lol lol lol lol lol lol lol">'
        '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>'
    )
    raw = word("<w:p><w:r><w:t>Interviewer: hello &c;</w:t></w:r></w:p>", prologue=laughs)
    with pytest.raises(persona.GenerationError, match="laughs.docx declares a document type"):
        persona.docx_text(raw, "laughs.docx")


def test_paragraphs_nested_past_any_real_document_are_refused() -> None:
    raw = word("<w:p>" * 16_000 + "</w:p>" * 16_000)
    assert len(raw) < 2_000
    with pytest.raises(persona.GenerationError, match="deep.docx nests the elements .* deeper than 256 levels"):
        persona.docx_text(raw, "deep.docx")


def test_a_paragraph_inside_another_is_read_once() -> None:
    depth = 60
    body = "".join(f"<w:p><w:r><w:t>level {n}</w:t></w:r>" for n in range(depth)) + "</w:p>" * depth
    lines = persona.docx_text(word(body), "boxes.docx").split("\n")
    assert sorted(lines) == sorted(f"level {n}" for n in range(depth))


def test_a_shared_string_index_that_is_a_digit_but_not_a_number_is_kept_as_text() -> None:
    rows = (
        f'<row r="1">{inline("A1", "participant_id")}{inline("B1", "comment")}</row>'
        f'<row r="2">{inline("A2", "P1")}<c r="B2" t="s"><v>²</v></c></row>'
    )
    assert persona.xlsx_rows(sheet(rows, ["only"]), "odd.xlsx")[0][1] == ["P1", "²"]


def test_a_part_in_an_encoding_expat_cannot_read_fails_naming_the_file() -> None:
    raw = word("<w:p><w:r><w:t>Interviewer: hello</w:t></w:r></w:p>", prologue='<?xml version="1.0" encoding="UTF-7"?>')
    with pytest.raises(persona.GenerationError, match="seven.docx"):
        persona.docx_text(raw, "seven.docx")


async def test_a_job_reads_office_files_in_a_child_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = "".join(
        f"<w:p><w:r><w:t>{line}</w:t></w:r></w:p>"
        for line in (
            "Interviewer: How do you plan your week?",
            "Dana: I plan my week on Sunday evening with a paper diary.",
            "Interviewer: What gets in the way?",
            "Dana: The shared calendar never shows my night shifts, so I copy them by hand.",
        )
    )
    (tmp_path / "dana.docx").write_bytes(word(lines))

    def not_here(raw: bytes, name: str) -> str:
        raise AssertionError("read in the server's own process")

    monkeypatch.setattr(persona, "docx_text", not_here)  # a spawned child imports persona afresh
    dataset = await persona.load_data("dana.docx", persona.Settings(data_dir=tmp_path))
    assert [person.id for person in dataset.participants] == ["dana"]
    assert dataset.participants[0].texts[0].startswith("I plan my week")


async def test_the_data_listing_reads_an_office_table_in_a_child_once_per_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = (
        f'<row r="1">{inline("A1", "participant_id")}{inline("B1", "team")}{inline("C1", "comment")}</row>'
        + "".join(
            f'<row r="{n}">{inline(f"A{n}", f"P{n}")}{inline(f"B{n}", "Sales" if n % 2 else "Support")}'
            f"{inline(f'C{n}', f'The rota arrives late for shift {n}.')}</row>"
            for n in range(2, 6)
        )
    )
    for name in ("a.xlsx", "copy.xlsx"):
        (tmp_path / name).write_bytes(sheet(rows))
    children: list[str] = []
    real_run_in_child = persona.run_in_child

    async def counted(function, *args):  # type: ignore[no-untyped-def]
        children.append(args[2])
        return await real_run_in_child(function, *args)

    monkeypatch.setattr(persona, "run_in_child", counted)
    listed = {source["name"]: source["attributes"] for source in (await persona.data_sources(tmp_path))[0]}
    assert listed == {"a.xlsx": ["team"], "copy.xlsx": ["team"]}
    assert len(children) == 1
    await persona.data_sources(tmp_path)
    assert len(children) == 1


async def test_the_data_listing_starts_no_child_for_an_office_name_on_what_is_no_zip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "uploads").mkdir()
    for n in range(3):  # what a fuzzer uploads: any bytes under an Office name
        (tmp_path / f"upload{n}.xlsx").write_bytes(f"not a workbook {n}".encode())
        (tmp_path / "uploads" / f"upload{n}.docx").write_bytes(f"not a document {n}".encode())

    async def no_child(function, *args):  # type: ignore[no-untyped-def]
        raise AssertionError(f"a child started for {args[2]}")

    monkeypatch.setattr(persona, "run_in_child", no_child)
    table = b"role,comment\nNurse,The rota is late.\nDoctor,Handovers run long.\n"
    (tmp_path / "same.csv").write_bytes(table)  # the bytes of an .xlsx too, read as the table they are
    (tmp_path / "same.xlsx").write_bytes(table)
    listed = {source["name"]: source.get("attributes") for source in (await persona.data_sources(tmp_path))[0]}
    assert listed.pop("same.csv") is not None
    assert listed.pop("same.xlsx") is None
    assert listed == {"uploads": None} | {
        name: None for n in range(3) for name in (f"upload{n}.xlsx", f"uploads/upload{n}.docx")
    }
