"""Researcher segments for spack-survey-2025/responses.csv, drawn from the raw file by rule.

    python bench/corpus/spack-survey-2025/researcher.py          # prints sizes
    python bench/corpus/spack-survey-2025/researcher.py --json   # prints segment -> members
    python bench/corpus/spack-survey-2025/researcher.py --write  # (re)writes researcher.json beside it

Standard library only; reads the CSV with the csv module and never imports persona.
Participant ids are `responses-NNN`, NNN the 1-based response row after the header row.
The segments were written down by reading the raw answers before Persona ran on the file: who
the respondent is ('What kind of user are you?') decides what they do with Spack, so the role
draws the segments; a role that names several (a write-in) goes to the first that fits, in the
order S, D, E. Respondents of other roles (managers, sales) are in no segment.
"""

import csv
import json
import re
import sys
from pathlib import Path

DATA = Path(__file__).with_name("responses.csv")

with DATA.open(newline="", encoding="utf-8-sig") as f:
    header, *rows = list(csv.reader(f))

ROLE = header.index("What kind of user are you?")
STACK = re.compile(r"system administrator|sysadmin|admin|user support|support staff|devops|sre\b", re.I)
DEVELOPER = re.compile(
    r"research software engineer|\bRSE\b|software developer|computational scientist|"
    r"build engineer|application engineer|performance architect",
    re.I,
)
END_USER = re.compile(r"scientist/researcher|researcher|hpc user|analyst|student|data scientist", re.I)


def segments():
    out = {"S": [], "D": [], "E": []}
    for n, r in enumerate(rows, 1):
        if not any(cell.strip() for cell in r):
            continue  # the export's trailing empty rows
        role = r[ROLE]
        key = "S" if STACK.search(role) else "D" if DEVELOPER.search(role) else "E" if END_USER.search(role) else None
        if key:
            out[key].append(f"responses-{n:03d}")
    return out


SEGMENTS = {
    "S": {
        "name": "Site software stack maintainers",
        "basis": "'What kind of user are you?' names a system administrator, user support staff or DevOps/SRE "
        "(alone or among others). They build and deploy module stacks and environments for other users: "
        "Lmod/modules, local package repositories, build caches, upgrades that break stacks.",
        "goals": [
            "Build and deploy reproducible software stacks for many users and platforms",
            "Keep local package repositories working across Spack upgrades",
        ],
        "pains": [
            "Upgrades of Spack or packages breaking existing stacks and modules",
            "Concretizer failures and opaque error messages",
        ],
        "behaviours": [
            "Generate modules for users; maintain environments and build caches per machine",
            "Keep local package repositories",
        ],
    },
    "D": {
        "name": "Developers and research software engineers",
        "basis": "Not a stack maintainer; 'What kind of user are you?' = Research Software Engineer (RSE), Software "
        "Developer or Computational Scientist (or a build, application or performance engineer). They use "
        "Spack for their own code: spack develop, environments, package recipes, CI.",
        "goals": [
            "Develop their own software with its dependencies managed",
            "A stable package API so recipes keep working",
        ],
        "pains": [
            "Concretizer failures and cryptic errors",
            "Broken or outdated packages; slow review of pull requests",
        ],
        "behaviours": [
            "Use spack develop and environments",
            "Write and contribute package recipes",
        ],
    },
    "E": {
        "name": "End-user scientists",
        "basis": "Neither of the above; 'What kind of user are you?' = Scientist/Researcher, HPC User / Analyst, "
        "Data Scientist or Student. They install a few packages for their research, read the documentation "
        "and meet cryptic errors.",
        "goals": [
            "Install complex dependency chains easily for their research",
        ],
        "pains": [
            "Cryptic error messages when a build fails",
            "Compilers and external packages not picked up",
        ],
        "behaviours": [
            "Install packages into environments; consult the documentation",
        ],
    },
}


def researcher_json():
    members = segments()
    return {
        "data": "spack-survey-2025/responses.csv",
        "respondents": sum(1 for r in rows if any(cell.strip() for cell in r)),
        "notes": "Drawn from the raw CSV by the rules in researcher.py, before Persona ran on the data (the "
        "segments, goals and pains were written down first by reading the answers). Disjoint; managers and "
        "other roles are in no segment. Held out, until two general grouping rules were drawn from reading its "
        "personas (bench/corpus/SOURCES.md).",
        "segments": [{**SEGMENTS[key], "members": members[key]} for key in SEGMENTS],
    }


if __name__ == "__main__":
    if "--json" in sys.argv:
        print(json.dumps(segments(), indent=2))
    elif "--write" in sys.argv:
        Path(__file__).with_name("researcher.json").write_text(
            json.dumps(researcher_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    else:
        print(len(rows), "rows;", researcher_json()["respondents"], "responses")
        for key, members in segments().items():
            print(key, len(members))
