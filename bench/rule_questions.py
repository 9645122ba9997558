"""How many of a researcher's segments the engine's clustering recovers when given only the questions her rules read.

    python bench/rule_questions.py

bench/quality.py counts the researcher's segments (researcher.json) that some persona recovers
(Jaccard >= 0.5, best of 3 to 5 personas). The researchers drew those segments by rules over a
few closed questions each (see researcher.py beside each data set). Here every participant keeps
only the answers to those questions and no free text, and the engine's own clustering groups
them: if the segments were groups of alike participants that the other answers and the words hide,
they would show here. A segment that stays unrecovered here is one that grouping by likeness does
not draw from the very answers it was drawn from: the rules join answers by "or" and by
precedence, and their segments overlap.

Deterministic, offline, standard library only.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from quality import CORPUS, COUNTS, RECOVERED, import_persona, jaccard  # noqa: E402

# The questions each data set's researcher.py reads, by the opening of their header (a grid's common
# opening takes in all its items). A segment drawn from free text is named in the output.
RULE_QUESTIONS = {
    "flaky-tests-2021": (
        "How often do you observe flaky tests",
        "To what extent do you agree",
        "After identifying a flaky test, how often do you",
    ),
    "jupyter-education-2016": (
        "How often is this course taught?",
        "What level of education is your course?",
        "What field(s) is your course most related to?",
        "Please indicate which of the following Jupyter/IPython tools",
        "If you are using the notebook, how do students access it?",
        "If you are using notebooks for graded assignments, how are you doing the grading?",
    ),
    "r-community-2018": (
        "Which category best describes the work you do?",
        "How would you rate your level of experience using R?",
        "Roughly how long did it take you to achieve proficiency in R?",
        "How often do you use Shiny?",
        "How often do you write unit tests for your R code?",
        "How often do you use some type of version control on your R code?",
    ),
    "spack-survey-2025": ("What kind of user are you?",),
    "k8s-contributor-survey-2019": ("What level of the Contributor Ladder do you consider yourself to be on?",),
}
FROM_TEXT = {"flaky-tests-2021": ["Integration and environment testers"]}  # segments whose rule reads free text


def main() -> None:
    persona = import_persona(ROOT)
    print("| dataset | questions kept | segments recovered | best count | Jaccards |")
    print("|---|---|---|---|---|")
    for name, openings in RULE_QUESTIONS.items():
        researcher = json.loads((ROOT / CORPUS / name / "researcher.json").read_text(encoding="utf-8"))
        dataset = persona.load_path(researcher["data"], ROOT / CORPUS)
        kept = tuple(persona.normalise_key(opening) for opening in openings)
        for person in dataset.participants:
            person.attributes = {key: value for key, value in person.attributes.items() if key.startswith(kept)}
            person.texts = []
        questions = len({key for person in dataset.participants for key in person.attributes})
        corpus = persona.build_corpus(dataset.participants, dataset.labels)
        best: tuple[int, float, int, list[float]] | None = None
        for count in COUNTS:
            groups = [
                {dataset.participants[i].id for i in members} for members in persona.cluster_participants(corpus, count)
            ]
            scores = [max(jaccard(set(s["members"]), group) for group in groups) for s in researcher["segments"]]
            found = sum(score >= RECOVERED for score in scores)
            if best is None or (found, statistics.mean(scores)) > best[:2]:
                best = (found, statistics.mean(scores), count, [round(score, 2) for score in scores])
        assert best is not None
        recovered = f"{best[0]} of {len(researcher['segments'])}"
        if name in FROM_TEXT:
            recovered += f" ({', '.join(FROM_TEXT[name])}: drawn from free text)"
        print(f"| {name} | {questions} | {recovered} | {best[2]} | {best[3]} |")


if __name__ == "__main__":
    main()
