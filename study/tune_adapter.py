"""The Ray Tune adapter: the trainable that runs one trial in a Ray worker, the searcher that gives
every method its own Optuna study and exact budget inside one Tuner, the per-method scheduler, the
failure callback, and running (or restoring) one stage's Tune experiment.

One Tuner per stage (rather than per method) lets short stage-2 trials of every method share the
workers and the GPU concurrently. :class:`MethodSearcher` routes each trial to its method's Optuna
study and keeps every method's budget exact; :class:`MethodScheduler` gives each method its own
ASHA early stopping (if the space asks for it) so methods are never compared with each other.
Tune is given no checkpoints: a trial resumes from its own (``study.trial``), so restoring a trial
just calls its function again. Optuna keeps in-memory storage inside the searcher, pickled with
Tune's snapshot: a persistent (SQLite) storage shared with a restored searcher crashes restores
after a hard kill, so ``optuna.db`` is rebuilt from the trial records instead (``study.records``).
"""

from __future__ import annotations

import math
import os
import pickle
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from . import ray_runtime  # noqa: F401  (sets Ray's failure-signal switch before Ray is imported)

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from .errors import StudyInterrupted  # noqa: E402
from .fsutil import append_jsonl, atomic_write_json  # noqa: E402
from .layout import (DIVERGED, EVENTS_FILE, FAILED, FAILED_FILE, StudyPaths, TrialInfo,  # noqa: E402
                     parse_trial_dirname, trial_dirname, trial_index_of)
from .ray_runtime import trial_slots  # noqa: E402
from .records import error_reason, optuna_study_name, tune_trials  # noqa: E402
from .resume import adopt_claimed, claim_orphan, set_aside_orphans, usable_snapshot  # noqa: E402
from .spaces import Experiment, StudySpace  # noqa: E402
from .trial import TrialSpec, run_trial  # noqa: E402

OBJECTIVE = "objective"
_USER_MAX_PENDING = "TUNE_MAX_PENDING_TRIALS_PG" in os.environ  # set by the user: theirs to keep


def tune_trial_dirname(trial) -> str:
    """Tune's trial folder name, the same as ours (:func:`study.layout.trial_dirname`). Module level,
    so Tune can pickle it into tuner.pkl."""
    return trial_dirname(trial_index_of(trial.experiment_tag, trial.trial_id), trial.trial_id)


# --- the trainable (runs in Ray workers) --------------------------------------------------------------

def study_trainable(config: dict, data=None) -> None:
    """Tune function trainable: one configuration of one method, every seed (``study.trial``).

    ``config`` holds the searched parameters (flat, as Optuna names them), ``method``, and the
    constant ``_study`` block (paths, seeds, base configs)."""
    import torch

    from .config import EvalConfig, Stage1Config, Stage2Config, build
    from .data import loader_workers

    ctx = tune.get_context()
    st = config["_study"]
    trial_id = ctx.get_trial_id()
    index = (parse_trial_dirname(Path(ctx.get_trial_dir()).name) or (0, ""))[0]
    method = config["method"]
    params = {k: v for k, v in config.items() if k not in ("_study", "method")}
    cls = Stage1Config if st["stage"] == "stage1" else Stage2Config
    cfg = build(cls, {**st["configs"][method], **params})
    torch.set_num_threads(max(1, int(st.get("cpus_per_trial") or 1)))
    paths = StudyPaths(Path(st["root"]))
    tdir = paths.trial_dir(st["experiment"], index, trial_id)
    tdir.mkdir(parents=True, exist_ok=True)
    adopted = adopt_claimed(paths.trials / st["experiment"], trial_id, tdir)
    if adopted:
        append_jsonl(tdir / EVENTS_FILE, {"t": time.time(), "event": "adopted", "from": adopted})
    if not (tdir / TrialInfo.FILE).exists():
        TrialInfo(experiment=st["experiment"], stage=st["stage"], method=method, trial_id=trial_id,
                  trial_index=index, params=params, config=asdict(cfg)).write(tdir / TrialInfo.FILE)
    spec = TrialSpec(stage=st["stage"], config=cfg, seeds=tuple(st["seeds"]),
                     eval_cfg=build(EvalConfig, st["eval"]), trial_dir=tdir, backbone=st["backbone"] or getattr(cfg, "backbone", ""),
                     stage1_dir=Path(st["stage1_dir"]) if st.get("stage1_dir") else None,
                     experiment=st["experiment"], trial_index=index, params=params, method=method,
                     workers=loader_workers(data, st.get("cpus_per_trial") or 1))
    # No Tune checkpoints: the trial resumes from its own (study.trial), so Tune needs none, and an
    # older snapshot can never name a Tune checkpoint that no longer exists.
    run_trial(spec, data, report=tune.report)


# --- search algorithm and scheduler -------------------------------------------------------------------

class StudyOptunaSearch(OptunaSearch):
    """OptunaSearch that understands the study's trial statuses.

    A diverged trial ends with a report that has no objective: it is told to Optuna as FAIL (with
    its reason), so a NaN can never be the best value; reports without an objective are skipped
    instead of raising KeyError (OptunaSearch indexes ``result[metric]``)."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        value = result.get(self.metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._ot_trials and trial_id not in self._completed_trials:
            self._ot_trials[trial_id].set_user_attr("tune_trial_id", trial_id)
        if trial_id not in self._ot_trials:  # never suggested by this searcher: nothing to tell Optuna
            return
        if (result or {}).get("trial_status") == DIVERGED and trial_id not in self._completed_trials:
            ot_trial = self._ot_trials[trial_id]
            ot_trial.set_user_attr("status", DIVERGED)
            ot_trial.set_user_attr("reason", str(result.get("reason")))
            self._ot_study.tell(ot_trial, state=TrialState.FAIL)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)


class MethodSearcher(Searcher):
    """One sub-searcher and one exact budget per method, behind Tune's single-searcher interface.

    ``suggest`` gives the next trial to the method that has used the smallest fraction of its
    budget (ties: the order of the space file), so every method progresses at once; a method
    without searched parameters has no sub-searcher and runs its fixed configuration. Results and
    completions are routed back to the method's searcher. The whole routing state is pickled with
    the sub-searchers (their Optuna studies included) at every Tune snapshot.

    ``max_live`` caps the trials suggested and not yet ended (the stage's concurrency): no trial is
    proposed before a slot is free to run it, so each proposal sees every result that has come in.
    (Not Tune's ConcurrencyLimiter: its count of live trials is not saved with the snapshot, and
    after a restore it drops the completions of the trials that were running.)"""

    def __init__(self, subs: dict[str, StudyOptunaSearch | None], budgets: dict[str, int], pool: str = "",
                 max_live: int | None = None):
        super().__init__(metric=OBJECTIVE, mode="max")
        self.order = list(subs)
        self.subs = subs
        self.budgets = dict(budgets)
        self.issued = {m: 0 for m in subs}
        self.trial_method: dict[str, str] = {}
        self.pool = pool
        """The stage's trial folder; orphaned trials waiting to be adopted are in its ``.adopt/``."""
        self.max_live = max_live
        self.live: set[str] = set()

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # every sub-searcher was built with its own space, metric and mode

    def suggest(self, trial_id: str):
        if trial_id in self.trial_method:  # asked again for the same trial: same method
            m = self.trial_method[trial_id]
        else:
            open_ = [m for m in self.order if self.issued[m] < self.budgets[m]]
            if not open_:
                return Searcher.FINISHED
            if self.max_live and len(self.live) >= self.max_live:
                return None  # every slot is busy: propose when one frees, with its result known
            m = min(open_, key=lambda k: (self.issued[k] / self.budgets[k], self.order.index(k)))
        sub = self.subs[m]
        if trial_id not in self.trial_method and self.pool:
            # A trial that ran before a hard kill but is missing from Tune's snapshot takes this
            # slot: same method, same parameters (enqueued in the method's Optuna study), so the
            # new trial continues from its checkpoints (see claim_orphan / adopt_claimed).
            orphan = claim_orphan(Path(self.pool), m, trial_id)
            if orphan and sub is not None and orphan.params:
                sub._ot_study.enqueue_trial(dict(orphan.params), skip_if_exists=False)
        params = {} if sub is None else sub.suggest(trial_id)
        if params is None:
            return None
        if trial_id not in self.trial_method:
            self.trial_method[trial_id] = m
            self.issued[m] += 1
            self.live.add(trial_id)
        return {**params, "method": m}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        sub = self.subs.get(self.trial_method.get(trial_id, ""))
        if sub is not None:
            sub.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.live.discard(trial_id)
        sub = self.subs.get(self.trial_method.get(trial_id, ""))
        if sub is not None:
            sub.on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        # Live trials start afresh: one the snapshot lists but Tune never runs again (a hard kill
        # between the two files) would otherwise hold its slot for ever. The trials Tune does run
        # again may briefly exceed the cap; Ray's resources still bound what runs.
        state["live"] = set()
        self.__dict__.update(state)


class MethodScheduler(FIFOScheduler):
    """Per-method early stopping: trials go to their method's ASHA (if it has one), so a method's
    trials are only ever compared with each other; other trials run to the end."""

    def __init__(self, schedulers: dict[str, ASHAScheduler]):
        super().__init__()
        self.schedulers = schedulers

    def _sub(self, trial) -> TrialScheduler | None:
        return self.schedulers.get((trial.config or {}).get("method"))

    def set_search_properties(self, metric, mode, **spec) -> bool:
        for s in self.schedulers.values():
            s.set_search_properties(metric, mode, **spec)
        return True

    def on_trial_add(self, tune_controller, trial) -> None:
        if (s := self._sub(trial)) is not None:
            s.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        if (s := self._sub(trial)) is not None and trial.trial_id in getattr(s, "_trial_info", {}):
            s.on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        s = self._sub(trial)
        if s is None or result.get(OBJECTIVE) is None:
            return TrialScheduler.CONTINUE
        if trial.trial_id not in s._trial_info:  # restored trials: ASHA keeps no state across restores
            s.on_trial_add(tune_controller, trial)
        return s.on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        s = self._sub(trial)
        if s is not None and trial.trial_id in s._trial_info:
            if result.get(OBJECTIVE) is None:
                s.on_trial_remove(tune_controller, trial)
            else:
                s.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        s = self._sub(trial)
        if s is not None and trial.trial_id in s._trial_info:
            s.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "MethodScheduler(" + ", ".join(self.schedulers) + ")"


class FailureRecorder(tune.Callback):
    """Writes ``failed.json`` into the study's trial folder when Tune gives up on a trial (after
    ``search.retries`` retries), with the exception's last line as the reason."""

    def __init__(self, root: str, experiment: str):
        self.root = root
        self.experiment = experiment

    def on_trial_error(self, iteration, trials, trial, **info):
        try:
            tdir = StudyPaths(Path(self.root)).trial_dir(
                self.experiment, trial_index_of(trial.experiment_tag, trial.trial_id), trial.trial_id)
            tdir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(tdir / FAILED_FILE, {"status": FAILED,
                                                     "reason": error_reason(getattr(trial, "error_file", None)),
                                                     "num_failures": getattr(trial, "num_failures", None)})
        except Exception:  # bookkeeping must never break the study
            pass


# --- one experiment -----------------------------------------------------------------------------------

def _constants(exp: Experiment, space: StudySpace, paths: StudyPaths, stage1_dir: Path | None, cpus: float) -> dict:
    return {"_study": {"root": str(paths.root), "experiment": exp.name, "stage": exp.stage,
                       "seeds": list(space.seeds), "configs": {p.method: asdict(p.config) for p in exp.plans},
                       "eval": asdict(space.eval), "cpus_per_trial": cpus,
                       "backbone": space.backbone_of(exp.variant) if exp.variant else None,
                       "stage1_dir": str(stage1_dir) if stage1_dir else None}}


def _make_tuner(exp: Experiment, space: StudySpace, paths: StudyPaths, trainable, stage1_dir: Path | None,
                cpus: float, slots: int):
    subs: dict[str, StudyOptunaSearch | None] = {}
    for i, p in enumerate(exp.plans):
        if not p.params:
            subs[p.method] = None
            continue
        sampler = optuna.samplers.TPESampler(seed=space.search.sampler_seed + i,
                                             n_startup_trials=space.search.startup_trials)
        subs[p.method] = StudyOptunaSearch({k: d.to_optuna() for k, d in p.params.items()}, metric=OBJECTIVE,
                                           mode="max", sampler=sampler, study_name=optuna_study_name(exp.name, p.method))
    searcher = MethodSearcher(subs, {p.method: p.budget for p in exp.plans}, str(paths.trials / exp.name),
                              max_live=slots)
    # ASHA counts our epochs, not Tune's training_iteration (which restarts when a trial is restarted).
    asha = {p.method: ASHAScheduler(time_attr="epoch", max_t=p.config.epochs,
                                    grace_period=p.scheduler.grace_period,
                                    reduction_factor=p.scheduler.reduction_factor)
            for p in exp.plans if p.scheduler is not None}
    tune_config = tune.TuneConfig(metric=OBJECTIVE, mode="max", search_alg=searcher,
                                  scheduler=MethodScheduler(asha) if asha else None,
                                  num_samples=exp.budget, reuse_actors=True,
                                  trial_dirname_creator=tune_trial_dirname)
    run_config = tune.RunConfig(
        name=exp.name, storage_path=str(paths.tune), verbose=0,
        failure_config=tune.FailureConfig(max_failures=space.search.retries),
        callbacks=[FailureRecorder(str(paths.root), exp.name)],
    )
    return tune.Tuner(trainable, param_space=_constants(exp, space, paths, stage1_dir, cpus),
                      tune_config=tune_config, run_config=run_config)


def _wrap_trainable(data, cpus: float, gpus: float):
    # with_parameters first, then with_resources: with_resources mutates the function it is given.
    return tune.with_resources(tune.with_parameters(study_trainable, data=data), {"cpu": cpus, "gpu": gpus})


def run_experiment(exp: Experiment, space: StudySpace, paths: StudyPaths, data, stage1_dir: Path | None,
                   cpus: float, gpus: float, log: Callable[[str], None]) -> None:
    """Run or resume one Tune experiment until every trial of its budget has ended."""
    exp_dir = paths.tune / exp.name
    trainable = _wrap_trainable(data, cpus, gpus)
    slots = trial_slots(cpus, gpus, space.search.max_concurrent)
    # Tune keeps one trial pending at a time for a custom searcher: the second worker would start
    # only once the first runs (~1 s per stage on a CPU). Every slot may be pending at once; the
    # searcher never proposes more trials than slots (MethodSearcher.max_live).
    if not _USER_MAX_PENDING:
        os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(slots)
    if exp_dir.exists() and usable_snapshot(exp_dir, log) and tune.Tuner.can_restore(str(exp_dir)):
        log(f"{exp.name}: resuming")
        set_aside_orphans(paths, exp.name, log)
        # Unfinished trials keep their ids and run their function again, which resumes from the
        # trial's own checkpoint. (RESTART would give them new ids.) Errored trials stay failed.
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        if exp_dir.exists():
            # Built but never snapshotted (restoring would silently run one trial: docs/reference.md §7),
            # or no readable snapshot: start the stage afresh; trials of the old attempt are set aside.
            exp_dir.rename(exp_dir.with_name(f"{exp.name}.unusable-{int(time.time())}"))
            set_aside_orphans(paths, exp.name, log)
        tuner = _make_tuner(exp, space, paths, trainable, stage1_dir, cpus, slots)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        results = tuner.fit()  # returns normally on Ctrl-C, with the unfinished trials not terminated
    finally:
        # Tune restores the previous SIGINT handler only when it was interrupted; after a normal fit
        # its handler would swallow a later Ctrl-C (between stages, in the final evaluation).
        signal.signal(signal.SIGINT, sigint)
    del results
    # After a graceful stop Tune marks every in-memory trial TERMINATED, so fit()'s statuses cannot
    # tell an interrupted stage from a finished one; the last snapshot on disk can (it is what a
    # restore resumes): in-flight trials are still RUNNING or PENDING there.
    snapshot = tune_trials(paths, exp.name)
    ended = sum(t["status"] in ("TERMINATED", "ERROR") for t in snapshot.values())
    if len(snapshot) < exp.budget or ended < exp.budget:
        raise StudyInterrupted(f"interrupted in {exp.name} ({ended} of {exp.budget} trials ended); "
                               "run the same command again to resume")

