"""The searchers that give every experiment and method of a study its own Optuna study and exact
budget inside one Tuner, through Ray Tune's public ``Searcher`` interface and Optuna's public API
(``create_study``, ``ask``, ``tell``, ``enqueue_trial``, ``add_trial``).

:class:`StudySearcher` opens an experiment once the one it depends on has ended (stage 2 after stage
1, whose selection it needs), writes each experiment's stage marker when its last trial ends, and
caps the trials in flight at the cluster's slots; :class:`MethodSearcher` routes each trial of one
experiment to its method's :class:`OptunaSearcher` and keeps every method's budget exact. Optuna
keeps in-memory storage inside the searcher, pickled with Tune's snapshot: a persistent (SQLite)
storage shared with a restored searcher crashes restores after a hard kill, so ``optuna.db`` is
rebuilt from the trial records instead (``study.results.records``).
"""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from study import compat
from study.config.spaces import Experiment
from study.faults import pause_point
from study.layout import (
    COMPLETED,
    DIVERGED,
    FAILED,
    RUNNING,
    STOPPED,
    ExperimentOpened,
    StageMarker,
    StudyPaths,
    TrialContext,
    searched_params,
)
from study.results.records import experiment_trials, optuna_trial, read_tune_state, select_best
from study.search import ray_runtime
from study.search.mirror import TrialMirror
from study.search.resume import claim_orphan

OBJECTIVE = "objective"
"""The metric every trial reports and the searchers maximise: the mean over seeds of each seed's
best selection-split accuracy so far."""


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def trial_outcome(result: dict | None, error: bool) -> tuple[str, float | None, str | None]:
    """(status, objective, reason) of a trial Tune has ended, from its last result: completed with its
    objective, diverged with its reason, failed (it raised on every retry), or stopped early (its last
    result is an epoch's, not the trial's end: the scheduler stopped it; or it ended without one)."""
    if error:
        return FAILED, None, None
    result = result or {}
    status = result.get("trial_status")
    if status == COMPLETED and _finite(result.get(OBJECTIVE)):
        return COMPLETED, float(result[OBJECTIVE]), None
    if status in (DIVERGED, FAILED):
        return status, None, result.get("reason")
    return STOPPED, None, None


class OptunaSearcher:
    """One method's Optuna study, driven through Optuna's public API: ``ask`` with the method's fixed
    distributions (enqueued parameters first), ``report`` per epoch, ``tell`` at the end. The study's
    storage is in memory and pickled with the searcher at every Tune snapshot."""

    def __init__(self, space: dict, sampler: optuna.samplers.BaseSampler, name: str):
        self.space = space
        """parameter name -> Optuna distribution."""
        self.study = optuna.create_study(study_name=name, direction="maximize", sampler=sampler)
        self.trials: dict[str, optuna.trial.Trial] = {}
        """Tune trial id -> its Optuna trial."""
        self.ended: set[str] = set()
        """Tune trial ids whose Optuna trial has been told its end."""

    def suggest(self, trial_id: str) -> dict:
        """The parameters of ``trial_id`` (asked once; asked again, the same ones)."""
        if trial_id not in self.trials:
            trial = self.study.ask(fixed_distributions=self.space)
            trial.set_user_attr("tune_trial_id", trial_id)
            self.trials[trial_id] = trial
        return dict(self.trials[trial_id].params)

    def enqueue(self, params: dict) -> None:
        """The next ``suggest`` proposes ``params`` (a trial continued from an earlier attempt)."""
        self.study.enqueue_trial(dict(params), skip_if_exists=False)

    def report(self, trial_id: str, value, epoch) -> None:
        """An intermediate objective, keyed by epoch (a resumed trial's repeated epochs keep the first
        value: Optuna ignores a step reported twice)."""
        trial = self.trials.get(trial_id)
        if trial is not None and trial_id not in self.ended and _finite(value) and epoch is not None:
            trial.report(float(value), step=int(epoch))

    def end(self, trial_id: str, status: str, objective: float | None = None, reason: str | None = None) -> None:
        """Tell Optuna how a trial ended: completed with its objective, stopped early as pruned (at its
        last intermediate value), diverged or failed as failed (a NaN can never be the best value)."""
        trial = self.trials.get(trial_id)
        if trial is None or trial_id in self.ended:
            return
        self.ended.add(trial_id)
        trial.set_user_attr("status", status)
        if reason:
            trial.set_user_attr("reason", str(reason))
        if status == COMPLETED and _finite(objective):
            self.study.tell(trial, float(objective))
        elif status == STOPPED:
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            self.study.tell(trial, state=TrialState.FAIL)

    def add_ended(self, view) -> None:
        """Add a trial that ended without this searcher (a :class:`study.results.records.TrialView`),
        finished, to the study's history."""
        self.study.add_trial(optuna_trial(view, self.space))
        self.ended.add(view.trial_id)

    def forget(self, trial_id: str, reason: str) -> None:
        """Take back a suggestion that never ran: told failed, so no sampler waits on it."""
        self.end(trial_id, FAILED, reason=reason)
        self.trials.pop(trial_id, None)
        self.ended.discard(trial_id)


class MethodSearcher:
    """One :class:`OptunaSearcher` and one exact budget per method of one experiment (inside
    :class:`StudySearcher`).

    ``suggest`` gives the next trial to the method that has used the smallest fraction of its
    budget (ties: the order of the space file), so every method progresses at once; a method
    without searched parameters has no Optuna study and runs its fixed configuration. Results and
    ends are routed back to the method's study. The whole routing state is pickled with the Optuna
    studies at every Tune snapshot."""

    def __init__(self, subs: dict[str, OptunaSearcher | None], budgets: dict[str, int], pool: str = ""):
        self.order = list(subs)
        self.subs = subs
        self.budgets = dict(budgets)
        self.issued = {m: 0 for m in subs}
        self.trial_method: dict[str, str] = {}
        self.pool = pool
        """The experiment's trial folder; orphaned trials waiting to be adopted are in its ``.adopt/``."""
        self.claims: dict[str, str] = {}
        """trial id -> the folder name of the orphan it continues (see :func:`claim_orphan`)."""

    def suggest(self, trial_id: str):
        """``{params..., "method": m}`` for a new (or the same) trial, or ``Searcher.FINISHED``."""
        if trial_id in self.trial_method:  # asked again for the same trial: same method
            m = self.trial_method[trial_id]
        else:
            open_ = [m for m in self.order if self.issued[m] < self.budgets[m]]
            if not open_:
                return Searcher.FINISHED
            m = min(open_, key=lambda k: (self.issued[k] / self.budgets[k], self.order.index(k)))
        sub = self.subs[m]
        if trial_id not in self.trial_method and self.pool:
            # A trial that ran before a hard kill but is missing from Tune's snapshot takes this
            # slot: same method, same parameters (enqueued in the method's Optuna study), so the
            # new trial continues from its checkpoints (see claim_orphan / adopt_claimed).
            claimed = claim_orphan(Path(self.pool), m, trial_id)
            if claimed:
                name, orphan = claimed
                self.__dict__.setdefault("claims", {})[trial_id] = name  # absent from older snapshots
                if sub is not None and orphan.params:
                    sub.enqueue(orphan.params)
        params = {} if sub is None else sub.suggest(trial_id)
        self._count(trial_id, m)
        return {**params, "method": m}

    def _count(self, trial_id: str, method: str) -> bool:
        """Charge a new trial to ``method``'s budget; False if it was already counted."""
        if trial_id in self.trial_method:
            return False
        self.trial_method[trial_id] = method
        self.issued[method] += 1
        return True

    def _sub(self, trial_id: str) -> OptunaSearcher | None:
        return self.subs.get(self.trial_method.get(trial_id, ""))

    def take_over(self, trial_id: str, method: str, params: dict) -> None:
        """Count a trial of ``method`` that Tune stored but this state never issued (see
        :meth:`StudySearcher.restore`), and give it to the method's Optuna study with its
        parameters (enqueued, then asked), so its result joins the study's history."""
        if not self._count(trial_id, method):
            return
        sub = self.subs.get(method)
        if sub is not None and params:
            sub.enqueue(params)
            sub.suggest(trial_id)

    def take_over_ended(self, view) -> None:
        """Count an ended trial (a :class:`study.results.records.TrialView`) this state never issued,
        and add it, finished, to its method's Optuna history (see :meth:`StudySearcher.restore`)."""
        if not self._count(view.trial_id, view.method):
            return
        sub = self.subs.get(view.method)
        if sub is not None:
            sub.add_ended(view)

    def tell_ended(self, view, trial_id: str) -> None:
        """Tell the method's Optuna study how an issued trial ended, from its record (``view``, a
        :class:`study.results.records.TrialView`; None: no record, told as failed), when Tune's end of
        it was lost (see :meth:`StudySearcher.restore`)."""
        sub = self._sub(trial_id)
        if sub is None:
            return
        if view is None or view.status in (RUNNING, "interrupted", "pending"):
            sub.end(trial_id, FAILED, reason="ended without a record")
        else:
            sub.end(trial_id, view.status, view.objective, view.reason)

    def forget(self, trial_id: str) -> None:
        """Take back a suggestion Tune never stored (see :meth:`StudySearcher.restore`): its budget
        slot is issued again; its Optuna trial is told failed, so no sampler waits on it."""
        m = self.trial_method.pop(trial_id, None)
        if m is None:
            return
        self.issued[m] -= 1
        if self.subs.get(m) is not None:
            self.subs[m].forget(trial_id, "never run (not in Tune's snapshot)")

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        sub = self._sub(trial_id)
        if sub is not None:
            sub.report(trial_id, result.get(OBJECTIVE), result.get("epoch"))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        sub = self._sub(trial_id)
        if sub is not None:
            sub.end(trial_id, *trial_outcome(result, error))


@dataclass
class RunSettings:
    """This run's settings for :class:`StudySearcher`, in the driver, inside Tune's loop. Never
    pickled: a searcher restored from another run's snapshot works with the restoring run's."""

    log: Callable[[str], None] = print
    """Prints (the live view's log)."""
    on_stage2: Callable[[], None] | None = None
    """Runs once, at the first result of a stage-2 trial in this run (the driver's preparations for
    the end of the study)."""
    slots: int | None = None
    """Caps the trials in flight: this run's cluster, even if the saved state was made on another."""
    ahead: int = 0
    """How many trials of an experiment may start before it opens (:meth:`StudySearcher._may_start_ahead`)."""
    cpus_per_trial: float = 1.0
    """The CPUs each trial of this run has (its torch threads and decoding workers)."""
    mirror: TrialMirror | None = None
    """With a store apart from the results folder: writes what each report carries into the trial's
    folder, before anything here reads it (``study.search.mirror``)."""


class StudySearcher(Searcher):
    """Every experiment of the study behind Tune's single-searcher interface, in one Tuner.

    Experiments are proposed in the space's order; one that depends on another (a stage-2
    experiment on stage 1, whose selected trial it trains on) opens only once that one has ended.
    When the last trial of an experiment ends, its selection is written to its stage marker
    (``stages/<experiment>.json``) — what opens its dependents, what resume trusts, what the final
    evaluation reads. An experiment whose marker exists is never run again.

    ``study`` holds what every trial's :class:`~study.layout.TrialContext` shares (root, seeds,
    evaluation); ``constants`` what each experiment's trials share (base configuration per method,
    backbone, the stage-1 folder once open). :attr:`run` holds this run's settings.

    ``max_live`` caps the trials suggested and not yet ended: no trial is proposed before a slot is
    free to run it, so each proposal sees every result that has come in. (Not Tune's
    ConcurrencyLimiter: its count of live trials is not saved with the snapshot, and after a
    restore it drops the completions of the trials that were running.) The whole state is pickled
    at every Tune snapshot; :meth:`restore` reconciles it with the trials of the same snapshot."""

    def __init__(
        self,
        paths: StudyPaths,
        experiments: list[Experiment],
        searchers: dict[str, MethodSearcher],
        constants: dict[str, dict],
        max_live: int | None = None,
        seeds: tuple[int, ...] = (),
        eval_cfg: dict | None = None,
        store: str = "",
    ):
        super().__init__(metric=OBJECTIVE, mode="max")
        self.root = str(paths.root)
        self.store = store
        self.seeds = list(seeds)
        self.eval = dict(eval_cfg or {})
        self.order = [e.name for e in experiments]
        self.stage = {e.name: e.stage for e in experiments}
        self.after = {e.name: ("stage1" if e.stage == "stage2" else None) for e in experiments}
        self.variant = {e.name: e.variant for e in experiments}
        self.budget = {e.name: e.budget for e in experiments}
        self.searchers = searchers
        self.constants = constants
        """experiment -> its part of each trial's ``_study`` block (base configs by method, ...)."""
        self.count = {e.name: 0 for e in experiments}
        self.trial_exp: dict[str, str] = {}
        self.index: dict[str, int] = {}
        """trial id -> its index in its experiment (the order of issue; its folder's number)."""
        self.ended: dict[str, set[str]] = {e.name: set() for e in experiments}
        self.finished = {e.name for e in experiments if paths.stage_marker(e.name).exists()}
        self.blocked: set[str] = set()
        self.max_live = max_live
        self.live: set[str] = set()
        self._opened_here = False  # this process has passed the between-stages point (not pickled)
        self._stage2_seen = False  # this process has had a stage-2 result (not pickled)

    run = RunSettings()
    """This process's run settings (a class attribute, so never pickled: ``run_search`` sets them)."""

    store = ""
    """The study's store URI (``study.store``), empty for the results folder: in every trial's context.
    (Also a class attribute: the value of searchers pickled before stores existed.)"""

    @property
    def paths(self) -> StudyPaths:
        return StudyPaths(self.root)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str):
        if trial_id in self.trial_exp:  # asked again for the same trial: same experiment
            e = self.trial_exp[trial_id]
            cfg = self.searchers[e].suggest(trial_id)
            return cfg if not isinstance(cfg, dict) else self._with_study(e, trial_id, cfg)
        if ray_runtime.stop_requested():
            return self._stopping()
        for e in self.order:  # an experiment whose trials all ended (e.g. before a restore) closes
            if e not in self.finished and self._all_ended(e):
                self._finish(e)
        max_live = self.run.slots or self.max_live
        if max_live and len(self.live) >= max_live:
            return None  # every slot is busy: propose when one frees, with its result known
        waiting = False
        for e in self.order:
            if e in self.finished or e in self.blocked:
                continue
            dep = self.after[e]
            if dep and dep not in self.finished:
                waiting = True
                if not self._may_start_ahead(dep):
                    continue
            elif dep and not self._open(e):
                if e not in self.blocked:
                    return self._stopping()  # stopped at the between-stages point
                continue
            cfg = self.searchers[e].suggest(trial_id)
            if cfg == Searcher.FINISHED:
                waiting = waiting or len(self.ended[e]) < self.count[e]
                continue
            self._register(trial_id, e, self.count[e])
            self.live.add(trial_id)
            if self.store:
                # the trial writes nothing here (study.search.mirror): its folder exists from the start,
                # where the terminal's line for a failed attempt names it
                self.paths.trial_dir(e, self.index[trial_id], trial_id).mkdir(parents=True, exist_ok=True)
            return self._with_study(e, trial_id, cfg)
        return None if waiting else Searcher.FINISHED

    def _may_start_ahead(self, dep: str) -> bool:
        """Whether a trial of an experiment waiting on ``dep`` may be proposed now and start early
        (it waits in its worker until the experiment opens, :func:`study_trainable`). Only once all
        of ``dep``'s trials are issued, and at most ``ahead`` (the slots less one) at a time, so a
        slot is always left for a retried ``dep`` trial.

        Why: Tune keeps a finished trial's worker only while a proposed trial can use it (and one
        spare), so without these, all but one of stage 1's workers stop when stage 1 ends, and with
        short stage-2 trials Tune drops every new worker before it has started (it prefers a freed
        one): stage 2 would run one trial at a time."""
        if self.count[dep] < self.budget[dep]:
            return False
        early = sum(1 for t in self.live if self.after[self.trial_exp[t]] == dep)
        return early < self.run.ahead

    def _stopping(self) -> None:
        """A stop was requested: propose nothing. With trials in flight Tune stops gracefully after
        this step (snapshot written, the trials resumable); with none, Tune would sit in its
        wait-for-a-trial loop (up to 10 minutes, blind to its own stop flag), so the stop is raised
        from here as the Ctrl-C it is — the driver exits 130 and the next run restores Tune's last
        snapshot, as after any hard stop."""
        if not self.live:
            raise KeyboardInterrupt
        return None

    def _register(self, trial_id: str, e: str, index: int) -> None:
        """A trial of experiment ``e`` with its index there (indices stay unique: the count is past it)."""
        self.trial_exp[trial_id], self.index[trial_id] = e, index
        self.count[e] = max(self.count[e] + 1, index + 1)

    def _with_study(self, e: str, trial_id: str, cfg: dict) -> dict:
        """A trial's config: its searched parameters, its method, and its :class:`TrialContext`."""
        c = self.constants[e]
        context = TrialContext(
            root=self.root,
            experiment=e,
            stage=self.stage[e],
            index=self.index[trial_id],
            config=c["configs"][cfg["method"]],
            seeds=self.seeds,
            eval=self.eval,
            cpus_per_trial=self.run.cpus_per_trial,
            backbone=c["backbone"],
            stage1_dir=c.get("stage1_dir"),
            after=self.after[e],
            store=self.store,
            adopt=getattr(self.searchers[e], "claims", {}).get(trial_id, "") if self.store else "",
        )
        return {**cfg, TrialContext.KEY: context.to_dict()}

    def _open(self, e: str) -> bool:
        """A dependent experiment: take its stage-1 folder from the marker of the experiment it
        depends on (blocked if that variant has no selection). The first opening in this process
        is the between-stages point (a fault-injection pause for the tests); False if a stop was
        requested there."""
        if self.constants[e].get("stage1_dir"):
            return True
        marker = StageMarker.read(self.paths.stage_marker(self.after[e]))
        sel = marker.selection(self.variant[e]) if marker else None
        if sel is None:
            self.blocked.add(e)
            ExperimentOpened(stage1_dir=None, opened=time.time()).write(self.paths.opened_file(e))
            return False
        if not self._opened_here:
            pause_point("between-stages", self.run.log, ray_runtime.wait_unless_stopped)
            self._opened_here = True
            if ray_runtime.stop_requested():
                return False
        self.constants[e]["stage1_dir"] = sel.dir
        ExperimentOpened(stage1_dir=sel.dir, opened=time.time()).write(self.paths.opened_file(e))
        return True

    def _all_ended(self, e: str) -> bool:
        return self.count[e] >= self.budget[e] and len(self.ended[e]) >= self.budget[e]

    def _finish(self, e: str) -> None:
        """The experiment's last trial has ended: write its stage marker with each method's
        selection (among the trials this searcher issued)."""
        ids = set(self.searchers[e].trial_method)
        selected = select_best(self.paths, e, self.searchers[e].order, ids)
        StageMarker(
            experiment=e,
            finished=time.time(),
            trials=sorted(ids),
            selected={m: (None if v is None else v.to_dict()) for m, v in selected.items()},
        ).write(self.paths.stage_marker(e))
        self.finished.add(e)

    def _mirror(self, trial_id: str, result: dict | None) -> None:
        e = self.trial_exp.get(trial_id)
        if self.run.mirror is not None and e is not None and result:
            self.run.mirror.take(self.paths.trial_dir(e, self.index[trial_id], trial_id), trial_id, result)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._mirror(trial_id, result)
        e = self.trial_exp.get(trial_id)
        if e is not None:
            self.searchers[e].on_trial_result(trial_id, result)
            if self.after[e] and not self._stage2_seen:
                # Not at the opening itself: the driver's background work would then slow the
                # Tune loop that is starting stage 2's trials (measured: the second one ~0.4 s late).
                self._stage2_seen = True
                if self.run.on_stage2 is not None:
                    self.run.on_stage2()

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._mirror(trial_id, result)
        e = self.trial_exp.get(trial_id)
        if e is None or trial_id in self.ended[e]:
            return
        self.live.discard(trial_id)
        self.ended[e].add(trial_id)
        self.searchers[e].on_trial_complete(trial_id, result, error)
        if self._all_ended(e):
            self._finish(e)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({k: v for k, v in self.__dict__.items() if not k.startswith("_")}, f)

    def restore(self, checkpoint_path: str) -> None:
        """Restore the pickled state, then reconcile it with what is on disk. Tune copies its
        snapshot files one by one and asynchronously, so after a hard stop this pickle and Tune's
        trial list (the experiment_state file of the same stamp) can come from different steps,
        and a stage marker can be newer than both."""
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        self._opened_here = self._stage2_seen = False
        state = compat.snapshot_state_file(checkpoint_path)
        try:
            tune_state = read_tune_state(state) if state else None
        except (OSError, ValueError, KeyError, TypeError):
            tune_state = None
        markers = {e: m for e in self.order if (m := StageMarker.read(self.paths.stage_marker(e))) is not None}
        listed = {tid for m in markers.values() for tid in m.trials}
        views: dict[str, dict] = {}

        def view(e: str, tid: str):
            if e not in views:
                views[e] = {v.trial_id: v for v in experiment_trials(self.paths, e, live=True)}
            return views[e].get(tid)

        # 1. A trial Tune lists that this state never issued is taken over (its experiment, method,
        #    index and parameters are in its config), so the budget stays exact.
        for tid, t in (tune_state or {}).items():
            e, cfg = t.get("experiment"), t.get("config") or {}
            if (
                tid in self.trial_exp
                or tid in listed
                or e not in self.searchers
                or cfg.get("method") not in self.searchers[e].issued
            ):
                continue
            self.searchers[e].take_over(tid, cfg["method"], searched_params(cfg))
            self._register(tid, e, int(t["index"]))
        # 2. Tune runs every unfinished trial of its list again: those are the live ones; one it
        #    ended whose end this state missed is told from its record; one this state issued that
        #    Tune never stored is taken back, its budget slot issued again.
        self.live = set()
        for tid, e in list(self.trial_exp.items()):
            if tid in self.ended[e] or tid in listed:
                continue
            status = None if tune_state is None else (tune_state.get(tid) or {}).get("status")
            if tune_state is not None and status is None:
                self.searchers[e].forget(tid)
                del self.trial_exp[tid], self.index[tid]
                self.count[e] -= 1
            elif status in ("TERMINATED", "ERROR"):
                self.ended[e].add(tid)
                self.searchers[e].tell_ended(view(e, tid), tid)
            else:
                self.live.add(tid)
        # 3. An experiment whose marker is on disk has ended, whatever this state says: every trial
        #    the marker lists has ended. One this state never issued or saw end (a stop before
        #    Tune's next snapshot) is counted and told to its method's Optuna study from its record.
        for e, marker in markers.items():
            self.finished.add(e)
            for tid in marker.trials:
                if tid in self.ended[e]:
                    continue
                v = view(e, tid)
                if tid in self.trial_exp:
                    self.searchers[e].tell_ended(v, tid)
                elif v is not None and v.method in self.searchers[e].issued:
                    self.searchers[e].take_over_ended(v)
                    self._register(tid, e, v.trial_index)
                else:
                    continue
                self.ended[e].add(tid)
                self.live.discard(tid)
