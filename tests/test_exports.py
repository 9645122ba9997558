"""Exports as the real tools write them: transcripts, captions, Word files, survey and review tables."""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest

import persona

# Its subject is not the store: it runs on SQLite alone (tests/test_store.py and the API,
# webhook, durability and recovery tests run on both stores).
pytestmark = pytest.mark.sqlite_only


ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"

QUESTIONS = ("How do you plan your week?", "What gets in the way of that?")
ANSWERS = (
    "I plan my week on Sunday evening with a paper diary.",
    "The shared calendar keeps crashing when I add a recurring event.",
)


def load(tmp_path: Path, name: str, content: str | bytes) -> persona.Dataset:
    """Write `content` as `name` in tmp_path and read it as the server would."""
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return persona.load_path(name, tmp_path)


def all_texts(dataset: persona.Dataset) -> str:
    return "\n".join(text for person in dataset.participants for text in person.texts)


def everything_shown(dataset: persona.Dataset) -> str:
    """Texts, attribute keys and values, and labels: all a persona could be made of."""
    parts = [all_texts(dataset)]
    for person in dataset.participants:
        parts += [f"{key}={value}" for key, value in person.attributes.items()]
    parts += [f"{key}={value}" for key, value in dataset.labels.items()]
    return "\n".join(parts)


def conversation(asker: str, answerer: str, separator: str = ": ") -> str:
    return (
        "\n".join(
            f"{asker}{separator}{question}\n{answerer}{separator}{answer}"
            for question, answer in zip(QUESTIONS, ANSWERS)
        )
        + "\n"
    )


def csv_text(rows: list[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


# -- transcripts: who is the interviewer ---------------------------------------------


@pytest.mark.parametrize(
    "transcript",
    [
        conversation("Interviewer", "Dana"),
        conversation("Interviewer 1", "Dana"),
        conversation("Interviewer1", "Dana", " : "),
        conversation("interviewer", "participant"),
        conversation("I", "R"),
        conversation("Q", "A"),
        conversation("Moderator", "Dana"),
        conversation("Facilitator", "Dana"),
        conversation("**Interviewer:**", "**Dana:**", " "),
        "\n".join(
            f"[00:0{n}:02] Interviewer: {q}\n[00:0{n}:30] Dana: {a}" for n, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))
        )
        + "\n",
        "\n".join(
            f"Sam Lee 00:0{n}:02\n{q}\n\nDana 00:0{n}:30\n{a}\n" for n, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))
        ),
    ],
    ids=[
        "Interviewer",
        "Interviewer 1",
        "Interviewer1 space colon",
        "lower case",
        "I and R",
        "Q and A",
        "Moderator",
        "Facilitator",
        "markdown bold",
        "bracketed timestamps",
        "Otter heading lines",
    ],
)
def test_the_interviewers_words_never_reach_a_participant_and_the_participants_do(
    tmp_path: Path, transcript: str
) -> None:
    dataset = load(tmp_path, "dana.txt", transcript)
    assert [person.id for person in dataset.participants] == ["dana"]
    texts = dataset.participants[0].texts
    said = "\n".join(texts)
    for question in QUESTIONS:
        assert question not in said, (question, texts)
    for answer in ANSWERS:
        assert any(answer in text for text in texts), (answer, texts)
    assert not re.search(r"Interviewer|Dana|\*\*|00:0", said)


def test_each_turn_of_the_participant_is_its_own_text(tmp_path: Path) -> None:
    dataset = load(tmp_path, "dana.md", conversation("Interviewer", "Dana"))
    assert dataset.participants[0].texts == list(ANSWERS)


def test_when_both_speakers_are_names_the_one_asking_questions_is_the_interviewer(tmp_path: Path) -> None:
    dataset = load(tmp_path, "dana.txt", conversation("Sam", "Dana"))
    texts = dataset.participants[0].texts
    assert texts == list(ANSWERS)
    assert any("'sam'" in warning and "interviewer" in warning for warning in dataset.warnings), dataset.warnings


def interviewed_by_alex(name: str, plan: str, trouble: str, aside: str = "") -> str:
    """One file of a study: Alex asks two things (never with a question mark), `name` answers, `aside` a third voice."""
    return (
        f"{aside}Alex: Tell me about planning your week.\n{name}: {plan}\n"
        f"{aside}Alex: Tell me what gets in the way.\n{name}: {trouble}\n"
    )


def test_across_a_folder_the_name_in_most_files_is_the_interviewer_even_when_others_ask(tmp_path: Path) -> None:
    # Alex never asks with a question mark; each participant asks one back: only recurrence tells them apart.
    (tmp_path / "study").mkdir()
    for name in ("Dana", "Eli", "Fran"):
        (tmp_path / "study" / f"{name.lower()}.txt").write_text(
            interviewed_by_alex(
                name,
                "Do you mean at work? I plan my week on Sunday evening with a paper diary.",
                "The shared calendar keeps crashing when I add a recurring event.",
            )
        )
    dataset = persona.load_path("study", tmp_path)
    assert [person.id for person in dataset.participants] == ["dana", "eli", "fran"]
    assert "Tell me" not in all_texts(dataset)
    assert all(len(person.texts) == 2 for person in dataset.participants)
    assert any("'alex'" in warning and "interviewer" in warning for warning in dataset.warnings), dataset.warnings


def test_a_voice_heard_in_a_few_files_of_a_study_with_a_recurring_interviewer_is_not_the_participant(
    tmp_path: Path,
) -> None:
    (tmp_path / "study").mkdir()
    for number, name in enumerate(("Dana", "Eli", "Fran", "Gus", "Hal", "Ida")):
        (tmp_path / "study" / f"{name.lower()}.txt").write_text(
            interviewed_by_alex(
                name,
                "I plan my week on Sunday evening with a paper diary and a pencil, page by page, and then I copy "
                "the plan into the shared calendar so that the rest of the team can see it.",
                "The shared calendar keeps crashing whenever I add a recurring event for the whole team, and then I "
                "have to add every single meeting again by hand.",
                "Pat: Coming up next.\n" if number < 2 else "",  # a producer, in two files of six
            )
        )
    dataset = persona.load_path("study", tmp_path)
    assert [person.id for person in dataset.participants] == ["dana", "eli", "fran", "gus", "hal", "ida"]
    assert "Coming up" not in all_texts(dataset)
    assert all(len(person.texts) == 2 for person in dataset.participants)
    assert any("'pat'" in warning and "interviewer" in warning for warning in dataset.warnings), dataset.warnings


def test_a_participant_of_two_sessions_stays_the_participant_of_both(tmp_path: Path) -> None:
    (tmp_path / "study").mkdir()
    sessions = {"dana-1": "Dana", "dana-2": "Dana", "eli": "Eli", "fran": "Fran", "gus": "Gus", "hal": "Hal"}
    for file, name in sessions.items():
        (tmp_path / "study" / f"{file}.txt").write_text(
            interviewed_by_alex(
                name,
                "I plan my week on Sunday evening with a paper diary.",
                "The shared calendar keeps crashing when I add a recurring event.",
                "Sam: Me too.\n" if file == "dana-2" else "",  # a companion of the second session
            )
        )
    dataset = persona.load_path("study", tmp_path)
    texts = {person.id: " ".join(person.texts) for person in dataset.participants}
    assert "paper diary" in texts["dana-1"] and "paper diary" in texts["dana-2"]
    assert not any("'dana'" in warning for warning in dataset.warnings), dataset.warnings


# -- transcripts: headers and noise ---------------------------------------------------


def test_a_first_sentence_with_a_colon_is_not_a_header(tmp_path: Path) -> None:
    text = (
        "Honestly: the app is slow and I hate it.\nI use it every morning on the bus to work.\n\n"
        "It keeps logging me out when the signal drops.\n"
    )
    dataset = load(tmp_path, "note.txt", text)
    person = dataset.participants[0]
    assert person.attributes == {}
    assert "the app is slow" in "\n".join(person.texts)


def test_a_real_header_block_gives_attributes_but_not_its_date(tmp_path: Path) -> None:
    text = "Role: Nurse\nAge: 34\nDate: 2024-03-01\n\n" + conversation("Interviewer", "Participant")
    person = load(tmp_path, "p01.txt", text).participants[0]
    assert person.attributes == {"role": "Nurse", "age": "34"}
    assert person.texts == list(ANSWERS)


def test_recording_notices_small_talk_and_non_speech_cues_are_not_what_was_said(tmp_path: Path) -> None:
    text = (
        "Interviewer: Hi Dana. This meeting is being recorded. How do you plan your week?\n"
        "Dana: Hi, thanks for having me.\n"
        "Interviewer: So, your week?\n"
        "Dana: [laughs] I plan my week on Sunday evening (inaudible) with a paper diary.\n"
    )
    texts = load(tmp_path, "dana.txt", text).participants[0].texts
    said = "\n".join(texts)
    assert "recorded" not in said and "thanks for having me" not in said.lower()
    assert "[laughs]" not in said and "(inaudible)" not in said
    assert "paper diary" in said
    assert all(text.strip() for text in texts)


def test_no_persona_sentence_crosses_a_turn(tmp_path: Path) -> None:
    # Turns without closing punctuation: joined carelessly they would run into one sentence.
    said = [
        ("I plan my week on Sunday evening with a paper diary", "The shared calendar keeps crashing on my phone"),
        ("I plan my shifts on a paper diary every Sunday", "The shared calendar keeps crashing when I sync"),
        ("I want reminders for my diary the night before", "It is frustrating when the calendar loses events"),
        ("I want my diary and calendar in one place", "It is frustrating when the calendar freezes at night"),
    ]
    (tmp_path / "study").mkdir()
    for n, (first, second) in enumerate(said):
        (tmp_path / "study" / f"p{n}.txt").write_text(
            f"Interviewer: How do you plan?\nParticipant: {first}\nInterviewer: And then?\nParticipant: {second}\n"
        )
    dataset = persona.load_path("study", tmp_path)
    texts = {person.id: person.texts for person in dataset.participants}
    personas, _ = persona.offline_personas(dataset, 2, {})
    checked = 0
    for item in personas:
        own = [text for pid in item["evidence"]["participants"] for text in texts[pid]]
        for key in ("quotes", "goals", "pain_points", "behaviours"):
            for sentence in item[key]:
                checked += 1
                assert any(sentence in text for text in own), (key, sentence, own)
    assert checked >= 2


# -- captions ----------------------------------------------------------------------


WEBVTT = """WEBVTT

1
00:00:01.000 --> 00:00:04.000
<v Sam>How do you plan your week?</v>

2
00:00:04.000 --> 00:00:07.500
<v Dana>I plan my week on Sunday evening</v>

3
00:00:07.500 --> 00:00:10.000
<v Dana>with a paper diary and a pencil.</v>

4
00:00:10.000 --> 00:00:12.000
<v Sam>What gets in the way of that?</v>

5
00:00:12.000 --> 00:00:16.000
<v Dana>The shared calendar keeps crashing when I add a recurring event.</v>
"""

SUBRIP = """1
00:00:01,000 --> 00:00:04,000
Sam: How do you plan your week?

2
00:00:04,000 --> 00:00:07,500
Dana: I plan my week on Sunday evening

3
00:00:07,500 --> 00:00:10,000
with a paper diary and a pencil.

4
00:00:10,000 --> 00:00:12,000
Sam: What gets in the way of that?

5
00:00:12,000 --> 00:00:16,000
Dana: The shared calendar keeps crashing when I add a recurring event.
"""


@pytest.mark.parametrize(("name", "content"), [("call.vtt", WEBVTT), ("call.srt", SUBRIP)])
def test_caption_cues_become_turns_of_their_speakers_without_timings(tmp_path: Path, name: str, content: str) -> None:
    dataset = load(tmp_path, name, content)
    assert [person.id for person in dataset.participants] == ["call"]
    texts = dataset.participants[0].texts
    assert texts == [
        "I plan my week on Sunday evening with a paper diary and a pencil.",
        "The shared calendar keeps crashing when I add a recurring event.",
    ]
    said = "\n".join(texts)
    assert "WEBVTT" not in said and "-->" not in said and "<v" not in said and "Sam" not in said


def test_a_sentence_split_across_two_cues_is_one_sentence(tmp_path: Path) -> None:
    texts = load(tmp_path, "call.vtt", WEBVTT).participants[0].texts
    assert persona.split_sentences(texts[0]) == ["I plan my week on Sunday evening with a paper diary and a pencil."]


# -- Word documents -----------------------------------------------------------------


def docx_bytes(paragraphs: list[str]) -> bytes:
    body = "".join(f"<w:p><w:r><w:t>{escape(text)}</w:t></w:r></w:p>" for text in paragraphs)
    document = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        '<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
        f"<w:body>{body}</w:body></w:document>"
    )
    content_types = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="xml" ContentType="application/xml"/>'
        '<Override PartName="/word/document.xml" ContentType="application/'
        'vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>'
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("[Content_Types].xml", content_types)
        archive.writestr("word/document.xml", document)
    return buffer.getvalue()


def test_a_word_document_is_read_as_turns(tmp_path: Path) -> None:
    paragraphs = [line for line in conversation("Interviewer", "Dana").splitlines()]
    dataset = load(tmp_path, "dana.docx", docx_bytes(paragraphs))
    assert [person.id for person in dataset.participants] == ["dana"]
    assert dataset.participants[0].texts == list(ANSWERS)


def test_a_docx_that_is_not_a_zip_fails_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(persona.GenerationError, match="broken.docx"):
        load(tmp_path, "broken.docx", b"Interviewer: this is plain text, not a Word file.\n")


# -- Qualtrics ----------------------------------------------------------------------


QUALTRICS_HEADER = [
    "StartDate",
    "EndDate",
    "Status",
    "IPAddress",
    "Progress",
    "Duration (in seconds)",
    "Finished",
    "RecordedDate",
    "ResponseId",
    "DistributionChannel",
    "UserLanguage",
    "Consent",
    "Q1",
    "Q2",
    "Q3",
]
QUALTRICS_QUESTIONS = [
    "Start Date",
    "End Date",
    "Response Type",
    "IP Address",
    "Progress",
    "Duration (in seconds)",
    "Finished",
    "Recorded Date",
    "Response ID",
    "Distribution Channel",
    "User Language",
    "Do you agree to take part?",
    "What is your role?",
    "How likely are you to use proctoring?",
    "Tell us about your experience [QID19-ChoiceTextEntryValue]",
]
QUALTRICS_IMPORT_IDS = [
    '{"ImportId":"startDate","timeZone":"America/Denver"}',
    '{"ImportId":"endDate","timeZone":"America/Denver"}',
    '{"ImportId":"status"}',
    '{"ImportId":"ipAddress"}',
    '{"ImportId":"progress"}',
    '{"ImportId":"duration"}',
    '{"ImportId":"finished"}',
    '{"ImportId":"recordedDate","timeZone":"America/Denver"}',
    '{"ImportId":"_recordId"}',
    '{"ImportId":"distributionChannel"}',
    '{"ImportId":"userLanguage"}',
    '{"ImportId":"QID2"}',
    '{"ImportId":"QID3"}',
    '{"ImportId":"QID4"}',
    '{"ImportId":"QID19_TEXT"}',
]
QUALTRICS_ANSWERS = [
    ("Teacher", "Very likely", "I trust the proctoring tool but the setup before each exam takes far too long."),
    ("Student", "Unlikely", "The webcam check failed twice and I lost ten minutes of my exam time."),
    ("Teacher", "Somewhat likely", "I want a practice exam so students can test their camera the day before."),
    ("Student", "Very likely", "It worked fine on my laptop once I closed every other program running."),
    ("Teacher", "Unlikely", "Grading flagged sessions by hand is slow and the video player keeps freezing."),
    ("Student", "Somewhat likely", "I need clearer instructions about what is allowed on my desk during tests."),
]


def qualtrics_rows() -> list[list[str]]:
    rows = [QUALTRICS_HEADER, QUALTRICS_QUESTIONS, QUALTRICS_IMPORT_IDS]
    for n, (role, likely, said) in enumerate(QUALTRICS_ANSWERS):
        rows.append(
            [
                f"2024-03-0{n + 1} 09:1{n}:00",
                f"2024-03-0{n + 1} 09:2{n}:00",
                "IP Address",
                f"10.0.0.{n + 1}",
                "100",
                str(300 + 17 * n),
                "True",
                f"2024-03-0{n + 1} 09:2{n}:01",
                f"R_{n}AbCdEfGh{n}IjKlMn",
                "anonymous",
                "EN",
                "Yes",
                role,
                likely,
                said,
            ]
        )
    return rows


def test_a_qualtrics_export_reads_responses_not_its_question_and_import_rows(tmp_path: Path) -> None:
    dataset = load(tmp_path, "qualtrics.csv", csv_text(qualtrics_rows()))
    assert [person.id for person in dataset.participants] == [f"R_{n}AbCdEfGh{n}IjKlMn" for n in range(6)]
    assert [person.texts for person in dataset.participants] == [[said] for _, _, said in QUALTRICS_ANSWERS]
    metadata = {
        "startdate",
        "enddate",
        "status",
        "ipaddress",
        "progress",
        "finished",
        "recordeddate",
        "distributionchannel",
        "userlanguage",
        "responseid",
    }
    for person in dataset.participants:
        keys = {re.sub(r"[^a-z]", "", key) for key in person.attributes}
        assert not keys & metadata, person.attributes
        assert not any(key.startswith("duration") for key in keys), person.attributes
        assert {"q1", "q2"} <= set(person.attributes)
        assert "consent" not in person.attributes
    assert dataset.participants[0].attributes["q2"] == "Very likely"
    assert dataset.labels["q2"] == "How likely are you to use proctoring?"
    assert dataset.labels["q1"] == "What is your role?"


def test_qualtrics_piped_text_codes_never_appear_anywhere(tmp_path: Path) -> None:
    dataset = load(tmp_path, "qualtrics.csv", csv_text(qualtrics_rows()))
    assert "[QID19" not in everything_shown(dataset)
    assert "ImportId" not in everything_shown(dataset)
    personas, _ = persona.offline_personas(dataset, 2, {})
    assert "[QID19" not in json.dumps(personas) and "ImportId" not in json.dumps(personas)


def test_qualtrics_warnings_name_the_columns_left_out(tmp_path: Path) -> None:
    dataset = load(tmp_path, "qualtrics.csv", csv_text(qualtrics_rows()))
    warnings = "\n".join(dataset.warnings)
    assert "'StartDate'" in warnings and "'IPAddress'" in warnings
    assert "'Consent'" in warnings


def test_the_real_qualtrics_sample_leaves_out_its_metadata_and_recipient_columns() -> None:
    # tests/data/qualtrics_sample.csv: ropensci/qualtRics (MIT); see tests/data/README.md.
    dataset = persona.load_path("qualtrics_sample.csv", DATA)
    warnings = "\n".join(dataset.warnings)
    for column in ("'StartDate'", "'IPAddress'", "'LocationLatitude'"):
        assert column in warnings
    for person in dataset.participants:
        assert not {"startdate", "ipaddress", "locationlatitude", "recipientemail"} & set(person.attributes)


# -- SurveyMonkey and Google Forms ----------------------------------------------------


SURVEYMONKEY = [
    [
        "Respondent ID",
        "Collector ID",
        "Start Date",
        "End Date",
        "IP Address",
        "Email Address",
        "First Name",
        "Last Name",
        "What do you like?",
        "Which features do you use?",
        "",
        "",
    ],
    ["", "", "", "", "", "", "", "", "Open-Ended Response", "Reports", "Exports", ""],
]
MONKEY_PEOPLE = [
    (
        "114522",
        "zelda@example.org",
        "Zelda",
        "Quimby",
        "The weekly reports save me an hour every Monday morning.",
        "Reports",
        "",
        "",
    ),
    (
        "114523",
        "yusuf@example.org",
        "Yusuf",
        "Ferrante",
        "Exporting to spreadsheets is quick and the columns stay put.",
        "",
        "Exports",
        "",
    ),
    (
        "114524",
        "xiomara@example.org",
        "Xiomara",
        "Lindqvist",
        "I like that the dashboards load fast on my old laptop.",
        "Reports",
        "Exports",
        "",
    ),
    (
        "114525",
        "wendel@example.org",
        "Wendel",
        "Okonkwo",
        "Sharing a report with my manager takes one click now.",
        "Reports",
        "",
        "",
    ),
]


def surveymonkey_rows() -> list[list[str]]:
    rows = [list(row) for row in SURVEYMONKEY]
    for n, (rid, email, first, last, like, reports, exports, other) in enumerate(MONKEY_PEOPLE):
        rows.append(
            [
                rid,
                "431",
                f"03/0{n + 1}/2024 10:00:00 AM",
                f"03/0{n + 1}/2024 10:05:00 AM",
                f"10.1.1.{n}",
                email,
                first,
                last,
                like,
                reports,
                exports,
                other,
            ]
        )
    return rows


def test_a_surveymonkey_export_takes_ids_from_respondent_id_and_no_personal_data(tmp_path: Path) -> None:
    dataset = load(tmp_path, "monkey.csv", csv_text(surveymonkey_rows()))
    assert [person.id for person in dataset.participants] == [row[0] for row in MONKEY_PEOPLE]
    assert [person.texts for person in dataset.participants] == [[row[4]] for row in MONKEY_PEOPLE]
    shown = everything_shown(dataset)
    for _, email, first, last, *_ in MONKEY_PEOPLE:
        assert email not in shown and first not in shown and last not in shown


def test_a_surveymonkey_question_over_several_columns_becomes_one_answer_of_its_ticked_choices(tmp_path: Path) -> None:
    dataset = load(tmp_path, "monkey.csv", csv_text(surveymonkey_rows()))
    labels = set(dataset.labels.values())
    assert "Which features do you use?" in labels, labels
    answers = [person.attributes.get("which_features_do_you_use?") for person in dataset.participants]
    assert answers == ["Reports", "Exports", "Reports; Exports", "Reports"]
    assert not any(label.startswith("column_") for label in labels)
    assert not any(key.startswith("column_") for person in dataset.participants for key in person.attributes)
    assert any("second header row" in warning for warning in dataset.warnings)


def test_a_google_forms_export_drops_timestamp_and_email_and_warns_rows_are_people(tmp_path: Path) -> None:
    rows = [
        ["Timestamp", "Email Address", "What is your role?", "What frustrates you most?"],
        ["3/1/2024 10:01:02", "ana@example.org", "Nurse", "The rota changes at night and nobody tells me."],
        ["3/1/2024 11:15:40", "ben@example.org", "Driver", "Overtime never shows up on the right payslip."],
        ["3/2/2024 08:00:13", "cai@example.org", "Nurse", "Swapping a shift takes five phone calls and a form."],
    ]
    dataset = load(tmp_path, "form.csv", csv_text(rows))
    assert len(dataset.participants) == 3
    shown = everything_shown(dataset)
    assert "@example.org" not in shown and "3/1/2024" not in shown
    assert [person.attributes for person in dataset.participants] == [
        {"what_is_your_role?": row[2]} for row in rows[1:]
    ]
    assert [person.texts for person in dataset.participants] == [[row[3]] for row in rows[1:]]
    assert any("each row was read as one participant" in warning for warning in dataset.warnings), dataset.warnings


# -- app store reviews --------------------------------------------------------------


PLAY_COLUMNS = [
    "reviewId",
    "userName",
    "userImage",
    "content",
    "score",
    "thumbsUpCount",
    "reviewCreatedVersion",
    "at",
    "replyContent",
    "repliedAt",
    "appVersion",
]
PLAY_REVIEWS = [
    ("Harriet Vandermolen", "It keeps crashing when I upload a photo of my receipt.", "1"),
    ("Ignatius Brightwater", "Please add dark mode, the white screen hurts at night.", "4"),
    ("Juniper Albescu", "Syncing between my phone and tablet is quick and reliable.", "5"),
    ("Kasimir Thorvaldsen", "The budget categories are confusing to set up the first time.", "2"),
    ("Leocadia Pemberton", "I check my spending every morning before work with a coffee.", "5"),
]
REPLY = "Thanks for the feedback, our support team is looking into this for you."


def play_rows() -> list[list[str]]:
    rows = [PLAY_COLUMNS]
    for n, (user, content, score) in enumerate(PLAY_REVIEWS):
        rows.append(
            [
                f"9f1c2b7e-4a1d-4c3e-8b{n}a-0d2e6f1a9c{n}b",
                user,
                f"https://play-lh.googleusercontent.com/a-/avatar{n}",
                content,
                score,
                str(n * 3),
                "3.4.1",
                f"2024-03-0{n + 1} 10:00:00",
                REPLY if n % 2 == 0 else "",
                f"2024-03-0{n + 2} 09:00:00" if n % 2 == 0 else "",
                "3.4.1",
            ]
        )
    return rows


def test_play_store_reviews_take_their_ids_and_scores_but_never_names_or_replies(tmp_path: Path) -> None:
    dataset = load(tmp_path, "reviews.csv", csv_text(play_rows()))
    assert [person.id for person in dataset.participants] == [row[0] for row in play_rows()[1:]]
    assert [person.texts for person in dataset.participants] == [[content] for _, content, _ in PLAY_REVIEWS]
    assert [person.attributes.get("score") for person in dataset.participants] == [score for *_, score in PLAY_REVIEWS]
    assert all(set(person.attributes) == {"score"} for person in dataset.participants)
    shown = everything_shown(dataset)
    assert REPLY not in shown and "googleusercontent" not in shown
    personas, _ = persona.offline_personas(dataset, 2, {})
    output = json.dumps(personas, ensure_ascii=False)
    for user, _, _ in PLAY_REVIEWS:
        assert user not in shown and user not in output
        assert user.split()[0] not in output
    assert REPLY not in output
    assert all(re.fullmatch(r"median \d+(\.5)?, range \d–\d|\d", item["demographics"]["score"]) for item in personas)


# -- columns told apart -------------------------------------------------------------


def test_a_column_of_uuids_with_no_id_like_name_is_the_id(tmp_path: Path) -> None:
    uuids = [
        "3f2504e0-4f89-11d3-9a0c-0305e82c3301",
        "6fa459ea-ee8a-3ca4-894e-db77e160355e",
        "16fd2706-8baf-433b-82eb-8c7fada847da",
    ]
    rows = [["ref", "role", "comment"]] + [
        [uid, role, said]
        for uid, role, said in zip(
            uuids,
            ["Nurse", "Driver", "Nurse"],
            [
                "I need the rota offline on night shifts.",
                "Overtime pay is always late for me.",
                "Swapping shifts should take one tap.",
            ],
        )
    ]
    dataset = load(tmp_path, "coded.csv", csv_text(rows))
    assert [person.id for person in dataset.participants] == uuids
    assert all(uid not in everything_shown(dataset) for uid in uuids)


def test_a_constant_column_is_dropped_and_likert_choices_are_attributes_not_speech(tmp_path: Path) -> None:
    choices = ["Agree", "Disagree", "Neutral"]
    comments = [
        "The rota app works fine on my phone at home.",
        "I can never find the swap button in the menu.",
        "Overtime requests disappear after I submit them.",
        "The night shift view is easy to read.",
        "It logs me out every single time I switch apps.",
        "I like the reminder before each shift.",
        "The payslip page takes ages to open on the ward.",
        "I print the rota because the app is slow.",
        "Holiday requests are approved quickly now.",
    ]
    rows = [["participant_id", "wave", "satisfaction", "comment"]]
    rows += [[f"P{n}", "2", choices[n % 3], comment] for n, comment in enumerate(comments)]
    dataset = load(tmp_path, "likert.csv", csv_text(rows))
    assert len(dataset.participants) == 9
    for n, person in enumerate(dataset.participants):
        assert person.texts == [comments[n]]
        assert person.attributes == {"satisfaction": choices[n % 3]}
    assert any("'wave'" in warning and "one value for everyone" in warning for warning in dataset.warnings)


# -- Excel workbooks ----------------------------------------------------------------


def xlsx_bytes(rows: list[list[str | int]], inline: tuple[int, int]) -> bytes:
    """A minimal workbook: shared strings for text, numbers as values, and one inline string at `inline`."""
    sheet_ns = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    rel_ns = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    strings: list[str] = []
    xml_rows = []
    for r, row in enumerate(rows, 1):
        cells = []
        for c, value in enumerate(row):
            ref = f"{chr(65 + c)}{r}"
            if isinstance(value, int):
                cells.append(f'<c r="{ref}"><v>{value}</v></c>')
            elif (r - 1, c) == inline:
                cells.append(f'<c r="{ref}" t="inlineStr"><is><t>{escape(value)}</t></is></c>')
            else:
                strings.append(value)
                cells.append(f'<c r="{ref}" t="s"><v>{len(strings) - 1}</v></c>')
        xml_rows.append(f'<row r="{r}">{"".join(cells)}</row>')
    sheet = f'<worksheet xmlns="{sheet_ns}"><sheetData>{"".join(xml_rows)}</sheetData></worksheet>'
    shared = (
        f'<sst xmlns="{sheet_ns}" count="{len(strings)}" uniqueCount="{len(strings)}">'
        + "".join(f"<si><t>{escape(text)}</t></si>" for text in strings)
        + "</sst>"
    )
    workbook = (
        f'<workbook xmlns="{sheet_ns}" xmlns:r="{rel_ns}"><sheets>'
        '<sheet name="Responses" sheetId="1" r:id="rId1"/></sheets></workbook>'
    )
    rels = (
        '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        f'<Relationship Id="rId1" Type="{rel_ns}/worksheet" Target="worksheets/sheet1.xml"/></Relationships>'
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(
            "[Content_Types].xml", '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"/>'
        )
        archive.writestr("xl/workbook.xml", workbook)
        archive.writestr("xl/_rels/workbook.xml.rels", rels)
        archive.writestr("xl/worksheets/sheet1.xml", sheet)
        archive.writestr("xl/sharedStrings.xml", shared)
    return buffer.getvalue()


def test_an_excel_workbook_gives_the_same_participants_as_the_same_csv(tmp_path: Path) -> None:
    rows: list[list[str | int]] = [
        ["participant_id", "role", "age", "response"],
        ["P1", "Nurse", 29, "I need the night rota offline in the basement ward."],
        ["P1", "Nurse", 29, "It's frustrating when the rota changes at 3am."],
        ["P2", "Driver", 41, "I want overtime to be paid correctly every single week."],
        ["P3", "Nurse", 35, "I usually check the schedule in the car park before a shift."],
    ]
    from_xlsx = load(tmp_path, "survey.xlsx", xlsx_bytes(rows, inline=(2, 3)))
    from_csv = load(tmp_path, "survey.csv", csv_text([[str(cell) for cell in row] for row in rows]))
    as_tuples = [(p.id, p.texts, p.attributes) for p in from_xlsx.participants]
    assert as_tuples == [(p.id, p.texts, p.attributes) for p in from_csv.participants]
    assert as_tuples[0] == ("P1", [rows[1][3], rows[2][3]], {"role": "Nurse", "age": "29"})


# -- folders ------------------------------------------------------------------------


def test_a_folder_warns_naming_the_files_it_could_not_read(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "dana.txt").write_text(conversation("Interviewer", "Dana"))
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4 not read")
    dataset = persona.load_path("study", tmp_path)
    assert [person.id for person in dataset.participants] == ["dana"]
    assert any("notes.pdf" in warning and "unsupported" in warning for warning in dataset.warnings), dataset.warnings


def test_the_real_qualtrics_sample_reads_its_one_response() -> None:
    # tests/data/qualtrics_sample.csv: ropensci/qualtRics (MIT), German question row, ImportId row, one response.
    dataset = persona.load_path("qualtrics_sample.csv", DATA)
    assert [person.id for person in dataset.participants] == ["R_2YPOQ602ER1jkf1"]
    assert "Hello World!" in all_texts(dataset)
    assert "ImportId" not in everything_shown(dataset)


def test_a_single_choice_column_with_long_options_is_an_attribute_not_speech(tmp_path: Path) -> None:
    options = [
        "From a friend or colleague who already uses it",
        "Through an advert on a social media site",
        "Search engine results while looking for tools",
    ]
    comments = [
        "The rota app works fine on my phone at home.",
        "I can never find the swap button in the menu.",
        "Overtime requests disappear after I submit them.",
        "The night shift view is easy to read.",
        "It logs me out every single time I switch apps.",
        "I like the reminder before each shift.",
    ]
    rows = [["participant_id", "heard_about_us", "comment"]]
    rows += [[f"P{n}", options[n % 3], comment] for n, comment in enumerate(comments)]
    dataset = load(tmp_path, "choice.csv", csv_text(rows))
    for n, person in enumerate(dataset.participants):
        assert person.texts == [comments[n]]
        assert person.attributes == {"heard_about_us": options[n % 3]}


TEAMS_VTT = """WEBVTT

8e0b9bd2-7d8b-4b36-9b4a-1a2b3c4d5e6f/12-0
00:00:01.000 --> 00:00:04.000
<v Sam Lee>How do you plan your week?</v>

8e0b9bd2-7d8b-4b36-9b4a-1a2b3c4d5e6f/20-0
00:00:04.000 --> 00:00:07.000
<v Dana Ross>I plan my week on Sunday evening</v>

8e0b9bd2-7d8b-4b36-9b4a-1a2b3c4d5e6f/25-0
00:00:07.000 --> 00:00:09.000
<v Dana Ross>with a paper diary.</v>

8e0b9bd2-7d8b-4b36-9b4a-1a2b3c4d5e6f/30-0
00:00:09.000 --> 00:00:11.000
<v Sam Lee>What gets in the way?</v>

8e0b9bd2-7d8b-4b36-9b4a-1a2b3c4d5e6f/40-0
00:00:11.000 --> 00:00:15.000
<v Dana Ross>The calendar keeps crashing.</v>
"""


def test_teams_cue_identifiers_never_reach_the_text(tmp_path: Path) -> None:
    texts = load(tmp_path, "teams.vtt", TEAMS_VTT).participants[0].texts
    assert texts == ["I plan my week on Sunday evening with a paper diary.", "The calendar keeps crashing."]


def card_of(**fields: Any) -> str:
    """The Markdown card of a persona named Ana with nothing in it but `fields`."""
    bare = {"id": "persona-001", "name": "Ana", "title": "", "summary": "", "demographics": {}}
    lists = {name: [] for name in ("goals", "pain_points", "behaviours", "quotes")}
    return persona.persona_card({**bare, **lists, "evidence": {"participants": ["P1"], "share": 1.0}, **fields})


def test_a_markdown_card_makes_no_link_or_image_of_the_data() -> None:
    card = card_of(
        title="[click](javascript:alert(1))",
        summary="![](https://beacon.test/p.png)",
        quotes=["see [docs](http://x.test)"],
    )
    assert not re.search(r"(?<!\\)\]\(", card)  # every "](" that would close a link text is escaped
    assert "\\[click\\](javascript:alert(1))" in card and "!\\[\\](https://beacon.test/p.png)" in card
    assert "**Demographics**" not in card  # none known: no empty line for them


def test_a_markdown_card_shows_a_greater_than_sign_inside_a_value_as_written_and_escapes_what_opens_a_tag() -> None:
    card = card_of(
        title="Installations: > 1,000",
        summary="Says <b>bold</b> & more.",
        demographics={"How many installations?": "> 1,000 (60%)"},
        goals=["> 1,000 nodes must build overnight."],
    )
    assert "# Ana: Installations: > 1,000" in card and "&gt;" not in card
    assert "**Demographics**: How many installations?: \\> 1,000 (60%)" in card  # a value's opening > is escaped
    assert "Says &lt;b>bold&lt;/b> & more." in card  # an & that opens no entity reads as written
    assert "- \\> 1,000 nodes must build overnight." in card  # a line's opening > would make a quotation
