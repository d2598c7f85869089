"""Faults a study must survive: the driver killed at any point, diverging and raising trials,
corrupted checkpoints, two runs on one folder, an unwritable or full disk."""

from __future__ import annotations

import errno
import glob
import json
import os
import pickle
import random
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest

from study.testing.s3 import S3_ENV
from study.testing.studyrun import (
    TOY_STAGE2,
    TOY_VARIANT,
    assert_complete,
    events,
    kill_hard,
    read_rows,
    start,
    study,
    toy_budgets,
    toy_space,
    trial_in_flight,
    wait_for,
)

pytestmark = pytest.mark.timeout(900)


def _table_shape(root: Path, kind: str) -> tuple:
    lines = (root / "tables" / f"{kind}.csv").read_text().splitlines()
    return lines[0], [ln.split(",")[0] for ln in lines[1:]]


def _same_tables(root: Path, reference: Path) -> None:
    for kind in ("main", "ablation"):
        assert _table_shape(root, kind) == _table_shape(reference, kind), kind


def _wait_log(log: Path, text: str):
    return lambda: text in log.read_text()


@pytest.mark.slow  # about 4 minutes: seven stops and restarts of a 60/80-epoch study
def test_kill_in_every_phase(tmp_path, toy_study):
    """Stop the driver in every phase, each time the way that phase is most likely to be stopped,
    and run the same command again: the study ends exactly as an uninterrupted one.

    SIGKILL mid stage 1 (then the newest checkpoint of the in-flight trial is truncated), Ctrl-C
    mid stage 1, SIGTERM between the stages (while a second `study run` is refused), SIGTERM mid
    stage 2, SIGKILL mid stage 2, Ctrl-C during the final test evaluation, SIGTERM while the tables
    are written."""
    space = toy_space(tmp_path, e1=60, e2=80)
    args = ("run", str(space), "--results-dir", str(tmp_path / "res"), "--name", "toy")
    root = tmp_path / "res" / "toy"
    log = tmp_path / "driver.log"

    def stop_in_flight(stage: str, sig: int, epoch: int = 3) -> Path:
        t0 = time.time()
        p = start(*args, log=log)
        victim = wait_for(
            lambda: trial_in_flight(root, stage, epoch, since=t0), 240, f"{stage} trial at epoch {epoch}", p, log
        )
        kill_hard(p, sig)
        assert p.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), log.read_text()[-2000:]
        return victim

    def stop_at_pause(phase: str, sig: int, during=None) -> None:
        p = start(*args, log=log, env_extra={"STUDY_FAULT": f"pause:{phase}:60"})
        wait_for(_wait_log(log, f"pausing at {phase}"), 240, f"the pause at {phase}", p, log)
        if during:
            during(p)
        kill_hard(p, sig)
        assert p.returncode == 130, log.read_text()[-2000:]

    # SIGKILL mid stage 1, then a torn write of that trial's newest checkpoint.
    victim1 = stop_in_flight("stage1", signal.SIGKILL)
    victim1_started = events(victim1)[0]["t"]  # identifies it later, even if adopted by a new trial
    ckpts = sorted((victim1 / "ckpt").glob("epoch-*.pt"))
    assert len(ckpts) >= 2, ckpts  # three when the kill fell between a save and the old one's removal
    fallback_epoch = int(ckpts[-2].stem.split("-")[1])
    ckpts[-1].write_bytes(ckpts[-1].read_bytes()[:100])
    st = json.loads(study("status", str(root), "--format", "json", timeout=60).stdout)
    assert not st["complete"] and not st["running"]
    assert st["experiments"][0]["counts"]["interrupted"] >= 1

    stop_in_flight("stage1", signal.SIGINT)

    def refused(p):  # a second `study run` on the same folder names the running one
        second = study(*args, timeout=120)
        assert second.returncode == 2 and second.stderr.count("\n") == 1
        assert f"pid {p.pid}" in second.stderr and "in use" in second.stderr

    stop_at_pause("between-stages", signal.SIGTERM, during=refused)
    stop_in_flight(TOY_STAGE2, signal.SIGTERM)
    stop_in_flight(TOY_STAGE2, signal.SIGKILL)
    # What a hard kill during Tune's (non-atomic) copy of its snapshot once left behind: an empty
    # search_gen_state file. The next run must restore the previous snapshot, not start over.
    snapshots = root / "tune" / "search"  # one Tune experiment for the whole study
    sorted(snapshots.glob("search_gen_state-*.json"))[-1].write_bytes(b"")
    stop_at_pause("final-eval", signal.SIGINT)
    assert not (root / "done.json").exists()
    stop_at_pause("tables", signal.SIGTERM)

    r = study(*args, timeout=400)
    assert r.returncode == 0, log.read_text()[-3000:] + r.stdout + r.stderr
    rows = assert_complete(root, toy_budgets())
    by_trial = {r["trial_id"]: r for r in rows}
    (v1_dir,) = [d for d in (root / "trials" / "stage1").glob("trial-*") if events(d)[0]["t"] == victim1_started]
    v1 = by_trial[v1_dir.name.split("-")[-1]]
    starts = [e["start_epoch"] for e in events(v1_dir) if e.get("event") == "start"]
    assert starts[1] == fallback_epoch  # the truncated newest checkpoint was skipped for the one before
    assert int(v1["resumed_from_epoch"]) >= fallback_epoch
    assert "unusable" in v1["notes"]
    assert any(int(r["resumed_from_epoch"]) > 0 for r in rows if r["stage"] == "stage2")
    # the searchers kept their history: the restored stage-1 study holds exactly the budgeted trials
    state = sorted(glob.glob(str(root / "tune" / "search" / "searcher-state-*.pkl")))[-1]
    with open(state, "rb") as f:
        ot = pickle.load(f)["searchers"]["stage1"].subs[TOY_VARIANT].study
    n_tuned = toy_budgets()[("stage1", TOY_VARIANT)]
    assert [t.state for t in ot.trials] == [optuna.trial.TrialState.COMPLETE] * n_tuned
    assert len(list((snapshots / ".torn-snapshots").iterdir())) == 3  # the torn set was set aside
    assert "torn" in log.read_text() or "torn" in r.stdout
    _same_tables(root, toy_study)


# The phases of a study in the order it passes them. Trial phases are hit while a trial of that stage is
# mid-way (its newest checkpoint between two epochs); the others are driver phase boundaries where a
# STUDY_FAULT pause holds the driver for a minute, so the kill lands in them for certain.
PHASES = ("stage1", "between-stages", "stage2", "final-eval", "tables")
PAUSED = ("between-stages", "final-eval", "tables")
RANDOM_E1, RANDOM_E2 = 30, 80  # epochs of the random-kill space's stage-1 and WB stage-2 trials
# A trial-phase kill aims at a trial whose newest epoch is in [k, hi] (k drawn from 2-8; tau-norm and
# NCM trials have one epoch, so only WB trials qualify in stage 2): at least 15 stage-1 epochs (~3 s
# on 2 CPU cores) or 40 WB epochs (~3 s) of that trial are still to run when the signal is sent.
WINDOW_HI = {"stage1": RANDOM_E1 - 15, "stage2": RANDOM_E2 - 40}
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
TRIALS_OF = {"stage1": "stage1", "stage2": TOY_STAGE2}
"""The folder under trials/ of each trial phase's experiment."""


def phase_on_disk(root: Path) -> str:
    """The phase a study folder is in, from what the driver writes at the end of each phase: the
    stage markers (stages/stage1.json, stages/stage2-<variant>.json), the final test reports (final/*.json,
    one per stage and method) and done.json; between the stages no stage-2 trial folder exists yet."""
    if (root / "done.json").exists():
        return "done"
    if not (root / "stages" / "stage1.json").exists():
        return "stage1"
    if not (root / "stages" / f"{TOY_STAGE2}.json").exists():
        return "stage2" if any((root / "trials" / TOY_STAGE2).glob("trial-*")) else "between-stages"
    finals = {p.name for p in (root / "final").glob("*.json")}
    return "tables" if finals == {f"{s}--{m}.json" for s, m in toy_budgets()} else "final-eval"


def random_draws(seed: int, n: int) -> list[dict]:
    """n seeded kills in the order the study can meet them: phase, signal, and the moment inside the
    phase (trial phases: the epoch k to wait for, then a delay of up to 0.25 s; paused phases: a delay
    of up to 3 s into the 60-s pause)."""
    rng = random.Random(seed)
    phases = sorted(rng.choices(PHASES, k=n), key=PHASES.index)
    draws = []
    for phase in phases:
        sig = rng.choice(SIGNALS)
        if phase in PAUSED:
            draws.append({"phase": phase, "sig": sig, "epoch": None, "delay": rng.uniform(0.0, 3.0)})
        else:
            draws.append({"phase": phase, "sig": sig, "epoch": rng.randint(2, 8), "delay": rng.uniform(0.0, 0.25)})
    return draws


def _mid_trial(root: Path, stage: str, lo: int, hi: int, since: float):
    """(trial folder, newest epoch) of an unfinished ``stage`` trial whose newest epoch checkpointed
    since ``since`` is in [lo, hi]."""
    folder = root / "trials" / TRIALS_OF[stage]
    for tdir in sorted(folder.glob("trial-*")) if folder.is_dir() else []:
        if (tdir / "record.json").exists():
            continue
        eps = [e.get("epoch", 0) for e in events(tdir) if e.get("event") == "epoch" and e.get("t", 0) >= since]
        if eps and lo <= max(eps) <= hi:
            return tdir, max(eps)
    return None


@pytest.mark.parametrize(
    "seed, n_kills, store",
    [
        pytest.param(1, 2, "", id="2-kills"),
        pytest.param(20241123, 6, "", id="6-kills", marks=pytest.mark.slow),
        pytest.param(1, 2, "s3", id="2-kills-s3-store", marks=pytest.mark.slow),
        pytest.param(20241123, 6, "s3", id="6-kills-s3-store", marks=pytest.mark.slow),
    ],
)
def test_kills_at_random_moments(tmp_path, toy_study, seed, n_kills, store, request):
    """Seeded random phases, moments inside them and signals: each kill lands in the phase it aimed
    at (read from the study folder and the driver's output at the moment of the signal), every trial
    killed mid-way later resumes from its checkpoint, and the study still ends exactly as an
    uninterrupted one. Also with the trials' files in an S3 store (``--store``), where the driver alone
    writes the results folder."""
    draws = random_draws(seed, n_kills)
    space = toy_space(tmp_path, e1=RANDOM_E1, e2=RANDOM_E2)
    args = ("run", str(space), "--results-dir", str(tmp_path / "res"), "--name", "toy")
    env_extra: dict = {}
    if store:
        args += ("--store", request.getfixturevalue("s3").uri("study-test", f"kills-{seed}-{n_kills}"))
        env_extra = S3_ENV
    root = tmp_path / "res" / "toy"
    log = tmp_path / "driver.log"
    aimed, hit, victims = [], [], []
    for draw in draws:
        phase, sig = draw["phase"], draw["sig"]
        log_start = log.stat().st_size if log.exists() else 0

        def output(log_start: int = log_start) -> str:
            return log.read_bytes()[log_start:].decode(errors="replace")

        t0 = time.time()
        if phase in PAUSED:
            p = start(*args, log=log, env_extra={**env_extra, "STUDY_FAULT": f"pause:{phase}:60"})
            wait_for(lambda phase=phase: f"pausing at {phase}" in output(), 300, f"the pause at {phase}", p, log)
        else:
            p = start(*args, log=log, env_extra=env_extra)
            victim, epoch = wait_for(
                lambda phase=phase, draw=draw, t0=t0: _mid_trial(root, phase, draw["epoch"], WINDOW_HI[phase], t0),
                300,
                f"a {phase} trial between epochs {draw['epoch']} and {WINDOW_HI[phase]}",
                p,
                log,
            )
        time.sleep(draw["delay"])
        # where the signal lands: the folder's phase and, for the pauses, the pause the driver announced
        paused_at = [ln.rsplit(" ", 1)[-1] for ln in output().splitlines() if "fault-injection: pausing at" in ln]
        hit.append((phase_on_disk(root), paused_at[-1] if paused_at else None))
        aimed.append((phase, phase if phase in PAUSED else None))
        assert p.poll() is None, log.read_text()[-2000:]
        t_kill = time.time()
        if phase not in PAUSED:
            victims.append((phase, events(victim)[0]["t"], epoch, t_kill))
        kill_hard(p, sig)
        expected = -signal.SIGKILL if sig == signal.SIGKILL else 130
        assert p.returncode == expected, (draw, p.returncode, log.read_text()[-2000:])
        assert phase_on_disk(root) == phase, draw  # the killed run wrote nothing of the next phase
    assert hit == aimed, draws

    r = study(*args, timeout=400, env_extra=env_extra)
    assert r.returncode == 0, log.read_text()[-3000:] + r.stdout + r.stderr
    rows = assert_complete(root, toy_budgets())
    # every trial killed mid-way resumed from a checkpoint at least as new as the epoch it had reached,
    # instead of starting over (found by its first event: a trial Tune's snapshot had missed is adopted,
    # events and checkpoints, by a new trial folder)
    for stage, started, epoch, t_kill in victims:
        (tdir,) = [
            d
            for d in (root / "trials" / TRIALS_OF[stage]).glob("trial-*")
            if events(d) and events(d)[0]["t"] == started
        ]
        starts = [e for e in events(tdir) if e.get("event") == "start" and e["t"] > t_kill]
        assert starts and starts[0]["start_epoch"] >= epoch, (stage, epoch, starts)
        row = next(r for r in rows if r["trial_id"] == tdir.name.split("-")[-1])
        assert int(row["resumed_from_epoch"]) >= epoch
    _same_tables(root, toy_study)


@pytest.mark.parametrize("store", ["", pytest.param("s3", id="s3-store", marks=pytest.mark.slow)])
def test_diverging_and_raising_trials(tmp_path, store, request):
    """NaN trials are recorded as diverged (never a number Optuna could pick); a trial that raises is
    retried from its checkpoint; one that keeps raising is recorded as failed; the study finishes. Also
    with the trials' files in an S3 store: the driver copies the tracebacks into the trials' folders."""
    extra = """\
    cb-wd:
      weight_decay: 1.0e+6
    cb-maxnorm:
      weight_decay: {choice: [1.0e+6]}
      budget: 2
"""
    space = toy_space(tmp_path, e1=4, e2=3, extra=extra)
    faults = f"raise:stage1:{TOY_VARIANT}:2:1,raise:{TOY_STAGE2}:ncm:1:5"
    store_args: tuple = ()
    env_extra = {"STUDY_FAULT": faults}
    if store:
        store_args = ("--store", request.getfixturevalue("s3").uri("study-test", f"faults-{tmp_path.name}"))
        env_extra.update(S3_ENV)
    r = study(
        "run",
        str(space),
        "--results-dir",
        str(tmp_path / "res"),
        "--name",
        "f",
        *store_args,
        timeout=400,
        env_extra=env_extra,
    )
    root = tmp_path / "res" / "f"
    assert r.returncode == 0, r.stdout + r.stderr
    assert (root / "done.json").exists()
    rows = read_rows(root / "trials.csv")

    def status(method):
        return {(r["trial_id"], r["status"], r["reason"]) for r in rows if r["method"] == method}

    for _, st, reason in status("cb-wd") | status("cb-maxnorm"):
        assert st == "diverged" and ("nan" in reason.lower() or "inf" in reason.lower()), reason
    assert len(status("cb-maxnorm")) == 2
    (ncm,) = status("ncm")
    assert ncm[1] == "failed" and "injected fault" in ncm[2]
    tuned = [r for r in rows if r["method"] == TOY_VARIANT]
    assert {r["status"] for r in tuned} == {"completed"}
    assert {int(r["resumed_from_epoch"]) for r in tuned} == {1}  # raised at epoch 2, resumed after epoch 1
    assert not any(r["selected"] == "True" for r in rows if r["method"] in ("cb-wd", "cb-maxnorm", "ncm"))
    # the terminal shows one line per failed attempt; the traceback stays in the trial's folder
    terminal = r.stdout + r.stderr
    assert "Traceback (most recent call last)" not in terminal, terminal[-3000:]
    lines = [ln for ln in terminal.splitlines() if "raised" in ln and "injected fault" in ln]
    assert len(lines) >= 3, terminal[-3000:]
    tb_files = [d / "traceback.txt" for d in (root / "trials").glob("*/trial-*") if (d / "traceback.txt").exists()]
    # both ce-wd trials raise once (the spec names the method), the ncm trial on each attempt
    assert len(tb_files) == 3 and all("Traceback (most recent call last)" in f.read_text() for f in tb_files)
    raised = "\n".join(lines)
    assert all(f"{f.parent.parent.name}/{f.parent.name}" in raised for f in tb_files), (tb_files, terminal[-4000:])

    # Inside the search: Optuna was told FAIL, never a NaN value.
    state = sorted(glob.glob(str(root / "tune" / "search" / "searcher-state-*.pkl")))[-1]
    with open(state, "rb") as f:
        searcher = pickle.load(f)["searchers"][TOY_STAGE2]
    ot = searcher.subs["cb-maxnorm"].study
    assert [t.state for t in ot.trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all(t.user_attrs.get("status") == "diverged" for t in ot.trials)
    db = optuna.load_study(study_name=f"{TOY_STAGE2}-cb-maxnorm", storage=f"sqlite:///{root / 'optuna.db'}")
    assert [t.state for t in db.trials] == [optuna.trial.TrialState.FAIL] * 2
    with pytest.raises(ValueError):
        _ = db.best_trial

    # The tables say what failed.
    main = (root / "tables" / "main.md").read_text()
    assert "diverged" in main and "failed" in main


def test_unwritable_results_folder(tmp_path, capsys):
    from study.cli import main

    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        space = toy_space(tmp_path)
        rc = main(["run", str(space), "--results-dir", str(locked / "res")])
        err = capsys.readouterr().err
        assert rc == 2 and "cannot write" in err and str(locked) in err and err.count("\n") == 1
        assert list(locked.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(locked)])


def test_nearly_full_disk_is_refused(tmp_path, monkeypatch):
    import shutil

    from study.errors import UserError
    from study.fsutil import check_writable

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    with pytest.raises(UserError, match="MB free"):
        check_writable(tmp_path / "res")


def test_atomic_write_survives_a_full_disk(tmp_path, monkeypatch):
    """A write that fails half-way (ENOSPC) leaves the previous trials.csv intact and no temp file."""
    from study import fsutil

    target = tmp_path / "trials.csv"
    fsutil.atomic_write_text(target, "old,content\n")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil.os, "fsync", disk_full)
    with pytest.raises(OSError):
        fsutil.atomic_write_text(target, "new," * 10000)
    assert target.read_text() == "old,content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["trials.csv"]


def test_stale_lock_is_taken_over_and_live_lock_refuses(tmp_path):
    from study.errors import UserError
    from study.fsutil import StudyLock

    lock = StudyLock(tmp_path)
    tmp_path.joinpath(".lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename, "started": 0}))
    lock.acquire("test")  # the owner is dead: stale, taken over
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    other = StudyLock(tmp_path)
    with pytest.raises(UserError, match=f"pid {os.getpid()}"):
        other.acquire("second")
    lock.release()
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_during_ray_init_is_not_lost(sig, monkeypatch):
    """A stop request while ray.init starts Ray's processes is recorded, not raised inside it (where
    an at-fork hook or Ray's own ``sys.exit`` handler would swallow it), and acted on as soon as it
    returns; a second request interrupts at once. Ray cannot replace the SIGTERM handler meanwhile."""
    from ray._private import utils as ray_utils

    from study.search import ray_runtime as search

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    ray_set_handler = ray_utils.set_sigterm_handler
    search._STOP.clear()
    for s in saved:
        signal.signal(s, search._on_stop_signal)
    seen = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with search.stop_signals_deferred():
                ray_utils.set_sigterm_handler(lambda *a: seen.append("ray's handler"))
                assert signal.getsignal(signal.SIGTERM) is search._on_stop_signal
                os.kill(os.getpid(), sig)
                time.sleep(0.1)  # the handler runs here: it must record the request, not raise
                seen.append("survived the first signal")
                if sig == signal.SIGINT:  # a second Ctrl-C does not wait for ray.init
                    with pytest.raises(KeyboardInterrupt):
                        os.kill(os.getpid(), sig)
                        time.sleep(0.1)
                    seen.append("second signal raised")
        assert seen == ["survived the first signal"] + (["second signal raised"] if sig == signal.SIGINT else [])
        assert search._STOP.is_set()
        assert (
            ray_utils.set_sigterm_handler is ray_set_handler
            and signal.getsignal(signal.SIGTERM) is search._on_stop_signal
        )
    finally:
        search._STOP.clear()
        for s, h in saved.items():
            signal.signal(s, h)


def test_a_damaged_or_deleted_optuna_db_is_rebuilt_from_the_records(toy_study, tmp_path):
    """optuna.db is derived from the trial records: overwritten with garbage, `study status` rebuilds
    it and says so in one line; deleted, `study run` on the finished study does the same. Optuna reads
    the rebuilt database with every budgeted trial."""
    import shutil

    root = tmp_path / "res" / "toy"
    shutil.copytree(toy_study, root, ignore=shutil.ignore_patterns("*.pt"))
    storage = f"sqlite:///{root / 'optuna.db'}"

    def assert_readable():
        for (experiment, method), n in toy_budgets().items():
            st = optuna.load_study(study_name=f"{experiment}-{method}", storage=storage)
            assert len(st.trials) == n

    (root / "optuna.db").write_bytes(b"this is not a database" * 100)
    r = study("status", str(root), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("\n") == 1 and "optuna.db" in r.stderr and "rebuilt" in r.stderr, r.stderr
    assert_readable()
    again = study("status", str(root), timeout=120)
    assert again.stderr == ""  # nothing to repair any more
    (root / "optuna.db").unlink()
    r = study("run", str(toy_space(tmp_path)), "--results-dir", str(tmp_path / "res"), "--name", "toy", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "is missing; rebuilt it from the trial records" in r.stdout and "is complete" in r.stdout
    assert_readable()
