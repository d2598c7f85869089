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
