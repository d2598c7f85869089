"""What a study's files say: each trial's status, the long-format rows of trials.csv and
per_class.csv, optuna.db, and the status summary. Reads files only — no Ray, no GPU — so
``study status`` and the analysis work on a finished study, an interrupted one and one that is
still running. The file layout, names and statuses are :mod:`study.layout`'s.
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study import compat
from study.fsutil import StudyLock, atomic_write_bytes, read_json_or_none, read_jsonl, replace_synced
from study.layout import (
    COMPLETED,
    ENDED_STATUSES,
    EVENTS_FILE,
    FAILED,
    FAILED_FILE,
    FAILURE_STATUSES,
    INTERRUPTED,
    PENDING,
    PER_CLASS_COLUMNS,
    RUNNING,
    STOPPED,
    TRIALS_COLUMNS,
    FinalReport,
    PerClassRow,
    Selection,
    StageMarker,
    StudyHeader,
    StudyPaths,
    TrialInfo,
    TrialRecord,
    TrialRow,
    load_header,
    parse_trial_dirname,
    searched_params,
    trial_index_in_experiment,
)


def fmt_value(v: Any) -> str:
    """A hyperparameter for people: three significant digits for real values (1e-05, 0.000178),
    whole numbers as such (epochs 1000, not 1e+03), anything else as text."""
    if isinstance(v, bool) or not hasattr(v, "__float__"):  # ints, floats and numpy numbers have it
        return str(v)
    x = float(v)
    if math.isfinite(x) and x == int(x) and abs(x) < 1e6:
        return str(int(x))
    return f"{x:.3g}"


def fmt_params(params: dict | None) -> str:
    """``name=value, ...`` with :func:`fmt_value`."""
    return ", ".join(f"{k}={fmt_value(v)}" for k, v in (params or {}).items())


# --- Tune's own view (for statuses our files cannot know: pending, early-stopped, errored) --------------


def _by_trial(trials: list[dict]) -> dict[str, dict]:
    """trial_id -> {experiment, status, index, logdir, config}. A trial's experiment and its index in
    it are in the ``_study`` block of its config (one Tuner runs every experiment); the experiment
    tag's counter is the fallback for the index."""
    return {
        t["trial_id"]: {
            "experiment": (t["config"].get("_study") or {}).get("experiment"),
            "status": t["status"],
            "index": trial_index_in_experiment(t["config"], t["experiment_tag"], t["trial_id"]),
            "logdir": t["relative_logdir"],
            "config": t["config"],
        }
        for t in trials
    }


def read_tune_state(file: str | os.PathLike) -> dict[str, dict]:
    """trial_id -> {experiment, status, index, logdir, config} from one of Tune's experiment_state
    files (``study.compat``, entry ``tune-snapshot``)."""
    return _by_trial(compat.read_snapshot_trials(file))


def tune_trials(paths: StudyPaths, experiment: str | None = None) -> dict[str, dict]:
    """trial_id -> {experiment, status, index, logdir, config} from the newest readable Tune snapshot
    (empty if none), of one experiment or (None) of all."""
    trials = _by_trial(compat.newest_snapshot_trials(paths.tune_experiment) or [])
    return {tid: t for tid, t in trials.items() if experiment is None or t["experiment"] == experiment}


def error_reason(error_file: str | os.PathLike | None) -> str:
    """A failed trial's reason: the last line of Tune's ``error.txt`` (the exception), at most 500
    characters; ``trial raised`` when there is none."""
    try:
        lines = [ln for ln in Path(error_file).read_text(errors="replace").splitlines() if ln.strip()]
    except (OSError, TypeError):
        return "trial raised"
    return lines[-1][-500:] if lines else "trial raised"


def lock_alive(paths: StudyPaths) -> bool:
    lock = StudyLock(paths.root)
    info = lock.owner()
    return info is not None and not lock.is_stale(info)


# --- one trial, as its files say --------------------------------------------------------------------------


@dataclass
class TrialView:
    """A trial as its folder (and Tune's snapshot) describe it."""

    trial_index: int
    trial_id: str
    dir: Path | None
    status: str
    method: str | None = None
    params: dict = field(default_factory=dict)
    record: TrialRecord | None = None
    reason: str | None = None
    objective: float | None = None
    epochs_run: int = 0
    resumed_from_epoch: int = 0
    events: list = field(default_factory=list)
    """The ``epoch`` events (per-epoch objective and selection accuracies)."""
    notes: str = ""


def _status(record: TrialRecord | None, failed: dict | None, tstat: str | None, live: bool) -> tuple[str, str | None]:
    if record:
        return record.status, record.reason
    if failed:
        return FAILED, failed.get("reason")
    if tstat == "ERROR":
        return FAILED, None
    if tstat == "TERMINATED":
        return STOPPED, "stopped early by the ASHA scheduler"
    return (RUNNING if live else INTERRUPTED), None


def experiment_trials(
    paths: StudyPaths, experiment: str, live: bool | None = None, include_unknown: bool | None = None
) -> list[TrialView]:
    """Every known trial of an experiment with its status, params, objective and record.

    ``live``: a `study run` holds the study (in-flight trials are ``running``, not ``interrupted``).
    ``include_unknown``: also list trial folders that Tune's last snapshot does not know — trials
    of a live run that have not reached their first report yet; after a hard kill such folders are
    never resumed (see ``study.search.resume.set_aside_orphans``). Default: ``live``."""
    if live is None:
        live = lock_alive(paths)
    if include_unknown is None:
        include_unknown = live
    tune_state = tune_trials(paths, experiment)
    # the trials of Tune's stored snapshot, and those a finished experiment's marker lists (the
    # snapshot is copied asynchronously and can lag behind the marker)
    marker = StageMarker.read(paths.stage_marker(experiment))
    known = set(tune_state) | set(marker.trials if marker else ())
    out: dict[str, TrialView] = {}
    folder = paths.trials / experiment
    if folder.is_dir():
        for tdir in sorted(folder.iterdir()):
            parsed = parse_trial_dirname(tdir.name)
            if not parsed or not tdir.is_dir():
                continue
            index, tid = parsed
            if known and not include_unknown and tid not in known:
                continue
            info = TrialInfo.read(tdir / TrialInfo.FILE)
            record = TrialRecord.read(tdir / TrialRecord.FILE)
            events = read_jsonl(tdir / EVENTS_FILE)
            epochs = [e for e in events if e.get("event") == "epoch"]
            tstat = (tune_state.get(tid) or {}).get("status")
            status, reason = _status(record, read_json_or_none(tdir / FAILED_FILE), tstat, live)
            if status == FAILED and reason is None:
                logdir = tune_state[tid].get("logdir")
                reason = error_reason(paths.tune_experiment / logdir / "error.txt" if logdir else None)
            t = TrialView(
                index,
                tid,
                tdir,
                status,
                method=info.method if info else None,
                params=dict(info.params) if info else {},
                record=record,
                reason=reason,
                objective=epochs[-1].get("objective") if epochs else None,
                epochs_run=epochs[-1].get("epoch") if epochs else 0,
                events=epochs,
                resumed_from_epoch=max(
                    (e.get("start_epoch", 0) for e in events if e.get("event") == "start"), default=0
                ),
                notes="; ".join(e.get("note", "") for e in events if e.get("event") == "fallback"),
            )
            if record:
                t.objective = record.objective
                t.epochs_run = record.epochs_run or t.epochs_run
                t.params = dict(record.params or t.params)
            out[tid] = t
    for tid, ts in tune_state.items():  # suggested by the searcher but never started
        if tid not in out and ts.get("status") in ("PENDING", "PAUSED", "RUNNING"):
            cfg = ts.get("config") or {}
            out[tid] = TrialView(
                ts.get("index") or 0, tid, None, PENDING, method=cfg.get("method"), params=searched_params(cfg)
            )
    return sorted(out.values(), key=lambda t: t.trial_index)


def best_completed(trials: list[TrialView], method: str) -> TrialView | None:
    """The completed trial of ``method`` with the highest objective (ties: the earlier trial), from
    ``experiment_trials``. Diverged, failed and early-stopped trials never count."""
    best = None
    for t in trials:
        if (
            t.method == method
            and t.status == COMPLETED
            and t.objective is not None
            and (best is None or t.objective > best.objective)
        ):
            best = t
    return best


def select_best(
    paths: StudyPaths, experiment: str, methods, trial_ids: set[str] | None = None
) -> dict[str, Selection | None]:
    """Per method: the completed trial with the highest objective (ties: the earlier trial), among
    ``trial_ids`` (default: the trials of Tune's last snapshot). Diverged, failed and early-stopped
    trials are never selected."""
    trials = experiment_trials(paths, experiment, live=True, include_unknown=trial_ids is not None)
    if trial_ids is not None:
        trials = [t for t in trials if t.trial_id in trial_ids]
    chosen: dict[str, Selection | None] = {}
    for method in methods:
        best = best_completed(trials, method)
        chosen[method] = (
            None
            if best is None
            else Selection(
                trial_id=best.trial_id,
                trial_index=best.trial_index,
                dir=str(best.dir),
                objective=best.record.objective,
                params=dict(best.record.params or {}),
            )
        )
    return chosen


# --- trials.csv and per_class.csv -------------------------------------------------------------------------


def collect(paths: StudyPaths, header: StudyHeader) -> tuple[list[dict], list[dict]]:
    """(trials rows, per-class rows) from the files of a study, as plain mappings in column order."""
    from study.config.groups import shot_groups

    study = header.study or paths.root.name
    counts = header.data.train_counts
    groups = shot_groups(counts, header.data.many_threshold, header.data.few_threshold)
    live = lock_alive(paths)
    rows: list[TrialRow] = []
    per_class: list[PerClassRow] = []
    for exp in header.experiments:
        marker = StageMarker.read(paths.stage_marker(exp.name))
        for t in experiment_trials(paths, exp.name, live, include_unknown=False):
            if t.method is None:  # a trial folder whose trial.json was never written: nothing to report
                continue
            sel = marker.selection(t.method) if marker else None
            is_sel = sel is not None and sel.trial_id == t.trial_id
            final = FinalReport.read(paths.final_file(exp.name, t.method)) if is_sel else None
            for seed in header.seeds:
                ps = t.record.seed(seed) if t.record else None
                sel_rep = (ps.selection if ps else None) or {}
                test = final.seed(seed) if final else {}
                bal = (ps.balance if ps else None) or {}
                rows.append(
                    TrialRow(
                        study=study,
                        stage=exp.stage,
                        experiment=exp.name,
                        variant=exp.variant_of(t.method),
                        method=t.method,
                        trial=t.trial_index,
                        trial_id=t.trial_id,
                        seed=seed,
                        status=t.status,
                        reason=t.reason,
                        selected=is_sel,
                        objective=t.objective,
                        best_epoch=ps.best_epoch if ps else None,
                        epochs_run=t.epochs_run,
                        resumed_from_epoch=t.resumed_from_epoch,
                        selection_split=header.data.selection_split,
                        **{f"sel_{g}": sel_rep.get(g) for g in ("all", "many", "medium", "few")},
                        **{f"test_{g}": test.get(g) for g in ("all", "many", "medium", "few")},
                        norm_ratio=bal.get("norm_ratio"),
                        norm_cv=bal.get("norm_cv"),
                        norm_spearman=bal.get("norm_spearman"),
                        maxnorm_radius=ps.maxnorm_radius if ps else None,
                        maxnorm_binding=ps.maxnorm_binding if ps else None,
                        maxnorm_rows_clipped=ps.maxnorm_rows_clipped if ps else None,
                        tau=ps.tau if ps else None,
                        notes=t.notes or None,
                        params=dict(t.params or {}),
                        **_geometry_columns(test.get("geometry")),
                    )
                )
                if is_sel and ps and ps.selection is not None:
                    norms = ps.weight_norms or []
                    feature_norms = ((test.get("geometry") or {}).get("train") or {}).get("feature_norms") or []
                    sel_pc = sel_rep.get("per_class") or []
                    test_pc = test.get("per_class") or []
                    for c, n in enumerate(counts):
                        per_class.append(
                            PerClassRow(
                                study=study,
                                stage=exp.stage,
                                experiment=exp.name,
                                variant=exp.variant_of(t.method),
                                method=t.method,
                                seed=seed,
                                klass=c,
                                train_count=n,
                                group=str(groups[c]),
                                sel_acc=sel_pc[c] if c < len(sel_pc) else None,
                                test_acc=test_pc[c] if c < len(test_pc) else None,
                                weight_norm=norms[c] if c < len(norms) else None,
                                feature_norm=feature_norms[c] if c < len(feature_norms) else None,
                            )
                        )
    return [r.to_dict() for r in rows], [r.to_dict() for r in per_class]


def _geometry_columns(geo: dict | None) -> dict:
    """trials.csv's feature-geometry columns from a final report's ``geometry`` block."""
    train, test = (geo or {}).get("train") or {}, (geo or {}).get("test") or {}
    return {
        "fdr_train": train.get("fdr"),
        "fdr_test": test.get("fdr"),
        "class_cos_train": train.get("class_mean_cos"),
        "class_cos_test": test.get("class_mean_cos"),
        "class_cos_centred_test": test.get("class_mean_cos_centred"),
        "cone_cos_test": test.get("cone_cos"),
        "feature_norm_spearman": train.get("feature_norm_spearman"),
    }


def csv_text(rows: list[dict], columns: list[str]) -> str:
    """CSV of ``rows`` with ``columns`` first and any others (``param.*``) after, sorted. Empty cells
    for None/NaN; floats as repr (round-trips exactly)."""
    import csv
    import io

    extra = sorted({k for r in rows for k in r if k not in columns})
    cols = columns + extra
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(r.get(k)) for k in cols})
    return buf.getvalue()


def _csv_value(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


def write_records(paths: StudyPaths) -> tuple[int, int]:
    """Rebuild trials.csv and per_class.csv (atomically; never duplicated, never half-written)."""
    _, header = load_header(paths.root)
    rows, per_class = collect(paths, header)
    atomic_write_bytes(paths.trials_csv, csv_text(rows, TRIALS_COLUMNS).encode("utf-8"))
    atomic_write_bytes(paths.per_class_csv, csv_text(per_class, PER_CLASS_COLUMNS).encode("utf-8"))
    return len(rows), len(per_class)


# --- optuna.db ------------------------------------------------------------------------------------------


def optuna_study_name(experiment: str, method: str) -> str:
    """The Optuna study of one method of one experiment (``stage1-ce-wd``, ``stage2-ce-wd-wb``), in the
    searcher and in optuna.db."""
    return f"{experiment}-{method}"


def optuna_trial(t: TrialView, dists: dict):
    """An ended trial as a finished Optuna trial (its parameters in ``dists``, its objective if it
    completed, its per-epoch objectives, and user attributes ``tune_trial_id``, ``trial_index``,
    ``status``, ``reason``): what optuna.db holds, and what a restored searcher's history gets for
    a trial its saved state missed."""
    from optuna.trial import TrialState, create_trial

    state = {COMPLETED: TrialState.COMPLETE, STOPPED: TrialState.PRUNED}.get(t.status, TrialState.FAIL)
    params = {k: v for k, v in (t.params or {}).items() if k in dists}
    inter = {
        int(e["epoch"]): float(e["objective"])
        for e in t.events
        if e.get("objective") is not None and math.isfinite(e["objective"])
    }
    attrs = {"tune_trial_id": t.trial_id, "trial_index": t.trial_index, "status": t.status, "reason": t.reason or ""}
    return create_trial(
        params=params,
        distributions={k: dists[k] for k in params},
        value=t.objective if state == TrialState.COMPLETE else None,
        state=state,
        intermediate_values=inter,
        user_attrs=attrs,
    )


def export_optuna(paths: StudyPaths) -> Path:
    """Rebuild ``optuna.db``: one Optuna study per experiment and method (``stage1-<variant>``,
    ``stage2-<variant>-<method>``; ``stage2-<method>`` for old-form spaces), its trials with their parameters,
    objective, per-epoch
    intermediate values and user attributes ``tune_trial_id``, ``status``, ``reason``. Built in a
    temporary file and renamed, so readers never see a half-written database."""
    import optuna

    from study.config.spaces import dist_from_yaml

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _, header = load_header(paths.root)
    tmp = paths.optuna_db.with_name(".optuna.db.tmp")
    tmp.unlink(missing_ok=True)

    def connect():
        # The file is renamed into place only once complete (and synced), so its commits need not
        # wait for the disk: SQLite's synchronous=OFF, which halves the time of each added trial.
        con = sqlite3.connect(str(tmp), check_same_thread=False)
        con.execute("PRAGMA synchronous=OFF")
        return con

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp}", engine_kwargs={"creator": connect})
    live = lock_alive(paths)
    for exp in header.experiments:
        trials = experiment_trials(paths, exp.name, live, include_unknown=False)
        for method in exp.methods:
            study = optuna.create_study(
                study_name=optuna_study_name(exp.name, method),
                storage=storage,
                direction="maximize",
                load_if_exists=True,
            )
            dists = {k: dist_from_yaml(v).to_optuna() for k, v in header.search_space(exp, method).items()}
            for t in trials:
                if t.method != method or t.status not in ENDED_STATUSES:
                    continue
                study.add_trial(optuna_trial(t, dists))
    if hasattr(storage, "engine"):
        storage.engine.dispose()
    del storage
    replace_synced(tmp, paths.optuna_db)
    return paths.optuna_db


def optuna_db_problem(paths: StudyPaths, header: StudyHeader) -> str | None:
    """What is wrong with a finished study's ``optuna.db`` (None: it opens and holds one study per
    experiment and method). It is derived from the trial records, so any problem can be repaired."""
    if not paths.optuna_db.is_file():
        return "is missing"
    try:
        con = sqlite3.connect(f"{paths.optuna_db.as_uri()}?mode=ro", uri=True)
        try:
            check = con.execute("PRAGMA quick_check").fetchone()[0]
            names = {r[0] for r in con.execute("SELECT study_name FROM studies")}
        finally:
            con.close()
    except sqlite3.Error as e:
        return f"cannot be read ({e})"
    if check != "ok":
        return f"is damaged ({check})"
    missing = sorted({optuna_study_name(e.name, m) for e in header.experiments for m in e.methods} - names)
    if missing:
        return f"lacks the Optuna studies {', '.join(missing[:3])}" + (" and more" if len(missing) > 3 else "")
    return None


def repair_optuna_db(paths: StudyPaths, say: Callable[[str], None] = print) -> bool:
    """Rebuild a finished study's missing or damaged ``optuna.db`` from the trial records, and say
    so in one line; True when it did. (An unfinished study rebuilds it when it finishes.)"""
    if not paths.done.exists() or lock_alive(paths):
        return False
    _, header = load_header(paths.root)
    why = optuna_db_problem(paths, header)
    if why is None:
        return False
    export_optuna(paths)
    say(f"{paths.optuna_db} {why}; rebuilt it from the trial records")
    return True


# --- status summary -------------------------------------------------------------------------------------


def study_status(root: str | os.PathLike) -> dict:
    """Per stage and method: completed / diverged / failed / running / pending against the budget,
    and the best configuration so far. Reads files only."""
    paths, header = load_header(root)
    live = lock_alive(paths)
    out = {
        "study": header.study,
        "root": str(paths.root),
        "complete": paths.done.exists(),
        "running": live,
        "experiments": [],
    }
    for exp in header.experiments:
        trials = experiment_trials(paths, exp.name, live)
        methods = {}
        for method, info in exp.methods.items():
            mine = [t for t in trials if t.method == method]
            counts = {s: 0 for s in (COMPLETED, *FAILURE_STATUSES, STOPPED, RUNNING, INTERRUPTED)}
            for t in mine:
                if t.status != PENDING:
                    counts[t.status] = counts.get(t.status, 0) + 1
            counts[PENDING] = max(0, info.budget - sum(counts.values()))
            b = best_completed(mine, method)
            best = b and {"trial": b.trial_index, "objective": b.objective, "params": b.params}
            methods[method] = {"budget": info.budget, "counts": counts, "best": best}
        total = {k: sum(m["counts"][k] for m in methods.values()) for k in next(iter(methods.values()))["counts"]}
        out["experiments"].append(
            {
                "name": exp.name,
                "budget": exp.budget,
                "variant": exp.variant,
                "finished": paths.stage_marker(exp.name).exists(),
                "counts": total,
                "methods": methods,
            }
        )
    out["final_evaluations"] = paths.final_reports()
    return out
