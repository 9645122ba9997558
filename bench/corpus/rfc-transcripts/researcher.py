"""Researcher segments for rfc-transcripts/episodes, coded by reading the transcripts.

    python bench/corpus/rfc-transcripts/researcher.py          # checks ids, prints the evidence per member
    python bench/corpus/rfc-transcripts/researcher.py --write  # (re)writes researcher.json beside it

Membership was coded by reading each guest's own turns (a transcript has no closed answers to apply a rule
to). This script checks that every member id is an episode file and prints, for each member, how often the
guest's own words (the hosts' turns and ad breaks left out) match the segment's evidence expression, so a
reader can see the coding is grounded. Standard library only; never imports persona.
Participant ids are file paths relative to episodes/ without the suffix.
"""

import json
import re
import sys
from pathlib import Path

EPISODES = Path(__file__).with_name("episodes")
HOSTS = {"Nadia Eghbal", "Mikeal Rogers", "Adam Stacoviak", "Break"}
LABEL = re.compile(r"^\*\*([^*]+?):\*\*\s*(.*)", re.S)


def guest_words(pid):
    """Everything said by a speaker other than the hosts: a turn runs from its label to the next label."""
    speaker, said = None, []
    for para in (EPISODES / f"{pid}.md").read_text(encoding="utf-8").split("\n\n"):
        m = LABEL.match(para)
        if m:
            speaker, para = m.group(1), m.group(2)
        if speaker and speaker not in HOSTS:
            said.append(para)
    return "\n".join(said)


def ep(n):
    return f"request-for-commits-{n:02d}"


SEGMENTS = [
    {
        "name": "Independent maintainers looking for a way to be paid",
        "basis": "Coded from the guest's words: maintains a widely used project largely alone or as a volunteer "
        "beside a day job, and talks about crowdfunding (Patreon, Open Collective, Kickstarter, donations), "
        "being paid or unpaid for the work, and burnout or quitting. Evidence expression below.",
        "evidence": r"patreon|open collective|kickstarter|crowdfund|donat|backer|burn(?:ed|t)? ?out|\bquit|day job"
        r"|full[- ]time|spare time|free time|get(?:ting)? paid|\bunpaid\b|paid to",
        "goals": [
            "Work on the project full-time or at least sustainably, without a second job",
            "Share maintenance with more contributors",
        ],
        "pains": [
            "Burnout from maintaining a popular project in spare time",
            "Companies depend on the project but rarely pay for it",
            "Awkwardness of paying some contributors and not others",
        ],
        "behaviours": [
            "Run Patreon, Open Collective or Kickstarter campaigns",
            "Negotiate time at work for the project",
            "Step back or quit when it becomes too much",
        ],
        "members": [ep(12), ep(14), ep(15), ep(17), ep(18)],
    },
    {
        "name": "Open source business and corporate leaders",
        "basis": "Coded from the guest's words: leads or has led a company built on, or investing in, open source "
        "(npm, Sentry, Brave/Mozilla, corporate open source offices), and talks about revenue, investors, "
        "customers, business models and how companies treat open source.",
        "evidence": r"\bCEO\b|investor|venture|revenue|\bVC\b|customers?\b|business|startup|monetiz|compan",
        "goals": [
            "Turn an open source project into a going business without losing the community",
            "Get companies to invest in open source properly",
        ],
        "pains": [
            "Finding steady revenue and working with investors",
            "Balancing company interests against community expectations",
        ],
        "behaviours": [
            "Raise venture capital or find other revenue (services, search deals, hosted products)",
            "Set up corporate open source programs and practices",
        ],
        "members": [ep(8), ep(11), ep(16)],
    },
    {
        "name": "Governance, licensing and policy veterans",
        "basis": "Coded from the guest's words: long experience of how open source is run rather than of one project "
        "- licences, foundations, boards, governance models (BDFL, liberal contribution), the OSI and the "
        "history of the movement.",
        "evidence": r"licen[cs]e|governance|foundation|\bboard\b|\bBDFL\b|lawyer|legal|copyright|trademark|steering"
        r"|\bGPL\b|free software|consensus",
        "goals": [
            "Healthy, open governance that outlives any single maintainer",
            "Developers and companies that understand licences and foundations",
        ],
        "pains": [
            "BDFL and closed core-team models that shut contributors out",
            "Licence confusion and pay-to-play foundations",
        ],
        "behaviours": [
            "Advise organisations, write books and licences, sit on boards and steering committees",
            "Open commit access liberally to casual contributors",
        ],
        "members": [ep(1), ep(2), ep(7), ep(9), ep(16)],
    },
    {
        "name": "Community builders for newcomers",
        "basis": "Coded from the guest's words: their main work is bringing people into projects - first-time "
        "contributors, documentation writers, artists and students - through welcoming language, codes of "
        "conduct, documentation, events and mentoring.",
        "evidence": r"first[- ]time|newcomer|first pull request|first PR|first contribution|code of conduct|welcom"
        r"|mentor|inclusi|beginner|approachable|documentation|\bdocs\b|student",
        "goals": [
            "Make contributing approachable for people who have never done it",
            "Value non-code work such as documentation and community care",
        ],
        "pains": [
            "First-time contributors who never come back a second time",
            "Unwelcoming tone, jargon and exclusive language in projects",
        ],
        "behaviours": [
            "Run events, first-PR programs and conferences (Your First PR, Write the Docs)",
            "Label starter issues, write documentation, mentor newcomers",
        ],
        "members": [ep(4), ep(5), ep(10), ep(19)],
    },
    {
        "name": "Open source in science and the public sector",
        "basis": "Coded from the guest's words: works on open source for science, government or public data "
        "(national lab, city government, grant-funded data tools, research-software metrics), funded by "
        "grants or institutions rather than users.",
        "evidence": r"scien|research|national lab|laborator|government|\bgrants?\b|funder|\bcity\b|public good|academ"
        r"|metric",
        "goals": [
            "Stable institutional or grant funding for research and public infrastructure software",
            "Show the impact and usage of the software to funders",
        ],
        "pains": [
            "Short-lived soft money and grant cycles",
            "Metrics such as stars and downloads that misstate usage",
            "Institutions slow to adopt or release open source",
        ],
        "behaviours": [
            "Write grant proposals and report to funders",
            "Build tools for scientists and public data",
            "Measure dependencies and usage across package managers",
        ],
        "members": [ep(3), ep(6), ep(13)],
    },
]


def check():
    files = sorted(p.stem for p in EPISODES.glob("*.md"))
    members = [m for s in SEGMENTS for m in s["members"]]
    missing = [m for m in members if m not in files]
    assert not missing, missing
    print(len(files), "episode files;", len(set(members)), "in a segment;", "none missing")
    for s in SEGMENTS:
        counts = {}
        for pid in files:
            words = guest_words(pid)
            counts[pid] = 1000 * len(re.findall(s["evidence"], words, re.I)) / max(1, len(words.split()))
        rank = sorted(files, key=counts.get, reverse=True)
        print(f"\n{s['name']}: evidence per 1000 guest words (members marked *)")
        print("  " + ", ".join(f"{pid[-2:]}{'*' if pid in s['members'] else ''}={counts[pid]:.1f}" for pid in rank))


def write_json():
    doc = {
        "data": "rfc-transcripts/episodes",
        "respondents": len(list(EPISODES.glob("*.md"))),
        "segments": [{k: s[k] for k in ("name", "basis", "goals", "pains", "behaviours", "members")} for s in SEGMENTS],
        "notes": "Coded by reading the guests' own turns in all 19 episodes, before Persona saw the data; "
        "researcher.py checks the ids and shows the keyword evidence per member. One participant per file, "
        "so Karl Fogel (episodes 01 and 02) counts twice and episodes 03 (Andrew Nesbitt, Arfon Smith) and "
        "08 (Isaac Schlueter, David Cramer) are one participant each. Each episode is coded by the guest's "
        "main theme in that conversation, not by biography: Jan Lehnardt (04) is a company CEO but talks "
        "about community; Ryan Bigg (14) was a community manager but talks about burnout and pay. "
        "Danese Cooper (16) is in two segments (corporate leader and governance veteran). Judgement calls: "
        "03 (metrics and data more than science) and 16.",
    }
    Path(__file__).with_name("researcher.json").write_text(
        json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_json()
    check()
