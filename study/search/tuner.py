"""Running (or restoring) the study's one Tune experiment: the Tuner with the study's searcher
(``study.search.searchers``), the per-method scheduler, the failure callback and the trainable
(``study.search.trainable``).

One Tuner runs the whole study (every stage and method): its workers start once and serve every
trial, stage-1 and stage-2 alike (starting a worker — a process importing Ray Tune and torch — costs
seconds), and short stage-2 trials of every method share the workers and the GPU concurrently.
:class:`StudySearcher` opens an experiment once the one it depends on has ended (stage 2 after
stage 1, whose selection it needs), writes each experiment's stage marker when its last trial ends,
and caps the trials in flight at the cluster's slots; :class:`MethodSearcher` routes each trial of
one experiment to its method's Optuna study and keeps every method's budget exact;
:class:`MethodScheduler` gives each method its own ASHA early stopping (if the space asks for it) so
methods are never compared with each other.
Tune is given no checkpoints: a trial resumes from its own (``study.training.trial``), so restoring a trial
just calls its function again. Optuna keeps in-memory storage inside the searcher, pickled with
Tune's snapshot: a persistent (SQLite) storage shared with a restored searcher crashes restores
after a hard kill, so ``optuna.db`` is rebuilt from the trial records instead (``study.results.records``).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from study import compat
from study.config.spaces import Experiment, StudySpace
from study.fsutil import atomic_write_json
from study.layout import FAILED, FAILED_FILE, TRACEBACK_FILE, StudyPaths, parse_trial_dirname, trial_experiment
from study.results.records import error_reason, optuna_study_name
from study.search.mirror import TrialMirror
from study.search.ray_runtime import request_stop, trial_slots
from study.search.resume import set_aside_orphans, usable_snapshot
from study.search.searchers import OBJECTIVE, MethodSearcher, OptunaSearcher, RunSettings, StudySearcher
from study.search.trainable import DISK_FULL_KEY, _index_of, study_trainable, tune_trial_dirname
from study.store import Store

_USER_MAX_PENDING = "TUNE_MAX_PENDING_TRIALS_PG" in os.environ  # set by the user: theirs to keep


class MethodScheduler(FIFOScheduler):
    """Per-method early stopping: trials go to their (experiment, method)'s ASHA (if it has one), so
    a method's trials are only ever compared with each other; other trials run to the end."""

    def __init__(self, schedulers: dict[str, ASHAScheduler]):
        super().__init__()
        self.schedulers = schedulers
        """``<experiment>/<method>`` -> its ASHA."""
        self.added: dict[str, set[str]] = {k: set() for k in schedulers}
        """``<experiment>/<method>`` -> the trials its ASHA has been given. Like ASHA's own state, not
        kept across a restore (Tune rebuilds its scheduler as constructed): a restored trial is
        given to its ASHA again at its first result."""

    def _key(self, trial) -> str:
        config = trial.config or {}
        return self.key(trial_experiment(config), config.get("method"))

    def _sub(self, trial) -> TrialScheduler | None:
        return self.schedulers.get(self._key(trial))

    def _known(self, trial) -> TrialScheduler | None:
        """The trial's ASHA if the trial has been given to it."""
        key = self._key(trial)
        return self.schedulers[key] if trial.trial_id in self.added.get(key, ()) else None

    def _forget(self, trial) -> None:
        self.added.get(self._key(trial), set()).discard(trial.trial_id)

    @staticmethod
    def key(experiment: str | None, method: str | None) -> str:
        return f"{experiment}/{method}"

    def set_search_properties(self, metric, mode, **spec) -> bool:
        for s in self.schedulers.values():
            s.set_search_properties(metric, mode, **spec)
        return True

    def on_trial_add(self, tune_controller, trial) -> None:
        if (s := self._sub(trial)) is not None:
            s.on_trial_add(tune_controller, trial)
            self.added[self._key(trial)].add(trial.trial_id)

    def on_trial_error(self, tune_controller, trial) -> None:
        if (s := self._known(trial)) is not None:
            s.on_trial_error(tune_controller, trial)
            self._forget(trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        s = self._sub(trial)
        if s is None or result.get(OBJECTIVE) is None:
            return TrialScheduler.CONTINUE
        if self._known(trial) is None:  # a restored trial: ASHA keeps no state across restores
            self.on_trial_add(tune_controller, trial)
        return s.on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if (s := self._known(trial)) is not None:
            if result.get(OBJECTIVE) is None:
                s.on_trial_remove(tune_controller, trial)
            else:
                s.on_trial_complete(tune_controller, trial, result)
            self._forget(trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        if (s := self._known(trial)) is not None:
            s.on_trial_remove(tune_controller, trial)
            self._forget(trial)

    def debug_string(self) -> str:
        return "MethodScheduler(" + ", ".join(self.schedulers) + ")"


class DiskFullStop(tune.Callback):
    """Stops the study when a trial reports that the disk is full (``trainable.DISK_FULL_KEY``)."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        line = result.get(DISK_FULL_KEY)
        if line:
            request_stop(str(line))


class FailureRecorder(tune.Callback):
    """Writes ``failed.json`` into the study's trial folder when Tune gives up on a trial (after
    ``search.retries`` retries), with the exception's last line as the reason."""

    store = ""
    """The study's store URI when it is apart from the results folder: the trial's tracebacks (and
    trial.json) are copied from there. (Also a class attribute: the value of callbacks pickled before
    stores existed.)"""

    def __init__(self, root: str, store: str = ""):
        self.root = root
        self.store = store

    def on_trial_error(self, iteration, trials, trial, **info):
        try:
            experiment = trial_experiment(trial.config)
            paths = StudyPaths(Path(self.root))
            tdir = paths.trial_dir(experiment, _index_of(trial), trial.trial_id)
            tdir.mkdir(parents=True, exist_ok=True)
            if self.store:
                from study.search.mirror import TrialMirror
                from study.store import open_store

                TrialMirror(paths, open_store(self.store)).fetch_failed(tdir)
            atomic_write_json(
                tdir / FAILED_FILE,
                {
                    "status": FAILED,
                    "reason": error_reason(getattr(trial, "error_file", None)),
                    "num_failures": getattr(trial, "num_failures", None),
                },
            )
        except Exception:  # noqa: BLE001 - bookkeeping must never break the study
            pass


def _trial_error_line(paths: StudyPaths, trial_name: str, exc: BaseException | None) -> str:
    """One line for a failed trial attempt: which trial, what it raised, where its traceback is."""
    text = str(exc or "").strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    what = lines[-1] if lines else type(exc).__name__
    # the name ends with the trial id (Tune's "<trainable>_<id>"); ids are matched against the folders,
    # since an id of decimal digits alone would read as part of a longer hex run
    tdir = next(
        (
            d
            for d in paths.trials.glob("*/trial-*")
            if (parsed := parse_trial_dirname(d.name)) and trial_name.endswith(f"_{parsed[1]}")
        ),
        None,
    )
    where = f"{tdir.parent.name}/{tdir.name}" if tdir else trial_name
    # the trainable writes the file as the exception leaves it: name it even if the line comes first
    tb = f"; traceback in {tdir / TRACEBACK_FILE}" if tdir else ""
    return f"trial {where} raised {what[:300]} (retried from its last checkpoint while search.retries allow){tb}"


# --- the study's Tune experiment ----------------------------------------------------------------------


def _experiment_constants(exp: Experiment, space: StudySpace) -> dict:
    return {
        "configs": {p.method: asdict(p.config) for p in exp.plans},
        "backbone": space.backbone_of(exp.variant) if exp.variant else None,
    }


def _method_searcher(exp: Experiment, space: StudySpace, paths: StudyPaths) -> MethodSearcher:
    subs: dict[str, OptunaSearcher | None] = {}
    for i, p in enumerate(exp.plans):
        if not p.params:
            subs[p.method] = None
            continue
        sampler = optuna.samplers.TPESampler(
            seed=space.search.sampler_seed + i, n_startup_trials=space.search.startup_trials
        )
        subs[p.method] = OptunaSearcher(
            {k: d.to_optuna() for k, d in p.params.items()}, sampler, optuna_study_name(exp.name, p.method)
        )
    return MethodSearcher(subs, {p.method: p.budget for p in exp.plans}, str(paths.trials / exp.name))


def _make_tuner(space: StudySpace, paths: StudyPaths, trainable, cpus: float, slots: int, store: str = ""):
    experiments = space.experiments()
    searcher = StudySearcher(
        paths,
        experiments,
        {e.name: _method_searcher(e, space, paths) for e in experiments},
        {e.name: _experiment_constants(e, space) for e in experiments},
        max_live=slots,
        seeds=space.seeds,
        eval_cfg=asdict(space.eval),
        store=store,
    )
    # ASHA counts our epochs, not Tune's training_iteration (which restarts when a trial is restarted).
    asha = {
        MethodScheduler.key(e.name, p.method): ASHAScheduler(
            time_attr="epoch",
            max_t=p.config.epochs,
            grace_period=p.scheduler.grace_period,
            reduction_factor=p.scheduler.reduction_factor,
        )
        for e in experiments
        for p in e.plans
        if p.scheduler is not None
    }
    tune_config = tune.TuneConfig(
        metric=OBJECTIVE,
        mode="max",
        search_alg=searcher,
        scheduler=MethodScheduler(asha) if asha else None,
        # the searcher alone ends the search (exact budgets, also after a
        # restore from snapshot files of different steps), not Tune's count
        num_samples=-1,
        reuse_actors=True,
        trial_dirname_creator=tune_trial_dirname,
    )
    run_config = tune.RunConfig(
        name=paths.tune_experiment.name,
        storage_path=str(paths.tune),
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=space.search.retries),
        callbacks=[FailureRecorder(str(paths.root), store), DiskFullStop()],
    )
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def _wrap_trainable(data, cpus: float, gpus: float):
    # with_parameters first, then with_resources: with_resources mutates the function it is given.
    return tune.with_resources(tune.with_parameters(study_trainable, data=data), {"cpu": cpus, "gpu": gpus})


def run_search(
    space: StudySpace,
    paths: StudyPaths,
    data,
    cpus: float,
    gpus: float,
    log: Callable[[str], None],
    on_stage2: Callable[[], None] | None = None,
    start_ahead: bool = True,
    store: Store | None = None,
) -> None:
    """Run or resume the study's Tune experiment until every experiment has ended (its stage marker
    written) or the study is stopped; the caller tells the two apart by the markers. ``on_stage2``
    runs once, in the driver, at the first result of a stage-2 trial. ``start_ahead``: stage-2 trials
    may start in the workers of the last stage-1 trials before stage 2 opens (not on a shared cluster,
    whose resources can shrink under waiting trials, nor with a ``store`` apart from the results folder,
    where the trials cannot wait for the folder's opening mark). ``store``: where trials keep their files
    when not in the results folder (``study.store``; the driver then writes their folders,
    ``study.search.mirror``)."""
    exp_dir = paths.tune_experiment
    trainable = _wrap_trainable(data, cpus, gpus)
    slots = trial_slots(cpus, gpus, space.search.max_concurrent)
    # Tune keeps one trial pending at a time for a custom searcher: the second worker would start
    # only once the first runs (~1 s on a CPU). Every slot may be pending at once; the searcher
    # never proposes more trials than slots (StudySearcher.max_live).
    if not _USER_MAX_PENDING:
        os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(slots)
    StudySearcher.run = RunSettings(
        log=log,
        on_stage2=on_stage2,
        slots=slots,
        ahead=max(0, slots - 1) if start_ahead and store is None else 0,
        cpus_per_trial=cpus,
        mirror=TrialMirror(paths, store) if store is not None else None,
    )
    unfinished = [e.name for e in space.experiments() if not paths.stage_marker(e.name).exists()]
    if exp_dir.exists() and usable_snapshot(exp_dir, log) and tune.Tuner.can_restore(str(exp_dir)):
        log("resuming the search")
        for name in unfinished:
            set_aside_orphans(paths, name, log)
        # Unfinished trials keep their ids and run their function again, which resumes from the
        # trial's own checkpoint. (RESTART would give them new ids.) Errored trials stay failed.
        tuner = tune.Tuner.restore(
            str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False
        )
    else:
        if exp_dir.exists():
            # Built but never snapshotted (restoring would silently run one trial: docs/reference.md §7),
            # or no readable snapshot: start the search afresh (finished experiments stay finished);
            # trials of the old attempt are set aside, and continued.
            exp_dir.rename(exp_dir.with_name(f"{exp_dir.name}.unusable-{int(time.time())}"))
        for name in unfinished:
            set_aside_orphans(paths, name, log)
        tuner = _make_tuner(space, paths, trainable, cpus, slots, store.uri if store is not None else "")
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with compat.one_line_trial_errors(lambda name, exc: _trial_error_line(paths, name, exc)):
            results = tuner.fit()  # returns normally on Ctrl-C, with the unfinished trials not terminated
    finally:
        # Tune restores the previous SIGINT handler only when it was interrupted; after a normal fit
        # its handler would swallow a later Ctrl-C (in the final evaluation).
        signal.signal(signal.SIGINT, sigint)
        StudySearcher.run = RunSettings()
    # The Tuner sits in reference cycles holding Ray objects (the dataset put by with_parameters):
    # collected later, after ray.shutdown, their finalizers reach the dead core worker, which aborts
    # the driver (exit 1, "The core worker has already been shutdown"). Collect them now, Ray up.
    del results, tuner, trainable
    import gc

    gc.collect()
