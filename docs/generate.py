"""Rewrite the generated parts of the docs from the code: the column lists of trials.csv and
per_class.csv in docs/outputs.md, from the field docstrings of ``study.layout.TrialRow`` and
``PerClassRow``. ``make docs`` runs it; tests/test_docs.py checks that the page is up to date."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from study.layout import per_class_csv_columns, trials_csv_columns

OUTPUTS = Path(__file__).resolve().parent / "outputs.md"
SECTIONS = {"trials.csv": trials_csv_columns, "per_class.csv": per_class_csv_columns}


def column_table(columns: list[tuple[str, str]]) -> str:
    # the docstrings are reStructuredText (``x``); Markdown wants single backticks
    rows = [f"| `{name}` | {text.replace('``', '`').replace('|', '/')} |" for name, text in columns]
    return "\n".join(["| column | meaning |", "| --- | --- |", *rows])


def render(text: str) -> str:
    """``text`` with every generated section replaced by what the code says now."""
    for name, columns in SECTIONS.items():
        pattern = re.compile(
            rf"(<!-- BEGIN {re.escape(name)} columns[^>]*-->\n).*?(<!-- END {re.escape(name)} columns -->)", re.S
        )
        if not pattern.search(text):
            raise SystemExit(f"{OUTPUTS}: the markers of the {name} columns are missing")
        text = pattern.sub(lambda m, c=columns: m.group(1) + column_table(c()) + "\n" + m.group(2), text)
    return text


def main() -> int:
    old = OUTPUTS.read_text()
    new = render(old)
    if new != old:
        OUTPUTS.write_text(new)
        print(f"updated {OUTPUTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
