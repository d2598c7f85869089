"""StudySearcher: the one searcher of the study's single Tuner. Stage 2 opens only when stage 1 has
ended, on stage 1's selection; the stage markers are written when an experiment's last trial ends;
trials in flight never exceed the slots; a restore rebuilds what is in flight from Tune's snapshot
and takes back a suggestion the snapshot never stored. (The whole study through the real Tuner:
test_search.py and test_faults.py.)"""

from __future__ import annotations

import json

from study.config.spaces import load_space
from study.layout import COMPLETED, DIVERGED, StageMarker, StudyPaths, TrialInfo, TrialRecord
from study.search.searchers import StudySearcher
from study.search.tuner import _experiment_constants, _method_searcher
from study.testing.studyrun import TOY_STAGE2, TOY_VARIANT, toy_space

STAMP = "2026-01-01_00-00-00"


def cfg_params(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("_study", "method")}


def _searcher(space, paths, max_live=2) -> StudySearcher:
    exps = space.experiments()
    return StudySearcher(
        paths,
        exps,
        {e.name: _method_searcher(e, space, paths) for e in exps},
        {e.name: _experiment_constants(e, space) for e in exps},
        max_live=max_live,
    )


def _end(
    s: StudySearcher, paths: StudyPaths, cfg: dict, tid: str, objective: float | None, status: str = COMPLETED
) -> None:
    """What a trial leaves on disk when it ends (its trial.json and record.json), then its end told
    to the searcher as Tune tells it."""
    st = cfg["_study"]
    tdir = paths.trial_dir(st["experiment"], st["index"], tid)
    tdir.mkdir(parents=True)
    TrialInfo(
        experiment=st["experiment"], stage=st["stage"], method=cfg["method"], trial_id=tid, trial_index=st["index"]
    ).write(tdir / TrialInfo.FILE)
    TrialRecord(status=status, experiment=st["experiment"], trial_index=st["index"], objective=objective).write(
        tdir / TrialRecord.FILE
    )
    s.on_trial_complete(tid, {"trial_status": status, **({"objective": objective} if objective is not None else {})})


def test_stage2_opens_only_after_stage1_ended_and_trains_on_its_selection(tmp_path):
    space = load_space(str(toy_space(tmp_path)))  # stage 1: ce 1 + ce-wd 2; stage 2: wb 2, tau-norm 1, ncm 1
    paths = StudyPaths(tmp_path / "res")
    s = _searcher(space, paths)
    a, b = s.suggest("a"), s.suggest("b")
    assert [c["_study"]["experiment"] for c in (a, b)] == ["stage1", "stage1"]
    assert [c["_study"]["index"] for c in (a, b)] == [0, 1]
    assert s.suggest("x") is None  # both slots busy
    _end(s, paths, a, "a", 0.40)
    c = s.suggest("c")
    assert c["_study"]["experiment"] == "stage1" and c["_study"]["index"] == 2
    _end(s, paths, b, "b", 0.50)
    # stage 1's budget is issued but a trial is still running: stage 2 waits (not FINISHED)
    assert s.suggest("y") is None and not paths.stage_marker("stage1").exists()
    _end(s, paths, c, "c", 0.70)
    marker = StageMarker.read(paths.stage_marker("stage1"))  # written when stage 1's last trial ended
    best = max(
        ((t, cfg) for t, cfg in (("b", b), ("c", c)) if cfg["method"] == TOY_VARIANT),
        key=lambda tc: {"b": 0.5, "c": 0.7}[tc[0]],
    )
    assert marker.selection(TOY_VARIANT).trial_id == best[0]
    d = s.suggest("d")
    assert d["_study"]["experiment"] == TOY_STAGE2 and d["_study"]["index"] == 0
    assert d["_study"]["stage1_dir"] == marker.selection(TOY_VARIANT).dir
    assert d["_study"]["config"]["method"] == d["method"]  # the method's own base configuration
    rest = [s.suggest(t) for t in ("e", "f", "g")]
    assert rest[0]["_study"]["index"] == 1 and rest[1] is None  # two slots: d and e
    for tid, cfg in (("d", d), ("e", rest[0])):
        _end(s, paths, cfg, tid, 0.6)
    more = [s.suggest(t) for t in ("h", "i")]
    for tid, cfg in zip(("h", "i"), more):
        _end(s, paths, cfg, tid, 0.6)
    assert sorted(c["method"] for c in (d, rest[0], *more)) == ["ncm", "tau-norm", "wb", "wb"]  # budgets exact
    assert s.suggest("j") == "FINISHED" and paths.stage_marker(TOY_STAGE2).exists()


def test_a_variant_without_any_completed_stage1_trial_blocks_its_stage2(tmp_path):
    space = load_space(str(toy_space(tmp_path)))
    paths = StudyPaths(tmp_path / "res")
    s = _searcher(space, paths, max_live=3)
    cfgs = {t: s.suggest(t) for t in ("a", "b", "c")}
    for tid, cfg in cfgs.items():
        _end(s, paths, cfg, tid, None, status=DIVERGED)
    assert StageMarker.read(paths.stage_marker("stage1")).selection(TOY_VARIANT) is None
    assert s.suggest("d") == "FINISHED" and s.blocked == {TOY_STAGE2}


def test_restore_rebuilds_live_trials_from_the_snapshot_and_takes_back_unstored_suggestions(tmp_path):
    space = load_space(str(toy_space(tmp_path)))
    paths = StudyPaths(tmp_path / "res")
    s = _searcher(space, paths)
    a, b = s.suggest("a"), s.suggest("b")
    folder = paths.tune_experiment
    folder.mkdir(parents=True)
    s.save(str(folder / f"searcher-state-{STAMP}.pkl"))
    # Tune's snapshot of the same step knows only trial a (b was suggested, never stored)
    trial = {"trial_id": "a", "status": "RUNNING", "experiment_tag": "1_x", "config": a}
    (folder / f"experiment_state-{STAMP}.json").write_text(json.dumps({"trial_data": [[json.dumps(trial), {}]]}))
    r = _searcher(space, paths)
    r.restore(str(folder / f"searcher-state-{STAMP}.pkl"))
    assert r.live == {"a"} and "b" not in r.trial_exp
    again = r.suggest("b2")  # b's budget slot is issued again, with b's index
    assert again["_study"]["index"] == b["_study"]["index"] and again["method"] == b["method"]
    assert r.suggest("x") is None  # a and b2 fill the two slots


def test_restore_takes_over_trials_the_snapshot_lists_but_the_older_state_never_issued(tmp_path):
    """Tune copies its snapshot files one by one: the trial list can be a step newer than the
    searcher's pickle. A listed trial the pickle never issued is counted (budget exact), not
    issued a second time."""
    space = load_space(str(toy_space(tmp_path)))
    paths = StudyPaths(tmp_path / "res")
    s = _searcher(space, paths, max_live=3)
    a = s.suggest("a")
    folder = paths.tune_experiment
    folder.mkdir(parents=True)
    s.save(str(folder / f"searcher-state-{STAMP}.pkl"))  # the pickle of the step before b and c
    b, c = s.suggest("b"), s.suggest("c")
    trials = [
        [json.dumps({"trial_id": t, "status": "RUNNING", "experiment_tag": f"{i + 1}_x", "config": cfg}), {}]
        for i, (t, cfg) in enumerate((("a", a), ("b", b), ("c", c)))
    ]
    (folder / f"experiment_state-{STAMP}.json").write_text(json.dumps({"trial_data": trials}))
    r = _searcher(space, paths, max_live=3)
    r.restore(str(folder / f"searcher-state-{STAMP}.pkl"))
    assert r.live == {"a", "b", "c"} and r.index == {"a": 0, "b": 1, "c": 2}
    for tid, cfg in (("a", a), ("b", b), ("c", c)):
        _end(r, paths, cfg, tid, 0.5)
    marker = StageMarker.read(paths.stage_marker("stage1"))
    assert sorted(marker.trials) == ["a", "b", "c"]  # stage 1's three budgeted trials, no fourth
    tuned = r.searchers["stage1"].subs[TOY_VARIANT].study.trials  # taken-over trials are in its history
    assert [t.params for t in tuned] == [cfg_params(x) for x in (a, b, c) if x["method"] == TOY_VARIANT]
    assert {t.state.name for t in tuned} == {"COMPLETE"}
    assert r.suggest("d")["_study"]["experiment"] == TOY_STAGE2


def test_restore_counts_a_finished_experiments_trials_from_its_marker_and_their_records(tmp_path):
    """A stop right after stage 1 ended (before Tune stored a snapshot) leaves a stage marker that
    lists a trial the saved searcher never issued: it is counted and joins its method's Optuna
    history, with its objective, from its record."""
    space = load_space(str(toy_space(tmp_path)))
    paths = StudyPaths(tmp_path / "res")
    s = _searcher(space, paths, max_live=3)
    cfgs = {t: s.suggest(t) for t in ("a", "b")}
    folder = paths.tune_experiment
    folder.mkdir(parents=True)
    s.save(str(folder / f"searcher-state-{STAMP}.pkl"))  # saved before c was issued
    cfgs["c"] = s.suggest("c")
    for tid, cfg in cfgs.items():
        _end(s, paths, cfg, tid, {"a": 0.3, "b": 0.4, "c": 0.6}[tid])
    assert paths.stage_marker("stage1").exists()
    r = _searcher(space, paths, max_live=3)
    r.restore(str(folder / f"searcher-state-{STAMP}.pkl"))  # no trial list of that step: nothing to reconcile
    assert "stage1" in r.finished and r.ended["stage1"] == {"a", "b", "c"} and r.live == set()
    assert [cfgs[t]["method"] for t in ("a", "b", "c")] == ["ce", TOY_VARIANT, TOY_VARIANT]
    tuned = r.searchers["stage1"].subs[TOY_VARIANT].study.trials
    # b: issued, its end told from its record; c: never issued by the saved state, taken over
    assert sorted((t.state.name, t.value) for t in tuned) == [("COMPLETE", 0.4), ("COMPLETE", 0.6)]
    assert r.suggest("d")["_study"]["experiment"] == TOY_STAGE2


def test_stage2_trials_start_ahead_in_the_last_stage1_workers_and_wait_for_the_opening(tmp_path, monkeypatch):
    """With slots to spare at the end of stage 1, a stage-2 trial is proposed early (at most slots
    - 1 of them) and waits in its worker for ``trials/<experiment>/.opened.json``, so the workers
    of stage 1 carry on into stage 2 (Tune would otherwise stop all but one of them)."""
    from study.layout import ExperimentOpened
    from study.search import searchers, trainable

    monkeypatch.setattr(searchers.StudySearcher, "run", searchers.RunSettings(ahead=1))
    space = load_space(str(toy_space(tmp_path)))
    paths = StudyPaths(tmp_path / "res")
    s = _searcher(space, paths, max_live=3)
    cfgs = {t: s.suggest(t) for t in ("a", "b", "c")}  # stage 1's whole budget, in flight
    assert s.suggest("x") is None  # three slots busy
    _end(s, paths, cfgs["a"], "a", 0.3)
    early = s.suggest("d")
    assert early["_study"]["experiment"] == TOY_STAGE2 and early["_study"]["after"] == "stage1"
    assert early["_study"]["stage1_dir"] is None  # not known yet: the trial will wait for it
    assert not paths.opened_file(TOY_STAGE2).exists()
    _end(s, paths, cfgs["b"], "b", 0.4)
    assert s.suggest("y") is None  # at most `ahead` early trials (here 1)
    _end(s, paths, cfgs["c"], "c", 0.6)
    opened = ExperimentOpened.read(paths.opened_file(TOY_STAGE2))
    assert opened is None  # stage 2 opens when the next trial is proposed (the between-stages point)
    late = s.suggest("e")
    opened = ExperimentOpened.read(paths.opened_file(TOY_STAGE2))
    assert opened.stage1_dir == StageMarker.read(paths.stage_marker("stage1")).selection(TOY_VARIANT).dir
    assert late["_study"]["stage1_dir"] == opened.stage1_dir
    assert trainable._wait_opened(paths, TOY_STAGE2).stage1_dir == opened.stage1_dir


def test_the_driver_hears_of_stage2_at_its_first_result_once(tmp_path, monkeypatch):
    """``on_stage2`` (the driver's preparations for the end of the study) runs at the first result of
    a stage-2 trial, once: not for stage-1 results, nor when stage 2 opens and starts its trials."""
    from study.search import searchers

    calls = []
    monkeypatch.setattr(searchers.StudySearcher, "run", searchers.RunSettings(on_stage2=lambda: calls.append(1)))
    space = load_space(str(toy_space(tmp_path)))
    paths = StudyPaths(tmp_path / "res")
    s = _searcher(space, paths)
    stage1 = [(t, s.suggest(t)) for t in ("a", "b")]
    s.on_trial_result("a", {"objective": 0.3, "epoch": 1, "training_iteration": 1})
    for tid, cfg in stage1:
        _end(s, paths, cfg, tid, 0.4)
    c = s.suggest("c")
    _end(s, paths, c, "c", 0.5)
    d, e = s.suggest("d"), s.suggest("e")  # stage 2 opened, its two slots' trials started
    assert d["_study"]["experiment"] == e["_study"]["experiment"] == TOY_STAGE2 and calls == []
    s.on_trial_result("d", {"objective": 0.6, "epoch": 1, "training_iteration": 1})
    s.on_trial_result("e", {"objective": 0.6, "epoch": 1, "training_iteration": 1})
    s.on_trial_result("d", {"objective": 0.7, "epoch": 2, "training_iteration": 2})
    assert calls == [1]
