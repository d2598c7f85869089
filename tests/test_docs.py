"""The documentation stays true to the code and to its own rules: the generated column lists match
``study.layout``, every relative link resolves, the README stays short, every benchmark row carries
its date and commit, and no page narrates how the software was developed."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from study.layout import PER_CLASS_COLUMNS, TRIALS_COLUMNS, per_class_csv_columns, trials_csv_columns

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]


def _generate_module():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_column_lists_in_outputs_md_are_what_layout_generates():
    text = (DOCS / "outputs.md").read_text()
    assert _generate_module().render(text) == text, "docs/outputs.md is stale: run `make docs`"


def test_every_csv_column_has_a_description_and_the_page_lists_them_all():
    text = (DOCS / "outputs.md").read_text()
    for columns, names in ((trials_csv_columns(), TRIALS_COLUMNS), (per_class_csv_columns(), PER_CLASS_COLUMNS)):
        assert [c for c, _ in columns] == list(names)
        assert all(d for _, d in columns), [c for c, d in columns if not d]
        for c in names:
            assert f"| `{c}` |" in text, c


def test_a_stale_column_list_is_detected(tmp_path):
    """The check above can fail: a page missing a column differs from what the generator writes."""
    text = (DOCS / "outputs.md").read_text().replace("| `tau` |", "| `tau_renamed` |")
    assert _generate_module().render(text) != text


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


NARRATION = re.compile(
    r"this session|last session|an earlier session|in the latest session|tried and reverted|"
    r"no session so far|this README were produced|yesterday|today",
    re.I,
)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_narrates_how_the_software_was_developed(page):
    found = NARRATION.findall(page.read_text())
    assert not found, f"{page.name}: {found}"


def test_every_benchmark_row_has_a_date_a_commit_and_a_machine():
    rows = [ln for ln in (DOCS / "benchmarks.md").read_text().splitlines() if ln.startswith("| 2")]
    assert rows, "no benchmark rows"
    for row in rows:
        date, commit, machine = (c.strip() for c in row.strip("|").split("|")[:3])
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date), row
        assert re.fullmatch(r"[0-9a-f]{7,40}", commit), row
        assert machine, row
    table = [ln for ln in (DOCS / "benchmarks.md").read_text().splitlines() if ln.startswith("| ")]
    assert len(table) == len(rows) + 2  # the header, its rule, and only dated rows


def test_the_docs_index_links_every_page():
    index = (DOCS / "README.md").read_text()
    linked = set(LINK.findall(index))
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.name != "README.md" and p.name not in linked]
    assert not missing, f"docs/README.md does not link {missing}"
    assert "docs/README.md" in (ROOT / "README.md").read_text()
