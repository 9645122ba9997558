"""Researcher segments for flaky-tests-2021/responses.tsv, drawn from the raw file by rule.

    python bench/corpus/flaky-tests-2021/researcher.py          # prints sizes and overlaps
    python bench/corpus/flaky-tests-2021/researcher.py --json   # prints segment -> members
    python bench/corpus/flaky-tests-2021/researcher.py --write  # (re)writes researcher.json beside it

Standard library only; reads the TSV with the csv module and never imports persona.
Participant ids are `responses-NNN`, NNN the 1-based response row after the header row.
"""

import csv
import json
import re
import sys
from pathlib import Path

DATA = Path(__file__).with_name("responses.tsv")

with DATA.open(newline="", encoding="utf-8") as f:
    header, *rows = list(csv.reader(f, delimiter="\t"))


def col(prefix, item=None):
    """Index of the column whose header starts with prefix (and holds [item], for grids)."""
    hits = [i for i, h in enumerate(header) if h.startswith(prefix) and (item is None or f"[{item}" in h)]
    assert len(hits) == 1, (prefix, item, hits)
    return hits[0]


HOW_OFTEN = col("How often do you observe flaky tests")
AGREE = [i for i, h in enumerate(header) if h.startswith("To what extent do you agree")]
ACT = "After identifying a flaky test, how often do you"
NO_ACTION, RERUN, QUARANTINE = col(ACT, "Take no action"), col(ACT, "Re-run the build"), col(ACT, "Quarantine")
SKIP, AUTO_REPEAT, REPAIR = (
    col(ACT, "Mark the test to be skipped"),
    col(ACT, "Mark the test to be automatically"),
    col(ACT, "Attempt to repair"),
)
OTHER_CAUSES = col("Have you encountered any other causes")
CONSENT = 1

EXTERNAL = re.compile(
    r"extern|third.party|3rd party|environment|network|internet|infrastructure|docker|\bVMs?\b"
    r"|virtual|hardware|machines?\b(?! learning)|services?\b|database|\bdb\b|\bCI\b",
    re.I,
)


def segments():
    out = {"A": [], "B": [], "C": [], "D": [], "E": []}
    for n, r in enumerate(rows, 1):
        pid = f"responses-{n:03d}"
        if r[CONSENT] != "Yes, I consent.":
            continue  # one respondent declined consent and answered nothing else
        if (
            r[HOW_OFTEN] in ("Never", "A few times a year", "Monthly")
            and r[REPAIR] == "Often"
            and r[NO_ACTION] in ("Never", "Rarely")
        ):
            out["A"].append(pid)
        if (
            r[HOW_OFTEN] in ("Daily", "Weekly")
            and r[RERUN] == "Often"
            and r[REPAIR] in ("Sometimes", "Rarely", "Never")
        ):
            out["B"].append(pid)
        if sum(r[i] in ("Sometimes", "Often") for i in (QUARANTINE, SKIP, AUTO_REPEAT)) >= 2:
            out["C"].append(pid)
        if sum(r[i] in ("Disagree", "Strongly disagree") for i in AGREE) >= 3:
            out["D"].append(pid)
        if EXTERNAL.search(r[OTHER_CAUSES]):
            out["E"].append(pid)
    return out


SEGMENTS = {
    "A": {
        "name": "Occasional-flake fixers",
        "basis": "'How often do you observe flaky tests…' = Never, A few times a year or Monthly; "
        "AND 'After identifying "
        "a flaky test, how often do you… [Attempt to repair the flakiness.]' = Often; AND '[Take no action.]' = "
        "Never or Rarely. In their words: flakiness is a defect to fix ('We always attempt to fix flaky tests', "
        "'Rewrite problematic code to make it more testable', 'they often point to an underlying weakness').",
        "goals": [
            "Keep the test suite trustworthy by fixing each flaky test at its root",
            "Treat flakiness as a signal of a code or design weakness worth diagnosing",
        ],
        "pains": [
            "Environment, time-zone/date and resource quirks that only show up on some machines",
            "Getting developer and product buy-in to spend time fixing flaky tests",
        ],
        "behaviours": [
            "See flaky tests a few times a year, monthly at most",
            "Attempt a repair often; seldom leave a flaky test alone",
            "Mock dependencies or rewrite the code under test to remove nondeterminism",
        ],
    },
    "B": {
        "name": "Daily re-runners under CI pressure",
        "basis": "'How often do you observe flaky tests…' = Daily or Weekly; AND '[Re-run the build.]' = Often; AND "
        "'[Attempt to repair the flakiness.]' = Sometimes, Rarely or Never. In their words: flaky CI, "
        "shared infrastructure, Selenium/UI timing, 'I generally run the tests two or three times'.",
        "goals": [
            "Get a green build and keep shipping without stopping for every intermittent failure",
            "A stable CI system ('essential for productive development at scale')",
        ],
        "pains": [
            "Weekly or daily flaky failures that hinder continuous integration",
            "Flakiness from shared infrastructure, slow CI hosts, UI/browser automation and legacy tests "
            "nobody has time to fix",
            "No clear owner of shared resources, so fixes fall between teams",
        ],
        "behaviours": [
            "Re-run the build as the first response",
            "Repair only sometimes",
            "Keep lists of known flaky tests; moan about them in team channels",
        ],
    },
    "C": {
        "name": "Flake containment managers",
        "basis": "At least two of '[Quarantine the test.]', '[Mark the test to be skipped or as an expected failure "
        "(e.g., xfail).]' and '[Mark the test to be automatically repeated (e.g., by using the flaky plugin "
        "for pytest).]' answered Sometimes or Often. In their words: tracking systems, known-flaky lists, "
        "time-boxed skips, warning other teams.",
        "goals": [
            "Stop flaky tests from blocking others while keeping a record so they get fixed later",
            "Build confidence in CI at team or organisation scale",
        ],
        "pains": [
            "Quarantined or skipped tests that stay deferred far longer than they should",
            "Building and maintaining tooling that tracks flake rates takes years and money",
        ],
        "behaviours": [
            "Quarantine, skip/xfail or auto-retry flaky tests as routine",
            "Tag tests as flaky, report flake rates, warn other teams of the risk",
        ],
    },
    "D": {
        "name": "Unworried sceptics",
        "basis": "Disagree or Strongly disagree with at least 3 of the 8 'To what extent do you agree with the "
        "following statements: […]' items (reliability, efficiency, productivity, confidence, CI, ignoring "
        "failures, reproducing, differentiating). In their words: some things are 'not deterministic by "
        "nature', 'it's still a result', flakiness comes from poor specification or inexperienced developers.",
        "goals": [
            "Understand the system rather than label tests 'flaky'",
            "Keep flakiness in proportion to other testing problems",
        ],
        "pains": [
            "Inherently nondeterministic systems (clouds, distributed protocols, ML) that cannot be fully pinned down",
            "Poor test specifications and assumptions by inexperienced developers",
        ],
        "behaviours": [
            "Do not see flaky tests as eroding confidence or making them ignore failures",
            "Can tell a genuine failure from a flaky one and find them reproducible",
        ],
    },
    "E": {
        "name": "Integration and environment testers",
        "basis": "Their answer to 'Have you encountered any other causes of flaky tests that we have not described "
        "above?' names something outside the code under test: external/third-party services, environments "
        "(local vs CI), infrastructure, network, Docker/VMs, machines or hardware, databases or CI (regular "
        "expression in researcher.py; 'machine learning' excluded).",
        "goals": [
            "Reliable integration and end-to-end tests against systems they do not control",
            "Tests that behave the same on a workstation and in CI",
        ],
        "pains": [
            "External services, databases and third-party components that are slow, change or go offline",
            "Differences between local machines and CI agents (OS, memory, hardware performance, timeouts)",
            "Virtual environments and Docker/VM infrastructure failing for no apparent reason",
        ],
        "behaviours": [
            "Run integration, e2e and UI tests against real infrastructure",
            "Recreate or move test environments, clear caches, mock out external dependencies",
        ],
    },
}


def write_json():
    seg = segments()
    doc = {
        "data": "flaky-tests-2021/responses.tsv",
        "respondents": len(rows),
        "segments": [dict(SEGMENTS[key], members=seg[key]) for key in SEGMENTS],
        "notes": "Drawn from the raw TSV by the rules in researcher.py, before Persona saw the data. The closed "
        "answers carry the segmentation: exposure (how often flaky tests are seen), the 'After identifying a "
        "flaky test' grid (what people do), and the agreement grid (how much it bothers them); segment E "
        "comes from the open 'other causes' answers, the main theme there. 86 of the 170 consenting "
        "respondents wrote no free text at all, so segments A-D hold many closed-only respondents. "
        "responses-130 declined consent and answered nothing else: in no segment. Segments overlap "
        "(A-D 12, B-E 9, A-E 9, D-E 9, B-C 9); 121 of 170 are in at least one. A and B never overlap: "
        "frequent exposure goes with re-running, rare exposure with repairing.",
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
            print(a, len(seg[a]), {b: len(set(seg[a]) & set(seg[b])) for b in seg if b != a})
        print("in any segment:", len(set().union(*map(set, seg.values()))))
