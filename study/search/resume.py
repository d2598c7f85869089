"""Resume and repair: what makes an interrupted study continue where it stopped, whatever state a
hard kill left Tune's files in.

Tune uploads its experiment snapshot asynchronously and with plain copies, so after a hard kill the
stored snapshot can be torn (:func:`usable_snapshot` sets it aside for the previous one) or miss
trials that had already run (:func:`set_aside_orphans` moves their folders to ``.adopt/``, where
the next trial of their method claims them — :func:`claim_orphan`, in the searcher — and takes
over their checkpoints — :func:`adopt_claimed`, in the trainable). The budget stays exact and no
work is lost.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from study import compat
from study.compat import SNAPSHOT_FILES
from study.fsutil import atomic_write_text, read_jsonl
from study.layout import (
    ADOPT_POOL,
    CLAIM_FILE,
    EVENTS_FILE,
    FAILED_FILE,
    StudyPaths,
    TrialInfo,
    TrialRecord,
    parse_trial_dirname,
)
from study.results.records import tune_trials


def usable_snapshot(exp_dir: Path, log: Callable[[str], None]) -> bool:
    """Make the newest of Tune's experiment snapshots a readable one; False if none is.

    Tune copies its snapshot files into the results folder with plain (non-atomic) copies, so a
    hard kill can leave one torn (seen: an empty search_gen_state file). Tune's restore then fails
    and it silently starts the experiment over. A torn set is moved to ``.torn-snapshots/`` so that
    Tune restores the previous, complete one instead."""
    stamps = compat.snapshot_stamps(exp_dir)
    while stamps:
        stamp = stamps.pop()
        if compat.snapshot_readable(exp_dir, stamp):
            return True
        aside = exp_dir / ".torn-snapshots"
        aside.mkdir(exist_ok=True)
        for name in SNAPSHOT_FILES:
            if (exp_dir / name.format(stamp)).exists():
                (exp_dir / name.format(stamp)).rename(aside / name.format(stamp))
        log(f"{exp_dir.name}: Tune's snapshot {stamp} is torn (a hard kill during its write); set aside")
    return False


def set_aside_orphans(paths: StudyPaths, experiment: str, log: Callable[[str], None]) -> None:
    """Trial folders that Tune's stored snapshot does not know: trials that ran before a hard kill
    (Tune uploads its snapshot asynchronously, so it can lag behind by a few seconds) or belong to
    an attempt that is being started over. Tune will issue new trials in their place (the budget
    stays exact); so that their work is not lost, they wait in ``trials/<stage>/.adopt/`` for the
    next trial of their method (``MethodSearcher.suggest``). Folders with nothing to continue go to
    ``.orphaned/``. Claims made by trials that the snapshot does not know either are released."""
    known = set(tune_trials(paths, experiment))
    folder = paths.trials / experiment
    if not folder.is_dir():
        return
    pool = paths.adopt_pool(experiment)
    for tdir in folder.iterdir():
        parsed = parse_trial_dirname(tdir.name)
        if not parsed or parsed[1] in known:
            continue
        adoptable = (tdir / TrialInfo.FILE).exists() and not (tdir / FAILED_FILE).exists()
        dest = (pool if adoptable else folder / ".orphaned") / tdir.name
        dest.parent.mkdir(exist_ok=True)
        tdir.rename(dest)
        log(
            f"{experiment}: trial {tdir.name} is missing from Tune's last snapshot (a hard kill); "
            + ("its method's next trial continues it" if adoptable else "nothing to continue")
        )
    if pool.is_dir():
        for entry in pool.iterdir():
            claim = entry / CLAIM_FILE
            if claim.exists() and claim.read_text().strip() not in known:
                claim.unlink()


def claim_orphan(stage_dir: Path, method: str, trial_id: str) -> tuple[str, TrialInfo] | None:
    """Reserve the most advanced waiting orphan of ``method`` for ``trial_id``; its folder name and trial.json."""
    pool = stage_dir / ADOPT_POOL
    if not pool.is_dir():
        return None
    free = []
    for entry in sorted(pool.iterdir()):
        info = TrialInfo.read(entry / TrialInfo.FILE)
        if not info or info.method != method:
            continue
        claim = entry / CLAIM_FILE
        if claim.exists():
            if claim.read_text().strip() == trial_id:
                return entry.name, info
            continue
        progress = (
            float("inf")
            if (entry / TrialRecord.FILE).exists()
            else max(
                (e.get("epoch", 0) for e in read_jsonl(entry / EVENTS_FILE) if e.get("event") == "epoch"), default=0
            )
        )
        free.append((progress, entry.name, entry, info))
    if not free:
        return None
    _, _, entry, info = max(free, key=lambda f: (f[0], f[1]))
    atomic_write_text(entry / CLAIM_FILE, trial_id)
    return entry.name, info


def adopt_claimed(stage_dir: Path, trial_id: str, tdir: Path) -> str | None:
    """In the trainable (with a store apart from the results folder: in the driver, at the trial's first
    report): move the orphan claimed for ``trial_id`` (its checkpoints, events, record and final
    weights) into the trial's own folder. Returns the orphan's folder name, if any."""
    pool = stage_dir / ADOPT_POOL
    if not pool.is_dir():
        return None
    for entry in pool.iterdir():
        claim = entry / CLAIM_FILE
        if not claim.exists() or claim.read_text().strip() != trial_id:
            continue
        for item in entry.iterdir():
            if item.name not in (TrialInfo.FILE, CLAIM_FILE) and not (tdir / item.name).exists():
                item.rename(tdir / item.name)
        shutil.rmtree(entry, ignore_errors=True)
        return entry.name
    return None
