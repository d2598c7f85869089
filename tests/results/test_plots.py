"""Plots of study.results.plots on the synthetic study of tests/analysis_fixture.py (Agg, no display)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

from study.cli import main
from study.results.loading import load_results
from study.results.plots import PlotProcess, search_figure, weight_norm_figure, write_plots
from study.testing.analysis_fixture import make_study

PNG = b"\x89PNG\r\n\x1a\n"
EXPECTED = [
    "weight_norms.png",
    "per_class_accuracy.png",
    "weight_norm_evolution.png",
    "search-stage1-tuned.png",
    "search-stage2-wb.png",
]


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000


def test_finish_outputs_written_without_torch_or_ray(tmp_path):
    """write_all_tables and write_all_plots (what finish_study calls) in a fresh interpreter: the PNGs
    are written and neither torch nor Ray gets imported."""
    root = make_study(tmp_path / "toy-lt")
    code = (
        "import sys; from study.results.builders import write_all_tables; "
        "from study.results.plots import write_all_plots; "
        f"write_all_tables({str(root)!r}); print('\\n'.join(map(str, write_all_plots({str(root)!r})))); "
        "bad = [m for m in ('torch', 'ray') if m in sys.modules]; assert not bad, bad"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert r.returncode == 0, r.stderr
    written = [Path(p) for p in r.stdout.split()]
    assert [p.name for p in written] == EXPECTED
    assert all(p.parent == root / "plots" and _is_png(p) for p in written)
    assert len(list((root / "tables").iterdir())) == 15  # 5 kinds x 3 formats


def test_plot_process_writes_the_same_pngs_as_write_plots(tmp_path):
    """The child process finish_study draws in writes exactly the PNGs write_plots writes here."""
    root = make_study(tmp_path / "toy-lt")
    plots = PlotProcess()
    try:
        plots.write(root)
        written = plots.wait()
    finally:
        plots.close()
    assert [p.name for p in written] == EXPECTED and all(p.parent == root / "plots" for p in written)
    here, _ = write_plots(load_results(root, complete=True), tmp_path / "here")
    assert [p.read_bytes() for p in written] == [p.read_bytes() for p in here]


def test_plot_process_failures_raise(tmp_path):
    """A study the child cannot plot, and a child that died before it was asked: both raise in the
    driver (never a silent success, nor a broken pipe the CLI would take for a closed stdout)."""
    plots = PlotProcess()
    plots.write(tmp_path / "not-a-study")
    with pytest.raises(RuntimeError, match="writing the plots failed: .*not-a-study"):
        plots.wait()
    plots = PlotProcess()
    plots._proc.kill()
    plots._proc.wait()
    plots.write(make_study(tmp_path / "toy-lt"))
    with pytest.raises(RuntimeError, match="exited with status -9 and no reply"):
        plots.wait()
    assert not (tmp_path / "toy-lt" / "plots").exists()


def test_search_figure_axes(tmp_path):
    res = load_results(make_study(tmp_path / "toy-lt"))
    stage2 = res.experiment("stage2")
    fig = search_figure(res, stage2, "wb")
    history, wd, mt = fig.axes
    assert (wd.get_xscale(), mt.get_xscale()) == ("log", "linear")  # loguniform vs uniform in study.yaml
    assert wd.get_xlabel() == "weight_decay (log scale)" and mt.get_xlabel() == "maxnorm_threshold"
    assert "best so far" in [t.get_text() for t in history.get_legend().get_texts()]
    assert search_figure(res, stage2, "none") is None  # nothing searched
    panels = [ax for ax in weight_norm_figure(res).axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [
        "CE without WD (stage 1)",
        "CE + tuned WD (stage 1)",
        "Stage-1 classifier",
        "τ-norm",
        "CB + WD + MaxNorm (WB)",
    ]
    assert len({ax.get_ylim() for ax in panels}) == 1  # one y axis for all panels


def test_plot_command_interrupted(tmp_path, capsys):
    root = make_study(tmp_path / "int", interrupted=True, trials_csv=False)
    out = tmp_path / "pngs"
    assert main(["plot", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / n) for n in EXPECTED + ["search-stage2-lws.png"]]
    assert all(_is_png(Path(p)) for p in printed)


def test_skipped_plots_are_reported(tmp_path):
    root = make_study(tmp_path / "toy-lt")
    (root / "per_class.csv").write_text("study,stage,experiment,method,seed,class\n")
    written, skipped = write_plots(root, tmp_path / "out")
    assert [p.name for p in written] == EXPECTED[2:]
    assert skipped == [
        "skipped weight_norms.png: no per-class weight norms",
        "skipped per_class_accuracy.png: no per-class test accuracies",
    ]


@pytest.mark.parametrize("sub", ["", "missing"])
def test_plot_not_a_study_exits_2(tmp_path, capsys, sub):
    assert main(["plot", str(tmp_path / sub)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not (tmp_path / "plots").exists()


def test_weight_norm_evolution_shows_the_selected_trials_epochs(tmp_path):
    from study.results.plots import norm_evolution_figure

    res = load_results(make_study(tmp_path / "toy-lt"))
    fig = norm_evolution_figure(res)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.images]
    # the trained methods of the fixture (naive, tuned, wb); the post-hoc ones have no epochs
    assert [ax.get_title() for ax in panels] == [
        "CE without WD (stage 1)",
        "CE + tuned WD (stage 1)",
        "CB + WD + MaxNorm (WB)",
    ]
    img = panels[2].images[0].get_array()
    assert img.shape == (3, 6)  # epochs x classes
    # mean over the 3 seeds of the fixture's last epoch equals the mean final norms
    import numpy as np

    from study.testing.analysis_fixture import norms

    np.testing.assert_allclose(img[-1], np.mean([norms("wb", p) for p in range(3)], axis=0))
