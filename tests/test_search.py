"""A real study end to end (Ray Tune + Optuna, toy scale), resume after SIGKILL, and `study status`."""

from __future__ import annotations

import collections
import json

import optuna
import pytest
import yaml

from studyrun import kill_hard, read_rows, start, study, toy_space, trial_in_flight, wait_for

pytestmark = pytest.mark.timeout(600)


def _completed(storage: str, name: str) -> int:
    st = optuna.load_study(study_name=name, storage=storage)
    return len(st.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]))


def test_study_end_to_end(tmp_path):
    space = toy_space(tmp_path)
    r = study("run", str(space), "--results-dir", str(tmp_path / "res"), "--name", "toy")
    assert r.returncode == 0, r.stdout + r.stderr
    root = tmp_path / "res" / "toy"
    for name in ("study.yaml", "trials.csv", "per_class.csv", "optuna.db", "done.json"):
        assert (root / name).is_file(), name
    header = yaml.safe_load((root / "study.yaml").read_text())
    assert header["protocol"] == "honest" and header["data"]["selection_split"] == "val"
    assert header["provenance"]["data"]["subset_hash"] == header["data"]["subset_hash"]
    assert set(header["provenance"]["packages"]) >= {"torch", "ray", "optuna"}

    rows = read_rows(root / "trials.csv")
    trials = collections.defaultdict(set)
    for row in rows:
        trials[(row["stage"], row["method"])].add(row["trial_id"])
    budgets = {("stage1", "naive"): 1, ("stage1", "tuned"): 2, ("stage2", "wb"): 2, ("stage2", "tau-norm"): 1,
               ("stage2", "ncm"): 1}
    assert {k: len(v) for k, v in trials.items()} == budgets
    assert len(rows) == sum(budgets.values()) * 2  # two seeds per trial
    assert len({(r["trial_id"], r["seed"]) for r in rows}) == len(rows)
    assert {r["status"] for r in rows} == {"completed"}
    selected = [r for r in rows if r["selected"] == "True"]
    assert len(selected) == len(budgets) * 2
    for r in selected:  # the test set is evaluated for the selected configurations only
        assert 0 <= float(r["test_all"]) <= 1
    for r in rows:
        if r["selected"] != "True":
            assert r["test_all"] == ""
    # the selected tuned trial is the best by validation objective
    tuned = [r for r in rows if r["method"] == "tuned"]
    best = max(tuned, key=lambda r: float(r["objective"]))
    assert best["selected"] == "True"

    storage = f"sqlite:///{root / 'optuna.db'}"
    for (stage, method), n in budgets.items():
        assert _completed(storage, f"{stage}-{method}") == n
    wb = optuna.load_study(study_name="stage2-wb", storage=storage)
    assert set(wb.best_params) == {"weight_decay", "maxnorm_threshold"}

    # every stage-2 weight norm of the WB method is within its MaxNorm radius
    for seed in (0, 1):
        sel = [r for r in rows if r["method"] == "wb" and r["selected"] == "True" and r["seed"] == str(seed)][0]
        tdir = next((root / "trials" / "stage2").glob(f"trial-*-{sel['trial_id']}"))
        ps = json.loads((tdir / "record.json").read_text())["per_seed"][str(seed)]
        assert max(ps["weight_norms"]) <= ps["maxnorm_radius"] * (1 + 1e-5)

    # running the same command on a finished study only says where the results are
    again = study("run", str(space), "--results-dir", str(tmp_path / "res"), "--name", "toy", timeout=60)
    assert again.returncode == 0 and "is complete" in again.stdout

    st = study("status", str(root), "--format", "json", timeout=60)
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["complete"] and not status["running"]
    assert status["experiments"][1]["methods"]["wb"]["counts"]["completed"] == 2
    text = study("status", str(root), timeout=60)
    assert "complete" in text.stdout and "wb" in text.stdout


def test_resume_after_sigkill_in_stage1_and_stage2(tmp_path):
    """Kill the driver with SIGKILL mid stage 1, then mid stage 2, then finish: exact budgets, no
    duplicated rows, and the in-flight trials continued from a checkpointed epoch > 0."""
    space = toy_space(tmp_path, e1=150, b1=3, e2=150, b2=3)
    args = ("run", str(space), "--results-dir", str(tmp_path / "res"), "--name", "kill")
    root = tmp_path / "res" / "kill"
    log = tmp_path / "driver.log"

    p = start(*args, log=log)
    victim1 = wait_for(lambda: trial_in_flight(root, "stage1", 5), 180, "a stage-1 trial at epoch 5", p, log)
    kill_hard(p)
    st = json.loads(study("status", str(root), "--format", "json", timeout=60).stdout)
    assert not st["complete"] and not st["running"]
    s1 = st["experiments"][0]["methods"]["tuned"]["counts"]
    assert s1["interrupted"] >= 1

    p = start(*args, log=log)
    wait_for(lambda: trial_in_flight(root, "stage2", 5), 240, "a stage-2 trial at epoch 5", p, log)
    kill_hard(p)

    r = study(*args, timeout=400)
    assert r.returncode == 0, log.read_text()[-2000:] + r.stdout + r.stderr
    assert "resuming" in r.stdout

    rows = read_rows(root / "trials.csv")
    per_method = collections.defaultdict(set)
    for row in rows:
        per_method[(row["stage"], row["method"])].add(row["trial_id"])
    assert {k: len(v) for k, v in per_method.items()} == {
        ("stage1", "naive"): 1, ("stage1", "tuned"): 3, ("stage2", "wb"): 3, ("stage2", "tau-norm"): 1,
        ("stage2", "ncm"): 1}
    assert len({(r["trial_id"], r["seed"]) for r in rows}) == len(rows) == 9 * 2
    assert {r["status"] for r in rows} == {"completed"}
    resumed = {(r["stage"], r["trial_id"]): int(r["resumed_from_epoch"]) for r in rows}
    assert resumed[("stage1", victim1.name.split("-")[-1])] >= 5 or \
        any(v > 0 for (stage, _), v in resumed.items() if stage == "stage1")
    assert any(v > 0 for (stage, _), v in resumed.items() if stage == "stage2")
    storage = f"sqlite:///{root / 'optuna.db'}"
    assert _completed(storage, "stage1-tuned") == 3 and _completed(storage, "stage2-wb") == 3


def test_changed_space_refuses_to_resume(tmp_path):
    space = toy_space(tmp_path, e1=1, b1=1, e2=1, b2=1)
    res = tmp_path / "res"
    (res / "s").mkdir(parents=True)
    (res / "s" / "study.yaml").write_text(yaml.safe_dump({"fingerprint": "0", "space": {"seeds": [0, 1, 2]}}))
    r = study("run", str(space), "--results-dir", str(res), "--name", "s", timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "different search space" in r.stderr and "--fresh" in r.stderr
    assert "seeds" in r.stderr
    assert sorted(p.name for p in (res / "s").iterdir()) == ["study.yaml"]
