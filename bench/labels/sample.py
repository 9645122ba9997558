"""Draw the labelled-sentence sample from the real corpus under bench/corpus (standard library only).

    python bench/labels/sample.py            # write bench/labels/sentences.jsonl (labels from labels.tsv)
    python bench/labels/sample.py --check    # rebuild in memory, compare with sentences.jsonl, print counts

What it does, deterministically:

1. Reads the free-text answers of each data set (the columns in FREE_TEXT; multiple-choice,
   check-box, metadata, name and URL columns are left out), or, for the Request For Commits
   transcripts, every paragraph said by an interviewee (the hosts in HOSTS and the "Break"
   marker are left out; an unlabelled paragraph belongs to the speaker of the labelled one
   before it).
2. Splits each answer / paragraph into sentences (see split_sentences), normalises whitespace,
   and keeps sentences of at least MIN_WORDS words. Transcriber notes such as \\[12:34\\] and
   \\[laughter\\] are removed; sentences with an \\[unintelligible\\], \\[inaudible\\] or
   \\[censored\\] gap are dropped, since their text is not what was said. A leading list marker
   ("- ", "* ", "1) ") is removed. Nothing else in a sentence is changed. Within a data set
   a sentence whose text repeats an earlier one is kept once.
3. Numbers the candidate sentences of each data set in file order (1, 2, ...): that number is
   the n in the id "<dataset>:<n>".
4. Draws PER_DATASET sentences from each data set with random.Random(f"{SEED}:{dataset}").sample.
5. Splits each data set's sample into "tune" and "heldout" by participant, so one person's
   sentences never sit on both sides: the participants of the sample are shuffled with
   random.Random(f"{SEED}:split:{dataset}") and taken in that order into "heldout" until it
   holds at least half of the data set's sample; the rest are "tune".
6. Adds the hand-written label of each id from labels.tsv (id, label, also, text) when that
   file exists; the text there must equal the sampled text, so a changed sample cannot pick up
   labels written for other sentences.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

SEED = 20250607
PER_DATASET = 85
MIN_WORDS = 4

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "corpus"
OUT = HERE / "sentences.jsonl"
LABELS = HERE / "labels.tsv"
LABEL_SET = ("goal", "pain", "behaviour", "none")

HOSTS = {"Nadia Eghbal", "Mikeal Rogers", "Adam Stacoviak", "Break"}

# data set -> (file, delimiter, participant, free-text columns by index); the participant is a column
# index, None for "row N" (the 1-based data row), or a format string filled with that row number
FREE_TEXT: dict[str, tuple[str, str, int | str | None, list[int]]] = {
    # 4 hinders; 6-8 tools to integrate; 10 other way to run; 11-16 needs (not) addressed;
    # 17-22 pleasant / difficult aspects; 23-28 features and enhancements wanted; 31 role
    "jupyter-ux-2015": ("jupyter-ux-2015/responses.csv", ",", None, [4, 6, 7, 8, 10, *range(11, 29), 31]),
    # 11 pain points running the class; 13 extensions; 21 other grading; 22 grading pain points;
    # 23 other uses; 24 suggestions
    "jupyter-education-2016": ("jupyter-education-2016/responses.csv", ",", None, [11, 13, 21, 22, 23, 24]),
    # every column but Respondent ID is a free-text field
    "jupyter-2020": ("jupyter-2020/text_fields.csv", ",", 0, list(range(1, 19))),
    # 2 job title; 22 like best; 23 like least; 28 could not live without; 29 most missing;
    # 31 one thing to change
    "r-community-2018": ("r-community-2018/responses.tsv", "\t", None, [2, 22, 23, 28, 29, 31]),
    # review_text (participant = review_id)
    "ethiopian-bank-reviews": ("ethiopian-bank-reviews/reviews.csv", ",", 0, [2]),
    # the four open questions: 3 own definition of a flaky test; 23 other causes; 32 other actions;
    # 35 anything else (participant = responses-NNN, the 1-based data row, as the project names them)
    "flaky-tests-2021": ("flaky-tests-2021/responses.tsv", "\t", "responses-{:03d}", [3, 23, 32, 35]),
}
TRANSCRIPTS = "rfc-transcripts"
# order of the data sets in sentences.jsonl; data sets added later go last, so earlier lines stay put
DATASETS = [
    "jupyter-ux-2015",
    "jupyter-education-2016",
    "jupyter-2020",
    "r-community-2018",
    "ethiopian-bank-reviews",
    TRANSCRIPTS,
    "flaky-tests-2021",
]

SPEAKER = re.compile(r"^\*\*(?P<label>[^*]{1,60}):\*\*\s*(?P<text>.*)$")
NOTE = re.compile(r"\\\[(?P<note>[^\]]*?)\\\]")
GAP_NOTE = re.compile(r"unintelligible|inaudible|censored", re.I)
LIST_MARKER = re.compile(r"^(?:[-*•]+|\(?\d{1,2}[).:])\s+")
SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+")
ABBREVIATION = re.compile(r"(?:(?i:\b(?:vs|cf|approx))|\b(?:Mr|Mrs|Ms|Dr|St)|(?:\b[A-Za-z]\.)+[A-Za-z])\.$")


def words(text: str) -> int:
    """Whitespace-separated tokens holding a letter or digit ("/" and "-" do not count)."""
    return sum(any(ch.isalnum() for ch in token) for token in text.split())


def split_sentences(text: str) -> list[str]:
    """Lines first (survey answers are often lists), then sentence ends (., !, ? and closing
    quotes or brackets, then white space); a full stop after a common abbreviation ("e.g.",
    "i.e.", "U.S.", "vs.", "Dr.") does not split."""
    out: list[str] = []
    for line in text.splitlines():
        line = " ".join(line.split())
        if not line:
            continue
        pieces: list[str] = []
        start = 0
        for match in SENTENCE_END.finditer(line):
            piece = line[start : match.start()].strip()
            if ABBREVIATION.search(piece.split(" ")[-1] if piece else ""):
                continue
            pieces.append(line[start : match.end()])
            start = match.end()
        pieces.append(line[start:])
        for piece in pieces:
            piece = " ".join(piece.split())
            piece = LIST_MARKER.sub("", piece)
            if piece:
                out.append(piece)
    return out


def survey_units(dataset: str) -> list[tuple[str, str, str]]:
    """(participant, field, answer text) for each non-empty free-text cell, in file order."""
    path, delimiter, id_col, cols = FREE_TEXT[dataset]
    with open(CORPUS / path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter=delimiter))
    header, body = rows[0], rows[1:]
    units = []
    for number, row in enumerate(body, start=1):
        if isinstance(id_col, int):
            who = row[id_col]
        else:
            who = (id_col or "row {}").format(number)
        for col in cols:
            if col < len(row) and row[col].strip():
                units.append((who, header[col].replace("\xa0", " ").strip(), row[col]))
    return units


def transcript_units() -> list[tuple[str, str, str]]:
    """(file, "interviewee turn", paragraph) for each interviewee paragraph, in file order."""
    units = []
    for path in sorted((CORPUS / TRANSCRIPTS / "episodes").glob("*.md")):
        speaker = None
        for para in path.read_text(encoding="utf-8").split("\n\n"):
            para = para.strip()
            if not para:
                continue
            match = SPEAKER.match(para)
            if match:
                speaker, para = match.group("label").strip(), match.group("text")
            if speaker is None or speaker in HOSTS:
                continue
            units.append((path.name, "interviewee turn", para))
    return units


def clean_transcript_sentence(sentence: str) -> str | None:
    if any(GAP_NOTE.search(m.group("note")) for m in NOTE.finditer(sentence)):
        return None
    return " ".join(NOTE.sub(" ", sentence).split())


def candidates(dataset: str) -> list[dict]:
    units = transcript_units() if dataset == TRANSCRIPTS else survey_units(dataset)
    seen: set[str] = set()
    out = []
    for who, field, text in units:
        if dataset == TRANSCRIPTS:
            text = NOTE.sub(lambda m: m.group(0) if GAP_NOTE.search(m.group("note")) else " ", text)
        for sentence in split_sentences(text):
            if dataset == TRANSCRIPTS:
                sentence = clean_transcript_sentence(sentence)
                if sentence is None:
                    continue
                sentence = LIST_MARKER.sub("", sentence)
            if words(sentence) < MIN_WORDS or sentence.lower() in seen:
                continue
            seen.add(sentence.lower())
            out.append({"n": len(out) + 1, "participant": who, "field": field, "text": sentence})
    return out


def build() -> tuple[list[dict], dict[str, int]]:
    labels: dict[str, tuple[str, list[str], str]] = {}
    if LABELS.exists():
        for line in LABELS.read_text(encoding="utf-8").splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            sid, label, also_text, text = line.split("\t", 3)
            labels[sid] = (label, [a for a in also_text.split(",") if a], text)
    records, pools = [], {}
    assert sorted(DATASETS) == sorted([*FREE_TEXT, TRANSCRIPTS])
    for dataset in DATASETS:
        pool = candidates(dataset)
        pools[dataset] = len(pool)
        chosen = sorted(random.Random(f"{SEED}:{dataset}").sample(pool, PER_DATASET), key=lambda c: c["n"])
        people = sorted({c["participant"] for c in chosen})
        random.Random(f"{SEED}:split:{dataset}").shuffle(people)
        heldout_people: set[str] = set()
        taken = 0
        for person in people:
            if taken * 2 >= len(chosen):
                break
            heldout_people.add(person)
            taken += sum(c["participant"] == person for c in chosen)
        for c in chosen:
            sid = f"{dataset}:{c['n']}"
            record = {
                "id": sid,
                "dataset": dataset,
                "participant": c["participant"],
                "field": c["field"],
                "text": c["text"],
                "label": None,
                "split": "heldout" if c["participant"] in heldout_people else "tune",
            }
            if sid in labels:
                label, also, text = labels[sid]
                assert text == c["text"], f"labels.tsv text differs from the sample for {sid}"
                assert label in LABEL_SET and all(a in LABEL_SET and a != label for a in also), (sid, label, also)
                record["label"] = label
                if also:
                    record["also"] = also
            records.append(record)
    return records, pools


def dump(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def summary(records: list[dict], pools: dict[str, int]) -> None:
    print("candidates per data set:", pools)
    for key in ("dataset", "split", "label"):
        print(key, dict(sorted(Counter(r[key] or "?" for r in records).items())))
    print("label x split", dict(sorted(Counter(f"{r['label']}/{r['split']}" for r in records).items())))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with sentences.jsonl instead of writing it")
    args = parser.parse_args()
    records, pools = build()
    if args.check:
        same = OUT.exists() and OUT.read_text(encoding="utf-8") == dump(records)
        summary(records, pools)
        print("sentences.jsonl is", "up to date" if same else "OUT OF DATE")
        return 0 if same else 1
    OUT.write_text(dump(records), encoding="utf-8")
    summary(records, pools)
    return 0


if __name__ == "__main__":
    sys.exit(main())
