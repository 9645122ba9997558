"""What the personas find, checked on real exports: every respondent counted, closed answers as findings,
titles a researcher would write, and a quality report that can tell good from bad."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import submit, wait_job

import persona

pytestmark = pytest.mark.sqlite_only  # the engine is the subject, not the store

CORPUS = Path(__file__).resolve().parent.parent / "bench" / "corpus"
FLAKY = "flaky-tests-2021/responses.tsv"  # Google Forms, Likert grids, half the respondents closed answers only


@pytest.fixture(scope="module")
def flaky() -> persona.Dataset:
    return persona.load_path(FLAKY, CORPUS)


@pytest.fixture(scope="module")
def flaky_personas(flaky: persona.Dataset) -> list[dict]:
    return persona.offline_personas(flaky, 4, {})[0]


# -- every respondent counts ---------------------------------------------------------


def test_a_respondent_who_answered_only_closed_questions_is_a_participant(flaky: persona.Dataset) -> None:
    closed_only = [person for person in flaky.participants if not person.texts]
    assert len(flaky.participants) == 170 and len(closed_only) >= 80
    assert all(len(person.attributes) >= 10 for person in closed_only)


def test_a_respondent_with_nothing_at_all_is_counted_and_named(flaky: persona.Dataset) -> None:
    assert flaky.silent == ["responses-130"] and flaky.respondents == 171
    assert any("left out 1 respondent(s) who answered nothing: 'responses-130'" in w for w in flaky.warnings)


def test_coverage_counts_every_respondent_read_or_not(flaky: persona.Dataset, flaky_personas: list[dict]) -> None:
    report = persona.quality_report(flaky.participants, flaky_personas, flaky.silent)
    assert report["respondents"] == 171 and "responses-130" in report["unrepresented"]
    assert report["coverage"] == round((171 - len(report["unrepresented"])) / 171, 4)
    assert persona.coverage_line(report).startswith(f"personas cover {171 - len(report['unrepresented'])} of 171")


@pytest.mark.parametrize(("stability", "words"), [(0.85, "holds when"), (0.63, "mostly holds"), (0.31, "changes much")])
def test_the_cards_header_says_whether_the_grouping_holds(stability: float, words: str) -> None:
    report = {"respondents": 12, "coverage": 1.0, "unrepresented": [], "stability": stability}
    assert f"; their grouping {words}" in persona.coverage_line(report)
    assert persona.coverage_line(report).endswith(f"(stability {stability:.2f})")
    assert "grouping" not in persona.coverage_line({**report, "stability": None})


# -- closed answers are findings -----------------------------------------------------------


def test_a_column_whose_values_repeat_is_an_attribute_however_many_values_it_has() -> None:
    schools = [
        f"School of {name}"
        for name in "Business Law Medicine Arts Science Nursing Music Design Education "
        "Engineering Dentistry Pharmacy Architecture".split()
    ]
    records = [
        {
            "id": f"R{n}",
            "school": schools[n % 13],
            "comment": f"I grade {n} notebooks by hand each week and it takes the whole weekend.",
        }
        for n in range(60)
    ]
    dataset = persona.load_inline(records)
    assert dataset.participants[0].attributes["school"] == "School of Business"
    assert all("School" not in text for person in dataset.participants for text in person.texts)


def test_options_ticked_together_are_an_attribute_though_each_combination_is_new() -> None:
    options = [
        "Error messages",
        "Language syntax",
        "Data types",
        "Getting started",
        "Managing packages",
        "Documentation",
    ]
    records = [
        {
            "id": f"R{n}",
            "hard": ", ".join(option for bit, option in enumerate(options) if (n + 3) >> bit & 1),
            "comment": f"I learned R {n} years ago for my thesis and kept using it at work since then.",
        }
        for n in range(40)
    ]
    assert len({record["hard"] for record in records}) >= 36  # nearly every combination its own
    dataset = persona.load_inline(records)
    assert all("Error messages" not in text for person in dataset.participants for text in person.texts)
    assert "hard" in dataset.participants[0].attributes


def test_a_web_address_gives_no_words_to_themes_or_titles() -> None:
    assert persona.content_words("RISE - https://github.com/damianavila/RISE, see www.example.org/x") == [
        ("rise", "rise")
    ]
    assert persona.content_words("slides at github.com/tobyhodges/ITPP/ with node.js") == [
        ("slide", "slides"),
        ("node", "node"),
    ]
    teachers = persona.load_path("jupyter-education-2016/responses.csv", CORPUS)  # answers full of links
    personas, _ = persona.offline_personas(teachers, 4, {})
    shown = [word.lower() for p in personas for word in [*p["themes"], *p["title"].split()]]
    assert not {"https", "http", "github", "com", "www"} & set(shown)


def test_a_vague_phrase_or_a_piece_of_a_commoner_one_names_no_theme() -> None:
    said = [
        "We moved from closed source to open source.",
        "Core contributors keep the open source project alive.",
        "People trying to help are able to maintain it.",
    ]
    people = [persona.Participant(f"P{n}", said) for n in range(3)]
    corpus = persona.build_corpus([*people, persona.Participant("P9", ["Open source is a movement."])])
    assert persona.names_a_theme(corpus, "core contributor")
    assert persona.names_a_theme(corpus, "open source")
    assert not persona.names_a_theme(corpus, "source open")  # "... source to open source"
    assert not persona.names_a_theme(corpus, "people trying")
    assert not persona.names_a_theme(corpus, "able maintain")
    assert persona.names_a_theme(corpus, "decision making")
    assert not persona.names_a_theme(corpus, "guys") and not persona.names_a_theme(corpus, "alright")


def test_a_phrase_is_shown_with_the_slash_it_was_written_with() -> None:
    said = ["Finding reviewers/approvers takes weeks.", "Reviewers/approvers are busy."]
    corpus = persona.build_corpus([persona.Participant(f"P{n}", said) for n in range(3)])
    assert corpus.display["reviewer approver"] == "reviewers/approvers"  # the Kubernetes contributor survey


def test_the_podcast_personas_are_named_by_what_they_talk_about_not_by_vague_phrases() -> None:
    podcast = persona.load_path("rfc-transcripts/episodes", CORPUS)
    personas, _ = persona.offline_personas(podcast, 4, {})
    shown = [p["title"] for p in personas] + [theme for p in personas for theme in p["themes"]]
    assert not {"People trying", "Source to open", "Able to maintain", "people trying", "important parts"} & set(shown)


@pytest.mark.parametrize(
    ("question", "answer", "phrase"),
    [
        ("Roughly how long did it take you to achieve proficiency in R?", "Months", "Achieve proficiency: months"),
        (
            "Think about the past month: how often did you use R, either for work or for fun?",
            "Between once a day and once a week",
            "Use R: between once a day and once a week",
        ),
        ("How would you rate your level of experience?", "Expert", "Level of experience: expert"),
        ("Approximately how many students are in your class?", "10 - 25", "Students in your class: 10 - 25"),
        ("Which category best describes the work you do?", "Data scientist", "Data scientist"),
        (
            "If you are using notebooks for graded assignments, how are you doing the grading?",
            "By hand",
            "Doing the grading: by hand",
        ),
        (
            "What types of questions are included in your assignments?",
            "Ungraded coding exercises",
            "Types of questions: Ungraded coding exercises",
        ),
        ("How often is this course taught?", "Every year", "Course taught: every year"),
        ("What industry do you work or participate in?", "Research", "Industry: Research"),
        (
            "Which statement most closely reflects the primary reason why you learned R?",
            "I wanted to do statistical analyses",
            "Primary reason: I wanted to do statistical analyses",
        ),
        ("How did you learn R? If you used multiple methods, please select one.", "On the job", "Learn R: on the job"),
        ("What is your job title, if any?", "Assistant Professor", "Assistant Professor"),
        (
            "What is the minimum level of programming experience that your students are expected to have?",
            "Complete novice",
            "Students' minimum level of programming experience: Complete novice",
        ),
        ("What is the highest degree or level of school you have completed?", "Doctorate", "Doctorate"),
        ("role", "Charge nurse", "Charge nurse"),
        ("How often do you deploy?", "DAILY", "Deploy: DAILY"),
        ("How often do you deploy?", "Once A Week", "Deploy: once a week"),
        ("How often do you use these channels? - Slack", "5: everyday", "Slack: everyday"),
        ("When do you start work?", "12:30", "Start work: 12:30"),
        ("In what country do you currently reside?", "US", "Country: US"),
        (
            "Please rate how much you enjoy using R on a scale of 1 to 5, where 1 is you don't enjoy it at all.",
            "5",
            "Please rate how much you enjoy using R: 5",
        ),
        ("Which of the following best describes your current employment status?", "Employed", "Employed"),
        ("Which of these features do you use most?", "Dashboards", "Features: Dashboards"),
        ("What year did you first start learning R?", "2015", "First start learning R: 2015"),
        ("What is your primary role when using Jupyter Notebook?", "Data scientist", "Data scientist"),
        (
            "What level of the Contributor Ladder do you consider yourself to be on? (pick the highest)",
            "subproject owner",
            "subproject owner",
        ),
        ("What kind of user are you?", "Research Software Engineer (RSE)", "Research Software Engineer (RSE)"),
        ("What type of tests are you writing?", "Integration tests", "Type of tests: Integration tests"),
        (
            "Do you consider yourself satisfied with the docs?",
            "Mostly",
            "Consider yourself satisfied with the docs: Mostly",
        ),
        ("What is your highest level of education?", "Bachelor's degree", "Bachelor's degree"),
        ("What do you like most about your job?", "The people", "Like most about your job: the people"),
        ("To what degree does Jupyter meet your needs?", "Somewhat", "Jupyter meet your needs: somewhat"),
        ("How old are you?", "25-34", "How old are you: 25-34"),
        (
            "Please indicate which of the following Jupyter/IPython tools your class is utilizing:",
            "Jupyter notebook",
            "Jupyter/IPython tools: Jupyter notebook",
        ),
    ],
)
def test_an_answer_takes_its_question_s_topic_unless_the_question_asks_who_they_are(
    question: str, answer: str, phrase: str
) -> None:
    assert persona.answer_phrase("q", answer, {"q": question}) == phrase


def test_answers_that_are_nearly_all_unique_are_speech() -> None:
    records = [
        {"id": f"R{n}", "why": f"Because reason number {n} matters to my team in its own particular way."}
        for n in range(30)
    ]
    assert persona.load_inline(records).participants[5].texts


def test_a_grid_item_is_shown_with_its_item_in_full(flaky: persona.Dataset) -> None:
    key = next(k for k in flaky.participants[0].attributes if k.endswith("[re_run_the_build.]"))
    assert persona.shown_label(key, flaky.labels).endswith("[Re-run the build.]")
    assert (
        persona.question_text(key, flaky.labels)
        == "After identifying a flaky test, how often do you… Re-run the build."
    )


@pytest.mark.parametrize(
    ("header", "question"),
    [
        (
            "Rank these features by importance [Better error messages]",
            "Rank these features by importance [Better error messages]",
        ),
        ("How often do you use [JupyterLab]", "How often do you use [JupyterLab]"),
        (
            "To what extent do you agree? [Flaky tests slow us down]",
            "To what extent do you agree? Flaky tests slow us down",
        ),
        (
            "How would you rate the overall quality of ... [Spack community]",
            "How would you rate the overall quality of ... Spack community",
        ),
    ],
)
def test_a_grid_item_follows_a_stem_that_ends_in_punctuation_and_keeps_its_brackets_after_any_other(
    header: str, question: str
) -> None:
    assert persona.question_text("q", {"q": header}) == question


def test_ordered_answers_are_nearer_each_other_than_far_ones() -> None:
    often, always, never = (persona.answer_terms("q", value) for value in ("Often", "Always", "Never"))
    assert len(often & always) > len(often & never)


def test_an_option_ticked_among_others_counts_for_each_who_ticked_it_in_findings_and_demographics() -> None:
    labels = {"langs": "Which languages do you use?", "contrib": "Have you contributed?"}
    ticked = ["Python", "JavaScript, Python", "Python, R", "Python; Go", "R", "JavaScript, R"]
    contributed = ["No", "Yes, but only on Slack", "No", "Yes", "Yes", "Yes"]
    people = [
        persona.Participant(f"P{n}", [], {"langs": langs, "contrib": said})
        for n, (langs, said) in enumerate(zip(ticked, contributed))
    ]
    members, everyone = people[:4], [*people, *(persona.Participant(f"Q{n}", [], {"langs": "Go"}) for n in range(4))]
    found = {
        (a["question"], a["answer"]): (a["count"], a["of"]) for a in persona.closed_answers(members, everyone, labels)
    }
    assert found[("Which languages do you use?", "Python")] == (4, 4)
    assert ("Have you contributed?", "but only on Slack") not in found  # a write-in after a choice is no option
    demographics = persona.summarise_attributes(members, everyone, labels)
    assert demographics["Which languages do you use?"] == "Python (100%)"


@pytest.mark.parametrize(
    ("answer", "options"),
    [
        ("R Command Line (i.e., the R console), RStudio", ["R Command Line (i.e., the R console)", "RStudio"]),
        ("JavaScript, Python", ["JavaScript", "Python"]),
        ("London, Ontario", ["London, Ontario"]),
        ("Yes, but only at work", ["Yes, but only at work"]),
        ("Python; Go", ["Python", "Go"]),
    ],
)
def test_an_answer_splits_into_options_only_where_every_piece_is_one(answer: str, options: list[str]) -> None:
    answers = ["London", "Yes", "Python", "Go", "RStudio", "JavaScript, R", "R Command Line (i.e., the R console)"]
    answers.append(answer)
    assert persona.options_in(answer, persona.column_options(answers)) == options


def test_every_persona_carries_the_closed_answers_that_set_it_apart(flaky_personas: list[dict]) -> None:
    for item in flaky_personas:
        answers = item["evidence"]["answers"]
        assert 1 <= len(answers) <= persona.MAX_ANSWERS
        for answer in answers:
            assert set(answer) == {"question", "answer", "count", "of", "share_elsewhere"}
            assert 2 <= answer["count"] <= answer["of"] <= len(item["evidence"]["participants"])
            assert answer["count"] / answer["of"] - answer["share_elsewhere"] >= persona.ANSWER_MIN_LIFT
            assert "_" not in answer["question"]


def test_an_answer_is_stated_as_a_finding_on_the_cards(flaky_personas: list[dict]) -> None:
    answer = {
        "question": "After identifying a flaky test, how often do you… Re-run the build.",
        "answer": "Often",
        "count": 20,
        "of": 23,
        "share_elsewhere": 0.41,
    }
    assert persona.answer_finding(answer) == (
        "After identifying a flaky test, how often do you… Re-run the build: "
        "often, 20 of 23 (87%), against 41% of everyone else."
    )
    card = persona.persona_card(flaky_personas[0])
    assert "What sets them apart" in card and "of everyone else." in card


def test_an_llm_persona_gets_its_closed_answers_too(flaky: persona.Dataset) -> None:
    members = [
        person.id
        for person in flaky.participants
        if person.attributes.get("how_often_do_you_observe_flaky_tests_in_the_projects_you’re_currently_working_on?")
        == "Daily"
    ]
    (item,) = persona.with_answers([{"id": "persona-001", "evidence": {"participants": members}}], flaky)
    assert any(
        answer["answer"] == "Daily" and answer["count"] == len(members) for answer in item["evidence"]["answers"]
    )


# -- titles ----------------------------------------------------------------------------


def test_titles_are_never_a_bare_answer_a_placeholder_or_the_data_set_s_topic(flaky_personas: list[dict]) -> None:
    for item in flaky_personas:
        title = item["title"]
        assert not re.match(r"(?i)(never|rarely|sometimes|often|always|yes|no|daily|weekly|agree)\b", title), title
        assert not re.search(r"(?i)segment \d", title) and "flaky tests" != title.lower()


def test_a_title_never_asks_a_question() -> None:
    """The Kubernetes survey's "there's a contributor ladder?" is an answer, but no title."""
    people = [persona.Participant(f"P{n}", ["Reviews take weeks."]) for n in range(4)]
    corpus = persona.build_corpus(people)
    shares = persona.term_shares(corpus, [0, 1])
    answers = ["There's a contributor ladder?", "Contribute upstream: a few times a year"]
    assert persona.persona_title(corpus, shares, None, set(), answers) == "Contribute upstream: a few times a year"
    taken = {"Contribute upstream: a few times a year"}
    assert "?" not in persona.persona_title(corpus, shares, None, taken, answers)


def test_no_title_names_a_segment_by_what_its_members_never_do(flaky_personas: list[dict]) -> None:
    assert not [
        item["title"] for item in flaky_personas if re.search(r"(?i):\s*(never|no|none|not at all)\b", item["title"])
    ]


def test_an_absence_answer_is_a_finding_but_never_a_title() -> None:
    labels = {
        f"q{n}": f"How often do you see flaky tests caused by... [{cause}]"
        for n, cause in enumerate(["Floating point", "Network", "Time zones"])
    }
    people = [
        persona.Participant(
            f"P{n}", [], {"q0": "Never", "q1": "Often" if n < 6 else "Rarely", "q2": "Never" if n < 8 else "Often"}
        )
        for n in range(12)
    ]
    members = people[:6]
    answers = persona.closed_answers(members, people, labels)
    assert any(answer["answer"] == "Often" for answer in answers)
    corpus = persona.build_corpus(people)
    title = persona.persona_title(
        corpus,
        persona.term_shares(corpus, list(range(6))),
        persona.distinguishing_attribute(members, people),
        set(),
        persona.titled_answers(persona.keyed_answers(members, people, labels), members, people, labels),
        labels,
    )
    assert title == "Network: often"
    assert persona.says_absence("Never -- I don't use Shiny.") and not persona.says_absence("Nearly every day")
    assert persona.says_absence("Not Important") and not persona.says_absence("Slightly Important")


@pytest.mark.parametrize(
    "scale",
    [
        ("Not Important", "Slightly Important", "Somewhat important", "Very Important", "Critical"),
        ("Not at all important", "Slightly important", "Moderately important", "Very important", "Extremely important"),
        ("Horrible", "Bad", "OK", "Good", "Excellent"),
    ],
)
def test_importance_and_quality_ratings_are_ordered_scales(scale: tuple[str, ...]) -> None:
    levels = [persona.SCALE_LEVELS[value.lower()] for value in scale]
    assert levels == sorted(levels) and len(set(levels)) == len(levels)


@pytest.mark.parametrize(
    ("answer", "read_on"),
    [
        ("Not Important", "not important"),
        ("Strongly Agree", "strongly agree"),
        ("Often", "often"),
        ("System Administrator", "System Administrator"),
        ("A Python Developer", "a Python Developer"),
        ("DAILY", "DAILY"),
    ],
)
def test_an_answer_after_a_colon_reads_in_lower_case_when_it_opens_with_a_common_word(
    answer: str, read_on: str
) -> None:
    assert persona.as_read_on(answer) == read_on


def test_a_rating_is_no_title_of_its_own_but_names_what_it_rates() -> None:
    labels = {"q0": "How would you rate the overall quality of ... [Spack packages]"}
    people = [persona.Participant(f"P{n}", [], {"q0": "Good" if n < 6 else "Poor"}) for n in range(12)]
    members = people[:6]
    corpus = persona.build_corpus(people)
    shares = persona.term_shares(corpus, list(range(6)))
    attribute = persona.distinguishing_attribute(members, people)
    titles = persona.titled_answers(persona.keyed_answers(members, people, labels), members, people, labels)
    assert persona.persona_title(corpus, shares, attribute, set(), titles, labels) == "Spack packages: good"


def test_an_answer_fewer_than_half_its_members_gave_names_them_only_with_the_level_beside_it() -> None:
    labels = {"q0": "How often do you observe flaky tests in the projects you're currently working on?"}
    seen = ["Daily"] * 4 + ["Weekly"] * 4 + ["Monthly"] * 2 + ["Weekly"] * 3 + ["A few times a year"] * 7
    people = [persona.Participant(f"P{n}", [], {"q0": answer}) for n, answer in enumerate(seen)]
    members, others = people[:10], people[10:]
    assert persona.held_by_most("q0", "Daily", members, others) == "daily or weekly"
    answers = persona.keyed_answers(members, people, labels)
    assert answers[0][1]["answer"] == "Daily"  # the finding names the answer that sets them apart, with its count
    assert persona.titled_answers(answers, members, people, labels) == ["Observe flaky tests: daily or weekly"]
    fewer = people[:4] + people[8:10] + people[13:17]  # daily, then monthly and a few times a year: no neighbour helps
    assert persona.held_by_most("q0", "Daily", fewer, people[4:8] + people[10:13] + people[17:]) is None


def test_an_answer_most_of_everyone_gives_names_no_persona() -> None:
    # The bank reviews: 58 of 65 members wrote about CBE, and so did 74% of everyone else.
    people = [
        persona.Participant(f"P{n}", [], {"bank": "CBE" if n < 9 or 10 <= n < 17 else "Awash"}) for n in range(20)
    ]
    assert persona.held_by_most("bank", "CBE", people[:10], people[10:]) is None  # 90% against 70%
    assert persona.held_by_most("bank", "CBE", people[:10], people[13:]) == "CBE"  # 90% against 57%: apart


def test_two_questions_worded_alike_each_title_by_their_own_answers() -> None:
    labels = {"q1": "How often do you deploy?", "q2": "How often do you deploy?"}
    people = [
        persona.Participant(f"P{n}", [], {"q1": "Python" if n < 6 else "R", "q2": "Daily" if n < 6 else "Never"})
        for n in range(12)
    ]
    keyed = persona.keyed_answers(people[:6], people, labels)
    assert sorted(key for key, _ in keyed) == ["q1", "q2"]
    assert sorted(persona.titled_answers(keyed, people[:6], people, labels)) == ["Deploy: Python", "Deploy: daily"]


def test_every_title_from_an_answer_holds_for_most_of_its_members(
    flaky: persona.Dataset, flaky_personas: list[dict]
) -> None:
    by_id = {person.id: person for person in flaky.participants}
    stated = 0
    for item in flaky_personas:
        members = [by_id[pid] for pid in item["evidence"]["participants"]]
        for key in flaky.labels:
            levels = item["title"].rpartition(": ")[2].split(" or ")
            if persona.answer_phrase(key, " or ".join(levels), flaky.labels) != item["title"]:
                continue
            answered = [person.attributes[key].lower() for person in members if key in person.attributes]
            if not answered:  # a title that happens to read as an answer to a question none of them answered
                continue
            assert sum(answer in levels for answer in answered) / len(answered) >= 0.5, item["title"]
            stated += 1
    assert stated >= 2


@pytest.mark.parametrize(
    ("answer", "shown"),
    [
        ("Often", "often"),
        ("A few times a year", "a few"),
        ("System Administrator", "System Administrator"),
        ("Python", "Python"),
        ("I don't feel proficient", "I don't"),
    ],
)
def test_a_finding_keeps_an_answer_s_own_capitals(answer: str, shown: str) -> None:
    finding = persona.answer_finding({"question": "Role?", "answer": answer, "count": 2, "of": 3, "share_elsewhere": 0})
    assert finding.startswith(f"Role: {shown}")


def test_a_grid_s_items_are_findings_not_demographics(flaky_personas: list[dict]) -> None:
    shown = [key for item in flaky_personas for key in item["demographics"]]
    assert shown and not [key for key in shown if key.endswith("]")]
    assert any("years experience" in key for key in shown)


def test_a_card_counts_its_participants_and_keeps_their_ids_behind_a_disclosure() -> None:
    ids = [f"R{n:04d}" for n in range(1187)]
    evidence = {"participants": ids, "share": 0.25}
    card = persona.persona_html_card({"name": "Ana", "title": "Night nurses", "evidence": evidence})
    assert "<details><summary>Their ids</summary>" in card
    assert card.index("<details>") < card.index("R0000")
    quality = {"participants": 1187, "items": [{"said_by": 7}], "distinctiveness": 0.3, "overlap": 0.2}
    card = persona.persona_html_card({"name": "Ana", "title": "Night nurses", "evidence": evidence}, quality)
    assert card.count("1187") == 2 and "1187 participants (25%)" in card  # once counted, once as "said by 7 of"
    assert "said by 7 of its 1187" in card and card.count("25%") == 1


def test_the_quality_line_says_in_words_how_far_a_persona_stands_apart() -> None:
    quality = {"participants": 12, "items": [{"said_by": 7}], "distinctiveness": 0.27, "overlap": 0.73}
    line = persona.quality_line(quality)
    assert "its participants stand apart from everyone else a little (distinctiveness 0.27)" in line
    assert line.startswith("Quality: its goals, pain points and behaviours are each said by 7 of its 12;")
    assert "the closest other persona is much alike (overlap 0.73)" in line


def test_a_group_by_persona_is_titled_by_its_group_and_its_findings_leave_the_grouping_out(
    flaky: persona.Dataset,
) -> None:
    question = "How often do you observe flaky tests in the projects you’re currently working on?"
    personas, _ = persona.offline_personas(flaky, 5, {"group_by": question})
    assert [item["title"] for item in personas] == [
        "Observe flaky tests: a few times a year",
        "Observe flaky tests: weekly",
        "Observe flaky tests: monthly",
        "Observe flaky tests: daily",
        "Observe flaky tests: never",
    ]
    for item in personas:
        questions = [answer["question"] for answer in item["evidence"]["answers"]]
        assert not [q for q in questions if q.startswith("How often do you observe flaky tests")]
        assert len(questions) == len(set(questions))  # one answer per question


def test_a_demographic_counts_each_option_ticked_and_leaves_out_a_choice_few_give() -> None:
    languages = ["JavaScript, Python", "Python", "C#", "JavaScript", "Go, Python", "Go"]
    options = persona.column_options(languages)
    assert persona.chosen_options(languages, options)["Python"] == 3
    places = ["Bristol, UK", "Leeds, UK"]
    assert persona.chosen_options(places, persona.column_options(places)) == {"Bristol, UK": 1, "Leeds, UK": 1}
    assert persona.summarise_values(languages, 6, options) == "Python (50%)"
    others = ["C#", "Go", "Rust", "Java", "Ruby", "Perl"]
    assert persona.summarise_values(others, 6, persona.column_options(others)) is None


def test_a_bare_answer_takes_its_question_s_topic() -> None:
    labels = {"q": "After identifying a flaky test, how often do you… [Re-run the build.]"}
    assert persona.answer_phrase("q", "Often", labels) == "Re-run the build: often"
    assert persona.answer_phrase("role", "Charge nurse", {}) == "Charge nurse"


# -- a quality report that can fail ---------------------------------------------------------


def speakers(texts: list[str]) -> list[persona.Participant]:
    return [persona.Participant(f"P{n}", [text]) for n, text in enumerate(texts)]


def test_said_by_tells_one_voice_from_many() -> None:
    people = speakers(["The export to Excel keeps failing on large files."] * 5 + ["I plan my rota on Sundays."])
    one_voice = {
        "id": "a",
        "pain_points": ["I plan my rota on Sundays."],
        "goals": [],
        "behaviours": [],
        "evidence": {"participants": [p.id for p in people]},
    }
    many = {**one_voice, "id": "b", "pain_points": ["The export to Excel keeps failing on large files."]}
    report = persona.quality_report(people, [one_voice, many])
    assert [entry["items"][0]["said_by"] for entry in report["personas"]] == [1, 5]
    assert report["personas"][0]["support"] == report["personas"][1]["support"] == 1.0  # support cannot tell them apart


def test_distinctiveness_is_high_for_a_real_segment_and_low_for_a_mixed_one() -> None:
    people = speakers(
        ["The night rota changes at three in the morning without warning."] * 4
        + ["The fuel card is declined at the depot every Friday."] * 4
    )
    real = {
        "id": "r",
        "pain_points": ["The night rota changes at three in the morning without warning."],
        "goals": [],
        "behaviours": [],
        "evidence": {"participants": ["P0", "P1", "P2", "P3"]},
    }
    mixed = {**real, "id": "m", "evidence": {"participants": ["P0", "P1", "P4", "P5"]}}
    entries = persona.quality_report(people, [real, mixed])["personas"]
    assert entries[0]["distinctiveness"] == 1.0 and entries[1]["distinctiveness"] == 0.0


def test_stability_is_high_for_groups_the_data_holds_and_low_for_noise() -> None:
    topics = ["night rota shift swap ward", "fuel card depot declined lorry", "invoice payment late supplier"]
    clear = [
        persona.Participant(f"C{n}", [f"I always talk about {topics[n % 3]} because {topics[n % 3]} matters."])
        for n in range(60)
    ]
    import random

    rng = random.Random(7)
    words = " ".join(topics).split()
    noise = [persona.Participant(f"N{n}", [" ".join(rng.sample(words, 6)) + " again."]) for n in range(60)]
    assert persona.grouping_stability(clear, 3, {}) >= 0.9
    assert persona.grouping_stability(noise, 3, {}) < persona.grouping_stability(clear, 3, {})
    assert persona.grouping_stability(clear, 3, {"group_by": "role"}) is None
    personas = persona.offline_personas(persona.Dataset(noise, source={}), 3, {})[0]  # the job's own grouping
    assert persona.grouping_stability(noise, 3, {}, personas) == persona.grouping_stability(noise, 3, {})


def test_a_real_survey_is_grouped_the_same_whatever_order_its_respondents_come_in(flaky: persona.Dataset) -> None:
    people = flaky.participants
    first = persona.group_labels(persona.cluster_participants(persona.build_corpus(people), 4), len(people))
    backwards = persona.cluster_participants(persona.build_corpus(people[::-1]), 4)
    again = persona.group_labels(backwards, len(people))[::-1]
    assert persona.adjusted_rand_index(first, again) == 1.0


def test_of_two_groups_as_large_the_one_split_is_chosen_by_what_they_say_not_where_they_stand() -> None:
    import random

    rng = random.Random(3)
    topics = {"a": ["builds", "compilers", "linkers", "caches"], "b": ["gardens", "tomatoes", "roses", "compost"]}
    people = [
        persona.Participant(f"{t}{n}", [f"I care about {rng.choice(w)} and {rng.choice(w)} and {rng.choice(w)} daily."])
        for t, w in topics.items()
        for n in range(20)
    ]

    def grouping(order: list[persona.Participant]) -> list[list[str]]:
        groups = persona.cluster_participants(persona.build_corpus(order), 3)
        return sorted(sorted(order[i].id for i in group) for group in groups)

    shuffled = people[:]
    random.Random(1).shuffle(shuffled)
    assert grouping(shuffled) == grouping(people) == grouping(people[::-1])


@pytest.mark.parametrize(
    ("item_key", "labels"),
    [
        (lambda i: f"rate_these_features_[feature_{i}]", {}),  # Google Forms: the item is in the key
        (lambda i: f"q5_{i}", {f"q5_{i}": f"Rate these features - Feature {i}" for i in range(12)}),  # Qualtrics
    ],
)
def test_a_grid_of_many_items_weighs_as_one_question_in_the_grouping(
    item_key: Callable[[int], str], labels: dict[str, str]
) -> None:
    """Two questions split the people one way, how they fill in a 12-item grid on the same scale the other
    way: two questions outweigh one grid, where counted item by item the grid would outweigh them six times."""
    people = [
        persona.Participant(
            f"P{n}",
            [],
            {
                "safety": "Very important" if n % 2 else "Not important",
                "speed": "Very important" if n % 2 else "Not important",
                **{item_key(i): "Very important" if n < 12 else "Not important" for i in range(12)},
            },
        )
        for n in range(24)
    ]
    groups = persona.cluster_participants(persona.build_corpus(people, labels), 2)
    by_answer = sorted(sorted(people[i].attributes["safety"] for i in group) for group in groups)
    assert by_answer == [["Not important"] * 12, ["Very important"] * 12]


@pytest.mark.parametrize("role_question", ["What kind of user are you?", "role"])
def test_the_question_that_asks_who_they_are_leads_the_grouping(role_question: str) -> None:
    """Their role splits the people one way, the shift they prefer the other way, in more words (so, counted
    alike, more strongly): a persona is a kind of person, so the role leads."""
    labels = {"q1": role_question, "q2": "Which shift do you prefer?"}
    people = [
        persona.Participant(
            f"P{n}",
            [],
            {"q1": "Nurse" if n % 2 else "Doctor", "q2": "Early day shift" if n < 12 else "Late night shift"},
        )
        for n in range(24)
    ]
    groups = persona.cluster_participants(persona.build_corpus(people, labels), 2)
    by_role = sorted(sorted(people[i].attributes["q1"] for i in group) for group in groups)
    assert by_role == [["Doctor"] * 12, ["Nurse"] * 12]


def test_a_surveymonkey_export_s_grids_weigh_as_one_question_each_and_its_ladder_question_twice() -> None:
    """The Kubernetes contributor survey: two header rows, grids of 10, 4 and 8 rated items, and a question
    on the rung of the contributor ladder each respondent considers themselves on."""
    survey = persona.load_path("k8s-contributor-survey-2019/responses.csv", CORPUS)
    weights = persona.attribute_weights(survey.participants, survey.labels)
    by_question: dict[str, list[float]] = {}
    for key, weight in weights.items():
        by_question.setdefault(persona.question_of(key, survey.labels), []).append(weight)
    grids = sorted(len(items) for items in by_question.values() if len(items) > 1)
    assert grids == [4, 7, 8, 10]  # the rating grids and the ranking grid
    for items in by_question.values():  # each question's squared weight is one question's, or twice it
        assert round(sum(weight * weight for weight in items) / persona.ATTRIBUTE_WEIGHT**2, 6) in (1.0, 4.0)
    ladder = next(key for key in weights if "contributor_ladder_do_you_consider" in key)
    assert weights[ladder] == persona.ATTRIBUTE_WEIGHT * persona.IDENTITY_WEIGHT
    assert sum(weight == weights[ladder] for weight in weights.values()) == 1


def test_most_of_a_real_survey_s_grouping_survives_leaving_a_tenth_out(flaky: persona.Dataset) -> None:
    assert persona.grouping_stability(flaky.participants, 4, {}) >= 0.6


def test_the_adjusted_rand_index_is_one_for_the_same_grouping_and_near_zero_by_chance() -> None:
    assert persona.adjusted_rand_index([0, 0, 1, 1, 2, 2], [5, 5, 3, 3, 9, 9]) == 1.0
    assert persona.adjusted_rand_index([0, 1, 0, 1, 0, 1, 0, 1], [0, 0, 1, 1, 0, 0, 1, 1]) < 0.1


def test_an_item_is_said_by_those_who_share_its_rare_words_not_the_data_set_s_topic() -> None:
    people = [persona.Participant(f"P{n}", ["I build every spack package on the cluster."]) for n in range(10)]
    people += [
        persona.Participant("A", ["Internal details of each spack package build."]),
        persona.Participant("B", ["The internal details stay hidden from me."]),
    ]
    speakers = persona.SaidIndex(people).speakers("Internal details of each spack package build.")
    assert sorted(people[i].id for i in speakers) == ["A", "B"]
    people += [persona.Participant("K", ["I have never used Kubernetes."])]
    people += [persona.Participant("S", ["Kubernetes tests are slow every day."])]
    speakers = persona.SaidIndex(people).speakers("Kubernetes tests are slow every day.")
    assert [people[i].id for i in speakers] == ["S"]  # one rare word in common is not the item said


def test_a_card_says_who_says_each_item_not_a_backed_share(flaky: persona.Dataset, flaky_personas: list[dict]) -> None:
    report = persona.quality_report(flaky.participants, flaky_personas, flaky.silent)
    item = next(p for p in flaky_personas if p["goals"] or p["pain_points"])
    entry = next(e for e in report["personas"] if e["id"] == item["id"])
    card = persona.persona_card(item, entry)
    assert re.search(r"\(said by \d+ of \d+\)", card) and "backed" not in card


# -- sentences and steering -----------------------------------------------------------------


def test_sentences_are_not_cut_at_abbreviations_or_inside_brackets() -> None:
    text = (
        "Parallel builds vs. sequential ones interfere. Timing issues (e.g. waits. sleeps) are the worst. "
        "It costs 3.5 hours a week, i.e. most of Friday."
    )
    assert persona.split_sentences(text) == [
        "Parallel builds vs. sequential ones interfere.",
        "Timing issues (e.g. waits. sleeps) are the worst.",
        "It costs 3.5 hours a week, i.e. most of Friday.",
    ]


def test_etc_ends_a_sentence_before_a_capital_and_an_abbreviation_in_brackets_ends_none() -> None:
    text = "We use the compilers, the build systems, etc. We support developers. Tools (Git, Docker, etc.) are used."
    assert persona.split_sentences(text) == [
        "We use the compilers, the build systems, etc.",
        "We support developers.",
        "Tools (Git, Docker, etc.) are used.",
    ]
    inside = "We use tools (CMake, Bazel, etc. Some are homegrown) in our builds."
    assert persona.split_sentences(inside) == [inside]


def test_hard_as_a_fact_is_no_pain_and_a_scale_s_levels_stay_apart() -> None:
    assert persona.list_kind("The timeout is hard-coded to ten minutes.") is None
    assert persona.list_kind("Deploying it is really hard on our cluster.") == "pain_points"
    assert persona.SCALE_LEVELS["very poor"] < persona.SCALE_LEVELS["poor"] < persona.SCALE_LEVELS["excellent"]


def test_a_list_s_numbering_is_no_part_of_its_sentences() -> None:
    text = "3) User files a bug that our package breaks. (2) Examples of real setups would help. 3.5 hours it takes."
    assert persona.split_sentences(text) == [
        "User files a bug that our package breaks.",
        "Examples of real setups would help.",
        "3.5 hours it takes.",
    ]


def test_a_sentence_that_closes_its_bracket_or_quote_ends_there() -> None:
    text = (
        "The VM runs on their own computers. (We had problems with services starting in a free box.)\n"
        'We are exploring docker containers. He said "try it again." Then it worked for all of us.'
    )
    assert persona.split_sentences(text) == [
        "The VM runs on their own computers.",
        "(We had problems with services starting in a free box.)",
        "We are exploring docker containers.",
        'He said "try it again."',
        "Then it worked for all of us.",
    ]


@pytest.mark.parametrize(
    "definition",
    [
        "A flaky test is a test case that can both pass and fail without any changes to the code under test.",
        "I would say that a flaky test is any test that changes from pass to fail in different environments.",
        "A flaky test is when the result changes between runs.",
        "I define flakiness as nondeterminism we did not ask for.",
        "I'd say that the test is flaky if it does not clearly identify problems.",
        "The given definition also fits fuzzing, where the input varies on purpose to find issues.",
    ],
)
def test_a_definition_is_no_goal_pain_point_or_behaviour(definition: str) -> None:
    assert persona.list_kind(definition) is None


@pytest.mark.parametrize(
    ("sentence", "kind"),
    [
        ('Somebody else was like, "it would be cool to have a debugger."', None),
        ('I want a debugger that says "ready" when it is.', "goals"),
    ],
)
def test_someone_else_s_quoted_words_are_no_item_of_the_speaker(sentence: str, kind: str | None) -> None:
    assert persona.sentence_kind(sentence) == kind


def test_a_definition_is_no_quote() -> None:
    said = [
        persona.Sentence("P1", "I would say that a flaky test is any test that changes from pass to fail.", 0.9),
        persona.Sentence("P2", "I tend to come across flaky tests more in end to end tests.", 0.5),
    ]
    assert [s.participant for s in persona.pick_quotes(said, set(), 1)] == ["P2"]


def test_what_the_speaker_will_be_doing_is_no_practice() -> None:
    """The Kubernetes survey: an answer about the community meeting's new cadence."""
    assert persona.list_kind("With the move to a monthly meeting, I will be attending.") is None
    assert persona.list_kind("With the move to a monthly meeting, I’ll be attending.") is None
    assert persona.list_kind("We attend the community meeting every month.") == "behaviours"


def test_an_imagined_case_is_no_pain_point() -> None:
    assert persona.list_kind("If I were to find one in a PR, I would not accept it until it was fixed.") is None
    assert persona.list_kind("Installing a GUI for version control on the server would be a pain.") is None
    assert persona.list_kind("Installing a GUI for version control on the server is a pain.") == "pain_points"
    assert persona.list_kind("If I have to restart the kernel, the build fails.") == "pain_points"


@pytest.mark.parametrize(
    ("sentence", "kind"),
    [
        ("I have no words to appreciate, thanks.", None),
        ("Basic exploratory statistics, frequency, spread, std error", None),
        ("Don't work with data", None),
        ("It doesn't work with my phone", "pain_points"),
        ("Lessig showed up and started talking about copyright problems.", None),
        ("We make beginner issues that explain how to make a pull request.", None),
        ("The value is in not having to have the team in one office.", None),
        ("Just to expand your scope to system tests, which may have different failure profiles.", None),
        ("The build failure on CI cost us a day.", "pain_points"),
    ],
)
def test_a_problem_word_in_praise_a_topic_or_a_relief_is_no_pain_point(sentence: str, kind: str | None) -> None:
    assert persona.list_kind(sentence) == kind


def test_a_question_in_quotes_is_no_item_and_no_quote() -> None:
    asked = 'Or "What is the language that we\'re using here?"'
    assert persona.list_kind(asked) is None and persona.list_kind("We're using Rust here.") == "behaviours"
    assert persona.list_kind('I hate the popup that keeps asking "Are you sure?"') == "pain_points"  # quotes one
    said = [
        persona.Sentence("P1", 'Then I asked them "what is the language that we use here?"', 0.9),
        persona.Sentence("P2", "I ask the new people which language they use at home.", 0.5),
    ]
    assert [s.participant for s in persona.pick_quotes(said, set(), 1)] == ["P2"]


def test_the_summary_quotes_a_goal_short_enough_to_state_one_or_none() -> None:
    story = (
        "It started more like an experiment, but it gradually evolved into something that I want to open source "
        "and maintain, and it turned out people were actually liking it."
    )
    assert "A goal in their words" not in persona.persona_summary(3, 9, ["builds"], [story])
    summary = persona.persona_summary(3, 9, ["builds"], [story, "Better error messages"])
    assert summary.endswith('A goal in their words: "Better error messages"')


def test_the_summary_quotes_no_goal_that_leans_on_what_was_said_before_it() -> None:
    goals = ["My main goal in doing that is to help people.", "I want more maintainers for the project."]
    summary = persona.persona_summary(5, 19, ["core team"], goals)
    assert summary.endswith('A goal in their words: "I want more maintainers for the project."')
    assert "A goal in their words" not in persona.persona_summary(5, 19, ["core team"], goals[:1])


@pytest.mark.parametrize(
    ("sentence", "kind"),
    [
        ("A proprietary program can use an LGPL library as a dynamically-linked library.", None),
        ("A backend that can run notebooks headless.", "goals"),
        ("A debugger you can attach to a running kernel.", "goals"),
        ("A cache so builds will be faster.", "goals"),
        ("A dark mode for the notebook.", "goals"),
    ],
)
def test_a_noun_phrase_names_a_wanted_feature_unless_it_says_what_a_thing_can_do(
    sentence: str, kind: str | None
) -> None:
    assert persona.list_kind(sentence) == kind


@pytest.mark.parametrize(
    ("sentence", "kind"),
    [
        ("Reorder tests to fail faster", None),
        ("Tests that pass on local machines fail on CI machines.", None),
        ("The upload fails to finish every time.", "pain_points"),
        ("The login is failing.", "pain_points"),
        ("My payment failed twice.", "pain_points"),
    ],
)
def test_to_fail_is_a_pain_only_when_something_fails_the_speaker(sentence: str, kind: str | None) -> None:
    assert persona.list_kind(sentence) == kind


PAIN_POINTS_QUESTION = "What are the biggest pain points for you in running your class?"
CAUSES_QUESTION = "Have you encountered any other causes of flaky tests that we have not described above?"
ACTIONS_QUESTION = "Are there any other actions that you would take that we have not listed above?"


@pytest.mark.parametrize(
    ("answer", "question", "kind"),
    [
        ("Organizing the assignment submissions.", PAIN_POINTS_QUESTION, "pain_points"),
        ("Split test suite up.", ACTIONS_QUESTION, "behaviours"),
        ("Just in time compiling", "What capability or package do you feel is most missing from R?", "goals"),
        ("Organizing the assignment submissions.", "", None),
        ("Organizing the assignment submissions.", "Comments:", None),
        ("It kept crashing on login.", "Why did you stop using the app?", "pain_points"),
        (
            "Add Spack packages (to our own repo) for supporting ISV apps",
            "What is the most recent thing you did with Spack?",
            "behaviours",
        ),
        ("Easier installation of dependency chains.", "What about Spack has helped you the most?", None),
        (
            "Regular contribution mentoring",
            "Are there specific ways the project could make contributing easier for you?",
            "goals",
        ),
        ("Pytest plugins", "How do you make flaky tests easier to find?", "behaviours"),
    ],
)
def test_a_bare_answer_is_what_its_question_asks_for(answer: str, question: str, kind: str | None) -> None:
    assert persona.list_kind(answer, question) == kind


SPACK_PAINS = "What are the biggest pain points in Spack for your workflow? (feel free to link to issues)"
SPACK_USE = "Tell us briefly about your use case and your usual Spack workflow."
SPACK_FEATURES = "What features NOT in the prior list would you like to see?"


@pytest.mark.parametrize(
    ("answer", "question", "kind"),
    [
        (
            "Sometimes I want to see inside a package that spack builds and spack makes that hard.",
            SPACK_PAINS,
            "pain_points",
        ),
        ("Sometimes I want to see inside a package that spack builds and spack makes that hard.", "", "goals"),
        (
            "Deploying a stack on a mixed HPC system and supporting users who can't do 'make install'.",
            SPACK_USE,
            "behaviours",
        ),
        ("Having to rebuild everything after each update is a problem.", SPACK_USE, "pain_points"),
        ("currently changes in spack code seems to change concretization with repeated runs.", SPACK_FEATURES, None),
    ],
)
def test_a_survey_answer_with_two_readings_is_read_by_its_question(
    answer: str, question: str, kind: str | None
) -> None:
    assert persona.list_kind(answer, question) == kind


HINDERS_QUESTION = "What, if anything, hinders you from making Jupyter Notebook an even more regular part of your work?"


def test_a_thing_named_under_what_is_in_the_way_is_no_pain_point_but_a_task_is() -> None:
    # "Git integration" in the way of using a tool more is as often missing as troublesome; a task is troublesome.
    assert persona.list_kind("Git integration, CSS themes", HINDERS_QUESTION) is None
    assert persona.list_kind("Managing notebooks on git (diff)", HINDERS_QUESTION) == "pain_points"
    assert persona.list_kind("Git integration, CSS themes", PAIN_POINTS_QUESTION) == "pain_points"


def test_an_action_taken_is_a_practice_under_an_actions_question_whatever_trouble_it_names() -> None:
    assert persona.list_kind("Rewrite problematic code to make it more testable.", ACTIONS_QUESTION) == "behaviours"
    assert persona.list_kind("Problematic code is rewritten too late.", ACTIONS_QUESTION) == "pain_points"
    assert persona.list_kind("Test failures are random and a real problem.", ACTIONS_QUESTION) == "pain_points"
    assert persona.list_kind("Debug builds take forever, a real problem.", ACTIONS_QUESTION) == "pain_points"
    assert persona.list_kind("Building the docs is a real problem.", ACTIONS_QUESTION) == "pain_points"


def test_a_request_s_words_under_an_actions_question_are_an_action_taken() -> None:
    assert persona.list_kind("Warn other teams of existence of FT and the scope of risk", ACTIONS_QUESTION) == (
        "behaviours"
    )
    assert persona.list_kind("Warn other teams of existence of FT and the scope of risk") == "goals"
    assert persona.list_kind("I wish the CI told other teams.", ACTIONS_QUESTION) == "goals"


@pytest.mark.parametrize(
    ("sentence", "kind"),
    [
        ("It ignores the elements I want it to interact with.", None),
        ("I can open anything we want to see in it.", None),
        ("The thing I want is a stable CI.", "goals"),
        ("The one thing I want to see is better logs.", "goals"),
        ("I want the tool to run everything I want.", "goals"),
    ],
)
def test_a_wish_inside_a_relative_clause_names_a_thing_not_a_goal(sentence: str, kind: str | None) -> None:
    assert persona.list_kind(sentence) == kind


@pytest.mark.parametrize(
    "answer",
    ["This course was a joy to teach.", "None at this time.", "Thanks for the great tool and the hard work!"],
)
def test_a_clause_a_refusal_or_praise_is_not_made_an_item_by_its_question(answer: str) -> None:
    assert persona.list_kind(answer, PAIN_POINTS_QUESTION) is None


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        ("Nothing - the issues I had were all related to learning R prior to dplyr", None),
        ("None, the crashes stopped after the update.", None),
        ("N/A: my problems were with the old version.", None),
        ("Nothing helps when the build crashes.", "pain_points"),
        ("No documentation for the widgets is a problem.", "pain_points"),
        ("None - but the lack of a debugger is painful.", "pain_points"),
        ("No - it has worked out for me quite well, but the students crash the kernel.", None),
    ],
)
def test_an_answer_that_declines_before_its_reason_is_no_item(answer: str, kind: str | None) -> None:
    assert persona.list_kind(answer) == kind


@pytest.mark.parametrize(
    "answer",
    [
        "Student servers on JupyterHub failed to load regularly, but the system is now much more stable.",
        "The crashes on start-up have since been fixed.",
        "All my issues were related to learning R prior to the release of dplyr.",
        "Painful was the configuration of the notebook server (security issues) last year.",
    ],
)
def test_a_trouble_told_as_mended_is_no_pain_point(answer: str) -> None:
    assert persona.list_kind(answer) is None


@pytest.mark.parametrize(
    "sentence",
    [
        "I think if we want to have a world where corporate and independent open source live in harmony.",
        "If only Cygnus can use it, that's not gonna be the term that kicks over.",
        "Open source projects back in the day had mailing lists where people could ask questions.",
        "Something that was like an extremely complex licensing paradigm was exactly my cup of tea.",
        "I can't really make a prediction about where it goes.",
        "A few things.",
        "You're probably gonna find yourself pushed into a foundation, if only because of the paperwork.",
    ],
)
def test_a_condition_a_possibility_or_a_description_is_no_wish_or_pain(sentence: str) -> None:
    assert persona.list_kind(sentence) is None


@pytest.mark.parametrize(
    ("sentence", "kind"),
    [
        ("If only it worked offline.", "goals"),
        ("Something that lets me export slides.", "goals"),
        ("They could add a dark mode.", "goals"),
        ("I cannot tell which package to use.", "pain_points"),
    ],
)
def test_a_wish_a_request_or_a_trouble_worded_alike_stays_one(sentence: str, kind: str) -> None:
    assert persona.list_kind(sentence) == kind


def test_an_activity_no_one_is_said_to_do_under_a_question_about_what_is_missing_is_a_goal() -> None:
    missing = "What capability or package do you feel is most missing from R?"
    assert persona.list_kind("Using tidyverse in functions without quo", missing) == "goals"
    assert (
        persona.list_kind("For these reasons, I tend to stick to base R as much as possible.", missing) == "behaviours"
    )
    assert persona.list_kind("Using tidyverse in functions without quo") == "behaviours"


@pytest.mark.parametrize(
    "answer",
    [
        "Packages can change, and older code may no longer run properly.",
        "The app is now more difficult to use after the update.",
        "I have to restart the server prior to each class, which is painful.",
    ],
)
def test_a_trouble_that_stays_or_grows_is_still_a_pain_point(answer: str) -> None:
    assert persona.list_kind(answer) == "pain_points"


def test_a_quote_repeats_no_item_and_reads_alone() -> None:
    said = persona.Said()
    said.add("I want better error messages in the console.")
    sentences = [
        persona.Sentence("P2", "My students hate the error messages in the console.", 0.9),
        persona.Sentence("P3", "Installing kernels on lab machines takes the whole first week.", 0.8),
        persona.Sentence("P4", "And they crash.", 0.7),
        persona.Sentence("P5", "But it is slow...", 0.6),
        persona.Sentence("P6", "No - it has worked out for me quite well so far.", 0.5),
    ]
    chosen = persona.pick_quotes(sentences, set(), 2, (), said)
    assert [s.text for s in chosen] == ["Installing kernels on lab machines takes the whole first week."]


def test_an_item_that_shares_most_of_its_words_with_one_chosen_is_left_out_though_they_are_the_topic() -> None:
    said = persona.Said(frozenset({"flaky test"}))
    said.add("I always quarantine flaky tests the same day.")
    assert said.again("Flaky tests are slow.")
    assert not said.again("Our nightly build fails on flaky tests twice a week.")


@pytest.mark.parametrize(
    ("sentence", "alone"),
    [
        ("This means I end up processing the data in R and labelling it in SPSS.", False),
        ("That would be cool, but I have no idea how to fund it.", False),
        ("These slides can be automatically imported into the course site.", False),
        ("They're very annoying!", False),
        ("I.e. a chain of services shutting down in the wrong order.", False),
        ("With regards to that, I would love to contribute more.", False),
        ("And they might hear from their users via issues.", False),
        ("For me, I guess recently, we've -- and it was really hard in the beginning.", False),
        ("I always look at GitHub stars as a way of...", False),
        ("I'd appreciate it if you didn't do such pull requests.\"", False),
        ("The one that wasn't was resource cleanup in a corner case.", False),
        ("Clear the cache (see linked video above), rebuild the test instances.", False),
        ("As I said, we never fix them the same week.", False),
        ("A bunch of things came to mind right when you asked the question.", False),
        ("Similarly, I often end up with several notebook servers running.", False),
        ("In that case we rebuild everything.", False),
        ("That issue template kind of was kickstarted by me.", False),
        ("For these reasons, I tend to stick to base R as much as possible.", False),
        ("For example, if I build package A with gcc 13, its dependencies get gcc 13 too.", False),
        ("I'm trying to think of some examples of what you're calling the existing projects.", False),
        ("We might as well talk about Node, since both Mikeal and I work on Node.", False),
        ("I'm looking forward to the next episodes.", False),
        ("To everyone listening, if you wanna try it, go to our website.", False),
        ("Two, it had to be the best developer experience.", False),
        ("Second is - going back to an earlier thread - pricing.", False),
        ("Two developers maintain the whole build system on weekends.", True),
        ("This course was a joy to teach.", True),
        ("Because of packages, there are many ways to do things and it confuses people.", False),
        ("In this class, I often use Jupyter as a presentation tool.", True),
        ("So many options, difficult to choose where to start.", False),
        ("Better keybindings -- toggle for vim.", True),
        ("Although notebooks are great, version control of them is painful.", True),
        ("The one thing I would change is the lack of a debugger.", True),
        ("It is not downloading since the update.", True),
        ('I hate the popup that keeps asking "Are you sure?"', True),
        ("Flaky tests make me re-run the build three times a day.", True),
    ],
)
def test_an_item_or_quote_is_a_sentence_that_reads_alone(sentence: str, alone: bool) -> None:
    assert persona.stands_alone(sentence) is alone


def test_an_item_that_says_one_already_chosen_again_is_left_out() -> None:
    said = [
        persona.Sentence(f"P{n}", text, 1.0 - n / 10)
        for n, text in enumerate(
            [
                "Ggplot2 & dplyr",
                "Ggplot2 and dplyr",
                "Rewrite the code under test",
                "Rewrite problematic code to make it testable",
                "Mock the clock",
            ]
        )
    ]
    chosen = [s.text for s in persona.pick_spread(said, 5)]
    assert chosen == ["Ggplot2 & dplyr", "Rewrite the code under test", "Mock the clock"]


def test_a_word_pair_a_fifth_of_the_speakers_use_is_the_topic_and_one_fewer_use_is_a_theme_said_once() -> None:
    def person(n: int) -> persona.Participant:
        said = ["The bus was late again today."]
        if n < 6:
            said.append("Flaky tests fail our nightly build.")
        if n < 3:
            said.append("Version control of notebooks is painful.")
        return persona.Participant(f"P{n}", said)

    topic = persona.topic_pairs(persona.build_corpus([person(n) for n in range(20)]))
    assert "flaky test" in topic  # 6 of 20 speakers
    assert "version control" not in topic  # 3 of 20


def test_a_wish_and_the_lack_it_mirrors_are_one_item_but_the_data_set_s_topic_repeats_freely() -> None:
    sentences = [
        persona.Sentence("P1", "I wish I could select multiple cells at once.", 0.9),
        persona.Sentence("P2", "The lack of a way to select multiple cells is painful.", 0.8),
        persona.Sentence("P3", "Flaky tests keep failing our nightly build.", 0.7),
        persona.Sentence("P4", "I always quarantine flaky tests the same day.", 0.6),
    ]
    lists = persona.categorise(sentences, 3, persona.Said(frozenset({"flaky test"})))
    chosen = [s.text for found in lists.values() for s in found]
    assert len([text for text in chosen if "multiple cells" in text]) == 1
    assert len([text for text in chosen if "flaky tests" in text.lower()]) == 2


def test_a_long_sentence_is_an_item_only_when_no_shorter_one_is_left() -> None:
    long = (
        "I always run the tests on my laptop first, then on the staging server, then in CI with extra logging "
        "turned on for every single suite we own, before I look at any report."
    )
    sentences = [persona.Sentence("P1", long, 0.9), persona.Sentence("P2", "I always re-run the failing build.", 0.5)]
    assert [s.text for s in persona.categorise(sentences, 1)["behaviours"]] == ["I always re-run the failing build."]
    assert [s.text for s in persona.categorise(sentences, 2)["behaviours"]] == [
        "I always re-run the failing build.",
        long,
    ]


def test_an_item_that_leans_on_what_was_said_before_it_comes_after_every_plain_one() -> None:
    leaning = [
        persona.Sentence("P1", "We pull it down, we build it.", 0.9),
        persona.Sentence("P2", "I always spend that time writing documentation for newcomers.", 0.8),
        persona.Sentence("P4", "I usually do some actual coding work on these open source projects.", 0.7),
        persona.Sentence("P5", "I usually resolve issues like this with a script.", 0.6),
    ]
    plain = persona.Sentence("P3", "I always review every contribution on my laptop before merging.", 0.5)
    assert [s.text for s in persona.categorise([*leaning, plain], 1)["behaviours"]] == [plain.text]
    assert [s.text for s in persona.categorise([*leaning, plain], 5)["behaviours"]] == [
        plain.text,
        *(s.text for s in leaning),
    ]
    quotes = persona.pick_quotes([*leaning, plain], set(), 1)
    assert [s.text for s in quotes] == [plain.text]


@pytest.mark.parametrize(
    ("text", "leans"),
    [
        ("Yes, with the help of mentors.", True),  # the Kubernetes survey: a reply to "Are there ways ...?"
        ("No, the docs are enough.", True),
        ("Yesterday the build broke twice.", False),
        ("No-one reviews my pull requests.", False),
        ("Nobody reviews my pull requests.", False),
    ],
)
def test_a_reply_that_opens_with_yes_or_no_leans_on_the_question_it_answers(text: str, leans: bool) -> None:
    assert persona.leans_back(text) is leans


def test_a_cause_named_under_a_causes_question_is_no_pain_point_unless_the_speaker_met_it() -> None:
    assert persona.list_kind("Errors in 3rd party libraries (e.g. Vagrant).") == "pain_points"
    assert persona.list_kind("Errors in 3rd party libraries (e.g. Vagrant).", CAUSES_QUESTION) is None
    assert persona.list_kind("We lost days to errors in a 3rd party library.", CAUSES_QUESTION) == "pain_points"


def test_a_survey_answer_keeps_the_question_it_answers() -> None:
    records = [
        {"id": str(n), "role": "teacher", PAIN_POINTS_QUESTION: answer}
        for n, answer in enumerate(["Organizing the assignment submissions.", "Grading notebooks by hand"], 1)
    ]
    people, _, _ = persona.participants_from_records(records, "class.csv")
    assert people[0].asked == {"Organizing the assignment submissions.": PAIN_POINTS_QUESTION}
    sentences = persona.segment_sentences(persona.build_corpus(people), [0, 1], {})
    assert {s.question for s in sentences} == {PAIN_POINTS_QUESTION}


def test_a_problem_stated_with_is_a_stays_a_pain_point() -> None:
    assert persona.list_kind("A big problem is that the tests fail randomly.") == "pain_points"


def test_flaky_personas_list_no_definition_of_a_flaky_test(flaky_personas: list[dict]) -> None:
    items = [text for item in flaky_personas for key in ("goals", "pain_points", "behaviours") for text in item[key]]
    assert items and not [text for text in items if re.match(r"(?i)a flaky test is (a|an|any|when)\b", text)]


@pytest.mark.parametrize(
    "wanted", ["Re-run the build.", "After identifying a flaky test, how often do you… [Re-run the build.]"]
)
def test_group_by_takes_a_question_s_text_or_a_grid_item(flaky: persona.Dataset, wanted: str) -> None:
    key = persona.grouping_key(wanted, flaky)
    assert persona.normalise_key(key).endswith("[re_run_the_build.]")
    assert persona.grouping_warnings(key, flaky, 3) == ["4 groups, personas for the 3 largest; ask for 4 to see all"]
    assert persona.grouping_warnings(key, flaky, 4) == []


def test_a_job_reports_respondents_answers_items_and_stability(client: httpx.Client) -> None:
    scale = ["Never", "Rarely", "Sometimes", "Often"]
    records = [
        {
            "id": f"R{n:02d}",
            "team": ["Ward", "Depot", "Office"][n % 3],
            "How often do you swap shifts?": scale[n % 4],
            **({"comment": f"I swap shifts with my colleague number {n} when the rota changes late."} if n % 2 else {}),
        }
        for n in range(40)
    ] + [{"id": "R99"}]
    job = wait_job(client, submit(client, data=records, count=3))
    assert job["status"] == "completed", job["error"]
    quality = job["result"]["metadata"]["quality"]
    assert quality["respondents"] == 41 and "R99" in quality["unrepresented"]
    assert isinstance(quality["stability"], float) and 0.0 <= quality["stability"] <= 1.0
    assert all("distinctiveness" in entry and "items" in entry for entry in quality["personas"])
    assert all(p["evidence"]["answers"] for p in job["result"]["personas"])
    grouped = wait_job(
        client, submit(client, data=records, count=2, config={"group_by": "How often do you swap shifts?"})
    )
    assert grouped["status"] == "completed", grouped["error"]
    assert grouped["result"]["metadata"]["quality"]["stability"] is None
    assert "4 groups, personas for the 2 largest; ask for 4 to see all" in grouped["result"]["metadata"]["warnings"]


@pytest.mark.parametrize(
    ("header", "item"),
    [
        (
            "To what extent do you agree with the following statements: [Flaky tests hinder continuous integration.]",
            "Flaky tests hinder continuous integration.",
        ),  # Google Forms
        (
            "After identifying a flaky test, how often do you... - Quarantine the test",
            "Quarantine the test",
        ),  # Qualtrics, SurveyMonkey
        (
            "Do you agree with the following statements (1 - strongly disagree, 5 - strongly agree) - CI is clear",
            "CI is clear",
        ),  # SurveyMonkey, its scale's dashes in the stem
        ("3) How often do you use these tools - Slack", "Slack"),  # a numbered question
    ],
)
def test_a_grid_item_is_read_from_each_export_s_header(header: str, item: str) -> None:
    assert persona.grid_parts(header)[1] == item
    assert persona.answer_phrase("q5_3", "Often", {"q5_3": header}).endswith(": often")
    assert persona.grid_parts("Self-rated - skill") is None and persona.grid_parts("role") is None


def test_a_dash_inside_a_question_s_own_brackets_makes_no_grid() -> None:
    """The Kubernetes contributor survey (SurveyMonkey) asks one question with a dash in its aside."""
    header = "Are you available to mentor? (ps - our program list includes 1:1, group, and many other kinds)"
    assert persona.grid_parts(header) is None
    assert persona.question_text("q", {"q": header}) == header


@pytest.mark.parametrize(
    ("data", "question"),
    [
        ("r-community-2018/responses.tsv", "What industry do you work or participate in?"),
        ("r-community-2018/responses.tsv", "What is the highest degree or level of school you have completed?"),
        ("jupyter-education-2016/responses.csv", "What level of education is your course?"),
        ("jupyter-education-2016/responses.csv", "How often is this course taught?"),
    ],
)
def test_a_real_export_s_choice_columns_are_attributes_not_speech(data: str, question: str) -> None:
    dataset = persona.load_path(data, CORPUS)
    key = next(k for k in dataset.labels if dataset.labels[k].startswith(question))
    answered = [person.attributes[key] for person in dataset.participants if key in person.attributes]
    assert len(answered) >= 0.8 * len(dataset.participants)
    assert not any(
        value in text
        for person in dataset.participants
        for text in person.texts
        for value in set(answered)
        if len(value) > 25
    )  # none of its answers is read as something said
