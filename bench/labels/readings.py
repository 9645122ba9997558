"""Counts of the persona items a reader judged wrong, per data set and list (`persona-items.tsv`).

    python bench/labels/readings.py

Each row of persona-items.tsv is one goal (g), pain point (p), behaviour (b) or quote (q) of the 4 personas
the offline engine made of a data set, with the reader's verdict: `ok`, or why it is wrong (see README.md).
Standard library only.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

LISTS = {"g": "goals", "p": "pain points", "b": "behaviours", "q": "quotes"}


def main() -> None:
    with (Path(__file__).parent / "persona-items.tsv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    judged, wrong = Counter[str](), Counter[tuple[str, str]]()
    for row in rows:
        judged[row["dataset"]] += 1
        if row["verdict"] != "ok":
            wrong[(row["dataset"], LISTS[row["item"][0]])] += 1
    print("| data set | items | " + " | ".join(LISTS.values()) + " | wrong |")
    print("|---" * (len(LISTS) + 3) + "|")
    for dataset, items in judged.items():
        counts = [wrong[(dataset, name)] for name in LISTS.values()]
        print(f"| {dataset} | {items} | " + " | ".join(map(str, counts)) + f" | {sum(counts)} |")
    total = sum(wrong.values())
    print(f"\n{total} of {len(rows)} wrong ({total / len(rows):.0%}); why: {dict(Counter(r['verdict'] for r in rows))}")


if __name__ == "__main__":
    main()
