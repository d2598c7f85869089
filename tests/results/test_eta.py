"""The time-left estimate of a running study (study.results.eta) on a study folder whose trials report
at known times: the arithmetic, not a timing (the benchmark bench_eta.py measures how good it is)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from study.layout import StudyHeader, StudyPaths, TrialInfo, TrialRecord, trial_dirname
from study.results.eta import estimate, eta_words


def _header(budget_ce_wd: int = 4, with_stage2: bool = True) -> StudyHeader:
    exps = [
        {
            "name": "stage1",
            "stage": "stage1",
            "budget": 1 + budget_ce_wd,
            "methods": {"ce": {"budget": 1}, "ce-wd": {"budget": budget_ce_wd, "searched": ["weight_decay"]}},
        }
    ]
    if with_stage2:
        exps.append(
            {
                "name": "stage2-ce-wd",
                "stage": "stage2",
                "budget": 3,
                "variant": "ce-wd",
                "methods": {"wb": {"budget": 2, "searched": ["weight_decay"]}, "tau-norm": {"budget": 1}},
            }
        )
    space = {
        "space": "eta",
        "stage1": {"variants": {"ce": {"config": {"epochs": 10}}, "ce-wd": {"config": {"epochs": 10}}}},
        "stage2": {"wb": {"config": {"epochs": 5}}, "tau-norm": {"config": {"epochs": 5}}},
    }
    return StudyHeader.from_dict({"study": "eta", "space": space, "experiments": exps, "data": {}})


def _trial(paths: StudyPaths, exp: str, index: int, method: str, starts: dict, status: str | None = None):
    """A trial folder: ``starts`` maps each attempt's start time to its epoch report times."""
    tid = f"{1 if exp == 'stage1' else 2}{index:07x}"  # Ray Tune ids are hex
    tdir = paths.trial_dir(exp, index, tid)
    tdir.mkdir(parents=True)
    assert tdir.name == trial_dirname(index, tid)
    TrialInfo(method=method).write(tdir / TrialInfo.FILE)
    lines, epoch = [], 0
    for start, reports in starts.items():
        lines.append({"t": start, "event": "start", "start_epoch": epoch})
        for t in reports:
            epoch += 1
            lines.append({"t": t, "event": "epoch", "epoch": epoch, "objective": 0.5})
    (tdir / "events.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if status:
        TrialRecord(status=status, experiment=exp, trial_index=index, epochs_run=epoch).write(tdir / TrialRecord.FILE)


@pytest.fixture
def study(tmp_path) -> StudyPaths:
    paths = StudyPaths(tmp_path / "eta")
    _trial(paths, "stage1", 0, "ce", {0: range(1, 11)}, "completed")  # 10 s for 10 epochs
    _trial(paths, "stage1", 1, "ce-wd", {0: range(2, 21, 2)}, "completed")  # 20 s, 10 epochs
    _trial(paths, "stage1", 2, "ce-wd", {0: [2, 4, 6, 8]}, "stopped")  # ASHA stopped it after 4 epochs
    _trial(paths, "stage1", 3, "ce-wd", {10: range(11, 21)}, "completed")  # 10 s, 10 epochs
    _trial(paths, "stage2-ce-wd", 0, "wb", {25: [26, 27]})  # running: 2 of 5 epochs, 1 s each
    return paths


def test_the_estimate_is_work_left_times_the_measured_rate_over_the_measured_concurrency(study):
    est = estimate(study, _header(), now=30.0)
    busy = 10 + 20 + 8 + 10 + 2
    assert est.concurrency == pytest.approx(busy / 30.0)  # busy trial-seconds per wall second
    s1, s2 = est.experiments
    ce_wd = next(m for m in s1.methods if m.method == "ce-wd")
    # one ce-wd trial not started; the ended ones ran 10, 4 and 10 epochs (ASHA counted as it ran)
    assert ce_wd.trial_epochs_left == pytest.approx(8.0)
    assert ce_wd.seconds_per_epoch == pytest.approx((20 + 8 + 10) / 24)
    assert s1.seconds_left == pytest.approx(8.0 * 38 / 24 / est.concurrency)
    wb, tau = s2.methods
    assert wb.trial_epochs_left == pytest.approx(5 + 3)  # one trial not started, 3 epochs of the running one
    assert tau.epochs == 1 and tau.seconds_per_epoch is None  # tau-norm does not train, has no report yet
    assert tau.busy_seconds_left == pytest.approx(1.0)  # it borrows wb's 1 s per epoch
    assert s2.seconds_left == pytest.approx((8 + 1) / est.concurrency)
    assert est.seconds_left == pytest.approx(s1.seconds_left + s2.seconds_left)
    assert eta_words(est).startswith("about 00:1")


def test_a_stage_without_any_report_is_named_and_the_rest_is_a_lower_bound(tmp_path):
    paths = StudyPaths(tmp_path / "eta")
    _trial(paths, "stage1", 0, "ce", {0: range(1, 11)}, "completed")
    _trial(paths, "stage1", 1, "ce-wd", {0: [1, 2]})
    est = estimate(paths, _header(budget_ce_wd=1), now=10.0)
    assert est.seconds_left is None and est.experiments[1].seconds_left is None
    assert est.known_seconds_left == pytest.approx(est.experiments[0].seconds_left) and est.known_seconds_left > 0
    words = eta_words(est)
    assert words.startswith("at least") and "stage2-ce-wd not measured yet" in words


def test_a_resumed_trial_counts_only_its_attempts_not_the_gap(tmp_path):
    paths = StudyPaths(tmp_path / "eta")
    # killed after epoch 3 at t=3, resumed at t=100 from epoch 3: busy 3 + 2 seconds, not 102
    _trial(paths, "stage1", 0, "ce", {0: [1, 2, 3], 100: [101, 102]})
    est = estimate(paths, _header(budget_ce_wd=1, with_stage2=False), now=102.0)
    ce = est.experiments[0].methods[0]
    assert ce.seconds_per_epoch == pytest.approx(5 / 5)
    assert ce.trial_epochs_left == pytest.approx(10 - 5)
    assert Path(paths.root).is_dir()
