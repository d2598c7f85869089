"""Tables of study.results.builders on the synthetic study of tests/analysis_fixture.py (no Ray, no GPU)."""

from __future__ import annotations

import io
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from study.cli import main
from study.results import builders as analysis
from study.results.builders import build_table, significance, table_command
from study.results.loading import load_results
from study.results.tables import latex_escape, render
from study.testing.analysis_fixture import TEST, make_study
from study.testing.studyrun import TOY_STAGE2, TOY_VARIANT, toy_budgets

CONTEXT = "toy-lt (imbalance factor 10, 6 classes), backbone toy_cnn, mean ± std over 3 seeds (0, 1, 2)"
PROTOCOL = (
    "Hyperparameters and epochs were selected on a validation split carved from the training data "
    "(protocol honest); the test set was evaluated once per selected configuration."
)
FAILURES = "Failures: 1 trial diverged in stage 1; 1 trial failed in stage 2."

MAIN_MD = f"""\
Test accuracy (%) on {CONTEXT}; best per column in bold. Stage-1 rows are each variant's jointly trained \
classifier; stage-2 methods adjust or re-train the classifier of the stage-1 model CE + tuned WD. {PROTOCOL} \
Selected hyperparameters: CE + tuned WD: weight_decay = 0.001; τ-norm: τ = 1/1.2/1.1 (seeds 0/1/2); \
CB + WD + MaxNorm (WB): weight_decay = 0.05, maxnorm_threshold = 0.3.

| Stage | Variant       | Method                 | Many             | Medium           | Few              | All              |
| :---- | :------------ | :--------------------- | ---------------: | ---------------: | ---------------: | ---------------: |
| 1     | CE without WD | Stage-1 classifier     | 91.00 ± 1.00     | 50.00 ± 2.00     | 12.00 ± 2.00     | 51.00 ± 1.00     |
| 1     | CE + tuned WD | Stage-1 classifier     | **92.00 ± 1.00** | 56.00 ± 1.00     | 22.00 ± 2.00     | 57.00 ± 1.00     |
| 2     | CE + tuned WD | Stage-1 classifier     | **92.00 ± 1.00** | 56.00 ± 1.00     | 22.00 ± 2.00     | 57.00 ± 1.00     |
| 2     | CE + tuned WD | τ-norm                 | 88.00 ± 1.00     | 61.33 ± 1.53     | 32.00 ± 2.00     | 61.00 ± 1.00     |
| 2     | CE + tuned WD | CB + WD + MaxNorm (WB) | **92.00 ± 0.50** | **65.00 ± 1.00** | **37.00 ± 1.00** | **64.83 ± 0.76** |

{FAILURES}
"""

MAIN_CSV = """\
stage,variant,method,label,n_seeds,many_mean,many_std,medium_mean,medium_std,few_mean,few_std,all_mean,all_std
stage1,naive,naive,Stage-1 classifier,3,91,1,50,2,12,2,51,1
stage1,tuned,tuned,Stage-1 classifier,3,92,1,56,1,22,2,57,1
stage2,tuned,none,Stage-1 classifier,3,92,1,56,1,22,2,57,1
stage2,tuned,tau-norm,τ-norm,3,88,1,61.333333,1.5275252,32,2,61,1
stage2,tuned,wb,CB + WD + MaxNorm (WB),3,92,0.5,65,1,37,1,64.833333,0.76376262
"""

SEARCH_CSV = """\
stage,variant,method,label,rank,trial,status,selected,objective,param.weight_decay,param.maxnorm_threshold
stage1,tuned,tuned,Stage-1 classifier,1,2,completed,yes,57,0.001,
stage1,tuned,tuned,Stage-1 classifier,2,1,completed,,55,0.0001,
stage1,tuned,tuned,Stage-1 classifier,3,4,completed,,53,3e-05,
stage2,tuned,wb,CB + WD + MaxNorm (WB),1,3,completed,yes,66,0.05,0.3
stage2,tuned,wb,CB + WD + MaxNorm (WB),2,5,completed,,64,0.02,0.2
stage2,tuned,wb,CB + WD + MaxNorm (WB),3,2,completed,,62,0.01,0.1
stage2,tuned,wb,CB + WD + MaxNorm (WB),4,6,completed,,58,0.3,0.9
"""


@pytest.fixture
def study(tmp_path: Path) -> Path:
    return make_study(tmp_path / "toy-lt")


def table(root: Path, kind: str, fmt: str = "markdown") -> str:
    return render(build_table(load_results(root), kind), fmt)


def md_grid(md: str) -> tuple[list[str], list[list[str]]]:
    """The header cells and the body rows (cells stripped) of the Markdown table in ``md``; checks the
    rule line under the header (one ``---`` cell per column, aligned left or right)."""
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    grid = [[c.strip() for c in ln[2:-2].split(" | ")] for ln in lines]
    header, rule, body = grid[0], grid[1], grid[2:]
    assert len(rule) == len(header) and all(re.fullmatch(r":-+|-+:", c) for c in rule), lines[1]
    assert all(len(r) == len(header) for r in body)
    return header, body


def latex_rows(tex: str) -> tuple[list[str], list[list[str]]]:
    """The header cells and body rows of a booktabs tabular: the header between \\toprule and the
    first \\midrule, the body between that and \\bottomrule (rules between groups skipped)."""
    lines = [ln.strip() for ln in tex.splitlines()]
    top, mid, bottom = lines.index(r"\toprule"), lines.index(r"\midrule"), lines.index(r"\bottomrule")
    assert mid == top + 2 and lines[bottom + 1] == r"\end{tabular}"

    def cells(ln: str) -> list[str]:
        assert ln.endswith(r" \\"), ln
        return ln[: -len(r" \\")].split(" & ")

    return cells(lines[top + 1]), [cells(ln) for ln in lines[mid + 1 : bottom] if ln != r"\midrule"]


def csv_frame(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=[""])


def hand_significance(wb: list[float], other: list[float], head: str, group: str = "All") -> str:
    """A significance sentence computed independently from the fixture's numbers."""
    a, b = np.array(wb) * 100, np.array(other) * 100
    t, p = stats.ttest_rel(a, b)
    d = a - b
    n = len(d)
    half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return (
        f"{head}: mean difference in {group} {d.mean():+.2f} points, 95% CI [{d.mean() - half:+.2f}, "
        f"{d.mean() + half:+.2f}] over {n} paired seeds; paired t-test t({n - 1}) = {t:.2f}, p = {p:.3g}."
    )


# --- exact outputs -----------------------------------------------------------------------------------------


def test_main_markdown_exact(study, capsys):
    assert table_command(study, kind="main", fmt="markdown") == 0
    assert capsys.readouterr().out == MAIN_MD


def test_main_csv_exact(study, capsys):
    assert table_command(study, kind="main", fmt="csv") == 0
    out = capsys.readouterr()
    assert out.out == MAIN_CSV
    assert out.err.strip() == FAILURES  # CSV has no caption: notes go to stderr


def test_ablation_markdown_and_significance(study):
    md = table(study, "ablation")
    expected = hand_significance(
        TEST[("stage2", "wb")]["all"],
        TEST[("stage2", "tau-norm")]["all"],
        "Significance: WB vs τ-norm (the best other stage-2 method by mean test All)",
    )
    assert expected == (
        "Significance: WB vs τ-norm (the best other stage-2 method by mean test All): mean "
        "difference in All +3.83 points, 95% CI [+1.94, +5.73] over 3 paired seeds; paired t-test "
        "t(2) = 8.69, p = 0.013."
    )
    # what stage 2 adds in the tail: WB's Few against the stage-1 classifier's (.36/.38/.37 vs .20/.22/.24)
    few = hand_significance(
        TEST[("stage2", "wb")]["few"], TEST[("stage2", "none")]["few"], "WB vs the stage-1 classifier", "Few"
    )
    assert few.startswith("WB vs the stage-1 classifier: mean difference in Few +15.00 points")
    caption, _, rest = md.partition("\n\n")
    assert caption.endswith(PROTOCOL + " " + expected + " " + few)
    lines = rest.splitlines()
    assert lines[0] == (
        "| Variant       | Method                 | Many             | Medium           | Few          "
        "    | All              | Max/min norm | Norm CV       | Spearman ρ    |"
    )
    assert [ln.split("|")[2].strip() for ln in lines[2:5]] == ["Stage-1 classifier", "τ-norm", "CB + WD + MaxNorm (WB)"]
    assert all(ln.split("|")[1].strip() == "CE + tuned WD" for ln in lines[2:5])
    assert lines[4].startswith(
        "| CE + tuned WD | CB + WD + MaxNorm (WB) | **92.00 ± 0.50** | **65.00 ± 1.00** | "
        "**37.00 ± 1.00** | **64.83 ± 0.76** | 1.02 ± 0.01  |"
    )
    assert md.rstrip().endswith(FAILURES)


def test_search_csv_exact_and_importances(tmp_path):
    root = make_study(tmp_path / "s", optuna_db=True)
    assert table(root, "search", "csv") == SEARCH_CSV
    notes = build_table(load_results(root), "search").notes
    assert "Parameter importances of stage1/tuned: not computed, 3 completed trials (needs at least 4)." in notes
    wb = [n for n in notes if n.startswith("Parameter importances of stage2/wb (fANOVA, 4 completed trials): ")]
    assert len(wb) == 1
    values = dict(re.findall(r"(\w+) ([0-9]+\.[0-9]+)", wb[0].split(": ", 1)[1]))
    assert set(values) == {"weight_decay", "maxnorm_threshold"}
    assert sum(map(float, values.values())) == pytest.approx(1.0, abs=0.011)


def test_search_without_optuna_db(study):
    md = table(study, "search")
    assert "Parameter importances: optuna.db not written yet." in md
    _, body = md_grid(md)
    assert ["2", "CE + tuned WD", "CB + WD + MaxNorm (WB)", "1", "3", "completed", "yes", "66.00", "0.05"] in [
        r[:9] for r in body
    ]


# --- the numbers are those of trials.csv ------------------------------------------------------------------------


def _selected(study: Path) -> pd.DataFrame:
    df = pd.read_csv(study / "trials.csv")
    return df[df["selected"]]


@pytest.mark.parametrize("kind", ["main", "ablation"])
def test_numbers_match_trials_csv(study, kind):
    got = pd.read_csv(io.StringIO(table(study, kind, "csv"))).set_index(["stage", "method"])
    sel = _selected(study)
    keys = [f"test_{g}" for g in ("many", "medium", "few", "all")]
    norms = ["norm_ratio", "norm_cv", "norm_spearman"] if kind == "ablation" else []
    for (stage, method), g in sel.groupby(["stage", "method"]):
        if kind == "ablation" and stage == "stage1":
            assert (stage, method) not in got.index
            continue
        row = got.loc[(stage, method)]
        assert row["n_seeds"] == len(g)
        for col in keys + norms:
            scale = 100 if col.startswith("test_") else 1
            name = col.removeprefix("test_")
            assert row[f"{name}_mean"] == pytest.approx(g[col].mean() * scale, rel=1e-6)
            assert row[f"{name}_std"] == pytest.approx(g[col].std(ddof=1) * scale, rel=1e-6, abs=1e-9)


def test_seeds_table_rows_match_trials_csv(study):
    got = pd.read_csv(io.StringIO(table(study, "seeds", "csv")))
    sel = _selected(study).sort_values(["stage", "method", "seed"])
    assert len(got) == len(sel) == 15
    merged = got.merge(sel, on=["stage", "method", "seed"], suffixes=("", "_csv"))
    for g in ("many", "medium", "few", "all"):
        np.testing.assert_allclose(merged[f"test_{g}"], merged[f"test_{g}_csv"] * 100, rtol=1e-6)
    md = table(study, "seeds")
    _, body = md_grid(md)
    assert ["2", "CE + tuned WD", "CB + WD + MaxNorm (WB)", "1", "3", "92.50", "66.00", "38.00", "65.50"] in [
        r[:9] for r in body
    ]


# --- LaTeX ----------------------------------------------------------------------------------------------------


def test_latex_escape():
    assert latex_escape("a_b%c&d#e$f{g}") == r"a\_b\%c\&d\#e\$f\{g\}"
    assert latex_escape("1.00 ± 0.50, τ, ρ") == r"1.00 $\pm$ 0.50, $\tau$, $\rho$"


def _unescaped(text: str, ch: str) -> int:
    return len(re.findall(r"(?<!\\)" + re.escape(ch), text))


@pytest.mark.parametrize("kind", analysis.KINDS)
def test_latex_structure(study, kind):
    tex = table(study, kind, "latex")
    lines = tex.splitlines()
    assert lines[0] == r"\begin{table}[htbp]" and lines[-1] == r"\end{table}"
    for cmd in (r"\caption{", r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{", r"\end{tabular}"):
        assert cmd in tex
    assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule")
    assert all(ord(c) < 128 for c in tex), "non-ASCII characters must be escaped"
    body = tex.replace(r"\{", "").replace(r"\}", "")
    depth = 0
    for c in body:
        depth += {"{": 1, "}": -1}.get(c, 0)
        assert depth >= 0
    assert depth == 0
    ncols = len(re.search(r"\\begin\{tabular\}\{([lcr]+)\}", tex).group(1))
    rows = [ln for ln in lines if ln.rstrip().endswith(r"\\")]
    assert rows and all(_unescaped(r, "&") == ncols - 1 for r in rows)
    for ln in lines:
        assert _unescaped(ln, "$") % 2 == 0
        assert _unescaped(ln, "_") == 0 and _unescaped(ln, "%") == 0 and _unescaped(ln, "#") == 0
    assert r"toy\_cnn" in tex and (r"\%)" in tex or kind == "analysis")  # the analysis has no accuracies


def test_latex_main_bold_and_pm(study):
    tex = table(study, "main", "latex")
    assert (
        r"    2 & CE + tuned WD & CB + WD + MaxNorm (WB) & \textbf{92.00 $\pm$ 0.50} & \textbf{65.00 $\pm$ 1.00} & "
        r"\textbf{37.00 $\pm$ 1.00} & \textbf{64.83 $\pm$ 0.76} \\"
    ) in tex
    assert r"$\tau$-norm" in tex
    assert tex.count(r"\midrule") == 2  # after the header and between stage 1 and stage 2


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_latex_compiles(study, tmp_path):
    for kind in analysis.KINDS:
        (tmp_path / f"{kind}.tex").write_text(table(study, kind, "latex"))
    (tmp_path / "doc.tex").write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
        + "".join(f"\\input{{{k}.tex}}\n" for k in analysis.KINDS)
        + "\\end{document}\n"
    )
    r = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout[-2000:]


# --- unfinished, odd and wrong folders ----------------------------------------------------------------------


def test_interrupted_study_prints_what_it_has(tmp_path, capsys):
    root = make_study(tmp_path / "int", interrupted=True)
    assert table_command(root, kind="main") == 0
    out = capsys.readouterr().out
    _, body = md_grid(out)
    assert ["2", "CE + tuned WD", "CB + WD + MaxNorm (WB)", "–", "–", "–", "–"] in body
    assert ["2", "CE + tuned WD", "LWS", "–", "–", "–", "–"] in body
    # without WB's test numbers the best Many is the stage-1 model's
    assert ["1", "CE + tuned WD", "Stage-1 classifier", "**92.00 ± 1.00**", "56.00 ± 1.00"] in [r[:5] for r in body]
    assert out.rstrip().endswith(
        "Missing: study not finished (no done.json); final test evaluation of stage2/wb; "
        "stage2/lws has no completed trial (0 of 2 finished)."
    )
    abl = table(root, "ablation")
    assert "Significance: wb has no test results yet, so no test was made." in abl
    assert table_command(root, kind="ablation", fmt="csv") == 0
    out = capsys.readouterr()
    assert "Missing: " in out.err and "Missing" not in out.out
    assert out.out.splitlines()[-1].startswith("stage2,tuned,lws,LWS,0,,")


def test_without_trials_csv_rebuilds_from_trial_folders(tmp_path):
    with_csv = make_study(tmp_path / "a")
    without = make_study(tmp_path / "b", trials_csv=False)
    assert not (without / "trials.csv").exists()
    note = "No trials.csv yet: rows rebuilt from the trial folders."
    res_a, res_b = load_results(with_csv), load_results(without)
    for kind in ("main", "ablation", "seeds"):
        a, b = build_table(res_a, kind), build_table(res_b, kind)
        assert note in b.notes
        assert render(b, "markdown").replace(f"\n{note}\n", "") == render(a, "markdown")
        assert render(b, "csv") == render(a, "csv")


EMPTY_MISSING = (
    "Missing: study not finished (no done.json); stage1/naive has no trials; stage1/tuned has no "
    "trials; stage2/none has no trials; stage2/tau-norm has no trials; stage2/wb has no trials."
)
REBUILT = "No trials.csv yet: rows rebuilt from the trial folders."
# (Markdown/LaTeX titles, CSV header) per kind, for the fixture's study.yaml
EMPTY_COLUMNS = {
    "main": (
        ["Stage", "Variant", "Method", "Many", "Medium", "Few", "All"],
        "stage,variant,method,label,n_seeds,many_mean,many_std,medium_mean,medium_std,few_mean,few_std,"
        "all_mean,all_std",
    ),
    "ablation": (
        ["Variant", "Method", "Many", "Medium", "Few", "All", "Max/min norm", "Norm CV", "Spearman ρ"],
        "stage,variant,method,label,n_seeds,many_mean,many_std,medium_mean,medium_std,few_mean,few_std,"
        "all_mean,all_std,norm_ratio_mean,norm_ratio_std,norm_cv_mean,norm_cv_std,norm_spearman_mean,"
        "norm_spearman_std",
    ),
    "seeds": (
        [
            "Stage",
            "Variant",
            "Method",
            "Seed",
            "Trial",
            "Many",
            "Medium",
            "Few",
            "All",
            "Sel. All",
            "Best epoch",
            "Max/min norm",
            "Norm CV",
            "Spearman ρ",
        ],
        "stage,variant,method,label,seed,trial,test_many,test_medium,test_few,test_all,sel_all,best_epoch,"
        "norm_ratio,norm_cv,norm_spearman",
    ),
    "search": (
        [
            "Stage",
            "Variant",
            "Method",
            "Rank",
            "Trial",
            "Status",
            "Selected",
            "Objective",
            "weight_decay",
            "maxnorm_threshold",
        ],
        "stage,variant,method,label,rank,trial,status,selected,objective,param.weight_decay,param.maxnorm_threshold",
    ),
}


@pytest.mark.parametrize("kind", list(EMPTY_COLUMNS))
def test_study_without_any_trial(tmp_path, kind):
    """A study.yaml and nothing else: main and ablation list every planned method with empty cells
    (– / -- / empty CSV fields, 0 seeds), the per-seed and search tables have a header and no row,
    and every format says why (notes under the Markdown table and in the LaTeX caption)."""
    root = make_study(tmp_path / "full")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(root / "study.yaml", empty / "study.yaml")
    t = build_table(load_results(empty), kind)
    assert t.notes[:2] == [REBUILT, EMPTY_MISSING]
    titles, csv_header = EMPTY_COLUMNS[kind]
    tuned = "CE + tuned WD"
    planned = {
        "main": [
            ("1", "CE without WD", "Stage-1 classifier"),
            ("1", tuned, "Stage-1 classifier"),
            ("2", tuned, "Stage-1 classifier"),
            ("2", tuned, "τ-norm"),
            ("2", tuned, "CB + WD + MaxNorm (WB)"),
        ],
        "ablation": [(tuned, "Stage-1 classifier"), (tuned, "τ-norm"), (tuned, "CB + WD + MaxNorm (WB)")],
    }.get(kind, [])

    md = render(t, "markdown")
    header, body = md_grid(md)
    assert header == titles
    assert [tuple(r[: len(p)]) for r, p in zip(body, planned)] == planned and len(body) == len(planned)
    assert all(set(r[len(p) :]) == {"–"} for r, p in zip(body, planned))
    assert md.rstrip().split("\n\n")[-len(t.notes) :] == t.notes  # the notes follow the table

    tex = render(t, "latex")
    head, rows = latex_rows(tex)
    assert head == [latex_escape(x) for x in titles]
    assert [r[: len(p)] for r, p in zip(rows, planned)] == [[latex_escape(x) for x in p] for p in planned]
    assert len(rows) == len(planned) and all(set(r[len(p) :]) == {"--"} for r, p in zip(rows, planned))
    assert latex_escape(EMPTY_MISSING) in tex.split(r"\caption{", 1)[1].split("\n", 1)[0]
    assert tex.count(r"\midrule") == (2 if kind == "main" else 1)  # main: also between stage 1 and stage 2

    text = render(t, "csv")
    assert text.splitlines()[0] == csv_header
    df = csv_frame(text)
    assert len(df) == len(planned)
    if planned:
        assert list(df["label"]) == [p[-1] for p in planned] and set(df["n_seeds"]) == {0}
        assert df.drop(columns=["stage", "variant", "method", "label", "n_seeds"]).isna().all().all()


def test_fewer_than_three_seeds(tmp_path):
    root = make_study(tmp_path / "two", seeds=(0, 1))
    assert significance(load_results(root)) == (
        "Significance: WB vs τ-norm (the best other stage-2 method by mean test All): only 2 paired seeds; a paired "
        "t-test needs at least 3, so none was computed. WB vs the stage-1 classifier: only 2 paired seeds; a paired "
        "t-test needs at least 3, so none was computed."
    )
    assert "mean ± std over 2 seeds (0, 1)" in table(root, "main")


def test_one_seed_shows_no_spread(tmp_path):
    """With one seed there is no standard deviation: cells hold the value alone (no "± 0.00") and
    the caption does not promise a spread, in every rendering that shows one."""
    root = make_study(tmp_path / "one", seeds=(0,))
    for kind in ("main", "ablation"):
        md = table(root, kind)
        assert "±" not in md and "1 seed (0)" in md, md
    tex = table(root, "main", "latex")
    assert r"\pm" not in tex


def test_no_wb(study):
    """A study that never planned wb (removed from study.yaml and trials.csv on disk)."""
    head = yaml.safe_load((study / "study.yaml").read_text())
    for exp in head["experiments"]:
        exp["methods"].pop("wb", None)
    head["space"]["stage2"].pop("wb", None)
    (study / "study.yaml").write_text(yaml.safe_dump(head, sort_keys=False, allow_unicode=True))
    lines = (study / "trials.csv").read_text().splitlines(keepends=True)
    method = lines[0].split(",").index("method")
    (study / "trials.csv").write_text("".join([lines[0]] + [ln for ln in lines[1:] if ln.split(",")[method] != "wb"]))
    res = load_results(study)
    assert "wb" not in set(res.trials["method"])
    assert significance(res) == "Significance: no wb (CB + WD + MaxNorm) method, so no test was made."
    assert [r[1] for r in md_grid(table(study, "ablation"))[1]] == ["Stage-1 classifier", "τ-norm"]


def test_wb_parity_caption(tmp_path):
    root = make_study(tmp_path / "par", protocol="wb-parity")
    md = table(root, "main")
    assert (
        "Hyperparameters and epochs were selected on the test set, as in the reference code (protocol "
        "wb-parity, no validation split), so test accuracies are optimistic."
    ) in md
    assert "test-split All accuracy" in table(root, "search")


@pytest.mark.parametrize("argv", [["table", "{d}"], ["table", "{d}/nope", "--kind", "ablation"], ["plot", "{d}"]])
def test_not_a_study_exits_2_with_one_line(tmp_path, capsys, argv):
    (tmp_path / "x.txt").write_text("not a study")
    assert main([a.format(d=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert "study" in err


def test_unknown_kind_is_a_user_error(study):
    with pytest.raises(analysis.UserError, match="unknown table kind"):
        table_command(study, kind="nope")


def test_out_file(study, tmp_path, capsys):
    out = tmp_path / "t" / "main.tex"
    assert main(["table", str(study), "--format", "latex", "--out", str(out)]) == 0
    assert out.read_text() == table(study, "main", "latex")
    assert capsys.readouterr().out.strip() == f"wrote {out}"


def test_write_all_tables(study):
    written = analysis.write_all_tables(study)
    assert sorted(p.name for p in written) == sorted(f"{k}.{e}" for k in analysis.KINDS for e in ("md", "tex", "csv"))
    assert all(p.parent == study / "tables" for p in written)
    assert (study / "tables" / "main.md").read_text() == MAIN_MD
    assert (study / "tables" / "main.csv").read_text() == MAIN_CSV
    res = load_results(study)
    for kind in analysis.KINDS:  # every file is its table rendered in its format
        t = build_table(res, kind)
        for fmt, ext in (("markdown", "md"), ("latex", "tex"), ("csv", "csv")):
            assert (study / "tables" / f"{kind}.{ext}").read_text() == render(t, fmt), (kind, fmt)


GROUP_TITLES = {"many": "Many", "medium": "Medium", "few": "Few", "all": "All"}


def _shown(values) -> tuple[str, float]:
    """A stat cell as the tables show it (mean ± std at 2 decimals) and its displayed mean."""
    m, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    return f"{m:.2f} ± {sd:.2f}", round(m, 2)


def test_sample_study(toy_study, tmp_path):
    """Every table of a real finished study (conftest's ``toy_study``: Ray Tune + Optuna, 2 seeds),
    copied without its checkpoints and Ray Tune state, in every format, against trials.csv."""
    root = tmp_path / "sample"
    shutil.copytree(toy_study, root, ignore=shutil.ignore_patterns("*.pt", "tune"))
    res = load_results(root)
    trials = pd.read_csv(root / "trials.csv")
    # the tables' `stage` column names the experiment: stage1, or stage2-<variant> for stage 2
    trials["stage"] = trials["experiment"]
    sel = trials[trials["selected"]]
    seeds = sorted(trials["seed"].unique())
    assert seeds == [0, 1]
    methods = list(dict.fromkeys(zip(sel["stage"], sel["method"])))  # every selected experiment/method
    assert set(methods) == set(toy_budgets())

    # main and ablation: a row per method, mean ± std over the seeds of its selected configuration
    for kind in ("main", "ablation"):
        t = build_table(res, kind)
        df = csv_frame(render(t, "csv"))
        keys = list(zip(df["stage"], df["method"]))
        assert sorted(keys) == sorted(m for m in methods if kind == "main" or m[0] == TOY_STAGE2)
        header, body = md_grid(render(t, "markdown"))
        _, tex_rows = latex_rows(render(t, "latex"))
        assert len(body) == len(tex_rows) == len(df)
        label_col = header.index("Method")
        assert [r[label_col] for r in body] == list(df["label"])
        assert [r[label_col] for r in tex_rows] == [latex_escape(x) for x in df["label"]]
        if kind == "main":
            assert [r[header.index("Stage")] for r in body] == ["1" if k[0] == "stage1" else "2" for k in keys]
            tex_lines = [ln.strip() for ln in render(t, "latex").splitlines()]
            n1 = sum(k[0] == "stage1" for k in keys)  # a rule under the header and between the stages
            assert [i for i, ln in enumerate(tex_lines) if ln == r"\midrule"] == [
                tex_lines.index(r"\toprule") + 2,
                tex_lines.index(r"\toprule") + 3 + n1,
            ]
        for g, title in GROUP_TITLES.items():
            shown = [_shown(sel[(sel["stage"] == st) & (sel["method"] == m)][f"test_{g}"] * 100) for st, m in keys]
            best = max(d for _, d in shown)
            col = header.index(title)
            for (text, displayed), row, tex_row, (_, c) in zip(shown, body, tex_rows, df.iterrows()):
                assert row[col] == (f"**{text}**" if displayed == best else text)
                assert tex_row[col] == (
                    rf"\textbf{{{latex_escape(text)}}}" if displayed == best else latex_escape(text)
                )
                assert c["n_seeds"] == 2
                assert f"{c[f'{g}_mean']:.2f} ± {c[f'{g}_std']:.2f}" == text
        if kind == "ablation":
            for st, m in keys:
                g = sel[(sel["stage"] == st) & (sel["method"] == m)]
                row = df[(df["stage"] == st) & (df["method"] == m)].iloc[0]
                for col in ("norm_ratio", "norm_cv", "norm_spearman"):
                    assert row[f"{col}_mean"] == pytest.approx(g[col].mean(), rel=1e-6)
            # two seeds: too few for the paired t-test, and the caption says so
            # WB against the best other method by mean test All (computed from trials.csv; any of a tie)
            means = {
                lab: sel[(sel["stage"] == st) & (sel["method"] == m)]["test_all"].mean()
                for (st, m), lab in zip(keys, df["label"])
                if m != "wb"
            }
            best_others = [lab for lab, v in means.items() if v >= max(means.values()) - 1e-12]
            assert any(
                t.caption.endswith(
                    f"Significance: WB vs {lab} (the best other stage-2 method by mean test "
                    "All): only 2 paired seeds; a paired t-test needs at least 3, so none was "
                    "computed."
                )
                for lab in best_others
            ), t.caption

    # seeds: one row per method and seed, the selected trial's numbers in %
    t = build_table(res, "seeds")
    df = csv_frame(render(t, "csv"))
    assert sorted(zip(df["stage"], df["method"], df["seed"])) == sorted(zip(sel["stage"], sel["method"], sel["seed"]))
    merged = df.merge(sel, on=["stage", "method", "seed"], suffixes=("", "_csv"))
    assert len(merged) == len(df) == len(methods) * 2
    for g in GROUP_TITLES:
        np.testing.assert_allclose(merged[f"test_{g}"], merged[f"test_{g}_csv"] * 100, rtol=1e-6)
    np.testing.assert_allclose(merged["sel_all"], merged["sel_all_csv"] * 100, rtol=1e-6)
    assert list(merged["trial"]) == list(merged["trial_csv"]) and list(merged["best_epoch"]) == list(
        merged["best_epoch_csv"]
    )
    _, body = md_grid(render(t, "markdown"))
    assert len(body) == len(latex_rows(render(t, "latex"))[1]) == len(df)

    # search: the searched methods' trials by objective, the selected one marked
    t = build_table(res, "search")
    df = csv_frame(render(t, "csv"))
    per_trial = trials.drop_duplicates(["stage", "method", "trial"])
    for (st, m), n in (("stage1", TOY_VARIANT), 2), ((TOY_STAGE2, "wb"), 2):
        mine = per_trial[(per_trial["stage"] == st) & (per_trial["method"] == m)].sort_values(
            ["objective", "trial"], ascending=[False, True]
        )
        got = df[(df["stage"] == st) & (df["method"] == m)]
        assert list(got["rank"]) == list(range(1, n + 1)) and list(got["trial"]) == list(mine["trial"])
        np.testing.assert_allclose(got["objective"], mine["objective"] * 100, rtol=1e-6)
        assert list(got["selected"].fillna("")) == ["yes" if s else "" for s in mine["selected"]]
        np.testing.assert_allclose(got["param.weight_decay"], mine["param.weight_decay"], rtol=1e-6)
    assert set(zip(df["stage"], df["method"])) == {("stage1", TOY_VARIANT), (TOY_STAGE2, "wb")}
    assert any(n.startswith(f"Parameter importances of stage1/{TOY_VARIANT}") for n in t.notes)
    _, body = md_grid(render(t, "markdown"))
    assert len(body) == len(latex_rows(render(t, "latex"))[1]) == len(df) == 4


def test_hyperparameter_formatting():
    """Captions, status and progress share one formatter: whole numbers stay whole (epochs 1000,
    not 1e+03), real values keep three significant digits, anything else is text."""
    import numpy as np

    from study.results.records import fmt_params, fmt_value

    assert [fmt_value(v) for v in (1000, 1000.0, np.int64(128), 0.0)] == ["1000", "1000", "128", "0"]
    assert [fmt_value(v) for v in (1e-5, 0.000178, np.float64(0.04432), 2.5)] == ["1e-05", "0.000178", "0.0443", "2.5"]
    assert [fmt_value(v) for v in (True, "relu", None)] == ["True", "relu", "None"]
    assert fmt_params({"weight_decay": 5e-4, "epochs": 200}) == "weight_decay=0.0005, epochs=200"


def test_compare_gives_the_paired_difference_with_its_interval(tmp_path, capsys):
    """`study compare A B`: A's test accuracy minus B's per (variant, method), paired over seeds."""
    a, b = make_study(tmp_path / "a", name="on-test"), make_study(tmp_path / "b")
    df = pd.read_csv(a / "trials.csv")
    shift = {0: 0.01, 1: 0.02, 2: 0.03}  # +1, +2, +3 points on wb's three seeds
    wb = df["method"] == "wb"
    df.loc[wb, "test_all"] += df.loc[wb, "seed"].map(shift)
    df.to_csv(a / "trials.csv", index=False)
    assert main(["compare", str(a), str(b), "--format", "csv"]) == 0
    got = csv_frame(capsys.readouterr().out).set_index(["stage", "method"])
    assert got.loc[("stage2", "wb"), "d_all"] == pytest.approx(2.0)
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # the differences 1, 2, 3 have std 1
    assert got.loc[("stage2", "wb"), "ci_all"] == f"[{2 - half:+.2f}, {2 + half:+.2f}]"
    assert got.loc[("stage2", "wb"), "d_few"] == pytest.approx(0.0) and got.loc[("stage2", "wb"), "ci_few"] == "–"
    assert (got.drop(index=[("stage2", "wb")])["d_all"].abs() < 1e-9).all()
    assert set(got["n"]) == {3}
