"""Researcher segments for jupyter-education-2016/responses.csv, drawn from the raw file by rule.

    python bench/corpus/jupyter-education-2016/researcher.py          # prints sizes
    python bench/corpus/jupyter-education-2016/researcher.py --json   # prints segment -> members
    python bench/corpus/jupyter-education-2016/researcher.py --write  # (re)writes researcher.json beside it

Standard library only; reads the CSV with the csv module and never imports persona.
Participant ids are `responses-NNN`, NNN the 1-based response row after the header row.
Each respondent goes to the first segment whose rule fits, in the order W, H, then N or C.
"""

import csv
import json
import re
import sys
from pathlib import Path

DATA = Path(__file__).with_name("responses.csv")

with DATA.open(newline="", encoding="utf-8") as f:
    header, *rows = list(csv.reader(f))


def col(prefix):
    hits = [i for i, h in enumerate(header) if h.startswith(prefix)]
    assert len(hits) == 1, (prefix, hits)
    return hits[0]


HOW_OFTEN = col("How often is this course taught?")
LEVEL = col("What level of education is your course?")
FIELD = col("What field(s) is your course most related to?")
TOOLS = col("Please indicate which of the following Jupyter/IPython tools")
ACCESS = col("If you are using the notebook, how do students access it?")
GRADING = col("If you are using notebooks for graded assignments, how are you doing the grading?")

HOSTED = re.compile(
    r"jupyterhub|sagemath cloud|binder|tmpn?b|cloud|server|\baws\b|\bVM\b|qwiklabs|quantopian"
    r"|berkeley common environment",
    re.I,
)


def rule_W(r):
    return (
        r[HOW_OFTEN] in ("Ad-hoc (e.g. workshops)", "Semi-continuously (e.g. a MOOC)")
        or re.search(r"Mixed \(conferences|MOOC|Corporate Training", r[LEVEL]) is not None
    )


def rule_H(r):
    return (
        re.search(r"JupyterHub|nbgrader", r[TOOLS]) is not None
        or HOSTED.search(r[ACCESS]) is not None
        or re.search(r"nbgrader|okpy", r[GRADING], re.I) is not None
    )


def rule_C(r):
    return re.search(r"Computer science|Data science|Machine learning", r[FIELD]) is not None


def segments():
    out = {"W": [], "H": [], "N": [], "C": []}
    for n, r in enumerate(rows, 1):
        pid = f"responses-{n:03d}"
        key = "W" if rule_W(r) else "H" if rule_H(r) else "C" if rule_C(r) else "N"
        out[key].append(pid)
    return out


SEGMENTS = {
    "W": {
        "name": "Workshop and MOOC instructors",
        "basis": "'How often is this course taught?' = Ad-hoc (e.g. workshops) or Semi-continuously (e.g. a MOOC), OR "
        "'What level of education is your course?' includes 'Mixed (conferences, workshops, Software "
        "Carpentry style events, etc.)', MOOC or Corporate Training. Talk about mixed-experience audiences, "
        "installation on attendees' machines, internet access, slides and platform integration (edX).",
        "goals": [
            "Get a mixed audience coding within minutes, without a long setup",
            "Reuse notebooks as teaching material across events and platforms",
        ],
        "pains": [
            "Installing software on attendees' own laptops; unreliable internet",
            "Audiences with widely different coding experience",
            "Converting notebooks to slides or MOOC platforms such as edX",
        ],
        "behaviours": [
            "Teach ad hoc or continuously rather than on a semester calendar",
            "Rarely grade; in-class exercises and demonstrations",
            "Use Binder, hosted servers or Anaconda on attendees' machines",
        ],
    },
    "H": {
        "name": "Hosted-notebook course runners (JupyterHub, nbgrader)",
        "basis": "Not a workshop/MOOC; AND the tools question includes JupyterHub or nbgrader, OR 'how do students "
        "access it?' names a hosted service (JupyterHub, SageMath Cloud, Binder, tmpnb, a server, cloud, "
        "AWS, a VM), OR grading uses nbgrader or Okpy. Talk about server setup, SSL and authentication, "
        "crashes under load, hidden tests and autograding.",
        "goals": [
            "Give every student the same working environment in the browser",
            "Automate assignment release, collection and grading at scale",
        ],
        "pains": [
            "Setting up and hosting JupyterHub (SSL, authentication, university servers) and servers that crash",
            "nbgrader exposing tests, read-only cells students do not understand, re-grading late work",
            "Too much devops overhead for a single course",
        ],
        "behaviours": [
            "Run JupyterHub, SageMath Cloud or Binder for the class",
            "Use nbgrader or autograding for coding exercises, by hand for prose",
            "Teach recurring undergraduate courses, often large",
        ],
    },
    "C": {
        "name": "Computing and data-science lecturers grading by hand",
        "basis": "Neither of the above (students install Jupyter on their own computers or use lab machines) AND "
        "'What field(s) is your course most related to?' includes Computer science, Data science or "
        "Machine learning. Talk about installation across operating systems, collecting submissions by "
        "e-mail or LMS, commenting on notebooks, diffing notebooks in git.",
        "goals": [
            "Use notebooks for homework and in-class exercises without running servers",
            "Give students written feedback on their notebooks efficiently",
        ],
        "pains": [
            "Getting Python and Jupyter running on every student's laptop (Windows, Mac, Python 2/3)",
            "Collecting notebooks by e-mail, git or the LMS and opening them one by one",
            "No way to annotate or comment on a notebook without editing the student's text",
        ],
        "behaviours": [
            "Grade coding and prose answers by hand",
            "Distribute notebooks through git or the LMS",
            "Often unaware of nbgrader until the survey",
        ],
    },
    "N": {
        "name": "Subject faculty teaching programming novices",
        "basis": "Neither of the above AND the course's fields include none of Computer science, Data science or "
        "Machine learning (physics, biology, earth science, engineering, mathematics, social science). "
        "Mostly 'Complete novice' or 'Novice' students; talk about diverse backgrounds, teaching "
        "programming alongside the subject, and converting from Matlab or Mathematica.",
        "goals": [
            "Teach their subject through computation to students who have never programmed",
            "Interactive demonstrations of the science (widgets, plots)",
        ],
        "pains": [
            "Students with very different programming backgrounds in one class",
            "Environment consistency between university and students' computers",
            "Grading by hand with little teaching-assistant support",
        ],
        "behaviours": [
            "Students install Anaconda on their own laptops or use lab computers",
            "Homework and lab exercises graded by hand",
            "Come from Matlab, Mathematica or Excel",
        ],
    },
}


def write_json():
    seg = segments()
    doc = {
        "data": "jupyter-education-2016/responses.csv",
        "respondents": len(rows),
        "segments": [dict(SEGMENTS[key], members=seg[key]) for key in SEGMENTS],
        "notes": "Drawn from the raw CSV by the rules in researcher.py, before Persona saw the data. Respondents "
        "are instructors, one row per course. Segments are disjoint and cover everyone: the teaching "
        "format (workshop/MOOC) first, then the infrastructure (hosted notebooks, nbgrader), then the "
        "discipline for the rest, because format and infrastructure decide most of the pains people "
        "describe. Free text is thin for some: 26 of 125 leave the pain-points question empty.",
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
