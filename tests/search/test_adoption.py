"""Trials missing from Tune's stored snapshot after a hard kill are adopted, not lost: the next trial
of their method gets their parameters (through the method's Optuna study) and their checkpoints."""

from __future__ import annotations

import json

import optuna

from study.fsutil import append_jsonl, atomic_write_json
from study.layout import StudyPaths
from study.search.resume import adopt_claimed, set_aside_orphans
from study.search.searchers import MethodSearcher, OptunaSearcher


def _trial(folder, name, method, params, epoch=0, record=False):
    d = folder / name
    (d / "ckpt").mkdir(parents=True)
    atomic_write_json(d / "trial.json", {"method": method, "params": params})
    for e in range(1, epoch + 1):
        append_jsonl(d / "events.jsonl", {"event": "epoch", "epoch": e, "t": float(e)})
    (d / "ckpt" / f"epoch-{epoch:04d}.pt").write_bytes(b"state")
    if record:
        atomic_write_json(d / "record.json", {"status": "completed", "objective": 0.5})
    return d


def _snapshot(paths, stage, known):
    """Tune's stored experiment state (one Tuner for the study) knowing ``known`` trials of ``stage``."""
    folder = paths.tune_experiment
    folder.mkdir(parents=True)
    data = [
        [
            json.dumps(
                {
                    "trial_id": t,
                    "status": "RUNNING",
                    "experiment_tag": f"{i + 1}_x",
                    "config": {"_study": {"experiment": stage, "index": i}},
                }
            ),
            {},
        ]
        for i, t in enumerate(known)
    ]
    (folder / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": data}))


def test_orphans_are_pooled_claimed_with_their_parameters_and_adopted(tmp_path):
    paths = StudyPaths(tmp_path)
    stage = paths.trials / "stage2"
    _trial(stage, "trial-0000-aaaa0000", "wb", {"weight_decay": 0.1, "maxnorm_threshold": 0.2}, epoch=2)
    _trial(stage, "trial-0001-bbbb1111", "wb", {"weight_decay": 0.0123, "maxnorm_threshold": 0.45}, epoch=5)
    _trial(stage, "trial-0002-cccc2222", "ncm", {}, epoch=1, record=True)
    _snapshot(paths, "stage2", ["aaaa0000"])  # the stored snapshot lags: it knows only the first trial
    set_aside_orphans(paths, "stage2", log=lambda s: None)
    assert sorted(p.name for p in stage.iterdir()) == [".adopt", "trial-0000-aaaa0000"]
    assert sorted(p.name for p in (stage / ".adopt").iterdir()) == ["trial-0001-bbbb1111", "trial-0002-cccc2222"]

    space = {
        "weight_decay": optuna.distributions.FloatDistribution(1e-3, 1.0, log=True),
        "maxnorm_threshold": optuna.distributions.FloatDistribution(0.0, 1.0),
    }
    wb = OptunaSearcher(space, optuna.samplers.TPESampler(seed=0), "stage2-wb")
    searcher = MethodSearcher({"wb": wb, "ncm": None}, {"wb": 3, "ncm": 1}, pool=str(stage))
    searcher.issued["wb"] = 1  # the restored searcher had issued the known trial
    suggestions = {tid: searcher.suggest(tid) for tid in ("new1", "new2", "new3")}
    wb_new = [tid for tid, cfg in suggestions.items() if cfg["method"] == "wb"]
    ncm_new = [tid for tid, cfg in suggestions.items() if cfg["method"] == "ncm"]
    assert len(wb_new) == 2 and len(ncm_new) == 1
    # the first new wb trial takes the orphan's exact parameters; the next one is a fresh proposal
    assert suggestions[wb_new[0]] == {"weight_decay": 0.0123, "maxnorm_threshold": 0.45, "method": "wb"}
    assert suggestions[wb_new[1]]["weight_decay"] != 0.0123
    assert (stage / ".adopt" / "trial-0001-bbbb1111" / "claimed_by").read_text() == wb_new[0]
    assert searcher.suggest("new4") == "FINISHED"  # the budget stays exact

    # the adopting trial receives the orphan's checkpoints, events and record
    tdir = stage / f"trial-0005-{wb_new[0]}"
    tdir.mkdir()
    assert adopt_claimed(stage, wb_new[0], tdir) == "trial-0001-bbbb1111"
    assert (tdir / "ckpt" / "epoch-0005.pt").read_bytes() == b"state"
    assert [e["epoch"] for e in map(json.loads, (tdir / "events.jsonl").read_text().splitlines())] == [1, 2, 3, 4, 5]
    assert not (stage / ".adopt" / "trial-0001-bbbb1111").exists()
    ncm_dir = stage / f"trial-0006-{ncm_new[0]}"
    ncm_dir.mkdir()
    assert adopt_claimed(stage, ncm_new[0], ncm_dir) == "trial-0002-cccc2222"
    assert (ncm_dir / "record.json").exists()  # a finished orphan is not trained again


def test_stale_claims_are_released_on_the_next_restore(tmp_path):
    paths = StudyPaths(tmp_path)
    stage = paths.trials / "stage1"
    orphan = _trial(stage / ".adopt", "trial-0003-dddd3333", "tuned", {"weight_decay": 0.01}, epoch=3)
    (orphan / "claimed_by").write_text("lostclaimer")  # claimed by a trial that itself was lost
    _snapshot(paths, "stage1", ["eeee4444"])
    set_aside_orphans(paths, "stage1", log=lambda s: None)
    assert not (orphan / "claimed_by").exists()


def test_with_a_store_the_claim_travels_and_the_driver_moves_the_orphan_at_the_first_report(tmp_path):
    """With a store apart from the results folder the trial cannot reach ``.adopt/``: the searcher keeps
    the claimed orphan's name (it goes into the trial's context, and the trial copies the orphan's store
    files), and the driver's mirror moves the orphan's local files in at the trial's first report."""
    from study.layout import REPORT_FILES_KEY
    from study.search.mirror import TrialMirror
    from study.store import LocalStore

    paths = StudyPaths(tmp_path / "study")
    stage = paths.trials / "stage1"
    _trial(stage / ".adopt", "trial-0001-bbbb1111", "tuned", {}, epoch=3)
    searcher = MethodSearcher({"tuned": None}, {"tuned": 1}, pool=str(stage))
    searcher.suggest("new1")
    assert searcher.claims == {"new1": "trial-0001-bbbb1111"}

    mirror = TrialMirror(paths, LocalStore(tmp_path / "store"))
    tdir = stage / "trial-0002-new1"
    report = {
        REPORT_FILES_KEY: json.dumps(
            {"attempt": 1, "seq": 0, "events": [{"event": "adopted", "from": "trial-0001-bbbb1111"}]}
        )
    }
    mirror.take(tdir, "new1", report)
    mirror.take(tdir, "new1", report)  # the same report again (as a result, then as the final one): once
    lines = [json.loads(ln) for ln in (tdir / "events.jsonl").read_text().splitlines()]
    assert [e.get("epoch", e["event"]) for e in lines] == [1, 2, 3, "adopted"]
    assert (tdir / "ckpt" / "epoch-0003.pt").exists() and not (stage / ".adopt" / "trial-0001-bbbb1111").exists()


def test_the_mirror_writes_the_record_after_the_weights_it_copies_from_the_store(tmp_path):
    from study.layout import REPORT_FILES_KEY, TrialRecord
    from study.search.mirror import TrialMirror
    from study.store import LocalStore

    paths = StudyPaths(tmp_path / "study")
    tdir = paths.trials / "stage1" / "trial-0000-aaaa0000"
    store = LocalStore(tmp_path / "store")
    store.put("trials/stage1/trial-0000-aaaa0000/final-seed0.pt", b"weights")
    store.put("trials/stage1/trial-0000-aaaa0000/weight_norms.json", b"{}")
    record = TrialRecord(seeds=[0], objective=0.5)
    payload = {"attempt": 1, "seq": 3, "events": [{"event": "completed"}], "record": record.to_dict()}
    TrialMirror(paths, store).take(tdir, "aaaa0000", {REPORT_FILES_KEY: json.dumps(payload)})
    assert (tdir / "final-seed0.pt").read_bytes() == b"weights" and (tdir / "weight_norms.json").exists()
    assert TrialRecord.read(tdir / "record.json") == record
