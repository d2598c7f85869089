"""`study report`: the one-page HTML report — its content on the synthetic study (no Ray, no browser),
its bad inputs, and the real study's report opened in a real headless Chromium."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from study.cli import main
from study.results.builders import build_table
from study.results.loading import load_results
from study.results.report import build_report, find_browser
from study.results.tables import render
from study.testing.analysis_fixture import make_study

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("report") / "toy-lt")


@pytest.fixture(scope="module")
def synthetic_page(synthetic):
    return build_report(load_results(synthetic))


def _report(root: Path, **kw) -> str:
    return build_report(load_results(root), **kw)


def test_the_report_holds_the_tables_study_table_prints(synthetic, synthetic_page):
    page = synthetic_page
    res = load_results(synthetic)
    for kind in ("main", "ablation"):
        fragment = render(build_table(res, kind), "html")
        assert fragment in page, kind
        # the same cells as the Markdown `study table` prints
        md_cells = re.findall(r"\d+\.\d\d ± \d+\.\d\d", render(build_table(res, kind), "markdown"))
        assert md_cells and md_cells == re.findall(r"\d+\.\d\d ± \d+\.\d\d", fragment)
    assert "What was studied" in page and "The study is complete." in page


def test_the_report_makes_no_request(synthetic_page):
    page = synthetic_page
    assert not re.search(r"<script|<link|@import|url\(", page, re.I)
    for src in re.findall(r'src="([^"]+)"', page):
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(re.findall(r"<img ", page)) >= 3  # weight norms, per-class accuracy, search histories


def test_every_string_from_the_study_is_escaped(tmp_path):
    root = make_study(tmp_path / "s")
    head = yaml.safe_load((root / "study.yaml").read_text())
    head["provenance"] = {"argv": ["study", "run", "<script>alert(1)</script>"], "space_file": "<b>x</b>.yaml"}
    (root / "study.yaml").write_text(yaml.safe_dump(head))
    page = _report(root)
    assert "<script>" not in page and "<b>x</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;x&lt;/b&gt;.yaml" in page


def test_an_unfinished_study_says_what_is_missing(tmp_path):
    page = _report(make_study(tmp_path / "u", interrupted=True))
    assert "not finished" in page and "Missing:" in page
    assert "final test evaluation of stage2/wb" in page


def test_a_reproduction_shows_the_published_numbers_with_their_source(tmp_path):
    page = _report(make_study(tmp_path / "p", name="cifar100-lt-wb-parity"))
    assert "Published numbers" in page and "ShadeAlsha/LTR-weight-balancing" in page
    section = page.split('data-kind="published"', 1)[1].split("</table>", 1)[0]
    assert [c for c in re.findall(r'<td class="num">([^<]*)</td>', section)][3::5] == [
        "40.0",
        "47.9",
        "51.0",
        "52.6",
        "53.1",
    ]
    assert "Published numbers" not in _report(make_study(tmp_path / "q"))  # no such file for toy-lt


def test_against_adds_the_comparison(tmp_path):
    a, b = make_study(tmp_path / "a", name="on-test"), make_study(tmp_path / "b")
    page = build_report(load_results(a), against=load_results(b))
    assert "Against toy-lt" in page and 'data-kind="on-test-vs-toy-lt"' in page


def test_study_report_writes_the_page_where_asked(synthetic, tmp_path, capsys):
    out = tmp_path / "r" / "page.html"
    assert main(["report", str(synthetic), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("case", ["not-a-study", "no-browser-for-pdf", "unknown-against"], ids=lambda c: c)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, monkeypatch, case):
    study = make_study(tmp_path / "s")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    if case == "not-a-study":
        (tmp_path / "plain").mkdir()
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        argv = ["report", str(tmp_path / "plain")]
    elif case == "no-browser-for-pdf":
        monkeypatch.setenv("STUDY_CHROMIUM", str(tmp_path / "no-such-chromium"))
        argv = ["report", str(study), "--pdf"]
    else:
        argv = ["report", str(study), "--against", str(tmp_path / "nope")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    if case == "no-browser-for-pdf":
        assert "chromium-headless-shell" in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# --- the real study's report in a real browser ------------------------------------------------------------


def _browser_or_skip() -> str:
    # Playwright needs the browser binary itself: Debian's /usr/bin/chromium-headless-shell is a
    # shell wrapper around /usr/lib/chromium/chromium-headless-shell
    direct = Path("/usr/lib/chromium/chromium-headless-shell")
    path = str(direct) if direct.exists() else find_browser()
    if not path:
        pytest.skip("no headless Chromium installed (apt-get install chromium-headless-shell)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[dev]')")
    return path


def test_the_finished_study_report_opens_in_chromium_loads_every_image_and_requests_nothing(toy_study, tmp_path):
    """The report the driver wrote when the toy study finished, in headless Chromium through
    Playwright: every image decoded, no console error, no request but file: and data:, the main
    table's rows are trials.csv's selected configurations with their mean ± std, the ablation's
    cells are what `study table` prints, and a full-page screenshot and a PDF come out."""
    from playwright.sync_api import sync_playwright

    browser_path = _browser_or_skip()
    page_path = toy_study / "report.html"
    assert page_path.is_file()
    requests, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri(), wait_until="load")
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
            main_rows = page.eval_on_selector_all(
                'table[data-kind$="main"] tbody tr', "rows => rows.map(r => [...r.cells].map(c => c.innerText))"
            )
            main_head = page.eval_on_selector_all('table[data-kind$="main"] thead th', "hs => hs.map(h => h.innerText)")
            ablation_cells = page.eval_on_selector_all(
                'table[data-kind$="ablation"] tbody td', "cs => cs.map(c => c.innerText)"
            )
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            page.pdf(path=str(tmp_path / "report.pdf"))
        finally:
            browser.close()
    assert images and all(done and width > 0 for done, width in images), images
    assert not errors, errors
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    # the main table: one row per selected (experiment, method), All = mean ± std of trials.csv's test_all
    trials = pd.read_csv(toy_study / "trials.csv")
    sel = trials[trials["selected"]]
    groups = sel.groupby(["experiment", "method"], sort=False)["test_all"]
    assert len(main_rows) == groups.ngroups
    col = main_head.index("All")
    shown = sorted(r[col] for r in main_rows)
    expected = sorted(f"{100 * g.mean():.2f} ± {100 * g.std(ddof=1):.2f}" for _, g in groups)
    assert shown == expected
    # the ablation: the cells of `study table --kind ablation`
    md = render(build_table(load_results(toy_study), "ablation"), "markdown")
    md_cells = [c.strip().strip("*") for ln in md.splitlines()[4:] if ln.startswith("| ") for c in ln[2:-2].split("|")]
    assert ablation_cells == md_cells
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "report.pdf").read_bytes()[:5] == b"%PDF-"


def test_study_report_pdf_prints_the_page(synthetic, tmp_path, capsys):
    _browser_or_skip()
    out = tmp_path / "r.html"
    assert main(["report", str(synthetic), "--out", str(out), "--pdf"]) == 0
    assert out.is_file() and out.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
