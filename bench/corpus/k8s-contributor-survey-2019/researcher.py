#!/usr/bin/env python3
"""Researcher's hand-made segmentation of the Kubernetes Contributor Experience
Survey 2019 (SIG Contributor Experience, SurveyMonkey export).

Standard library only, deterministic. Reads responses.csv next to this file and
writes researcher.json next to it.

Export layout: SurveyMonkey "expanded" CSV with TWO header rows (row 1 = question
stem, blank for the 2nd..nth column of a grid/multi-select; row 2 = item label or
"Response"/"Open-Ended Response"). A respondent is named by the export's own
"Respondent ID" column. UTF-8 with BOM.

Segmentation uses ONE closed question, the one the survey itself is organised
around:
  col 10  "What level of the Contributor Ladder do you consider yourself to be on?"
and two supporting closed questions only to describe the segments (not to assign):
  col 9   "How long have you been contributing to Kubernetes?"
  col 30  "How often do you contribute upstream?"
"""

import csv
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "responses.csv")
OUT = os.path.join(HERE, "researcher.json")
DATA = "k8s-contributor-survey-2019/responses.csv"

RESPONDENT_ID = 0  # column index of "Respondent ID", the export's own name for a respondent
LADDER = 10  # column index of the contributor-ladder question

SEGMENTS = [
    {
        "key": "newcomer",
        "levels": {"not yet a member but working on it", "there's a contributor ladder?"},
        "name": "Aspiring newcomers (not yet org members)",
        "rule": "Contributor Ladder level is 'not yet a member but working on it' "
        'or "there\'s a contributor ladder?" (does not know the ladder).',
        "goals": [
            "Make a first / first few meaningful contributions and become an org member",
            "Find beginner-friendly issues and the right SIG to work in",
            "Get a mentor or guided onboarding (how-tos, workflow, dev-environment setup)",
        ],
        "pains": [
            "Finding appropriate issues to work on (highest-rated challenge for this group)",
            "Information scattered; unclear workflow, architecture and dev-environment setup",
            "Slow or absent PR review; debugging unfamiliar CI/test failures",
            "Meetings and mentoring concentrated in US/EU time zones; contributing on own time",
        ],
    },
    {
        "key": "member",
        "levels": {"member", "reviewer"},
        "name": "Established contributors (members and reviewers)",
        "rule": "Contributor Ladder level is 'member' or 'reviewer'.",
        "goals": [
            "Get PRs reviewed and merged quickly; grow to reviewer/approver",
            "Clear per-SIG paths of work and a defined path up the ladder",
            "Formalised mentoring (e.g. through the KEP process)",
        ],
        "pains": [
            "Waiting weeks/months for reviewers and approvers; too few approvers",
            "Flaky CI / test failures unrelated to their PR",
            "Balancing contributions against a day job; part-time contributors crowded out",
        ],
    },
    {
        "key": "maintainer",
        "levels": {"approver", "subproject owner"},
        "name": "Maintainers (approvers and subproject owners)",
        "rule": "Contributor Ladder level is 'approver' or 'subproject owner'.",
        "goals": [
            "Stable, de-flaked CI and clear test ownership",
            "Less busy work and fewer notifications/meetings; more async, automated workflow",
            "Recruit and involve the right contributors; visibility across SIGs",
        ],
        "pains": [
            "Debugging test failures and unrelated test failures (highest-rated challenge)",
            "GitHub/CI notification overload",
            "Process overhead (Bazel, prow job iteration, publishing) and limited time",
        ],
    },
]


def main():
    with open(SRC, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    data = rows[2:]  # skip the two SurveyMonkey header rows
    members = {s["key"]: [] for s in SEGMENTS}
    for row in data:
        rid = row[RESPONDENT_ID].strip()
        level = row[LADDER].strip() if len(row) > LADDER else ""
        for s in SEGMENTS:
            if level in s["levels"]:
                members[s["key"]].append(rid)
                break
    out = {
        "data": DATA,
        "respondents": len(data),
        "notes": "Drawn from the raw CSV by the rule in researcher.py, before Persona ran on the data (the segments, "
        "goals and pains were written down first by reading the answers). Disjoint; the one respondent who left "
        "the ladder question blank is in no segment. Held out: nothing was changed to move its figures.",
        "segments": [],
    }
    for s in SEGMENTS:
        out["segments"].append(
            {
                "name": s["name"],
                "rule": s["rule"],
                "goals": s["goals"],
                "pains": s["pains"],
                "members": members[s["key"]],
            }
        )
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2, ensure_ascii=False)
        f.write("\n")
    n = len(data)
    for s in out["segments"]:
        print(f"{s['name']:<50} {len(s['members']):3d} ({100.0 * len(s['members']) / n:.0f}%)")
    print("respondents:", n, "unassigned:", n - sum(len(s["members"]) for s in out["segments"]))


if __name__ == "__main__":
    main()
