"""The Ray Tune adapter: the trainable that runs one trial in a Ray worker, the searchers that give
every experiment and method its own Optuna study and exact budget inside one Tuner, the per-method
scheduler, the failure callback, and running (or restoring) the study's Tune experiment.

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

import math
import os
import pickle
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from study.search import ray_runtime  # noqa: F401  (sets Ray's failure-signal switch before Ray is imported)

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from study.fsutil import append_jsonl, atomic_write_json  # noqa: E402
from study.faults import pause_point  # noqa: E402
from study.layout import (COMPLETED, DIVERGED, EVENTS_FILE, FAILED, FAILED_FILE, ExperimentOpened, StageMarker, StudyPaths, TrialInfo,  # noqa: E402
                     searched_params, trial_dirname, trial_index_in_experiment)
from study.search.ray_runtime import trial_slots  # noqa: E402
from study.results.records import (error_reason, experiment_trials, optuna_study_name, optuna_trial, read_tune_state,  # noqa: E402
                      select_best)
from study.search.resume import (SNAPSHOT_FILES, SNAPSHOT_STAMP, adopt_claimed, claim_orphan, set_aside_orphans,  # noqa: E402
                     usable_snapshot)
from study.config.spaces import Experiment, StudySpace  # noqa: E402
from study.training.trial import TrialSpec, run_trial  # noqa: E402

OBJECTIVE = "objective"
_USER_MAX_PENDING = "TUNE_MAX_PENDING_TRIALS_PG" in os.environ  # set by the user: theirs to keep


def tune_trial_dirname(trial) -> str:
    """Tune's trial folder name, the same as ours (:func:`study.layout.trial_dirname`): the index is
    the trial's in its own experiment (:class:`StudySearcher` puts it in the config). Module level,
    so Tune can pickle it into tuner.pkl."""
    return trial_dirname(_index_of(trial), trial.trial_id)


def _index_of(trial) -> int:
    return trial_index_in_experiment(trial.config, trial.experiment_tag, trial.trial_id)


# --- the trainable (runs in Ray workers) --------------------------------------------------------------

def study_trainable(config: dict, data=None) -> None:
    """Tune function trainable: one configuration of one method, every seed (``study.training.trial``).

    ``config`` holds the searched parameters (flat, as Optuna names them), ``method``, and the
    ``_study`` block: the study's constants (paths, seeds, evaluation) merged with the trial's
    experiment, stage, index in its experiment, base configuration and stage-1 folder."""
    import torch

    from study.config.schema import EvalConfig, Stage1Config, Stage2Config, build
    from study.data.lt import loader_workers

    ctx = tune.get_context()
    st = config["_study"]
    paths = StudyPaths(Path(st["root"]))
    if st.get("after") and not st.get("stage1_dir"):
        # Proposed before its experiment opened (StudySearcher._may_start_ahead): wait here, in the
        # worker the trial keeps, for the stage-1 selection to train on.
        opened = _wait_opened(paths, st["experiment"])
        if opened.stage1_dir is None:
            return  # the variant has no stage-1 selection: nothing to train (the driver says so)
        st = {**st, "stage1_dir": opened.stage1_dir}
    trial_id = ctx.get_trial_id()
    index = int(st["index"])
    method = config["method"]
    params = searched_params(config)
    cls = Stage1Config if st["stage"] == "stage1" else Stage2Config
    cfg = build(cls, {**st["config"], **params})
    torch.set_num_threads(max(1, int(st.get("cpus_per_trial") or 1)))
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
    # No Tune checkpoints: the trial resumes from its own (study.training.trial), so Tune needs none, and an
    # older snapshot can never name a Tune checkpoint that no longer exists.
    run_trial(spec, data, report=tune.report)


def _wait_opened(paths: StudyPaths, experiment: str, poll: float = 0.05) -> ExperimentOpened:
    while True:
        opened = ExperimentOpened.read(paths.opened_file(experiment))
        if opened is not None:
            return opened
        time.sleep(poll)


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
    """One sub-searcher and one exact budget per method of one experiment (inside
    :class:`StudySearcher`).

    ``suggest`` gives the next trial to the method that has used the smallest fraction of its
    budget (ties: the order of the space file), so every method progresses at once; a method
    without searched parameters has no sub-searcher and runs its fixed configuration. Results and
    completions are routed back to the method's searcher. The whole routing state is pickled with
    the sub-searchers (their Optuna studies included) at every Tune snapshot."""

    def __init__(self, subs: dict[str, StudyOptunaSearch | None], budgets: dict[str, int], pool: str = ""):
        super().__init__(metric=OBJECTIVE, mode="max")
        self.order = list(subs)
        self.subs = subs
        self.budgets = dict(budgets)
        self.issued = {m: 0 for m in subs}
        self.trial_method: dict[str, str] = {}
        self.pool = pool
        """The experiment's trial folder; orphaned trials waiting to be adopted are in its ``.adopt/``."""

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # every sub-searcher was built with its own space, metric and mode

    def suggest(self, trial_id: str):
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
            orphan = claim_orphan(Path(self.pool), m, trial_id)
            if orphan and sub is not None and orphan.params:
                sub._ot_study.enqueue_trial(dict(orphan.params), skip_if_exists=False)
        params = {} if sub is None else sub.suggest(trial_id)
        if params is None:
            return None
        self._count(trial_id, m)
        return {**params, "method": m}

    def _count(self, trial_id: str, method: str) -> bool:
        """Charge a new trial to ``method``'s budget; False if it was already counted."""
        if trial_id in self.trial_method:
            return False
        self.trial_method[trial_id] = method
        self.issued[method] += 1
        return True

    def take_over(self, trial_id: str, method: str, params: dict) -> None:
        """Count a trial of ``method`` that Tune stored but this state never issued (see
        :meth:`StudySearcher.restore`), and give it to the method's Optuna study with its
        parameters (enqueued, then asked), so its result joins the study's history."""
        if not self._count(trial_id, method):
            return
        sub = self.subs.get(method)
        if sub is not None and params:
            sub._ot_study.enqueue_trial(dict(params), skip_if_exists=False)
            sub.suggest(trial_id)

    def take_over_ended(self, view) -> None:
        """Count an ended trial (a :class:`study.results.records.TrialView`) this state never issued, and
        add it, finished, to its method's Optuna history (see :meth:`StudySearcher.restore`)."""
        if not self._count(view.trial_id, view.method):
            return
        sub = self.subs.get(view.method)
        if sub is not None:
            sub._ot_study.add_trial(optuna_trial(view, sub._space))
            sub._completed_trials.add(view.trial_id)

    def tell_ended(self, view, trial_id: str) -> None:
        """Tell the method's Optuna study how an issued trial ended, from its record (``view``, a
        :class:`study.results.records.TrialView`; None: no record, told as failed), when Tune's end of it
        was lost (see :meth:`StudySearcher.restore`)."""
        sub = self.subs.get(self.trial_method.get(trial_id, ""))
        if sub is None or trial_id not in sub._ot_trials or trial_id in sub._completed_trials:
            return
        if view is not None and view.status == COMPLETED and view.objective is not None:
            sub.on_trial_complete(trial_id, {OBJECTIVE: view.objective})
        elif view is not None and view.status == DIVERGED:
            sub.on_trial_complete(trial_id, {"trial_status": DIVERGED, "reason": view.reason})
        else:
            sub.on_trial_complete(trial_id, None, error=True)

    def forget(self, trial_id: str) -> None:
        """Take back a suggestion Tune never stored (see :meth:`StudySearcher.restore`): its budget
        slot is issued again; its Optuna trial is told FAIL, so no sampler waits on it."""
        m = self.trial_method.pop(trial_id, None)
        if m is None:
            return
        self.issued[m] -= 1
        sub = self.subs.get(m)
        ot_trial = getattr(sub, "_ot_trials", {}).pop(trial_id, None)
        if ot_trial is not None:
            ot_trial.set_user_attr("reason", "never run (not in Tune's snapshot)")
            sub._ot_study.tell(ot_trial, state=TrialState.FAIL)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        sub = self.subs.get(self.trial_method.get(trial_id, ""))
        if sub is not None:
            sub.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        sub = self.subs.get(self.trial_method.get(trial_id, ""))
        if sub is not None:
            sub.on_trial_complete(trial_id, result, error)


_DRIVER: dict = {"log": print, "on_stage2": None, "slots": None, "ahead": 0}
"""This run's settings for :class:`StudySearcher` (in the driver, inside Tune's loop; not pickled):
``log`` prints (the live view's log); ``on_stage2`` runs once, at the first result of a stage-2
trial in this run (the driver's preparations for the end of the study); ``slots`` caps the trials
in flight (this run's cluster, even if the saved state was made on another); ``ahead`` is how many
trials of an experiment may start before it opens."""


class StudySearcher(Searcher):
    """Every experiment of the study behind Tune's single-searcher interface, in one Tuner.

    Experiments are proposed in the space's order; one that depends on another (a stage-2
    experiment on stage 1, whose selected trial it trains on) opens only once that one has ended.
    When the last trial of an experiment ends, its selection is written to its stage marker
    (``stages/<experiment>.json``) — what opens its dependents, what resume trusts, what the final
    evaluation reads. An experiment whose marker exists is never run again.

    ``max_live`` caps the trials suggested and not yet ended: no trial is proposed before a slot is
    free to run it, so each proposal sees every result that has come in. (Not Tune's
    ConcurrencyLimiter: its count of live trials is not saved with the snapshot, and after a
    restore it drops the completions of the trials that were running.) The whole state is pickled
    at every Tune snapshot; :meth:`restore` reconciles it with the trials of the same snapshot."""

    def __init__(self, paths: StudyPaths, experiments: list[Experiment], searchers: dict[str, MethodSearcher],
                 constants: dict[str, dict], max_live: int | None = None):
        super().__init__(metric=OBJECTIVE, mode="max")
        self.root = str(paths.root)
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
        max_live = _DRIVER["slots"] or self.max_live
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
            if cfg is None:
                return None
            if cfg == Searcher.FINISHED:
                waiting = waiting or len(self.ended[e]) < self.count[e]
                continue
            self._register(trial_id, e, self.count[e])
            self.live.add(trial_id)
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
        return early < _DRIVER["ahead"]

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
        c = self.constants[e]
        return {**cfg, "_study": {"experiment": e, "stage": self.stage[e], "index": self.index[trial_id],
                                  "config": c["configs"][cfg["method"]], "backbone": c["backbone"],
                                  "stage1_dir": c.get("stage1_dir"), "after": self.after[e]}}

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
            pause_point("between-stages", _DRIVER["log"])
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
        StageMarker(experiment=e, finished=time.time(), trials=sorted(ids),
                    selected={m: (None if v is None else v.to_dict()) for m, v in selected.items()}
                    ).write(self.paths.stage_marker(e))
        self.finished.add(e)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        e = self.trial_exp.get(trial_id)
        if e is not None:
            self.searchers[e].on_trial_result(trial_id, result)
            if self.after[e] and not self._stage2_seen:
                # Not at the opening itself: the driver's background work would then slow the
                # Tune loop that is starting stage 2's trials (measured: the second one ~0.4 s late).
                self._stage2_seen = True
                if _DRIVER["on_stage2"] is not None:
                    _DRIVER["on_stage2"]()

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
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
        stamp = SNAPSHOT_STAMP.search(os.path.basename(checkpoint_path))
        state = Path(checkpoint_path).with_name(SNAPSHOT_FILES[0].format(stamp.group(1))) if stamp else None
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
            if tid in self.trial_exp or tid in listed or e not in self.searchers \
                    or cfg.get("method") not in self.searchers[e].issued:
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


class MethodScheduler(FIFOScheduler):
    """Per-method early stopping: trials go to their (experiment, method)'s ASHA (if it has one), so
    a method's trials are only ever compared with each other; other trials run to the end."""

    def __init__(self, schedulers: dict[str, ASHAScheduler]):
        super().__init__()
        self.schedulers = schedulers
        """``<experiment>/<method>`` -> its ASHA."""

    def _sub(self, trial) -> TrialScheduler | None:
        config = trial.config or {}
        return self.schedulers.get(self.key((config.get("_study") or {}).get("experiment"), config.get("method")))

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

    def __init__(self, root: str):
        self.root = root

    def on_trial_error(self, iteration, trials, trial, **info):
        try:
            experiment = trial.config["_study"]["experiment"]
            tdir = StudyPaths(Path(self.root)).trial_dir(experiment, _index_of(trial), trial.trial_id)
            tdir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(tdir / FAILED_FILE, {"status": FAILED,
                                                     "reason": error_reason(getattr(trial, "error_file", None)),
                                                     "num_failures": getattr(trial, "num_failures", None)})
        except Exception:  # bookkeeping must never break the study
            pass


# --- the study's Tune experiment ----------------------------------------------------------------------

def _study_constants(space: StudySpace, paths: StudyPaths, cpus: float) -> dict:
    """The ``_study`` block every trial shares (its experiment's part comes from StudySearcher)."""
    return {"_study": {"root": str(paths.root), "seeds": list(space.seeds), "eval": asdict(space.eval),
                       "cpus_per_trial": cpus}}


def _experiment_constants(exp: Experiment, space: StudySpace) -> dict:
    return {"configs": {p.method: asdict(p.config) for p in exp.plans},
            "backbone": space.backbone_of(exp.variant) if exp.variant else None}


def _method_searcher(exp: Experiment, space: StudySpace, paths: StudyPaths) -> MethodSearcher:
    subs: dict[str, StudyOptunaSearch | None] = {}
    for i, p in enumerate(exp.plans):
        if not p.params:
            subs[p.method] = None
            continue
        sampler = optuna.samplers.TPESampler(seed=space.search.sampler_seed + i,
                                             n_startup_trials=space.search.startup_trials)
        subs[p.method] = StudyOptunaSearch({k: d.to_optuna() for k, d in p.params.items()}, metric=OBJECTIVE,
                                           mode="max", sampler=sampler, study_name=optuna_study_name(exp.name, p.method))
    return MethodSearcher(subs, {p.method: p.budget for p in exp.plans}, str(paths.trials / exp.name))


def _make_tuner(space: StudySpace, paths: StudyPaths, trainable, cpus: float, slots: int):
    experiments = space.experiments()
    searcher = StudySearcher(paths, experiments, {e.name: _method_searcher(e, space, paths) for e in experiments},
                             {e.name: _experiment_constants(e, space) for e in experiments}, max_live=slots)
    # ASHA counts our epochs, not Tune's training_iteration (which restarts when a trial is restarted).
    asha = {MethodScheduler.key(e.name, p.method): ASHAScheduler(time_attr="epoch", max_t=p.config.epochs,
                                                  grace_period=p.scheduler.grace_period,
                                                  reduction_factor=p.scheduler.reduction_factor)
            for e in experiments for p in e.plans if p.scheduler is not None}
    tune_config = tune.TuneConfig(metric=OBJECTIVE, mode="max", search_alg=searcher,
                                  scheduler=MethodScheduler(asha) if asha else None,
                                  # the searcher alone ends the search (exact budgets, also after a
                                  # restore from snapshot files of different steps), not Tune's count
                                  num_samples=-1,
                                  reuse_actors=True, trial_dirname_creator=tune_trial_dirname)
    run_config = tune.RunConfig(
        name=paths.tune_experiment.name, storage_path=str(paths.tune), verbose=0,
        failure_config=tune.FailureConfig(max_failures=space.search.retries),
        callbacks=[FailureRecorder(str(paths.root))],
    )
    return tune.Tuner(trainable, param_space=_study_constants(space, paths, cpus),
                      tune_config=tune_config, run_config=run_config)


def _wrap_trainable(data, cpus: float, gpus: float):
    # with_parameters first, then with_resources: with_resources mutates the function it is given.
    return tune.with_resources(tune.with_parameters(study_trainable, data=data), {"cpu": cpus, "gpu": gpus})


def run_search(space: StudySpace, paths: StudyPaths, data, cpus: float, gpus: float,
               log: Callable[[str], None], on_stage2: Callable[[], None] | None = None,
               start_ahead: bool = True) -> None:
    """Run or resume the study's Tune experiment until every experiment has ended (its stage marker
    written) or the study is stopped; the caller tells the two apart by the markers. ``on_stage2``
    runs once, in the driver, at the first result of a stage-2 trial. ``start_ahead``: stage-2 trials may start in the
    workers of the last stage-1 trials before stage 2 opens (not on a shared cluster, whose
    resources can shrink under waiting trials)."""
    exp_dir = paths.tune_experiment
    trainable = _wrap_trainable(data, cpus, gpus)
    slots = trial_slots(cpus, gpus, space.search.max_concurrent)
    # Tune keeps one trial pending at a time for a custom searcher: the second worker would start
    # only once the first runs (~1 s on a CPU). Every slot may be pending at once; the searcher
    # never proposes more trials than slots (StudySearcher.max_live).
    if not _USER_MAX_PENDING:
        os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(slots)
    _DRIVER.update(log=log, on_stage2=on_stage2, slots=slots, ahead=max(0, slots - 1) if start_ahead else 0)
    unfinished = [e.name for e in space.experiments() if not paths.stage_marker(e.name).exists()]
    if exp_dir.exists() and usable_snapshot(exp_dir, log) and tune.Tuner.can_restore(str(exp_dir)):
        log("resuming the search")
        for name in unfinished:
            set_aside_orphans(paths, name, log)
        # Unfinished trials keep their ids and run their function again, which resumes from the
        # trial's own checkpoint. (RESTART would give them new ids.) Errored trials stay failed.
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        if exp_dir.exists():
            # Built but never snapshotted (restoring would silently run one trial: docs/reference.md §7),
            # or no readable snapshot: start the search afresh (finished experiments stay finished);
            # trials of the old attempt are set aside, and continued.
            exp_dir.rename(exp_dir.with_name(f"{exp_dir.name}.unusable-{int(time.time())}"))
        for name in unfinished:
            set_aside_orphans(paths, name, log)
        tuner = _make_tuner(space, paths, trainable, cpus, slots)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        results = tuner.fit()  # returns normally on Ctrl-C, with the unfinished trials not terminated
    finally:
        # Tune restores the previous SIGINT handler only when it was interrupted; after a normal fit
        # its handler would swallow a later Ctrl-C (in the final evaluation).
        signal.signal(signal.SIGINT, sigint)
        _DRIVER.update(log=print, on_stage2=None, slots=None, ahead=0)
    # The Tuner sits in reference cycles holding Ray objects (the dataset put by with_parameters):
    # collected later, after ray.shutdown, their finalizers reach the dead core worker, which aborts
    # the driver (exit 1, "The core worker has already been shutdown"). Collect them now, Ray up.
    del results, tuner, trainable
    import gc

    gc.collect()
