"""Researcher segments for r-community-2018/responses.tsv, drawn from the raw file by rule.

    python bench/corpus/r-community-2018/researcher.py          # prints sizes and overlaps
    python bench/corpus/r-community-2018/researcher.py --json   # prints segment -> members
    python bench/corpus/r-community-2018/researcher.py --write  # (re)writes researcher.json beside it

Standard library only; reads the TSV with the csv module and never imports persona.
Participant ids are `responses-NNN`, NNN the 1-based response row after the header row.
Each respondent goes to the first segment whose rule fits, in the order D, C, A, B.
"""

import csv
import json
import sys
from pathlib import Path

DATA = Path(__file__).with_name("responses.tsv")

with DATA.open(newline="", encoding="utf-8") as f:
    header, *rows = list(csv.reader(f, delimiter="\t"))


def col(prefix):
    hits = [i for i, h in enumerate(header) if h.startswith(prefix)]
    assert len(hits) == 1, (prefix, hits)
    return hits[0]


CATEGORY = col("Which category best describes the work you do?")
LEVEL = col("How would you rate your level of experience using R?")
PROFICIENT = col("Roughly how long did it take you to achieve proficiency in R?")
SHINY = col("How often do you use Shiny?")
TESTS = col("How often do you write unit tests for your R code?")
VCS = col("How often do you use some type of version control on your R code?")


def rule_D(r):
    return (
        (r[VCS].startswith("Frequently") and r[TESTS].startswith(("Sometimes", "Frequently")))
        or r[SHINY].startswith("Frequently")
        or r[CATEGORY] == "Software developer"
    )


def rule_C(r):
    return r[CATEGORY] == "Student" or r[LEVEL] == "Beginner" or r[PROFICIENT].startswith("I don't feel proficient")


def rule_A(r):
    return r[CATEGORY] in ("Researcher", "Educator", "Educational developer")


def rule_B(r):
    return r[LEVEL] not in ("None", "") and r[CATEGORY] not in ("Retired", "None", "")


def segments():
    out = {"D": [], "C": [], "A": [], "B": []}
    for n, r in enumerate(rows, 1):
        for key, rule in (("D", rule_D), ("C", rule_C), ("A", rule_A), ("B", rule_B)):
            if rule(r):
                out[key].append(f"responses-{n:03d}")
                break
    return out


SEGMENTS = {
    "A": {
        "name": "Academic researchers and teachers",
        "basis": "'Which category best describes the work you do?' = Researcher, Educator or Educational developer "
        "(and not in the developer or learner segments). Mostly doctorates; learned R 'to do statistical "
        "analyses'; talk about reproducibility, publication-ready output, teaching and collaborating with "
        "colleagues who do not use R.",
        "goals": [
            "Run statistical analyses reproducibly instead of clicking through SPSS or Stata",
            "Produce publication-ready tables and graphs",
            "Teach R to students and colleagues",
        ],
        "pains": [
            "Weak package documentation and unhelpful error messages",
            "Inconsistent syntax across packages and base R's irregularities",
            "A steep learning curve that keeps colleagues from collaborating in R",
        ],
        "behaviours": [
            "Use R daily or weekly for research",
            "Mostly self-taught from books and online documentation",
            "Rarely write unit tests; version control varies",
        ],
    },
    "B": {
        "name": "Applied analysts in organisations",
        "basis": "Every remaining respondent with some R experience whose category is not Retired/None: mostly 'Data "
        "scientist or analyst' (38), also consultants, managers, finance and administration. Talk about "
        "replacing Excel, reports, Tableau/SQL/Python colleagues, speed and big data.",
        "goals": [
            "Replace slow manual Excel work with scripted, repeatable analyses and reports",
            "Visualise and explore business data quickly",
        ],
        "pains": [
            "Integrating with colleagues who use Excel, Python or SQL rather than R",
            "Speed and memory on large data",
            "Choosing between many overlapping packages",
        ],
        "behaviours": [
            "Use the tidyverse for most work",
            "Mostly self-taught, or through online courses and on the job",
            "Build occasional Shiny apps; little formal testing",
        ],
    },
    "C": {
        "name": "Learners still finding their feet",
        "basis": "'Which category…' = Student, OR 'How would you rate your level of experience using R?' = Beginner, "
        "OR 'Roughly how long did it take you to achieve proficiency in R?' = 'I don't feel proficient in R "
        "yet.' (and not in the developer segment). Talk about getting started, syntax, error messages, "
        "'so much to learn'.",
        "goals": [
            "Become productive in R for coursework, a thesis or a first analysis job",
            "Find a clear path through the language and its packages",
        ],
        "pains": [
            "Getting started, language syntax and cryptic error messages",
            "Documentation written for experienced programmers",
            "Too many packages and ways to do one thing",
        ],
        "behaviours": [
            "Learn from online courses, books and colleagues",
            "Seldom use version control or unit tests",
            "Lean on Stack Overflow and the R community",
        ],
    },
    "D": {
        "name": "Engineering-minded R developers",
        "basis": "Version control 'Frequently' AND unit tests 'Sometimes' or 'Frequently'; OR Shiny 'Frequently'; OR "
        "category = Software developer. Mostly self-rated Expert; talk about parallelism, speed, typing, "
        "packages and apps.",
        "goals": [
            "Build packages, Shiny apps and production code in R",
            "Bring software-engineering practice to analysis",
        ],
        "pains": [
            "Performance, parallel processing and memory limits",
            "Dynamic typing and language irregularities",
            "Low-quality or inconsistent packages and interfacing with other languages",
        ],
        "behaviours": [
            "Use version control on most code and write unit tests",
            "Use R more than once a day; many self-rated Expert",
        ],
    },
}


def write_json():
    seg = segments()
    doc = {
        "data": "r-community-2018/responses.tsv",
        "respondents": len(rows),
        "segments": [dict(SEGMENTS[key], members=seg[key]) for key in SEGMENTS],
        "notes": "Drawn from the raw TSV by the rules in researcher.py, before Persona saw the data. Segments are "
        "disjoint: each respondent goes to the first rule that fits, in the order developers (D), learners "
        "(C), academics (A), applied analysts (B), because practice and stage of learning say more about "
        "needs than job title. Left out: responses-037 (retired) and responses-069, who has not learned R "
        "and answered only the prospective-learner branch. The four open questions "
        "(like best, like least, most missing, one thing "
        "to change) get short answers; 34 of 150 respondents answer at most one of them, 25 none.",
    }
    Path(__file__).with_name("researcher.json").write_text(
        json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


if __name__ == "__main__":
    seg = segments()
    if "--write" in sys.argv:
        write_json()
    elif "--json" in sys.argv:
        print(json.dumps(seg, indent=1))
    else:
        print(len(rows), "response rows")
        for a in seg:
            print(a, len(seg[a]))
        print("in any segment:", len(set().union(*map(set, seg.values()))))
