"""A real study end to end (Ray Tune + Optuna, toy scale) and `study status`.

Resume after SIGKILL in stage 1 and stage 2 (and after every other kind of stop) is tested in
test_faults.py::test_kill_in_every_phase."""

from __future__ import annotations

import collections
import json

import optuna
import pytest
import yaml

from study.layout import FORMAT_VERSION
from study.testing.studyrun import (
    TOY_STAGE2,
    TOY_VARIANT,
    assert_complete,
    kill_hard,
    read_rows,
    start,
    study,
    toy_budgets,
    toy_space,
    trial_in_flight,
    wait_for,
)

pytestmark = pytest.mark.timeout(600)


def test_study_end_to_end(toy_study):
    root = toy_study
    space = root.parent.parent / "toy.yaml"
    for name in ("study.yaml", "trials.csv", "per_class.csv", "optuna.db", "done.json"):
        assert (root / name).is_file(), name
    header = yaml.safe_load((root / "study.yaml").read_text())
    assert header["protocol"] == "honest" and header["data"]["selection_split"] == "val"
    assert header["provenance"]["data"]["subset_hash"] == header["data"]["subset_hash"]
    assert set(header["provenance"]["packages"]) >= {"torch", "ray", "optuna"}

    # exactly the budgeted trials, two seeds each, all completed (in trials.csv and in Optuna)
    budgets = toy_budgets()
    rows = assert_complete(root, budgets)
    selected = [r for r in rows if r["selected"] == "True"]
    assert len(selected) == len(budgets) * 2
    for r in selected:  # the test set is evaluated for the selected configurations only
        assert 0 <= float(r["test_all"]) <= 1
    for r in rows:
        if r["selected"] != "True":
            assert r["test_all"] == ""
    # the selected trial of the searched variant is the best by validation objective
    tuned = [r for r in rows if r["method"] == TOY_VARIANT]
    best = max(tuned, key=lambda r: float(r["objective"]))
    assert best["selected"] == "True"

    wb = optuna.load_study(study_name=f"{TOY_STAGE2}-wb", storage=f"sqlite:///{root / 'optuna.db'}")
    assert set(wb.best_params) == {"weight_decay", "maxnorm_threshold"}

    # every stage-2 weight norm of the WB method is within its MaxNorm radius
    for seed in (0, 1):
        sel = [r for r in rows if r["method"] == "wb" and r["selected"] == "True" and r["seed"] == str(seed)][0]
        tdir = next((root / "trials" / TOY_STAGE2).glob(f"trial-*-{sel['trial_id']}"))
        ps = json.loads((tdir / "record.json").read_text())["per_seed"][str(seed)]
        assert max(ps["weight_norms"]) <= ps["maxnorm_radius"] * (1 + 1e-5)

    # the tables equal the numbers recomputed from trials.csv (selected rows, mean over seeds, %)
    import pandas as pd

    df = pd.read_csv(root / "trials.csv")
    main_csv = pd.read_csv(root / "tables" / "main.csv")
    sel = df[df["selected"]]
    assert len(main_csv) == len(budgets)
    for experiment, method in budgets:
        mine = sel[(sel["experiment"] == experiment) & (sel["method"] == method)]
        (row,) = [r for _, r in main_csv.iterrows() if r["stage"] == experiment and r["method"] == method]
        assert row["n_seeds"] == len(mine) == 2
        for g in ("many", "medium", "few", "all"):
            assert row[f"{g}_mean"] == pytest.approx(100 * mine[f"test_{g}"].mean(), abs=0.005)

    # running the same command on a finished study only says where the results are
    again = study("run", str(space), "--results-dir", str(root.parent), "--name", "toy", timeout=60)
    assert again.returncode == 0 and "is complete" in again.stdout

    st = study("status", str(root), "--format", "json", timeout=60)
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["complete"] and not status["running"]
    assert status["experiments"][1]["methods"]["wb"]["counts"]["completed"] == 2
    text = study("status", str(root), timeout=60)
    assert "complete" in text.stdout and "wb" in text.stdout


def test_changed_space_refuses_to_resume(tmp_path):
    space = toy_space(tmp_path, e1=1, b1=1, e2=1, b2=1)
    res = tmp_path / "res"
    (res / "s").mkdir(parents=True)
    header = {"format_version": FORMAT_VERSION, "fingerprint": "0", "space": {"seeds": [0, 1, 2]}}
    (res / "s" / "study.yaml").write_text(yaml.safe_dump(header))
    r = study("run", str(space), "--results-dir", str(res), "--name", "s", timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "different search space" in r.stderr and "--fresh" in r.stderr
    assert "seeds" in r.stderr
    assert sorted(p.name for p in (res / "s").iterdir()) == ["study.yaml"]


def test_a_study_of_the_previous_format_is_refused_unless_finished(tmp_path, toy_study):
    """A study folder written by study 0.1 (no format_version in study.yaml): unfinished, `study run`
    refuses it in one line, exit 2, touching nothing; finished, it says where the results are and
    its tables still print."""
    import shutil

    space = toy_space(tmp_path)  # the same space as the toy study: only the version differs
    res = tmp_path / "res"
    shutil.copytree(toy_study, res / "old")
    head = yaml.safe_load((res / "old" / "study.yaml").read_text())
    del head["format_version"]
    (res / "old" / "study.yaml").write_text(yaml.safe_dump(head, sort_keys=False))
    (res / "old" / "done.json").unlink()
    before = sorted(p.relative_to(res) for p in res.rglob("*"))
    r = study("run", str(space), "--results-dir", str(res), "--name", "old", timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "older study (results format 1" in r.stderr and "--fresh" in r.stderr
    assert sorted(p.relative_to(res) for p in res.rglob("*")) == before
    (res / "old" / "done.json").write_text("{}")
    r = study("run", str(space), "--results-dir", str(res), "--name", "old", timeout=120)
    assert r.returncode == 0 and "is complete" in r.stdout, r.stdout + r.stderr
    assert study("table", str(res / "old"), timeout=60).returncode == 0


def test_asha_stops_poor_trials_of_its_own_method_only(tmp_path):
    """ASHA, given to the stage-1 variant ``ce-wd`` only, early-stops some of its trials (compared
    with each other on their epoch counter) and never one of ``ce-lr``, a variant searched in the
    same stage without a scheduler, whose trials all run to the end; a stopped trial is never
    selected."""
    text = toy_space(tmp_path, e1=4, b1=6).read_text()
    edits = {
        "    ce: {weight_decay: 0}\n": "    ce-lr: {lr: {loguniform: [1.0e-3, 0.5]}, budget: 4}\n",
        "      budget: 6\n": "      budget: 6\n      scheduler: {asha: {grace_period: 1, reduction_factor: 2}}\n",
        "retries: 1}": "retries: 1, max_concurrent: 1}",
    }
    for old, new in edits.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    space = tmp_path / "asha.yaml"
    space.write_text(text)
    r = study("run", str(space), "--results-dir", str(tmp_path / "res"), "--name", "a", timeout=500)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = read_rows(tmp_path / "res" / "a" / "trials.csv")
    by_method = collections.defaultdict(dict)
    for row in rows:
        by_method[row["method"]][row["trial_id"]] = row
    asha = by_method[TOY_VARIANT]
    assert len(asha) == 6
    statuses = collections.Counter(r["status"] for r in asha.values())
    assert set(statuses) <= {"completed", "stopped"} and statuses["stopped"] >= 1, statuses
    for r in asha.values():
        if r["status"] == "stopped":
            assert int(r["epochs_run"]) < 4 and r["selected"] == "False"
    plain = by_method["ce-lr"]
    assert len(plain) == 4
    assert all(r["status"] == "completed" and int(r["epochs_run"]) == 4 for r in plain.values()), plain
    db = f"sqlite:///{tmp_path / 'res' / 'a' / 'optuna.db'}"
    st = optuna.load_study(study_name=f"stage1-{TOY_VARIANT}", storage=db)
    assert sum(t.state == optuna.trial.TrialState.PRUNED for t in st.trials) == statuses["stopped"]
    plain_st = optuna.load_study(study_name="stage1-ce-lr", storage=db)
    assert [t.state for t in plain_st.trials] == [optuna.trial.TrialState.COMPLETE] * 4


def test_status_of_a_running_study_estimates_the_time_left(tmp_path):
    """`study status` on a study that is running gives the estimate of the time left (per experiment
    and for the study), read from the trials' reports so far."""
    space = toy_space(tmp_path, e1=40, e2=2, b1=2, b2=1)
    root = tmp_path / "res" / "live"
    log = tmp_path / "driver.log"
    p = start("run", str(space), "--results-dir", str(tmp_path / "res"), "--name", "live", log=log)
    try:
        wait_for(lambda: trial_in_flight(root, "stage1", 5), 240, "a stage-1 trial at epoch 5", p, log)
        st = study("status", str(root), "--format", "json", timeout=60)
        assert st.returncode == 0, st.stderr
        status = json.loads(st.stdout)
        assert status["running"] and not status["complete"]
        eta = status["eta"]
        s1 = next(e for e in eta["experiments"] if e["name"] == "stage1")
        assert s1["seconds_left"] > 0 and eta["concurrency"] > 0
        assert "left" in eta["words"] and eta["known_seconds_left"] >= s1["seconds_left"]
        text = study("status", str(root), timeout=60).stdout
        assert "estimate: " in text and "left" in text
    finally:
        kill_hard(p)
