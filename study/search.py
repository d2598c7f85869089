"""``study run``: Ray Tune schedules the trials, Optuna proposes them, re-running resumes.

A study runs two Tune experiments, each a ``Tuner`` stored in ``results/NAME/tune/<stage>``
(absolute paths: Ray needs them):

1. ``stage1``: the methods ``naive`` (weight decay 0, one configuration) and ``tuned`` (the stage-1
   space, proposed by a seeded Optuna TPE sampler); each trial trains every seed;
2. ``stage2``: every stage-2 method on the backbones of the best ``tuned`` trial (their per-seed
   weights are a constant path in ``param_space``, so a restored experiment uses the same ones).
   Methods with searched parameters get their own Optuna study and budget; the others run once;
3. the final evaluation: each method's selected configuration, once per seed, on the test set.

One Tuner per stage (rather than per method) lets short stage-2 trials of every method share the
workers and the GPU concurrently. :class:`MethodSearcher` routes each trial to its method's Optuna
study and keeps every method's budget exact; :class:`MethodScheduler` gives each method its own
ASHA early stopping (if the space asks for it) so methods are never compared with each other.

Resume contract: a finished stage has ``stages/<stage>.json`` and is skipped; an unfinished one is
restored with ``Tuner.restore`` (searchers keep their history, Tune keeps the budget); trials
continue from their own per-epoch checkpoints (``study.trial``), independent of Tune's snapshot
timing. Optuna keeps in-memory storage inside the searcher — a persistent storage crashes restores
after a hard kill (``../shared/notes/ray-tune-optuna.md`` §2.4) — and ``optuna.db`` is rebuilt
from the trial records when the study finishes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

# Ray's C++ failure-signal handler (absl) catches SIGTERM in the driver, prints a stack and aborts a few
# seconds later, even after our handler has started a clean stop. Ray reads this switch once, when
# ``ray._private.ray_constants`` is imported, so it must be set before the import below (init_ray
# also sets the parsed constant, for a Ray imported earlier in the process).
os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] = "1"

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from .errors import StudyInterrupted, UserError
from .faults import pause_point
from .fsutil import (StudyLock, append_jsonl, atomic_write_json, atomic_write_text, check_writable, read_json,
                     json_plain, read_json_or_none, read_jsonl)
from .records import (TRIAL_DIR_RE, StudyPaths, best_completed, check_name, error_reason, experiment_trials, finish_study,
                      read_yaml_file, trial_index_of, tune_trials)
from .spaces import Experiment, StudySpace, diff_dicts
from .trial import DIVERGED, FAILED, TrialSpec, run_trial

OBJECTIVE = "objective"


def trial_dirname(trial) -> str:
    """Tune trial folder name ``trial-NNNN-<trial id>`` (NNNN: 0-based index in the experiment).
    Module level, so Tune can pickle it into tuner.pkl."""
    return f"trial-{trial_index_of(trial.experiment_tag, trial.trial_id):04d}-{trial.trial_id}"


# --- the trainable (runs in Ray workers) --------------------------------------------------------------

def study_trainable(config: dict, data=None) -> None:
    """Tune function trainable: one configuration of one method, every seed (``study.trial``).

    ``config`` holds the searched parameters (flat, as Optuna names them), ``method``, and the
    constant ``_study`` block (paths, seeds, base configs)."""
    import torch

    from .config import EvalConfig, Stage1Config, Stage2Config, build

    ctx = tune.get_context()
    st = config["_study"]
    trial_id = ctx.get_trial_id()
    m = TRIAL_DIR_RE.match(Path(ctx.get_trial_dir()).name)
    index = int(m.group(1)) if m else 0
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
        append_jsonl(tdir / "events.jsonl", {"t": time.time(), "event": "adopted", "from": adopted})
    if not (tdir / "trial.json").exists():
        atomic_write_json(tdir / "trial.json", {"experiment": st["experiment"], "stage": st["stage"],
                                                "method": method, "trial_id": trial_id, "trial_index": index,
                                                "params": params, "config": asdict(cfg)})
    spec = TrialSpec(stage=st["stage"], config=cfg, seeds=tuple(st["seeds"]),
                     eval_cfg=build(EvalConfig, st["eval"]), trial_dir=tdir, backbone=st["backbone"],
                     stage1_dir=Path(st["stage1_dir"]) if st.get("stage1_dir") else None,
                     experiment=st["experiment"], trial_index=index, params=params, method=method)
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
    the sub-searchers (their Optuna studies included) at every Tune snapshot."""

    def __init__(self, subs: dict[str, StudyOptunaSearch | None], budgets: dict[str, int], pool: str = ""):
        super().__init__(metric=OBJECTIVE, mode="max")
        self.order = list(subs)
        self.subs = subs
        self.budgets = dict(budgets)
        self.issued = {m: 0 for m in subs}
        self.trial_method: dict[str, str] = {}
        self.pool = pool
        """The stage's trial folder; orphaned trials waiting to be adopted are in its ``.adopt/``."""

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
            if orphan and sub is not None and orphan.get("params"):
                sub._ot_study.enqueue_trial(orphan["params"], skip_if_exists=False)
        params = {} if sub is None else sub.suggest(trial_id)
        if params is None:
            return None
        if trial_id not in self.trial_method:
            self.trial_method[trial_id] = m
            self.issued[m] += 1
        return {**params, "method": m}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        sub = self.subs.get(self.trial_method.get(trial_id, ""))
        if sub is not None:
            sub.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        sub = self.subs.get(self.trial_method.get(trial_id, ""))
        if sub is not None:
            sub.on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


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
            atomic_write_json(tdir / "failed.json", {"status": FAILED,
                                                     "reason": error_reason(getattr(trial, "error_file", None)),
                                                     "num_failures": getattr(trial, "num_failures", None)})
        except Exception:  # bookkeeping must never break the study
            pass


# --- Ray --------------------------------------------------------------------------------------------

def check_address(address: str) -> None:
    """Fail within seconds (not a hang) when a Ray head address cannot be reached."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: expected HOST:PORT (e.g. 10.0.0.5:6379) or 'auto'")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except OSError as e:
        raise UserError(f"--address {address}: cannot reach a Ray head there ({e.strerror or e}); start one "
                        "with 'ray start --head' or check the address") from None


def init_ray(address: str | None, verbose: bool, temp_dir: str | None = None) -> None:
    import logging

    import ray

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A diverged trial's last report has no objective on purpose (so no number can win); the
    # searcher and scheduler skip such reports, so Tune must not reject them.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # See the module top (the variable is set there): without Ray's failure-signal handler, SIGTERM
    # is a Ctrl-C (exit 130, resumable). The parsed constant covers a Ray imported before this module.
    if hasattr(ray._private.ray_constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"):
        ray._private.ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A trial restored from Tune's last checkpoint re-reports a few epochs Optuna has already seen
    # (our trials resume from their own, newer checkpoint); Optuna keeps the first value and warns.
    import warnings

    warnings.filterwarnings("ignore", message="The reported value is ignored because this `step`")
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=verbose,
                                  logging_level=logging.INFO if verbose else logging.ERROR,
                                  configure_logging=True)
    if address:
        # Token auth (heads started by recent Ray): RAY_AUTH_MODE=token must be set before Ray is
        # imported; the CLI does that when ~/.ray/auth_token exists. `run_study` has already checked
        # that the address answers (check_address), before anything was written.
        try:
            with _stop_signals_deferred():
                ray.init(address=address, **kwargs)
        except Exception as e:
            raise UserError(f"--address {address}: could not join the Ray cluster: "
                            f"{str(e).splitlines()[0][:200]}") from None
    else:
        if temp_dir:
            kwargs["_temp_dir"] = temp_dir
        with _stop_signals_deferred():
            ray.init(num_cpus=os.cpu_count() or 1, **kwargs)
    if not verbose:
        for name in ("ray", "ray.tune", "ray.train", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)


def trial_resources(gpus_per_trial: float | None, cpus_per_trial: float | None) -> tuple[float, float]:
    """(GPUs, CPUs) per trial, refusing requests the cluster can never satisfy (Ray would keep such
    trials pending forever). Default: a quarter GPU when the cluster has GPUs, one CPU."""
    import ray

    res = ray.cluster_resources()
    have_gpus, have_cpus = float(res.get("GPU", 0.0)), float(res.get("CPU", 0.0))
    gpus = gpus_per_trial if gpus_per_trial is not None else (0.25 if have_gpus > 0 else 0.0)
    cpus = cpus_per_trial if cpus_per_trial is not None else 1.0
    if gpus > 0 and have_gpus == 0:
        raise UserError(f"--gpus-per-trial {gpus:g}: the Ray cluster has no GPU; leave the option out to "
                        "train on CPUs, or join a cluster with GPUs (--address)")
    if cpus > have_cpus:
        raise UserError(f"--cpus-per-trial {cpus:g}: the Ray cluster has only {have_cpus:g} CPUs")
    return gpus, cpus


# --- one experiment -----------------------------------------------------------------------------------

def _constants(exp: Experiment, space: StudySpace, paths: StudyPaths, stage1_dir: Path | None, cpus: float) -> dict:
    return {"_study": {"root": str(paths.root), "experiment": exp.name, "stage": exp.stage,
                       "seeds": list(space.seeds), "configs": {p.method: asdict(p.config) for p in exp.plans},
                       "eval": asdict(space.eval), "backbone": space.stage1.backbone, "cpus_per_trial": cpus,
                       "stage1_dir": str(stage1_dir) if stage1_dir else None}}


def _make_tuner(exp: Experiment, space: StudySpace, paths: StudyPaths, trainable, stage1_dir: Path | None,
                cpus: float):
    subs: dict[str, StudyOptunaSearch | None] = {}
    for i, p in enumerate(exp.plans):
        if not p.params:
            subs[p.method] = None
            continue
        sampler = optuna.samplers.TPESampler(seed=space.search.sampler_seed + i,
                                             n_startup_trials=space.search.startup_trials)
        subs[p.method] = StudyOptunaSearch({k: d.to_optuna() for k, d in p.params.items()}, metric=OBJECTIVE,
                                           mode="max", sampler=sampler, study_name=f"{exp.name}-{p.method}")
    searcher = MethodSearcher(subs, {p.method: p.budget for p in exp.plans}, str(paths.trials / exp.name))
    # ASHA counts our epochs, not Tune's training_iteration (which restarts when a trial is restarted).
    asha = {p.method: ASHAScheduler(time_attr="epoch", max_t=p.config.epochs,
                                    grace_period=p.scheduler.grace_period,
                                    reduction_factor=p.scheduler.reduction_factor)
            for p in exp.plans if p.scheduler is not None}
    tune_config = tune.TuneConfig(metric=OBJECTIVE, mode="max", search_alg=searcher,
                                  scheduler=MethodScheduler(asha) if asha else None,
                                  num_samples=exp.budget, reuse_actors=True,
                                  max_concurrent_trials=space.search.max_concurrent,
                                  trial_dirname_creator=trial_dirname)
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
    if exp_dir.exists() and usable_snapshot(exp_dir, log) and tune.Tuner.can_restore(str(exp_dir)):
        log(f"{exp.name}: resuming")
        set_aside_orphans(paths, exp.name, log)
        # Unfinished trials keep their ids and run their function again, which resumes from the
        # trial's own checkpoint. (RESTART would give them new ids.) Errored trials stay failed.
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        if exp_dir.exists():
            # Built but never snapshotted (restoring would silently run one trial: notes pitfall 7),
            # or no readable snapshot: start the stage afresh; trials of the old attempt are set aside.
            exp_dir.rename(exp_dir.with_name(f"{exp.name}.unusable-{int(time.time())}"))
            set_aside_orphans(paths, exp.name, log)
        tuner = _make_tuner(exp, space, paths, trainable, stage1_dir, cpus)
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


SNAPSHOT_FILES = ("experiment_state-{}.json", "search_gen_state-{}.json", "searcher-state-{}.pkl")
SNAPSHOT_STAMP = re.compile(r"-(\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2})\.(?:json|pkl)$")


def _snapshot_readable(exp_dir: Path, stamp: str) -> bool:
    import cloudpickle

    try:
        json.loads((exp_dir / SNAPSHOT_FILES[0].format(stamp)).read_text())
        for name in SNAPSHOT_FILES[1:]:
            with open(exp_dir / name.format(stamp), "rb") as f:
                cloudpickle.load(f)
        return True
    except Exception:
        return False


def usable_snapshot(exp_dir: Path, log: Callable[[str], None]) -> bool:
    """Make the newest of Tune's experiment snapshots a readable one; False if none is.

    Tune copies its snapshot files into the results folder with plain (non-atomic) copies, so a
    hard kill can leave one torn (seen: an empty search_gen_state file). Tune's restore then fails
    and it silently starts the experiment over. A torn set is moved to ``.torn-snapshots/`` so that
    Tune restores the previous, complete one instead."""
    stamps = sorted({m.group(1) for pattern in SNAPSHOT_FILES for p in exp_dir.glob(pattern.format("*"))
                     if (m := SNAPSHOT_STAMP.search(p.name))})
    while stamps:
        stamp = stamps.pop()
        if _snapshot_readable(exp_dir, stamp):
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
    pool = folder / ".adopt"
    for tdir in folder.iterdir():
        m = TRIAL_DIR_RE.match(tdir.name)
        if not m or m.group(2) in known:
            continue
        adoptable = (tdir / "trial.json").exists() and not (tdir / "failed.json").exists()
        dest = (pool if adoptable else folder / ".orphaned") / tdir.name
        dest.parent.mkdir(exist_ok=True)
        tdir.rename(dest)
        log(f"{experiment}: trial {tdir.name} is missing from Tune's last snapshot (a hard kill); "
            + ("its method's next trial continues it" if adoptable else "nothing to continue"))
    if pool.is_dir():
        for entry in pool.iterdir():
            claim = entry / "claimed_by"
            if claim.exists() and claim.read_text().strip() not in known:
                claim.unlink()


def claim_orphan(stage_dir: Path, method: str, trial_id: str) -> dict | None:
    """Reserve the most advanced waiting orphan of ``method`` for ``trial_id``; its trial.json."""
    pool = stage_dir / ".adopt"
    if not pool.is_dir():
        return None
    free = []
    for entry in sorted(pool.iterdir()):
        info = read_json_or_none(entry / "trial.json")
        if not info or info.get("method") != method:
            continue
        claim = entry / "claimed_by"
        if claim.exists():
            if claim.read_text().strip() == trial_id:
                return info
            continue
        progress = (float("inf") if (entry / "record.json").exists() else
                    max((e.get("epoch", 0) for e in read_jsonl(entry / "events.jsonl") if e.get("event") == "epoch"),
                        default=0))
        free.append((progress, entry.name, entry, info))
    if not free:
        return None
    _, _, entry, info = max(free, key=lambda f: (f[0], f[1]))
    atomic_write_text(entry / "claimed_by", trial_id)
    return info


def adopt_claimed(stage_dir: Path, trial_id: str, tdir: Path) -> str | None:
    """In the trainable: move the orphan claimed for ``trial_id`` (its checkpoints, events, record
    and final weights) into the trial's own folder. Returns the orphan's folder name, if any."""
    pool = stage_dir / ".adopt"
    if not pool.is_dir():
        return None
    for entry in pool.iterdir():
        claim = entry / "claimed_by"
        if not claim.exists() or claim.read_text().strip() != trial_id:
            continue
        for item in entry.iterdir():
            if item.name not in ("trial.json", "claimed_by") and not (tdir / item.name).exists():
                item.rename(tdir / item.name)
        shutil.rmtree(entry, ignore_errors=True)
        return entry.name
    return None


def select_best(paths: StudyPaths, exp: Experiment) -> dict:
    """Per method: the completed trial with the highest objective (ties: the earlier trial). Diverged,
    failed and early-stopped trials are never selected."""
    chosen: dict[str, Any] = {}
    trials = experiment_trials(paths, exp.name, live=True, include_unknown=False)
    for method in exp.methods:
        best = best_completed(trials, method)
        chosen[method] = None if best is None else {
            "trial_id": best["trial_id"], "trial_index": best["trial_index"], "dir": str(best["dir"]),
            "objective": best["record"]["objective"], "params": best["record"].get("params", {})}
    return chosen


# --- final evaluation ---------------------------------------------------------------------------------

def _final_eval_task(backbone: str, stage1_file: str, heads: dict, data, eval_cfg: dict) -> dict:
    """Test-set reports of every selected model of one seed. The backbone's test features are
    computed once and shared by every head, except for models whose stage 2 updated batch-norm
    statistics (bn_mode: train), which carry their own buffers."""
    from .config import EvalConfig
    from .data import Augmenter, DeviceSplit
    from .evaluation import accuracy_report, compute_features, logits_from_features
    from .fsutil import safe_torch_load
    from .models import build_model
    from .stages import AffineHead, evaluate_final, pick_device

    device = pick_device()
    ev = EvalConfig(**eval_cfg)
    s1 = safe_torch_load(stage1_file)
    model = build_model(backbone, data.num_classes, data.spec.shape[0])
    model.load_state_dict(s1)
    model.to(device).eval()
    split = DeviceSplit(data.test_x, data.test_y, device)
    flip = bool(ev.tta_flip and data.spec.flip)
    feats = compute_features(model.backbone, split, Augmenter(data.spec, device, False), ev.batch_for(device), flip=flip)
    feats = feats if flip else (feats,)
    out = {}
    for key, head_file in heads.items():
        state = safe_torch_load(head_file)
        if "head" not in state:  # a stage-1 model (naive or tuned): its own backbone and classifier
            out[key] = evaluate_final(backbone, state, None, data, "test", ev, device)
        elif state.get("buffers"):
            out[key] = evaluate_final(backbone, s1, state["head"], data, "test", ev, device, buffers=state["buffers"])
        else:
            logits = logits_from_features(AffineHead.from_state(state["head"]).to(device), *feats)
            out[key] = accuracy_report(logits.argmax(1).cpu().numpy(), data.test_y, data.train_counts,
                                       data.many_threshold, data.few_threshold)
    return out


def run_final_evaluation(space: StudySpace, paths: StudyPaths, data, selections: dict, cpus: float,
                         gpus: float, log: Callable[[str], None]) -> None:
    """Evaluate each method's selected configuration once per seed on the test set (skipping those
    already written, so a resumed study never evaluates a configuration twice)."""
    import ray

    todo = [(exp, method, sel) for exp, per_method in selections.items() for method, sel in per_method.items()
            if sel is not None and not paths.final_file(exp, method).exists()]
    if not todo:
        return
    log(f"final evaluation on the test set: {len(todo)} configuration(s) x {len(space.seeds)} seed(s)")
    s1_dir = Path(selections["stage1"]["tuned"]["dir"])
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus)(_final_eval_task)
    data_ref = ray.put(data)
    futures = {seed: remote.remote(space.stage1.backbone, str(s1_dir / f"final-seed{seed}.pt"),
                                   {f"{e}--{m}": str(Path(sel["dir"]) / f"final-seed{seed}.pt") for e, m, sel in todo},
                                   data_ref, asdict(space.eval))
               for seed in space.seeds}
    pause_point("final-eval", log)
    reports = {seed: ray.get(f) for seed, f in futures.items()}
    for exp, method, sel in todo:
        atomic_write_json(paths.final_file(exp, method), {
            "experiment": exp, "method": method, "trial_id": sel["trial_id"], "trial_index": sel["trial_index"],
            "params": sel["params"], "objective": sel["objective"], "split": "test",
            "per_seed": {str(s): reports[s][f"{exp}--{method}"] for s in space.seeds}})


# --- the study ----------------------------------------------------------------------------------------

def study_header(space: StudySpace, name: str, data) -> dict:
    """study.yaml: what the study is (resolved space, experiments, data) and what produced it."""
    from .provenance import provenance

    exps = [{"name": e.name, "stage": e.stage, "budget": e.budget,
             "methods": {p.method: {"budget": p.budget, "searched": list(p.params)} for p in e.plans}}
            for e in space.experiments()]
    return {"study": name, "fingerprint": space.fingerprint(), "protocol": space.protocol,
            "space": space.to_dict(), "experiments": exps,
            "data": {"dataset": space.data.dataset, "imbalance_factor": space.data.resolved_imbalance_factor,
                     "num_classes": data.num_classes, "train_counts": list(data.train_counts),
                     "many_threshold": data.many_threshold, "few_threshold": data.few_threshold,
                     "selection_split": data.selection_split, "subset_hash": data.subset_hash,
                     "official_files": data.official},
            "backbone": space.stage1.backbone,
            "provenance": provenance(space.seeds, data, {"space_file": space.source})}


def write_yaml(path: Path, obj: Any) -> None:
    import yaml

    from .fsutil import atomic_write_text, clean_json

    atomic_write_text(path, yaml.safe_dump(clean_json(obj), sort_keys=False, allow_unicode=True))


def prepare_study_dir(space: StudySpace, paths: StudyPaths, fresh: bool, log: Callable[[str], None]) -> str:
    """'new', 'resume' or 'done'. Refuses a changed space unless ``fresh``, which moves the old folder
    aside (never deleting it)."""
    if not paths.study_yaml.exists():
        leftovers = [p for p in paths.root.iterdir() if p.name != ".lock"] if paths.root.is_dir() else []
        if leftovers:
            if fresh:
                _move_aside(paths, log)
                return "new"
            raise UserError(f"{paths.root} exists but is not a study (no study.yaml); choose another --name "
                            "or move that folder away")
        return "new"
    if fresh:
        _move_aside(paths, log)
        return "new"
    try:
        old = read_yaml_file(paths.study_yaml)
    except Exception:
        old = None
    if not isinstance(old, dict) or old.get("fingerprint") != space.fingerprint():
        diffs = diff_dicts((old or {}).get("space", {}), json_plain(space.to_dict()))
        diffs.sort(key=lambda d: "->" not in d)  # changed values first, then added/removed keys
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise UserError(f"{paths.root} was started with a different search space ({shown or 'unreadable study.yaml'});"
                        " run the original command to resume, or add --fresh to start over (the old folder "
                        "is kept beside it)")
    return "done" if paths.done.exists() else "resume"


def _move_aside(paths: StudyPaths, log: Callable[[str], None]) -> None:
    aside = paths.root.with_name(f"{paths.root.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    paths.root.rename(aside)
    log(f"--fresh: moved the previous study to {aside}")


# --- stopping the driver -----------------------------------------------------------------------------
#
# Ctrl-C and SIGTERM (batch schedulers, `kill`) must stop a study cleanly: exit 130, resumable. Python
# runs a signal handler in the main thread and raises its exception wherever that thread is, and a few
# places swallow exceptions: the at-fork hooks that run while ray.init starts its processes, __del__
# methods. An interrupt raised there is lost and the study runs on. So every stop request is also
# recorded, and the driver checks the record at each phase boundary (`_check_stop`); during ray.init
# the request is only recorded (a half-started Ray would leave orphaned processes) and acted on as soon
# as ray.init returns — a second Ctrl-C interrupts at once.

_STOP = threading.Event()
_DEFERRING = threading.Event()


def _on_stop_signal(signum, frame) -> None:
    repeated = _STOP.is_set()
    _STOP.set()
    if _DEFERRING.is_set() and not repeated:
        return
    if signum == signal.SIGTERM:
        # To whoever handles Ctrl-C now: inside Tune's fit that is Tune's graceful stop (it snapshots
        # the experiment and leaves unfinished trials resumable), elsewhere ours.
        os.kill(os.getpid(), signal.SIGINT)
    else:
        raise KeyboardInterrupt


def _check_stop() -> None:
    """Raise KeyboardInterrupt if a stop was requested, even if its exception was swallowed."""
    if _STOP.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def _stop_signals_deferred():
    """Around ray.init: record stop requests instead of raising inside it (see above), keep Ray from
    replacing our SIGTERM handler with its own ``sys.exit(15)`` (swallowed in an at-fork hook, it lost
    the signal), and act on a recorded request afterwards."""
    from ray._private import utils as ray_utils

    set_handler = getattr(ray_utils, "set_sigterm_handler", None)
    if set_handler is not None:
        ray_utils.set_sigterm_handler = lambda handler: None
    _DEFERRING.set()
    try:
        yield
    finally:
        _DEFERRING.clear()
        if set_handler is not None:
            ray_utils.set_sigterm_handler = set_handler
        signal.signal(signal.SIGTERM, _on_stop_signal)
        signal.signal(signal.SIGINT, _on_stop_signal)
    _check_stop()


def run_study(space: StudySpace, name: str | None = None, results_dir: str | os.PathLike = "results", *,
              address: str | None = None, gpus_per_trial: float | None = None, cpus_per_trial: float | None = None,
              data_dir: str | None = None, fresh: bool = False, verbose: bool = False,
              log: Callable[[str], None] = print, ray_temp_dir: str | None = None) -> Path:
    """Run or resume a whole study; returns its folder. Raises StudyInterrupted when stopped early.

    Everything a user can get wrong is checked before anything is written: the name, the results
    folder, the resources, the cluster address, a changed space, the dataset files."""
    from .data import load_data

    # Ctrl-C and SIGTERM stop the study cleanly from the very start (see _on_stop_signal).
    old_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    _STOP.clear()
    for sig in old_handlers:
        signal.signal(sig, _on_stop_signal)
    lock = None
    try:
        name = check_name(name or space.name)
        results_dir = Path(results_dir).expanduser()
        check_writable(results_dir)
        paths = StudyPaths(results_dir / name)
        if paths.root.exists() and not paths.root.is_dir():
            raise UserError(f"{paths.root} is a file, not a study folder; choose another --name or --results-dir")
        if gpus_per_trial is not None and not 0 < gpus_per_trial <= 1:
            raise UserError(f"--gpus-per-trial {gpus_per_trial:g}: must be in (0, 1] (a fraction lets several "
                            "trials share one GPU, e.g. 0.25)")
        if cpus_per_trial is not None and cpus_per_trial <= 0:
            raise UserError(f"--cpus-per-trial {cpus_per_trial:g}: must be > 0")
        if address:
            check_address(address)
        lock = StudyLock(paths.root)
        lock.check()  # a live `study run` on this folder: refuse now, before touching anything
        state = prepare_study_dir(space, paths, fresh, log)
        if state == "done":
            log(f"{paths.root} is complete: tables in {paths.tables}, plots in {paths.plots}, "
                f"trials in {paths.trials_csv}")
            return paths.root
        data = load_data(space.data, data_dir)  # a missing or corrupt dataset fails here, before any write
        init_ray(address, verbose, ray_temp_dir)  # an unreachable cluster fails here, before any write
        gpus, cpus = trial_resources(gpus_per_trial, cpus_per_trial)
        paths.root.mkdir(parents=True, exist_ok=True)
        lock.acquire(" ".join(sys.argv))
        if state == "new":
            write_yaml(paths.study_yaml, study_header(space, name, data))
        log(f"study {name}: {space.data.dataset}, protocol {space.protocol} (selection on {data.selection_split}), "
            f"seeds {list(space.seeds)} -> {paths.root}" + ("" if state == "new" else " (resuming)"))
        from .progress import ProgressView

        selections: dict[str, dict] = {}
        with ProgressView(paths, space, log, live=not verbose) as view:
            for exp in space.experiments():
                _check_stop()
                marker = paths.stage_marker(exp.name)
                stage1_dir = None
                if exp.stage == "stage2":
                    sel = selections["stage1"].get("tuned")
                    if sel is None:
                        raise UserError("no stage-1 trial completed (all diverged or failed); see "
                                        f"'study status {paths.root}' and narrow the stage-1 space")
                    stage1_dir = Path(sel["dir"])
                    pause_point("between-stages", view.log)
                if not marker.exists():
                    run_experiment(exp, space, paths, data, stage1_dir, cpus, gpus, view.log)
                    atomic_write_json(marker, {"experiment": exp.name, "selected": select_best(paths, exp),
                                               "finished": time.time()})
                selections[exp.name] = read_json(marker)["selected"]
            _check_stop()
            run_final_evaluation(space, paths, data, selections, cpus, gpus, view.log)
        _check_stop()
        finish_study(paths, view_log=log)
        _check_stop()
        atomic_write_json(paths.done, {"finished": time.time(), "fingerprint": space.fingerprint()})
        log(f"done: {paths.trials_csv}\n      tables in {paths.tables}\n      plots in {paths.plots}")
        return paths.root
    except KeyboardInterrupt:
        raise StudyInterrupted("interrupted; run the same command again to resume the study") from None
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        if lock is not None:
            lock.release()
        try:
            import ray

            if not address:  # also after a ray.init interrupted half-way: it stops what was started
                ray.shutdown()
        except Exception:
            pass
