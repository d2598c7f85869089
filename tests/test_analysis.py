"""Tables of study.analysis on the synthetic study of tests/analysis_fixture.py (no Ray, no GPU)."""

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
from scipy import stats

from study import analysis
from study.analysis import build_table, latex_escape, load_results, render, significance, table_command
from study.cli import main

from analysis_fixture import TEST, make_study

CONTEXT = ("toy-lt (imbalance factor 10, 6 classes), backbone toy_cnn, mean ± std over 3 seeds (0, 1, 2)")
PROTOCOL = ("Hyperparameters and epochs were selected on a validation split carved from the training data "
            "(protocol honest); the test set was evaluated once per selected configuration.")
FAILURES = "Failures: 1 trial diverged in stage 1; 1 trial failed in stage 2."

MAIN_MD = f"""\
Test accuracy (%) on {CONTEXT}; best per column in bold. Stage-2 methods adjust or re-train the classifier \
of the stage-1 CE + tuned WD model. {PROTOCOL} Selected hyperparameters: CE + tuned WD: weight_decay = 0.001; \
τ-norm: τ = 1/1.2/1.1 (seeds 0/1/2); CB + WD + MaxNorm (WB): weight_decay = 0.05, maxnorm_threshold = 0.3.

| Stage | Method                 | Many             | Medium           | Few              | All              |
| :---- | :--------------------- | ---------------: | ---------------: | ---------------: | ---------------: |
| 1     | CE without WD          | 91.00 ± 1.00     | 50.00 ± 2.00     | 12.00 ± 2.00     | 51.00 ± 1.00     |
| 1     | CE + tuned WD          | **92.00 ± 1.00** | 56.00 ± 1.00     | 22.00 ± 2.00     | 57.00 ± 1.00     |
| 2     | Stage-1 classifier     | **92.00 ± 1.00** | 56.00 ± 1.00     | 22.00 ± 2.00     | 57.00 ± 1.00     |
| 2     | τ-norm                 | 88.00 ± 1.00     | 61.33 ± 1.53     | 32.00 ± 2.00     | 61.00 ± 1.00     |
| 2     | CB + WD + MaxNorm (WB) | **92.00 ± 0.50** | **65.00 ± 1.00** | **37.00 ± 1.00** | **64.83 ± 0.76** |

{FAILURES}
"""

MAIN_CSV = """\
stage,method,label,n_seeds,many_mean,many_std,medium_mean,medium_std,few_mean,few_std,all_mean,all_std
stage1,naive,CE without WD,3,91,1,50,2,12,2,51,1
stage1,tuned,CE + tuned WD,3,92,1,56,1,22,2,57,1
stage2,none,Stage-1 classifier,3,92,1,56,1,22,2,57,1
stage2,tau-norm,τ-norm,3,88,1,61.333333,1.5275252,32,2,61,1
stage2,wb,CB + WD + MaxNorm (WB),3,92,0.5,65,1,37,1,64.833333,0.76376262
"""

SEARCH_CSV = """\
stage,method,label,rank,trial,status,selected,objective,param.weight_decay,param.maxnorm_threshold
stage1,tuned,CE + tuned WD,1,2,completed,yes,57,0.001,
stage1,tuned,CE + tuned WD,2,1,completed,,55,0.0001,
stage1,tuned,CE + tuned WD,3,4,completed,,53,3e-05,
stage2,wb,CB + WD + MaxNorm (WB),1,3,completed,yes,66,0.05,0.3
stage2,wb,CB + WD + MaxNorm (WB),2,5,completed,,64,0.02,0.2
stage2,wb,CB + WD + MaxNorm (WB),3,2,completed,,62,0.01,0.1
stage2,wb,CB + WD + MaxNorm (WB),4,6,completed,,58,0.3,0.9
"""


@pytest.fixture
def study(tmp_path: Path) -> Path:
    return make_study(tmp_path / "toy-lt")


def table(root: Path, kind: str, fmt: str = "markdown") -> str:
    return render(build_table(load_results(root), kind), fmt)


def hand_significance(wb: list[float], other: list[float], name: str) -> str:
    """The significance sentence computed independently from the fixture's numbers."""
    a, b = np.array(wb) * 100, np.array(other) * 100
    t, p = stats.ttest_rel(a, b)
    d = a - b
    n = len(d)
    half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return (f"Significance: WB vs {name} (the best other stage-2 method by mean test All): mean difference in "
            f"All {d.mean():+.2f} points, 95% CI [{d.mean() - half:+.2f}, {d.mean() + half:+.2f}] over {n} paired "
            f"seeds; paired t-test t({n - 1}) = {t:.2f}, p = {p:.3g}.")


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
    expected = hand_significance(TEST[("stage2", "wb")]["all"], TEST[("stage2", "tau-norm")]["all"], "τ-norm")
    assert expected == ("Significance: WB vs τ-norm (the best other stage-2 method by mean test All): mean "
                        "difference in All +3.83 points, 95% CI [+1.94, +5.73] over 3 paired seeds; paired t-test "
                        "t(2) = 8.69, p = 0.013.")
    caption, _, rest = md.partition("\n\n")
    assert caption.endswith(PROTOCOL + " " + expected)
    lines = rest.splitlines()
    assert lines[0] == ("| Method                 | Many             | Medium           | Few              | "
                        "All              | Max/min norm | Norm CV       | Spearman ρ    |")
    assert [ln.split("|")[1].strip() for ln in lines[2:5]] == ["Stage-1 classifier", "τ-norm",
                                                                "CB + WD + MaxNorm (WB)"]
    assert lines[4].startswith("| CB + WD + MaxNorm (WB) | **92.00 ± 0.50** | **65.00 ± 1.00** | **37.00 ± 1.00** | "
                               "**64.83 ± 0.76** | 1.02 ± 0.01  |")
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
    assert "| 2     | CB + WD + MaxNorm (WB) | 1    | 3     | completed | yes      | 66.00     | 0.05" in md


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
    assert "| 2     | CB + WD + MaxNorm (WB) | 1    | 3     | 92.50 | 66.00  | 38.00 | 65.50 |" in md


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
    assert r"toy\_cnn" in tex and r"\%)" in tex


def test_latex_main_bold_and_pm(study):
    tex = table(study, "main", "latex")
    assert (r"    2 & CB + WD + MaxNorm (WB) & \textbf{92.00 $\pm$ 0.50} & \textbf{65.00 $\pm$ 1.00} & "
            r"\textbf{37.00 $\pm$ 1.00} & \textbf{64.83 $\pm$ 0.76} \\") in tex
    assert r"$\tau$-norm" in tex
    assert tex.count(r"\midrule") == 2  # after the header and between stage 1 and stage 2


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_latex_compiles(study, tmp_path):
    for kind in analysis.KINDS:
        (tmp_path / f"{kind}.tex").write_text(table(study, kind, "latex"))
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                                      + "".join(f"\\input{{{k}.tex}}\n" for k in analysis.KINDS)
                                      + "\\end{document}\n")
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:]


# --- unfinished, odd and wrong folders ----------------------------------------------------------------------

def test_interrupted_study_prints_what_it_has(tmp_path, capsys):
    root = make_study(tmp_path / "int", interrupted=True)
    assert table_command(root, kind="main") == 0
    out = capsys.readouterr().out
    assert "| 2     | CB + WD + MaxNorm (WB) | –                | –                | –                | –" in out
    assert "| 2     | LWS                    | –" in out
    # without WB's test numbers the best Many is the stage-1 model's
    assert "| 1     | CE + tuned WD          | **92.00 ± 1.00** | 56.00 ± 1.00     |" in out
    assert out.rstrip().endswith("Missing: study not finished (no done.json); final test evaluation of stage2/wb; "
                                 "stage2/lws has no completed trial (0 of 2 finished).")
    abl = table(root, "ablation")
    assert "Significance: wb has no test results yet, so no test was made." in abl
    assert table_command(root, kind="ablation", fmt="csv") == 0
    out = capsys.readouterr()
    assert "Missing: " in out.err and "Missing" not in out.out
    assert out.out.splitlines()[-1].startswith("stage2,lws,LWS,0,,")


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


def test_study_without_any_trial(tmp_path):
    root = make_study(tmp_path / "full")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(root / "study.yaml", empty / "study.yaml")
    for kind in analysis.KINDS:
        t = build_table(load_results(empty), kind)
        assert all(render(t, fmt) for fmt in analysis.RENDERERS)
    assert t.notes[:2] == ["No trials.csv yet: rows rebuilt from the trial folders.",
                           "Missing: study not finished (no done.json); stage1/naive has no trials; stage1/tuned "
                           "has no trials; stage2/none has no trials; stage2/tau-norm has no trials; stage2/wb has "
                           "no trials."]


def test_fewer_than_three_seeds(tmp_path):
    root = make_study(tmp_path / "two", seeds=(0, 1))
    assert significance(load_results(root)) == (
        "Significance: WB vs τ-norm (the best other stage-2 method by mean test All): only 2 paired seeds; a paired "
        "t-test needs at least 3, so none was computed.")
    assert "mean ± std over 2 seeds (0, 1)" in table(root, "main")


def test_no_wb(study):
    res = load_results(study)
    res.trials = res.trials[res.trials["method"] != "wb"]
    del res.header["experiments"][1]["methods"]["wb"]
    assert significance(res) == "Significance: the study has no wb (CB + WD + MaxNorm) method, so no test was made."


def test_wb_parity_caption(tmp_path):
    root = make_study(tmp_path / "par", protocol="wb-parity")
    md = table(root, "main")
    assert ("Hyperparameters and epochs were selected on the test set, as in the reference code (protocol "
            "wb-parity, no validation split), so test accuracies are optimistic.") in md
    assert "test-split All accuracy" in table(root, "search")


@pytest.mark.parametrize("argv", [["table", "{d}"], ["table", "{d}/nope", "--kind", "ablation"],
                                  ["plot", "{d}"]])
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
    assert (study / "tables" / "main.md").read_text() == MAIN_MD
    assert (study / "tables" / "main.csv").read_text() == MAIN_CSV


def test_sample_study(toy_study, tmp_path):
    """Every table of a real finished study (conftest's ``toy_study``: Ray Tune + Optuna, 2 seeds),
    copied without its checkpoints and Ray Tune state."""
    root = tmp_path / "sample"
    shutil.copytree(toy_study, root, ignore=shutil.ignore_patterns("*.pt", "tune"))
    res = load_results(root)
    for kind in analysis.KINDS:
        t = build_table(res, kind)
        assert t.rows and all(render(t, fmt) for fmt in analysis.RENDERERS)
    caption = build_table(res, "ablation").caption
    assert "Significance: WB vs" in caption
    # two seeds: too few for the paired t-test, and the caption says so
    assert "only 2 paired seeds; a paired t-test needs at least 3, so none was computed." in caption


def test_hyperparameter_formatting():
    """Captions, status and progress share one formatter: whole numbers stay whole (epochs 1000,
    not 1e+03), real values keep three significant digits, anything else is text."""
    import numpy as np

    from study.records import fmt_params, fmt_value

    assert [fmt_value(v) for v in (1000, 1000.0, np.int64(128), 0.0)] == ["1000", "1000", "128", "0"]
    assert [fmt_value(v) for v in (1e-5, 0.000178, np.float64(0.04432), 2.5)] == ["1e-05", "0.000178", "0.0443", "2.5"]
    assert [fmt_value(v) for v in (True, "relu", None)] == ["True", "relu", "None"]
    assert fmt_params({"weight_decay": 5e-4, "epochs": 200}) == "weight_decay=0.0005, epochs=200"
