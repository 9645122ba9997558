"""Persona's output quality on real public data: what the offline engine makes of it.

    python bench/quality.py                  # every data set under bench/corpus, 4 personas each
    python bench/quality.py --count 3 --json quality.json --verbose

Each data set under bench/corpus/<name>/ is real research data as its publisher released it
(see bench/corpus/SOURCES.md), next to a truth.json written by hand from reading the raw
files. The checks read the raw files themselves, with their own simple parsing, so they
judge Persona's parser instead of trusting it. Deterministic, offline, standard library only.

truth.json (keys a data set does not need may be left out):

    kind                "transcripts" | "survey" | "reviews"
    data                the path handed to persona.load_path, relative to bench/corpus
    files               the raw files, relative to the data set's folder
    participants        how many real people the data holds (a person in two files is one)
    interviewer_labels  transcripts: the interviewers' speaker labels, spelled as in the files
    other_labels        transcripts: labels that are nobody's answer (ad breaks, notes)
    participant_labels  transcripts: file -> labels of the people interviewed in it
    header_rows         surveys, reviews: rows before the first response (default 1)
    question_row        1-based row holding question texts (Qualtrics, SurveyMonkey), or null
    id_column           the column naming a respondent, or null
    name_columns        columns holding people's names
    metadata_columns    columns about the record rather than what the person said (dates, status,
                        URLs, model output); they belong in neither quotes nor demographics
    reply_columns       columns written by someone else (a developer's reply to a review)
    notes               free text for people

The table, one row per data set:

    read/truth   participants Persona read against the truth's count
    intv         goal, pain point, behaviour and quote items holding a sentence (4+ words) that an
                 interviewer said, or that comes from a question text or a reply column, and that
                 no participant said
    spliced      quotes that are not a verbatim (whitespace-normalised) part of one single
                 turn, answer or review of one participant
    empty        empty goals / pain_points / behaviours lists over all personas
    sizes        participants per persona
    title        for each title word that carries meaning, the share of the persona's
                 participants whose own words contain it; averaged over words and personas
    demo         demographics entries per persona (participants and share left out)
    bad          demographics entries that are metadata, name or id columns, sentences
                 (more than 8 words), or that hold a participant's or interviewer's name
    names        persona fields naming a real person: a full name anywhere (title, summary, items),
                 or a title word or theme that is one part of a name ("Karl", "fogel")
    cover/supp   persona.quality_report's coverage and mean support, when Persona has one
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import inspect
import io
import json
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

CORPUS = Path("bench/corpus")
CONFIG = {"complexity": "moderate", "detail_level": "standard"}
ITEM_LISTS = ("goals", "pain_points", "behaviours", "quotes")
MIN_SENTENCE_WORDS = 4  # "Yeah, exactly." is said by everyone; only longer sentences point at a speaker
SENTENCE_WORDS = 8  # a demographics value longer than this is an answer, not an attribute
TITLE_FILLER = {
    "the",
    "user",
    "users",
    "focused",
    "on",
    "of",
    "and",
    "a",
    "an",
    "with",
    "for",
    "in",
    "to",
    "segment",
    "distinct",
    "persona",
}
persona: ModuleType  # set by main(): the persona.py under test

SPEAKER = re.compile(r"^\s*(?:\*\*)?(?P<label>[^*:\n]{1,40}?)(?::\*\*|\*\*:|:)\s*(?P<text>.*)$")
SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+")


@dataclass
class Source:
    """The raw data as the checks see it: who said what, turn by turn or answer by answer."""

    answers: list[str] = field(default_factory=list)  # one participant's single turn, answer or review
    not_participant: list[str] = field(default_factory=list)  # interviewer turns, questions, replies
    by_person: dict[str, list[str]] = field(default_factory=dict)  # Persona's participant id -> answers
    names: set[str] = field(default_factory=set)  # people's names that must not surface
    labels: set[str] = field(default_factory=set)  # speaker labels: a label inside an item ends a turn
    blocked_columns: set[str] = field(default_factory=set)  # metadata, name and id columns

    def joined(self) -> tuple[str, str]:
        """Answers and non-answers as two searchable strings; NUL keeps a match inside one piece."""
        return ("\0".join(map(squash, self.answers)), "\0".join(map(squash, self.not_participant)))


def squash(text: str) -> str:
    return " ".join(text.split())


def column_key(name: str) -> str:
    """A column name reduced to letters and digits, so 'Date Submitted' meets 'date_submitted'."""
    return re.sub(r"[^a-z0-9]+", "", name.lower())


# ---------------------------------------------------------------------------
# Reading the raw data, independently of persona.py's parser
# ---------------------------------------------------------------------------


def read_transcripts(folder: Path, truth: dict[str, Any]) -> Source:
    """Turns start at a known label (`Name:` or `**Name:**`); other lines continue the turn."""
    source = Source()
    interviewers = set(truth.get("interviewer_labels", []))
    others = set(truth.get("other_labels", []))
    by_file = truth.get("participant_labels", {})
    source.names = interviewers | {label for labels in by_file.values() for label in labels}
    source.labels = source.names | others
    for relative in truth["files"]:
        known = interviewers | others | set(by_file.get(relative, []))
        turns = transcript_turns((folder / relative).read_text(encoding="utf-8-sig"), known)
        person = transcript_id(folder / relative, CORPUS / truth["data"])
        for label, text in turns:
            if label in interviewers or label in others or label is None:
                source.not_participant.append(text)
            else:
                source.answers.append(text)
                source.by_person.setdefault(person, []).append(text)
    return source


def transcript_id(file: Path, data: Path) -> str:
    """The id Persona's README gives a transcript: its path inside the data folder, no suffix."""
    return file.relative_to(data).with_suffix("").as_posix() if data.is_dir() else file.stem


def transcript_turns(text: str, known: set[str]) -> list[tuple[str | None, str]]:
    """(label, text) per turn; with no known labels any `Label:` line starts a turn."""
    turns: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in text.splitlines():
        match = SPEAKER.match(line)
        label = match.group("label").strip() if match else None
        if match and (label in known or not known):
            turns.append((label, [match.group("text")]))
        elif line.strip():
            turns[-1][1].append(line.strip())
    return [(label, " ".join(lines)) for label, lines in turns if lines]


def read_records(folder: Path, truth: dict[str, Any]) -> Source:
    """Survey or review rows: each non-empty answer cell is one participant's answer."""
    source = Source()
    id_col = truth.get("id_column")
    blocked = (
        set(truth.get("metadata_columns", [])) | set(truth.get("name_columns", [])) | ({id_col} if id_col else set())
    )
    replies = set(truth.get("reply_columns", []))
    source.blocked_columns = {column_key(column) for column in blocked}
    for relative in truth["files"]:
        path = folder / relative
        rows = list(
            csv.reader(
                io.StringIO(path.read_text(encoding="utf-8-sig"), newline=""),
                delimiter="\t" if path.suffix == ".tsv" else ",",
            )
        )
        header, body = rows[0], rows[truth.get("header_rows", 1) :]
        source.not_participant.extend(cell for cell in header if cell.strip())  # headers are question texts
        if truth.get("question_row"):
            source.not_participant.extend(cell for cell in rows[truth["question_row"] - 1] if cell.strip())
        for number, row in enumerate(body, 1):
            cells = list(zip(header, row))  # a list: a SurveyMonkey grid's later columns share an empty header
            person = dict(cells).get(id_col, "").strip() if id_col else f"{path.stem}-{number:03d}"
            for column, value in cells:
                if not value.strip():
                    continue
                if column in truth.get("name_columns", []):
                    source.names.update(name.strip() for name in re.split(r"[\n,;&]| and ", value) if name.strip())
                if column in replies:
                    source.not_participant.append(value)
                elif column not in blocked:
                    source.answers.append(value)
                    source.by_person.setdefault(person, []).append(value)
    return source


def read_source(folder: Path, truth: dict[str, Any]) -> Source:
    return read_transcripts(folder, truth) if truth["kind"] == "transcripts" else read_records(folder, truth)


# ---------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------


def sentences(text: str, labels: set[str]) -> list[str]:
    """Sentences of 4+ words; a speaker label carried into the text splits it like a full stop."""
    for label in sorted(labels, key=len, reverse=True):
        text = re.sub(rf"(?:\*\*)?{re.escape(label)}(?::\*\*|\*\*:|:)", ". ", text)
    return [part.strip(". ") for part in SENTENCE_END.split(squash(text)) if len(part.split()) >= MIN_SENTENCE_WORDS]


def interviewer_items(personas: list[dict[str, Any]], answers: str, others: str, labels: set[str]) -> list[str]:
    """Items with a sentence found in a non-participant's words and in no participant's."""
    found = []
    for item in (item for p in personas for name in ITEM_LISTS for item in p.get(name, [])):
        if any(s in others and s not in answers for s in sentences(item, labels)):
            found.append(item)
    return found


def spliced_quotes(personas: list[dict[str, Any]], answers: str) -> tuple[list[str], int]:
    """Quotes that no single participant answer contains verbatim; and the number of quotes."""
    quotes = [quote for p in personas for quote in p.get("quotes", [])]
    return [quote for quote in quotes if squash(quote) not in answers], len(quotes)


def empty_lists(personas: list[dict[str, Any]]) -> int:
    return sum(1 for p in personas for name in ("goals", "pain_points", "behaviours") if not p.get(name))


def title_words(title: str) -> list[str]:
    words = re.findall(r"[A-Za-z][A-Za-z0-9'’]*", title)
    return [word.lower() for word in words if word.lower() not in TITLE_FILLER and len(word) > 2]


def title_share(persona_: dict[str, Any], texts: dict[str, str]) -> float | None:
    """How many of the persona's own participants use its title words, on average."""
    members = persona_["evidence"]["participants"]
    words = title_words(persona_["title"])
    if not members or not words:
        return None
    shares = []
    for word in words:
        pattern = re.compile(rf"\b{re.escape(word)}", re.IGNORECASE)
        shares.append(sum(1 for member in members if pattern.search(texts.get(member, ""))) / len(members))
    return statistics.mean(shares)


def bad_demographics(persona_: dict[str, Any], source: Source) -> list[str]:
    """Entries that leak record metadata or names, or that are answers rather than attributes."""
    bad = []
    for key, value in persona_["demographics"].items():
        if key in ("participants", "share"):
            continue
        text = str(value)
        base = column_key(re.sub(r"_range$", "", key))
        if (
            base in source.blocked_columns
            or len(text.split()) > SENTENCE_WORDS
            or any(name and name in text for name in source.names)
        ):
            bad.append(f"{key}={text[:80]!r}")
    return bad


def name_leaks(persona_: dict[str, Any], names: set[str]) -> list[str]:
    """Fields that name someone: Persona must hide the names the raw data holds."""
    full = [name for name in names if len(name) > 4]
    parts = {part.lower() for name in names for part in re.findall(r"[A-Za-z]{3,}", name) if " " in name}
    leaks = []
    texts = [("title", persona_["title"]), ("summary", persona_["summary"])]
    texts += [(name, item) for name in ITEM_LISTS for item in persona_.get(name, [])]
    for where, text in texts:
        hit = next((name for name in full if re.search(rf"\b{re.escape(name)}\b", text, re.IGNORECASE)), None)
        if hit:
            leaks.append(f"{where} names {hit!r}: {squash(text)[:100]}")
    for word in title_words(persona_["title"]) + [theme.lower() for theme in persona_.get("themes", [])]:
        if set(word.split()) & parts:
            leaks.append(f"title/theme word {word!r} is part of a name")
    return leaks


def participant_texts(dataset: Any, source: Source) -> dict[str, str]:
    """Each participant's own words from the raw data, or Persona's reading where ids do not meet."""
    texts = {person.id: " ".join(person.texts) for person in dataset.participants}
    texts.update({person: " ".join(answers) for person, answers in source.by_person.items()})
    return texts


def quality_summary(dataset: Any, personas: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    if not hasattr(persona, "quality_report"):
        return None, None
    report = persona.quality_report(dataset.participants, personas)
    supports = [entry["support"] for entry in report.get("personas", []) if entry.get("support") is not None]
    return report.get("coverage"), (statistics.mean(supports) if supports else None)


def evaluate(name: str, truth: dict[str, Any], count: int) -> dict[str, Any]:
    """One data set through load_path and offline_personas, then every check."""
    row: dict[str, Any] = {"dataset": name, "kind": truth["kind"], "truth_participants": truth["participants"]}
    try:
        dataset = persona.load_path(truth["data"], CORPUS)
        row["read_participants"] = len(dataset.participants)
        personas, warnings = persona.offline_personas(dataset, count, CONFIG)
    except Exception as exc:  # a failure is a result too: report it and go on to the next data set
        row["error"] = f"{type(exc).__name__}: {exc}"
        return row
    source = read_source(CORPUS / name, truth)
    answers, others = source.joined()
    spliced, quotes = spliced_quotes(personas, answers)
    texts = participant_texts(dataset, source)
    shares = [share for share in (title_share(p, texts) for p in personas) if share is not None]
    coverage, support = quality_summary(dataset, personas)
    row.update(
        {
            "interviewer_items": interviewer_items(personas, answers, others, source.labels),
            "spliced_quotes": spliced,
            "quotes": quotes,
            "empty_lists": empty_lists(personas),
            "segment_sizes": [len(p["evidence"]["participants"]) for p in personas],
            "title_share": round(statistics.mean(shares), 3) if shares else None,
            "demographics_per_persona": round(
                statistics.mean(
                    len([k for k in p["demographics"] if k not in ("participants", "share")]) for p in personas
                ),
                2,
            ),
            "bad_demographics": [entry for p in personas for entry in bad_demographics(p, source)],
            "name_leaks": [leak for p in personas for leak in name_leaks(p, source.names)],
            "coverage": coverage,
            "mean_support": support,
            "titles": [p["title"] for p in personas],
            "warnings": warnings,
        }
    )
    return row


# ---------------------------------------------------------------------------
# The researcher's findings: segments recovered, respondents counted, lists, titles
# ---------------------------------------------------------------------------
#
# researcher.json, beside a data set, holds the personas a researcher drew by reading the
# raw data before the engine ever ran on it: `respondents` and `segments`, each with its
# `members` by Persona's participant ids. bench/labels/sentences.jsonl holds real sentences
# labelled goal, pain, behaviour or none by reading, split into `tune` and `heldout`.

RECOVERED = 0.5  # a segment is recovered when some persona's participants have this Jaccard with it
COUNTS = (3, 4, 5)  # the engine gets its best count of these, as a researcher would try them
LABELS = Path("bench/labels/sentences.jsonl")
LIST_OF_LABEL = {"goal": "goals", "pain": "pain_points", "behaviour": "behaviours"}
BARE_VALUES = {
    "never",
    "rarely",
    "sometimes",
    "often",
    "always",
    "yes",
    "no",
    "daily",
    "weekly",
    "monthly",
    "agree",
    "disagree",
    "strongly agree",
    "strongly disagree",
    "neutral",
    "other",
    "none",
}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def recovery(personas: list[dict[str, Any]], segments: list[dict[str, Any]]) -> list[float]:
    """Per researcher segment, the best Jaccard any persona's participants reach with its members."""
    groups = [set(p["evidence"]["participants"]) for p in personas]
    return [max((jaccard(set(segment["members"]), group) for group in groups), default=0.0) for segment in segments]


def title_faults(personas: list[dict[str, Any]], dataset: Any) -> list[str]:
    """Titles a researcher would not write.

    A placeholder, a bare answer value, an absence, or a phrase under a quarter of its members say."""
    words = {person.id: " ".join(person.texts).lower() for person in dataset.participants}
    faults = []
    for p in personas:
        title = p["title"]
        lead = title.split(":")[0].strip().lower()
        phrase = title.split(":", 1)[-1].strip().lower()
        members = p["evidence"]["participants"]
        said = sum(phrase in words.get(pid, "") for pid in members) / len(members) if members else 0.0
        if re.fullmatch(r"segment \d+", title.lower()):
            faults.append(f"placeholder: {title}")
        elif ":" in title and lead in BARE_VALUES:
            faults.append(f"bare answer: {title}")
        elif ":" in title and re.match(r"(?:never|no|none|not at all)\b", phrase):
            faults.append(f"absence: {title}")
        elif ":" not in title and said < 0.25 and not any(a.get("answer") for a in p["evidence"].get("answers", [])):
            faults.append(f"said by {said:.0%}: {title}")
    return faults


def findings(name: str, researcher: dict[str, Any]) -> dict[str, Any]:
    """Respondents counted, the researcher's segments recovered at the best count, stability and titles."""
    dataset = persona.load_path(researcher["data"], CORPUS)
    row: dict[str, Any] = {
        "dataset": name,
        "respondents": researcher["respondents"],
        "participants": len(dataset.participants),
        "segments": len(researcher["segments"]),
    }
    best: tuple[int, float, int] | None = None
    for count in COUNTS:
        personas, _ = persona.offline_personas(dataset, count, CONFIG)
        scores = recovery(personas, researcher["segments"])
        found = sum(score >= RECOVERED for score in scores)
        if best is None or (found, statistics.mean(scores)) > (best[0], best[1]):
            best = (found, statistics.mean(scores), count)
            row.update(
                recovered=found,
                best_count=count,
                jaccards=[round(x, 2) for x in scores],
                titles=[p["title"] for p in personas],
                title_faults=title_faults(personas, dataset),
            )
            silent = getattr(dataset, "silent", None)  # older versions count only whom they read
            quality = persona.quality_report(dataset.participants, personas, *([silent] if silent is not None else []))
            stability = (
                persona.grouping_stability(dataset.participants, count, CONFIG, personas, *labels_if_read(dataset))
                if hasattr(persona, "grouping_stability")
                else None
            )
            row.update(coverage=quality.get("coverage"), stability=stability, covered_of=quality.get("respondents"))
    return row


def labels_if_read(dataset: Any) -> list[Any]:
    """The dataset's question texts for grouping_stability, where the version under test takes them (its
    grouping weighs a grid's items by them); nothing for an older one."""
    takes_labels = "labels" in inspect.signature(persona.grouping_stability).parameters
    return [dataset.labels] if takes_labels else []


SPEECH_FIELDS = {"interviewee turn"}  # the labels' field for a transcript turn: no question the engine sees


def kind_of(row: dict[str, Any]) -> str | None:
    """The list the engine puts a labelled sentence in, seeing the question as a job would (a survey column's)."""
    question = "" if row["field"] in SPEECH_FIELDS else row["field"]
    if len(inspect.signature(persona.list_kind).parameters) < 2:  # versions that read the sentence alone
        return persona.list_kind(row["text"])
    return persona.list_kind(row["text"], question)


def list_precision() -> dict[str, dict[str, dict[str, float | int]]]:
    """Per split and list: how many sentences the engine puts in it, and the share the labels agree with."""
    if not LABELS.exists():
        return {}
    table: dict[str, dict[str, dict[str, float | int]]] = {}
    rows = [json.loads(line) for line in LABELS.read_text(encoding="utf-8").splitlines() if line.strip()]
    for split in ("tune", "heldout"):
        part = [row for row in rows if row["split"] == split]
        for label, name in LIST_OF_LABEL.items():
            chosen = [row for row in part if kind_of(row) == name]
            relevant = [row for row in part if row["label"] == label]
            right = sum(row["label"] == label for row in chosen)
            table.setdefault(split, {})[name] = {
                "chosen": len(chosen),
                "precision": round(right / len(chosen), 3) if chosen else 0.0,
                "recall": round(right / len(relevant), 3) if relevant else 0.0,
            }
    return table


def print_findings(rows: list[dict[str, Any]], precision: dict[str, dict[str, dict[str, float | int]]]) -> None:
    print()
    print(
        "| dataset | respondents (covered) | read | segments recovered | best count | Jaccards | stability "
        "| title faults |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['dataset']} | {row['respondents']} ({row.get('covered_of') or '-'}) | {row['participants']} "
            f"| {row['recovered']} of {row['segments']} | {row['best_count']} | {row['jaccards']} "
            f"| {number(row.get('stability'))} | {len(row['title_faults'])} |"
        )
    for split, lists in precision.items():
        print(
            f"\n{split}: "
            + ", ".join(
                f"{name} precision {v['precision']:.2f} recall {v['recall']:.2f} ({v['chosen']} chosen)"
                for name, v in lists.items()
            )
        )


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

COLUMNS = (
    "dataset",
    "read/truth",
    "intv",
    "spliced",
    "empty",
    "sizes",
    "title",
    "demo",
    "bad",
    "names",
    "cover",
    "supp",
)


def number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table_row(row: dict[str, Any]) -> list[str]:
    if "error" in row:
        read = row.get("read_participants", "-")
        return [row["dataset"], f"{read}/{row['truth_participants']}", "load/run failed: " + row["error"][:90]]
    return [
        row["dataset"],
        f"{row['read_participants']}/{row['truth_participants']}",
        str(len(row["interviewer_items"])),
        f"{len(row['spliced_quotes'])}/{row['quotes']}",
        str(row["empty_lists"]),
        ",".join(map(str, row["segment_sizes"])),
        number(row["title_share"]),
        number(row["demographics_per_persona"], 1),
        str(len(row["bad_demographics"])),
        str(len(row["name_leaks"])),
        number(row["coverage"]),
        number(row["mean_support"]),
    ]


def print_table(rows: list[dict[str, Any]]) -> None:
    cells = [list(COLUMNS)] + [table_row(row) for row in rows]
    widths = [
        max(len(line[i]) for line in cells if i < len(line) and (i < 2 or len(line) == len(COLUMNS)))
        for i in range(len(COLUMNS))
    ]
    for line in cells:
        if len(line) == len(COLUMNS):
            print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        else:
            print("  ".join([line[0].ljust(widths[0]), line[1].ljust(widths[1]), line[2]]))


def print_details(row: dict[str, Any]) -> None:
    """The offending items themselves, for a person to read."""
    if "error" in row:
        return
    print(f"\n== {row['dataset']}")
    for title in row["titles"]:
        print(f"  title: {title}")
    for label, items in (
        ("interviewer words", row["interviewer_items"]),
        ("spliced quote", row["spliced_quotes"]),
        ("bad demographics", row["bad_demographics"]),
        ("name", row["name_leaks"]),
    ):
        for item in items:
            print(f"  {label}: {squash(item)[:160]}")


def load_truths(names: list[str] | None) -> list[tuple[str, dict[str, Any]]]:
    truths = []
    for path in sorted(CORPUS.glob("*/truth.json")):
        if not names or path.parent.name in names:
            truths.append((path.parent.name, json.loads(path.read_text(encoding="utf-8"))))
    return truths


def import_persona(folder: Path) -> ModuleType:
    """persona.py from `folder` (the repository root unless --persona says otherwise).

    Loading another copy lets a change be measured against the committed version while
    the working tree is being edited.
    """
    spec = importlib.util.spec_from_file_location("persona", folder / "persona.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"no persona.py in {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["persona"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    global persona
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=4, help="personas per data set (default 4)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--only", nargs="*", metavar="NAME", help="only these data sets")
    parser.add_argument("--verbose", action="store_true", help="print titles and every offending item")
    parser.add_argument(
        "--persona",
        metavar="DIR",
        type=Path,
        default=ROOT,
        help="import persona.py from DIR instead of the repository root",
    )
    args = parser.parse_args()
    persona = import_persona(args.persona.resolve())
    os.chdir(ROOT)  # the corpus path is relative to the repository root, as a server's data dir would be
    rows = [evaluate(name, truth, args.count) for name, truth in load_truths(args.only)]
    print_table(rows)
    researched = [
        findings(path.parent.name, json.loads(path.read_text(encoding="utf-8")))
        for path in sorted(CORPUS.glob("*/researcher.json"))
        if not args.only or path.parent.name in args.only
    ]
    print_findings(researched, list_precision())
    if args.verbose:
        for row in researched:
            print(f"\n{row['dataset']}: titles {row['titles']}; faults {row['title_faults']}")
        for row in rows:
            print_details(row)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"datasets": rows, "findings": researched, "lists": list_precision()}, indent=2, ensure_ascii=False
            )
            + "\n",
            encoding="utf-8",
        )


if __name__ == "__main__":
    main()
