"""The on-disk format (``study.layout``) and the module structure: typed views, file modes, finished
tables, one test-set evaluation for both commands, no import cycles."""

from __future__ import annotations

import json
import os
import stat

import pytest

from study.errors import UserError
from study.layout import (
    PER_CLASS_COLUMNS,
    TRIALS_COLUMNS,
    PerClassRow,
    StudyHeader,
    TrialRecord,
    TrialRow,
    check_name,
    parse_trial_dirname,
    trial_dirname,
)
from study.testing.studyrun import TOY_STAGE2, TOY_VARIANT


def test_trial_folder_names_round_trip():
    name = trial_dirname(7, "ab12c_00003")
    assert name == "trial-0007-ab12c_00003"
    assert parse_trial_dirname(name) == (7, "ab12c_00003")
    assert parse_trial_dirname("trial-x-zz") is None and parse_trial_dirname(".adopt") is None


def test_csv_columns_are_the_row_views_fields():
    assert (
        TRIALS_COLUMNS[:5] == ["study", "stage", "experiment", "variant", "method"] and "params" not in TRIALS_COLUMNS
    )
    row = TrialRow(method="wb", params={"weight_decay": 0.1}).to_dict()
    assert list(row)[: len(TRIALS_COLUMNS)] == TRIALS_COLUMNS and row["param.weight_decay"] == 0.1
    assert list(PerClassRow(klass=3).to_dict()) == PER_CLASS_COLUMNS and PerClassRow(klass=3).to_dict()["class"] == 3


def test_views_read_older_and_newer_files():
    # a field a newer version added is ignored, a field an older version lacked takes its default
    rec = TrialRecord.from_dict(
        {"status": "completed", "objective": 0.5, "per_seed": {"0": {"best_epoch": 2}}, "added_later": 1}
    )
    assert rec.objective == 0.5 and rec.seed(0).best_epoch == 2 and rec.seed(1).best_epoch is None
    assert TrialRecord.from_dict(rec.to_dict()) == rec


def test_long_study_names_are_refused():
    assert check_name("a" * 100) == "a" * 100
    with pytest.raises(UserError, match="101 characters"):
        check_name("a" * 101)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_get_the_umask_mode(tmp_path, umask):
    from study.fsutil import atomic_write_json
    from study.store import LocalStore, save_checkpoint

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        ckpt = tmp_path / "ckpt" / save_checkpoint(LocalStore(tmp_path / "ckpt"), 1, {"w": [1.0]})
    finally:
        os.umask(old)
    for p in (tmp_path / "a.json", ckpt, ckpt.with_suffix(".sha256")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p


def test_every_file_of_a_real_study_is_readable_by_others(toy_study):
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in toy_study.rglob("*") if p.is_file()]  # Ray Tune's own files included
    ours = {
        "study.yaml",
        "trials.csv",
        "per_class.csv",
        "done.json",
        "main.md",
        "record.json",
        "trial.json",
        "final-seed0.pt",
        "weight_norms.png",
        "optuna.db",
    }
    assert ours <= {p.name for p in files}
    wrong = {
        str(p.relative_to(toy_study)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in files
        if stat.S_IMODE(p.stat().st_mode) != 0o666 & ~umask
    }
    assert not wrong, wrong


def test_a_finished_studys_saved_tables_are_what_study_table_prints(toy_study, capsys):
    from study.cli import main

    for kind in ("main", "ablation", "seeds", "search"):
        for fmt, ext in (("markdown", "md"), ("latex", "tex"), ("csv", "csv")):
            saved = (toy_study / "tables" / f"{kind}.{ext}").read_text()
            assert "not finished" not in saved
            assert main(["table", str(toy_study), "--kind", kind, "--format", fmt]) == 0
            assert capsys.readouterr().out == saved, (kind, fmt)


def test_an_unfinished_studys_saved_tables_say_so(tmp_path):
    from study.results.builders import write_all_tables
    from study.testing.analysis_fixture import make_study

    root = make_study(tmp_path / "s", interrupted=True)
    write_all_tables(root)
    assert "study not finished (no done.json)" in (root / "tables" / "main.md").read_text()


def test_study_run_and_study_train_evaluate_a_checkpoint_identically(tmp_path, digits_data):
    """`study run` evaluates in a Ray task (driver._final_eval_task), `study train` in-process; both
    go through stages.evaluate_selected and must give the same numbers for the same weights."""
    from study.config.schema import EvalConfig
    from study.config.spaces import load_space
    from study.layout import final_weights
    from study.search.driver import _final_eval_task
    from study.training.single_run import train_once

    for method in ("wb", "tau-norm"):
        space = load_space("digits-lt", ["stage1.epochs=2", "stage2.epochs=2", "eval.tta_flip=true"], seeds=1)
        out = tmp_path / method
        metrics = train_once(space, out, method=method, console=lambda s: None)
        finals = {"s1": str(final_weights(out / "stage1", 0)), "s2": str(final_weights(out / f"stage2-{method}", 0))}
        got = _final_eval_task(
            space.stage1.backbone,
            finals["s1"],
            finals,
            digits_data,
            json.loads(json.dumps(EvalConfig(**vars(space.eval)).__dict__)),
        )
        run = metrics["runs"][0]
        for key, stage in (("s1", "stage1"), ("s2", "stage2")):
            want = run[stage]["test"]
            assert {g: got[key][g] for g in want} == want, (method, stage)


def test_the_header_view_reads_what_the_driver_writes(toy_study):
    import yaml

    raw = yaml.safe_load((toy_study / "study.yaml").read_text())
    header = StudyHeader.from_dict(raw)
    assert [e.name for e in header.experiments] == ["stage1", TOY_STAGE2]
    assert header.experiment("stage2").methods["wb"].searched == ("weight_decay", "maxnorm_threshold")
    assert header.to_dict()["experiments"] == raw["experiments"]


def test_a_real_study_records_feature_geometry_and_maxnorm_binding(toy_study):
    import pandas as pd

    rows = pd.read_csv(toy_study / "trials.csv")
    sel = rows[rows["selected"]]
    assert sel["fdr_train"].notna().all() and (sel["fdr_train"] > 0).all()
    assert sel["class_cos_centred_test"].between(-1, 1).all() and sel["cone_cos_test"].between(-1, 1).all()
    wb = sel[sel["method"] == "wb"]
    assert wb["maxnorm_binding"].between(0, 1).all() and wb["maxnorm_rows_clipped"].notna().all()
    assert sel[sel["method"] == "tau-norm"]["maxnorm_binding"].isna().all()  # no MaxNorm, no count
    # stage-2 methods on the frozen backbone share its feature geometry
    tuned = sel[(sel["method"] == TOY_VARIANT)].set_index("seed")["fdr_train"]
    ncm = sel[(sel["method"] == "ncm")].set_index("seed")["fdr_train"]
    assert (tuned - ncm).abs().max() < 1e-9
    analysis = pd.read_csv(toy_study / "tables" / "analysis.csv")
    assert {"fdr_train_mean", "maxnorm_binding_mean", "cone_cos_test_mean"} <= set(analysis.columns)
    assert (toy_study / "plots" / "weight_norm_evolution.png").is_file()
    pc = pd.read_csv(toy_study / "per_class.csv")
    assert pc["feature_norm"].notna().all()
